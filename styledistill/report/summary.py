"""The numbers of a run: what was planned, accepted, rejected and why, from the run folder alone.

`build_summary` reads run.json, every complete shard's manifest (once, only the columns it needs) and
stats, sources.parquet and metrics.json, and returns a JSON-ready dict. Score histograms are carried as
bin edges + counts per status, so the HTML report never needs the per-sample values.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from styledistill.filters.decide import Reason, band
from styledistill.io import uris
from styledistill.schemas.config import Rule
from styledistill.schemas.metrics import attempts_of, read_metrics, utilisation, whole_run
from styledistill.schemas.recipes import GENERATION_RECIPE, RECIPE_NAMES, recipe_sorted
from styledistill.schemas.run_reader import list_shards, read_columns
from styledistill.schemas.stages import STAGE_ORDER
from styledistill.schemas.manifest import (
    ACCEPTED,
    AUDIT_INPUTS_FILE,
    FAILED,
    REJECTED,
    RUN_FILE,
    SCORE_PREFIX,
    score_column,
    SHARDS_DIR,
    SOURCES_FILE,
    stats_name,
)

STATUSES = (ACCEPTED, REJECTED, FAILED)
HISTOGRAM_BINS = 30
PERCENTILES = (5, 25, 50, 75, 95)
MANIFEST_READ_COLUMNS = ("recipe", "status", "reasons", "reason_details", "error")
EXAMPLES_PER_GROUP = 3

# ----------------------------------------------------------------------------------------------------------
# Grouping reasons and errors


def reason_group(detail: dict[str, Any]) -> dict[str, Any]:
    """How one structured reason (a manifest `reason_details` entry) is counted: one rule per (score, bound)
    whatever its per-recipe threshold, inherited or not; "duplicate" is one rule."""
    return {"rule": Reason(**detail).group, "inherited": detail.get("inherited_from") is not None,
            "threshold": detail.get("threshold")}


def error_kind(text: str) -> str:
    """An error message with its specifics (paths, ids, numbers, quoted values) masked, so alike errors group."""
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else "(no message)"
    line = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", line)
    line = re.sub(r"\b[\w+.-]+://\S+|(?:[\w.~-]*/[\w.~-]+){2,}", "<path>", line)
    line = re.sub(r"\b[0-9a-fA-F]{8,}\b", "<id>", line)
    line = re.sub(r"\d+(?:\.\d+)?", "N", line)
    return line[:160]


# ----------------------------------------------------------------------------------------------------------
# Filter thresholds from the config, for the histograms


def rule_thresholds(filters: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Column -> threshold lines {bound, value, recipes (None = every recipe), level}, merged by value."""
    lines: dict[tuple, set[str]] = defaultdict(set)
    for level, key in (("generation", "generation_rules"), ("triplet", "rules")):
        for raw in filters.get(key) or []:
            rule = Rule.model_validate(raw)
            column = score_column(rule.score)
            # Generations are judged as their own view whatever triplets they feed: their band is that recipe's.
            for recipe in RECIPE_NAMES:
                limits = band(rule, GENERATION_RECIPE if level == "generation" else recipe)
                for bound, value in zip(("min", "max"), limits or ()):
                    if value is not None:
                        lines[(column, level, bound, float(value))].add(recipe)
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (column, level, bound, value), recipes in sorted(lines.items()):
        every = recipes >= set(RECIPE_NAMES)
        out[column].append(
            {"bound": bound, "value": value, "level": level, "recipes": None if every else recipe_sorted(recipes)}
        )
    return dict(out)


# ----------------------------------------------------------------------------------------------------------
# Reading the run folder


def _read_json(uri: str) -> Any:
    return json.loads(uris.read_bytes(uri))


def _column(table: pa.Table, name: str, default: Any = None) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [default] * table.num_rows



