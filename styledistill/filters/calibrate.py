"""Calibrating the filters against human labels: `styledistill calibrate RUN --labels labels.csv`.

`labels.csv` has a `key` and a `label` column (accept | reject; other columns are ignored), as the report's
review view downloads it. For every score column, pooled over recipes and per recipe where the labels
allow, this measures how well the score separates accept from reject (ROC AUC, precision-recall curve),
derives its direction from the labels (AUC < 0.5: lower is better, a `max` bound) and suggests two
thresholds: the one that reaches the target precision with the most recall, and the best-F1 one, each with
a 90% bootstrap interval. The configured rule set as a whole is scored against the labels (precision,
recall, and which rule causes most false rejects), and a suggested `filters` block is written: the run's
generation_rules and dedup, and its rules with the thresholds re-fitted where the labels allow.

Honest with few labels: every number comes with its label counts, and no threshold is suggested from fewer
than MIN_PER_CLASS labels of either class. Only numpy: no sklearn.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np
import yaml

from styledistill.filters.decide import band, decide, generation_reasons
from styledistill.io import uris
from styledistill.schemas.manifest import score_column
from styledistill.schemas.run_reader import manifest_rows
from styledistill.schemas import manifest as mf
from styledistill.schemas.config import FilterConfig, Rule
from styledistill.schemas.recipes import GENERATION_RECIPE, RECIPES, recipe_sorted
from styledistill.schemas.records import is_result_slot

CALIBRATION_FILE = "calibration.json"  # in the run folder, next to report.html (which shows it)
SUGGESTED_FILTERS_FILE = "filters-suggested.yaml"
ACCEPT, REJECT = "accept", "reject"
MIN_PER_CLASS = 10  # no threshold is suggested from fewer accept (or reject) labels than this
DEFAULT_PRECISION = 0.9
BOOTSTRAP_RESAMPLES = 200
INTERVAL = 0.90  # central bootstrap interval: 5th to 95th percentile
SEED = 0
MAX_CURVE_POINTS = 200
READ_COLUMNS = ("key", "recipe", "status", "reason_details", "group_id", "content_slot", "style_slot",
                "target_slot")


class LabelError(ValueError):
    """A labels file that cannot be read, with the problem in one line."""


# ----------------------------------------------------------------------------------------------------------
# Labels


def parse_labels(text: str, source: str = "labels") -> dict[str, str]:
    """key -> accept | reject from CSV text with `key` and `label` columns; empty labels are skipped."""
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    fields = [f.strip().lower() for f in reader.fieldnames or []]
    if "key" not in fields or "label" not in fields:
        raise LabelError(f"{source}: expected a header with 'key' and 'label' columns, got {reader.fieldnames}")
    key_field = reader.fieldnames[fields.index("key")]
    label_field = reader.fieldnames[fields.index("label")]
    labels: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        key = (row.get(key_field) or "").strip()
        label = (row.get(label_field) or "").strip().lower()
        if not key or not label:
            continue
        if label not in (ACCEPT, REJECT):
            raise LabelError(f"{source} line {line}: label {label!r} is not accept or reject")
        if labels.get(key, label) != label:
            raise LabelError(f"{source} line {line}: key {key} is labelled both accept and reject")
        labels[key] = label
    return labels


def read_labels(uri: str) -> dict[str, str]:
    try:
        data = uris.read_bytes(str(uri))
    except FileNotFoundError:
        raise LabelError(f"labels file not found: {uri}") from None
    return parse_labels(data.decode("utf-8"), str(uri))


# ----------------------------------------------------------------------------------------------------------
# Curves (numpy only). `y` is True for accept; `s` is oriented so that higher means accept.


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    cuts = np.flatnonzero(np.diff(xs)) + 1
    starts, ends = np.r_[0, cuts], np.r_[cuts, len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def roc_auc(values: np.ndarray, y: np.ndarray) -> float | None:
    """P(an accept scores higher than a reject), ties counting half (Mann-Whitney); None without both."""
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        return None
    return float((_average_ranks(values)[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def pr_points(s: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """At each distinct value t (descending), accepting `s >= t`: precision, recall, false-positive rate."""
    order = np.argsort(-s, kind="mergesort")
    ss, ys = s[order], y[order]
    tp, fp = np.cumsum(ys), np.cumsum(~ys)
    last = np.r_[np.flatnonzero(np.diff(ss)), len(ss) - 1]  # the last sample of each distinct value
    tp, fp = tp[last], fp[last]
    return {"t": ss[last], "precision": tp / (tp + fp), "recall": tp / max(int(y.sum()), 1),
            "fpr": fp / max(int((~y).sum()), 1)}


def _cut(points: dict[str, np.ndarray], i: int) -> float:
    """Halfway between the i-th distinct value and the next lower one: the same split of the labelled
    samples, less tied to one sample's exact value."""
    t = points["t"]
    return float(t[i]) if i + 1 >= len(t) else float((t[i] + t[i + 1]) / 2)


