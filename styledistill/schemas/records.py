"""The records that flow through a run: scanned sources, the plan, and the work items stages pass on.

A *group* is one content photo `c` with its `k` style references `s_i`, the realistic partners `p` used by
SnR/RnR, the generations `r_i = G(c, s_i)` and the triplets built from them. Images inside a group are
addressed by *slot*: "c", "s0", "s1", "p0", "r0", "r1", ... so a triplet is three slot names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CONTENT_SLOT = "c"


def style_slot(i: int) -> str:
    return f"s{i}"


def partner_slot(i: int) -> str:
    return f"p{i}"


def result_slot(i: int) -> str:
    return f"r{i}"


def is_result_slot(slot: str) -> bool:
    """A V1 output r_i (as opposed to a source image: c, s_i, p_j)."""
    return slot.startswith("r")


@dataclass(frozen=True)
class SourceImage:
    """One scanned, valid, de-duplicated source image (a row of sources.parquet with status ok)."""

    uri: str
    label: str  # realistic | stylized
    sha256: str
    width: int
    height: int


@dataclass(frozen=True)
class Generation:
    """A V1 call: r_i = G(c, s_i) with its seed and prompt."""

    gen_id: str
    slot: str  # r_i
    content_slot: str  # c
    style_slot: str  # s_i
    seed: int
    prompt: str


@dataclass(frozen=True)
class Triplet:
    key: str  # the webdataset key: stable, unique, no dots
    recipe: str
    content_ref: str  # slot
    style_ref: str  # slot
    target: str  # slot
    instruction: str


@dataclass(frozen=True)
class Group:
    group_id: str
    shard: int
    sources: dict[str, SourceImage]  # slot -> source, for c, s_i and p_j
    generations: tuple[Generation, ...]
    triplets: tuple[Triplet, ...]
    seed: int
    # An audited sample carries its own images (slot -> the bytes read from its input tar) and what its
    # reader found wrong (slot -> reason); a planned group has neither and reads its sources by uri.
    payload: dict[str, bytes] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    def without_payload(self) -> Group:
        """The same group without its carried bytes (for whoever needs only its plan, e.g. the writer)."""
        return dataclasses.replace(self, payload={}) if self.payload else self


@dataclass
class GroupWork:
    """A group on its way through the stages: images by slot, scores, and what went wrong where."""

    group: Group
    images: dict[str, np.ndarray] = field(default_factory=dict)  # slot -> HxWx3 uint8 RGB
    errors: dict[str, str] = field(default_factory=dict)  # slot -> why this image is missing
    encoded: dict[str, bytes] = field(default_factory=dict)  # slot -> encoded image bytes
    image_sha256: dict[str, str] = field(default_factory=dict)  # slot -> sha256 of encoded bytes
    # Scores of each generation's (c, s_i, r_i) view, by generation slot, and of each triplet, by key.
    generation_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    triplet_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    # Per-triplet extras by triplet key: enhancer answers ("prompts"), scorer notes ("notes"), and the
    # scorers that failed on its view ("scorer_errors").
    annotations: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds spent on this group
    nodes: dict[str, str] = field(default_factory=dict)  # stage -> Ray node id that ran it

    def fail(self, slot: str, reason: str) -> None:
        self.errors.setdefault(slot, reason)
        self.images.pop(slot, None)


@dataclass
class ShardResult:
    """What the writer reports for a finished shard (the content of <shard>_stats.json)."""

    shard: int
    name: str
    groups: int
    planned: int
    accepted: int
    rejected: int
    failed: int
    tar_bytes: int
    stage_seconds: dict[str, float]
    nodes: dict[str, list[str]] = field(default_factory=dict)  # stage -> ids of the nodes that ran it
