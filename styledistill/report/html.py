"""The quality report: one self-contained HTML page (inline CSS, inline SVG, thumbnails as data: URIs).

Everything comes from the summary dict except the thumbnails, which are read from <run>/thumbs/, the review
sample's images, read from the shard (and rejects) tars, and the calibration section, from
<run>/calibration.json when `styledistill calibrate` wrote one. No external assets, so the file can be mailed,
archived, or opened offline; one small inline script runs the review view (marks kept in the browser's
localStorage, downloaded as labels.csv for `styledistill calibrate`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import tarfile
from collections import defaultdict
from html import escape
from typing import Any

import jinja2
from markupsafe import Markup

from styledistill.io import uris
from styledistill.schemas.recipes import recipe_sorted
from styledistill.schemas.manifest import (
    ACCEPTED,
    CONTENT_MEMBER,
    FAILED,
    REJECTED,
    REJECTS_DIR,
    SCORE_PREFIX,
    SHARDS_DIR,
    STYLE_MEMBER,
    TARGET_MEMBER,
    THUMBS_DIR,
)

COLOURS = {ACCEPTED: "#2e7d32", REJECTED: "#c62828", FAILED: "#9e9e9e"}
OTHER_COLOUR = "#6a1b9a"
THRESHOLD_COLOUR = "#1565c0"
INHERITED_COLOUR = "#ef6c00"
MAX_REASON_BARS = 25
MAX_THUMB_FILES = 64  # thumbnail files read, spread evenly over the shards
REVIEW_PER_CELL = 4  # review sample: triplets per recipe x status (accepted, rejected)
REVIEW_HEIGHT = 256  # px: each review image, downscaled, as JPEG
REVIEW_ROLES = (CONTENT_MEMBER, STYLE_MEMBER, TARGET_MEMBER)


# ----------------------------------------------------------------------------------------------------------
# Number formatting


def fmt_num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"  # no exponent for large rates and counts
    return f"{value:.{digits}g}"


def fmt_pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def fmt_bytes(value: int | None) -> str:
    if not value:
        return "0 B"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.2f} h"


# ----------------------------------------------------------------------------------------------------------
def fmt_faults(faults: dict[str, int] | None) -> str:
    """{"retried_batches": 3, "restarted_actors": 1} -> "retried batches 3, restarted actors 1"; "–" if none."""
    parts = [f"{name.replace('_', ' ')} {count:,}" for name, count in sorted((faults or {}).items()) if count]
    return ", ".join(parts) or "–"


# SVG charts


def histogram_svg(column: str, score: dict[str, Any], width: int = 380, height: int = 190) -> str:
    """Stacked bars per bin (accepted, rejected, failed) with the configured threshold lines."""
    hist = score["histogram"]
    edges, counts = hist["edges"], hist["counts"]
    if not edges:
        return '<p class="muted">no values</p>'
    left, right, top, bottom = 40, 10, 14 + 12 * len(score["thresholds"]), 22
    plot_w, plot_h = width - left - right, height - top - bottom
    bins = len(edges) - 1
    totals = [sum(counts[s][i] for s in counts) for i in range(bins)]
    peak = max(totals) or 1
    low, high = edges[0], edges[-1]

    def x_of(value: float) -> float:
        return left + (value - low) / (high - low) * plot_w

    parts = [
        f'<svg class="hist" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="histogram of {escape(column)}">',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#888"/>',
        f'<text x="{left - 4}" y="{top + 4}" class="tick" text-anchor="end">{peak:,}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" class="tick" text-anchor="end">0</text>',
    ]
    bar_w = plot_w / bins
    for i in range(bins):
        y = top + plot_h
        for status, per_bin in counts.items():
            n = per_bin[i]
            if not n:
                continue
            h = n / peak * plot_h
            y -= h
            tip = f"{status}: {n:,} in [{fmt_num(edges[i])}, {fmt_num(edges[i + 1])})"
            parts.append(
                f'<rect class="bar {escape(status)}" x="{left + i * bar_w + 0.5:.2f}" y="{y:.2f}" '
                f'width="{max(bar_w - 1, 0.5):.2f}" height="{h:.2f}" '
                f'fill="{COLOURS.get(status, OTHER_COLOUR)}"><title>{escape(tip)}</title></rect>'
            )
    for k in range(5):
        value = low + (high - low) * k / 4
        anchor = "start" if k == 0 else "end" if k == 4 else "middle"
        parts.append(
            f'<text x="{x_of(value):.2f}" y="{height - 6}" class="tick" text-anchor="{anchor}">'
            f"{fmt_num(value, 3)}</text>"
        )
    for j, line in enumerate(score["thresholds"]):
        x = x_of(line["value"])
        label = threshold_label(line)
        label_y = 11 + 12 * j
        anchor = "end" if x > left + plot_w / 2 else "start"
        dx = -3 if anchor == "end" else 3
        parts.append(
            f'<line class="threshold" data-value="{line["value"]!r}" data-bound="{line["bound"]}" '
            f'x1="{x:.2f}" y1="{label_y - 3}" x2="{x:.2f}" y2="{top + plot_h}" stroke="{THRESHOLD_COLOUR}" '
            f'stroke-width="1.5" stroke-dasharray="4 2"><title>{escape(label)}</title></line>'
            f'<text x="{x + dx:.2f}" y="{label_y}" class="thr" text-anchor="{anchor}">{escape(label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def threshold_label(line: dict[str, Any]) -> str:
    """e.g. "min 0.5", "sns min 0.3", "gen max 0.9"."""
    words = []
    if line["level"] == "generation":
        words.append("gen")
    if line["recipes"]:
        words.append("/".join(line["recipes"]))
    words += [line["bound"], fmt_num(line["value"])]
    return " ".join(words)


def reasons_svg(reasons: list[dict[str, Any]], width: int = 920) -> str:
    """Horizontal bars, one per rule (inherited-from-parent rules in their own colour)."""
    shown = reasons[:MAX_REASON_BARS]
    rest = sum(r["count"] for r in reasons[MAX_REASON_BARS:])
    rows = [(reason_label(r), r["count"], r.get("inherited", False), r.get("share")) for r in shown]
    if rest:
        rows.append((f"{len(reasons) - MAX_REASON_BARS} more rules", rest, False, None))
    label_w, row_h, right = 360, 20, 110
    height = row_h * len(rows) + 6
    peak = max(count for _, count, _, _ in rows)
    bar_span = width - label_w - right
    parts = [
        f'<svg class="reasons" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="rejection reasons">'
    ]
    for i, (label, count, inherited, share) in enumerate(rows):
        y = 3 + i * row_h
        bar = max(count / peak * bar_span, 1)
        colour = INHERITED_COLOUR if inherited else COLOURS[REJECTED]
        short = label if len(label) <= 50 else label[:49] + "…"
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end" class="lbl">{escape(short)}'
            f"<title>{escape(label)}</title></text>"
            f'<rect class="reason" x="{label_w}" y="{y + 2}" width="{bar:.2f}" height="{row_h - 5}" '
            f'fill="{colour}"/>'
            f'<text x="{label_w + bar + 5:.2f}" y="{y + 14}" class="lbl">{count:,}'
            f'{f" ({fmt_pct(share)})" if share is not None else ""}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def reason_label(reason: dict[str, Any]) -> str:
    """"effnet.content_cos < 0.5"; several thresholds (per-recipe bands) are listed together."""
    thresholds = reason.get("thresholds") or []
    text = reason["rule"]
    if thresholds:
        values = ", ".join(fmt_num(t) for t in thresholds)
        text += f" {values}" if len(thresholds) == 1 else f" {{{values}}}"
    return ("parent: " if reason.get("inherited") else "") + text


# ----------------------------------------------------------------------------------------------------------
# Thumbnails


def collect_thumbnails(run_uri: str, shard_names: list[str], per_status: int) -> dict[str, list[dict[str, Any]]]:
    """Up to `per_status` accepted and rejected triplets, from thumbnail files spread over the shards,
    taken round-robin over recipes so every recipe is seen."""
    stride = max(1, math.ceil(len(shard_names) / MAX_THUMB_FILES))
    candidates: dict[str, dict[str, list]] = {ACCEPTED: defaultdict(list), REJECTED: defaultdict(list)}
    for name in shard_names[::stride]:
        uri = uris.join(run_uri, THUMBS_DIR, f"{name}.json")
        if not uris.exists(uri):
            continue
        for key, item in sorted(json.loads(uris.read_bytes(uri)).items()):
            status = item.get("status")
            data = _jpeg_data_uri(item.get("jpeg_b64", ""))
            if status in candidates and data:
                candidates[status][item.get("recipe", "")].append(
                    {"key": key, "recipe": item.get("recipe", ""), "reasons": item.get("reasons") or [],
                     "shard": name, "src": data}
                )
    return {status: _round_robin(by_recipe, per_status) for status, by_recipe in candidates.items()}


def _jpeg_data_uri(b64: str) -> str | None:
    """A data: URI, only for text that really is base64 JPEG (it goes into an attribute verbatim)."""
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return None
    if not raw.startswith(b"\xff\xd8"):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(raw).decode("ascii")


def _round_robin(by_recipe: dict[str, list], limit: int) -> list:
    order = recipe_sorted(by_recipe)
    picked, depth = [], 0
    while len(picked) < limit and any(depth < len(by_recipe[r]) for r in order):
        for recipe in order:
            if depth < len(by_recipe[recipe]) and len(picked) < limit:
                picked.append(by_recipe[recipe][depth])
        depth += 1
    return picked


# ----------------------------------------------------------------------------------------------------------
# The review sample


def _review_order(key: str) -> str:
    """A fixed pseudo-random order (so a rewritten report shows the same sample)."""
    return hashlib.sha256(key.encode()).hexdigest()


def collect_review(run_uri: str, per_cell: int, height: int = REVIEW_HEIGHT) -> dict[str, Any]:
    """A stratified sample, `per_cell` triplets per recipe x status (accepted, rejected), with their images
    read from the tars (streamed, never extracted) and embedded as downscaled JPEG data: URIs. Rejected
    samples have images only when the run wrote rejects; failed ones never have any."""
    from styledistill.schemas.run_reader import manifest_rows

    out: dict[str, Any] = {"items": [], "cells": [], "without_images": {}, "per_cell": per_cell}
    if per_cell <= 0:
        return out
    rows = manifest_rows(run_uri, ("key", "recipe", "status", "reasons"), SCORE_PREFIX)
    tars = {ACCEPTED: SHARDS_DIR, REJECTED: REJECTS_DIR}
    has_tar: dict[tuple[str, str], bool] = {}
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        status = row["status"]
        if status not in tars:
            continue
        where = (tars[status], row["_shard"])
        if where not in has_tar:
            has_tar[where] = uris.exists(uris.join(run_uri, where[0], f"{where[1]}.tar"))
        if not has_tar[where]:
            out["without_images"][status] = out["without_images"].get(status, 0) + 1
            continue
        cells[(row["recipe"], status)].append(row)
    picked: list[dict] = []
    for recipe in recipe_sorted({r for r, _ in cells}):
        for status in (ACCEPTED, REJECTED):
            mine = sorted(cells.get((recipe, status), []), key=lambda r: _review_order(r["key"]))
            picked += mine[:per_cell]
            if mine:
                out["cells"].append({"recipe": recipe, "status": status, "available": len(mine),
                                     "shown": min(per_cell, len(mine))})
    wanted: dict[tuple[str, str], set[str]] = defaultdict(set)
    for row in picked:
        wanted[(tars[row["status"]], row["_shard"])].add(row["key"])
    images: dict[str, dict[str, str]] = defaultdict(dict)
    for (folder, shard), keys in sorted(wanted.items()):
        _read_review_images(uris.join(run_uri, folder, f"{shard}.tar"), keys, height, images)
    for row in sorted(picked, key=lambda r: _review_order(r["key"])):
        found = images.get(row["key"], {})
        if not all(role in found for role in REVIEW_ROLES):
            continue
        scores = {k[len(SCORE_PREFIX):]: v for k, v in sorted(row.items())
                  if k.startswith(SCORE_PREFIX) and v is not None and math.isfinite(v)}
        out["items"].append({"key": row["key"], "recipe": row["recipe"], "status": row["status"],
                             "reasons": row["reasons"] or [], "shard": row["_shard"], "scores": scores,
                             "images": [found[role] for role in REVIEW_ROLES]})
    return out


def _read_review_images(tar_uri: str, keys: set[str], height: int, images: dict[str, dict[str, str]]) -> None:
    from PIL import Image

    with uris.open_for_read(tar_uri) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, rest = member.name.rpartition("/")[2].partition(".")
            role = rest.split(".")[0]
            if key not in keys or role not in REVIEW_ROLES:
                continue
            data = tar.extractfile(member).read()
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image = image.convert("RGB")
                    if image.height > height:
                        image = image.resize((max(1, round(image.width * height / image.height)), height),
                                             Image.Resampling.LANCZOS)
                    buffer = io.BytesIO()
                    image.save(buffer, format="JPEG", quality=85)
            except OSError:
                continue
            images[key][role] = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------------------------------------
# The calibration section (from <run>/calibration.json)


def pr_curve_svg(column: str, analysis: dict[str, Any], target: float, width: int = 300, height: int = 220) -> str:
    """Precision (y) against recall (x) of one score, the target precision dashed, the suggested
    thresholds marked."""
    curve = analysis.get("curve")
    if not curve or not curve["recall"]:
        return '<p class="muted">no curve (labels of one class only)</p>'
    left, right, top, bottom = 36, 10, 10, 30
    pw, ph = width - left - right, height - top - bottom

    def xy(recall: float, precision: float) -> tuple[float, float]:
        return left + recall * pw, top + (1 - precision) * ph

    points = [xy(0.0, curve["precision"][0])] + [xy(r, p) for r, p in zip(curve["recall"], curve["precision"])]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    base = analysis.get("base_rate") or 0
    parts = [
        f'<svg class="pr" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="precision-recall curve of {escape(column)}">',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#bbb"/>',
        f'<line x1="{left}" x2="{left + pw}" y1="{xy(0, target)[1]:.1f}" y2="{xy(0, target)[1]:.1f}" '
        f'stroke="{THRESHOLD_COLOUR}" stroke-dasharray="4 2"><title>target precision {target}</title></line>',
        f'<line x1="{left}" x2="{left + pw}" y1="{xy(0, base)[1]:.1f}" y2="{xy(0, base)[1]:.1f}" stroke="#bbb" '
        f'stroke-dasharray="2 2"><title>share of accept labels {fmt_num(base, 3)}</title></line>',
        f'<polyline class="prc" points="{path}" fill="none" stroke="#222" stroke-width="1.5"/>',
    ]
    for which, colour, label in (("at_precision", COLOURS[ACCEPTED], "target"), ("best_f1", INHERITED_COLOUR, "F1")):
        found = analysis.get(which)
        if found:
            x, y = xy(found["recall"], found["precision"])
            parts.append(f'<circle class="pt {which}" cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}">'
                         f'<title>{label}: {analysis["bound"]} {fmt_num(found["threshold"])}</title></circle>')
    for v in (0, 0.5, 1):
        x, y = xy(v, v)
        parts.append(f'<text x="{x:.1f}" y="{height - 16}" class="tick" text-anchor="middle">{v:g}</text>'
                     f'<text x="{left - 4}" y="{y + 3:.1f}" class="tick" text-anchor="end">{v:g}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 3}" class="tick" text-anchor="middle">recall</text>'
                 f'<text x="10" y="{top + ph / 2:.1f}" class="tick" text-anchor="middle" '
                 f'transform="rotate(-90 10 {top + ph / 2:.1f})">precision</text></svg>')
    return "".join(parts)


def read_calibration(run_uri: str) -> dict[str, Any] | None:
    from styledistill.filters.calibrate import CALIBRATION_FILE

    uri = uris.join(run_uri, CALIBRATION_FILE)
    if not uris.exists(uri):
        return None
    calibration = json.loads(uris.read_bytes(uri))
    target = calibration["settings"]["target_precision"]
    calibration["charts"] = [
        {"column": column, "a": analysis, "svg": Markup(pr_curve_svg(column, analysis, target))}
        for column, analysis in calibration["scores"].items()
    ]
    return calibration


# ----------------------------------------------------------------------------------------------------------
# The page


def render_report(summary: dict[str, Any], run_uri: str, review_per_cell: int = REVIEW_PER_CELL) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters.update(num=fmt_num, pct=fmt_pct, bytes=fmt_bytes, secs=fmt_seconds, faults=fmt_faults)
    per_status = int(summary["run"].get("thumbnails_in_report") or 0)
    thumbs = collect_thumbnails(run_uri, [s["name"] for s in summary["shards"]], per_status)
    histograms = [
        {"column": column, "score": score, "svg": Markup(histogram_svg(column, score)),
         "labels": [threshold_label(line) for line in score["thresholds"]]}
        for column, score in summary["scores"].items()
    ]
    reasons = summary["rejection_reasons"]
    return env.from_string(TEMPLATE).render(
        s=summary,
        statuses=(ACCEPTED, REJECTED, FAILED),
        colours=COLOURS,
        histograms=histograms,
        reasons_chart=Markup(reasons_svg(reasons)) if reasons else None,
        reason_label=reason_label,
        thumbs=thumbs,
        review=collect_review(run_uri, review_per_cell),
        calibration=read_calibration(run_uri),
        review_store="styledistill-labels:" + str(summary["run"]["uri"]) + ":" + str(summary["run"]["config_hash"]),
        config_json=json.dumps(summary["run"]["config"], indent=2, sort_keys=True),
    )


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0;background:#f6f7f9}
main{max-width:1240px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.muted{color:#777}.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px}.card span{color:#666;font-size:12px}
table{border-collapse:collapse;background:#fff;margin:6px 0}
th,td{border:1px solid #e3e3e3;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#f0f2f5;font-weight:600}td.l,th.l{text-align:left}
tr:nth-child(even) td{background:#fafbfc}
.warn{background:#fff4e5;border:1px solid #ffb74d;border-radius:6px;padding:8px 12px;margin:10px 0}
.accepted{color:#2e7d32}.rejected{color:#c62828}.failed{color:#757575}
.hists{display:grid;grid-template-columns:repeat(auto-fill,minmax(400px,1fr));gap:12px}
.hcard{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:8px 10px}
.hcard h3{font-size:13px;margin:0 0 4px;font-family:ui-monospace,Menlo,Consolas,monospace}
.hcard p{margin:2px 0;font-size:12px}
svg text.tick{font-size:10px;fill:#555}svg text.thr{font-size:10px;fill:#1565c0}svg text.lbl{font-size:12px;fill:#222}
.legend span{display:inline-block;margin-right:14px;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(290px,1fr));gap:10px}
figure{margin:0;background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:6px}
figure img{width:100%;height:auto;display:block;image-rendering:auto}
figcaption{font-size:12px;margin-top:4px}figcaption ul{margin:2px 0 0 16px;padding:0;color:#c62828}
.badge{display:inline-block;background:#e8eaf6;border-radius:3px;padding:0 5px;margin-right:4px;font-size:11px}
details{margin:8px 0}summary{cursor:pointer;color:#1565c0}
pre{background:#fff;border:1px solid #e0e0e0;padding:8px;overflow:auto;font-size:12px}
.rvbar{position:sticky;top:0;z-index:2;background:#f6f7f9;padding:6px 0;border-bottom:1px solid #ddd;display:flex;gap:12px;align-items:center;flex-wrap:wrap}
.rvbar button,.rv button{font:inherit;padding:3px 10px;border:1px solid #bbb;border-radius:4px;background:#fff;cursor:pointer}
.rvlist{display:flex;flex-direction:column;gap:10px;margin-top:8px}
.rv{background:#fff;border:2px solid #e0e0e0;border-radius:6px;padding:8px;outline:none;display:flex;gap:12px;flex-wrap:wrap;align-items:flex-start}
.rv.current{box-shadow:0 0 0 3px #90caf9}.rv.l-accept{border-color:#2e7d32;background:#f1f8e9}.rv.l-reject{border-color:#c62828;background:#fdecea}
.rv .trip{display:flex;gap:6px;overflow-x:auto}.rv .trip figure{border:0;padding:0;background:none}
.rv .trip img{height:256px;width:auto;max-width:none}.rv .trip figcaption{text-align:center;color:#666}
.rv .meta{display:flex;flex-direction:column;gap:6px;font-size:12px;max-width:420px}.rv .meta td{padding:1px 6px}
.rv .meta ul{margin:0 0 0 16px;padding:0;color:#c62828}.rv .lab{font-weight:600}
.rv.l-accept .mark-accept{background:#2e7d32;color:#fff}.rv.l-reject .mark-reject{background:#c62828;color:#fff}
.prs{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:12px}
kbd{border:1px solid #bbb;border-radius:3px;padding:0 4px;background:#fff;font-size:12px}
"""

