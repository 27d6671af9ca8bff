"""Reading a finished run folder: its complete shards and the manifest columns a reader needs.

The report, `calibrate` and `refilter` read runs through these, so what "complete" means (the stats file
exists, written last) is decided in one place.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from styledistill.io import uris
from styledistill.schemas.manifest import SHARDS_DIR, STATS_SUFFIX, is_stats_name


def list_shards(run_uri: str) -> tuple[list[str], list[str], list[str]]:
    """(complete, incomplete, stats_without_manifest) shard names: a shard is complete once its stats exist."""
    shards_dir = uris.join(run_uri, SHARDS_DIR)
    if not uris.exists(shards_dir):
        return [], [], []
    names = set(uris.listdir(shards_dir))
    manifests = {n[: -len(".parquet")] for n in names if n.endswith(".parquet")}
    stats = {n[: -len(STATS_SUFFIX)] for n in names if is_stats_name(n)}
    return sorted(manifests & stats), sorted(manifests - stats), sorted(stats - manifests)


def read_columns(uri: str, wanted: tuple[str, ...], prefix: str | None = None) -> pa.Table:
    """The `wanted` columns that exist, plus any starting with `prefix`. Only those column chunks are read,
    so the other columns of a manifest (lineage, notes) never leave storage."""
    with uris.open_for_read(uri) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        columns = [c for c in wanted if c in names] + [c for c in names if prefix and c.startswith(prefix)]
        return parquet.read(columns=columns)


def iter_manifests(run_uri: str, wanted: tuple[str, ...], prefix: str | None = None):
    """(shard name, table of the `wanted` columns that exist plus those starting with `prefix`) for every
    complete shard, in shard order."""
    shards_dir = uris.join(run_uri, SHARDS_DIR)
    for name in list_shards(run_uri)[0]:
        yield name, read_columns(uris.join(shards_dir, name + ".parquet"), wanted, prefix)


def manifest_rows(run_uri: str, wanted: tuple[str, ...], prefix: str | None = None) -> list[dict[str, Any]]:
    """Every row of the complete shards as a dict (the `wanted` columns, the `prefix` ones, and `_shard`,
    the shard's name). For what reads a few columns of every sample: the review sample, the calibration."""
    rows = []
    for name, table in iter_manifests(run_uri, wanted, prefix):
        for row in table.to_pylist():
            row["_shard"] = name
            rows.append(row)
    return rows
