"""The quality report over a synthetic run folder: counts, reason grouping, histograms, HTML content."""

from __future__ import annotations

import base64
import io
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from styledistill.report import write_report
from styledistill.report.html import render_report
from styledistill.report.summary import build_summary, error_kind, reason_group, rule_thresholds
from styledistill.schemas.config import FilterConfig, OutputConfig, Rule, RunConfig, SourcePool
from styledistill.filters.decide import BAND, DUPLICATE, FAILURE, MISSING, Reason
from styledistill.schemas.manifest import MANIFEST_COLUMNS, shard_name, stats_name

PREFIX = "sd"
EFFNET = "score.effnet.content_cos"
PIXEL = "score.noop.pixel_diff"
SCORES = (EFFNET, PIXEL)


def _low(score: str, threshold: float, value: float, parent: str | None = None) -> Reason:
    text = f"{score} < {threshold:g}"
    return Reason(BAND, f"parent {parent}: {text}" if parent else text, "rules.0", score, "min", threshold, value,
                  inherited_from=parent)


def _row(key, recipe, status, reasons=(), error=None, **scores):
    by_column = {EFFNET: scores.get("effnet"), PIXEL: scores.get("pixel")}
    reasons = [Reason(FAILURE, error)] if error else list(reasons)
    return {"key": key, "recipe": recipe, "status": status, "reasons": [r.text for r in reasons],
            "reason_details": [r.as_row() for r in reasons], "error": error, **by_column}


SHARD_ROWS = [
    [
        _row("k0", "rns", "accepted", effnet=0.8, pixel=0.10),
        _row("k1", "rns", "rejected", [_low("effnet.content_cos", 0.5, 0.4)], effnet=0.4, pixel=0.10),
        _row("k2", "sns", "rejected", [_low("effnet.content_cos", 0.3, 0.2), _low("noop.pixel_diff", 0.04, 0.01)],
             effnet=0.2, pixel=0.01),
        _row("k3", "sns", "rejected", [_low("noop.pixel_diff", 0.04, 0.02, parent="r0")], effnet=0.6, pixel=0.2),
        _row("k4", "snr", "failed", error="generate r1: CUDA out of memory at /tmp/x/gen.py:12"),
        _row("k5", "rnr", "accepted", effnet=0.9, pixel=0.3),
    ],
    [
        _row("k6", "rns", "rejected", [_low("noop.pixel_diff", 0.04, 0.01, parent="r1"),
                                        _low("effnet.content_cos", 0.5, 0.45)], effnet=0.45, pixel=0.05),
        _row("k7", "rnr", "rejected", [Reason(DUPLICATE, "duplicate of sd-000000-k5", duplicate_of="sd-000000-k5")],
             effnet=0.7, pixel=0.3),
        _row("k8", "snr", "failed", error="generate r0: CUDA out of memory at /tmp/a/gen.py:99"),
        _row("k9", "rns", "accepted", effnet=None, pixel=0.2),  # scorer skipped: missing
    ],
]
# A shard still being written: manifest, no stats. None of it may be counted.
INCOMPLETE_ROWS = [_row(f"x{i}", "rns", "accepted", effnet=0.99, pixel=0.9) for i in range(5)]


def _jpeg_b64(colour) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 8), colour).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def _write_manifest(path, rows, shard):
    columns = {name: [] for name in MANIFEST_COLUMNS.names}
    for i, row in enumerate(rows):
        for name in MANIFEST_COLUMNS.names:
            columns[name].append(row.get(name))
        columns["shard"][-1] = shard
        columns["group_id"][-1] = f"g{i // 2}"
        columns["seed"][-1] = i
    table = pa.Table.from_pydict(columns, schema=MANIFEST_COLUMNS)
    for column in SCORES:
        table = table.append_column(pa.field(column, pa.float64()), pa.array([r[column] for r in rows], pa.float64()))
    pq.write_table(table, path)


