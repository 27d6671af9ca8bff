"""The quality report of a run: summary.json (the numbers) and report.html (a page to audit them)."""

from __future__ import annotations

import json

from styledistill.report.html import REVIEW_PER_CELL, render_report
from styledistill.io import uris
from styledistill.report.summary import build_summary
from styledistill.schemas.manifest import REPORT_FILE, SUMMARY_FILE

__all__ = ["build_summary", "render_report", "write_report"]


def write_report(run_uri: str, review_per_cell: int = REVIEW_PER_CELL) -> tuple[str, str]:
    """Summarise the run folder and write <run>/summary.json and <run>/report.html; returns their paths.
    `review_per_cell`: triplets per recipe x status in the report's review view (0: none)."""
    summary = build_summary(run_uri)
    summary_uri = uris.join(run_uri, SUMMARY_FILE)
    report_uri = uris.join(run_uri, REPORT_FILE)
    uris.write_text_atomic(summary_uri, json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n")
    uris.write_text_atomic(report_uri, render_report(summary, run_uri, review_per_cell))
    return summary_uri, report_uri
