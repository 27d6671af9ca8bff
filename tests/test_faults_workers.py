"""Issue 12, items 5 and 6: a model call that never returns, and a sample that kills its worker process.

Faults are injected by failpoints (styledistill.pipeline.faults.inject, driven by STYLEDISTILL_FAULTS) in
the stage actors of a real local Ray run of the demo, keyed on group ids taken from a clean inline run:
a crash is a SIGKILL of the worker (as a segfault or the OOM killer does), a hang never returns. Nothing
here waits on time except the configured stage timeout.
"""

from __future__ import annotations

import json
import tarfile

import pandas as pd
import pytest
import ray

from conftest import demo_config
from styledistill.pipeline.faults import FAULTS_ENV, injected_faults
from styledistill.pipeline.run import run_pipeline
from styledistill.schemas import manifest as mf
from test_pipeline_e2e import read_manifests

pytestmark = pytest.mark.slow

# Shards of two groups, each one batch of two groups: a poisoned group shares its batch with a healthy one.
PLAN = ("plan.max_photos=6", "plan.samples_per_shard=8", "ray.groups_per_batch=2")
TIMEOUT_S = 4


@pytest.fixture(scope="module")
def reference(sample_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "run"
    run_pipeline(demo_config(sample_data, out, *PLAN), inline=True, report=False)
    return out


@pytest.fixture(scope="module")
def faults_file(tmp_path_factory):
    """Ray workers read the failpoints from this file: the env var must be set before Ray starts."""
    folder = tmp_path_factory.mktemp("faults")
    path = folder / "faults.json"
    path.write_text(json.dumps({"state_dir": str(folder / "state"), "rules": []}))
    ray.shutdown()  # a Ray left by an earlier test would not see the variable: the run starts its own
    mp = pytest.MonkeyPatch()
    mp.setenv(FAULTS_ENV, str(path))
    try:
        yield path
    finally:
        ray.shutdown()
        mp.undo()


def _groups(run) -> list[list[str]]:
    df = read_manifests(run)
    return [list(dict.fromkeys(df[df["shard"] == s].group_id)) for s in sorted(df["shard"].unique())]


def _members(tar_path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_crashing_and_hanging_samples_are_isolated_and_the_rest_is_written(
        sample_data, tmp_path, reference, faults_file):
    shards = _groups(reference)
    assert len(shards) >= 3 and all(len(g) == 2 for g in shards[:3])
    crash, flaky, hang = shards[0][1], shards[1][0], shards[2][0]
    state = json.loads(faults_file.read_text())["state_dir"]
    faults_file.write_text(json.dumps({"state_dir": state, "rules": [
        {"stage": "generate", "group": crash, "fault": "crash"},  # every time: a sample that kills the model
        {"stage": "score", "group": flaky, "fault": "crash", "times": 1},  # once: a node hiccup
        {"stage": "encode", "group": hang, "fault": "hang"},  # a call that never returns
    ]}))
    out = tmp_path / "run"
    config = demo_config(sample_data, out, *PLAN, "ray.batch_retries=1", f"stages.encode.timeout_s={TIMEOUT_S}")
    outcome = run_pipeline(config, report=False)

    assert injected_faults(state) == {"crash": 5, "hang": 4}
    # crash: 2 attempts of the batch, split, 2 of its half; flaky: once; hang: the same, by timeout
    assert outcome.faults["split_batches"] == 2 and outcome.faults["timeouts"] == 4
    assert outcome.faults["failed_batches"] == 2 and outcome.faults["restarted_actors"] == 9
    got, want = read_manifests(out).set_index("key"), read_manifests(reference).set_index("key")
    assert sorted(got.index) == sorted(want.index)  # every planned sample accounted for
    failed = got[got.status == mf.FAILED]
    assert set(failed.group_id) == {crash, hang} | set(want[want.status == mf.FAILED].group_id)
    assert (failed[failed.group_id == crash].error
            == "worker died while processing this sample (stage generate, 2 attempts)").all()
    assert (failed[failed.group_id == hang].error == f"stage encode timed out after {TIMEOUT_S} s (2 attempts)").all()
    healthy = got[~got.group_id.isin([crash, hang])]
    columns = ["status", "content_sha256", "style_sha256", "target_sha256"]
    pd.testing.assert_frame_equal(healthy[columns].sort_index(), want.loc[healthy.index, columns].sort_index())
    assert [list(r) for r in healthy.reasons.sort_index()] == [list(r) for r in want.loc[healthy.index].reasons.sort_index()]
    # The shard with the transient crash is byte-identical; the others hold the same healthy samples.
    name = mf.shard_name(config.output.shard_prefix, 1)
    for suffix in (".tar", ".parquet"):
        assert (out / mf.SHARDS_DIR / f"{name}{suffix}").read_bytes() == (reference / mf.SHARDS_DIR / f"{name}{suffix}").read_bytes()
    for shard in (0, 2):
        name = mf.shard_name(config.output.shard_prefix, shard)
        mine, clean = _members(out / mf.SHARDS_DIR / f"{name}.tar"), _members(reference / mf.SHARDS_DIR / f"{name}.tar")
        assert mine == {k: v for k, v in clean.items() if k.split(".")[0] in set(healthy.index)}
    metrics = json.loads((out / mf.METRICS_FILE).read_text())
    assert metrics["faults"]["timeouts"] == 4
