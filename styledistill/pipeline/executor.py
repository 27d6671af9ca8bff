"""Run the stages over the plan: on Ray actor pools (the product) or inline in one process (benchmarks).

Ray executor, in short: the plan is cut into batches that never cross a shard; each batch flows through
one actor per stage, the driver passing object refs from stage to stage (it never pulls images itself);
when all batches of a shard are through, a writer actor pulls them one at a time, in plan order, and
writes the shard. Memory stays bounded: at most `max_shards_in_flight` shards are open and each actor has
at most `max_in_flight` batches queued. Actors restart when they die and Ray retries their batches; a
batch that still fails reaches the writer as an error and its samples are recorded as failed.

Why not Ray Data: a shard must be a fixed, known set of planned samples for resume to be exact, and
Ray Data's webdataset writer names blocks by uuid and cannot skip finished shards.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from styledistill.pipeline.stages import Stage, build_backend, run_stage
from styledistill.schemas.config import ModelSpec, RunConfig
from styledistill.schemas.stages import STAGES, StageResources
from styledistill.schemas.records import Group, GroupWork, ShardResult

if TYPE_CHECKING:  # annotations only: the writer imports webdataset, hence torch
    from styledistill.pipeline.writer import ShardWriter

logger = logging.getLogger(__name__)

ShardCallback = Callable[[ShardResult], None]


def plan_batches(groups: Iterator[Group], groups_per_batch: int, skip_shard: Callable[[int], bool]
                 ) -> Iterator[tuple[int, list[Group], bool]]:
    """(shard, batch, last batch of its shard?) in plan order; finished shards are skipped whole."""
    batch: list[Group] = []
    for group in groups:
        if skip_shard(group.shard):
            continue
        if batch and (group.shard != batch[0].shard or len(batch) == groups_per_batch):
            yield batch[0].shard, batch, group.shard != batch[0].shard
            batch = []
        batch.append(group)
    if batch:
        yield batch[0].shard, batch, True


class InlineExecutor:
    """Every stage in this process, one batch at a time: the bare loop the Ray executor is measured against."""

    def __init__(self, config: RunConfig, stages: list[Stage]):
        self.config, self.stages = config, stages

    def start(self) -> dict[str, dict[str, str]]:
        """Set every stage up; returns the model ids the samples will carry."""
        models: dict[str, dict[str, str]] = {}
        for stage in self.stages:
            stage.setup()
            models.update(stage.model_info())
        return models

    def run(self, groups: Iterator[Group], skip_shard: Callable[[int], bool], on_shard: ShardCallback,
            writer: ShardWriter) -> None:
        pending: list[tuple[list[Group], list[GroupWork]]] = []
        for shard, batch, last in plan_batches(groups, self.config.ray.groups_per_batch, skip_shard):
            works: list[GroupWork] | str = [GroupWork(g) for g in batch]
            for stage in self.stages:
                try:
                    works = run_stage(stage, works)
                except Exception as err:  # noqa: BLE001 - as on Ray: the batch's samples become failed rows
                    works = f"batch failed in stage {stage.name}: {type(err).__name__}: {err}"
                    break
            pending.append((batch, works))
            if last:
                on_shard(writer.write(shard, pending))
                pending = []


class StageActor:
    """Hosts one stage in a Ray actor: `setup()` once here, `process` per batch."""

    def __init__(self, stage: Stage):
        import ray

        self.stage = stage
        self.stage.setup()
        self.node_id = ray.get_runtime_context().get_node_id()

    def info(self) -> dict:
        return {"stage": self.stage.name, "node_id": self.node_id, "pid": os.getpid(),
                "models": self.stage.model_info()}

    def process(self, batch: list[GroupWork]) -> list[GroupWork]:
        batch = run_stage(self.stage, batch)
        for work in batch:
            work.nodes[self.stage.name] = self.node_id
        return batch


class WriterActor:
    def __init__(self, writer: ShardWriter):
        self.writer = writer

    def write(self, shard: int, batches: list[tuple[list[Group], object]]) -> ShardResult:
        import ray

        def pulled():
            # One batch in memory at a time; a batch whose stages failed for good becomes failed rows.
            for groups, ref in batches:
                try:
                    yield groups, ray.get(ref)
                except ray.exceptions.RayError as err:
                    yield groups, f"batch lost after retries: {type(err).__name__}: {str(err).splitlines()[0]}"

        return self.writer.write(shard, pulled())


class LabelerActor:
    """The scan's labeler (CLIP zero-shot) in its own actor, so it gets the GPU `stages.label` asks for."""

    def __init__(self, spec: ModelSpec, resources: StageResources):
        self.labeler = build_backend("labeler", spec, resources)
        self.labeler.setup()

    def label(self, images: list) -> list:
        return self.labeler.label(images)


