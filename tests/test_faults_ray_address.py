"""Issue 12, item 7: a `ray start --head` cluster already on the workstation.

Without an address the run starts a private local Ray whatever else runs; it joins a cluster only when
asked (--ray-address, ray.address, RAY_ADDRESS). Both against a real `ray start` head.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import DEMO_CONFIG
from ray_head import free_port, ray_head, stop_head
from styledistill.schemas import manifest as mf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    with ray_head() as h:
        probe = subprocess.run(
            [sys.executable, "-c", "import ray; ray.init(address=%r, logging_level='ERROR'); "
                                   "print(ray.get_runtime_context().get_node_id())" % h.address],
            env=h.env(), capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0, probe.stderr[-2000:]
        h.node_id = probe.stdout.strip().splitlines()[-1]
        yield h


def _run(sample_data, out, env, *extra: str) -> set[str]:
    cmd = [sys.executable, "-m", "styledistill", "run", str(DEMO_CONFIG), "--out", str(out),
           "--set", f"sources.0.uri={sample_data / 'realistic'}", "--set", f"sources.1.uri={sample_data / 'stylized'}",
           "--set", "plan.max_photos=1", *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = [json.loads(p.read_text()) for p in (out / mf.SHARDS_DIR).glob("*_stats.json")]
    assert stats
    return {node for s in stats for nodes in s["nodes"].values() for node in nodes}


def test_without_an_address_the_run_starts_a_private_ray_beside_a_running_head(head, sample_data, tmp_path):
    # head.env() carries RAY_TMPDIR, so a bare ray.init() here would find the head's bootstrap file and
    # die with "When connecting to an existing cluster, num_cpus and num_gpus must not be provided".
    nodes = _run(sample_data, tmp_path / "run", head.env())
    assert head.node_id not in nodes


@pytest.mark.parametrize("how", ["flag", "env"])
def test_with_an_address_the_run_joins_the_head(head, sample_data, tmp_path, how):
    if how == "flag":
        nodes = _run(sample_data, tmp_path / "run", head.env(), "--ray-address", head.address)
    else:  # what Ray Jobs sets for its entrypoint
        nodes = _run(sample_data, tmp_path / "run", head.env(RAY_ADDRESS=head.address))
    assert nodes == {head.node_id}


def test_a_bootstrap_file_left_by_a_crashed_cluster_is_ignored(sample_data, tmp_path):
    """A `ray start` head killed without `ray stop` leaves ray_current_cluster behind; a bare ray.init()
    would try to join the dead address."""
    root = tempfile.mkdtemp(prefix="sdstale-", dir="/tmp")  # short: Ray's sockets live below it
    try:
        os.makedirs(os.path.join(root, "ray"))
        with open(os.path.join(root, "ray", "ray_current_cluster"), "w") as f:
            f.write(f"127.0.0.1:{free_port()}")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        assert _run(sample_data, tmp_path / "run", {**env, "RAY_TMPDIR": root})
    finally:
        stop_head(root)  # the private Ray's processes name this folder too; normally gone already
        shutil.rmtree(root, ignore_errors=True)
