"""Benchmark: `refilter` over a large run against what a user would do instead, a full rerun.

A source run is built from the demo's real scores and images: the demo runs inline once (its samples/s is
also the full-rerun rate), then its samples are repeated, with new keys, into shards of `rows_per_shard`
rows, written through the same shard sink as a run. Images are re-encoded as 96 px JPEG so 10k samples stay
~100 MB on disk: refilter copies image bytes, it never decodes them, so their size only scales the I/O. Refilter then runs in a child process
(wall time, peak PSS) over the first tenth of the shards and over all of them: memory must not grow with the
number of shards (it streams one shard at a time).

    styledistill benchmark-refilter --rows 10000
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image
from rich.console import Console
from rich.table import Table

from styledistill.io.tars import read_samples
from styledistill.schemas import manifest as mf
from styledistill.tools.bench import DEMO_CONFIG, run_measured

SHARD_INDEX = re.compile(r"-(\d{6})(?:\.|_stats)")
# Loosen one demo rule and tighten another, so samples move both ways.
CHANGE = ["filters.rules.1.min=-1", "filters.rules.3.min=0.07"]


def build_source(workdir: Path, rows: int, rows_per_shard: int) -> tuple[Path, float]:
    """A run folder of `rows` samples; returns it and the full pipeline's samples/s on the demo (inline)."""
    from styledistill.pipeline.run import finished_shards, run_pipeline, write_indexes
    from styledistill.pipeline.sink import ShardSink
    from styledistill.schemas.config import load_config
    from styledistill.tools.sample_data import build_sample_data

    sample_dir = workdir / "sample-data"
    build_sample_data(sample_dir, with_bad_files=False)
    demo_uri = workdir / "demo-run"
    shutil.rmtree(demo_uri, ignore_errors=True)
    demo = load_config(Path(str(DEMO_CONFIG)), [f"sources.0.uri={sample_dir / 'realistic'}",
                                                 f"sources.1.uri={sample_dir / 'stylized'}", f"output.uri={demo_uri}"])
    outcome = run_pipeline(demo, inline=True, report=False)
    pipeline_rate = sum(outcome.counts.values()) / outcome.wall_s

    rows_in, samples = [], {}
    for stats in finished_shards(str(demo_uri)).values():
        rows_in += pq.read_table(demo_uri / mf.SHARDS_DIR / f"{stats['name']}.parquet").to_pylist()
        for folder in (mf.SHARDS_DIR, mf.REJECTS_DIR):
            samples.update(read_samples(str(demo_uri / folder / f"{stats['name']}.tar")))
    rows_in = [r for r in rows_in if r["status"] != mf.FAILED]

    source = workdir / f"source-{rows}"
    shutil.rmtree(source, ignore_errors=True)
    config = demo.model_copy(update={"output": demo.output.model_copy(update={"uri": str(source),
                                                                               "image_format": "jpg"})})
    data = json.loads((demo_uri / mf.RUN_FILE).read_text())
    data["config"]["output"]["image_format"] = "jpg"
    small = {key: _small_jpeg_sample(stored) for key, stored in samples.items()}
    (source / mf.SHARDS_DIR).mkdir(parents=True)
    (source / mf.RUN_FILE).write_text(json.dumps(data))
    n = 0
    for shard in range((rows + rows_per_shard - 1) // rows_per_shard):
        with ShardSink(str(source), config.output, shard) as sink:
            for _ in range(min(rows_per_shard, rows - n)):
                row = dict(rows_in[n % len(rows_in)])
                stored = small[row["key"]]
                key = f"{row['key']}x{n}"  # a new sample: new key, and a signature no other sample has
                row.update(key=key, shard=shard, content_sha256=f"{row['content_sha256']}x{n}")
                sink.add(row, {"__key__": key, **stored})
                n += 1
            sink.finish(rows_per_shard, {}, {})
    write_indexes(config, str(source), (rows + rows_per_shard - 1) // rows_per_shard)
    return source, pipeline_rate


def _small_jpeg_sample(stored: dict[str, bytes]) -> dict[str, bytes]:
    """The sample with its three images as 96 px high JPEG (members renamed .png -> .jpg)."""
    out = {}
    for member, data in stored.items():
        role, _, ext = member.partition(".")
        if ext == "png":
            with Image.open(io.BytesIO(data)) as image:
                small = image.convert("RGB").resize((max(1, image.width * 96 // image.height), 96))
            buf = io.BytesIO()
            small.save(buf, format="JPEG", quality=85)
            out[f"{role}.jpg"] = buf.getvalue()
        else:
            out[member] = data
    return out


def _child(source: str, out: str) -> None:
    """Refilter the run at `source` into `out`; prints {"rows", "wall_s"}."""
    from styledistill.pipeline.refilter import refilter_run, refiltered_config
    from styledistill.schemas.config import parse_config

    meta = json.loads((Path(source) / mf.RUN_FILE).read_text())
    config = refiltered_config(parse_config(meta["config"]), out, None, CHANGE)
    start = time.perf_counter()
    outcome = refilter_run(source, config)
    print(json.dumps({"rows": sum(outcome.counts.values()), "wall_s": time.perf_counter() - start}))


def subset(source: Path, shards: int) -> Path:
    """The first `shards` shards of `source` as a run folder of their own (hard links, no copies)."""
    target = source.with_name(f"{source.name}-first{shards}")
    shutil.rmtree(target, ignore_errors=True)
    (target / mf.RUN_FILE).parent.mkdir(parents=True)
    (target / mf.RUN_FILE).write_text((source / mf.RUN_FILE).read_text())
    for folder in (mf.SHARDS_DIR, mf.REJECTS_DIR):
        (target / folder).mkdir()
        for path in (source / folder).iterdir():
            index = SHARD_INDEX.search(path.name)  # sizes.json and other indexes have none
            if index and int(index.group(1)) < shards:
                (target / folder / path.name).hardlink_to(path)
    return target


def run_refilter_benchmark(rows: int, rows_per_shard: int, workdir: Path, console: Console) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    console.print(f"building a source run of {rows} samples ...")
    source, pipeline_rate = build_source(workdir, rows, rows_per_shard)
    shards = (rows + rows_per_shard - 1) // rows_per_shard
    table = Table("what", "shards", "samples", "wall s", "samples/s", "peak PSS MB")
    peaks = []
    for count in (max(1, shards // 10), shards):
        folder = source if count == shards else subset(source, count)
        out = workdir / f"refiltered-{count}"
        shutil.rmtree(out, ignore_errors=True)
        result, peak = run_measured([sys.executable, "-m", "styledistill.tools.bench_refilter", str(folder), str(out)])
        peaks.append(peak)
        table.add_row("refilter", str(count), str(result["rows"]), f"{result['wall_s']:.1f}",
                      f"{result['rows'] / result['wall_s']:.0f}", f"{peak:.0f}")
    table.add_row("full rerun (pipeline, inline, measured on the demo)", str(shards), str(rows),
                  f"{rows / pipeline_rate:.0f}", f"{pipeline_rate:.2f}", "")
    console.print(table)
    console.print(f"peak memory at {shards} shards / at {max(1, shards // 10)}: {peaks[1] / peaks[0]:.2f}x "
                  "(target: flat; refilter streams one shard at a time)")


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