class _ScoreValues:
    """Per-sample values of one score column, kept as compact arrays until the end of the scan."""

    def __init__(self) -> None:
        self.values: list[np.ndarray] = []
        self.statuses: list[np.ndarray] = []
        self.recipes: list[np.ndarray] = []

    def add(self, values: np.ndarray, statuses: np.ndarray, recipes: np.ndarray) -> None:
        finite = np.isfinite(values)
        self.values.append(values[finite])
        self.statuses.append(statuses[finite])
        self.recipes.append(recipes[finite])

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.concatenate(self.values), np.concatenate(self.statuses), np.concatenate(self.recipes)


def _codes(values: list[str], vocabulary: list[str]) -> np.ndarray:
    """Small-int codes into a growing vocabulary (recipes and statuses are few)."""
    index = {v: i for i, v in enumerate(vocabulary)}
    codes = np.empty(len(values), dtype=np.int16)
    for i, v in enumerate(values):
        if v not in index:
            index[v] = len(vocabulary)
            vocabulary.append(v)
        codes[i] = index[v]
    return codes


# ----------------------------------------------------------------------------------------------------------
# The summary


def build_summary(run_uri: str) -> dict[str, Any]:
    run = _read_json(uris.join(run_uri, RUN_FILE))
    config = run.get("config") or {}
    complete, incomplete, orphan_stats = list_shards(run_uri)

    decisions: Counter = Counter()  # (recipe, status) -> samples
    reasons: dict[tuple[str, bool], dict[str, Any]] = {}
    failures: dict[str, dict[str, Any]] = {}
    scores: dict[str, _ScoreValues] = defaultdict(_ScoreValues)
    recipe_vocab: list[str] = []
    status_vocab: list[str] = []
    shard_rows: list[dict[str, Any]] = []
    stage_seconds: Counter = Counter()
    stage_nodes: dict[str, set[str]] = defaultdict(set)

    shards_dir = uris.join(run_uri, SHARDS_DIR)
    for name in complete:
        stats = _read_json(uris.join(shards_dir, stats_name(name)))
        table = read_columns(uris.join(shards_dir, name + ".parquet"), MANIFEST_READ_COLUMNS, SCORE_PREFIX)
        score_columns = [c for c in table.column_names if c.startswith(SCORE_PREFIX)]
        recipes, statuses = _column(table, "recipe"), _column(table, "status")
        reason_lists, errors = _column(table, "reasons"), _column(table, "error")
        details = _column(table, "reason_details")
        decisions.update(zip(recipes, statuses))
        for recipe, status, row_reasons, row_details, error in zip(recipes, statuses, reason_lists, details, errors):
            if status == REJECTED:
                _count_reasons(reasons, recipe, row_details or [])
            elif status == FAILED:
                _count_failure(failures, recipe, error or "; ".join(row_reasons or []))

        recipe_codes = _codes(recipes, recipe_vocab)
        status_codes = _codes(statuses, status_vocab)
        for column in score_columns:
            values = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
            scores[column].add(values, status_codes, recipe_codes)

        for stage, seconds in (stats.get("stage_seconds") or {}).items():
            stage_seconds[stage] += float(seconds)
        for stage, node_ids in (stats.get("nodes") or {}).items():
            stage_nodes[stage].update(node_ids)
        counts = Counter(statuses)
        row = {
            "name": name,
            "shard": stats.get("shard"),
            "rows": len(statuses),
            "planned": stats.get("planned"),
            "accepted": stats.get("accepted"),
            "rejected": stats.get("rejected"),
            "failed": stats.get("failed"),
            "tar_bytes": stats.get("tar_bytes", 0),
        }
        # The stats file and the manifest are written by the same writer; disagreement is worth flagging.
        row["consistent"] = all(row[s] == counts.get(s, 0) for s in STATUSES)
        shard_rows.append(row)

    rows_by_status = Counter()
    for (_, status), n in decisions.items():
        rows_by_status[status] += n
    metrics = _read_metrics(run_uri)
    thresholds = rule_thresholds(config.get("filters") or {})
    total = sum(decisions.values())
    return {
        "run": {
            "uri": str(run_uri),
            "name": config.get("name", ""),
            "config_hash": run.get("config_hash", ""),
            "started": run.get("started", ""),
            "versions": run.get("versions", {}),
            "shard_prefix": (config.get("output") or {}).get("shard_prefix", ""),
            "thumbnails_in_report": (config.get("output") or {}).get("thumbnails_in_report", 12),
            "config": config,
        },
        "totals": {
            "samples": total,
            **{s: rows_by_status.get(s, 0) for s in STATUSES},
            "acceptance_rate": _rate(rows_by_status.get(ACCEPTED, 0), total),
            "shards": len(complete),
            "incomplete_shards": incomplete,
            "stats_without_manifest": orphan_stats,
            "inconsistent_shards": [r["name"] for r in shard_rows if not r["consistent"]],
            "tar_bytes": sum(r["tar_bytes"] or 0 for r in shard_rows),
        },
        "recipes": _recipe_table(decisions),
        "rejection_reasons": _finish_groups(reasons, "rule", rows_by_status.get(REJECTED, 0), decisions),
        "failures": _finish_groups(failures, "kind", rows_by_status.get(FAILED, 0), decisions),
        "scores": _score_summaries(scores, rows_by_status, recipe_vocab, status_vocab, thresholds, decisions),
        "thresholds": thresholds,
        "stages": _stage_table(metrics, stage_seconds, stage_nodes, total),
        "throughput": {
            "wall_s": metrics.get("wall_s"),
            "samples_per_s": metrics.get("samples_per_s"),
            "metrics_present": bool(metrics),
            "faults": metrics.get("faults") or {},  # what the run survived, every attempt added up
            "attempts": _attempt_rows(metrics.get("attempts") or []),
        },
        "sources": _sources_summary(run_uri),
        "audit": _audit_summary(run_uri),
        "shards": shard_rows,
    }


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _count_reasons(groups: dict, recipe: str, row_details: list[dict]) -> None:
    """Count each rule once per sample; `sole` counts samples this rule alone rejected."""
    seen: dict[tuple[str, bool], dict[str, Any]] = {}
    for detail in row_details:
        group = reason_group(detail)
        seen.setdefault((group["rule"], group["inherited"]), {"raw": detail["text"], "thresholds": set()})
        if group["threshold"] is not None:
            seen[(group["rule"], group["inherited"])]["thresholds"].add(group["threshold"])
    for key, found in seen.items():
        entry = groups.setdefault(
            key,
            {"rule": key[0], "inherited": key[1], "count": 0, "sole": 0, "by_recipe": Counter(),
             "thresholds": set(), "examples": []},
        )
        entry["count"] += 1
        entry["sole"] += len(seen) == 1
        entry["by_recipe"][recipe] += 1
        entry["thresholds"] |= found["thresholds"]
        if len(entry["examples"]) < EXAMPLES_PER_GROUP and found["raw"] not in entry["examples"]:
            entry["examples"].append(found["raw"])


