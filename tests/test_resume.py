"""Crashes lose at most the work in flight: a killed driver resumes, a killed actor is replaced, and the
result is byte-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import DEMO_CONFIG, SMALL, demo_config, wait_for
from styledistill.pipeline.run import run_pipeline
from styledistill.schemas import manifest as mf
from test_pipeline_e2e import read_manifests, run_files

pytestmark = pytest.mark.slow  # whole pipeline runs, killed and resumed


def _cli(sample_data: Path, out: Path) -> list[str]:
    sets = [f"sources.0.uri={sample_data / 'realistic'}", f"sources.1.uri={sample_data / 'stylized'}",
            "plan.max_photos=6", "plan.samples_per_shard=4"]
    return [sys.executable, "-m", "styledistill", "run", str(DEMO_CONFIG), "--out", str(out),
            *[arg for s in sets for arg in ("--set", s)]]


# The driver subprocess starts a local Ray of its own (killed with it), never joins a cluster that another
# process recorded in /tmp/ray (ray.cluster_utils.Cluster does, and ray.init() would join that one).
_OWN_LOCAL_RAY = {**os.environ, "RAY_ADDRESS": "local"}


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
    proc = subprocess.Popen(_cli(sample_data, out), start_new_session=True, env=_OWN_LOCAL_RAY,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: marker() or proc.poll() is not None, timeout=240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, mid-flight
        proc.wait()
    finished_before = {p.name: p.stat().st_mtime_ns for p in shards.glob("*")} if shards.exists() else {}
    total_shards = len(list((reference_run / mf.SHARDS_DIR).glob("*_stats.json")))
    finished = sum(n.endswith("_stats.json") for n in finished_before)
    assert finished < total_shards, "killed too late to test"
    if kill_when == "after_first_shard":  # the resume must keep finished shards, so there must be some
        assert finished >= 1, "killed before any shard finished"

    done = subprocess.run(_cli(sample_data, out), env=_OWN_LOCAL_RAY, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_dataset(out, reference_run)
    for name, mtime in finished_before.items():  # a finished shard is never written again
        if name.endswith("_stats.json"):
            stem = name.removesuffix("_stats.json")
            for suffix in (".tar", ".parquet", "_stats.json"):
                assert (shards / f"{stem}{suffix}").stat().st_mtime_ns == finished_before[f"{stem}{suffix}"]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # no temp file left behind


def test_killed_stage_actor_loses_nothing(sample_data, tmp_path, reference_run, local_ray):
    ray = local_ray
    out = tmp_path / "run"
    shards = out / mf.SHARDS_DIR
    finished_at_kill: list[tuple[int, int]] = []  # shards finished (just before, just after) the kill
    # Named actors of this driver's Ray namespace that exist before the run: earlier runs' actors, not ours.
    earlier = set(ray.util.list_named_actors())  # names, in this job's namespace only

    def kill_generator_mid_run():
        wait_for(lambda: shards.exists() and any(shards.glob("*_stats.json")), timeout=240)
        # This run's generate actor: in this job's namespace (list_named_actors() without all_namespaces) and
        # new since the run started, so never an actor of another driver or of an earlier test's run.
        ours = sorted(name for name in ray.util.list_named_actors()
                      if name.startswith("styledistill-generate-") and name not in earlier)
        actor = ray.get_actor(ours[0])
        pid = ray.get(actor.info.remote())["pid"]
        before = len(list(shards.glob("*_stats.json")))
        os.kill(pid, signal.SIGKILL)
        finished_at_kill.append((before, len(list(shards.glob("*_stats.json")))))
        # Ray restarts the actor (setup runs again); the driver retries the batches it held.

        def restarted() -> bool:
            try:
                return ray.get(actor.info.remote())["pid"] != pid
            except ray.exceptions.RayActorError:  # still restarting: calls to it fail until it is back
                return False

        wait_for(restarted, timeout=120)

    errors: list[BaseException] = []

    def killer_thread():
        try:
            kill_generator_mid_run()
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread below
            errors.append(err)

    killer = threading.Thread(target=killer_thread)
    killer.start()
    outcome = run_pipeline(demo_config(sample_data, out, *SMALL), report=False)
    killer.join()
    if errors:
        raise errors[0]
    assert finished_at_kill, "the generator actor was never killed"
    before, after = finished_at_kill[0]
    # Killed mid-run: some shards were already finished and some were still to come, so the restarted
    # generator (or a retried batch) had to make them.
    assert before >= 1, "killed before any shard finished"
    assert after < outcome.shards, "killed after every shard finished"
    assert outcome.counts["failed"] == 0
    _assert_same_dataset(out, reference_run)