def threshold_at_precision(s: np.ndarray, y: np.ndarray, target: float) -> tuple[float, float, float] | None:
    """(threshold, precision, recall): the lowest `s >= t` whose precision reaches `target` (most recall)."""
    if not y.any():
        return None
    pts = pr_points(s, y)
    ok = np.flatnonzero(pts["precision"] >= target)
    if not ok.size:
        return None
    i = int(ok[-1])
    return _cut(pts, i), float(pts["precision"][i]), float(pts["recall"][i])


def threshold_best_f1(s: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float] | None:
    """(threshold, f1, precision, recall) of the best F1."""
    if not y.any():
        return None
    pts = pr_points(s, y)
    p, r = pts["precision"], pts["recall"]
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    i = int(np.argmax(f1))
    return _cut(pts, i), float(f1[i]), float(p[i]), float(r[i])


def _interval(samples: list[float]) -> list[float] | None:
    if not samples:
        return None
    tail = (1 - INTERVAL) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return [float(low), float(high)]


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or not math.isfinite(value) else float(f"{value:.{digits}g}")


def analyse_score(values: np.ndarray, y: np.ndarray, target_precision: float, seed: int = SEED) -> dict[str, Any]:
    """Counts, AUC (with its bootstrap interval), direction, PR curve and the suggested thresholds of one
    score on labelled samples (values finite)."""
    n_accept, n_reject = int(y.sum()), int((~y).sum())
    out: dict[str, Any] = {"labels": {ACCEPT: n_accept, REJECT: n_reject}, "auc": None, "direction": None,
                           "bound": None, "curve": None, "at_precision": None, "best_f1": None, "refused": None,
                           "separates": False, "auc_interval": None}
    if not n_accept or not n_reject:
        out["refused"] = "needs labels of both classes"
        return out
    auc = roc_auc(values, y)
    higher = auc >= 0.5
    sign = 1.0 if higher else -1.0
    s = sign * values
    out.update(auc=_r(auc), direction="higher is better" if higher else "lower is better",
               bound="min" if higher else "max", auc_oriented=_r(max(auc, 1 - auc)))
    pts = pr_points(s, y)
    step = max(1, math.ceil(len(pts["t"]) / MAX_CURVE_POINTS))
    keep = np.r_[np.arange(0, len(pts["t"]), step), len(pts["t"]) - 1] if len(pts["t"]) else np.array([], int)
    keep = np.unique(keep)
    out["curve"] = {"threshold": [_r(sign * v, 6) for v in pts["t"][keep]],
                    "precision": [_r(v) for v in pts["precision"][keep]],
                    "recall": [_r(v) for v in pts["recall"][keep]],
                    "fpr": [_r(v) for v in pts["fpr"][keep]]}
    out["base_rate"] = _r(n_accept / (n_accept + n_reject))

    rng = np.random.default_rng(seed)
    boot_auc, boot_prec, boot_f1 = [], [], []
    for _ in range(BOOTSTRAP_RESAMPLES):
        idx = rng.integers(0, len(s), len(s))
        ys, vs = y[idx], s[idx]
        if ys.all() or not ys.any():
            continue
        boot_auc.append(roc_auc(sign * vs, ys))
        found = threshold_at_precision(vs, ys, target_precision)
        if found:
            boot_prec.append(sign * found[0])
        boot_f1.append(sign * threshold_best_f1(vs, ys)[0])
    out["auc_interval"] = [_r(v) for v in _interval(boot_auc) or []] or None
    # The direction is settled only when the AUC interval excludes 0.5 (no separation).
    out["separates"] = bool(out["auc_interval"] and (out["auc_interval"][0] > 0.5 or out["auc_interval"][1] < 0.5))

    if n_accept < MIN_PER_CLASS or n_reject < MIN_PER_CLASS:
        out["refused"] = (f"too few labels to suggest a threshold: {n_accept} accept, {n_reject} reject "
                          f"(at least {MIN_PER_CLASS} of each)")
        return out
    found = threshold_at_precision(s, y, target_precision)
    if found:
        t, p, r = found
        out["at_precision"] = {"threshold": _r(sign * t), "precision": _r(p), "recall": _r(r),
                               "interval": [_r(v) for v in _interval(boot_prec) or []] or None,
                               "resamples_reaching": len(boot_prec)}
    t, f1, p, r = threshold_best_f1(s, y)
    out["best_f1"] = {"threshold": _r(sign * t), "f1": _r(f1), "precision": _r(p), "recall": _r(r),
                      "interval": [_r(v) for v in _interval(boot_f1) or []] or None}
    return out


