"""The files of one shard, written whole or not at all: the sink that `run`, `refilter` and `audit` share.

A shard is its accepted tar, its rejects tar (when `output.write_rejects`), its manifest (one row per
planned sample), a few thumbnails for the report and, last, `<shard>_stats.json`. Each file goes to a temp
name and is renamed when complete, and the stats file comes last, so its presence is the only proof a shard
is done (as in img2dataset). Leaving the `with` block on an error deletes whatever was being written.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from styledistill.io import uris
from styledistill.schemas import manifest as mf
from styledistill.schemas.config import OutputConfig
from styledistill.schemas.records import ShardResult

THUMB_HEIGHT = 96
THUMBS_PER_STATUS = 3  # per shard: enough for the report's grids, small enough to never matter
# Fixed owner and time: the same samples always give the same tar bytes.
TAR_OPTIONS = {"encoder": False, "mtime": 0.0, "user": "styledistill", "group": "styledistill"}


def sample_record(key: str, image_ext: str, images: tuple[bytes, bytes, bytes], instruction: str,
                  meta: dict) -> dict:
    """A webdataset sample in our layout: content, style, target images, the instruction and the metadata."""
    return {
        "__key__": key,
        f"{mf.CONTENT_MEMBER}.{image_ext}": images[0],
        f"{mf.STYLE_MEMBER}.{image_ext}": images[1],
        f"{mf.TARGET_MEMBER}.{image_ext}": images[2],
        mf.TEXT_MEMBER: instruction.encode(),
        mf.META_MEMBER: json.dumps(meta, sort_keys=True).encode(),
    }


def sample_images(sample: dict, image_ext: str) -> tuple[bytes, bytes, bytes]:
    return tuple(sample[f"{role}.{image_ext}"] for role in (mf.CONTENT_MEMBER, mf.STYLE_MEMBER, mf.TARGET_MEMBER))


def manifest_bytes(rows: list[dict]) -> bytes:
    """The manifest's fixed columns, then one float64 column per score any row has."""
    score_columns = sorted({k for row in rows for k in row if k.startswith(mf.SCORE_PREFIX)})
    schema = mf.MANIFEST_COLUMNS
    for column in score_columns:
        schema = schema.append(pa.field(column, pa.float64()))
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def thumbnail_jpeg(images: tuple[bytes, bytes, bytes]) -> str:
    """content | style | target side by side, THUMB_HEIGHT high, as base64 JPEG."""
    panels = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    panels = [p.resize((max(1, round(p.width * THUMB_HEIGHT / p.height)), THUMB_HEIGHT)) for p in panels]
    strip = Image.new("RGB", (sum(p.width for p in panels) + 8, THUMB_HEIGHT), "white")
    x = 0
    for panel in panels:
        strip.paste(panel, (x, 0))
        x += panel.width + 4
    buf = io.BytesIO()
    strip.save(buf, format="JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode()


class ShardSink:
    """`with ShardSink(...) as sink: sink.add(row, sample); result = sink.finish(...)`."""

    def __init__(self, run_uri: str, output: OutputConfig, shard: int):
        self.run_uri, self.output, self.shard = run_uri, output, shard
        self.name = mf.shard_name(output.shard_prefix, shard)
        self.tar_uri = uris.join(run_uri, mf.SHARDS_DIR, f"{self.name}.tar")
        self.rows: list[dict] = []
        self.thumbs: dict[str, dict] = {}
        self.counts: Counter = Counter()

    def __enter__(self) -> ShardSink:
        import webdataset as wds  # it imports torch: only where shards are written, not in a Ray driver

        self._files = ExitStack()
        self.tar = wds.TarWriter(self._files.enter_context(uris.open_for_write_atomic(self.tar_uri)), **TAR_OPTIONS)
        self.rejects = None
        if self.output.write_rejects:
            rejects_uri = uris.join(self.run_uri, mf.REJECTS_DIR, f"{self.name}.tar")
            self.rejects = wds.TarWriter(self._files.enter_context(uris.open_for_write_atomic(rejects_uri)),
                                         **TAR_OPTIONS)
        return self

    def add(self, row: dict, sample: dict | None) -> None:
        """One manifest row; its sample goes to the tar of its status (a failed row has none)."""
        self.rows.append(row)
        self.counts[row["status"]] += 1
        if sample is None:
            return
        writer = self.tar if row["status"] == mf.ACCEPTED else self.rejects
        if writer is not None:
            writer.write(sample)
        if sum(t["status"] == row["status"] for t in self.thumbs.values()) < THUMBS_PER_STATUS:
            self.thumbs[row["key"]] = {"recipe": row["recipe"], "status": row["status"], "reasons": row["reasons"],
                                       "jpeg_b64": thumbnail_jpeg(sample_images(sample, self.output.image_format))}

    def finish(self, groups: int, stage_seconds: dict[str, float], nodes: dict[str, list[str]]) -> ShardResult:
        """Close the tars, then write the manifest, the thumbnails and, last, the stats file."""
        for writer in (self.tar, self.rejects):
            if writer is not None:
                writer.close()
        self._files.close()  # the tars are complete: moved to their final names
        fs, tar_path = uris.filesystem(self.tar_uri)
        shards_dir = uris.join(self.run_uri, mf.SHARDS_DIR)
        uris.write_bytes_atomic(uris.join(shards_dir, f"{self.name}.parquet"), manifest_bytes(self.rows))
        uris.write_text_atomic(uris.join(self.run_uri, mf.THUMBS_DIR, f"{self.name}.json"), json.dumps(self.thumbs))
        result = ShardResult(shard=self.shard, name=self.name, groups=groups, planned=len(self.rows),
                             accepted=self.counts[mf.ACCEPTED], rejected=self.counts[mf.REJECTED],
                             failed=self.counts[mf.FAILED], tar_bytes=fs.size(tar_path),
                             stage_seconds=dict(stage_seconds), nodes=nodes)
        uris.write_text_atomic(uris.join(shards_dir, mf.stats_name(self.name)), json.dumps(asdict(result), indent=1))
        return result

    def __exit__(self, exc_type, exc, traceback) -> None:
        # On an error before finish() (a full disk, ...) the tar streams are closed now, not by a finaliser
        # that would write to a file already gone, and their temp files are deleted; after finish(), nothing
        # is left open.
        if exc_type is not None:
            for writer in (self.tar, self.rejects):
                if writer is not None:
                    with contextlib.suppress(Exception):
                        writer.close()
        self._files.__exit__(exc_type, exc, traceback)