def _count_failure(groups: dict, recipe: str, error: str) -> None:
    kind = error_kind(error)
    entry = groups.setdefault(kind, {"kind": kind, "count": 0, "by_recipe": Counter(), "examples": []})
    entry["count"] += 1
    entry["by_recipe"][recipe] += 1
    if len(entry["examples"]) < EXAMPLES_PER_GROUP and error not in entry["examples"]:
        entry["examples"].append(error)


def _finish_groups(groups: dict, label: str, whole: int, decisions: Counter) -> list[dict[str, Any]]:
    """JSON-ready groups, most frequent first, with their share of the rejected (or failed) samples and, per
    recipe, the share of that recipe's samples they hit (a rule that contradicts a recipe shows up here)."""
    planned: Counter = Counter()
    for (recipe, _), n in decisions.items():
        planned[recipe] += n
    out = []
    for entry in groups.values():
        item = dict(entry)
        item["by_recipe"] = {r: entry["by_recipe"][r] for r in recipe_sorted(entry["by_recipe"])}
        item["rate_by_recipe"] = {r: _rate(n, planned[r]) for r, n in item["by_recipe"].items()}
        item["share"] = _rate(entry["count"], whole)
        if "thresholds" in item:
            item["thresholds"] = sorted(entry["thresholds"])
        out.append(item)
    return sorted(out, key=lambda e: (-e["count"], e[label], e.get("inherited", False)))