def suggested_threshold(analysis: dict[str, Any]) -> tuple[float, str, list | None] | None:
    """(threshold, which, interval): the target-precision one, else the best-F1 one, else None."""
    for which in ("at_precision", "best_f1"):
        found = analysis.get(which)
        if found:
            return found["threshold"], which, found["interval"]
    return None


# ----------------------------------------------------------------------------------------------------------
# The run's rules against the labels


def _confusion(rows: list[dict], predicted_accept: Iterable[bool]) -> dict[str, Any]:
    counts = Counter()
    for row, accepted in zip(rows, predicted_accept):
        counts[("t" if (row["_label"] == ACCEPT) == accepted else "f") + ("p" if accepted else "n")] += 1
    tp, fp, fn, tn = (counts[k] for k in ("tp", "fp", "fn", "tn"))
    return {"true_accepts": tp, "false_accepts": fp, "false_rejects": fn, "true_rejects": tn,
            "precision": _r(tp / (tp + fp)) if tp + fp else None,
            "recall": _r(tp / (tp + fn)) if tp + fn else None}


def _rule_name(detail: dict) -> str:
    if detail.get("kind") in ("band", "missing"):
        op = {"min": "<", "max": ">"}.get(detail.get("bound"), "missing")
        name = f"{detail.get('rule')}: {detail.get('score')} {op}"
    else:
        name = detail.get("kind") or "other"
    return name


def rule_attribution(rows: list[dict]) -> list[dict[str, Any]]:
    """Per rule (config place, score, bound): the labelled rejected samples it rejected, split into false
    rejects (labelled accept) and true rejects; `sole`: false rejects this rule alone caused."""
    table: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        if row["status"] != mf.REJECTED:
            continue
        names = {_rule_name(d) for d in row["reason_details"] or []}
        inherited = {_rule_name(d) for d in row["reason_details"] or [] if d.get("inherited_from")}
        for name in names:
            entry = table[name]
            if row["_label"] == ACCEPT:
                entry["false_rejects"] += 1
                entry["sole"] += len(names) == 1
                entry["inherited"] += name in inherited
            else:
                entry["true_rejects"] += 1
    out = [{"rule": name, "false_rejects": c["false_rejects"], "sole_false_rejects": c["sole"],
            "inherited_false_rejects": c["inherited"], "true_rejects": c["true_rejects"]}
           for name, c in table.items()]
    return sorted(out, key=lambda e: (-e["false_rejects"], -e["sole_false_rejects"], e["rule"]))


# ----------------------------------------------------------------------------------------------------------
# Suggested rules


