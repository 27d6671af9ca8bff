"""Benchmarks of the executor itself: scaling over simulated GPU nodes, the dispatch ceiling, and the
pipeline against a Ray Data wiring of the same stages.

- **Scaling** (`styledistill benchmark-scaling`): a `ray.cluster_utils.Cluster` of 1, 2, 4 and 8 nodes, each
  declaring one GPU; the generate stage is the `sleep` benchmark backend (a fixed latency per image, no CPU)
  with one actor per GPU, the other stages cheap (64 px images, the `noop` scorer, no filters). Fixed samples
  per node, so a perfect executor keeps the wall time constant: efficiency = rate(n) / (n x rate(1)). Also the
  driver's CPU seconds per 1,000 samples.
- **Dispatch ceiling**: the same on one node with a zero latency generator: the samples/s at which the
  driver (not the models) is the limit. Divided by one real GPU's samples/s, it says how many GPUs one driver
  can feed.
- **Ray Data** (`--ray-data`): the demo config (real CPU models) at N and scale x N photos on local Ray, through
  the pipeline and through what a user would build instead: `ray.data.from_items(batches)` then
  `map_batches(<stage>, concurrency=(min, max))` per stage over actor pools, shards written by the driver as
  the batches of each complete. Same plan, models, batch sizes and actor bounds.

Each measured point is a child process (its own Ray, or its own Cluster), printing one JSON line.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from styledistill.schemas.config import RunConfig, load_config
from styledistill.tools.bench import DEMO_CONFIG, build_photo_pool

NODE_COUNTS = (1, 2, 4, 8)


# --- the child processes ----------------------------------------------------------------------------------


def _scaling_overrides(nodes: int, latency_s: float) -> list[str]:
    """Cheap stages around a sleeping generator, one generator actor per (simulated) GPU."""
    return [
        "generator.backend=benchmark_sleep", f"generator.options={{latency_s: {latency_s}}}",
        "scorers=[{backend: noop}]", "filters.rules=[]", "filters.generation_rules=[]",
        "resolution.content_max_edge=64", "resolution.style_edge=64",
        "stages.generate.num_gpus=1", "stages.generate.num_cpus=0.1", f"stages.generate.concurrency={nodes}",
        "stages.generate.batch_size=4",
        "stages.load.num_cpus=0.1", "stages.score.num_cpus=0.1", "stages.encode.num_cpus=0.1",
        "stages.write.num_cpus=0.1",
        # Enough batches open to keep every generator's queue full (2 batches of 2 groups per actor).
        "plan.samples_per_shard=32", f"ray.max_shards_in_flight={max(4, 2 * nodes)}",
    ]


def _run_measured(config: RunConfig) -> dict:
    """prepare, start the actors and run on the Ray this process is connected to; times and driver CPU."""
    from styledistill.pipeline.executor import RayExecutor
    from styledistill.pipeline.run import prepare_run
    from styledistill.pipeline.stages import build_stages
    from styledistill.pipeline.writer import ShardWriter

    prepared = prepare_run(config)
    executor = RayExecutor(config, build_stages(config))
    executor.start()
    results = []
    cpu0, run0 = time.process_time(), time.perf_counter()
    executor.run(prepared.planner.groups(), lambda shard: False, results.append,
                 functools.partial(ShardWriter.for_run, config, prepared.run_uri, prepared.meta))
    # Run time from when every stage's actors were up (their start-up is reported apart).
    started_s = executor.startup_s
    run_s, cpu_s = time.perf_counter() - run0 - started_s, time.process_time() - cpu0
    busy: dict[str, float] = {}
    for result in results:
        for stage, seconds in result.stage_seconds.items():
            busy[stage] = busy.get(stage, 0.0) + seconds
    stages = {name: {**stats, "busy_s": busy.get(name, 0.0),
                     "utilisation": busy.get(name, 0.0) / stats["actor_s"] if stats["actor_s"] else None}
              for name, stats in executor.stage_stats.items()}
    return {"samples": sum(r.planned for r in results), "failed": sum(r.failed for r in results),
            "run_s": run_s, "start_s": started_s, "wall_s": started_s + run_s, "driver_cpu_s": cpu_s,
            "stages": stages, "scaling": executor.scaling, "faults": dict(executor.faults)}


def _cluster_child(nodes: int, photos: int, latency_s: float, photos_dir: str, styles_dir: str, out: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        config = load_config(Path(str(DEMO_CONFIG)), [
            f"sources.0.uri={photos_dir}", f"sources.1.uri={styles_dir}", f"output.uri={out}",
            f"plan.max_photos={photos}", "filters.dedup.phash_max_distance=null", *_scaling_overrides(nodes, latency_s)])
        print(json.dumps({"nodes": nodes, **_run_measured(config)}))
    finally:
        ray.shutdown()
        cluster.shutdown()


def _comparison_overrides(max_actors: int) -> list[str]:
    """The demo's stages, each an autoscaling pool of 1..max_actors (the bound Ray Data gets too)."""
    return [f"stages.{stage}.min_actors=1" for stage in ("load", "generate", "score", "encode")] + \
           [f"stages.{stage}.max_actors={max_actors}" for stage in ("load", "generate", "score", "encode")]