TEMPLATE = (
    """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>styledistill report – {{ s.run.name }} ({{ s.run.config_hash }})</title>
<style>"""
    + CSS
    + """</style></head>
<body><main>
<h1>{{ s.run.name or "styledistill run" }}</h1>
<div class="muted"><a href="#review">review and label</a> · <a href="#calibration">calibration</a></div>
<div class="muted mono">{{ s.run.uri }} · config {{ s.run.config_hash }} · started {{ s.run.started or "–" }}</div>
{% if s.run.versions %}
<div class="muted mono">{% for lib, v in s.run.versions|dictsort %}{{ lib }} {{ v }}{% if not loop.last %} · {% endif %}{% endfor %}</div>
{% endif %}
<div class="cards">
  <div class="card"><b>{{ s.totals.samples|num }}</b><span>samples in complete shards</span></div>
  <div class="card"><b class="accepted">{{ s.totals.accepted|num }}</b><span>accepted ({{ s.totals.acceptance_rate|pct }})</span></div>
  <div class="card"><b class="rejected">{{ s.totals.rejected|num }}</b><span>rejected</span></div>
  <div class="card"><b class="failed">{{ s.totals.failed|num }}</b><span>failed</span></div>
  <div class="card"><b>{{ s.totals.shards|num }}</b><span>complete shards · {{ s.totals.tar_bytes|bytes }}</span></div>
  {% if s.sources %}<div class="card"><b>{{ s.sources.total|num }}</b><span>source files scanned</span></div>{% endif %}
  {% if s.throughput.wall_s is not none %}<div class="card"><b>{{ s.throughput.wall_s|secs }}</b><span>wall time · {{ s.throughput.samples_per_s|num(3) }} samples/s</span></div>{% endif %}
</div>
{% if s.totals.incomplete_shards or s.totals.inconsistent_shards or s.totals.stats_without_manifest %}
<div class="warn">
  {% if s.totals.incomplete_shards %}<div>{{ s.totals.incomplete_shards|length }} shard(s) have a manifest but no stats file (unfinished) and are not counted: <span class="mono">{{ s.totals.incomplete_shards[:20]|join(", ") }}{% if s.totals.incomplete_shards|length > 20 %} …{% endif %}</span></div>{% endif %}
  {% if s.totals.stats_without_manifest %}<div>{{ s.totals.stats_without_manifest|length }} stats file(s) without a manifest: <span class="mono">{{ s.totals.stats_without_manifest[:20]|join(", ") }}</span></div>{% endif %}
  {% if s.totals.inconsistent_shards %}<div>{{ s.totals.inconsistent_shards|length }} shard(s) whose stats counts differ from their manifest: <span class="mono">{{ s.totals.inconsistent_shards[:20]|join(", ") }}</span></div>{% endif %}
</div>
{% endif %}

{% if s.audit is defined and s.audit %}
<h2>Data audited</h2>
<p>{{ s.audit.samples|num }} samples read from {{ s.audit.file_count|num }} input file(s) of {{ s.audit.inputs|length }} input(s){% if s.audit.unreadable_files %}; <b>{{ s.audit.unreadable_files|length }} not readable to the end</b>{% endif %}.</p>
<table><tr><th class="l">kind</th><th class="l">uri</th><th class="l">roles</th><th class="l">recipe</th></tr>
{% for inp in s.audit.inputs %}<tr><td class="l">{{ inp.get("kind") }}</td><td class="l mono">{{ (([inp.uri] if inp.get("uri") else []) + (inp.get("uris") or []))|join(", ") }}</td><td class="l mono">{% if inp.get("roles") %}{% for r, m in inp.roles|dictsort %}{% if m %}{{ r }}: {{ m }} {% endif %}{% endfor %}{% else %}(run folder){% endif %}</td><td class="l mono">{{ inp.get("recipe") or inp.get("recipe_field") or "unknown" }}</td></tr>{% endfor %}
</table>
{% if s.audit.skipped %}<table><tr><th class="l">skipped while reading</th><th>count</th></tr>{% for reason, n in s.audit.skipped|dictsort %}<tr><td class="l">{{ reason }}</td><td>{{ n|num }}</td></tr>{% endfor %}</table>{% endif %}
{% if s.audit.unreadable_files %}<div class="warn">{% for f in s.audit.unreadable_files[:20] %}<div class="mono">{{ f.uri }}: {{ f.error }} (after {{ f.samples }} samples)</div>{% endfor %}</div>{% endif %}
{% endif %}

<h2>Decisions by recipe</h2>
<table>
<tr><th class="l">recipe</th>{% for st in statuses %}<th class="{{ st }}">{{ st }}</th>{% endfor %}<th>total</th><th>accepted / total</th><th>accepted / scored</th></tr>
{% for recipe, row in s.recipes.items() %}
<tr><td class="l">{{ recipe }}</td>{% for st in statuses %}<td>{{ row[st]|num }}</td>{% endfor %}<td>{{ row.total|num }}</td><td>{{ row.acceptance_rate|pct }}</td><td>{{ row.pass_rate|pct }}</td></tr>
{% endfor %}
<tr><th class="l">all</th>{% for st in statuses %}<th>{{ s.totals[st]|num }}</th>{% endfor %}<th>{{ s.totals.samples|num }}</th><th>{{ s.totals.acceptance_rate|pct }}</th><th></th></tr>
</table>

<h2>Rejection reasons</h2>
{% if reasons_chart %}
<p class="muted">Each rule is counted once per rejected sample; a sample failing several rules counts for each. <span style="color:#ef6c00">Orange</span>: inherited from a failing parent generation. "sole": samples this rule alone rejected.</p>
{{ reasons_chart }}
<table>
<tr><th class="l">rule</th><th>samples</th><th>share of rejected</th><th>sole</th>{% for r in s.recipes %}<th>{{ r }}</th>{% endfor %}<th class="l">example</th></tr>
{% for r in s.rejection_reasons %}
<tr><td class="l mono">{{ reason_label(r) }}</td><td>{{ r.count|num }}</td><td>{{ r.share|pct }}</td><td>{{ r.sole|num }}</td>{% for rc in s.recipes %}<td>{{ r.by_recipe.get(rc, 0)|num }}{% if r.rate_by_recipe.get(rc) %} <span class="muted">({{ r.rate_by_recipe[rc]|pct }})</span>{% endif %}</td>{% endfor %}<td class="l mono">{{ r.examples[0] }}</td></tr>
{% endfor %}
</table>
{% else %}<p class="muted">No rejected samples.</p>{% endif %}

<h2>Failures</h2>
{% if s.failures %}
<table>
<tr><th class="l">error kind</th><th>samples</th>{% for r in s.recipes %}<th>{{ r }}</th>{% endfor %}<th class="l">example</th></tr>
{% for f in s.failures %}
<tr><td class="l mono">{{ f.kind }}</td><td>{{ f.count|num }}</td>{% for rc in s.recipes %}<td>{{ f.by_recipe.get(rc, 0)|num }}</td>{% endfor %}<td class="l mono">{{ f.examples[0] }}</td></tr>
{% endfor %}
</table>
{% else %}<p class="muted">No failed samples.</p>{% endif %}

<h2>Scores</h2>
<div class="legend">{% for st in statuses %}<span><i style="background:{{ colours[st] }}"></i>{{ st }}</span>{% endfor %}<span><i style="background:#1565c0;height:2px"></i>configured threshold (per-recipe bands name their recipes; "gen": generation rule)</span></div>
<div class="hists">
{% for h in histograms %}
<div class="hcard">
<h3>{{ h.column }}</h3>
{{ h.svg }}
<p>n={{ h.score.count|num }} · missing {{ h.score.missing|num }} · min {{ h.score.min|num }} · p5 {{ h.score.p05|num }} · median {{ h.score.p50|num }} · mean {{ h.score.mean|num }} · p95 {{ h.score.p95|num }} · max {{ h.score.max|num }}</p>
<p class="muted">{% for st, b in h.score.by_status.items() %}{{ st }} mean {{ b.mean|num }} ({{ b.count|num }}{% if b.missing %}, {{ b.missing|num }} missing{% endif %}){% if not loop.last %} · {% endif %}{% endfor %}</p>
<p class="muted">median by recipe: {% for r, b in h.score.by_recipe.items() %}{{ r }} {{ b.p50|num }}{% if not loop.last %} · {% endif %}{% endfor %}</p>
{% if h.labels %}<p style="color:#1565c0">thresholds: {{ h.labels|join("; ") }}</p>{% else %}<p class="muted">no filter rule on this score</p>{% endif %}
</div>
{% endfor %}
</div>
{% if not histograms %}<p class="muted">No score columns in the manifests.</p>{% endif %}

{% for st in ("accepted", "rejected") %}
<h2>{{ st|capitalize }} samples <span class="muted">({{ thumbs[st]|length }} shown; each panel: content | style | target)</span></h2>
{% if thumbs[st] %}
<div class="grid">
{% for t in thumbs[st] %}
<figure><img src="{{ t.src }}" alt="{{ t.key }}" loading="lazy">
<figcaption><span class="badge">{{ t.recipe }}</span><span class="mono">{{ t.key }}</span>
{% if t.reasons %}<ul>{% for reason in t.reasons %}<li class="mono">{{ reason }}</li>{% endfor %}</ul>{% endif %}
</figcaption></figure>
{% endfor %}
</div>
{% else %}<p class="muted">No thumbnails.</p>{% endif %}
{% endfor %}

<h2 id="review">Review and label</h2>
<p class="muted">A stratified sample: up to {{ review.per_cell }} triplets per recipe × status, in a fixed shuffled order; each row: content | style | target. Mark with <kbd>a</kbd> accept, <kbd>r</kbd> reject, <kbd>u</kbd> clear (the next triplet follows), move with <kbd>j</kbd>/<kbd>k</kbd> or <kbd>→</kbd>/<kbd>←</kbd>, or click. Marks are kept in this browser; <b>Download labels.csv</b> and run <span class="mono">styledistill calibrate {{ s.run.uri }} --labels labels.csv</span>.</p>
{% if review.without_images %}<p class="warn">Not in the review, no images stored: {% for st, n in review.without_images|dictsort %}{{ n }} {{ st }}{% if not loop.last %}, {% endif %}{% endfor %}{% if review.without_images.rejected %} (the run did not write rejects: set output.write_rejects to review rejected samples){% endif %}.</p>{% endif %}
{% if review["items"] %}
<section class="review"><!-- the sticky bar sticks within this section only -->
<div class="rvbar"><button type="button" id="download-labels">Download labels.csv</button><span id="review-count" class="mono"></span>
<span class="muted">{% for cell in review.cells %}{{ cell.recipe }}/{{ cell.status }} {{ cell.shown }} of {{ cell.available }}{% if not loop.last %} · {% endif %}{% endfor %}</span></div>
<div class="rvlist">
{% for it in review["items"] %}
<div class="rv" id="rv-{{ loop.index0 }}" data-key="{{ it.key }}" data-recipe="{{ it.recipe }}" data-status="{{ it.status }}" tabindex="-1">
<div class="trip">{% for src in it.images %}<figure><img src="{{ src }}" alt="{{ ("content", "style", "target")[loop.index0] }} of {{ it.key }}"><figcaption>{{ ("content", "style", "target")[loop.index0] }}</figcaption></figure>{% endfor %}</div>
<div class="meta">
<div><span class="badge">{{ it.recipe }}</span><span class="{{ it.status }}">{{ it.status }}</span> <span class="mono">{{ it.key }}</span><br>
<button type="button" class="mark-accept" data-label="accept">Accept (a)</button> <button type="button" class="mark-reject" data-label="reject">Reject (r)</button> <span class="lab"></span></div>
<table class="mono">{% for name, v in it.scores.items() %}<tr><td class="l">{{ name }}</td><td>{{ v|num }}</td></tr>{% endfor %}</table>
{% if it.reasons %}<ul class="mono">{% for reason in it.reasons %}<li>{{ reason }}</li>{% endfor %}</ul>{% endif %}
</div></div>
{% endfor %}
</div>
</section>
<script>
(function () {
  "use strict";
  var STORE = {{ review_store|tojson }};
  var cards = Array.prototype.slice.call(document.querySelectorAll(".rv"));
  var count = document.getElementById("review-count");
  var labels = {};
  try { labels = JSON.parse(localStorage.getItem(STORE) || "{}") || {}; } catch (e) { labels = {}; }
  var cur = 0;
  function save() { try { localStorage.setItem(STORE, JSON.stringify(labels)); } catch (e) {} }
  function paint() {
    var a = 0, r = 0;
    cards.forEach(function (c, i) {
      var l = labels[c.dataset.key];
      c.classList.toggle("l-accept", l === "accept");
      c.classList.toggle("l-reject", l === "reject");
      c.classList.toggle("current", i === cur);
      c.querySelector(".lab").textContent = l ? "marked " + l : "";
      if (l === "accept") a++; else if (l === "reject") r++;
    });
    count.textContent = (a + r) + " of " + cards.length + " marked: " + a + " accept, " + r + " reject";
  }
  function go(i, scroll) {
    cur = Math.max(0, Math.min(cards.length - 1, i));
    paint();
    if (scroll) cards[cur].scrollIntoView({block: "nearest"});
  }
  function mark(i, label) {
    var key = cards[i].dataset.key;
    if (label) labels[key] = label; else delete labels[key];
    save();
    go(label ? i + 1 : i, true);
  }
  function csv() {
    var seen = {}, lines = ["key,label,recipe,status"];
    cards.forEach(function (c) {
      seen[c.dataset.key] = true;
      if (labels[c.dataset.key]) lines.push([c.dataset.key, labels[c.dataset.key], c.dataset.recipe, c.dataset.status].join(","));
    });
    Object.keys(labels).forEach(function (k) { if (!seen[k]) lines.push([k, labels[k], "", ""].join(",")); });
    return lines.join("\\n") + "\\n";
  }
  window.styledistillLabelsCsv = csv;  // for scripts: the CSV the button downloads
  cards.forEach(function (c, i) {
    c.addEventListener("click", function (e) {
      var label = e.target.dataset && e.target.dataset.label;
      if (label) mark(i, label); else go(i, false);
    });
  });
  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    var t = e.target && e.target.tagName;
    if (t === "INPUT" || t === "TEXTAREA" || t === "SELECT") return;
    var k = e.key;
    if (k === "a") mark(cur, "accept");
    else if (k === "r") mark(cur, "reject");
    else if (k === "u") mark(cur, null);
    else if (k === "j" || k === "ArrowRight") go(cur + 1, true);
    else if (k === "k" || k === "ArrowLeft") go(cur - 1, true);
    else return;
    e.preventDefault();
  });
  document.getElementById("download-labels").addEventListener("click", function () {
    var url = URL.createObjectURL(new Blob([csv()], {type: "text/csv"}));
    var link = document.createElement("a");
    link.href = url;
    link.download = "labels.csv";
    document.body.appendChild(link);
    link.click();
    setTimeout(function () { URL.revokeObjectURL(url); link.remove(); }, 1000);
  });
  paint();
})();
</script>
{% else %}<p class="muted">No triplets with stored images to review.</p>{% endif %}

<h2 id="calibration">Calibration against labels</h2>
{% if calibration %}
{% set c = calibration %}
<p>From <b>{{ c.labels.used.accept }}</b> accept and <b>{{ c.labels.used.reject }}</b> reject labels{% if c.labels.unknown_keys %} ({{ c.labels.unknown_keys }} label(s) for keys not in this run){% endif %}{% if c.labels.failed_ignored %}; labelled failed samples ignored: {% for l, n in c.labels.failed_ignored|dictsort %}{{ l }} {{ n }}{% if not loop.last %}, {% endif %}{% endfor %}{% endif %}.
Target precision {{ c.settings.target_precision }}; no threshold is suggested from fewer than {{ c.settings.min_per_class }} labels per class; [a, b]: {{ (100 * c.settings.interval)|round|int }}% bootstrap interval over {{ c.settings.bootstrap_resamples }} resamples.{% if c.run.config_hash != s.run.config_hash %} <span class="rejected">Calibrated on config {{ c.run.config_hash }}, this run is {{ s.run.config_hash }}.</span>{% endif %}</p>
<table>
<tr><th class="l">configured rules vs labels</th><th>precision</th><th>recall</th><th>true accepts</th><th>false accepts</th><th>false rejects</th><th>true rejects</th></tr>
<tr><td class="l">all recipes</td><td>{{ c.rule_set.precision|num }}</td><td>{{ c.rule_set.recall|num }}</td><td>{{ c.rule_set.true_accepts }}</td><td>{{ c.rule_set.false_accepts }}</td><td>{{ c.rule_set.false_rejects }}</td><td>{{ c.rule_set.true_rejects }}</td></tr>
{% for r, m in c.rule_set.by_recipe.items() %}<tr><td class="l">{{ r }}</td><td>{{ m.precision|num }}</td><td>{{ m.recall|num }}</td><td>{{ m.true_accepts }}</td><td>{{ m.false_accepts }}</td><td>{{ m.false_rejects }}</td><td>{{ m.true_rejects }}</td></tr>{% endfor %}
<tr><td class="l">suggested rules (estimate, same labels)</td><td>{{ c.suggestion.estimate.precision|num }}</td><td>{{ c.suggestion.estimate.recall|num }}</td><td>{{ c.suggestion.estimate.true_accepts }}</td><td>{{ c.suggestion.estimate.false_accepts }}</td><td>{{ c.suggestion.estimate.false_rejects }}</td><td>{{ c.suggestion.estimate.true_rejects }}</td></tr>
</table>
{% if c.rule_set.by_rule %}
<p>Most false rejects: <b class="mono">{{ c.rule_set.most_false_rejects or "none" }}</b></p>
<table><tr><th class="l">rule</th><th>false rejects</th><th>of which sole cause</th><th>of which inherited</th><th>true rejects</th></tr>
{% for r in c.rule_set.by_rule %}<tr><td class="l mono">{{ r.rule }}</td><td>{{ r.false_rejects }}</td><td>{{ r.sole_false_rejects }}</td><td>{{ r.inherited_false_rejects }}</td><td>{{ r.true_rejects }}</td></tr>{% endfor %}
</table>
{% endif %}
<div class="legend"><span><i style="background:#1565c0;height:2px"></i>target precision</span><span><i style="background:#bbb;height:2px"></i>share of accept labels</span><span><i style="background:#2e7d32;border-radius:5px"></i>target-precision threshold</span><span><i style="background:#ef6c00;border-radius:5px"></i>best-F1 threshold</span></div>
<div class="prs">
{% for ch in c.charts %}
<div class="hcard pr-card" data-column="{{ ch.column }}">
<h3>{{ ch.column }}</h3>
{{ ch.svg }}
<p>{{ ch.a.labels.accept }} accept / {{ ch.a.labels.reject }} reject · AUC {{ ch.a.auc|num(3) }}{% if ch.a.auc_interval %} [{{ ch.a.auc_interval[0]|num(3) }}, {{ ch.a.auc_interval[1]|num(3) }}]{% endif %}{% if ch.a.direction %} · {{ ch.a.direction }}{% if not ch.a.separates %} <span class="muted">(not settled: the interval contains 0.5)</span>{% endif %}{% endif %}</p>
{% if ch.a.at_precision %}<p>precision ≥ {{ c.settings.target_precision }}: <b>{{ ch.a.bound }} {{ ch.a.at_precision.threshold|num }}</b>{% if ch.a.at_precision.interval %} [{{ ch.a.at_precision.interval[0]|num }}, {{ ch.a.at_precision.interval[1]|num }}]{% endif %} · recall {{ ch.a.at_precision.recall|num(3) }}</p>{% elif not ch.a.refused %}<p class="muted">no threshold reaches precision {{ c.settings.target_precision }}</p>{% endif %}
{% if ch.a.best_f1 %}<p>best F1 {{ ch.a.best_f1.f1|num(3) }}: {{ ch.a.bound }} {{ ch.a.best_f1.threshold|num }}{% if ch.a.best_f1.interval %} [{{ ch.a.best_f1.interval[0]|num }}, {{ ch.a.best_f1.interval[1]|num }}]{% endif %}</p>{% endif %}
{% if ch.a.refused %}<p class="muted">{{ ch.a.refused }}</p>{% endif %}
<p class="muted">by recipe: {% for r, ra in ch.a.by_recipe.items() %}{{ r }} {{ ra.labels.accept }}/{{ ra.labels.reject }}{% if ra.at_precision %} → {{ ra.bound }} {{ ra.at_precision.threshold|num }}{% endif %}{% if not loop.last %} · {% endif %}{% endfor %}</p>
</div>
{% endfor %}
</div>
<details open><summary>suggested filters (filters-suggested.yaml)</summary><pre class="suggested">{{ c.suggestion.yaml }}</pre></details>
{% else %}
<p class="muted">No calibration yet: label samples in the <a href="#review">review view</a>, download labels.csv, then run <span class="mono">styledistill calibrate {{ s.run.uri }} --labels labels.csv</span>.</p>
{% endif %}

<h2>Throughput by stage</h2>
{% if s.stages %}
<table>
<tr><th class="l">stage</th><th>actors</th><th>groups</th><th>samples</th><th>busy</th><th>samples / busy-s per actor</th><th>utilisation</th><th>Σ shard stage time</th><th>samples / shard-s</th><th class="l">nodes</th></tr>
{% for st in s.stages %}
<tr><td class="l">{{ st.stage }}</td><td>{{ st.actors|num }}</td><td>{{ st.groups|num }}</td><td>{{ st.samples|num }}</td><td>{{ st.busy_s|secs }}</td><td>{{ st.samples_per_busy_s|num(3) }}</td><td>{{ st.utilisation|pct }}</td><td>{{ st.shard_seconds|secs }}</td><td>{{ st.samples_per_shard_s|num(3) }}</td><td class="l mono">{{ st.nodes|length }}{% if st.nodes %}: {{ st.nodes[:4]|join(", ") }}{% if st.nodes|length > 4 %} …{% endif %}{% endif %}</td></tr>
{% endfor %}
</table>
{% if not s.throughput.metrics_present %}<p class="muted">metrics.json absent: Ray actor metrics unavailable, shard timings only.</p>{% endif %}
{% if s.throughput.attempts %}
<p class="muted">Actors, busy time and utilisation above add up every attempt of the run (utilisation: busy time over the actor-seconds each attempt had); its history:</p>
<table class="attempts">
<tr><th>attempt</th><th class="l">started</th><th class="l">executor</th><th>wall</th><th>shards written</th><th>shards skipped</th><th>samples</th><th>samples/s</th><th class="l">actors · utilisation by stage</th><th class="l">faults survived</th></tr>
{% for a in s.throughput.attempts %}
<tr><td>{{ a.attempt }}</td><td class="l mono">{{ a.started or "–" }}</td><td class="l">{{ a.executor or "–" }}</td><td>{{ a.wall_s|secs }}</td><td>{{ a.shards_written|num }}</td><td>{{ a.shards_skipped|num }}</td><td>{{ a.samples|num }}</td><td>{{ a.samples_per_s|num(3) }}</td><td class="l">{% for name, u in a.utilisation.items() %}{{ name }} {{ a.actors[name]|num }} · {{ u|pct }}{% if not loop.last %}; {% endif %}{% else %}nothing left to do{% endfor %}</td><td class="l">{{ a.faults|faults }}</td></tr>
{% endfor %}
</table>
{% endif %}
{% if s.throughput.faults %}<p class="faults">Faults the run survived (every attempt): {{ s.throughput.faults|faults }}. Each is logged where it happened; a sample it cost is a failed row with its reason.</p>
{% elif s.throughput.metrics_present %}<p class="muted">No faults: no batch was retried, no actor restarted, no call timed out.</p>{% endif %}
{% else %}<p class="muted">No stage timings.</p>{% endif %}

<h2>Sources</h2>
{% if s.sources %}
<table>
<tr><th class="l">pool</th>{% for st in s.sources.by_status %}<th>{{ st }}</th>{% endfor %}</tr>
{% for pool, counts in s.sources.by_pool.items() %}
<tr><td class="l mono">{{ pool }}</td>{% for st in s.sources.by_status %}<td>{{ counts.get(st, 0)|num }}</td>{% endfor %}</tr>
{% endfor %}
<tr><th class="l">all</th>{% for st, n in s.sources.by_status.items() %}<th>{{ n|num }}</th>{% endfor %}</tr>
</table>
<p class="muted">Usable sources by label: {% for label, n in s.sources.ok_by_label.items() %}{{ label }} {{ n|num }}{% if not loop.last %} · {% endif %}{% endfor %}</p>
{% if s.sources.failures %}
<table>
<tr><th class="l">failure</th><th>files</th><th class="l">example</th></tr>
{% for f in s.sources.failures %}
<tr><td class="l mono">{{ f.kind }}</td><td>{{ f.count|num }}</td><td class="l mono">{{ f.examples[0].uri }}<br>{{ f.examples[0].error }}</td></tr>
{% endfor %}
</table>
{% else %}<p class="muted">No source failed to load.</p>{% endif %}
{% else %}<p class="muted">sources.parquet absent.</p>{% endif %}

<h2>Shards</h2>
<details><summary>{{ s.shards|length }} complete shard(s)</summary>
<table>
<tr><th class="l">shard</th><th>planned</th><th>accepted</th><th>rejected</th><th>failed</th><th>tar</th><th class="l">check</th></tr>
{% for sh in s.shards %}
<tr><td class="l mono">{{ sh.name }}</td><td>{{ sh.planned|num }}</td><td>{{ sh.accepted|num }}</td><td>{{ sh.rejected|num }}</td><td>{{ sh.failed|num }}</td><td>{{ sh.tar_bytes|bytes }}</td><td class="l">{% if sh.consistent %}ok{% else %}<span class="rejected">stats ≠ manifest ({{ sh.rows|num }} rows)</span>{% endif %}</td></tr>
{% endfor %}
</table>
</details>

<h2>Configuration</h2>
<details><summary>run config (hash {{ s.run.config_hash }})</summary><pre>{{ config_json }}</pre></details>
</main></body></html>
"""
)