def _rule_dict(rule: Rule) -> dict[str, Any]:
    data: dict[str, Any] = {"score": rule.score}
    for bound in ("min", "max"):
        if getattr(rule, bound) is not None:
            data[bound] = getattr(rule, bound)
    if rule.recipes is not None:
        data["recipes"] = list(rule.recipes)
    if rule.per_recipe:
        data["per_recipe"] = {r: dict(b) for r, b in rule.per_recipe.items()}
    if rule.allow_missing:
        data["allow_missing"] = True
    return data


def _subset(rows: list[dict], column: str, recipes: Iterable[str] | None) -> tuple[np.ndarray, np.ndarray]:
    wanted = None if recipes is None else set(recipes)
    values, labels = [], []
    for row in rows:
        value = row.get(column)
        if value is None or not math.isfinite(value) or (wanted is not None and row["recipe"] not in wanted):
            continue
        values.append(value)
        labels.append(row["_label"] == ACCEPT)
    return np.asarray(values, dtype=np.float64), np.asarray(labels, dtype=bool)


class _Coordinate:
    """One configured rule whose bound is re-fitted: per labelled sample, whether it passes at each candidate
    threshold (vectorised; a per-recipe override of that bound stays as configured)."""

    def __init__(self, rule: Rule, rows: list[dict], bound: str):
        self.rule, self.bound = rule, bound
        column = score_column(rule.score)
        values = np.array([np.nan if row.get(column) is None else row[column] for row in rows], dtype=np.float64)
        in_scope = np.array([rule.recipes is None or row["recipe"] in rule.recipes for row in rows])
        override = np.array([rule.per_recipe.get(row["recipe"], {}).get(bound, np.nan)
                             if bound in rule.per_recipe.get(row["recipe"], {}) else np.nan for row in rows],
                            dtype=np.float64)
        self.has_override = ~np.isnan(override) | np.array(
            [bound in rule.per_recipe.get(row["recipe"], {}) and rule.per_recipe[row["recipe"]][bound] is None
             for row in rows])
        other = "max" if bound == "min" else "min"
        other_limit = np.array([(band(rule, row["recipe"]) or (None, None))[other == "max"] for row in rows],
                               dtype=object)
        finite = np.isfinite(values)
        # What does not depend on the candidate: outside the scope passes; a missing score passes if allowed;
        # the configured other bound still applies.
        self.fixed = np.where(in_scope, np.where(finite, True, rule.allow_missing), True)
        for i, limit in enumerate(other_limit):
            if in_scope[i] and finite[i] and limit is not None:
                self.fixed[i] &= values[i] <= limit if other == "max" else values[i] >= limit
        self.tuned = in_scope & finite & ~self.has_override
        self.override_pass = np.where(in_scope & finite & self.has_override & ~np.isnan(override),
                                      (values >= override) if bound == "min" else (values <= override), True)
        self.values = values
        distinct = np.unique(values[self.tuned])
        if bound == "min":  # the first candidate passes every labelled sample, then the midpoints upwards
            self.candidates = np.r_[distinct[:1], (distinct[1:] + distinct[:-1]) / 2]
        else:
            self.candidates = np.r_[distinct[-1:], ((distinct[1:] + distinct[:-1]) / 2)[::-1]]

    def passes(self, thresholds: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
        """(len(thresholds), samples) booleans."""
        sel = slice(None) if idx is None else idx
        v, tuned = self.values[sel], self.tuned[sel]
        t = np.asarray(thresholds, dtype=np.float64)[:, None]
        with np.errstate(invalid="ignore"):
            ok = (v[None, :] >= t) if self.bound == "min" else (v[None, :] <= t)
        return np.where(tuned[None, :], ok, True) & self.fixed[sel][None, :] & self.override_pass[sel][None, :]


def _objective(tp: np.ndarray, fp: np.ndarray, positives: int, target: float) -> np.ndarray:
    """Rank of each candidate: reaching the target precision first (then recall, then precision), else F1."""
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = tp / max(positives, 1)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return np.where(precision >= target, 2.0 + recall + 1e-3 * precision, f1)


class _Problem:
    """The labelled samples and the parent generation views they depend on (the `pool` the rules are
    evaluated on), so that a re-fitted rule re-judges the parents too, as the writer does."""

    def __init__(self, rows: list[dict], every: list[dict], filters: FilterConfig):
        views = _views(every)
        pool: dict[str, int] = {}
        self.pool: list[dict] = []

        def index(row: dict) -> int:
            if row["key"] not in pool:
                pool[row["key"]] = len(self.pool)
                self.pool.append(row)
            return pool[row["key"]]

        self.lab = np.array([index(row) for row in rows], dtype=np.int64)
        parents, blocked = [], []
        for row in rows:
            own, fixed_reject = [], any(d.get("kind") == "duplicate" for d in row["reason_details"] or [])
            if not (row["recipe"] in RECIPES and RECIPES[row["recipe"]].is_generation_view):
                for slot in dict.fromkeys((row.get("content_slot"), row.get("style_slot"), row.get("target_slot"))):
                    if not slot or not is_result_slot(slot):
                        continue
                    view = views.get((row.get("group_id"), slot))
                    if view is None:  # no RnS row for this generation: its verdict in the run stands
                        fixed_reject |= any(d.get("inherited_from") == slot for d in row["reason_details"] or [])
                    elif filters.generation_rules:  # judged by generation_rules, which are not re-fitted
                        fixed_reject |= bool(generation_reasons(filters, _own_scores(view)))
                    else:
                        own.append(index(view))
            parents.append((own + [-1, -1])[:2])
            blocked.append(fixed_reject)
        self.parents = np.array(parents, dtype=np.int64).reshape(-1, 2)
        self.parents[self.parents < 0] = len(self.pool)  # a column that always passes
        self.blocked = np.array(blocked, dtype=bool)
        self.y = np.array([row["_label"] == ACCEPT for row in rows], dtype=bool)

    def accepted(self, pool_pass: np.ndarray) -> np.ndarray:
        """(..., pool) pass -> (..., labelled) accepted: its own rules and its parents' views pass."""
        ext = np.concatenate([pool_pass, np.ones(pool_pass.shape[:-1] + (1,), dtype=bool)], axis=-1)
        return (ext[..., self.lab] & ext[..., self.parents[:, 0]] & ext[..., self.parents[:, 1]]) & ~self.blocked


def fit_rules(problem: _Problem, coords: list[_Coordinate], start: list[float], target: float,
              idx: np.ndarray | None = None, passes: int = 5) -> list[float]:
    """Coordinate ascent over the rules' thresholds, jointly: the rule set as a whole should reach the target
    precision with the most recall (or, where it cannot, the best F1), on the labelled samples `idx`."""
    sel = slice(None) if idx is None else idx
    y = problem.y[sel]
    positives = int(y.sum())
    current = list(start)
    masks = [c.passes([t])[0] for c, t in zip(coords, current)]
    for _ in range(passes):
        changed = False
        for j, coord in enumerate(coords):
            if not coord.candidates.size:
                continue
            others = np.ones(len(problem.pool), dtype=bool)
            for k, mask in enumerate(masks):
                if k != j:
                    others &= mask
            accepted = problem.accepted(coord.passes(coord.candidates) & others[None, :])[:, sel]
            rank = _objective((accepted & y).sum(1), (accepted & ~y).sum(1), positives, target)
            now_acc = problem.accepted(masks[j] & others)[sel]
            now = _objective(np.array([(now_acc & y).sum()]), np.array([(now_acc & ~y).sum()]), positives, target)[0]
            best = int(np.argmax(rank))
            if rank[best] > now + 1e-12:
                current[j], changed = float(coord.candidates[best]), True
                masks[j] = coord.passes([current[j]])[0]
        if not changed:
            break
    return current


def suggest_rules(filters: FilterConfig, rows: list[dict], every: list[dict], target: float,
                  seed: int = SEED) -> tuple[list[dict[str, Any]], _Problem]:
    """Every configured rule, its threshold re-fitted jointly with the others where the labels allow (enough
    labels of each class in its scope, and a score that separates them), kept as configured otherwise; with
    a bootstrap interval on each re-fitted threshold."""
    problem = _Problem(rows, every, filters)
    out, coords, start, owners = [], [], [], []
    for rule in filters.rules:
        column = score_column(rule.score)
        scope = list(rule.recipes) if rule.recipes is not None else None
        analysis = analyse_score(*_subset(rows, column, scope), target)
        entry = {"rule": _rule_dict(rule), "was": _rule_dict(rule), "column": column, "scope": scope,
                 "analysis": analysis, "note": "", "interval": None}
        out.append(entry)
        if analysis["refused"]:
            entry["note"] = "kept: " + analysis["refused"]
            continue
        if not analysis["separates"]:
            entry["note"] = (f"kept: the score does not separate the labels (AUC interval "
                             f"[{_fmt(analysis['auc_interval'][0])}, {_fmt(analysis['auc_interval'][1])}] contains 0.5)")
            continue
        bound = analysis["bound"]
        other = "max" if bound == "min" else "min"
        if getattr(rule, bound) is None and getattr(rule, other) is not None:
            # The labels say the other direction: the configured bound is dropped, the new one fitted.
            rule = rule.model_copy(update={other: None, "per_recipe": {}})
            entry["note"] = f"direction from the labels: {analysis['direction']} (the config had a {other} bound); "
        coord = _Coordinate(rule, problem.pool, bound)
        configured = getattr(rule, bound)
        coords.append(coord)
        start.append(configured if configured is not None else (coord.candidates[0] if coord.candidates.size else 0.0))
        owners.append(entry)
    if not coords:
        return out, problem
    fitted = fit_rules(problem, coords, start, target)
    rng = np.random.default_rng(seed)
    boots: list[list[float]] = [[] for _ in coords]
    for _ in range(BOOTSTRAP_RESAMPLES):
        idx = rng.integers(0, len(rows), len(rows))
        if problem.y[idx].all() or not problem.y[idx].any():
            continue
        for b, t in zip(boots, fit_rules(problem, coords, fitted, target, idx)):
            b.append(t)
    for entry, coord, t, b in zip(owners, coords, fitted, boots):
        was = entry["was"].get(coord.bound)
        new = _rule_dict(coord.rule)
        new[coord.bound] = _r(t)
        Rule.model_validate(new)
        entry["rule"], entry["interval"] = new, [_r(v) for v in _interval(b) or []] or None
        span = f" [{_fmt(entry['interval'][0])}, {_fmt(entry['interval'][1])}]" if entry["interval"] else ""
        entry["note"] += f"{coord.bound} {_fmt(t)}{span}, was {_fmt(was)}"
        if coord.candidates.size and t == coord.candidates[0]:
            entry["note"] += " (rejects no labelled sample: could be dropped)"
    return out, problem


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


# ----------------------------------------------------------------------------------------------------------
# Re-deciding the labelled samples under suggested rules (an estimate, see `estimate`)


def _own_scores(row: dict) -> dict[str, float]:
    return {k[len(mf.SCORE_PREFIX):]: v for k, v in row.items()
            if k.startswith(mf.SCORE_PREFIX) and v is not None}


def redecide(filters: FilterConfig, row: dict, views: dict[tuple[str, str], dict]) -> bool:
    """Whether `row` is accepted under `filters`. A parent generation r_i is judged on its view's scores,
    the RnS row (c, s_i, r_i) of the same group, when the manifest has it; otherwise its verdict in the run
    stands. Duplicates stay duplicates."""
    duplicate_of = next((d.get("duplicate_of") for d in row["reason_details"] or [] if d.get("kind") == "duplicate"),
                        None)
    parents, unknown_failing = {}, False
    slots = dict.fromkeys((row.get("content_slot"), row.get("style_slot"), row.get("target_slot")))
    for slot in slots:
        if not slot or not is_result_slot(slot):
            continue
        view = views.get((row.get("group_id"), slot))
        if view is not None:
            parents[slot] = _own_scores(view)
        elif any(d.get("inherited_from") == slot for d in row["reason_details"] or []):
            unknown_failing = True
    if row["recipe"] in RECIPES and RECIPES[row["recipe"]].is_generation_view:
        unknown_failing = False
    decision = decide(filters, row["recipe"], _own_scores(row), parents, duplicate_of=duplicate_of)
    return decision.status == mf.ACCEPTED and not unknown_failing


def _views(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(row.get("group_id"), row.get("target_slot")): row for row in rows
            if row["recipe"] == GENERATION_RECIPE and row["status"] != mf.FAILED}


# ----------------------------------------------------------------------------------------------------------
# The whole calibration


def calibrate(run_uri: str, labels: dict[str, str], target_precision: float = DEFAULT_PRECISION) -> dict[str, Any]:
    """calibration.json's content (see the module docstring)."""
    run = json.loads(uris.read_bytes(uris.join(run_uri, mf.RUN_FILE)))
    config_filters = (run.get("config") or {}).get("filters") or {}
    filters = FilterConfig.model_validate(config_filters)
    every = manifest_rows(run_uri, READ_COLUMNS, mf.SCORE_PREFIX)
    found_keys = set()
    failed: Counter = Counter()
    rows = []
    for row in every:
        label = labels.get(row["key"])
        if label is None:
            continue
        found_keys.add(row["key"])
        if row["status"] == mf.FAILED:
            failed[label] += 1
            continue
        row["_label"] = label
        rows.append(row)
    recipes = recipe_sorted({r["recipe"] for r in rows})
    columns = sorted({k for r in every for k in r if k.startswith(mf.SCORE_PREFIX)})

    scores = {}
    for column in columns:
        entry = analyse_score(*_subset(rows, column, None), target_precision)
        entry["by_recipe"] = {recipe: analyse_score(*_subset(rows, column, [recipe]), target_precision)
                              for recipe in recipes}
        scores[column] = entry

    current = _confusion(rows, [r["status"] == mf.ACCEPTED for r in rows])
    current["by_recipe"] = {recipe: _confusion([r for r in rows if r["recipe"] == recipe],
                                               [r["status"] == mf.ACCEPTED for r in rows if r["recipe"] == recipe])
                            for recipe in recipes}
    attribution = rule_attribution(rows)

    suggestions, _ = suggest_rules(filters, rows, every, target_precision)
    suggested = FilterConfig.model_validate({**config_filters, "rules": [s["rule"] for s in suggestions]})
    views = _views(every)
    estimate = _confusion(rows, [redecide(suggested, r, views) for r in rows])
    ruled = {score_column(rule.score) for rule in filters.rules}
    candidates = []
    for column in columns:
        if column in ruled:
            continue
        found = suggested_threshold(scores[column])
        if found is not None and scores[column]["separates"]:
            rule = {"score": column[len(mf.SCORE_PREFIX):], scores[column]["bound"]: found[0]}
            candidates.append({"rule": rule, "column": column, "auc": scores[column]["auc"],
                               "auc_interval": scores[column].get("auc_interval"), "which": found[1],
                               "interval": found[2]})
    candidates.sort(key=lambda c: -abs((c["auc"] or 0.5) - 0.5))

    labels_count = Counter(labels.values())
    used = Counter(r["_label"] for r in rows)
    return {
        "run": {"uri": str(run_uri), "config_hash": run.get("config_hash", ""), "name": (run.get("config") or {}).get("name", "")},
        "settings": {"target_precision": target_precision, "min_per_class": MIN_PER_CLASS,
                     "bootstrap_resamples": BOOTSTRAP_RESAMPLES, "interval": INTERVAL, "seed": SEED},
        "labels": {
            "total": len(labels), ACCEPT: labels_count.get(ACCEPT, 0), REJECT: labels_count.get(REJECT, 0),
            "used": {ACCEPT: used.get(ACCEPT, 0), REJECT: used.get(REJECT, 0)},
            "failed_ignored": dict(failed),
            "unknown_keys": len(set(labels) - found_keys),
            "by_recipe": {recipe: dict(Counter(r["_label"] for r in rows if r["recipe"] == recipe))
                          for recipe in recipes},
            "by_status": {status: dict(Counter(r["_label"] for r in rows if r["status"] == status))
                          for status in (mf.ACCEPTED, mf.REJECTED)},
        },
        "rule_set": {**current, "by_rule": attribution,
                     "most_false_rejects": attribution[0]["rule"] if attribution and attribution[0]["false_rejects"] else None},
        "scores": scores,
        "suggestion": {
            "rules": [{k: s[k] for k in ("rule", "was", "column", "scope", "note", "interval")} |
                      {"auc": s["analysis"]["auc"], "direction": s["analysis"]["direction"],
                       "labels": s["analysis"]["labels"]} for s in suggestions],
            "candidates": candidates,
            "estimate": estimate,
            "estimate_note": ("the suggested rules re-applied to the labelled samples (a parent generation is "
                              "judged on its RnS row where the manifest has one, else its verdict in the run "
                              "stands); measured on the same labels it was fitted to, so optimistic"),
        },
    }


def suggested_filters_yaml(result: dict[str, Any], run_filters: dict[str, Any]) -> str:
    """A YAML mapping usable as a config's `filters:` block (or `refilter --filters FILE`): the run's
    generation_rules and dedup, the suggested rules; the evidence as comments."""
    settings, labels = result["settings"], result["labels"]
    filters = FilterConfig.model_validate(run_filters)
    lines = [
        f"# Suggested by `styledistill calibrate` for run {result['run']['uri']} (config {result['run']['config_hash']})",
        f"# from {labels['used'][ACCEPT]} accept / {labels['used'][REJECT]} reject labels; thresholds fitted jointly so "
        f"that the rule set reaches precision {settings['target_precision']}",
        f"# with the most recall (best F1 where it cannot); [a, b]: {settings['interval']:.0%} bootstrap interval over "
        f"{settings['bootstrap_resamples']} resamples; no threshold from fewer than {settings['min_per_class']} "
        "labels per class.",
        f"# On the labelled samples: now precision {_fmt(result['rule_set']['precision'])} recall "
        f"{_fmt(result['rule_set']['recall'])}; suggested precision {_fmt(result['suggestion']['estimate']['precision'])} "
        f"recall {_fmt(result['suggestion']['estimate']['recall'])} (optimistic: same labels).",
        "generation_rules: " + _flow([_rule_dict(r) for r in filters.generation_rules]),
        "rules:",
    ]
    for s in result["suggestion"]["rules"]:
        auc = f"AUC {_fmt(s['auc'])}, {s['direction']}; " if s["auc"] is not None else ""
        lines.append(f"  - {_flow(s['rule'])}  # {auc}{s['note']}")
    if result["suggestion"]["candidates"]:
        lines.append("  # Scores with no rule in the config that separate the labels (uncomment to use):")
        for c in result["suggestion"]["candidates"]:
            span = f" [{_fmt(c['interval'][0])}, {_fmt(c['interval'][1])}]" if c["interval"] else ""
            lines.append(f"  # - {_flow(c['rule'])}  # AUC {_fmt(c['auc'])}, threshold interval{span}")
    lines.append("dedup: " + _flow(filters.dedup.model_dump(mode="json")))
    text = "\n".join(lines) + "\n"
    FilterConfig.model_validate(yaml.safe_load(text))  # what is written must load as it is
    return text


def _flow(data: Any) -> str:
    return yaml.safe_dump(data, default_flow_style=True, sort_keys=False, width=10_000).strip()


def write_calibration(run_uri: str, labels: dict[str, str], target_precision: float = DEFAULT_PRECISION,
                      out_uri: str | None = None) -> tuple[dict[str, Any], str, str]:
    """Calibrate and write calibration.json and filters-suggested.yaml (into the run folder unless `out_uri`);
    returns the result and both paths."""
    result = calibrate(run_uri, labels, target_precision)
    run = json.loads(uris.read_bytes(uris.join(run_uri, mf.RUN_FILE)))
    text = suggested_filters_yaml(result, (run.get("config") or {}).get("filters") or {})
    result["suggestion"]["yaml"] = text
    out = out_uri or run_uri
    json_uri, yaml_uri = uris.join(out, CALIBRATION_FILE), uris.join(out, SUGGESTED_FILTERS_FILE)
    uris.write_text_atomic(json_uri, json.dumps(result, indent=1, allow_nan=False) + "\n")
    uris.write_text_atomic(yaml_uri, text)
    return result, json_uri, yaml_uri
