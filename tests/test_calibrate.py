"""calibrate: curves, AUC, thresholds and their intervals, the minimum per class, the rule set against
labels, the suggested filters block, over a synthetic run folder (no models, fast)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from styledistill.filters.calibrate import (
    MIN_PER_CLASS,
    LabelError,
    analyse_score,
    parse_labels,
    pr_points,
    roc_auc,
    threshold_at_precision,
    threshold_best_f1,
    write_calibration,
)
from styledistill.filters.decide import decide
from styledistill.schemas.config import FilterConfig, Rule, RunConfig, SourcePool
from styledistill.schemas.manifest import MANIFEST_COLUMNS, shard_name, stats_name


def test_roc_auc_is_the_pairwise_probability_with_ties_half():
    rng = np.random.default_rng(3)
    values = rng.integers(0, 6, 60).astype(float)  # many ties
    y = rng.random(60) < 0.4
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in values[y] for b in values[~y]]
    assert roc_auc(values, y) == pytest.approx(np.mean(pairs))
    assert roc_auc(values, np.ones(60, bool)) is None


def test_pr_points_and_thresholds():
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    y = np.array([1, 1, 1, 0, 1, 0, 0, 0], bool)
    pts = pr_points(s, y)
    assert pts["precision"].tolist() == pytest.approx([1, 1, 1, 0.75, 0.8, 4 / 6, 4 / 7, 0.5])
    assert pts["recall"].tolist() == pytest.approx([0.25, 0.5, 0.75, 0.75, 1, 1, 1, 1])
    t, precision, recall = threshold_at_precision(s, y, 0.8)
    assert (t, precision, recall) == pytest.approx((0.45, 0.8, 1.0))  # halfway to the next value down
    assert threshold_at_precision(s, y, 1.0)[0] == pytest.approx(0.65)
    t, f1, _, _ = threshold_best_f1(s, y)
    assert t == pytest.approx(0.45) and f1 == pytest.approx(2 * 0.8 / 1.8)


def test_direction_comes_from_the_labels_and_intervals_are_seeded():
    rng = np.random.default_rng(0)
    values = rng.random(80)
    y = values < 0.4  # lower is better
    a = analyse_score(values, y, 0.9)
    assert a["direction"] == "lower is better" and a["bound"] == "max" and a["separates"]
    assert a["auc"] == 0 and a["best_f1"]["f1"] == 1.0
    assert 0.35 < a["at_precision"]["threshold"] < 0.45
    low, high = a["at_precision"]["interval"]
    assert low <= a["at_precision"]["threshold"] <= high
    assert analyse_score(values, y, 0.9) == a  # seeded bootstrap: same numbers twice


def test_no_threshold_from_too_few_labels():
    values = np.linspace(0, 1, MIN_PER_CLASS + MIN_PER_CLASS - 1)
    y = np.arange(values.size) >= MIN_PER_CLASS - 1  # one reject short
    a = analyse_score(values, y, 0.9)
    assert a["labels"] == {"accept": MIN_PER_CLASS, "reject": MIN_PER_CLASS - 1}
    assert a["at_precision"] is None and a["best_f1"] is None
    assert f"at least {MIN_PER_CLASS} of each" in a["refused"]
    assert a["auc"] == 1.0 and a["curve"]["recall"]  # the curve is still shown


def test_parse_labels():
    text = "\ufeffkey,label,recipe\nk1,accept,rns\nk2, Reject ,sns\nk3,,rns\nk1,accept,rns\n"
    assert parse_labels(text) == {"k1": "accept", "k2": "reject"}
    with pytest.raises(LabelError, match="line 2: label 'maybe'"):
        parse_labels("key,label\nk1,maybe\n")
    with pytest.raises(LabelError, match="both accept and reject"):
        parse_labels("key,label\nk1,accept\nk1,reject\n")
    with pytest.raises(LabelError, match="'key' and 'label'"):
        parse_labels("id,verdict\nk1,accept\n")


# A synthetic run: one RnS-like score `q.good` (higher is better) decides the truth; the configured rule on it
# is too strict (min 0.7, truth is ~0.5), so it causes false rejects; `q.noise` carries no signal.
FILTERS = {"generation_rules": [], "rules": [{"score": "q.good", "min": 0.7}, {"score": "q.noise", "max": 0.95}],
           "dedup": {"exact": True, "phash_max_distance": 4}}


def _synthetic_run(root, n=120, seed=2):
    rng = np.random.default_rng(seed)
    filters = FilterConfig.model_validate(FILTERS)
    config = RunConfig(name="cal", sources=[SourcePool(uri="/x", label="realistic")], filters=filters)
    root.mkdir()
    (root / "run.json").write_text(json.dumps({"config": config.model_dump(mode="json"), "config_hash": "h"}))
    (root / "shards").mkdir()
    good, noise = rng.random(n), rng.random(n)
    labels = {}
    columns = {name: [] for name in MANIFEST_COLUMNS.names}
    for i in range(n):
        key = f"rnr_{i:04d}"
        status = "failed" if i == 0 else None
        decision = decide(filters, "rnr", {"q.good": good[i], "q.noise": noise[i]}, {}, error="boom" if i == 0 else None)
        status = decision.status
        row = {"key": key, "shard": 0, "group_id": f"g{i}", "recipe": "rnr", "status": status,
               "reasons": decision.texts, "reason_details": [r.as_row() for r in decision.reasons],
               "content_slot": "c", "style_slot": "p", "target_slot": "c"}
        for name in columns:
            columns[name].append(row.get(name))
        truth = good[i] > 0.5
        labels[key] = "accept" if truth != (rng.random() < 0.05) else "reject"  # 5% label noise
    table = pa.Table.from_pydict(columns, schema=MANIFEST_COLUMNS)
    missing = [i == 0 for i in range(n)]
    for name, values in (("score.q.good", good), ("score.q.noise", noise)):
        table = table.append_column(pa.field(name, pa.float64()),
                                    pa.array([None if m else v for m, v in zip(missing, values)], pa.float64()))
    name = shard_name("sd", 0)
    pq.write_table(table, root / "shards" / f"{name}.parquet")
    (root / "shards" / stats_name(name)).write_text("{}")
    return labels, good


def test_calibrate_a_run(tmp_path):
    labels, good = _synthetic_run(tmp_path / "run")
    labels["not-in-run"] = "accept"
    result, json_path, yaml_path = write_calibration(str(tmp_path / "run"), labels, 0.9)

    assert result["labels"]["failed_ignored"] == {labels["rnr_0000"]: 1}
    assert result["labels"]["unknown_keys"] == 1
    assert sum(result["labels"]["used"].values()) == 119
    good_score = result["scores"]["score.q.good"]
    assert good_score["direction"] == "higher is better" and good_score["auc"] > 0.9
    assert result["scores"]["score.q.noise"]["separates"] is False
    # The too-strict rule: labelled accepts below 0.7 were rejected by it.
    rule_set = result["rule_set"]
    assert rule_set["most_false_rejects"] == "rules.0: q.good <"
    assert rule_set["by_rule"][0]["false_rejects"] > 10
    assert rule_set["recall"] < 0.75 and rule_set["precision"] > 0.9

    fitted, noise = result["suggestion"]["rules"]
    assert 0.4 < fitted["rule"]["min"] < 0.6  # near the truth, down from 0.7
    low, high = fitted["interval"]
    assert low <= fitted["rule"]["min"] <= high
    assert noise["rule"] == {"score": "q.noise", "max": 0.95} and noise["note"].startswith("kept")
    estimate = result["suggestion"]["estimate"]
    assert estimate["recall"] > rule_set["recall"] and estimate["precision"] >= 0.9

    text = (tmp_path / "run" / "filters-suggested.yaml").read_text()
    block = yaml.safe_load(text)
    assert FilterConfig.model_validate(block).rules[0].min == fitted["rule"]["min"]
    assert block["dedup"] == FILTERS["dedup"] and block["generation_rules"] == []
    assert "# " in text and "bootstrap" in text
    saved = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert saved["settings"]["min_per_class"] == MIN_PER_CLASS
    assert all(math.isfinite(v) for v in saved["scores"]["score.q.good"]["curve"]["precision"])


def test_too_few_labels_keep_the_rules(tmp_path):
    labels, _ = _synthetic_run(tmp_path / "run", n=30)
    few = dict(list(labels.items())[:15])
    result, _, yaml_path = write_calibration(str(tmp_path / "run"), few)
    for s in result["suggestion"]["rules"]:
        assert s["rule"] == s["was"] and "too few labels" in s["note"]
    assert FilterConfig.model_validate(yaml.safe_load(open(yaml_path).read())).rules == \
        [Rule.model_validate(r) for r in FILTERS["rules"]]
