"""Stage placement on a two-node Ray cluster with fake GPUs: a CPU-only head and one worker with 2 GPUs.

The GPU stages ask for GPUs, so Ray must put them on the worker; the CPU stages may go anywhere. The GPUs
are logical (no CUDA here), so the GPU stages run their models on the CPU, which is all this test needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import ray

from styledistill.pipeline.executor import check_placeable
from styledistill.pipeline.run import run_pipeline
from styledistill.schemas import manifest as mf
from styledistill.schemas.config import parse_config
from styledistill.schemas.stages import StageResources
from conftest import DEMO_CONFIG, joined_cluster
from sample_images import write_photos, write_stylized


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(no_local_ray):
    # One cluster for the module (starting one costs ~10 s); the last test removes the GPU node. The driver
    # joins it, so no other Ray may be up in this process (no_local_ray shuts down the shared one first).
    with joined_cluster({"num_cpus": 2, "num_gpus": 0}, [{"num_cpus": 2, "num_gpus": 2, "resources": {"gpu_node": 1}}]
                        ) as (cluster, [worker]):
        yield cluster, worker


def placement_config(tmp_path, out: str) -> dict:
    return {
        "sources": [{"uri": str(tmp_path / "photos"), "label": "realistic"},
                    {"uri": str(tmp_path / "stylized"), "label": "stylized"}],
        "resolution": {"content_max_edge": 96, "style_edge": 64},
        "plan": {"styles_per_photo": 2, "triplets_per_photo": 2, "samples_per_shard": 2},
        "scorers": [{"backend": "noop"}, {"backend": "gram"}],
        "stages": {
            "load": {"num_cpus": 0.25},
            "generate": {"num_cpus": 1, "num_gpus": 1},
            "score": {"num_cpus": 0.5, "num_gpus": 0.5},
            "encode": {"num_cpus": 0.25, "resources": {"gpu_node": 0.1}},  # pinned by a custom resource
            "write": {"num_cpus": 0.25},
        },
        "ray": {"groups_per_batch": 1, "max_shards_in_flight": 2},
        "output": {"uri": out},
    }


def test_gpu_stages_run_only_on_the_gpu_node(tmp_path, cluster):
    cluster, worker = cluster
    write_photos(tmp_path / "photos")
    write_stylized(tmp_path / "stylized")
    run = tmp_path / "run"
    config = parse_config(placement_config(tmp_path, str(run)))
    outcome = run_pipeline(config, ray_address=cluster.address, report=False)

    assert outcome.counts[mf.FAILED] == 0
    assert outcome.shards == len(outcome.written) == 4  # one group per shard: placement is seen per group
    head = ray.get_runtime_context().get_node_id()
    assert head != worker.node_id
    load_nodes = set()
    for path in sorted((run / mf.SHARDS_DIR).glob("*_stats.json")):
        nodes = json.loads(path.read_text())["nodes"]
        assert set(nodes) == {"load", "generate", "score", "encode"}
        assert nodes["generate"] == nodes["score"] == nodes["encode"] == [worker.node_id], path.name
        load_nodes.update(nodes["load"])
    assert load_nodes <= {head, worker.node_id}
    metrics = json.loads((run / mf.METRICS_FILE).read_text())
    assert metrics["stages"]["generate"]["actors"] == 1


def test_ray_job_entrypoint_joins_the_running_cluster(tmp_path, cluster, sample_data):
    """What `ray job submit -- python -m styledistill.jobs.distill ...` runs: the driver joins the cluster
    named by RAY_ADDRESS instead of starting its own Ray."""
    cluster, worker = cluster
    out = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    done = subprocess.run(
        [sys.executable, "-m", "styledistill.jobs.distill", str(DEMO_CONFIG), "--out", str(out),
         "--set", f"sources.0.uri={sample_data / 'realistic'}", "--set", f"sources.1.uri={sample_data / 'stylized'}",
         "--set", "plan.max_photos=1"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    stats = [json.loads(p.read_text()) for p in (out / mf.SHARDS_DIR).glob("*_stats.json")]
    assert stats
    # Its generate actor ran on one of this cluster's two nodes: it did not start a Ray of its own.
    assert {n for s in stats for n in s["nodes"]["generate"]} <= {ray.get_runtime_context().get_node_id(),
                                                                  worker.node_id}


def test_a_gpu_stage_without_a_gpu_node_fails_at_once_naming_the_stage(tmp_path, cluster):
    cluster, worker = cluster
    gpu = StageResources(num_cpus=1, num_gpus=1)
    check_placeable("generate", gpu)  # the worker can host it
    cluster.remove_node(worker)
    cluster.wait_for_nodes()
    with pytest.raises(RuntimeError, match=r"stage 'generate' asks for 1 CPU, 1 GPU per actor, but no node"):
        check_placeable("generate", gpu)
    check_placeable("load", StageResources(num_cpus=0.25))  # CPU stages still fit on the head
    with pytest.raises(RuntimeError, match=r"asks for 0.25 CPU, 1 h100 per actor"):
        check_placeable("load", StageResources(num_cpus=0.25, resources={"h100": 1}))

    write_photos(tmp_path / "photos")
    write_stylized(tmp_path / "stylized")
    config = parse_config(placement_config(tmp_path, str(tmp_path / "run")))
    with pytest.raises(RuntimeError, match="stage 'generate' asks for 1 CPU, 1 GPU"):
        run_pipeline(config, ray_address=cluster.address, report=False)
