"""A fresh run on Ray overlaps its start-up: the stage actors are launched before the scan and load their
models while the scan's decode tasks run; the plan then fits them to the work (no more actors than batches)."""

from __future__ import annotations

import time

import pytest

from conftest import demo_config
from styledistill.pipeline import run as run_module
from styledistill.pipeline.run import run_pipeline
from styledistill.schemas.metrics import read_metrics
from styledistill.schemas.stages import active_stages


def _stage_actors(ray) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("styledistill-")]


def _all_cpus_free(ray, seconds: float = 15.0) -> None:
    """Wait until an earlier test's killed actors have handed back their CPUs (the launch decision reads them)."""
    deadline = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.2)


def _actors_left_after(ray, seconds: float = 15.0) -> list[str]:
    """The run's actors still alive once a kill has had `seconds` to land (ray.kill is asynchronous)."""
    deadline = time.monotonic() + seconds
    while (left := _stage_actors(ray)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.slow
def test_a_fresh_run_launches_its_stage_actors_before_the_scan(local_ray, sample_data, tmp_path, monkeypatch):
    seen_at_scan = []
    real_scan = run_module.scan_sources

    def scan(*args, **kwargs):
        seen_at_scan.extend(_stage_actors(local_ray))
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(run_module, "scan_sources", scan)
    _all_cpus_free(local_ray)
    # 2 photos, batches of 2 groups: one batch per shard of 6 samples, 2 batches; 3 score actors asked for.
    config = demo_config(sample_data, tmp_path / "run", "plan.max_photos=2", "stages.score.concurrency=3",
                         "stages.score.num_cpus=0.25")
    outcome = run_pipeline(config, report=False)

    launched = {name.split("-")[1] for name in seen_at_scan}
    assert launched == {spec.name for spec in active_stages(config)}
    assert sum(name.startswith("styledistill-score-") for name in seen_at_scan) == 3
    assert sum(outcome.counts.values()) == 8
    # The plan had 2 batches: the third score actor was killed before it got one.
    assert read_metrics(str(tmp_path / "run"))["stages"]["score"]["actors"] == 2
    assert _actors_left_after(local_ray) == []  # the run stops its actors (and the writers) when it ends


@pytest.mark.slow
def test_a_scan_that_fails_stops_the_launched_actors(local_ray, sample_data, tmp_path, monkeypatch):
    launched = []
    real_scan = run_module.scan_sources

    def scan(*args, **kwargs):
        launched.extend(_stage_actors(local_ray))
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(run_module, "scan_sources", scan)
    _all_cpus_free(local_ray)
    config = demo_config(sample_data, tmp_path / "run", f"sources.0.uri={tmp_path / 'no-such-folder'}")
    with pytest.raises(Exception, match="no-such-folder"):
        run_pipeline(config, report=False)
    assert launched  # they were up when the scan began
    assert _actors_left_after(local_ray) == []


def test_actors_wait_for_the_scan_when_they_would_leave_it_no_cpu(sample_data, tmp_path, monkeypatch):
    monkeypatch.setattr(run_module.ray, "available_resources", lambda: {"CPU": 4.0})
    # The demo's actors hold 0.25 + 1 + 1 + 0.25 CPUs, and its writer 0.25: 1.25 of 4 left for the scan.
    assert run_module._room_to_scan_beside(demo_config(sample_data, tmp_path / "a"))
    assert not run_module._room_to_scan_beside(demo_config(sample_data, tmp_path / "b", "stages.score.num_cpus=1.5"))
