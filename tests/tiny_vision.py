"""Tiny random CLIP (open_clip ViT-L-14 layout), CSD and DINOv2 models, built offline and saved like real weights.

The weights are random (fixed seeds): only loading, batching, wiring and score arithmetic mean anything.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_tiny_clip(path: str | Path) -> Path:
    """The state dict of a tiny random ViT-L-14-named open_clip model, as `pretrained=<file>` loads it."""
    import open_clip

    torch.manual_seed(0)
    torch.save(open_clip.create_model("ViT-L-14", **TINY_CLIP).state_dict(), path)
    return Path(path)


def save_tiny_dino(directory: str | Path) -> Path:
    """A tiny random DINOv2 with its image processor, `save_pretrained` to `directory`."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(2)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14
    )
    Dinov2Model(config).save_pretrained(directory)
    BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(directory)
    return Path(directory)


TINY_CSD = {"width": 32, "layers": 1, "heads": 2, "embed_dim": 8}


def tiny_csd_state() -> dict[str, torch.Tensor]:
    """A tiny random CSD's state dict, content head first (anything relying on entry order picks wrong)."""
    from styledistill.scoring.csd_model import CSDModel

    torch.manual_seed(1)
    model = CSDModel(**TINY_CSD)
    torch.nn.init.normal_(model.last_layer_style)
    torch.nn.init.normal_(model.last_layer_content)
    state = model.state_dict()
    return {"last_layer_content": state.pop("last_layer_content"), **state}


def write_csd_checkpoint(path: str | Path, state: dict[str, torch.Tensor]) -> Path:
    """The released training-checkpoint layout: `module.` prefixes, plus non-weight entries."""
    import argparse

    import numpy as np

    torch.save(
        {
            "model_state_dict": {f"module.{key}": value for key, value in state.items()},
            "opt_bb": {},
            "opt_proj": {},
            "iter": 1000,
            "args": argparse.Namespace(lr=np.float64(3e-4), batch_size=np.int64(64), arch="vit_large"),
            "fp16_scaler": None,
        },
        path,
    )
    return Path(path)