def _make_run(root):
    config = RunConfig(
        name="unit-run",
        sources=[SourcePool(uri="/data/photos", label="realistic")],
        filters=FilterConfig(
            generation_rules=[Rule(score="noop.pixel_diff", min=0.04)],
            rules=[
                Rule(score="effnet.content_cos", min=0.5, per_recipe={"sns": {"min": 0.3}}),
                Rule(score="noop.pixel_diff", min=0.04),
            ],
        ),
        output=OutputConfig(shard_prefix=PREFIX, thumbnails_in_report=4),
    )
    root.mkdir()
    run = {"config": config.model_dump(mode="json"), "config_hash": config.content_hash(),
           "versions": {"pyarrow": pa.__version__}, "started": "2025-01-01T00:00:00Z"}
    (root / "run.json").write_text(json.dumps(run))
    shards, thumbs = root / "shards", root / "thumbs"
    shards.mkdir()
    thumbs.mkdir()
    for index, rows in enumerate(SHARD_ROWS):
        name = shard_name(PREFIX, index)
        _write_manifest(shards / f"{name}.parquet", rows, index)
        counts = {s: sum(r["status"] == s for r in rows) for s in ("accepted", "rejected", "failed")}
        stats = {"shard": index, "name": name, "planned": len(rows), **counts, "tar_bytes": 1000 * (index + 1),
                 "stage_seconds": {"load": 1.0, "generate": 10.0, "score": 2.0, "write": 0.5},
                 "nodes": {"generate": [f"node{index}"], "score": ["node0"]}}
        (shards / stats_name(name)).write_text(json.dumps(stats))
    _write_manifest(shards / f"{shard_name(PREFIX, 2)}.parquet", INCOMPLETE_ROWS, 2)

    thumb = {
        "k0": {"recipe": "rns", "status": "accepted", "reasons": [], "jpeg_b64": _jpeg_b64((0, 200, 0))},
        "k1": {"recipe": "rns", "status": "rejected", "reasons": ["effnet.content_cos < 0.5"],
               "jpeg_b64": _jpeg_b64((200, 0, 0))},
        "k5": {"recipe": "rnr", "status": "accepted", "reasons": [], "jpeg_b64": "not base64 <script>"},
    }
    (thumbs / f"{shard_name(PREFIX, 0)}.json").write_text(json.dumps(thumb))
    incomplete_thumb = {"x0": {"recipe": "rns", "status": "accepted", "reasons": [],
                               "jpeg_b64": _jpeg_b64((0, 0, 200))}}
    (thumbs / f"{shard_name(PREFIX, 2)}.json").write_text(json.dumps(incomplete_thumb))

    sources = pa.table({
        "uri": ["/d/a.jpg", "/d/b.jpg", "/d/c.jpg", "/d/bad1.png", "/d/bad2.png", "/d/a2.jpg"],
        "pool": ["photos"] * 4 + ["art"] * 2,
        "label": ["realistic", "realistic", "stylized", None, None, "realistic"],
        "status": ["ok", "ok", "ok", "failed", "failed", "duplicate"],
        "error": [None, None, None, "cannot identify image file '/d/bad1.png'",
                  "cannot identify image file '/d/bad2.png'", None],
        "sha256": ["a", "b", "c", None, None, "a"],
        "width": [64, 64, 64, None, None, 64],
        "height": [64, 64, 64, None, None, 64],
        "phash": ["0", "1", "2", None, None, "0"],
        "duplicate_of": [None, None, None, None, None, "/d/a.jpg"],
    })
    pq.write_table(sources, root / "sources.parquet")
    metrics = {"wall_s": 20.0, "samples_per_s": 0.5,
               "stages": {"generate": {"groups": 5, "samples": 10, "busy_s": 20.0, "actors": 2}}}
    (root / "metrics.json").write_text(json.dumps(metrics))
    return str(root)


@pytest.fixture()
def run_dir(tmp_path):
    return _make_run(tmp_path / "run")


def test_counts_ignore_incomplete_shard(run_dir):
    summary = build_summary(run_dir)
    totals = summary["totals"]
    assert (totals["samples"], totals["accepted"], totals["rejected"], totals["failed"]) == (10, 3, 5, 2)
    assert totals["shards"] == 2
    assert totals["incomplete_shards"] == [shard_name(PREFIX, 2)]
    assert totals["inconsistent_shards"] == []
    assert totals["tar_bytes"] == 3000
    recipes = summary["recipes"]
    assert list(recipes) == ["rns", "sns", "snr", "rnr"]
    assert {k: recipes["rns"][k] for k in ("accepted", "rejected", "failed", "total")} == {
        "accepted": 2, "rejected": 2, "failed": 0, "total": 4}
    assert recipes["rns"]["acceptance_rate"] == 0.5
    assert recipes["snr"]["failed"] == 2 and recipes["snr"]["pass_rate"] is None
    assert recipes["rnr"]["acceptance_rate"] == 0.5
    assert [s["name"] for s in summary["shards"]] == [shard_name(PREFIX, 0), shard_name(PREFIX, 1)]
    assert summary["run"]["name"] == "unit-run" and len(summary["run"]["config_hash"]) == 16


