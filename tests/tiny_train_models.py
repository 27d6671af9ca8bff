"""Trainer fixtures: small run folders in the pipeline's on-disk layout (see schemas/manifest.py).

The tiny pipeline the trainers load is `tiny_qwen.build_tiny_pipeline`; this module only adds data.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from styledistill.schemas import manifest as mf


# What the writer stores in `.txt` when the run appends enhanced prompts: the final instruction.
INSTRUCTION = "Style Transfer the style of Figure 2 to Figure 1.,cat,oil paint"


def _png(rng: np.random.Generator, width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_run(run_dir: str | Path, shards: int = 2, per_shard: int = 3, rejected_every: int = 0,
              corrupt_keys: tuple[str, ...] = (), size: tuple[int, int] = (48, 32), seed: int = 0) -> Path:
    """A run folder in the manifest's layout: shards/*.tar, shards/sizes.json and wids-index.json.

    Keys are `s{shard}k{i}`; every `rejected_every`-th sample has status "rejected" (a writer bug the
    loader must survive) and samples in `corrupt_keys` get undecodable target bytes.
    """
    run_dir = Path(run_dir)
    shards_dir = run_dir / mf.SHARDS_DIR
    shards_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes, index = {}, []
    for s in range(shards):
        path = shards_dir / f"{mf.shard_name('test', s)}.tar"
        with wds.TarWriter(str(path), mtime=0) as sink:
            for i in range(per_shard):
                key = f"s{s}k{i}"
                rejected = rejected_every and (s * per_shard + i) % rejected_every == 0
                meta = {"recipe": "rns", "status": mf.REJECTED if rejected else mf.ACCEPTED,
                        "prompts": {"content_prompt": "cat", "style_prompt": "oil paint", "error": None},
                        "scores": {}, "lineage": {}}  # fmt: skip
                sink.write({
                    "__key__": key,
                    f"{mf.CONTENT_MEMBER}.png": _png(rng, *size),
                    f"{mf.STYLE_MEMBER}.png": _png(rng, size[1], size[1]),
                    f"{mf.TARGET_MEMBER}.png": b"not a png" if key in corrupt_keys else _png(rng, *size),
                    mf.TEXT_MEMBER: INSTRUCTION,
                    mf.META_MEMBER: json.dumps(meta),
                })  # fmt: skip
        sizes[path.name] = per_shard
        index.append({"url": f"{mf.SHARDS_DIR}/{path.name}", "nsamples": per_shard, "filesize": path.stat().st_size})
    (shards_dir / mf.SIZES_FILE).write_text(json.dumps(sizes))
    (run_dir / mf.WIDS_INDEX_FILE).write_text(
        json.dumps({"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": index})
    )
    return run_dir
