"""The command line, in process (typer's CliRunner): help, config errors, plan, one small inline run, report."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from styledistill.cli import app
from styledistill.pipeline.planner import Planner
from styledistill.pipeline.run import split_pools
from styledistill.pipeline.scan import scan_sources
from styledistill.schemas.config import load_config

from conftest import DEMO_CONFIG

runner = CliRunner()


def on_sample(sample_data: Path, *extra: str) -> list[str]:
    return ["--set", f"sources.0.uri={sample_data / 'realistic'}",
            "--set", f"sources.1.uri={sample_data / 'stylized'}", *extra]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    listed = set(re.findall(r"^\W*([a-z][a-z-]+)\s{2,}\S", result.output, flags=re.MULTILINE))
    assert {"run", "plan", "report", "sample-data", "demo", "benchmark", "train"} <= listed, result.output


def test_no_arguments_shows_help():
    result = runner.invoke(app, [])
    assert "Usage" in result.output and "plan" in result.output


def _bad_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("sources: [{uri: photos, label: realistic}]\n" + text)
    return path


def test_run_with_an_invalid_config_exits_2_with_one_line(tmp_path):
    result = runner.invoke(app, ["run", str(_bad_config(tmp_path, "bogus: 1\n")), "--inline"])
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    assert result.output == "error: config field bogus: Extra inputs are not permitted\n"
    assert result.stdout == ""  # nothing on stdout: it carries only the run folder
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,message", [
    (["run", "missing.yaml"], "error: config file not found: missing.yaml"),
    (["run", "{config}", "--set", "plan.seed"], "error: override 'plan.seed': expected KEY=VALUE, e.g. plan.seed=3"),
    (["plan", "{config}", "--set", "plan.recipes={rns: -1}"], "error: config field plan.recipes: Value error, "),
    # Backend options are checked before any work: no scan, no run folder.
    (["run", "{config}", "--set", "generator={backend: magenta, options: {strength: 7}}"],
     "error: generator magenta option strength: Input should be less than or equal to 1"),
    # A rule on a score no configured scorer writes fails before the GPU hours, listing what exists.
    (["plan", "{config}", "--set", "scorers=[{backend: noop}, {backend: effnet}]",
      "--set", "filters.rules=[{score: clip.content_cos, min: 0.5}]"],
     "error: filters.rules.0 reads score 'clip.content_cos', which no configured scorer writes; scores: "
     "effnet.content_cos, effnet.leakage, noop.pixel_diff\n"),
    (["plan", "{config}", "--set", "scorers=[{backend: clipp}]"], "error: unknown scorer backend 'clipp'; known:"),
])
def test_other_user_errors_exit_2_without_traceback(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    config = str(_bad_config(tmp_path, ""))
    result = runner.invoke(app, [a.replace("{config}", config) for a in args])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.output.startswith(message), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text,field", [
    ("plan: {styles_per_photo: 1}\n", "plan.styles_per_photo: Input should be greater than or equal to 2"),
    ("plan: {recipes: {xyz: 1}}\n", "plan.recipes.xyz.[key]: "),
])
def test_long_or_bracketed_errors_stay_one_intact_line(tmp_path, text, field):
    result = runner.invoke(app, ["run", str(_bad_config(tmp_path, text))])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith(f"error: config field {field}"), \
        result.output


def test_plan_prints_the_recipe_counts_and_writes_only_the_scan(sample_data, tmp_path):
    out = tmp_path / "planned"
    result = runner.invoke(app, ["plan", str(DEMO_CONFIG), *on_sample(sample_data), "--out", str(out),
                                 "--show", "3"])
    assert result.exit_code == 0, result.output
    assert files_under(out) == {"run.json", "sources.parquet"}

    cfg = load_config(DEMO_CONFIG, [*on_sample(sample_data)[1::2], f"output.uri={out}"])
    planner = Planner(cfg, *split_pools(scan_sources(cfg, str(out))))
    groups = list(planner.groups())
    recipes = Counter(t.recipe for g in groups for t in g.triplets)
    assert len(recipes) >= 3 and len(groups) == planner.photo_count() >= 8
    expected = (f"photos {len(groups)}, generations {sum(len(g.generations) for g in groups)}, "
                f"shards {groups[-1].shard + 1}, triplets {sum(recipes.values())}: "
                + ", ".join(f"{r} {n}" for r, n in sorted(recipes.items())))
    assert expected in " ".join(result.output.split()), result.output
    shown = re.findall(r"\b(rns|sns|snr|rnr)_[0-9a-f]", result.output)
    assert len(shown) == 3
    assert files_under(out) == {"run.json", "sources.parquet"}


@pytest.fixture(scope="module")
def inline_run(sample_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = runner.invoke(app, ["run", str(DEMO_CONFIG), *on_sample(sample_data), "--set", "plan.max_photos=2",
                                 "--out", str(out), "--inline"])
    return out, result


def test_run_inline_on_two_photos_prints_the_run_folder(inline_run):
    out, result = inline_run
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)  # stdout is exactly the run folder, for scripts
    assert f"run folder: {out}" in result.output
    counts = re.search(r"(\d+) shards \(0 already done\): accepted (\d+), rejected (\d+), failed (\d+)",
                       result.output)
    assert counts, result.output
    shards, accepted, rejected, failed = map(int, counts.groups())
    assert shards >= 1 and accepted + rejected + failed == 2 * 4
    assert {"run.json", "sources.parquet", "summary.json", "report.html", "wids-index.json",
            "shards/sizes.json"} <= files_under(out)
    assert len(list((out / "shards").glob("*_stats.json"))) == shards


def test_report_regenerates_the_html(inline_run):
    out, result = inline_run
    assert result.exit_code == 0, result.output
    html, summary = out / "report.html", out / "summary.json"
    original = html.read_text()
    html.unlink()
    summary.unlink()
    report = runner.invoke(app, ["report", str(out)])
    assert report.exit_code == 0, report.output
    assert report.stdout.strip() == str(html)
    assert html.read_text() == original  # the same run folder gives the same page
    assert summary.exists()
    assert "<html" in original.lower()


def test_train_config_errors_are_one_line(tmp_path):
    from importlib import resources

    config = str(resources.files("styledistill") / "configs" / "train_sft.yaml")
    result = runner.invoke(app, ["train", "sft", config, "--set", "max_steps=["])
    assert result.exit_code == 2
    assert result.output.startswith("error: override 'max_steps=[': the value is not valid YAML"), result.output
    assert "Traceback" not in result.output
