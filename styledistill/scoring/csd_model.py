"""The torch side of the CSD scorer (csd.py): the tower, the checkpoint loader and the style encoder. Imported
by the scorer's setup, so a driver that only checks its options never imports torch or open_clip.

Checkpoint layout we load (the released `pytorch_model.bin`, a training checkpoint): a torch pickle whose
`model_state_dict` maps `module.`-prefixed names to tensors, 297 entries for ViT-L/14:
  module.backbone.{class_embedding, positional_embedding, conv1.weight, ln_pre.*, ln_post.*}
  module.backbone.transformer.resblocks.{i}.{ln_1, attn.in_proj_*, attn.out_proj.*, ln_2, mlp.c_fc, mlp.c_proj}
  module.last_layer_style, module.last_layer_content   (raw [width, embed_dim] matrices, not nn.Linear)
Its other entries (optimiser states, `args` as an argparse.Namespace, ...) are ignored. Any missing or extra
key in `model_state_dict` is an error: a silently half-loaded CSD would look like a working style metric.
"""

from __future__ import annotations

import argparse
import pickle
from typing import TYPE_CHECKING

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, VisionTransformer
from PIL import Image
from torch import nn

from styledistill.io.weights import batched, torch_dtype

if TYPE_CHECKING:
    from styledistill.scoring.csd import CSDOptions

IMAGE_SIZE = 224
PATCH_SIZE = 14
PREFIX = "module."
# The training checkpoint pickles its argparse arguments (with numpy scalars) next to the weights; these are
# the only non-tensor types we let torch's weights-only unpickler build.
_NUMPY_SCALAR = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar  # numpy 2 / 1
CHECKPOINT_GLOBALS = [
    argparse.Namespace,
    np.dtype,
    np.dtypes.Float64DType,
    np.dtypes.Int64DType,
    _NUMPY_SCALAR,
    (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"),  # the name in pickles written by numpy 1.x
]



class CSDModel(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, embed_dim: int):
        super().__init__()
        self.backbone = VisionTransformer(
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            width=width,
            layers=layers,
            heads=heads,
            mlp_ratio=4.0,
            output_dim=embed_dim,
            act_layer=QuickGELU,  # OpenAI CLIP's activation, which CSD was fine-tuned from
        )
        self.backbone.proj = None  # CSD drops CLIP's projection: the two heads replace it
        self.last_layer_style = nn.Parameter(torch.empty(width, embed_dim))
        self.last_layer_content = nn.Parameter(torch.empty(width, embed_dim))

    def style_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(pixels) @ self.last_layer_style, dim=-1)


def load_csd_state_dict(path) -> dict[str, torch.Tensor]:
    """`model_state_dict` of a CSD training checkpoint, `module.` prefixes removed."""
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"CSD checkpoint {path} holds objects we do not unpickle: {err}") from None
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"CSD checkpoint {path}: expected a dict with 'model_state_dict', found {found}")
    state = checkpoint["model_state_dict"]
    unprefixed = [key for key in state if not key.startswith(PREFIX)]
    if unprefixed:
        raise ValueError(f"CSD checkpoint {path}: keys without the {PREFIX!r} prefix: {unprefixed[:5]}")
    return {key.removeprefix(PREFIX): value for key, value in state.items()}


def load_csd_model(path, options: CSDOptions) -> CSDModel:
    state = load_csd_state_dict(path)
    model = CSDModel(options.width, options.layers, options.heads, options.embed_dim)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"CSD checkpoint {path} does not match the CSD layout ({len(missing)} missing keys, e.g. "
            f"{missing[:5]}; {len(unexpected)} unexpected keys, e.g. {unexpected[:5]})"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shapes: width/layers/heads/embed_dim options against the file
        raise ValueError(f"CSD checkpoint {path} does not fit the configured tower: {err}") from None
    return model


class CSDStyleEncoder:
    """A loaded CSD on its device with CSD's own eval transform: images in, unit-norm style embeddings out."""

    def __init__(self, path, options: CSDOptions, device: str):
        self.options = options
        self.device = torch.device(device)
        self.dtype = torch_dtype(options.dtype)
        self.model = load_csd_model(path, options).to(self.device, self.dtype).eval()
        # 224 bicubic resize of the short side, centre crop, OpenAI CLIP mean/std: CSD's own eval transform.
        self.preprocess = open_clip.image_transform(
            IMAGE_SIZE,
            is_train=False,
            mean=open_clip.OPENAI_DATASET_MEAN,
            std=open_clip.OPENAI_DATASET_STD,
            resize_mode="shortest",
            interpolation="bicubic",
        )

    @torch.no_grad()
    def embed(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Unit-norm style embeddings, one per HxWx3 uint8 RGB image."""
        embeddings = []
        for chunk in batched(images, self.options.batch_size):
            pixels = torch.stack([self.preprocess(Image.fromarray(image)) for image in chunk])
            styles = self.model.style_embedding(pixels.to(self.device, self.dtype))
            embeddings.extend(styles.float().cpu().numpy())
        return embeddings