class RemoteLabeler:
    """Looks like a labeler to the scan; each call is one batch on the labeler actor."""

    def __init__(self, config: RunConfig):
        import ray

        resources = config.stages.label
        options = actor_options(resources, config.ray.batch_retries)
        self.actor = ray.remote(LabelerActor).options(**options).remote(config.labeler, resources)

    def label(self, images: list) -> list:
        import ray

        return ray.get(self.actor.label.remote(images))


def _root_cause(err: Exception) -> str:
    text = str(err)
    # Ray wraps a constructor's exception in a long message; its last line names the real error.
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def actor_options(resources: StageResources, retries: int) -> dict:
    options = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus,
               "max_restarts": -1, "max_task_retries": retries}
    if resources.memory_gb:
        options["memory"] = int(resources.memory_gb * 1024**3)
    if resources.resources:
        options["resources"] = dict(resources.resources)
    return options


class StageStartError(RuntimeError):
    """A stage cannot run: no node can host its actors, or its actors failed to start (e.g. missing weights)."""


def check_cluster_fits(config: RunConfig) -> None:
    """Before any work: every stage of this config (the writer and the labeler too) fits on some node."""
    for spec in STAGES.values():
        if spec.enabled(config):
            check_placeable(spec.name, getattr(config.stages, spec.name))


def check_placeable(name: str, resources: StageResources) -> None:
    """Fail at once, naming the stage, when no node could ever host one of its actors."""
    import ray

    wanted = {"CPU": resources.num_cpus, "GPU": resources.num_gpus, **resources.resources}
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    if any(all(have.get(name, 0) >= amount for name, amount in wanted.items()) for have in nodes):
        total_gpus = sum(have.get("GPU", 0) for have in nodes)
        if resources.num_gpus * resources.concurrency > total_gpus:  # an autoscaler may still add nodes
            logger.warning("stage %r wants %s GPUs for its %d actors but the cluster has %s now: "
                           "the rest wait for nodes", name, resources.num_gpus * resources.concurrency,
                           resources.concurrency, total_gpus)
        return
    asked = ", ".join(f"{amount:g} {name}" for name, amount in wanted.items() if amount)
    raise StageStartError(f"stage {name!r} asks for {asked} per actor, but no node of the Ray cluster has that much")


class _Pool:
    """Actors of one stage; a batch goes to the least loaded actor with room in its queue."""

    def __init__(self, actor_cls, resources: StageResources, retries: int, init_arg, name: str):
        import ray

        remote = ray.remote(actor_cls)
        options = actor_options(resources, retries)
        # Named, so the Ray dashboard (and an operator's `ray.get_actor`) can tell the stages apart.
        run_id = uuid.uuid4().hex[:8]
        self.actors = [remote.options(name=f"styledistill-{name}-{i}-{run_id}", **options).remote(init_arg)
                       for i in range(resources.concurrency)]
        self.load = [0] * len(self.actors)
        self.max_in_flight = resources.max_in_flight

    def free_actor(self) -> int | None:
        best = min(range(len(self.actors)), key=self.load.__getitem__)
        return best if self.load[best] < self.max_in_flight else None


