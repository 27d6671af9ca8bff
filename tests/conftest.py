"""Shared fixtures: the bundled sample set and demo configs pointing at it, the tiny random models (each
built once per session), and the one local Ray the tests share.

Ray lifecycle: a test that runs anything on Ray in this process asks for `local_ray`; that starts a local
Ray if none is up (later modules reuse it: starting one costs seconds) and the package's `start_ray` then
sees `ray.is_initialized()` and joins it instead of starting its own. A module that needs a cluster of its own
(`ray.cluster_utils.Cluster`) asks for `no_local_ray`, which shuts any running Ray down first and makes sure
none is left afterwards. Ray is shut down at the end of the session, and a module that leaves a Ray running
without having asked for one fails, so test files pass in any order.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest

from styledistill.tools.sample_data import build_sample_data
from styledistill.schemas.config import RunConfig, load_config

DEMO_CONFIG = Path(str(resources.files("styledistill") / "configs" / "demo.yaml"))

# Logical CPUs of the shared local Ray: one actor of every demo stage (load 0.25, generate 1, score 1,
# encode 0.25), the writer (0.25) and a labeler (1) fit at once, whatever the machine's core count.
LOCAL_RAY_CPUS = max(os.cpu_count() or 1, 4)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "sample-data"
    build_sample_data(out, with_bad_files=True)
    return out


def demo_config(sample_data: Path, out: Path, *overrides: str) -> RunConfig:
    """The packaged demo config on the sample set, small: 4 photos, shards of 6 samples."""
    return load_config(DEMO_CONFIG, [
        f"sources.0.uri={sample_data / 'realistic'}",
        f"sources.1.uri={sample_data / 'stylized'}",
        f"output.uri={out}",
        "plan.max_photos=4",
        "plan.samples_per_shard=6",
        *overrides,
    ])


# Small enough that a whole pipeline run (then killed, resumed, faulted) takes seconds.
SMALL = ("plan.max_photos=6", "plan.samples_per_shard=4")


@pytest.fixture(scope="session")
def reference_run(sample_data, tmp_path_factory) -> Path:
    """An uninterrupted inline run of SMALL: what every killed, resumed or faulted run must equal, byte for byte."""
    from styledistill.pipeline.run import run_pipeline

    out = tmp_path_factory.mktemp("reference") / "run"
    run_pipeline(demo_config(sample_data, out, *SMALL), inline=True, report=False)
    return out


# --- tiny random models, built once per session -------------------------------------------------------------
# Tests only read these folders and files (backends and trainers load them like real checkpoints).


@pytest.fixture(scope="session")
def tiny_qwen_pipeline(tmp_path_factory) -> Path:
    """A tiny random QwenImageEditPlusPipeline folder (see tiny_qwen.py), about 17 MB."""
    from tiny_qwen import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-qwen") / "tiny-qwen-image-edit")


@pytest.fixture(scope="session")
def tiny_clip_weights(tmp_path_factory) -> str:
    """A tiny random open_clip ViT-L-14 state dict file (`tiny_vision.TINY_CLIP` is its model_cfg)."""
    from tiny_vision import save_tiny_clip

    return str(save_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "tiny_clip.pt"))


@pytest.fixture(scope="session")
def tiny_csd_weights(tmp_path_factory) -> str:
    """A tiny random CSD checkpoint in the released training-checkpoint layout."""
    from tiny_vision import tiny_csd_state, write_csd_checkpoint

    return str(write_csd_checkpoint(tmp_path_factory.mktemp("tiny-csd") / "pytorch_model.bin", tiny_csd_state()))


@pytest.fixture(scope="session")
def tiny_dino_dir(tmp_path_factory) -> str:
    """A tiny random DINOv2 folder (model and image processor)."""
    from tiny_vision import save_tiny_dino

    return str(save_tiny_dino(tmp_path_factory.mktemp("tiny-dino") / "tiny-dinov2"))


# --- Ray ----------------------------------------------------------------------------------------------------

_ray_owner: list[str] = []  # "local" while local_ray's Ray is up, "cluster" while a no_local_ray module runs


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _ray_owner.clear()


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray in this process, shared with later modules; yields the `ray` module."""
    import ray

    if ray.is_initialized() and _ray_owner != ["local"]:
        _shutdown_ray()  # not ours (another module's cluster, or a test's own ray.init): start afresh
    if not ray.is_initialized():
        # address="local": a new local instance, never a cluster some other process recorded in /tmp/ray.
        ray.init(address="local", num_cpus=LOCAL_RAY_CPUS, include_dashboard=False, logging_level="ERROR")
        _ray_owner[:] = ["local"]
    yield ray


def wait_for(predicate, timeout: float) -> None:
    """Poll `predicate` until it holds; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {timeout:g} s")
        time.sleep(0.05)


# Libraries only the actors need: seconds of CPU and hundreds of MB each (webdataset imports torch).
MODEL_LIBRARIES = ("torch", "timm", "onnxruntime", "diffusers", "transformers", "open_clip", "peft", "webdataset")


def model_libraries_after(code: str) -> list[str]:
    """The MODEL_LIBRARIES a fresh interpreter has imported once it has run `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {MODEL_LIBRARIES!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


@contextlib.contextmanager
def joined_cluster(head: dict, workers: list[dict]):
    """A ray.cluster_utils.Cluster of a head and worker nodes (`add_node` arguments), with this process's
    driver joined to it; yields (cluster, worker nodes) and shuts both down after."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=head)
    nodes = [cluster.add_node(**worker) for worker in workers]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def no_local_ray():
    """For a module that connects to a Ray cluster of its own: no Ray is up before it, none after it."""
    _shutdown_ray()
    _ray_owner[:] = ["cluster"]
    yield
    _shutdown_ray()


@pytest.fixture(scope="module", autouse=True)
def _ray_left_behind(request):
    """Fails a module that left a Ray up without asking for one (a pipeline run outside `local_ray`)."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and not _ray_owner:
        _shutdown_ray()
        pytest.fail(f"{request.module.__name__} started Ray without the local_ray fixture", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _ray_shutdown_at_exit():
    yield
    import sys

    if "ray" in sys.modules:
        _shutdown_ray()
