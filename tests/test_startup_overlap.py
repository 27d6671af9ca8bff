"""A fresh run on Ray overlaps its start-up: the stage actors are launched before the scan and load their
models while the scan's decode tasks run; the plan then fits them to the work (no more actors than batches)."""

from __future__ import annotations

import contextlib
import time

import pytest

from conftest import DEMO_CONFIG, SMALL, demo_config, model_libraries_after, wait_for
from styledistill.pipeline import run as run_module
from styledistill.pipeline.executor import RayExecutor, StageStartError
from styledistill.pipeline.run import run_pipeline
from styledistill.schemas.metrics import read_metrics
from styledistill.schemas.stages import active_stages


def _stage_actors(ray) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("styledistill-")]


def _all_cpus_free(ray) -> None:
    """Wait until an earlier test's killed actors have handed back their CPUs (the launch decision reads them)."""
    with contextlib.suppress(TimeoutError):  # the launch rule itself is what the test then checks
        wait_for(lambda: ray.available_resources().get("CPU", 0) >= ray.cluster_resources()["CPU"], timeout=15)


def _actors_left_after(ray, seconds: float = 15.0) -> list[str]:
    """The run's actors still alive once a kill has had `seconds` to land (ray.kill is asynchronous)."""
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not _stage_actors(ray), timeout=seconds)
    return _stage_actors(ray)


@pytest.fixture
def actors_at_scan(local_ray, monkeypatch) -> list[str]:
    """The names of the run's actors alive when the scan begins (filled in by the run)."""
    seen: list[str] = []
    real_scan = run_module.scan_sources

    def scan(*args, **kwargs):
        seen.extend(_stage_actors(local_ray))
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(run_module, "scan_sources", scan)
    _all_cpus_free(local_ray)
    return seen


@pytest.fixture
def executors(monkeypatch) -> list:
    """The run's Ray executors, held here: only an explicit stop (not their handles going away) ends the actors."""
    held = []

    class Held(run_module.RayExecutor):
        def __init__(self, *args):
            super().__init__(*args)
            held.append(self)

    monkeypatch.setattr(run_module, "RayExecutor", Held)
    return held


@pytest.mark.slow
def test_a_fresh_run_launches_its_stage_actors_before_the_scan(local_ray, actors_at_scan, executors, sample_data,
                                                               tmp_path):
    # 2 photos, batches of 2 groups: one batch per shard of 6 samples, 2 batches; 3 score actors asked for.
    config = demo_config(sample_data, tmp_path / "run", "plan.max_photos=2", "stages.score.concurrency=3",
                         "stages.score.num_cpus=0.25")
    outcome = run_pipeline(config, report=False)

    launched = {name.split("-")[1] for name in actors_at_scan}
    assert launched == {spec.name for spec in active_stages(config)}
    assert sum(name.startswith("styledistill-score-") for name in actors_at_scan) == 3
    assert sum(outcome.counts.values()) == 8
    # The plan had 2 batches: the third score actor was killed before it got one.
    assert read_metrics(str(tmp_path / "run"))["stages"]["score"]["actors"] == 2
    assert len(executors) == 1 and _actors_left_after(local_ray) == []  # stopped (and the writers) at the end


@pytest.mark.slow
def test_a_scan_that_fails_stops_the_launched_actors(local_ray, actors_at_scan, executors, sample_data, tmp_path):
    config = demo_config(sample_data, tmp_path / "run", f"sources.0.uri={tmp_path / 'no-such-folder'}")
    with pytest.raises(Exception, match="no-such-folder"):
        run_pipeline(config, report=False)
    assert actors_at_scan and len(executors) == 1  # they were up when the scan began
    assert _actors_left_after(local_ray) == []


