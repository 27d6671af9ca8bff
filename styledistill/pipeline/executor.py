"""Run the stages over the plan: on Ray actor pools (the product) or inline in one process (benchmarks).

Ray executor, in short: the plan is cut into batches that never cross a shard; each batch flows through
one actor per stage, the driver passing object refs from stage to stage (it never pulls images itself);
when all batches of a shard are through, a writer actor pulls them one at a time, in plan order, and
writes the shard. Memory stays bounded: at most `max_shards_in_flight` shards are open and each actor has
at most `max_in_flight` batches queued. Faults are handled by the driver, which sees each call end through
a tiny status return: an actor that dies (or runs past its stage's `timeout_s` and is restarted) has the
batch it was running retried (`ray.batch_retries`), the batches queued behind it re-sent uncharged, and a
batch that keeps killing its actor is split in halves until the groups responsible are isolated and
recorded as failed; a batch whose inputs were lost with a node starts over from the first stage.
Lifecycle: `launch` creates the actors without waiting for them (a fresh run launches them before its scan,
so models load meanwhile), `fit` caps them to the plan once it is known, `start` launches them if that has not
happened, `run` streams the plan through them, and `stop` kills them all when the run ends. `run` gives a
stage batches as soon as its own actors answer (their models loaded), so the first stages work while a
slower one still loads; the writer starts once every stage has answered and the model ids the samples
carry are known, and an actor whose first start fails stops the run naming its stage (StageStartError).
A stage with `min_actors` < `max_actors` autoscales: every half second the pools are described to
`pipeline.autoscale.AutoscalePolicy`, which grows the stage whose queue backs up (within each node's free
resources) and retires actors idle for a while; the executor only applies its decisions.

Why not Ray Data: a shard must be a fixed, known set of planned samples for resume to be exact, and
Ray Data's webdataset writer names blocks by uuid and cannot skip finished shards.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from styledistill.pipeline.autoscale import AutoscalePolicy, PoolState
from styledistill.pipeline.faults import OutputWriteError, write_shard
from styledistill.pipeline.faults import inject as inject_faults
from styledistill.pipeline.stages import Stage, build_backend, run_stage
from styledistill.pipeline.writer import ShardWriter
from styledistill.schemas.config import ModelSpec, RunConfig
from styledistill.schemas.stages import STAGES, StageResources
from styledistill.schemas.records import Group, GroupWork, ShardResult

logger = logging.getLogger(__name__)

ShardCallback = Callable[[ShardResult], None]
WriterFactory = Callable[[dict[str, dict[str, str]]], ShardWriter]  # the model ids the samples carry -> writer


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

    stop_requested: Callable[[], bool] = staticmethod(lambda: False)  # Ctrl-C: set by run_pipeline
    startup_s = 0.0  # every stage is set up by `start`, before `run` begins

    def __init__(self, config: RunConfig, stages: list[Stage]):
        self.config, self.stages = config, stages
        self.models: dict[str, dict[str, str]] = {}  # the model ids the samples carry

    def start(self) -> None:
        """Set every stage up (load its models)."""
        for stage in self.stages:
            stage.setup()
            self.models.update(stage.model_info())

    def stop(self) -> None:
        """Nothing to release early: the stages live in this process."""

    def run(self, groups: Iterator[Group], skip_shard: Callable[[int], bool], on_shard: ShardCallback,
            make_writer: WriterFactory) -> None:
        writer = make_writer(self.models)
        pending: list[tuple[list[Group], list[GroupWork]]] = []
        for shard, batch, last in plan_batches(groups, self.config.ray.groups_per_batch, skip_shard):
            if self.stop_requested():
                return  # the open shard is dropped whole: the rerun redoes it
            works: list[GroupWork] | str = [GroupWork(g) for g in batch]
            for stage in self.stages:
                try:
                    works = run_stage(stage, works)
                except Exception as err:  # noqa: BLE001 - as on Ray: the batch's samples become failed rows
                    works = f"batch failed in stage {stage.name}: {type(err).__name__}: {err}"
                    break
            pending.append((batch, works))
            if last:
                on_shard(write_shard(writer, shard, lambda: pending))
                pending = []


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to call
        return None


def return_freed_memory() -> None:
    """Hand the pages glibc keeps after a batch back to the OS. A model that sees images of many sizes (a
    conv net on aspect-kept resizes, like the gram scorer) frees a differently sized workspace each time,
    and glibc keeps the freed pages: an actor's memory then grows with the variety of image sizes it has
    seen, not with the work in flight. A few ms per call, against batches of seconds."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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
        return_freed_memory()
        return batch

    def run_batch(self, batch: list[GroupWork]) -> tuple[None, list[GroupWork]]:
        """`process` with a tiny first return: the driver learns how the call ended without pulling pixels."""
        inject_faults(self.stage.name, (work.group.group_id for work in batch))  # no-op unless testing
        return None, self.process(batch)


