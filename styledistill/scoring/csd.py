"""CSD style similarity (learn2phoenix/CSD, weights tomg-group-umd/CSD-ViT-L, MIT).

CSD is an OpenAI CLIP ViT-L/14 vision tower (QuickGELU, no contrastive projection) fine-tuned with two
separate (1024 x 768) projection matrices on its pooled feature: `last_layer_style` and `last_layer_content`.
Implementations disagree on the order they return the two heads in, so we never rely on output order: the
style embedding is always `feature @ last_layer_style`, looked up by that name.

Checkpoint layout we load (the released `pytorch_model.bin`, a training checkpoint): a torch pickle whose
`model_state_dict` maps `module.`-prefixed names to tensors, 297 entries for ViT-L/14:
  module.backbone.{class_embedding, positional_embedding, conv1.weight, ln_pre.*, ln_post.*}
  module.backbone.transformer.resblocks.{i}.{ln_1, attn.in_proj_*, attn.out_proj.*, ln_2, mlp.c_fc, mlp.c_proj}
  module.last_layer_style, module.last_layer_content   (raw [width, embed_dim] matrices, not nn.Linear)
Its other entries (optimiser states, `args` as an argparse.Namespace, ...) are ignored. Any missing or extra
key in `model_state_dict` is an error: a silently half-loaded CSD would look like a working style metric.

Scores: `style_cos` = cos(style ref, target) of style embeddings;
`style_gain` = cos(style ref, target) - cos(content ref, target), both on style embeddings. Raw CSD is not
globally calibrated: thresholds belong per style family.
"""

from __future__ import annotations

import argparse
import pickle

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, VisionTransformer
from PIL import Image
from pydantic import Field
from torch import nn

from styledistill.backends import BackendOptions
from styledistill.scoring.base import EmbeddingScorer, reference_cosines
from styledistill.io.weights import DType, batched, sha256_files, torch_dtype, weights_file

CSD_REPO = "tomg-group-umd/CSD-ViT-L"
CSD_FILENAME = "pytorch_model.bin"
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


class CSDOptions(BackendOptions):
    weights: str = CSD_REPO  # the checkpoint file, or the repo id whose pytorch_model.bin is in the HF cache
    # The ViT-L/14 tower; tests build tiny ones. A mismatch with the checkpoint fails at load.
    width: int = Field(1024, ge=1)
    layers: int = Field(24, ge=1)
    heads: int = Field(16, ge=1)
    embed_dim: int = Field(768, ge=1)
    batch_size: int = Field(32, ge=1)
    dtype: DType = "float32"


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


class CSDScorer(EmbeddingScorer):
    name = "csd"
    scores = ("style_cos", "style_gain")
    Options = CSDOptions

    def setup(self) -> None:
        self.weights_path = weights_file(self.options.weights, CSD_FILENAME, "CSD")
        self.torch_device = torch.device(self.device)
        self.dtype = torch_dtype(self.options.dtype)
        self.model = load_csd_model(self.weights_path, self.options).to(self.torch_device, self.dtype).eval()
        # 224 bicubic resize of the short side, centre crop, OpenAI CLIP mean/std: CSD's own eval transform.
        self.preprocess = open_clip.image_transform(
            IMAGE_SIZE,
            is_train=False,
            mean=open_clip.OPENAI_DATASET_MEAN,
            std=open_clip.OPENAI_DATASET_STD,
            resize_mode="shortest",
            interpolation="bicubic",
        )
        self.weights_sha256 = sha256_files([self.weights_path])

    @torch.no_grad()
    def embed(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Unit-norm style embeddings, one per HxWx3 uint8 RGB image."""
        embeddings = []
        for chunk in batched(images, self.options.batch_size):
            pixels = torch.stack([self.preprocess(Image.fromarray(image)) for image in chunk])
            styles = self.model.style_embedding(pixels.to(self.torch_device, self.dtype))
            embeddings.extend(styles.float().cpu().numpy())
        return embeddings

    def compare(self, features: dict[str, np.ndarray]) -> dict[str, float]:
        content_cos, style_cos = reference_cosines(features)
        return {"style_cos": style_cos, "style_gain": style_cos - content_cos}

    def model_info(self) -> dict[str, str]:
        return {
            "csd_weights": str(self.options.weights),
            "csd_weights_sha256": self.weights_sha256,
            "open_clip": open_clip.__version__,
            "torch": torch.__version__,
        }
