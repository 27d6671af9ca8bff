"""Benchmark: the pipeline on local Ray against a bare in-process loop over the same models and plan.

Each measured run is a child process; this process samples the memory of the child's whole process tree
(driver and Ray workers) every 0.2 s as PSS, so "peak memory" is what the machine really had to hold.
Content photos beyond the 9 bundled ones are crops of them at other positions and scales: distinct
images for the planner, real photographs for the models.

    styledistill benchmark --n 8 --scale 10
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import psutil
from PIL import Image
from rich.console import Console
from rich.table import Table

from styledistill.schemas.config import load_config

DEMO_CONFIG = resources.files("styledistill") / "configs" / "demo.yaml"


@dataclass
class Measurement:
    mode: str
    photos: int
    samples: int
    wall_s: float
    peak_pss_mb: float
    process_s: float = 0.0  # the whole child process, start to exit, as a user waits for it
    cpu_s: float = 0.0  # CPU seconds of its whole process tree (driver, Ray's own processes, workers)
    hwm_mb: float = 0.0  # sum over its processes of each one's RSS high-water mark (exact, shared pages in each)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_s if self.samples else 0.0


def build_photo_pool(sample_dir: Path, out_dir: Path, count: int) -> Path:
    """`count` distinct content photos: the bundled photos, then seeded crops of them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    originals = sorted(p for p in (sample_dir / "realistic").glob("*.jpg") if p.stat().st_size > 1000)
    rng = np.random.default_rng(0)
    for n in range(count):
        target = out_dir / f"photo_{n:05d}.jpg"
        if target.exists():
            continue
        with Image.open(originals[n % len(originals)]) as img:
            img = img.convert("RGB")
            if n >= len(originals):
                scale = rng.uniform(0.6, 0.9)
                w, h = int(img.width * scale), int(img.height * scale)
                x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
                img = img.crop((x, y, x + w, y + h))
            img.save(target, quality=92)
    return out_dir


def _child_command(mode: str, photos_dir: Path, styles_dir: Path, photos: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "styledistill.tools.bench", mode, str(photos_dir), str(styles_dir), str(photos), str(out)]


def run_measured(command: list[str]) -> tuple[dict, float]:
    """Run `command` as a child process; (its last stdout line as JSON with "process_s" and "cpu_s" added:
    the child's wall time start to exit and the CPU seconds of its process tree, peak PSS of that tree in MB).
    CPU time is sampled with the memory, every 0.2 s, so a process misses at most its last 0.2 s. A sampled
    peak misses a batch's transient peak that falls between samples (more likely in a short run); "hwm_mb",
    the sum of the kernel's per-process RSS high-water marks, does not, but counts shared pages in each."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    cpu: dict[int, float] = {}  # pid -> CPU seconds, last seen
    high_water: dict[int, int] = {}  # pid -> its RSS high-water mark, bytes
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            # PSS: shared pages (Ray's object store, shared libraries) are split between the processes
            # mapping them instead of being counted once per process.
            peak = max(peak, sum(p.memory_full_info().pss for p in tree if p.is_running()))
            for p in tree:
                times = p.cpu_times()
                cpu[p.pid] = times.user + times.system
                high_water[p.pid] = max(high_water.get(p.pid, 0), _rss_high_water(p.pid))
        except psutil.Error:
            pass
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    process_s = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {command[3:5]} failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**result, "process_s": process_s, "cpu_s": sum(cpu.values()),
            "hwm_mb": sum(high_water.values()) / 2**20}, peak / 2**20


def _rss_high_water(pid: int) -> int:
    """The kernel's record of the process's peak RSS (VmHWM), in bytes; 0 where /proc has none."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(mode: str, photos_dir: Path, styles_dir: Path, photos: int, out: Path) -> Measurement:
    result, peak_mb = run_measured(_child_command(mode, photos_dir, styles_dir, photos, out))
    return Measurement(mode, photos, result["samples"], result["wall_s"], peak_mb, result["process_s"], result["cpu_s"],
                       result["hwm_mb"])


