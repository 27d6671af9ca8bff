"""A tiny random QwenImageEditPlusPipeline, built offline and saved like a real checkpoint folder.

Transformer and VAE use the configs of diffusers' own qwenimage tests; text encoder, tokenizer and processor
come from `tiny_vlm` (byte-level tokenizer with the 14 Qwen special tokens, made in code). Backends under test
load the saved folder with `from_pretrained(..., local_files_only=True)`, the same code path as real weights.
The weights are random: outputs are noise and only their shape, determinism and sensitivity mean anything.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPlusPipeline,
    QwenImageTransformer2DModel,
)
from tiny_vlm import tiny_model, tiny_processor, tiny_tokenizer

__all__ = ["build_tiny_pipeline", "tiny_processor", "tiny_tokenizer", "tiny_transformer", "tiny_vae"]


def tiny_transformer() -> QwenImageTransformer2DModel:
    # joint_attention_dim equals the tiny text encoder's hidden size (16).
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )


def tiny_vae() -> AutoencoderKLQwenImage:
    return AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )


def build_tiny_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """Build a tiny random pipeline, `save_pretrained` it to `out_dir` (about 17 MB) and return the folder."""
    out_dir = Path(out_dir)
    processor = tiny_processor()
    text_encoder = tiny_model(processor.tokenizer)
    torch.manual_seed(seed)
    pipe = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=processor.tokenizer,
        processor=processor,
        transformer=tiny_transformer(),
    )
    pipe.save_pretrained(out_dir)
    return out_dir