def _recipe_table(decisions: Counter) -> dict[str, dict[str, Any]]:
    table = {}
    for recipe in recipe_sorted({r for r, _ in decisions}):
        counts = {s: decisions.get((recipe, s), 0) for s in STATUSES}
        other = sum(n for (r, s), n in decisions.items() if r == recipe and s not in STATUSES)
        total = sum(counts.values()) + other
        table[recipe] = {
            **counts,
            "other": other,
            "total": total,
            "acceptance_rate": _rate(counts[ACCEPTED], total),
            # Of the samples that were scored at all, how many passed: the filters' own acceptance.
            "pass_rate": _rate(counts[ACCEPTED], counts[ACCEPTED] + counts[REJECTED]),
        }
    return table


def _score_summaries(scores, rows_by_status, recipe_vocab, status_vocab, thresholds, decisions) -> dict:
    rows_by_recipe = Counter()
    for (recipe, _), n in decisions.items():
        rows_by_recipe[recipe] += n
    total = sum(rows_by_status.values())
    out = {}
    for column in sorted(scores):
        values, status_codes, recipe_codes = scores[column].arrays()
        by_status = {}
        for code, status in enumerate(status_vocab):
            mine = values[status_codes == code]
            by_status[status] = {
                "count": int(mine.size),
                "missing": rows_by_status.get(status, 0) - int(mine.size),
                "mean": float(mine.mean()) if mine.size else None,
            }
        by_recipe = {}
        for code, recipe in enumerate(recipe_vocab):
            mine = values[recipe_codes == code]
            by_recipe[recipe] = {
                "count": int(mine.size),
                "missing": rows_by_recipe.get(recipe, 0) - int(mine.size),
                "p50": float(np.median(mine)) if mine.size else None,
            }
        lines = thresholds.get(column, [])
        out[column] = {
            "count": int(values.size),
            "missing": total - int(values.size),
            **_stats(values),
            "by_status": {s: by_status[s] for s in sorted(by_status, key=_status_order)},
            "by_recipe": {r: by_recipe[r] for r in recipe_sorted(by_recipe)},
            "histogram": _histogram(values, status_codes, status_vocab, [line["value"] for line in lines]),
            "thresholds": lines,
        }
    return out


def _status_order(status: str) -> tuple[int, str]:
    return (STATUSES.index(status) if status in STATUSES else len(STATUSES), status)


def _stats(values: np.ndarray) -> dict[str, float | None]:
    keys = ["min", "max", "mean", "std"] + [f"p{p:02d}" for p in PERCENTILES]
    if not values.size:
        return {k: None for k in keys}
    stats = {
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
        "std": float(values.std()),
    }
    for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES)):
        stats[f"p{p:02d}"] = float(v)
    return stats


def _histogram(values: np.ndarray, status_codes: np.ndarray, status_vocab: list[str], marks: list[float]):
    """30 equal bins over the values and the threshold lines (so every line falls inside the chart)."""
    points = [float(v) for v in marks if math.isfinite(v)]
    if values.size:
        points += [float(values.min()), float(values.max())]
    if not points:
        return {"edges": [], "counts": {}}
    low, high = min(points), max(points)
    if low == high:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, HISTOGRAM_BINS + 1)
    counts = {}
    for code, status in enumerate(status_vocab):
        mine = values[status_codes == code]
        if mine.size:
            counts[status] = np.histogram(mine, bins=edges)[0].astype(int).tolist()
    return {"edges": edges.tolist(), "counts": {s: counts[s] for s in sorted(counts, key=_status_order)}}


def _read_metrics(run_uri: str) -> dict[str, Any]:
    """The whole run's metrics: every attempt's record and their sum (an older single-attempt file too)."""
    attempts = attempts_of(read_metrics(run_uri))
    return whole_run(attempts) if attempts else {}