def measure_rerun(first: Measurement, photos_dir: Path, styles_dir: Path, out: Path, console: Console) -> Measurement:
    """The same command again on the finished run folder `out` (as a user or a restarted cluster job runs it):
    whole-process wall time and peak PSS against the first run's, and the run's metrics history after it."""
    from styledistill.schemas.metrics import read_metrics

    console.print(f"measuring the rerun of the finished run of {first.photos} photos ...")
    rerun = measure(first.mode, photos_dir, styles_dir, first.photos, out)
    rerun.mode = f"{first.mode} rerun (finished)"
    console.print(f"rerun of a finished run ({first.samples} samples, {first.mode}): {rerun.process_s:.1f} s, "
                  f"peak PSS {rerun.peak_pss_mb:.0f} MB, whole process; the first run: {first.process_s:.1f} s, "
                  f"{first.peak_pss_mb:.0f} MB (target: < 5 s)")
    metrics = read_metrics(str(out))
    busy = {name: m["busy_s"] / m["actor_s"] for name, m in metrics.get("stages", {}).items() if m.get("actor_s")}
    console.print(f"metrics.json after the rerun: {len(metrics.get('attempts', []))} attempts; whole-run utilisation "
                  + ", ".join(f"{name} {u:.0%}" for name, u in busy.items()))
    return rerun


def run_rerun_benchmark(n: int, workdir: Path, console: Console) -> list[Measurement]:
    """Only the rerun measurement: a first run of n photos on local Ray, then the same command again."""
    from styledistill.tools.sample_data import build_sample_data

    sample_dir = workdir / "sample-data"
    build_sample_data(sample_dir, with_bad_files=False)
    photos_dir = build_photo_pool(sample_dir, workdir / f"photos-{n}", n)
    out = workdir / f"run-ray-{n}-{int(time.time())}"
    console.print(f"measuring ray on {n} photos ...")
    first = measure("ray", photos_dir, sample_dir / "stylized", n, out)
    return [first, measure_rerun(first, photos_dir, sample_dir / "stylized", out, console)]


def run_benchmark(n: int, workdir: Path, scale: int, console: Console) -> list[Measurement]:
    from styledistill.tools.sample_data import build_sample_data

    sample_dir = workdir / "sample-data"
    build_sample_data(sample_dir, with_bad_files=False)
    photos_dir = build_photo_pool(sample_dir, workdir / f"photos-{n * scale}", n * scale)
    styles_dir = sample_dir / "stylized"
    results = []
    for photos in (n, n * scale):
        for mode in ("inline", "ray"):
            out = workdir / f"run-{mode}-{photos}-{int(time.time())}"
            console.print(f"measuring {mode} on {photos} photos ...")
            results.append(measure(mode, photos_dir, styles_dir, photos, out))
    bare_n, ray_n, bare_big, ray_big = results
    rerun = measure_rerun(ray_big, photos_dir, styles_dir, out, console)  # `out`: the last run, ray at scale x N
    table = Table("mode", "photos", "samples", "wall s", "samples/s", "process s", "CPU s", "peak PSS MB",
                  "Σ RSS high-water MB")
    for m in [*results, rerun]:
        table.add_row(m.mode, str(m.photos), str(m.samples), f"{m.wall_s:.1f}", f"{m.samples_per_s:.2f}",
                      f"{m.process_s:.1f}", f"{m.cpu_s:.1f}", f"{m.peak_pss_mb:.0f}", f"{m.hwm_mb:.0f}")
    console.print(table)
    console.print(f"pipeline / bare loop throughput: {ray_n.samples_per_s / bare_n.samples_per_s:.2f}x at N, "
                  f"{ray_big.samples_per_s / bare_big.samples_per_s:.2f}x at {scale}xN (target >= 0.9x)")
    cores = os.cpu_count() or 1
    console.print(f"whole process at N (start to exit, as a user waits): pipeline {ray_n.process_s:.1f} s, bare loop "
                  f"{bare_n.process_s:.1f} s: {bare_n.process_s / ray_n.process_s:.2f}x (target >= 0.95x); "
                  f"CPU seconds {ray_n.cpu_s:.1f} vs {bare_n.cpu_s:.1f}, so on {cores} cores the pipeline cannot "
                  f"end before {ray_n.cpu_s / cores:.1f} s")
    console.print(f"peak memory at {scale}xN / at N (target <= 1.1x): sampled PSS: pipeline "
                  f"{ray_big.peak_pss_mb / ray_n.peak_pss_mb:.2f}x, bare loop {bare_big.peak_pss_mb / bare_n.peak_pss_mb:.2f}x;"
                  f" Σ RSS high-water: pipeline {ray_big.hwm_mb / ray_n.hwm_mb:.2f}x, bare loop "
                  f"{bare_big.hwm_mb / bare_n.hwm_mb:.2f}x")
    return [*results, rerun]


