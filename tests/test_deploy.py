"""deploy/: the KubeRay RayJob has the RayJob shape and an entrypoint our CLI accepts; the Slurm script passes
shellcheck; the job entrypoint reads a config from a URL or the package and names why a path is missing."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from styledistill.jobs import distill

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def _rayjob() -> dict:
    return yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())


def test_rayjob_manifest_has_the_rayjob_shape():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and "rayStartParams" in cluster["headGroupSpec"]
    workers = cluster["workerGroupSpecs"]
    gpu_groups = [group for group in workers
                  if any("nvidia.com/gpu" in (c.get("resources") or {}).get("limits", {})
                         for c in group["template"]["spec"]["containers"])]
    assert gpu_groups and all(group["replicas"] >= 1 and group["groupName"] for group in gpu_groups)


def test_rayjob_entrypoint_is_one_our_cli_accepts(monkeypatch):
    argv = shlex.split(_rayjob()["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "styledistill.jobs.distill"]
    args = argv[3:]
    config, out = args[0], args[args.index("--out") + 1]
    assert config.startswith("s3://") and config.endswith(".yaml") and out.startswith("s3://")
    # The entrypoint as the job runs it: the config URL read (here: cluster.yaml's bytes), then the run
    # command of our typer app parses the rest and loads the config, down to the call of the run itself.
    cluster_yaml = (ROOT / "styledistill" / "configs" / "cluster.yaml").read_bytes()
    monkeypatch.setattr(distill.uris, "read_bytes", lambda uri: cluster_yaml if uri == config else None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    seen = {}
    monkeypatch.setattr("styledistill.cli._run", lambda cfg, ray_address, inline: seen.update(
        config=cfg, ray=ray_address, inline=inline))
    with pytest.raises(SystemExit) as done:
        distill.main(args)
    assert done.value.code == 0
    assert seen["config"].output.uri == out and seen["ray"] == "auto" and not seen["inline"]
    assert seen["config"].generator.backend == "telestyle"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_slurm_script_passes_shellcheck():
    done = subprocess.run(["shellcheck", str(DEPLOY / "slurm.sbatch")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_slurm_script_starts_runs_and_stops_ray():
    script = (DEPLOY / "slurm.sbatch").read_text()
    assert script.startswith("#!/usr/bin/env bash") and "#SBATCH --gpus-per-node" in script
    assert "ray start --head" in script and "ray stop" in script and "trap stop_ray EXIT" in script
    assert "python -m styledistill.jobs.distill" in script


def test_config_from_a_url(tmp_path):
    source = tmp_path / "bucket" / "v2.yaml"
    source.parent.mkdir()
    source.write_text("name: x\n")
    local = distill.resolve_config(f"file://{source}")
    assert Path(local).read_text() == "name: x\n" and Path(local).name == "v2.yaml"
    with pytest.raises(distill.ConfigNotFound, match="config file not found: file://"):
        distill.resolve_config(f"file://{tmp_path}/nowhere.yaml")


def test_config_inside_the_package_is_found_without_the_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as a job whose working dir has no styledistill/ folder
    local = distill.resolve_config("styledistill/configs/cluster.yaml")
    assert Path(local).is_file() and Path(local).name == "cluster.yaml"


def test_missing_config_names_the_git_ignored_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(distill.ConfigNotFound) as info:
        distill.main(["runs/demo.yaml", "--out", "runs/demo"])
    message = str(info.value)
    assert "config file not found: runs/demo.yaml" in message and "git does not ignore" in message