class _DataStage:
    """One pipeline stage as a Ray Data callable class: setup once per actor, then run_stage per batch."""

    def __init__(self, config: RunConfig, name: str):
        from styledistill.pipeline.stages import build_stages

        self.stage = next(s for s in build_stages(config) if s.name == name)
        self.stage.setup()

    def __call__(self, batch: dict) -> dict:
        from styledistill.pipeline.stages import run_stage

        out = []
        for payload in batch["works"]:
            out.append(pickle.dumps(run_stage(self.stage, pickle.loads(payload)), protocol=5))
        return {**batch, "works": out}


def _ray_data_run(config: RunConfig) -> dict:
    """The same plan through ray.data: from_items -> map_batches per stage -> shards written by the driver."""
    import ray

    from styledistill.pipeline.executor import plan_batches
    from styledistill.pipeline.faults import write_shard
    from styledistill.pipeline.run import prepare_run
    from styledistill.pipeline.stages import build_stages
    from styledistill.pipeline.writer import ShardWriter
    from styledistill.schemas.records import GroupWork

    prepared = prepare_run(config)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.verbose_progress = False
    plan = list(plan_batches(prepared.planner.groups(), config.ray.groups_per_batch, lambda shard: False))
    expected: dict[int, int] = {}
    for shard, _, _ in plan:
        expected[shard] = expected.get(shard, 0) + 1
    wall0, cpu0 = time.perf_counter(), time.process_time()
    items, by_key = [], {}
    for shard, batch, _ in plan:
        index = sum(1 for key in by_key if key[0] == shard)
        by_key[(shard, index)] = batch
        items.append({"shard": shard, "index": index, "works": pickle.dumps([GroupWork(g) for g in batch])})
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    for stage in build_stages(config):
        res = stage.resources
        low, high = res.actor_range
        gpus = {"num_gpus": res.num_gpus} if res.num_gpus else {}
        ds = ds.map_batches(_DataStage, fn_constructor_args=(config, stage.name), batch_size=1,
                            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
                            num_cpus=res.num_cpus, **gpus)
    writer = ShardWriter(config, prepared.run_uri, {"config_hash": prepared.meta["config_hash"],
                                                    "versions": prepared.meta["versions"], "models": {}})
    pending: dict[int, dict[int, tuple]] = {}
    samples = failed = 0
    for row in ds.iter_rows():
        shard, index = int(row["shard"]), int(row["index"])
        pending.setdefault(shard, {})[index] = (by_key[(shard, index)], pickle.loads(row["works"]))
        if len(pending[shard]) == expected[shard]:
            done = pending.pop(shard)
            result = write_shard(writer, shard, lambda: [done[i] for i in sorted(done)])
            samples, failed = samples + result.planned, failed + result.failed
    return {"samples": samples, "failed": failed, "wall_s": time.perf_counter() - wall0,
            "driver_cpu_s": time.process_time() - cpu0}


def _local_child(mode: str, photos: int, max_actors: int, photos_dir: str, styles_dir: str, out: str) -> None:
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    try:
        config = load_config(Path(str(DEMO_CONFIG)), [
            f"sources.0.uri={photos_dir}", f"sources.1.uri={styles_dir}", f"output.uri={out}",
            f"plan.max_photos={photos}", "filters.dedup.phash_max_distance=null", *_comparison_overrides(max_actors)])
        result = _run_measured(config) if mode == "pipeline" else _ray_data_run(config)
        print(json.dumps({"mode": mode, "photos": photos, **result}))
    finally:
        ray.shutdown()


# --- the parent ----------------------------------------------------------------------------------------------


