"""A few SFT and DMD steps on one GPU with real weights; prints s/step and peak memory per phase.

    python scripts/gpu_check_train.py --model /models/Qwen-Image-Edit-2509 --run runs/demo --area 1048576
    python scripts/gpu_check_train.py --tiny            # no weights: a tiny random pipeline and shards

Without `--run`, a small run folder of random triplets is written to the work dir (timings only).
Real weights: bf16 base + fp32 LoRA, gradient checkpointing, shared-base DMD with CFG 4.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from styledistill.generation.qwen_edit import mrope_check
from styledistill.jobs.train.config import DMDConfig, SFTConfig
from styledistill.jobs.train.dmd import DMDTrainer
from styledistill.jobs.train.sft import SFTTrainer


def _timed_steps(trainer, steps: int) -> tuple[float, float]:
    """(seconds per step after one warm-up step, peak GiB) for `steps` train steps."""
    samples = iter(trainer.loader)
    trainer.train_step(samples)  # warm-up: kernels, caches, conditioning
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        metrics = trainer.train_step(samples)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    print(f"  last metrics: {metrics}")
    return (time.perf_counter() - start) / steps, peak


def _pil(image: torch.Tensor):
    from PIL import Image

    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array).resize((224, 224))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="QwenImageEditPlusPipeline folder")
    parser.add_argument("--run", help="a styledistill run folder (default: random triplets)")
    parser.add_argument("--tiny", action="store_true", help="tiny random pipeline instead of --model")
    parser.add_argument("--area", type=int, default=1024 * 1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_train_"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_qwen import build_tiny_pipeline  # test fixtures double as a smoke setup
    from tiny_train_models import write_run

    if args.tiny:
        model, dtype, precision, area = str(build_tiny_pipeline(work / "pipe")), "float32", "no", 64 * 64
    elif args.model:
        model, dtype, precision, area = args.model, "bfloat16", "bf16", args.area
    else:
        parser.error("give --model or --tiny")
    side = int(area**0.5)
    run = args.run or str(write_run(work / "run", shards=1, per_shard=4, size=(side, side)))
    common = dict(
        data={"run": run, "area": area, "shuffle_buffer": 0},
        model={"path": model, "dtype": dtype, "gradient_checkpointing": not args.tiny},
        mixed_precision=precision, max_steps=1000, checkpoint_every=1000, log_every=1000,
    )  # fmt: skip
    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, model {model}, area {area}")

    sft = SFTTrainer(SFTConfig.model_validate({**common, "output_dir": str(work / "sft"),
                                               "lora": {"rank": args.rank, "alpha": args.rank}}))  # fmt: skip
    batch = next(iter(sft.loader))
    refs = [_pil(batch["content"]), _pil(batch["style"])]
    print(mrope_check(sft.pipe, refs, batch["instruction"])[1])
    s_per_step, peak = _timed_steps(sft, args.steps)
    print(f"SFT: {s_per_step:.2f} s/step, peak {peak:.1f} GiB")
    del sft
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    dmd = DMDTrainer(DMDConfig.model_validate({
        **common, "output_dir": str(work / "dmd"), "generator_every": 1, "cfg_scale": 4.0,
        "student_lora": {"rank": args.rank, "alpha": args.rank}, "critic_lora": {"rank": args.rank, "alpha": args.rank},
    }))  # fmt: skip
    s_per_step, peak = _timed_steps(dmd, args.steps)
    print(f"DMD (generator + critic each step, CFG 4, backward simulation): {s_per_step:.2f} s/step, peak {peak:.1f} GiB")


if __name__ == "__main__":
    from styledistill.generation.lora import LoraLoadError

    try:
        main()
    except (FileNotFoundError, LoraLoadError) as err:  # missing weights: one line naming the path
        sys.exit(f"error: {err}")