def _attempt_rows(attempts: list[dict]) -> list[dict[str, Any]]:
    """One row per attempt, oldest first: what it wrote, how fast, and each stage's utilisation."""
    rows = []
    for number, a in enumerate(attempts, 1):
        wall, stages, shares = a.get("wall_s"), a.get("stages") or {}, utilisation(a)
        ordered = [n for n in STAGE_ORDER if n in shares] + sorted(set(shares) - set(STAGE_ORDER))
        rows.append({"attempt": number, "started": a.get("started"), "executor": a.get("executor"),
                     "wall_s": wall, "samples": a.get("samples"), "shards_written": a.get("shards_written"),
                     "shards_skipped": a.get("shards_skipped"), "samples_per_s": a.get("samples_per_s"),
                     "actors": {name: m.get("actors") for name, m in stages.items()},
                     "faults": a.get("faults") or {},
                     "utilisation": {name: shares[name] for name in ordered}})
    return rows


def _stage_table(metrics: dict, stage_seconds: Counter, stage_nodes: dict, samples: int) -> list[dict[str, Any]]:
    """One row per stage: Ray actor metrics (metrics.json, summed over the run's attempts) next to the writers'
    per-shard stage timings."""
    from_metrics = metrics.get("stages") or {}
    wall = metrics.get("wall_s")
    names = set(from_metrics) | set(stage_seconds) | set(stage_nodes)
    ordered = [s for s in STAGE_ORDER if s in names] + sorted(names - set(STAGE_ORDER))
    rows = []
    for stage in ordered:
        m = from_metrics.get(stage) or {}
        busy, actors = m.get("busy_s"), m.get("actors")
        actor_s = m.get("actor_s") or (actors * wall if actors and wall else None)  # over every attempt
        seconds = stage_seconds.get(stage)
        rows.append(
            {
                "stage": stage,
                "actors": actors,
                "groups": m.get("groups"),
                "samples": m.get("samples"),
                "busy_s": busy,
                # Per actor: samples per second of busy time. Utilisation: busy share of the wall time.
                "samples_per_busy_s": m["samples"] / busy if busy and m.get("samples") is not None else None,
                "utilisation": busy / actor_s if busy is not None and actor_s else None,
                "shard_seconds": seconds,
                "samples_per_shard_s": samples / seconds if seconds else None,
                "nodes": sorted(stage_nodes.get(stage, ())),
            }
        )
    return rows


def _sources_summary(run_uri: str) -> dict[str, Any] | None:
    uri = uris.join(run_uri, SOURCES_FILE)
    if not uris.exists(uri):
        return None
    table = read_columns(uri, ("uri", "pool", "label", "status", "error"))
    statuses, pools, labels = _column(table, "status"), _column(table, "pool", ""), _column(table, "label")
    by_pool: dict[str, Counter] = defaultdict(Counter)
    failures: dict[str, dict[str, Any]] = {}
    for source, pool, status, error in zip(_column(table, "uri", ""), pools, statuses, _column(table, "error")):
        by_pool[str(pool)][status] += 1
        if status == "failed":
            kind = error_kind(error or "")
            entry = failures.setdefault(kind, {"kind": kind, "count": 0, "examples": []})
            entry["count"] += 1
            if len(entry["examples"]) < EXAMPLES_PER_GROUP:
                entry["examples"].append({"uri": source, "error": error})
    ok_labels = Counter(str(label) for label, status in zip(labels, statuses) if status == "ok")
    return {
        "total": table.num_rows,
        "by_status": dict(sorted(Counter(statuses).items())),
        "by_pool": {pool: dict(sorted(c.items())) for pool, c in sorted(by_pool.items())},
        "ok_by_label": dict(sorted(ok_labels.items())),
        "failures": sorted(failures.values(), key=lambda e: (-e["count"], e["kind"])),
    }


def _audit_summary(run_uri: str) -> dict[str, Any] | None:
    """An audit's inputs: each input file with its samples, skipped members by reason and read error."""
    uri = uris.join(run_uri, AUDIT_INPUTS_FILE)
    if not uris.exists(uri):
        return None
    data = _read_json(uri)
    files = data.get("files") or []
    return {
        "inputs": data.get("inputs") or [],
        "samples": data.get("samples", 0),
        "skipped": data.get("skipped") or {},
        "unreadable_files": [f for f in files if f.get("error")],
        "files": files[:200],
        "file_count": len(files),
    }
