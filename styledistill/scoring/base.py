"""The scorer interface: a batch of views in, named float scores out.

A *view* is a (content, style, target) triple of image ids. Scores are stored for every sample before any
filter runs (filters/ only reads them). Most scorers compare per-image embeddings: `EmbeddingScorer` embeds
each distinct image of a batch once and reuses it for every view that shares it.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from styledistill.backends import Backend

ROLES = ("content", "style", "target")


@dataclass
class ViewScores:
    scores: dict[str, float] = field(default_factory=dict)  # a missing score is an absent key
    notes: dict[str, str] = field(default_factory=dict)  # e.g. a judge's raw text when unparseable


def reference_cosines(features: dict[str, np.ndarray]) -> tuple[float, float]:
    """(content ref · target, style ref · target) for unit-norm embeddings: the content score, and with it
    the leakage/gain signal (a target closer to the style reference than to the content reference)."""
    target = features["target"]
    return float(features["content"] @ target), float(features["style"] @ target)


def check_image(image: np.ndarray, name: str) -> None:
    """A scorer's input must be a non-empty HxWx3 uint8 image; some models would score anything."""
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            and image.shape[0] > 0 and image.shape[1] > 0):
        shape = getattr(image, "shape", None)
        raise ValueError(f"image {name}: expected a non-empty HxWx3 uint8 array, got {shape}")


class Scorer(Backend):
    """Subclasses set `name` (their registry key and score prefix), `scores` (the names they write),
    `Options`, and implement `setup` and `score_views`."""

    kind = "scorer"
    scores: ClassVar[tuple[str, ...]] = ()

    def declared_scores(self) -> tuple[str, ...]:
        """The score names this scorer writes with its options (the stats keys filters may read)."""
        return self.scores

    @abstractmethod
    def score_views(
        self,
        views: list[dict[str, str]],
        images: dict[str, np.ndarray],
        prior: list[dict[str, float]],
    ) -> list[ViewScores]:
        """`views[i]` maps role -> image id in `images`; `prior[i]` holds scores of earlier scorers."""

class EmbeddingScorer(Scorer):
    """Scores from per-image features; only the roles in `roles` are embedded."""

    roles: tuple[str, ...] = ROLES

    @abstractmethod
    def embed(self, images: list[np.ndarray]) -> list[Any]:
        """One feature object per image."""

    @abstractmethod
    def compare(self, features: dict[str, Any]) -> dict[str, float]:
        """Scores for one view from its features by role (only `roles` present)."""

    def score_views(self, views, images, prior):
        ids = sorted({view[role] for view in views for role in self.roles})
        for image_id in ids:
            check_image(images[image_id], image_id)
        features = dict(zip(ids, self.embed([images[i] for i in ids]))) if ids else {}
        return [ViewScores(self.compare({r: features[v[r]] for r in self.roles})) for v in views]
