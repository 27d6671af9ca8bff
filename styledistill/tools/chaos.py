"""`styledistill chaos`: the embedded demo at 10x size, run through every fault the pipeline must survive,
then compared with a clean run.

    styledistill chaos --scale 10 --seed 0

A clean reference is made first (inline). The chaos run then goes through up to three attempts, each a
child process running `styledistill run` on local Ray, as a user would rerun it:
  1. the output disk fills up after part of the run (ENOSPC)      -> one line, exit non-zero
  2. space freed; Ctrl-C once a few more shards are written       -> "interrupted: rerun ...", exit 130
  3. the rerun completes.
Throughout, the run folder and the sources sit on flaky storage (the first read and the first write of
every file fail with a retryable error), and failpoints in the stage actors fire on randomly chosen photo
groups: permanent and one-off worker crashes (SIGKILL, as a segfault or the OOM killer), a one-off and a
permanent hang (the stage timeout restarts the actor). Node loss needs a multi-node cluster: it is covered
by tests/test_faults_node_loss.py, not here.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

from rich.console import Console

from styledistill.pipeline.faults import FAULTS_ENV, injected_faults
from styledistill.schemas import manifest as mf

HANG_TIMEOUT_S = 10


def _overrides(photos_dir: Path, styles_dir: Path, photos: int) -> list[str]:
    return [f"sources.0.uri=faulty://{photos_dir}", f"sources.1.uri=faulty://{styles_dir}",
            f"plan.max_photos={photos}", "filters.dedup.phash_max_distance=null"]  # crops are meant as distinct


def _manifests(run: Path):
    import pandas as pd

    return pd.concat([pd.read_parquet(p) for p in sorted((run / mf.SHARDS_DIR).glob("*.parquet"))], ignore_index=True)


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _plan_faults(reference: Path, rng: random.Random, state_dir: Path) -> dict:
    df = _manifests(reference)
    groups = list(dict.fromkeys(df.group_id))
    picked = rng.sample(groups, 7)
    rules = [
        {"stage": "generate", "group": picked[0], "fault": "crash"},  # permanent: failed, with its cause
        {"stage": "score", "group": picked[1], "fault": "crash"},
        {"stage": "generate", "group": picked[2], "fault": "crash", "times": 1},  # one-off: retried
        {"stage": "score", "group": picked[3], "fault": "crash", "times": 1},
        {"stage": "encode", "group": picked[4], "fault": "crash", "times": 1},
        {"stage": "encode", "group": picked[5], "fault": "hang", "times": 1},  # one-off hang: timeout, retried
        {"stage": "encode", "group": picked[6], "fault": "hang"},  # permanent hang: failed, "timed out"
    ]
    return {"state_dir": str(state_dir), "rules": rules}


def _attempt(config: Path, out: str, overrides: list[str], env: dict, console: Console,
             interrupt_after_shards: int | None = None) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "styledistill.tools.chaos", str(config), out, *overrides]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if interrupt_after_shards is not None:
        shards = Path(out.removeprefix("faulty://")) / mf.SHARDS_DIR
        start = len(list(shards.glob("*_stats.json"))) if shards.exists() else 0
        while proc.poll() is None:
            if shards.exists() and len(list(shards.glob("*_stats.json"))) >= start + interrupt_after_shards:
                os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does
                break
            time.sleep(0.2)
    _, stderr = proc.communicate()
    lines = [line for line in stderr.splitlines() if line.startswith(("error:", "interrupted:", "faults survived:"))]
    if proc.returncode not in (0, 2, 130) or not lines:  # unexpected: show the end of what it said
        lines += [line for line in stderr.splitlines() if line.strip()][-6:]
    return proc.returncode, " | ".join(lines)


def run_chaos(workdir: Path, scale: int, seed: int, console: Console) -> dict:
    from styledistill.tools.bench import build_photo_pool
    from styledistill.io import faultfs
    from styledistill.pipeline.run import run_pipeline
    from styledistill.tools.sample_data import build_sample_data
    from styledistill.schemas.config import load_config

    faultfs.register()
    rng = random.Random(seed)
    sample_dir = workdir / "sample-data"
    build_sample_data(sample_dir, with_bad_files=False)  # as the benchmark: the photo pool crops these
    base = len([p for p in (sample_dir / "realistic").glob("*.jpg") if p.stat().st_size > 1000])
    photos = base * scale
    photos_dir = build_photo_pool(sample_dir, workdir / f"photos-{photos}", photos)
    styles_dir = sample_dir / "stylized"
    overrides = _overrides(photos_dir, styles_dir, photos)
    config_path = Path(__file__).parent / "configs" / "demo.yaml"

    reference = workdir / "clean"
    if not (reference / mf.SHARDS_DIR).exists() or not (reference / mf.WIDS_INDEX_FILE).exists():
        console.print(f"clean reference run (inline): {photos} photos")
        # Same threads per model as the Ray actors: the embedded models' floats depend on the thread count.
        cfg = load_config(config_path, [*overrides, f"output.uri={reference}"])
        run_pipeline(cfg, inline=True, report=False)

    out_dir = workdir / f"chaos-{seed}"
    state = workdir / f"chaos-{seed}-state"
    for path in (out_dir, state):
        if path.exists():
            import shutil

            shutil.rmtree(path)
    state.mkdir(parents=True)
    spec = _plan_faults(reference, rng, state / "failpoints")
    (state / "faults.json").write_text(json.dumps(spec))
    total_bytes = sum(p.stat().st_size for p in (reference / mf.SHARDS_DIR).glob("*"))
    env = {**os.environ, FAULTS_ENV: str(state / "faults.json"), "FAULTYFS_STATE": str(state / "fs"),
           "FAULTYFS_READ_FAILS": "1", "FAULTYFS_WRITE_FAILS": "1", "STYLEDISTILL_IO_BACKOFF_S": "0.05"}
    out = f"faulty://{out_dir}"
    run_overrides = [*overrides, "ray.batch_retries=1", f"stages.encode.timeout_s={HANG_TIMEOUT_S}"]
    attempts = []
    start = time.perf_counter()
    # 1: the disk fills up a third of the way through (the scan and run files need room too).
    budget = int(total_bytes * rng.uniform(0.25, 0.45))
    rc, line = _attempt(config_path, out, run_overrides, {**env, "FAULTYFS_WRITE_BUDGET": str(budget)}, console)
    attempts.append(("disk full", rc, line))
    # 2: space freed; Ctrl-C after a few more shards.
    rc, line = _attempt(config_path, out, run_overrides, env, console, interrupt_after_shards=rng.randint(2, 4))
    attempts.append(("Ctrl-C", rc, line))
    # 3: the rerun completes (a fourth only if the third met something unexpected).
    for _ in range(2):
        rc, line = _attempt(config_path, out, run_overrides, env, console)
        attempts.append(("rerun", rc, line))
        if rc == 0:
            break
    wall = time.perf_counter() - start

    injected = Counter(injected_faults(str(state / "failpoints")))
    fs_faults = {kind: faultfs_injected(state / "fs", kind) for kind in ("read", "write", "full")}
    got, want = _manifests(out_dir), _manifests(reference)
    permanent = {r["group"] for r in spec["rules"] if not r.get("times")}
    failed_new = got[(got.status == mf.FAILED) & ~got.key.isin(want[want.status == mf.FAILED].key)]
    names = sorted(p.name for p in (reference / mf.SHARDS_DIR).glob("*.tar"))
    identical, explained, unexplained = 0, 0, []
    bad_shards = set(got[got.group_id.isin(permanent)]["shard"])
    for name in names:
        same = all((out_dir / mf.SHARDS_DIR / name.replace(".tar", s)).read_bytes()
                   == (reference / mf.SHARDS_DIR / name.replace(".tar", s)).read_bytes() for s in (".tar", ".parquet"))
        if same:
            identical += 1
            continue
        shard = int(name.removesuffix(".tar").rsplit("-", 1)[1])
        healthy = set(got[(got["shard"] == shard) & ~got.group_id.isin(permanent)].key)
        clean = {k: v for k, v in _tar_members(reference / mf.SHARDS_DIR / name).items() if k.split(".")[0] in healthy}
        if shard in bad_shards and _tar_members(out_dir / mf.SHARDS_DIR / name) == clean:
            explained += 1
        else:
            unexplained.append(name)
    summary = {
        "photos": photos, "attempts": attempts, "wall_s": round(wall, 1),
        "faults_injected": {"worker crash": injected["crash"], "hang (timeout)": injected["hang"],
                            "flaky read": fs_faults["read"], "flaky write": fs_faults["write"],
                            "disk full": fs_faults["full"], "Ctrl-C": 1},
        "planned": len(want), "accepted": int((got.status == mf.ACCEPTED).sum()),
        "rejected": int((got.status == mf.REJECTED).sum()), "failed": int((got.status == mf.FAILED).sum()),
        "failed_by_injected_faults": len(failed_new),
        "failed_causes": dict(Counter(failed_new.error)),
        "all_planned_accounted": sorted(got.key) == sorted(want.key),
        "failed_only_permanent": set(failed_new.group_id) <= permanent,
        "shards": len(names), "shards_identical": identical,
        "shards_differing_only_by_permanent_faults": explained, "shards_unexplained": unexplained,
    }
    _print(summary, console)
    (workdir / f"chaos-{seed}.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def faultfs_injected(state: Path, kind: str) -> int:
    path = state / f"injected-{kind}"
    return path.stat().st_size if path.exists() else 0


def _print(s: dict, console: Console) -> None:
    for what, rc, line in s["attempts"]:
        console.print(f"attempt ({what}): exit {rc}: {line}", soft_wrap=True)
    console.print("faults injected: " + ", ".join(f"{k} {v}" for k, v in s["faults_injected"].items()), soft_wrap=True)
    console.print(f"samples: planned {s['planned']}, accepted {s['accepted']}, rejected {s['rejected']}, "
                  f"failed {s['failed']} ({s['failed_by_injected_faults']} by permanent faults)", soft_wrap=True)
    console.print(f"shards: {s['shards']}, byte-identical to the clean run {s['shards_identical']}, differing "
                  f"only by permanent faults {s['shards_differing_only_by_permanent_faults']}, unexplained "
                  f"{len(s['shards_unexplained'])} {s['shards_unexplained'] or ''}", soft_wrap=True)
    for cause, n in s["failed_causes"].items():
        console.print(f"  failed {n}: {cause}", soft_wrap=True)
    console.print(f"every planned sample accounted for: {s['all_planned_accounted']}; failures only where the "
                  f"fault was permanent: {s['failed_only_permanent']}; chaos wall {s['wall_s']} s", soft_wrap=True)


def _child(config: str, out: str, overrides: list[str]) -> None:
    """One attempt: `styledistill run` on a local Ray whose workers can open faulty:// URLs."""
    import ray

    from styledistill.cli import app
    from styledistill.io import faultfs

    faultfs.register()
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 3), include_dashboard=False, logging_level="ERROR",
             runtime_env={"worker_process_setup_hook": "styledistill.io.faultfs.register"})
    app(["run", config, "--out", out, *[a for o in overrides for a in ("--set", o)]])


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3:])