@dataclass
class _OpenShard:
    batches: list[list[Group]] = field(default_factory=list)
    results: dict[int, object] = field(default_factory=dict)  # batch index -> final stage ref
    planned: bool = False  # all its batches have been cut


class RayExecutor:
    def __init__(self, config: RunConfig, stages: list[Stage]):
        self.config, self.stages = config, stages

    def start(self) -> dict[str, dict[str, str]]:
        """Start every stage's actors and wait until they have loaded their models (a failed start is
        reported by stage); returns the model ids the samples will carry."""
        import ray

        retries = self.config.ray.batch_retries
        self.pools = [_Pool(StageActor, stage.resources, retries, stage, stage.name) for stage in self.stages]
        models: dict[str, dict[str, str]] = {}
        for stage, pool in zip(self.stages, self.pools):
            try:
                infos = ray.get([a.info.remote() for a in pool.actors])
            except ray.exceptions.RayActorError as err:
                raise StageStartError(f"stage {stage.name!r} could not start: {_root_cause(err)}") from None
            for info in infos:
                models.update(info["models"])
        return models

    def run(self, groups: Iterator[Group], skip_shard: Callable[[int], bool], on_shard: ShardCallback,
            writer: ShardWriter) -> None:
        import ray

        self.writers = _Pool(WriterActor, self.config.stages.write, self.config.ray.batch_retries, writer, "write")
        batches = plan_batches(groups, self.config.ray.groups_per_batch, skip_shard)
        queues: list[deque] = [deque() for _ in self.pools]  # (shard, batch index, input)
        write_queue: deque = deque()
        shards: dict[int, _OpenShard] = {}
        in_flight: dict = {}  # ref -> (pool index or -1 for the writer, actor, shard, batch index)
        exhausted = False
        while True:
            while not exhausted and self._room_for_more(shards):
                item = next(batches, None)
                if item is None:
                    exhausted = True
                    break
                shard, batch, last = item
                state = shards.setdefault(shard, _OpenShard())
                state.batches.append([g.without_payload() for g in batch])  # the writer needs no bytes
                state.planned = last
                queues[0].append((shard, len(state.batches) - 1, [GroupWork(g) for g in batch]))
            self._dispatch(queues, write_queue, shards, in_flight)
            if not in_flight:
                if exhausted and not shards:
                    return
                continue
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in ready:
                stage_index, actor, shard, batch_index = in_flight.pop(ref)
                if stage_index < 0:
                    self.writers.load[actor] -= 1
                    del shards[shard]
                    on_shard(ray.get(ref))
                    continue
                self.pools[stage_index].load[actor] -= 1
                if stage_index + 1 < len(self.pools):
                    queues[stage_index + 1].append((shard, batch_index, ref))
                    continue
                state = shards[shard]
                state.results[batch_index] = ref
                if state.planned and len(state.results) == len(state.batches):
                    write_queue.append(shard)

    def _room_for_more(self, shards: dict[int, _OpenShard]) -> bool:
        # Keep cutting batches of the newest shard; open another only below the limit.
        newest = max(shards) if shards else None
        if newest is not None and not shards[newest].planned:
            return True
        return len(shards) < self.config.ray.max_shards_in_flight

    def _dispatch(self, queues, write_queue, shards, in_flight) -> None:
        for stage_index in reversed(range(len(self.pools))):  # downstream first: drain before filling
            pool, queue = self.pools[stage_index], queues[stage_index]
            while queue and (actor := pool.free_actor()) is not None:
                shard, batch_index, batch = queue.popleft()
                ref = pool.actors[actor].process.remote(batch)
                pool.load[actor] += 1
                in_flight[ref] = (stage_index, actor, shard, batch_index)
        while write_queue and (actor := self.writers.free_actor()) is not None:
            shard = write_queue.popleft()
            state = shards[shard]
            payload = [(state.batches[i], state.results[i]) for i in range(len(state.batches))]
            ref = self.writers.actors[actor].write.remote(shard, payload)
            self.writers.load[actor] += 1
            in_flight[ref] = (-1, actor, shard, -1)

