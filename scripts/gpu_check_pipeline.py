"""Run a cluster config on a few sample images and print seconds per image for each stage.

The config's sources are replaced by SAMPLES/realistic and SAMPLES/stylized (no labeler is needed then);
everything else (models, resolution, stages, filters) is the config's own, changed only by --set:

    python scripts/gpu_check_pipeline.py styledistill/configs/cluster.yaml samples/ \\
        --photos 8 --set stages.generate.concurrency=1 --set stages.score.concurrency=1

Weights must already be where the config points (local paths, the local Hugging Face cache, or remote
URLs that are copied to the node cache). Seconds come from metrics.json (`stages.<name>.busy_s`: time one
actor spent on the stage, summed over the run; model loading is not in it), so they are per actor: a
stage with N actors processes N times as many images per second. Use them to size concurrency
(docs/cluster.md, "Sizing").

It also prints each stage's busy share (busy seconds / actor-seconds alive during the run, from metrics.json)
and checks the generator's against --min-busy (97%): with autoscaled cheap stages sharing GPUs by fraction,
e.g. on one 8-GPU node

    python scripts/gpu_check_pipeline.py styledistill/configs/cluster.yaml samples/ --photos 128 \\
        --set stages.generate.concurrency=7 --set stages.score.num_gpus=0.25 \\
        --set stages.score.min_actors=1 --set stages.score.max_actors=4
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

import yaml

from styledistill.io import uris
from styledistill.pipeline.run import run_pipeline
from styledistill.schemas import manifest as mf
from styledistill.schemas.config import parse_config


def generated_images(run: str) -> int:
    """Distinct V1 generations behind the run's samples, read from the manifests' lineage."""
    import pyarrow.parquet as pq

    shards = uris.join(run, mf.SHARDS_DIR)
    gen_ids = set()
    for name in uris.listdir(shards):
        if not name.endswith(".parquet"):
            continue
        table = pq.read_table(io.BytesIO(uris.read_bytes(uris.join(shards, name))), columns=["lineage"])
        for lineage in table.column("lineage").to_pylist():
            for role in json.loads(lineage).values():
                if "generation" in role:
                    gen_ids.add(role["generation"]["gen_id"])
    return len(gen_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("samples", type=Path, help="folder with realistic/ and stylized/ image folders")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--photos", type=int, default=8, help="content photos to run (plan.max_photos)")
    parser.add_argument("--out", help="run folder (default: a new temporary folder)")
    parser.add_argument("--ray-address", help="join this Ray cluster (default: the config's ray.address)")
    parser.add_argument("--inline", action="store_true", help="no Ray: every stage in this process")
    parser.add_argument("--min-busy", type=float, default=0.97,
                        help="target busy share of the generator's actors (default 0.97)")
    args = parser.parse_args()

    data = yaml.safe_load(args.config.read_text())
    pools = {label: args.samples.resolve() / label for label in ("realistic", "stylized")}
    for label, folder in pools.items():
        if not folder.is_dir():
            parser.error(f"{folder} not found: SAMPLES needs a realistic/ and a stylized/ folder")
    data["sources"] = [{"uri": str(folder), "label": label} for label, folder in pools.items()]
    data["labeler"] = None
    data.setdefault("plan", {})["max_photos"] = args.photos
    data.setdefault("output", {})["uri"] = args.out or tempfile.mkdtemp(prefix="gpu_check_pipeline_")
    config = parse_config(data, args.overrides)

    outcome = run_pipeline(config, ray_address=args.ray_address, inline=args.inline, report=False)
    metrics = json.loads(uris.read_bytes(uris.join(config.output.uri, mf.METRICS_FILE)))
    samples = metrics["samples"]
    generations = generated_images(config.output.uri)
    print(f"run folder: {config.output.uri}")
    print(f"{samples} samples ({dict(outcome.counts)}), {generations} generated images, "
          f"wall {metrics['wall_s']:.1f} s, {metrics['samples_per_s']:.3f} samples/s")
    print(f"{'stage':<10}{'actors':>8}{'busy s':>10}{'s/sample':>10}{'busy share':>12}")
    for name, stage in metrics["stages"].items():
        share = stage.get("utilisation")
        print(f"{name:<10}{stage['actors']:>8}{stage['busy_s']:>10.2f}{stage['busy_s'] / samples:>10.3f}"
              f"{'-' if share is None else f'{share:.1%}':>12}")
    if generations and "generate" in metrics["stages"]:
        print(f"generate: {metrics['stages']['generate']['busy_s'] / generations:.3f} s per generated image")
    share = metrics["stages"].get("generate", {}).get("utilisation")
    if share is not None and not args.inline:
        # The executor's goal on GPUs: the generator (the expensive stage) never waits for the cheap ones.
        # Busy share = its actors' time in the model / their time alive during the run (fill and drain
        # included, so run enough photos: --photos 64 or more).
        verdict = "OK" if share >= args.min_busy else "BELOW TARGET"
        print(f"generator busy share: {share:.1%} (target >= {args.min_busy:.0%}): {verdict}")


if __name__ == "__main__":
    import sys

    try:
        main()
    except FileNotFoundError as err:  # missing weights: one line naming the path, as `styledistill run`
        sys.exit(f"error: {err}")
