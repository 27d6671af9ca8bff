"""Scan every source pool once: decode, validate, label, de-duplicate, and record it in sources.parquet.

Decoding runs as Ray tasks over chunks of entries for a Ray run (in-process for an inline run or a plan). Results are taken
back in submission order, so labels and "the first copy is kept" never depend on which task finished first.
A bad file becomes a `failed` row with its reason; nothing here stops for one. An existing sources.parquet
is reused as is (resume), so a restarted run plans from exactly the same sources.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from PIL import Image

from styledistill.filters.dedup import Deduplicator
from styledistill.io import uris
from styledistill.pipeline.images import ImageError, load_image, phash
from styledistill.pipeline.sources import LABELS, SourceEntry, check_pool, iter_source_entries
from styledistill.schemas.config import DecodeLimits, RunConfig
from styledistill.schemas.manifest import SOURCES_FILE
from styledistill.schemas.records import SourceImage

OK, FAILED, DUPLICATE, UNLABELLED = "ok", "failed", "duplicate", "unlabelled"
CHUNK_ENTRIES = 32  # entries per decode task: big enough to amortise task overhead, small for balance
ROWS_PER_GROUP = 8192  # rows buffered before a parquet row group is written
LABEL_VIEW_EDGE = 448  # classify pools send the labeler a view this size, to keep task results small

SOURCES_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("pool", pa.int32()),
        ("label", pa.string()),  # realistic | stylized; null when unknown
        ("status", pa.string()),  # ok | failed | duplicate | unlabelled
        ("error", pa.string()),  # why failed / unlabelled
        ("sha256", pa.string()),  # of the file bytes
        ("width", pa.int32()),  # after EXIF orientation
        ("height", pa.int32()),
        ("phash", pa.string()),  # 16 hex digits
        ("duplicate_of", pa.string()),  # uri of the kept copy
    ]
)


@dataclass
class Decoded:
    """What a decode task sends back for one entry (no full-size pixels)."""

    error: str | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    phash: int | None = None
    label_view: np.ndarray | None = None  # only for entries the labeler must classify


def decode_chunk(
    entries: list[SourceEntry], limits: DecodeLimits, classify_pools: frozenset[int]
) -> list[Decoded]:
    results = []
    for entry in entries:
        if entry.error is not None:
            results.append(Decoded(error=entry.error))
            continue
        try:
            image = load_image(entry.uri, limits)
        except ImageError as err:
            results.append(Decoded(error=str(err)))
            continue
        except Exception as err:  # noqa: BLE001 - a storage or decoder fault of one file, never the scan's end
            results.append(Decoded(error=f"{type(err).__name__}: {err}"))
            continue
        h, w = image.array.shape[:2]
        view = _label_view(image.array) if entry.pool in classify_pools else None
        results.append(
            Decoded(sha256=image.sha256, width=w, height=h, phash=phash(image.array), label_view=view)
        )
    return results


def _label_view(arr: np.ndarray) -> np.ndarray:
    img = Image.fromarray(arr)
    img.thumbnail((LABEL_VIEW_EDGE, LABEL_VIEW_EDGE), Image.Resampling.LANCZOS)  # only ever shrinks
    return np.asarray(img)


_decode_chunk_task = ray.remote(num_cpus=1)(decode_chunk)


def scan_sources(config: RunConfig, run_uri: str, labeler: Any = None,
                 on_chunk: Callable[[int], None] | None = None, use_ray: bool = False) -> list[SourceImage]:
    """Scan (or reuse the scan of) every pool; `on_chunk(n)` reports progress, n files at a time.

    With `use_ray`, files are decoded in Ray tasks (Ray must be up); otherwise in this process.
    """
    out = uris.join(run_uri, SOURCES_FILE)
    if uris.exists(out):
        return read_sources(out)
    classify_pools = frozenset(i for i, pool in enumerate(config.sources) if pool.label == "classify")
    if classify_pools and labeler is None:
        index = min(classify_pools)
        raise ValueError(
            f"source pool {index} ({config.sources[index].uri}) has label 'classify' but no labeler is "
            "configured; set `labeler:` in the config or give the pool a label"
        )
    for index, pool in enumerate(config.sources):
        check_pool(pool, index)
    dedup = Deduplicator(config.filters.dedup.exact, config.filters.dedup.phash_max_distance)
    kept: list[SourceImage] = []
    rows: list[dict[str, Any]] = []
    with uris.open_for_write_atomic(out) as f, pq.ParquetWriter(f, SOURCES_SCHEMA) as writer:
        for chunk, decoded in _decode_all(config, classify_pools, use_ray):
            labels = _labels(chunk, decoded, classify_pools, labeler)
            for entry, result, (label, note) in zip(chunk, decoded, labels):
                row = _row(entry, result, label, note, dedup)
                rows.append(row)
                if row["status"] == OK:
                    kept.append(_source_image(row))
            if on_chunk is not None:
                on_chunk(len(chunk))
            if len(rows) >= ROWS_PER_GROUP:
                writer.write_table(pa.Table.from_pylist(rows, schema=SOURCES_SCHEMA))
                rows = []
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=SOURCES_SCHEMA))
    return kept


def _entries(config: RunConfig) -> Iterator[SourceEntry]:
    for index, pool in enumerate(config.sources):
        yield from iter_source_entries(pool, index)


def _chunks(entries: Iterable[SourceEntry]) -> Iterator[list[SourceEntry]]:
    it = iter(entries)
    while chunk := list(islice(it, CHUNK_ENTRIES)):
        yield chunk


def _decode_all(
    config: RunConfig, classify_pools: frozenset[int], use_ray: bool
) -> Iterator[tuple[list[SourceEntry], list[Decoded]]]:
    """(chunk, results) in entry order; on Ray with a bounded number of tasks in flight."""
    chunks = _chunks(_entries(config))
    if not use_ray:
        for chunk in chunks:
            yield chunk, decode_chunk(chunk, config.decode, classify_pools)
        return
    max_in_flight = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    in_flight: deque[tuple[list[SourceEntry], ray.ObjectRef]] = deque()
    for chunk in chunks:
        in_flight.append((chunk, _decode_chunk_task.remote(chunk, config.decode, classify_pools)))
        if len(in_flight) >= max_in_flight:
            done, ref = in_flight.popleft()
            yield done, ray.get(ref)
    while in_flight:
        done, ref = in_flight.popleft()
        yield done, ray.get(ref)


def _labels(
    chunk: list[SourceEntry], decoded: list[Decoded], classify_pools: frozenset[int], labeler: Any
) -> list[tuple[str | None, str | None]]:
    """(label, note) per entry; the labeler sees the chunk's decodable classify entries in one batch."""
    labels: list[tuple[str | None, str | None]] = [(entry.label, None) for entry in chunk]
    asked = [
        i for i, (e, d) in enumerate(zip(chunk, decoded)) if e.pool in classify_pools and d.error is None
    ]
    if not asked:
        return labels
    answers = labeler.label([decoded[i].label_view for i in asked])
    if len(answers) != len(asked):
        raise ValueError(f"labeler returned {len(answers)} labels for {len(asked)} images")
    for i, (label, probability) in zip(asked, answers):
        if label is not None and label not in LABELS:
            raise ValueError(f"labeler returned label {label!r}; expected realistic, stylized or None")
        note = None if label is not None else f"labeler abstained (p={probability:.3f})"
        labels[i] = (label, note)
    return labels