class WriterActor:
    def __init__(self, writer: ShardWriter):
        import webdataset  # noqa: F401 - imported (torch with it: seconds) as the actor starts, not in its first write

        self.writer = writer

    def write(self, shard: int, batches: list[tuple[list[Group], object]]) -> ShardResult:
        import ray

        inject_faults("write", (g.group_id for groups, _ in batches for g in groups))  # no-op unless testing

        def pulled():
            # One batch in memory at a time; a batch whose stages failed for good comes as its error (the
            # samples become failed rows). A batch lost with its node raises: the driver redoes the shard.
            for groups, ref in batches:
                yield groups, ref if isinstance(ref, str) else ray.get(ref)

        return write_shard(self.writer, shard, pulled)  # a transient storage error retries the shard


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


NODE_LOSS_RETRIES = 8


def _node_lost(err: BaseException) -> bool:
    text = str(err).lower()
    return "node" in text and any(w in text for w in ("died", "dead", "removed", "failed"))


def _error_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


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
        actors = resources.actor_range[0]  # an autoscaled stage starts with its minimum
        if resources.num_gpus * actors > total_gpus:  # an autoscaler may still add nodes
            logger.warning("stage %r wants %s GPUs for its %d actors but the cluster has %s now: "
                           "the rest wait for nodes", name, resources.num_gpus * actors, actors, total_gpus)
        return
    asked = ", ".join(f"{amount:g} {name}" for name, amount in wanted.items() if amount)
    raise StageStartError(f"stage {name!r} asks for {asked} per actor, but no node of the Ray cluster has that much")


class _Pool:
    """Actors of one stage; a batch goes to the least loaded actor with room in its queue.

    An actor keeps its index for the whole run (the executor's per-actor call queues, pings and calls refer
    to it): growing appends actors, shrinking marks one retired (it is killed only with nothing in flight)."""

    def __init__(self, actor_cls, resources: StageResources, retries: int, init_arg, name: str):
        import ray

        self.remote = ray.remote(actor_cls)
        self.options = actor_options(resources, retries)
        self.init_arg, self.name = init_arg, name
        self.min_actors, self.max_actors = resources.actor_range
        self.wants = {"CPU": resources.num_cpus, "GPU": resources.num_gpus, **resources.resources}
        if resources.memory_gb:
            self.wants["memory"] = resources.memory_gb * 1024**3
        # Named, so the Ray dashboard (and an operator's `ray.get_actor`) can tell the stages apart.
        self.run_id = uuid.uuid4().hex[:8]
        self.actors: list = []
        self.load: list[int] = []
        self.max_in_flight = resources.max_in_flight
        self.down: dict[int, float] = {}  # restarting actor -> when to ping it next (nothing sent meanwhile)
        self.starting: set[int] = set()  # grown actors that have not answered yet (a subset of down)
        self.retired: set[int] = set()
        self.idle_since: dict[int, float] = {}  # ready actor with nothing in flight -> since when
        self.ready_at: dict[int, float] = {}  # actor -> when it began counting as available (actor-seconds)
        self.actor_s = 0.0  # actor-seconds of retired actors
        self.batch_s: float | None = None  # seconds per batch, a moving average (the autoscaler's clock)
        self.peak = 0
        for _ in range(self.min_actors):
            self._create()

    def _create(self) -> int:
        index = len(self.actors)
        name = f"styledistill-{self.name}-{index}-{self.run_id}"
        self.actors.append(self.remote.options(name=name, **self.options).remote(self.init_arg))
        self.load.append(0)
        self.peak = max(self.peak, self.active())
        return index

    def active(self) -> int:
        return len(self.actors) - len(self.retired)

    def trim(self, count: int) -> None:
        """Keep the first `count` actors of a pool that has run nothing yet; kill the rest."""
        import ray

        for actor in self.actors[count:]:
            ray.kill(actor, no_restart=True)
        del self.actors[count:], self.load[count:]
        self.peak = min(self.peak, count)

    def grow(self) -> int:
        """One more actor; it takes work once it answers a ping."""
        index = self._create()
        self.expect(index)
        return index

    def expect(self, index: int) -> None:
        """Actor `index` is starting: `down` (no work) until it answers a ping, sent at once, which returns
        when its models are loaded; it counts as available from then."""
        self.starting.add(index)
        self.down[index] = 0.0

    def retire(self, index: int, now: float) -> None:
        import ray

        assert self.load[index] == 0 and index not in self.down, "only an idle, ready actor is retired"
        self.retired.add(index)
        self.idle_since.pop(index, None)
        self.actor_s += now - self.ready_at.pop(index, now)
        ray.kill(self.actors[index])

    def actor_seconds(self, now: float) -> float:
        return self.actor_s + sum(now - t for t in self.ready_at.values())

    def free_actor(self) -> int | None:
        up = [i for i in range(len(self.actors)) if i not in self.down and i not in self.retired]
        if not up:
            return None
        best = min(up, key=self.load.__getitem__)
        return best if self.load[best] < self.max_in_flight else None