def test_reasons_grouped_by_rule_and_parent(run_dir):
    reasons = {(r["rule"], r["inherited"]): r for r in build_summary(run_dir)["rejection_reasons"]}
    assert set(reasons) == {
        ("effnet.content_cos <", False), ("noop.pixel_diff <", True), ("noop.pixel_diff <", False), ("duplicate", False)}
    effnet = reasons[("effnet.content_cos <", False)]
    assert (effnet["count"], effnet["sole"], effnet["thresholds"]) == (3, 1, [0.3, 0.5])
    assert effnet["by_recipe"] == {"rns": 2, "sns": 1}
    # Per recipe, the share of that recipe's samples the rule rejects: 2 of the 4 RnS, 1 of the 2 SnS.
    assert effnet["rate_by_recipe"] == {"rns": pytest.approx(2 / 4), "sns": pytest.approx(1 / 2)}
    assert effnet["share"] == pytest.approx(3 / 5)
    inherited = reasons[("noop.pixel_diff <", True)]
    assert (inherited["count"], inherited["sole"]) == (2, 1)  # r0 and r1 parents count as one rule
    assert reasons[("noop.pixel_diff <", False)]["count"] == 1
    assert reasons[("duplicate", False)]["count"] == 1


def test_failures_and_sources_grouped(run_dir):
    summary = build_summary(run_dir)
    [failure] = summary["failures"]
    assert failure["count"] == 2 and failure["by_recipe"] == {"snr": 2}
    assert "CUDA out of memory" in failure["kind"]
    sources = summary["sources"]
    assert sources["total"] == 6
    assert sources["by_status"] == {"duplicate": 1, "failed": 2, "ok": 3}
    assert sources["by_pool"]["art"] == {"duplicate": 1, "failed": 1}
    assert sources["ok_by_label"] == {"realistic": 2, "stylized": 1}
    [source_failure] = sources["failures"]
    assert source_failure["count"] == 2 and source_failure["examples"][0]["uri"] == "/d/bad1.png"


def test_score_stats_and_histograms(run_dir):
    scores = build_summary(run_dir)["scores"]
    assert set(scores) == set(SCORES)
    effnet = scores[EFFNET]
    assert (effnet["count"], effnet["missing"]) == (7, 3)  # two failed rows and k9
    assert effnet["min"] == 0.2 and effnet["max"] == 0.9
    assert effnet["p50"] == pytest.approx(0.6)
    assert effnet["by_status"]["accepted"] == {"count": 2, "missing": 1, "mean": pytest.approx(0.85)}
    assert effnet["by_status"]["failed"]["missing"] == 2
    for column, score in scores.items():
        hist = score["histogram"]
        assert len(hist["edges"]) == 31
        assert sum(sum(c) for c in hist["counts"].values()) == score["count"], column
        for status, counts in hist["counts"].items():
            assert sum(counts) == score["by_status"][status]["count"]
    assert sum(scores[EFFNET]["histogram"]["counts"]["rejected"]) == 5
    lines = {(t["value"], tuple(t["recipes"] or ())) for t in effnet["thresholds"]}
    assert lines == {(0.3, ("sns",)), (0.5, ("rns", "snr", "rnr"))}
    # The generation rule is drawn on the triplet column, beside the triplet rule on the same score.
    pixel_lines = [(t["level"], t["value"], t["recipes"]) for t in scores[PIXEL]["thresholds"]]
    assert pixel_lines == [("generation", 0.04, None), ("triplet", 0.04, None)]
    # A threshold outside the data still lands inside the chart.
    assert scores[PIXEL]["histogram"]["edges"][0] <= 0.01


def test_stage_throughput(run_dir):
    stages = {row["stage"]: row for row in build_summary(run_dir)["stages"]}
    assert list(stages) == ["load", "generate", "score", "write"]
    generate = stages["generate"]
    assert generate["samples_per_busy_s"] == 0.5 and generate["utilisation"] == 0.5
    assert generate["shard_seconds"] == 20.0 and generate["nodes"] == ["node0", "node1"]
    assert stages["load"]["actors"] is None and stages["load"]["shard_seconds"] == 2.0


def test_faults_survived_are_shown_per_attempt_and_for_the_run(run_dir):
    from styledistill.schemas.metrics import append_attempt

    html = render_report(build_summary(run_dir), run_dir)
    assert "No faults: no batch was retried" in html  # the fixture's single attempt recorded none
    append_attempt(run_dir, {"wall_s": 5.0, "samples": 4, "shards_written": 1, "stages": {},
                             "faults": {"retried_batches": 3, "restarted_actors": 1, "timeouts": 0}})
    append_attempt(run_dir, {"wall_s": 2.0, "samples": 2, "shards_written": 1, "stages": {},
                             "faults": {"retried_batches": 2, "node_losses": 1}})
    summary = build_summary(run_dir)
    assert summary["throughput"]["faults"] == {"retried_batches": 5, "restarted_actors": 1, "timeouts": 0,
                                               "node_losses": 1}
    assert [a["faults"] for a in summary["throughput"]["attempts"]][1:] == [
        {"retried_batches": 3, "restarted_actors": 1, "timeouts": 0}, {"retried_batches": 2, "node_losses": 1}]
    html = render_report(summary, run_dir)
    assert "Faults the run survived (every attempt): node losses 1, restarted actors 1, retried batches 5." in html
    assert "<td class=\"l\">restarted actors 1, retried batches 3</td>" in html  # a zero count is left out
    assert "No faults" not in html


