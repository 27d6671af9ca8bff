"""Two or more run or audit folders side by side: `styledistill report A B --out compare.html`.

Built from each folder's summary (report/summary.py), so it reads what the single reports read: the funnel
(accepted / rejected / failed, by recipe), each score's distribution (quantiles and overlaid histograms,
as densities so datasets of different sizes compare), the top rejection rules and failure kinds, and where
each dataset came from (an audit's inputs).
"""

from __future__ import annotations

import json
from typing import Any

import jinja2
from markupsafe import Markup

from styledistill.io import uris
from styledistill.report.html import CSS, fmt_num, fmt_pct
from styledistill.report.summary import build_summary
from styledistill.schemas.recipes import recipe_sorted

PALETTE = ("#1565c0", "#e65100", "#2e7d32", "#6a1b9a", "#c62828", "#00838f")
QUANTILES = ("p05", "p25", "p50", "p75", "p95")
TOP = 8


def build_comparison(run_uris: list[str]) -> dict[str, Any]:
    summaries = [build_summary(uri) for uri in run_uris]
    datasets = []
    for n, (uri, s) in enumerate(zip(run_uris, summaries)):
        audit = s.get("audit")
        origin = ([f"{i['kind']}: {', '.join(([i['uri']] if i.get('uri') else []) + (i.get('uris') or []))}"
                   for i in audit["inputs"]] if audit else ["styledistill run"])
        datasets.append({"label": s["run"]["name"] or f"dataset {n + 1}", "uri": str(uri), "colour": PALETTE[n % len(PALETTE)],
                         "totals": s["totals"], "origin": origin, "config_hash": s["run"]["config_hash"]})
    recipes = recipe_sorted({r for s in summaries for r in s["recipes"]})
    columns = sorted({c for s in summaries for c in s["scores"]})
    scores = []
    for column in columns:
        per = [s["scores"].get(column) for s in summaries]
        scores.append({"column": column, "per": [{q: (p or {}).get(q) for q in ("count", "mean", *QUANTILES)}
                                                 for p in per],
                       "svg": Markup(overlay_svg([(p or {}).get("histogram") for p in per], datasets))})
    return {
        "datasets": datasets,
        "recipes": [{"recipe": r, "per": [s["recipes"].get(r) for s in summaries]} for r in recipes],
        "scores": scores,
        "reasons": [s["rejection_reasons"][:TOP] for s in summaries],
        "failures": [s["failures"][:TOP] for s in summaries],
    }


def overlay_svg(histograms: list[dict | None], datasets: list[dict], width: int = 420, height: int = 170) -> str:
    """Each dataset's histogram (all statuses) as a density step line over one shared x range."""
    series = []
    for hist, dataset in zip(histograms, datasets):
        if not hist or not hist.get("edges"):
            continue
        edges = hist["edges"]
        counts = [sum(c) for c in zip(*hist["counts"].values())] if hist["counts"] else [0] * (len(edges) - 1)
        total = sum(counts) or 1
        densities = [c / total / max(hi - lo, 1e-12) for c, lo, hi in zip(counts, edges, edges[1:])]
        series.append((edges, densities, dataset["colour"]))
    if not series:
        return ""
    low = min(s[0][0] for s in series)
    high = max(s[0][-1] for s in series)
    top = max(max(s[1]) for s in series) or 1.0
    pad_l, pad_b, pad_t = 8, 18, 6

    def x(v: float) -> float:
        return pad_l + (v - low) / ((high - low) or 1.0) * (width - 2 * pad_l)

    def y(d: float) -> float:
        return height - pad_b - d / top * (height - pad_b - pad_t)

    lines = []
    for edges, densities, colour in series:
        points = [f"{x(edges[0]):.1f},{y(0):.1f}"]
        for lo, hi, d in zip(edges, edges[1:], densities):
            points += [f"{x(lo):.1f},{y(d):.1f}", f"{x(hi):.1f},{y(d):.1f}"]
        points.append(f"{x(edges[-1]):.1f},{y(0):.1f}")
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{" ".join(points)}"/>')
    axis = (f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - pad_l}" y2="{height - pad_b}" stroke="#999"/>'
            f'<text class="tick" x="{pad_l}" y="{height - 4}">{fmt_num(low)}</text>'
            f'<text class="tick" x="{width - pad_l}" y="{height - 4}" text-anchor="end">{fmt_num(high)}</text>')
    return f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}">{axis}{"".join(lines)}</svg>'