@dataclass
class _Piece:
    """A batch, or the part of one left after splitting it to isolate a sample that kills its actor."""

    groups: list[Group]
    batch_index: int
    stage: int = 0  # the next stage to run
    data: object = None  # ref to the last finished stage's output
    attempts: int = 0  # failures charged to it (its actor died or timed out while running it)
    restarts: int = 0  # failures nobody is charged with (a node lost, its input objects with it)
    error: str | None = None  # final: the writer records its samples as failed with this
    done: bool = False


@dataclass
class _Call:
    stage: int  # pool index, or -1 for the writer
    actor: int
    shard: int
    piece: _Piece | None = None
    data: object = None  # the call's output ref (stages)


@dataclass
class _OpenShard:
    batches: list[list[_Piece]] = field(default_factory=list)  # per batch, its pieces in plan order
    planned: bool = False  # all its batches have been cut
    writes: int = 0  # write attempts that failed for a system reason (writer or its node lost)

    def complete(self) -> bool:
        return self.planned and all(p.done for pieces in self.batches for p in pieces)

    def payload(self) -> list[tuple[list[Group], object]]:
        # The writer needs a group's plan, not the image bytes an audit group carries.
        return [([g.without_payload() for g in p.groups], p.error if p.error is not None else p.data)
                for pieces in self.batches for p in pieces]


