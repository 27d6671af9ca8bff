"""Crashes lose at most the work in flight: a killed driver resumes, a killed actor is replaced, and the
result is byte-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import DEMO_CONFIG, demo_config
from styledistill.pipeline.run import run_pipeline
from styledistill.schemas import manifest as mf
from test_pipeline_e2e import read_manifests, run_files

SMALL = ("plan.max_photos=6", "plan.samples_per_shard=4")


@pytest.fixture(scope="module")
def reference_run(sample_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    run_pipeline(demo_config(sample_data, out, *SMALL), inline=True, report=False)
    return out


def _cli(sample_data: Path, out: Path) -> list[str]:
    sets = [f"sources.0.uri={sample_data / 'realistic'}", f"sources.1.uri={sample_data / 'stylized'}",
            "plan.max_photos=6", "plan.samples_per_shard=4"]
    return [sys.executable, "-m", "styledistill", "run", str(DEMO_CONFIG), "--out", str(out),
            *[arg for s in sets for arg in ("--set", s)]]


def _wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the run never reached the point where it should be killed")
        time.sleep(0.05)


def _assert_same_dataset(run: Path, reference: Path) -> None:
    got, want = run_files(run), run_files(reference)
    dataset = [n for n in want if n.startswith(mf.SHARDS_DIR) and not n.endswith("_stats.json")]
    assert sorted(n for n in got if n.startswith(mf.SHARDS_DIR)) == sorted(n for n in want if n.startswith(mf.SHARDS_DIR))
    for name in dataset:
        assert got[name] == want[name], name
    df = read_manifests(run)
    assert df.key.is_unique and len(df) == len(read_manifests(reference))


@pytest.mark.parametrize("kill_when", ["after_run_folder", "after_first_shard"])
def test_killed_driver_resumes_to_the_same_dataset(sample_data, tmp_path, reference_run, kill_when):
    out = tmp_path / "run"
    shards = out / mf.SHARDS_DIR
    marker = {"after_run_folder": lambda: (out / mf.RUN_FILE).exists(),
              "after_first_shard": lambda: shards.exists() and any(shards.glob("*_stats.json"))}[kill_when]
    proc = subprocess.Popen(_cli(sample_data, out), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: marker() or proc.poll() is not None, timeout=240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, mid-flight
        proc.wait()
    finished_before = {p.name: p.stat().st_mtime_ns for p in shards.glob("*")} if shards.exists() else {}
    total_shards = len(list((reference_run / mf.SHARDS_DIR).glob("*_stats.json")))
    assert sum(n.endswith("_stats.json") for n in finished_before) < total_shards, "killed too late to test"

    done = subprocess.run(_cli(sample_data, out), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_dataset(out, reference_run)
    for name, mtime in finished_before.items():  # a finished shard is never written again
        if name.endswith("_stats.json"):
            stem = name.removesuffix("_stats.json")
            for suffix in (".tar", ".parquet", "_stats.json"):
                assert (shards / f"{stem}{suffix}").stat().st_mtime_ns == finished_before[f"{stem}{suffix}"]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # no temp file left behind


def test_killed_stage_actor_loses_nothing(sample_data, tmp_path, reference_run):
    import ray

    out = tmp_path / "run"
    killed: list[int] = []

    def kill_generator_mid_run():
        shards = out / mf.SHARDS_DIR
        _wait_for(lambda: shards.exists() and any(shards.glob("*_stats.json")), timeout=240)
        name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("styledistill-generate-"))
        actor = ray.get_actor(name, namespace=next(a["namespace"] for a in ray.util.list_named_actors(
            all_namespaces=True) if a["name"] == name))
        pid = ray.get(actor.info.remote())["pid"]
        os.kill(pid, signal.SIGKILL)
        killed.append(len(list(shards.glob("*_stats.json"))))  # shards finished before the kill
        # Ray restarts the actor (setup runs again) and retries the batches it held.
        _wait_for(lambda: ray.get(actor.info.remote())["pid"] != pid, timeout=120)

    killer = threading.Thread(target=kill_generator_mid_run)
    killer.start()
    outcome = run_pipeline(demo_config(sample_data, out, *SMALL), report=False)
    killer.join()
    assert killed, "the generator actor was never killed"
    # Shards were still to come, so the restarted generator (or a retried batch) had to make them.
    assert killed[0] < outcome.shards
    assert outcome.counts["failed"] == 0
    _assert_same_dataset(out, reference_run)