def test_html_is_self_contained_with_thresholds_and_thumbnails(run_dir):
    html = render_report(build_summary(run_dir), run_dir)
    assert 'src="http' not in html and 'href="http' not in html and "<script" not in html
    assert "<link" not in html and "@import" not in html
    images = re.findall(r'<img src="([^"]+)"', html)
    assert len(images) == 2  # k0 and k1; the malformed k5 and the incomplete shard's x0 are skipped
    assert all(src.startswith("data:image/jpeg;base64,") for src in images)
    assert ">k0<" in html and ">k1<" in html and ">x0<" not in html
    assert 'class="threshold" data-value="0.5"' in html and 'class="threshold" data-value="0.3"' in html
    assert "sns min 0.3" in html and "rns/snr/rnr min 0.5" in html and "gen min 0.04" in html
    assert html.count('<svg class="hist"') == 2 and '<svg class="reasons"' in html
    assert "parent: noop.pixel_diff &lt; 0.04" in html
    assert "cannot identify image file" in html and "unit-run" in html


def test_write_report_is_idempotent(run_dir):
    summary_path, report_path = write_report(run_dir)
    first = (open(summary_path, "rb").read(), open(report_path, "rb").read())
    assert json.loads(first[0])["totals"]["samples"] == 10
    assert write_report(run_dir) == (summary_path, report_path)
    assert (open(summary_path, "rb").read(), open(report_path, "rb").read()) == first


def test_reason_and_error_normalisation():
    assert reason_group(_low("effnet.content_cos", 0.5, 0.1).as_row()) == {
        "rule": "effnet.content_cos <", "inherited": False, "threshold": 0.5}
    high = Reason(BAND, "parent r3: clip.score > 0.1", "rules.1", "clip.score", "max", 0.1, 0.7, inherited_from="r3")
    assert reason_group(high.as_row()) == {"rule": "clip.score >", "inherited": True, "threshold": 0.1}
    missing = Reason(MISSING, "parent r0: judge.style missing", "rules.2", "judge.style", inherited_from="r0")
    assert reason_group(missing.as_row())["rule"] == "judge.style missing"
    duplicate = Reason(DUPLICATE, "duplicate of sd-000001-abc", duplicate_of="sd-000001-abc")
    assert reason_group(duplicate.as_row())["rule"] == "duplicate"
    assert error_kind("decode: cannot open '/x/y.png' (id deadbeef01)") == error_kind(
        "decode: cannot open '/z.png' (id 0123456789)")


def test_thresholds_follow_the_filter_bands():
    filters = FilterConfig(
        generation_rules=[Rule(score="noop.pixel_diff", min=0.04, per_recipe={"sns": {"min": 0.5}})],
        rules=[Rule(score="clip.score", min=0.2, max=0.9, recipes=["rns", "sns"], per_recipe={"sns": {"min": 0.1}})],
    ).model_dump(mode="json")
    lines = rule_thresholds(filters)
    # A per-recipe override replaces only the bound it names; `recipes` limits where the rule applies.
    assert [(t["bound"], t["value"], t["recipes"]) for t in lines["score.clip.score"]] == [
        ("max", 0.9, ["rns", "sns"]), ("min", 0.1, ["sns"]), ("min", 0.2, ["rns"])]
    # A generation rule is drawn on the triplet column, with its rns band.
    assert lines["score.noop.pixel_diff"] == [
        {"bound": "min", "value": 0.04, "level": "generation", "recipes": None}]


def test_reads_a_run_through_fsspec(run_dir):
    fsspec = pytest.importorskip("fsspec")
    url = f"memory://report-test-{id(run_dir)}"
    fsspec.filesystem("memory").put(run_dir, url.removeprefix("memory://"), recursive=True)
    local, remote = build_summary(run_dir), build_summary(url)
    assert remote["totals"] == local["totals"] and remote["scores"] == local["scores"]
    assert remote["sources"] == local["sources"]
    summary_uri, report_uri = write_report(url)
    assert summary_uri == f"{url}/summary.json"
    assert "data:image/jpeg;base64," in fsspec.filesystem("memory").cat_file(report_uri).decode()
    fsspec.filesystem("memory").rm(url, recursive=True)


def test_empty_run_still_reports(tmp_path):
    config = RunConfig(sources=[SourcePool(uri="/data", label="realistic")])
    (tmp_path / "run.json").write_text(json.dumps({"config": config.model_dump(mode="json"), "config_hash": "h"}))
    summary = build_summary(str(tmp_path))
    assert summary["totals"]["samples"] == 0 and summary["scores"] == {} and summary["sources"] is None
    html = render_report(summary, str(tmp_path))
    assert "No rejected samples." in html and "sources.parquet absent." in html