class RayExecutor:
    stop_requested: Callable[[], bool] = staticmethod(lambda: False)  # Ctrl-C: set by run_pipeline

    AUTOSCALE_TICK_S = 0.5

    def __init__(self, config: RunConfig, stages: list[Stage]):
        self.config, self.stages = config, stages
        self.models: dict[str, dict[str, str]] = {}  # model ids, from each actor's first answer
        self.startup_s = 0.0  # from the start of `run` until every stage's actors had answered
        self.faults: Counter = Counter()  # retried_batches, restarted_actors, timeouts, split_batches, ...
        self.policy = AutoscalePolicy(config.ray.autoscale.idle_s, config.ray.autoscale.backlog_s)
        self.stage_stats: dict[str, dict] = {}  # per stage, after run: actors (min, peak, max), actor_s, up_s
        self.scaling: list[tuple[float, str, str, int]] = []  # (s into the run, stage, grow/shrink, actors after)
        self.pools: list[_Pool] = []
        self.writers: _Pool | None = None

    def launch(self) -> None:
        """Create every stage's actors without waiting for them: they load their models while the driver
        scans and plans (`run_pipeline` launches before the scan on a fresh run)."""
        if self.pools:
            return
        # Stage batches are retried by the driver (not Ray), which knows which batch was running when an
        # actor died or hung, restarts it, and splits a batch that keeps killing its actor.
        self.pools = [_Pool(StageActor, stage.resources, 0, stage, stage.name) for stage in self.stages]

    def fit(self, config: RunConfig) -> None:
        """Adopt `config` (the plan's sized copy: the work left caps each stage's actors), killing launched
        actors beyond it before they get any batch."""
        self.config = config
        for stage, pool in zip(self.stages, self.pools):
            pool.min_actors, pool.max_actors = getattr(config.stages, stage.name).actor_range
            pool.trim(pool.min_actors)

    def stop(self) -> None:
        """Kill every actor now (stage pools and writers): their CPUs, GPUs and memory are free before the
        driver writes the indexes and the report, and the process exits without waiting on them."""
        import ray

        for pool in [*self.pools, *([self.writers] if self.writers else [])]:
            for index, actor in enumerate(pool.actors):
                if index not in pool.retired:
                    ray.kill(actor, no_restart=True)

    def start(self) -> None:
        """Launch the actors if `launch` has not; returns at once (`run` waits for each stage's own actors)."""
        self.launch()

    def run(self, groups: Iterator[Group], skip_shard: Callable[[int], bool], on_shard: ShardCallback,
            make_writer: WriterFactory) -> None:
        self._make_writer = make_writer
        self.writers = None  # started once every stage has answered: the samples' model ids are known then
        self._calls = [[deque() for _ in pool.actors] for pool in self.pools]  # per actor, refs in call order
        self._victims: set = set()  # calls queued on an actor when it died: retried without being charged
        self._culprits: set = set()  # calls running when their actor died: charged with the failure
        self._pings: dict = {}  # ref of info() sent to a restarting actor -> (pool index, actor)
        self._killed: dict = {}  # call ref -> the timeout it ran past
        self._started: dict = {}  # call ref -> when it began running (the head of its actor's calls)
        self._t0 = time.monotonic()
        # Every actor takes batches once it answers its first ping; the writers start once all have.
        self._launching = {(index, actor) for index, pool in enumerate(self.pools) for actor in range(len(pool.actors))}
        self._up_s: dict[int, float] = {}  # stage -> seconds into the run until its first actor answered
        for index, actor in self._launching:
            self.pools[index].expect(actor)
        autoscaled = any(pool.min_actors < pool.max_actors for pool in self.pools)
        next_tick = self._t0 + self.AUTOSCALE_TICK_S
        try:
            self._run(groups, skip_shard, on_shard, autoscaled, next_tick)
        finally:
            now = time.monotonic()
            self.stage_stats = {stage.name: {"actors_min": pool.min_actors, "actors_max": pool.max_actors,
                                             "actors_peak": pool.peak, "actor_s": pool.actor_seconds(now),
                                             "up_s": self._up_s.get(index)}
                                for index, (stage, pool) in enumerate(zip(self.stages, self.pools))}

    def _run(self, groups, skip_shard, on_shard, autoscaled: bool, next_tick: float) -> None:
        import ray

        batches = plan_batches(groups, self.config.ray.groups_per_batch, skip_shard)
        queues: list[deque] = [deque() for _ in self.pools]  # (shard, piece)
        write_queue: deque = deque()
        shards: dict[int, _OpenShard] = {}
        in_flight: dict = {}  # ref -> _Call
        exhausted = False
        while True:
            if self.stop_requested():
                # Ctrl-C: dispatch nothing new; shards whose batches are all through still get written.
                exhausted = True
                for queue in queues:
                    queue.clear()
                if self.writers is None or (not write_queue and not any(c.stage < 0 for c in in_flight.values())):
                    return
            while not exhausted and self._room_for_more(shards):
                item = next(batches, None)
                if item is None:
                    exhausted = True
                    break
                shard, batch, last = item
                state = shards.setdefault(shard, _OpenShard())
                piece = _Piece(batch, len(state.batches))
                state.batches.append([piece])
                state.planned = last
                queues[0].append((shard, piece))
            self._dispatch(queues, write_queue, shards, in_flight)
            if exhausted and not shards and not in_flight:
                return  # an actor still starting (grown late) is not waited for
            if autoscaled and time.monotonic() >= next_tick:
                self._autoscale(queues)
                next_tick = time.monotonic() + self.AUTOSCALE_TICK_S
            restarting = any(pool.down for pool in self.pools)
            if not in_flight and not restarting:
                continue
            timeout = self._kill_hung_calls()
            if not in_flight and not self._pings:
                time.sleep(timeout)  # only restarting actors to wait for, and their next ping is not due
                continue
            ready, _ = ray.wait([*in_flight, *self._pings], num_returns=1, timeout=timeout)
            for ref in ready:
                if ref in self._pings:
                    self._pinged(ref)
                    continue
                call = in_flight.pop(ref)
                if call.stage < 0:
                    self.writers.load[call.actor] -= 1
                    result = self._written(ref, shards[call.shard], call.shard, queues, write_queue)
                    if result is not None:
                        del shards[call.shard]
                        on_shard(result)
                    continue
                self._stage_done(ref, call, shards[call.shard], queues)
                if shards[call.shard].complete() and call.shard not in write_queue:
                    write_queue.append(call.shard)

    def _stage_done(self, ref, call: _Call, state: _OpenShard, queues) -> None:
        import ray

        pool, piece = self.pools[call.stage], call.piece
        pool.load[call.actor] -= 1
        if not pool.load[call.actor]:
            pool.idle_since[call.actor] = time.monotonic()
        calls = self._calls[call.stage][call.actor]
        head = calls[0]  # the call the actor was running (an actor runs its calls in order)
        calls.remove(ref)
        began = self._started.pop(ref, None)
        if began is not None and ref == head:
            took = time.monotonic() - began
            pool.batch_s = took if pool.batch_s is None else 0.8 * pool.batch_s + 0.2 * took
        if calls and calls[0] not in self._started:  # the next queued call starts now (an actor runs in order)
            self._started[calls[0]] = time.monotonic()
        try:
            ray.get(ref)  # the status: tiny, the pixels stay in the object store
        except ray.exceptions.RayTaskError as err:  # the stage raised: deterministic, not retried
            cause = err.cause if err.cause is not None else err
            if isinstance(cause, ray.exceptions.RayError):  # its input could not be fetched: a node was lost
                self._retry(ref, call, cause, state, queues, head)
                return
            piece.error = f"batch failed in stage {self.stages[call.stage].name}: {_error_line(cause)}"
            piece.done = True
            return
        except ray.exceptions.RayError as err:  # the actor died or hung, or its input was lost with a node
            self._retry(ref, call, err, state, queues, head)
            return
        piece.data, piece.stage = call.data, piece.stage + 1
        if piece.stage < len(self.pools):
            queues[piece.stage].append((call.shard, piece))
        else:
            piece.done = True

    def _retry(self, ref, call: _Call, err, state: _OpenShard, queues, head) -> None:
        import ray

        piece, name = call.piece, self.stages[call.stage].name
        died = isinstance(err, ray.exceptions.RayActorError)
        if died and ref not in self._culprits and ref not in self._victims:
            # The first failure seen of this death: the running call (the head) is charged, everything
            # else queued on the actor died with it without being the cause. Nothing is sent to the actor
            # until it answers again (calls sent while it restarts fail at once, never having run).
            if head not in self._killed:
                self.faults["restarted_actors"] += 1
            self.pools[call.stage].down[call.actor] = time.monotonic()
            self._culprits.add(head)
            self._victims.update(r for r in self._calls[call.stage][call.actor] if r != head)
            if ref != head:
                self._victims.add(ref)
        timeout = self._killed.pop(ref, None)
        self._culprits.discard(ref)
        if ref in self._victims:  # queued behind the batch that killed the actor: not its fault
            self._victims.discard(ref)
            queues[piece.stage].append((call.shard, piece))
            return
        if not died or _node_lost(err):
            # A node went away (with the actor, or with the input objects): nobody's fault, not charged;
            # a piece whose input is gone starts over. Bounded, so a cluster that keeps losing nodes ends.
            self.faults["lost_objects" if not died else "node_losses"] += 1
            if not died:
                piece.stage, piece.data = 0, None
            piece.restarts += 1
            if piece.restarts <= NODE_LOSS_RETRIES:
                self.faults["retried_batches"] += 1
                queues[piece.stage].append((call.shard, piece))
                return
        piece.attempts += 1
        retries = self.config.ray.batch_retries
        if piece.attempts <= retries:
            self.faults["retried_batches"] += 1
            logger.warning("stage %s: batch of %d groups %s; retry %d/%d", name, len(piece.groups),
                           f"timed out after {timeout:g} s" if timeout else _error_line(err), piece.attempts, retries)
            queues[piece.stage].append((call.shard, piece))
        elif len(piece.groups) > 1:  # isolate the sample(s) that kill the actor: halves, each retried afresh
            self.faults["split_batches"] += 1
            half = len(piece.groups) // 2
            parts = [_Piece(piece.groups[:half], piece.batch_index), _Piece(piece.groups[half:], piece.batch_index)]
            pieces = state.batches[piece.batch_index]
            at = pieces.index(piece)
            pieces[at:at + 1] = parts
            queues[0].extend((call.shard, p) for p in parts)
        else:
            if timeout:
                piece.error = f"stage {name} timed out after {timeout:g} s ({piece.attempts} attempts)"
            elif died:
                piece.error = f"worker died while processing this sample (stage {name}, {piece.attempts} attempts)"
            else:
                piece.error = f"lost in stage {name}: {_error_line(err)} ({piece.attempts} attempts)"
            self.faults["failed_batches"] += 1
            piece.done = True

    def _kill_hung_calls(self) -> float:
        """Restart the actors whose running batch is past its stage's timeout; how long ray.wait may block."""
        import ray

        now, wait = time.monotonic(), 1.0
        for stage_index, (stage, pool) in enumerate(zip(self.stages, self.pools)):
            limit = stage.resources.timeout_s
            if not limit:
                continue
            for actor, calls in enumerate(self._calls[stage_index]):
                if not calls or calls[0] in self._killed:
                    continue
                running_for = now - self._started[calls[0]]
                if running_for > limit:
                    logger.warning("stage %s: a batch has run for %.0f s (timeout %g s): restarting its actor",
                                   stage.name, running_for, limit)
                    self._killed[calls[0]] = limit
                    self.faults["timeouts"] += 1
                    self.faults["restarted_actors"] += 1
                    ray.kill(pool.actors[actor], no_restart=False)
                    pool.down[actor] = now + 0.2
                else:
                    wait = min(wait, limit - running_for + 0.05)
        for stage_index, pool in enumerate(self.pools):  # ping restarting actors; dispatch once they answer
            for actor, when in list(pool.down.items()):
                if (stage_index, actor) in self._pings.values():
                    continue
                if when <= now:
                    self._pings[pool.actors[actor].info.remote()] = (stage_index, actor)
                else:
                    wait = min(wait, when - now)
        return max(wait, 0.02)

    def _pinged(self, ref) -> None:
        import ray

        stage_index, actor = self._pings.pop(ref)
        pool = self.pools[stage_index]
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as err:
            if (stage_index, actor) in self._launching:  # its first start failed (e.g. missing weights)
                raise StageStartError(f"stage {self.stages[stage_index].name!r} could not start: "
                                      f"{_root_cause(err)}") from None
            pool.down[actor] = time.monotonic() + 0.2  # still restarting (loading its models)
            return
        now = time.monotonic()
        pool.down.pop(actor, None)
        if actor in pool.starting:  # a new actor is ready: it counts from now
            pool.starting.discard(actor)
            pool.ready_at[actor] = pool.idle_since[actor] = now
        self.models.update(info["models"])
        if (stage_index, actor) in self._launching:
            self._launching.discard((stage_index, actor))
            self._up_s.setdefault(stage_index, now - self._t0)
            if not self._launching:
                self._start_writers(now)

    def _start_writers(self, now: float) -> None:
        """Every stage is up, so the model ids the samples carry are known: the shard writers can start."""
        self.startup_s = now - self._t0
        writer = self._make_writer(self.models)
        self.writers = _Pool(WriterActor, self.config.stages.write, self.config.ray.batch_retries, writer, "write")

    def _written(self, ref, state: _OpenShard, shard: int, queues, write_queue) -> ShardResult | None:
        """The shard's result, or None when its write must be redone (the writer or an object was lost)."""
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, OutputWriteError):  # e.g. a full disk: its one line, no traceback
                raise OutputWriteError(str(err.cause)) from None
            if not isinstance(err.cause, ray.exceptions.RayError):
                raise
            lost = True  # the writer could not pull a batch: its node is gone; redo the shard's stages
        except ray.exceptions.RayActorError:
            lost = False  # the writer died (its node is gone): write again from the same batches
        state.writes += 1
        self.faults["retried_writes"] += 1
        if state.writes > self.config.ray.batch_retries + 2:
            raise RuntimeError(f"shard {shard} could not be written after {state.writes} attempts")
        if lost:
            for pieces in state.batches:
                for piece in pieces:
                    if piece.error is None:
                        piece.stage, piece.data, piece.done = 0, None, False
                        queues[0].append((shard, piece))
        else:
            write_queue.append(shard)
        return None

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
                shard, piece = queue.popleft()
                batch = piece.data if piece.stage > 0 else [GroupWork(g) for g in piece.groups]
                status, data = pool.actors[actor].run_batch.options(num_returns=2).remote(batch)
                pool.load[actor] += 1
                pool.idle_since.pop(actor, None)
                calls = self._calls[stage_index][actor]
                calls.append(status)
                if len(calls) == 1:
                    self._started[status] = time.monotonic()
                in_flight[status] = _Call(stage_index, actor, shard, piece, data)
        while write_queue and self.writers is not None and (actor := self.writers.free_actor()) is not None:
            shard = write_queue.popleft()
            ref = self.writers.actors[actor].write.remote(shard, shards[shard].payload())
            self.writers.load[actor] += 1
            in_flight[ref] = _Call(-1, actor, shard)


    def _autoscale(self, queues) -> None:
        """Describe every pool to the policy and apply its decisions (grow: new actors; shrink: retire)."""
        now = time.monotonic()
        states = []
        for index, (pool, queue) in enumerate(zip(self.pools, queues)):
            ready = [i for i in range(len(pool.actors)) if i not in pool.down and i not in pool.retired]
            states.append(PoolState(
                stage=index, queued=len(queue), active=pool.active(), starting=len(pool.starting),
                min_actors=pool.min_actors, max_actors=pool.max_actors, max_in_flight=pool.max_in_flight,
                saturated=all(pool.load[i] >= pool.max_in_flight for i in ready), batch_s=pool.batch_s,
                idle={i: now - pool.idle_since[i] for i in ready if not pool.load[i] and i in pool.idle_since},
                wants=pool.wants))
        growing = any(self.policy.wants_to_grow(state) for state in states)
        for decision in self.policy.decide(states, free_node_resources() if growing else []):
            pool, name = self.pools[decision.stage], self.stages[decision.stage].name
            if decision.kind == "grow":
                for _ in range(decision.count):
                    self._calls[decision.stage].append(deque())
                    pool.grow()
            elif pool.load[decision.actor] == 0 and decision.actor not in pool.down:
                pool.retire(decision.actor, now)
            else:
                continue
            self.scaling.append((round(now - self._t0, 2), name, decision.kind, pool.active()))
            logger.info("stage %s: %s to %d actors", name, decision.kind, pool.active())


def free_node_resources() -> list[dict[str, float]]:
    """Free resources of each alive node (Ray's per-node view; the cluster's total if that is unavailable)."""
    import ray

    try:
        from ray._private.state import available_resources_per_node

        return list(available_resources_per_node().values())
    except Exception:  # noqa: BLE001 - a private API: fall back to the cluster-wide figure
        return [ray.available_resources()]
