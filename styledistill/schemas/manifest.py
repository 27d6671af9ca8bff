"""The on-disk contract of a run folder: file names, tar members, manifest columns.

Readers (the trainer in jobs/, the report, users' notebooks) import names from here rather than spelling
them, so a layout change is one edit.

    <run>/run.json                     config, its hash, library versions (written first)
    <run>/sources.parquet              one row per source file: ok, failed (reason) or duplicate
    <run>/shards/<prefix>-000000.tar   accepted samples (webdataset)
    <run>/shards/<prefix>-000000.parquet        one row per planned sample of the shard
    <run>/shards/<prefix>-000000_stats.json     written last: its presence means the shard is complete
    <run>/rejects/<prefix>-000000.tar  rejected samples, when output.write_rejects
    <run>/thumbs/<prefix>-000000.json  a few triplet thumbnails (base64 JPEG) for the report
    <run>/shards/sizes.json            {shard tar name: accepted count}, where OpenCLIP looks for it
    <run>/wids-index.json              wids shard index, urls relative to the run folder
    <run>/summary.json, <run>/report.html       the quality report
    <run>/inputs.json                  an audit only: what was read from each input file, what was skipped
"""

from __future__ import annotations

import pyarrow as pa

RUN_FILE = "run.json"
SOURCES_FILE = "sources.parquet"
SHARDS_DIR = "shards"
REJECTS_DIR = "rejects"
THUMBS_DIR = "thumbs"
SIZES_FILE = "sizes.json"
WIDS_INDEX_FILE = "wids-index.json"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
METRICS_FILE = "metrics.json"
AUDIT_INPUTS_FILE = "inputs.json"  # an audit's inputs: per input file, samples read, members skipped, read error

# Tar members of one sample: "<key>.<member>". The image extension follows output.image_format.
CONTENT_MEMBER = "content"
STYLE_MEMBER = "style"
TARGET_MEMBER = "target"
TEXT_MEMBER = "txt"  # the instruction
META_MEMBER = "json"

ACCEPTED, REJECTED, FAILED = "accepted", "rejected", "failed"
SCORE_PREFIX = "score."  # manifest columns "score.<scorer>.<name>"


def score_column(score: str) -> str:
    """The manifest column of a score name ("effnet.content_cos" -> "score.effnet.content_cos")."""
    return score if score.startswith(SCORE_PREFIX) else SCORE_PREFIX + score


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}"


STATS_SUFFIX = "_stats.json"


def stats_name(shard: str) -> str:
    return f"{shard}{STATS_SUFFIX}"


def is_stats_name(file_name: str) -> bool:
    return file_name.endswith(STATS_SUFFIX)


# One structured reason (filters.decide.Reason): what the report and the calibration read.
REASON_TYPE = pa.struct([
    ("kind", pa.string()),  # band | missing | duplicate | failure
    ("text", pa.string()),
    ("rule", pa.string()),  # "rules.N" or "generation_rules.N"
    ("score", pa.string()),
    ("bound", pa.string()),  # min | max
    ("threshold", pa.float64()),
    ("value", pa.float64()),
    ("inherited_from", pa.string()),  # the parent generation slot r_i
    ("duplicate_of", pa.string()),
])

# The fixed columns of a shard manifest; score columns ("score.<name>", float64) follow them.
MANIFEST_COLUMNS = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.int32()),
        ("group_id", pa.string()),
        ("recipe", pa.string()),
        ("status", pa.string()),  # accepted | rejected | failed
        ("reasons", pa.list_(pa.string())),  # every failing rule, or the failure, as one line each
        ("reason_details", pa.list_(REASON_TYPE)),  # the same reasons, structured (filters/decide.py)
        ("error", pa.string()),  # failed only: what went wrong, where
        ("instruction", pa.string()),
        ("content_slot", pa.string()),
        ("style_slot", pa.string()),
        ("target_slot", pa.string()),
        ("content_sha256", pa.string()),  # of the encoded image bytes as stored
        ("style_sha256", pa.string()),
        ("target_sha256", pa.string()),
        ("seed", pa.int64()),
        ("lineage", pa.string()),  # JSON: sources (uri, sha256), parent generations, seeds
        ("generation_scores", pa.string()),  # JSON: scores of each parent generation r_i, by slot (for re-deciding)
        ("notes", pa.string()),  # JSON: scorer notes, enhanced prompts
    ]
)
