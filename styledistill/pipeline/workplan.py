"""What an attempt has left to do, found before Ray or any actor starts.

The plan is deterministic and cheap to walk (no pixels: sources are already scanned), so the driver compares
it with the finished shards (those with a `_stats.json`) first. A finished run then starts nothing at all, and
a run with a few shards left starts only the actors those shards can keep busy: a stage never gets more
actors than there are batches left, nor the writer more than there are shards left.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from styledistill.schemas.config import RunConfig
from styledistill.schemas.records import Group
from styledistill.schemas.stages import PIPELINE_STAGES


@dataclass(frozen=True)
class WorkPlan:
    shards: int  # shards in the whole plan
    pending: tuple[int, ...]  # shards without a stats file, in plan order
    batches: int  # batches the pending shards are cut into (batches never cross a shard)
    groups: int  # groups of the pending shards

    @property
    def nothing_to_do(self) -> bool:
        return not self.pending

    def sized(self, config: RunConfig) -> RunConfig:
        """`config` with each stage's actor count capped by the work left (the config hash ignores stages)."""
        stages = config.stages.model_copy(deep=True)
        for spec in PIPELINE_STAGES:
            resources = getattr(stages, spec.name)
            resources.concurrency = max(1, min(resources.concurrency, self.batches))
        stages.write.concurrency = max(1, min(stages.write.concurrency, len(self.pending)))
        return config.model_copy(update={"stages": stages})


def survey(groups: Iterable[Group], done: Iterable[int], groups_per_batch: int) -> WorkPlan:
    """Walk the plan once: how many shards it has and which of them, cut into how many batches, are left."""
    finished = set(done)
    per_shard: Counter = Counter()
    shards = 0
    for group in groups:
        shards = max(shards, group.shard + 1)
        if group.shard not in finished:
            per_shard[group.shard] += 1
    pending = tuple(sorted(per_shard))
    batches = sum(math.ceil(n / groups_per_batch) for n in per_shard.values())
    return WorkPlan(shards, pending, batches, sum(per_shard.values()))