def render_comparison(comparison: dict[str, Any]) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=fmt_num, pct=fmt_pct)
    return env.from_string(TEMPLATE).render(c=comparison, statuses=("accepted", "rejected", "failed"))


def write_comparison(run_uris: list[str], out_uri: str) -> str:
    comparison = build_comparison(run_uris)
    uris.write_text_atomic(out_uri, render_comparison(comparison))
    json_uri = out_uri.rsplit(".", 1)[0] + ".json" if out_uri.endswith(".html") else out_uri + ".json"
    plain = {**comparison, "scores": [{k: v for k, v in s.items() if k != "svg"} for s in comparison["scores"]]}
    uris.write_text_atomic(json_uri, json.dumps(plain, indent=1, sort_keys=True, default=str))
    return out_uri


TEMPLATE = (
    """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>styledistill comparison</title><style>"""
    + CSS
    + """</style></head><body><main>
<h1>Datasets compared</h1>
<table><tr><th class="l">dataset</th><th class="l">from</th><th>samples</th>{% for st in statuses %}<th class="{{ st }}">{{ st }}</th>{% endfor %}<th>accepted / total</th></tr>
{% for d in c.datasets %}<tr><td class="l"><span style="color:{{ d.colour }}">&#9632;</span> <b>{{ d.label }}</b><div class="mono muted">{{ d.uri }} · {{ d.config_hash }}</div></td>
<td class="l mono">{% for o in d.origin %}<div>{{ o }}</div>{% endfor %}</td><td>{{ d.totals.samples|num }}</td>
{% for st in statuses %}<td>{{ d.totals[st]|num }}</td>{% endfor %}<td>{{ d.totals.acceptance_rate|pct }}</td></tr>{% endfor %}
</table>
<h2>Acceptance by recipe</h2>
<table><tr><th class="l">recipe</th>{% for d in c.datasets %}<th style="color:{{ d.colour }}">{{ d.label }}</th>{% endfor %}</tr>
{% for r in c.recipes %}<tr><td class="l">{{ r.recipe }}</td>{% for p in r.per %}<td>{% if p %}{{ p.accepted|num }} / {{ p.total|num }} ({{ p.acceptance_rate|pct }}){% else %}–{% endif %}</td>{% endfor %}</tr>{% endfor %}
</table>
<h2>Scores</h2>
<div class="hists">
{% for s in c.scores %}<div class="hcard"><h3>{{ s.column }}</h3>{{ s.svg }}
<table><tr><th class="l"></th><th>n</th><th>mean</th><th>p05</th><th>p50</th><th>p95</th></tr>
{% for p in s.per %}<tr><td class="l" style="color:{{ c.datasets[loop.index0].colour }}">{{ c.datasets[loop.index0].label }}</td><td>{{ p.count|num }}</td><td>{{ p.mean|num }}</td><td>{{ p.p05|num }}</td><td>{{ p.p50|num }}</td><td>{{ p.p95|num }}</td></tr>{% endfor %}
</table></div>{% endfor %}
</div>
<h2>Top rejection rules and failures</h2>
<div class="hists">
{% for d in c.datasets %}<div class="hcard"><h3 style="color:{{ d.colour }}">{{ d.label }}</h3>
<table><tr><th class="l">rejected by</th><th>samples</th><th>share</th></tr>{% for r in c.reasons[loop.index0] %}<tr><td class="l mono">{{ r.rule }}{% if r.inherited %} (inherited){% endif %}</td><td>{{ r.count|num }}</td><td>{{ r.share|pct }}</td></tr>{% endfor %}</table>
<table><tr><th class="l">failed: kind</th><th>samples</th></tr>{% for f in c.failures[loop.index0] %}<tr><td class="l mono">{{ f.kind }}</td><td>{{ f.count|num }}</td></tr>{% endfor %}</table>
</div>{% endfor %}
</div>
</main></body></html>
"""
)
