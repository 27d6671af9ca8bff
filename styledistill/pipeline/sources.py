"""List the files of a source pool: a folder (recursive), a glob pattern, or a parquet/CSV manifest.

Folders and globs are listed in sorted path order; manifests in row order, streamed by parquet row group or
CSV chunk so a manifest of millions of rows is never held whole. Either order is deterministic, which is
what makes "the first copy is kept" in de-duplication reproducible.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
import pyarrow.parquet as pq

from styledistill.io import uris
from styledistill.schemas.config import SourcePool

LABELS = ("realistic", "stylized")
MANIFEST_SUFFIXES = (".parquet", ".csv")
GLOB_CHARS = "*?["
CHUNK_ROWS = 65_536


@dataclass(frozen=True)
class SourceEntry:
    uri: str
    label: str | None  # None: to be classified, or unusable (then `error` says why)
    pool: int
    error: str | None = None  # set when the manifest row itself is unusable; the scan records it as failed


def pool_kind(pool: SourcePool) -> str:
    """One of "glob", "manifest", "folder"; a glob character wins over a manifest suffix."""
    if any(c in pool.uri for c in GLOB_CHARS):
        return "glob"
    if pool.uri.lower().endswith(MANIFEST_SUFFIXES):
        return "manifest"
    return "folder"


def check_pool(pool: SourcePool, pool_index: int) -> None:
    """Raise now, naming the pool, if it cannot be listed: a scan then fails before it starts, not midway."""
    kind = pool_kind(pool)
    where = f"source pool {pool_index} ({pool.uri})"
    if pool.label == "column" and kind != "manifest":
        raise ValueError(f"{where}: label 'column' needs a parquet or csv manifest")
    if kind == "folder" and not uris.is_dir(pool.uri):
        raise FileNotFoundError(f"{where}: folder not found")
    if kind == "manifest":
        if not uris.exists(pool.uri):
            raise FileNotFoundError(f"{where}: manifest not found")
        present = _manifest_columns(pool.uri)
        for column in _wanted_columns(pool):
            if column not in present:
                raise ValueError(f"{where}: manifest has no column {column!r}; columns: {', '.join(present)}")


def iter_source_entries(pool: SourcePool, pool_index: int) -> Iterator[SourceEntry]:
    check_pool(pool, pool_index)
    kind = pool_kind(pool)
    if kind == "manifest":
        yield from _manifest_entries(pool, pool_index)
        return
    label = None if pool.label == "classify" else pool.label
    paths = uris.glob(pool.uri) if kind == "glob" else uris.find_files(pool.uri)
    extensions = {e.lower() for e in pool.extensions}
    for path in paths:
        if os.path.splitext(path)[1].lower() in extensions:
            yield SourceEntry(uri=path, label=label, pool=pool_index)


def _wanted_columns(pool: SourcePool) -> list[str]:
    return [pool.path_column] + ([pool.label_column] if pool.label == "column" else [])


def _manifest_columns(uri: str) -> list[str]:
    with uris.open_for_read(uri) as f:
        if uri.lower().endswith(".parquet"):
            return pq.ParquetFile(f).schema_arrow.names
        return pd.read_csv(f, nrows=0).columns.tolist()


def _manifest_entries(pool: SourcePool, pool_index: int) -> Iterator[SourceEntry]:
    columns = _wanted_columns(pool)
    base = uris.parent(pool.uri)
    row = 0
    for chunk in _manifest_chunks(pool.uri, columns):
        paths = chunk[pool.path_column]
        labels = chunk[pool.label_column] if pool.label == "column" else [None] * len(paths)
        for path, raw_label in zip(paths, labels):
            yield _manifest_entry(pool, pool_index, base, row, path, raw_label)
            row += 1


def _manifest_chunks(uri: str, columns: list[str]) -> Iterator[dict[str, list]]:
    """The manifest's `columns` as Python lists, one bounded chunk at a time."""
    with uris.open_for_read(uri) as f:
        if uri.lower().endswith(".parquet"):
            for batch in pq.ParquetFile(f).iter_batches(batch_size=CHUNK_ROWS, columns=columns):
                yield {name: batch.column(name).to_pylist() for name in columns}
        else:
            # dtype=str and no NA parsing: a path or label is text, an empty cell is "" not NaN.
            reader = pd.read_csv(f, usecols=columns, dtype=str, keep_default_na=False, chunksize=CHUNK_ROWS)
            for frame in reader:
                yield {name: frame[name].tolist() for name in columns}


def _manifest_entry(
    pool: SourcePool, pool_index: int, base: str, row: int, path: object, raw_label: object
) -> SourceEntry:
    if path is None or not str(path).strip():
        error = f"empty path in manifest row {row}"
        return SourceEntry(uri=f"{pool.uri}#row={row}", label=None, pool=pool_index, error=error)
    path = str(path).strip()
    uri = path if uris.is_url(path) or os.path.isabs(path) else uris.join(base, path)
    if pool.label == "classify":
        return SourceEntry(uri=uri, label=None, pool=pool_index)
    if pool.label in LABELS:
        return SourceEntry(uri=uri, label=pool.label, pool=pool_index)
    label = str(raw_label).strip().lower() if raw_label is not None else ""
    if label in LABELS:
        return SourceEntry(uri=uri, label=label, pool=pool_index)
    return SourceEntry(
        uri=uri,
        label=None,
        pool=pool_index,
        error=f"label column {pool.label_column!r} is {raw_label!r}; expected realistic or stylized",
    )