@pytest.mark.slow
def test_each_stage_takes_batches_once_its_own_actors_are_up(local_ray, executors, sample_data, tmp_path,
                                                             monkeypatch):
    """The load stage finishes batches while the generator still loads its model; the writer starts, and the
    throughput clock runs, once every stage is up."""
    monkeypatch.setattr(run_module, "_room_to_scan_beside", lambda config: False)  # actors start after the scan
    finished: dict[str, float] = {}  # stage -> seconds into the run when its first batch came back
    real_stage_done = RayExecutor._stage_done

    def stage_done(self, ref, call, state, queues):
        finished.setdefault(self.stages[call.stage].name, time.monotonic() - self._t0)
        return real_stage_done(self, ref, call, state, queues)

    monkeypatch.setattr(RayExecutor, "_stage_done", stage_done)
    config = demo_config(sample_data, tmp_path / "run", *SMALL, "generator.backend=benchmark_sleep",
                         "generator.options={latency_s: 0, setup_s: 4}", "scorers=[{backend: noop}]",
                         "filters.rules=[]", "filters.generation_rules=[]")
    outcome = run_pipeline(config, report=False)

    up = {name: stats["up_s"] for name, stats in outcome.actors.items()}
    assert up["generate"] >= 4 and finished["load"] < up["generate"], (finished, up)
    assert finished["generate"] > up["generate"]
    assert executors[0].startup_s == max(up.values())
    assert outcome.counts["failed"] == 0 and sum(outcome.counts.values()) == 24
    assert read_metrics(str(tmp_path / "run"))["attempts"][0]["stages"]["generate"]["up_s"] == up["generate"]


@pytest.mark.slow
@pytest.mark.timeout(180)  # a start failure that went unnoticed would leave the run waiting for its actor
def test_a_stage_whose_actors_cannot_start_stops_the_run_naming_it(local_ray, executors, sample_data, tmp_path):
    missing = tmp_path / "no-dino-here"
    config = demo_config(sample_data, tmp_path / "run", *SMALL, "filters.rules=[]", "filters.generation_rules=[]",
                         f"scorers=[{{backend: dino, options: {{model: '{missing}'}}}}]")
    with pytest.raises(StageStartError, match=f"stage 'score' could not start: .*{missing}"):
        run_pipeline(config, report=False)
    assert not list((tmp_path / "run").glob("shards/*.tar"))
    assert len(executors) == 1 and _actors_left_after(local_ray) == []


def _cluster(monkeypatch, free_cpus: float, nodes_with_cpus: int) -> None:
    monkeypatch.setattr(run_module.ray, "available_resources", lambda: {"CPU": free_cpus})
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 8.0}} for _ in range(nodes_with_cpus)]
    nodes += [{"Alive": True, "Resources": {"GPU": 1.0}}, {"Alive": False, "Resources": {"CPU": 8.0}}]
    monkeypatch.setattr(run_module.ray, "nodes", lambda: nodes)


def test_actors_wait_for_the_scan_when_they_could_leave_it_no_cpu(sample_data, tmp_path, monkeypatch):
    # The demo's actors hold 0.25 + 1 + 1 + 0.25 CPUs, and its writer 0.25: 2.75 in all.
    demo = demo_config(sample_data, tmp_path / "a")
    _cluster(monkeypatch, free_cpus=4.0, nodes_with_cpus=1)
    assert run_module._room_to_scan_beside(demo)  # 1.25 left on the one node
    assert not run_module._room_to_scan_beside(demo_config(sample_data, tmp_path / "b", "stages.score.num_cpus=1.5"))
    # 1.25 CPUs left over two nodes could be 0.625 on each: no decode task would ever be placed.
    _cluster(monkeypatch, free_cpus=4.0, nodes_with_cpus=2)
    assert not run_module._room_to_scan_beside(demo)
    _cluster(monkeypatch, free_cpus=4.75, nodes_with_cpus=2)  # 2 left over two nodes: one has a whole CPU
    assert run_module._room_to_scan_beside(demo)


@pytest.mark.parametrize("config", ["demo.yaml", "cluster.yaml"])
def test_driver_checks_backends_without_model_libraries(config):
    """The driver checks the backends' options while Ray starts and then only dispatches: neither that nor the
    pipeline it drives imports a model library. For the cluster config (TeleStyle, CLIP, CSD, DINO, the VLM
    judge and enhancer) that was 11 s of CPU and ~900 MB on the head node."""
    assert model_libraries_after(
        "from pathlib import Path\n"
        "from styledistill.backends import check_backends\n"
        "import styledistill.pipeline.run\n"
        "from styledistill.schemas.config import load_config\n"
        f"check_backends(load_config(Path({str(DEMO_CONFIG.with_name(config))!r}), []))"
    ) == []