def _row(
    entry: SourceEntry, result: Decoded, label: str | None, note: str | None, dedup: Deduplicator
) -> dict:
    row = {
        "uri": entry.uri,
        "pool": entry.pool,
        "label": label,
        "status": OK,
        "error": result.error,
        "sha256": result.sha256,
        "width": result.width,
        "height": result.height,
        "phash": f"{result.phash:016x}" if result.phash is not None else None,
        "duplicate_of": None,
    }
    if result.error is not None:
        row["status"] = FAILED
    elif label is None:
        row["status"], row["error"] = UNLABELLED, note
    else:
        # Only usable images enter the dedup index, so a kept copy is always an ok row.
        kept = dedup.check(entry.uri, result.sha256, result.phash)
        if kept is not None:
            row["status"], row["duplicate_of"] = DUPLICATE, kept
    return row


def _source_image(row: dict) -> SourceImage:
    return SourceImage(
        uri=row["uri"],
        label=row["label"],
        sha256=row["sha256"],
        width=row["width"],
        height=row["height"],
    )


def read_sources(uri: str) -> list[SourceImage]:
    """The ok rows of an existing sources.parquet, in file order."""
    with uris.open_for_read(uri) as f:
        table = pq.read_table(f, columns=["uri", "label", "status", "sha256", "width", "height"])
    table = table.filter(pc.equal(table["status"], OK))
    return [_source_image(row) for row in table.to_pylist()]
