"""When a stage's actor pool grows or shrinks: pure logic, no Ray (the executor applies the decisions).

Each stage runs between `min_actors` and `max_actors` actors (schemas/stages.py). Every tick the executor
describes each pool (`PoolState`: its backlog, its actors' loads, how long the idle ones have been idle) and
the free resources of each node, and `AutoscalePolicy.decide` answers:

- **grow** a stage whose queue backs up: batches wait while every actor's queue is full, and draining them
  at the stage's measured seconds per batch would take at least `backlog_s` (a cheap stage with a long
  queue, like `load` at the start of a run, drains it in a moment and does not grow). It grows by as many
  actors as its backlog needs, up to `max_actors` and only as many as fit on the nodes' free resources (an actor
  that fits nowhere would wait forever for a node). Only the bottleneck grows: a stage whose capacity
  (actors / seconds per batch) is above another stage's would only move its backlog downstream, while its
  new actors take the resources the slowest stage needs. So the expensive stage (the generator) is served
  before the cheap ones take what is left. A stage grows
  again only once its new actors have started (they hold their resources from then on, and the cluster's
  view of free resources has caught up).
- **shrink** a stage with nothing queued by retiring actors that have had nothing in flight for `idle_s`,
  down to `min_actors`; their resources become free for a stage that backs up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class PoolState:
    """One stage's pool as the executor sees it at a tick."""

    stage: int  # pool index
    queued: int  # batches waiting for this stage (not yet sent to an actor)
    active: int  # actors taking work or starting (retired ones not counted)
    starting: int  # of those, created and not yet ready (loading their models)
    min_actors: int
    max_actors: int
    max_in_flight: int  # batches one actor may have queued
    saturated: bool  # no ready actor has room for another batch
    batch_s: float | None = None  # seconds one actor takes per batch (recent average); None: none finished yet
    idle: dict[int, float] = field(default_factory=dict)  # ready actor with nothing in flight -> seconds idle
    wants: dict[str, float] = field(default_factory=dict)  # resources one actor asks for (CPU, GPU, custom)


@dataclass(frozen=True)
class Decision:
    kind: str  # "grow" or "shrink"
    stage: int
    count: int = 0  # grow: actors to add
    actor: int = -1  # shrink: the actor to retire


def _fits(wants: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(name, 0.0) >= amount - 1e-9 for name, amount in wants.items() if amount > 0)


def _take(wants: dict[str, float], node: dict[str, float]) -> None:
    for name, amount in wants.items():
        if amount > 0:
            node[name] = node.get(name, 0.0) - amount


class AutoscalePolicy:
    def __init__(self, idle_s: float = 5.0, backlog_s: float = 2.0):
        self.idle_s, self.backlog_s = idle_s, backlog_s

    @staticmethod
    def backlog(pool: PoolState) -> float:
        """Seconds the stage's actors would take to drain its queue."""
        return pool.queued * (pool.batch_s or 0.0) / max(1, pool.active)

    @staticmethod
    def capacity(pool: PoolState) -> float | None:
        """Batches per second the stage's actors get through (None: not measured yet)."""
        return pool.active / pool.batch_s if pool.batch_s else None

    def wants_to_grow(self, pool: PoolState) -> bool:
        return (pool.queued > 0 and pool.saturated and pool.active < pool.max_actors and pool.starting == 0
                and self.backlog(pool) >= self.backlog_s)

    def decide(self, pools: list[PoolState], free_nodes: list[dict[str, float]]) -> list[Decision]:
        """Decisions for this tick. `free_nodes`: per alive node, its free resources now."""
        decisions: list[Decision] = []
        nodes = [dict(node) for node in free_nodes]  # what this tick's growth has left
        measured = [c for c in map(self.capacity, pools) if c is not None]
        slowest = min(measured, default=0.0)
        growing = sorted((p for p in pools if self.wants_to_grow(p) and self.capacity(p) <= slowest * 1.1),
                         key=lambda p: (-self.backlog(p), p.stage))
        for pool in growing:
            wanted = min(pool.max_actors - pool.active, math.ceil(pool.queued / pool.max_in_flight))
            placed = 0
            for node in nodes:
                while placed < wanted and _fits(pool.wants, node):
                    _take(pool.wants, node)
                    placed += 1
            if placed:
                decisions.append(Decision("grow", pool.stage, count=placed))
        for pool in pools:
            if pool.queued or pool.starting or pool.active <= pool.min_actors:
                continue
            surplus = pool.active - pool.min_actors
            for actor, idle in sorted(pool.idle.items(), key=lambda item: (-item[1], item[0])):
                if surplus and idle >= self.idle_s:
                    decisions.append(Decision("shrink", pool.stage, actor=actor))
                    surplus -= 1
        return decisions