def _child(args: list[str], timeout_s: float) -> dict:
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run([sys.executable, "-m", "styledistill.tools.bench_scaling", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {args[:3]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _inputs(workdir: Path, photos: int, edge: int | None = None) -> tuple[Path, Path]:
    """Content photos and style images; with `edge`, edge x edge copies (decoding costs ~nothing)."""
    from PIL import Image

    from styledistill.tools.sample_data import build_sample_data

    sample_dir = workdir / "sample-data"
    build_sample_data(sample_dir, with_bad_files=False)
    photos_dir, styles_dir = build_photo_pool(sample_dir, workdir / f"photos-{photos}", photos), sample_dir / "stylized"
    if edge is None:
        return photos_dir, styles_dir
    small = []
    for folder in (photos_dir, styles_dir):
        target = workdir / f"{folder.name}-{edge}px"
        target.mkdir(exist_ok=True)
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in (".jpg", ".jpeg", ".png") and not (target / path.name).exists():
                with Image.open(path) as img:
                    img = img.convert("RGB").resize((edge, edge))  # square: above decode.min_side
                    img.save(target / path.name, quality=92)
        small.append(target)
    return small[0], small[1]


def utilisation_table(stages: dict) -> Table:
    table = Table("stage", "actors (min/peak/max)", "busy s", "actor s", "busy share")
    for name, s in stages.items():
        share = f"{s['utilisation']:.0%}" if s.get("utilisation") is not None else "-"
        table.add_row(name, f"{s['actors_min']}/{s['actors_peak']}/{s['actors_max']}", f"{s['busy_s']:.1f}",
                      f"{s['actor_s']:.1f}", share)
    return table


def run_scaling_benchmark(workdir: Path, console: Console, per_node_photos: int = 32, latency_s: float = 0.25,
                          node_counts: tuple[int, ...] = NODE_COUNTS, ceiling_photos: int = 128) -> dict:
    """Throughput at each node count, efficiency against 1 node, driver CPU, and the dispatch ceiling."""
    photos_dir, styles_dir = _inputs(workdir, max(per_node_photos * max(node_counts), ceiling_photos), edge=96)
    points = []
    for nodes in node_counts:
        console.print(f"measuring {nodes} node(s), {per_node_photos * nodes} photos ...")
        out = workdir / f"scaling-{nodes}-{int(time.time())}"
        points.append(_child(["cluster", nodes, per_node_photos * nodes, latency_s, photos_dir, styles_dir, out], 600))
    console.print("measuring the dispatch ceiling (1 node, generator latency 0) ...")
    ceiling = _child(["cluster", 1, ceiling_photos, 0.0, photos_dir, styles_dir,
                      workdir / f"ceiling-{int(time.time())}"], 600)
    base = points[0]["samples"] / points[0]["run_s"]
    table = Table("nodes (1 GPU each)", "samples", "run s", "samples/s", "efficiency", "driver CPU s / 1k samples",
                  "generate busy share")
    for p in points:
        rate = p["samples"] / p["run_s"]
        table.add_row(str(p["nodes"]), str(p["samples"]), f"{p['run_s']:.1f}", f"{rate:.2f}",
                      f"{rate / (p['nodes'] * base):.2f}", f"{1000 * p['driver_cpu_s'] / p['samples']:.1f}",
                      f"{p['stages']['generate']['utilisation']:.0%}")
    console.print(table)
    last = points[-1]
    efficiency = last["samples"] / last["run_s"] / (last["nodes"] * base)
    ceiling_rate = ceiling["samples"] / ceiling["run_s"]
    console.print(f"efficiency at {last['nodes']} nodes: {efficiency:.2f} (target >= 0.95)")
    console.print(f"dispatch ceiling (no-op generator, 1 node): {ceiling_rate:.1f} samples/s, driver "
                  f"{1000 * ceiling['driver_cpu_s'] / ceiling['samples']:.1f} CPU s per 1k samples")
    return {"points": points, "ceiling": ceiling, "efficiency": efficiency, "ceiling_samples_per_s": ceiling_rate}


def run_ray_data_comparison(n: int, scale: int, workdir: Path, console: Console, max_actors: int = 2,
                            repeats: int = 1) -> dict:
    """The pipeline vs a Ray Data map_batches wiring of the same stages, at n and scale x n photos; each pair
    measured `repeats` times, alternating, the ratio taken from the medians (the machine may be shared)."""
    import statistics

    photos_dir, styles_dir = _inputs(workdir, n * scale)
    runs: dict[tuple[int, str], list[dict]] = {}
    for repeat in range(repeats):
        for photos in (n, n * scale):
            for mode in ("pipeline", "ray-data"):
                console.print(f"measuring {mode} on {photos} photos ({repeat + 1}/{repeats}) ...")
                out = workdir / f"{mode}-{photos}-{int(time.time())}"
                runs.setdefault((photos, mode), []).append(
                    _child(["local", mode, photos, max_actors, photos_dir, styles_dir, out], 1800))
    rate = lambda r: r["samples"] / r["wall_s"]  # noqa: E731
    median = {key: statistics.median(rate(r) for r in rs) for key, rs in runs.items()}
    table = Table("wiring", "photos", "samples", "samples/s (each run)", "median samples/s", "driver CPU s (median)")
    for (photos, mode), rs in runs.items():
        table.add_row(mode, str(photos), str(rs[0]["samples"]), ", ".join(f"{rate(r):.2f}" for r in rs),
                      f"{median[photos, mode]:.2f}", f"{statistics.median(r['driver_cpu_s'] for r in rs):.1f}")
    console.print(table)
    ratios = {photos: median[photos, "pipeline"] / median[photos, "ray-data"] for photos in (n, n * scale)}
    console.print(f"pipeline / Ray Data throughput (medians): {ratios[n]:.2f}x at N, "
                  f"{ratios[n * scale]:.2f}x at {scale}xN (target >= 1.2x)")
    best = max(runs[n * scale, "pipeline"], key=rate)
    console.print(f"pipeline at {scale}xN, per stage (its best run):")
    console.print(utilisation_table(best["stages"]))
    return {"runs": runs, "ratios": ratios}


if __name__ == "__main__":
    kind, rest = sys.argv[1], sys.argv[2:]
    if kind == "cluster":
        _cluster_child(int(rest[0]), int(rest[1]), float(rest[2]), rest[3], rest[4], rest[5])
    else:
        _local_child(rest[0], int(rest[1]), int(rest[2]), rest[3], rest[4], rest[5])
