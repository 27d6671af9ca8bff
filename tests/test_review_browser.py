"""The report's review view in a real browser: headless Chromium (Debian's `chromium`; .ci/run installs it)
loads report.html of a small demo run, a reviewer marks every sample with the keyboard (and a few with the
mouse), downloads labels.csv, and `styledistill calibrate` reads it as it is."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from chromium_cdp import Chromium, chromium_path
from conftest import demo_config
from styledistill.cli import app
from styledistill.filters.calibrate import CALIBRATION_FILE, MIN_PER_CLASS, SUGGESTED_FILTERS_FILE
from styledistill.pipeline.run import run_pipeline
from styledistill.report import write_report
from styledistill.schemas.config import FilterConfig, read_yaml_mapping

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(chromium_path() is None, reason="chromium not installed (.ci/run installs it)")]
PER_CELL = 48  # the whole 12-photo demo run (at most 48 samples) fits in the review, however it is split


@pytest.fixture(scope="module")
def reviewed_run(sample_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("review") / "run"
    run_pipeline(demo_config(sample_data, out, "output.write_rejects=true", "plan.max_photos=12"), inline=True,
                 report=False)
    write_report(str(out), review_per_cell=PER_CELL)
    return out


def _manifest(run: Path) -> pd.DataFrame:
    return pd.concat(map(pd.read_parquet, sorted((run / "shards").glob("*.parquet"))))


def test_review_label_download_calibrate(reviewed_run, tmp_path):
    run = reviewed_run
    html = (run / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # self-contained: nothing fetched
    manifest = _manifest(run).set_index("key")
    # The reviewer's truth for this test: content kept (the triplet's own effnet content similarity).
    cos = manifest["score.effnet.content_cos"]
    cut = float(cos[manifest.status != "failed"].median())
    truth = {key: "accept" if value > cut else "reject" for key, value in cos.items()}

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with Chromium(tmp_path / "profile", downloads) as browser:
        browser.open((run / "report.html").as_uri())
        keys = browser.evaluate("Array.from(document.querySelectorAll('.rv')).map(c => c.dataset.key)")
        shown = manifest.loc[keys]
        assert len(keys) == len(set(keys)) == (manifest.status != "failed").sum()  # every scored sample
        assert set(shown.status) == {"accepted", "rejected"}
        sizes = browser.evaluate("Array.from(document.querySelectorAll('.rv img')).map(i => i.naturalHeight)")
        assert len(sizes) == 3 * len(keys) and min(sizes) >= 200  # judgeable, not 96 px thumbnails

        # A wrong mark with the mouse on the third triplet, then the keyboard from the start: j/k move,
        # a/r mark and step on, u clears.
        browser.click(f"#rv-2 .mark-{'reject' if truth[keys[2]] == 'accept' else 'accept'}")
        for key in ("k", "k", "k", "k", "j", "ArrowLeft"):  # the mark moved on to the 4th; back to the 1st
            browser.press(key)
        for key in keys[:-1]:
            browser.press("a" if truth[key] == "accept" else "r")
        browser.press("u")  # the cursor is on the last one: nothing to clear yet
        browser.click(f"#rv-{len(keys) - 1} .mark-{truth[keys[-1]]}")  # the last one with the mouse
        assert browser.evaluate("document.getElementById('review-count').textContent").startswith(
            f"{len(keys)} of {len(keys)} marked")

        browser.click("#download-labels")
        path = browser.wait_download("labels.csv")

    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert {r["key"]: r["label"] for r in rows} == {k: truth[k] for k in keys}
    assert {r["key"]: r["status"] for r in rows} == dict(shown.status)

    result = CliRunner().invoke(app, ["calibrate", str(run), "--labels", str(path), "--review", str(PER_CELL)])
    assert result.exit_code == 0, result.output
    calibration = json.loads((run / CALIBRATION_FILE).read_text())
    used = calibration["labels"]["used"]
    assert used["accept"] >= MIN_PER_CLASS and used["reject"] >= MIN_PER_CLASS
    content = calibration["scores"]["score.effnet.content_cos"]
    assert content["auc"] == 1.0 and content["direction"] == "higher is better"
    assert content["best_f1"]["f1"] == 1.0 and content["at_precision"]["threshold"] == pytest.approx(cut, abs=0.05)
    fitted = calibration["suggestion"]["rules"][0]
    assert fitted["column"] == "score.effnet.content_cos" and fitted["rule"]["min"] > 0.4  # tightened to the truth
    FilterConfig.model_validate(read_yaml_mapping(run / SUGGESTED_FILTERS_FILE))
    report = (run / "report.html").read_text()
    assert 'id="calibration"' in report and report.count('pr-card" data-column') >= 9 and "No calibration yet" not in report
