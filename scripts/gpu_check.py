"""Check the TeleStyle generator on a GPU machine with real weights: seconds per image and peak GPU memory.

Weights must already be on the machine (nothing is downloaded): `--model` is a diffusers pipeline folder
or a hub id in the local Hugging Face cache; LoRAs are local files, each given as
PATH:NAME[:WEIGHT[:LOADER]] (LOADER diffsynth, V1's alpha convention, by default).

    python scripts/gpu_check.py \\
        --model Qwen/Qwen-Image-Edit-2509 \\
        --lora /weights/diffsynth_Qwen-Image-Edit-2509-telestyle.safetensors:telestyle \\
        --lora /weights/diffsynth_Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors:lightning \\
        --content photo1.jpg --content photo2.jpg --style painting.jpg \\
        --min-edge 1024 --images 4 --fuse --out gpu_check_out

Content and style images are sized with the run's resolution rules (V1: content short edge `--min-edge`,
the whole style image resized to a `--min-edge` square; `--style-crop` centre-crops instead) and paired
round-robin; without them, synthetic gradients are used, which measure speed and memory only.

Fidelity: it first checks that the text encoder gets Qwen2.5-VL's 3-D M-RoPE positions, then prints the
settings of each generated image next to TeleStyle V1's published example (seed 123, V1's prompt, images
[content, style], 4 steps, cfg 1, min edge 1024, style resized to a square), so a first GPU session can
compare the outputs with V1's by eye. `--v1-example` uses seed 123 for every image, as V1's demo does.
A missing model or LoRA ends in one line naming the path. Add `--cpu-offload` for 24-48 GB GPUs. The first image is a warm-up and is
left out of the average. With `--out`, inputs and outputs are written as PNG for a look by eye.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from styledistill.generation.base import GenerationRequest
from styledistill.generation.lora import LoraLoadError
from styledistill.generation.qwen_edit import mrope_check
from styledistill.generation.telestyle import TeleStyleGenerator
from styledistill.pipeline.images import prepare_content, prepare_style
from styledistill.schemas.config import V1_INSTRUCTION, Resolution


# TeleStyle V1's published example (DiffSynth demo): what its example images were made with.
V1_EXAMPLE = {"seed": 123, "prompt": V1_INSTRUCTION, "order": "[content, style]", "steps": 4, "cfg": 1.0,
              "min_edge": 1024, "style": "resize to a 1024 square"}  # fmt: skip


def parse_lora(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (2, 3, 4):
        raise argparse.ArgumentTypeError(f"--lora {text!r}: expected PATH:NAME[:WEIGHT[:diffsynth|diffusers]]")
    lora = {"path": parts[0], "name": parts[1], "loader": "diffsynth"}  # V1 loaded its LoRAs with DiffSynth
    if len(parts) >= 3:
        lora["weight"] = float(parts[2])
    if len(parts) == 4:
        lora["loader"] = parts[3]
    return lora


def gradient(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth synthetic image (speed and memory checks only)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(2 * np.pi * (a * x + b * y) + c) for a, b, c in rng.uniform(0.5, 3.0, size=(3, 3))]
    return ((np.stack(channels, axis=-1) + 1) * 127.5).astype(np.uint8)


def load_rgb(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--lora", type=parse_lora, action="append", default=[])
    parser.add_argument("--content", action="append", default=[], help="content image (repeatable)")
    parser.add_argument("--style", action="append", default=[], help="style image (repeatable)")
    parser.add_argument("--images", type=int, default=4, help="images to generate, the first one a warm-up")
    parser.add_argument("--min-edge", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--fuse", action="store_true", help="fuse the LoRAs into the transformer")
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--diffusers-reference-size", action="store_true", help="VAE references at ~1 MP")
    parser.add_argument("--condition-size", type=int, help="VLM view side (default: diffusers' 384)")
    parser.add_argument("--out", type=Path, help="folder for input and output PNGs")
    parser.add_argument("--style-crop", action="store_true", help="centre-crop the style image (not V1)")
    parser.add_argument("--v1-example", action="store_true", help="seed 123 for every image, as V1's demo")
    args = parser.parse_args()

    style_mode = "square" if args.style_crop else "resize"
    resolution = Resolution(content_min_edge=args.min_edge, content_max_edge=None, style_edge=args.min_edge,
                            style_mode=style_mode)  # fmt: skip
    contents = [load_rgb(p) for p in args.content] or [gradient(768, 1024, 0), gradient(1024, 768, 1)]
    styles = [load_rgb(p) for p in args.style] or [gradient(512, 512, 2)]
    requests = [
        GenerationRequest(
            content=prepare_content(contents[i % len(contents)], resolution),
            style=prepare_style(styles[i % len(styles)], resolution),
            seed=V1_EXAMPLE["seed"] if args.v1_example else args.seed + i,
            prompt=V1_INSTRUCTION,
        )
        for i in range(args.images)
    ]

    options = {
        "model": args.model,
        "loras": args.lora,
        "fuse_loras": args.fuse,
        "steps": args.steps,
        "dtype": args.dtype,
        "cpu_offload": args.cpu_offload,
        "reference_vae_at_input_size": not args.diffusers_reference_size,
        "condition_image_size": args.condition_size,
    }
    generator = TeleStyleGenerator(options, device=args.device)
    cuda = args.device.startswith("cuda")
    start = time.perf_counter()
    try:
        generator.setup()
    except (FileNotFoundError, LoraLoadError) as err:
        sys.exit(f"error: {err}")
    print(f"setup: {time.perf_counter() - start:.1f} s")
    first = requests[0]
    references = generator.pipe.prepare_references(
        [Image.fromarray(first.content), Image.fromarray(first.style)], generator.vae_area, generator.condition_area
    )
    ok, message = mrope_check(generator.pipe, references.condition_images, first.prompt)
    print(message)
    ours = {"seed": first.seed, "prompt": first.prompt, "order": "[content, style]", "steps": args.steps,
            "cfg": 1.0, "min_edge": args.min_edge, "style": f"{style_mode} to a {args.min_edge} square"
            if style_mode == "resize" else f"centre crop to a {args.min_edge} square"}  # fmt: skip
    print(f"{'setting':10} {'this run':40} TeleStyle V1 example")
    for key, value in V1_EXAMPLE.items():
        mark = "" if str(ours[key]) == str(value) else "   <- differs"
        print(f"{key:10} {str(ours[key])[:40]:40} {str(value)[:60]}{mark}")
    if cuda:
        print(f"GPU memory after setup: {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
        torch.cuda.reset_peak_memory_stats()

    seconds = []
    for i, request in enumerate(requests):
        start = time.perf_counter()
        (output,) = generator.generate([request])  # returns host memory: the device work is finished
        seconds.append(time.perf_counter() - start)
        height, width = request.content.shape[:2]
        print(f"image {i}: {width}x{height} content, {request.style.shape[1]}x{request.style.shape[0]} style, "
              f"{seconds[-1]:.2f} s")  # fmt: skip
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            for kind, array in (("content", request.content), ("style", request.style), ("output", output)):
                Image.fromarray(array).save(args.out / f"{i:03d}_{kind}.png")

    timed = seconds[1:] or seconds
    print(f"seconds per image: {np.mean(timed):.2f} (mean of {len(timed)}, first image excluded as warm-up)")
    if cuda:
        print(f"peak GPU memory while generating: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(json.dumps(generator.model_info(), indent=2))


if __name__ == "__main__":
    main()
