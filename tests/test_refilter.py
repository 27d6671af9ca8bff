"""`refilter` re-decides a finished run from its stored scores: the same bytes as a full run with the new
filters, loosening included when the run kept its rejects; tightening only when it did not."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import demo_config
from styledistill.cli import app
from styledistill.pipeline.refilter import REFILTER_FILE, refilter_run, refiltered_config
from styledistill.pipeline.run import run_pipeline
from styledistill.schemas import manifest as mf
from styledistill.schemas.config import ConfigError

pytestmark = pytest.mark.slow

def _change(source: Path) -> list[str]:
    """Loosen one rule (edges.ssim: promotes the samples only it rejected) and tighten another (noop.pixel_diff,
    to just above the lowest value among the accepted samples it applies to: rejects at least that one), so
    both directions move whatever the models' exact scores on this machine."""
    rows = pd.concat(pd.read_parquet(p) for p in sorted((source / mf.SHARDS_DIR).glob("*.parquet")))
    applies = rows[(rows.status == mf.ACCEPTED) & rows.recipe.isin(["rns", "sns"])]
    cut = math.floor(applies["score.noop.pixel_diff"].min() * 1e4 + 1) / 1e4
    return ["filters.rules.1.min=-1", f"filters.rules.3.min={cut}"]


def _outputs(run: Path) -> dict[str, bytes]:
    """Everything a consumer reads: tars, rejects, manifests, stats-free indexes."""
    files = sorted(run.glob("shards/*.tar")) + sorted(run.glob("rejects/*.tar")) + sorted(run.glob("shards/*.parquet"))
    files += [run / mf.SHARDS_DIR / mf.SIZES_FILE, run / mf.WIDS_INDEX_FILE]
    return {str(f.relative_to(run)): f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def runs(sample_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("refilter")
    source = demo_config(sample_data, root / "source", "output.write_rejects=true")
    run_pipeline(source, inline=True, report=False)
    changed = demo_config(sample_data, root / "full", "output.write_rejects=true", *_change(root / "source"))
    run_pipeline(changed, inline=True, report=False)
    return root


def test_refilter_gives_the_bytes_of_a_full_run_with_the_new_filters(runs, sample_data):
    source = demo_config(sample_data, runs / "source", "output.write_rejects=true")
    config = refiltered_config(source, str(runs / "refiltered"), None, _change(runs / "source"))
    outcome = refilter_run(str(runs / "source"), config)
    full, refiltered = _outputs(runs / "full"), _outputs(runs / "refiltered")
    assert full.keys() == refiltered.keys() and len(full) > 6
    assert [name for name in full if full[name] != refiltered[name]] == []
    # The change did something both ways, and the diff says so per rule.
    moved = {(a, b) for (_, a, b), n in outcome.transitions.items() if a != b}
    assert moved == {("rejected", "accepted"), ("accepted", "rejected")}, outcome.transitions
    assert outcome.by_rule["noop.pixel_diff <"]["now_rejects"] > 0
    assert outcome.by_rule["edges.ssim <"]["no_longer_rejects"] > 0
    saved = json.loads((runs / "refiltered" / REFILTER_FILE).read_text())
    assert saved["filters_after"]["rules"][1]["min"] == -1 and saved["not_promoted"] == []
    # A second call on the finished folder resumes: no shard is rewritten (the indexes are, from the stats).
    shard_files = sorted(p for p in (runs / "refiltered" / "shards").iterdir() if p.name != mf.SIZES_FILE)
    before = [p.stat().st_mtime_ns for p in shard_files]
    refilter_run(str(runs / "source"), config)
    assert [p.stat().st_mtime_ns for p in shard_files] == before


def test_without_kept_rejects_refilter_can_only_tighten_and_names_what_it_cannot_promote(runs, sample_data, tmp_path):
    source = demo_config(sample_data, tmp_path / "source", "output.write_rejects=false")
    run_pipeline(source, inline=True, report=False)
    change = _change(runs / "source")  # the same plan and scores as this run's
    outcome = refilter_run(str(tmp_path / "source"), refiltered_config(source, str(tmp_path / "new"), None, change))
    assert outcome.not_promoted
    rows = json.loads((tmp_path / "new" / REFILTER_FILE).read_text())["not_promoted"]
    assert rows == outcome.not_promoted
    manifests = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "new" / mf.SHARDS_DIR).glob("*.parquet")))
    stuck = manifests.set_index("key").loc[outcome.not_promoted]
    assert (stuck.status == mf.REJECTED).all()
    assert all(any(d["kind"] == "not_kept" for d in details) for details in stuck.reason_details)


def test_refilter_changes_filters_only(sample_data, tmp_path):
    source = demo_config(sample_data, tmp_path / "source")
    with pytest.raises(ConfigError, match="refilter changes filters only"):
        refiltered_config(source, str(tmp_path / "x"), None, ["plan.seed=4"])


def test_cli_refilter_prints_the_diff_and_writes_the_report(runs, tmp_path):
    result = CliRunner().invoke(app, ["refilter", str(runs / "source"), "--out", str(tmp_path / "cli"),
                                      "--set", "filters.rules.1.min=-1"])
    assert result.exit_code == 0, result.output
    assert "status changes" in result.output and "edges.ssim <: now rejects 0, no longer rejects" in result.output
    assert (tmp_path / "cli" / mf.REPORT_FILE).exists()
    bad = CliRunner().invoke(app, ["refilter", str(runs / "source"), "--out", str(tmp_path / "bad"),
                                   "--set", "filters.rules.0.score=clip.content_cos"])
    assert bad.exit_code == 2 and "reads score 'clip.content_cos', which no configured scorer writes" in bad.output


def test_the_curation_loop_calibrate_then_refilter_with_the_suggested_file(runs, tmp_path):
    """Labels -> calibrate -> filters-suggested.yaml -> refilter --filters: the file is taken as it is."""
    manifests = pd.concat(pd.read_parquet(p) for p in sorted((runs / "source" / mf.SHARDS_DIR).glob("*.parquet")))
    scored = manifests[manifests.status != mf.FAILED]
    labels = tmp_path / "labels.csv"
    labels.write_text("key,label\n" + "".join(
        f"{key},{'accept' if score > 0.55 else 'reject'}\n"
        for key, score in zip(scored.key, scored["score.effnet.content_cos"])))
    runner = CliRunner()
    calibrated = runner.invoke(app, ["calibrate", str(runs / "source"), "--labels", str(labels)])
    assert calibrated.exit_code == 0, calibrated.output
    suggested = calibrated.stdout.strip().splitlines()[-1]
    result = runner.invoke(app, ["refilter", str(runs / "source"), "--out", str(tmp_path / "v2"),
                                 "--filters", suggested])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "v2" / mf.SHARDS_DIR / mf.SIZES_FILE).exists()
