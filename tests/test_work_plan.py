"""Resuming costs only the work left (the plan is compared with the finished shards before Ray or any actor
starts), and metrics.json keeps every attempt, so the report shows the run's whole history."""

from __future__ import annotations

import json
import time

import pytest

from conftest import demo_config
from styledistill.pipeline import run as run_module
from styledistill.pipeline.run import run_pipeline
from styledistill.pipeline.workplan import survey
from styledistill.report.summary import build_summary
from styledistill.schemas import manifest as mf
from styledistill.schemas.metrics import append_attempt, attempts_of, read_metrics, whole_run
from styledistill.schemas.records import Group


def _groups(shards: list[int]) -> list[Group]:
    return [Group(f"g{i}", shard, {}, (), (), 0) for i, shard in enumerate(shards)]


def test_survey_finds_the_shards_left_and_their_batches():
    groups = _groups([0, 0, 0, 1, 1, 1, 1, 1, 2])
    work = survey(groups, done=[0, 2], groups_per_batch=2)
    assert (work.shards, work.pending, work.groups, work.batches) == (3, (1,), 5, 3)
    assert survey(groups, done=[0, 1, 2], groups_per_batch=2).nothing_to_do
    assert survey([], done=[], groups_per_batch=2).shards == 0


def test_sized_config_starts_no_more_actors_than_the_work_left(sample_data, tmp_path):
    config = demo_config(sample_data, tmp_path / "run", "stages.generate.concurrency=4",
                         "stages.score.concurrency=3", "stages.write.concurrency=2", "stages.encode.concurrency=1")
    work = survey(_groups([0, 0, 0, 1]), done=[1], groups_per_batch=1)  # shard 0 left: 3 batches
    sized = work.sized(config)
    assert sized.stages.generate.concurrency == 3 and sized.stages.score.concurrency == 3
    assert sized.stages.encode.concurrency == 1 and sized.stages.write.concurrency == 1
    assert config.stages.generate.concurrency == 4  # the config itself is untouched
    assert sized.content_hash() == config.content_hash()  # same run folder


def test_metrics_keep_every_attempt(tmp_path):
    run = str(tmp_path)
    old = {"wall_s": 10.0, "samples": 8, "shards_written": 2, "samples_per_s": 0.8,
           "stages": {"generate": {"groups": 2, "samples": 8, "busy_s": 10.0, "actors": 2}}}
    (tmp_path / mf.METRICS_FILE).write_text(json.dumps(old))  # a file from before the history was kept
    append_attempt(run, {"wall_s": 30.0, "samples": 24, "shards_written": 3, "shards_skipped": 2,
                         "stages": {"generate": {"groups": 6, "samples": 24, "busy_s": 30.0, "actors": 1}}})
    metrics = append_attempt(run, {"wall_s": 0.0, "samples": 0, "shards_written": 0, "shards_skipped": 5,
                                   "stages": {}})
    assert metrics == read_metrics(run) and len(attempts_of(metrics)) == 3
    generate = metrics["stages"]["generate"]
    assert (generate["busy_s"], generate["samples"], generate["actors"], generate["actor_s"]) == (40.0, 32, 2, 50.0)
    assert metrics["wall_s"] == 40.0 and metrics["samples_per_s"] == 32 / 40
    assert whole_run(attempts_of(metrics)) == metrics


def test_run_prints_each_stage_utilisation(tmp_path, capsys):
    from styledistill.cli import _print_utilisation

    append_attempt(str(tmp_path), {"wall_s": 10.0, "samples": 8, "stages": {
        "score": {"busy_s": 5.0, "actors": 1}, "generate": {"busy_s": 18.0, "actors": 2}}})
    _print_utilisation(str(tmp_path))
    assert "generate 2x 90%, score 1x 50%" in capsys.readouterr().err


def _rerun_without_ray(monkeypatch):
    """Any attempt to start Ray or an executor fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("Ray or an actor started for a run with nothing left to do")
    monkeypatch.setattr(run_module, "start_ray", refuse)
    monkeypatch.setattr(run_module, "RayExecutor", refuse)
    monkeypatch.setattr(run_module, "build_stages", refuse)


@pytest.mark.slow
def test_rerun_of_a_finished_run_starts_nothing_and_keeps_its_history(sample_data, tmp_path, monkeypatch):
    config = demo_config(sample_data, tmp_path / "run")
    first = run_pipeline(config, inline=True)
    run = tmp_path / "run"
    shards = sorted(p.name for p in (run / mf.SHARDS_DIR).iterdir())
    for name in (mf.SUMMARY_FILE, mf.REPORT_FILE, mf.WIDS_INDEX_FILE):
        (run / name).unlink()

    _rerun_without_ray(monkeypatch)
    start = time.perf_counter()
    again = run_pipeline(config)  # on Ray, were there anything to do
    assert time.perf_counter() - start < 10
    assert again.written == [] and again.skipped_shards == first.shards == again.shards
    assert again.counts == first.counts
    assert sorted(p.name for p in (run / mf.SHARDS_DIR).iterdir()) == shards
    # The folder is complete again: indexes, metrics, report.
    assert all((run / name).exists() for name in (mf.SUMMARY_FILE, mf.REPORT_FILE, mf.WIDS_INDEX_FILE))

    summary = build_summary(str(run))
    attempts = summary["throughput"]["attempts"]
    assert [(a["shards_written"], a["shards_skipped"]) for a in attempts] == [(first.shards, 0), (0, first.shards)]
    generate = {row["stage"]: row for row in summary["stages"]}["generate"]
    assert generate["actors"] == 1 and generate["busy_s"] > 0 and generate["utilisation"] > 0
    html = (run / mf.REPORT_FILE).read_text()
    assert "nothing left to do" in html and "its history" in html


@pytest.mark.slow
def test_resume_with_one_shard_left_redoes_only_that_shard(sample_data, tmp_path):
    config = demo_config(sample_data, tmp_path / "run")
    first = run_pipeline(config, inline=True, report=False)
    run = tmp_path / "run"
    last = first.shards - 1
    (run / mf.SHARDS_DIR / mf.stats_name(mf.shard_name(config.output.shard_prefix, last))).unlink()
    again = run_pipeline(config, inline=True)
    assert [r.shard for r in again.written] == [last] and again.counts == first.counts
    attempts = build_summary(str(run))["throughput"]["attempts"]
    assert [a["shards_written"] for a in attempts] == [first.shards, 1]