def run_audit_benchmark(n: int, workdir: Path, scale: int, console: Console) -> list[Measurement]:
    """`audit` on local Ray against the same scorers in a bare in-process loop, on the demo's own shards at N
    and scale x N photos (the runs audited are made first, inline, and not measured)."""
    from styledistill.pipeline.run import run_pipeline
    from styledistill.tools.sample_data import build_sample_data

    sample_dir = workdir / "sample-data"
    build_sample_data(sample_dir, with_bad_files=False)
    photos_dir = build_photo_pool(sample_dir, workdir / f"photos-{n * scale}", n * scale)
    results = []
    for photos in (n, n * scale):
        source = workdir / f"audited-{photos}"
        if not (source / "wids-index.json").exists():
            console.print(f"making the run to audit ({photos} photos, inline) ...")
            config = load_config(Path(str(DEMO_CONFIG)), _demo_overrides(photos_dir, sample_dir / "stylized", source, photos)
                                 + ["output.write_rejects=true"])
            run_pipeline(config, inline=True, report=False)
        for mode in ("audit-inline", "audit-ray"):
            out = workdir / f"{mode}-{photos}-{int(time.time())}"
            console.print(f"measuring {mode} on the run of {photos} photos ...")
            results.append(measure(mode, source, source, photos, out))
    table = Table("mode", "photos", "samples", "wall s", "samples/s", "peak PSS MB")
    for m in results:
        table.add_row(m.mode, str(m.photos), str(m.samples), f"{m.wall_s:.1f}", f"{m.samples_per_s:.2f}",
                      f"{m.peak_pss_mb:.0f}")
    console.print(table)
    bare_n, ray_n, bare_big, ray_big = results
    console.print(f"audit / bare loop throughput: {ray_n.samples_per_s / bare_n.samples_per_s:.2f}x at N, "
                  f"{ray_big.samples_per_s / bare_big.samples_per_s:.2f}x at {scale}xN (target >= 0.9x)")
    return results


def _demo_overrides(photos_dir, styles_dir, out, photos: int) -> list[str]:
    return [f"sources.0.uri={photos_dir}", f"sources.1.uri={styles_dir}", f"output.uri={out}",
            f"plan.max_photos={photos}", "filters.dedup.phash_max_distance=null"]  # crops are meant as distinct


def _audit_child(mode: str, run_dir: str, out: str) -> None:
    """One measured audit of a run folder with the demo's scorers and filters."""
    from styledistill.pipeline.audit import audit_pipeline
    from styledistill.schemas.audit import parse_audit_config

    demo = load_config(Path(str(DEMO_CONFIG)), [f"sources.0.uri={run_dir}", f"sources.1.uri={run_dir}"])
    data = {"name": "benchmark-audit", "inputs": [{"kind": "run", "uri": run_dir}],
            "scorers": [s.model_dump(mode="json") for s in demo.scorers],
            "filters": demo.filters.model_dump(mode="json"), "stages": demo.stages.model_dump(mode="json"),
            "ray": demo.ray.model_dump(mode="json"), "output": {"uri": out}, "samples_per_shard": 16}
    if mode == "audit-inline":  # the bare loop's scorers get every core, as in the run benchmark
        data["stages"]["score"]["num_cpus"] = os.cpu_count() or 1
    outcome = audit_pipeline(parse_audit_config(data), inline=(mode == "audit-inline"), report=False)
    print(json.dumps({"samples": sum(outcome.counts.values()), "wall_s": outcome.wall_s}))


def _child(mode: str, photos_dir: str, styles_dir: str, photos: int, out: str) -> None:
    """One measured run; prints {"samples", "wall_s"} as its last line."""
    from styledistill.pipeline.run import run_pipeline

    if mode.startswith("audit"):
        _audit_child(mode, photos_dir, out)
        return

    overrides = [f"sources.0.uri={photos_dir}", f"sources.1.uri={styles_dir}", f"output.uri={out}",
                 f"plan.max_photos={photos}", "filters.dedup.phash_max_distance=null"]  # crops are meant as distinct
    if mode == "inline":  # the bare loop's models get every core (their threads follow num_cpus)
        cores = os.cpu_count() or 1
        overrides += [f"stages.{stage}.num_cpus={cores}" for stage in ("generate", "score")]
    config = load_config(Path(str(DEMO_CONFIG)), overrides)
    outcome = run_pipeline(config, inline=(mode == "inline"), report=False)
    # Samples this attempt processed: none for the rerun of a finished run.
    print(json.dumps({"samples": sum(r.planned for r in outcome.written), "wall_s": outcome.wall_s}))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
