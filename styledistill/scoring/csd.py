"""CSD style similarity (learn2phoenix/CSD, weights tomg-group-umd/CSD-ViT-L, MIT).

CSD is an OpenAI CLIP ViT-L/14 vision tower (QuickGELU, no contrastive projection) fine-tuned with two
separate (1024 x 768) projection matrices on its pooled feature: `last_layer_style` and `last_layer_content`.
Implementations disagree on the order they return the two heads in, so we never rely on output order: the
style embedding is always `feature @ last_layer_style`, looked up by that name.

Scores: `style_cos` = cos(style ref, target) of style embeddings;
`style_gain` = cos(style ref, target) - cos(content ref, target), both on style embeddings. Raw CSD is not
globally calibrated: thresholds belong per style family.
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
from pydantic import Field

from styledistill.backends import BackendOptions
from styledistill.io.weights import DType, sha256_files, weights_file
from styledistill.scoring.base import EmbeddingScorer, reference_cosines

CSD_REPO = "tomg-group-umd/CSD-ViT-L"
CSD_FILENAME = "pytorch_model.bin"


class CSDOptions(BackendOptions):
    weights: str = CSD_REPO  # the checkpoint file, or the repo id whose pytorch_model.bin is in the HF cache
    # The ViT-L/14 tower; tests build tiny ones. A mismatch with the checkpoint fails at load.
    width: int = Field(1024, ge=1)
    layers: int = Field(24, ge=1)
    heads: int = Field(16, ge=1)
    embed_dim: int = Field(768, ge=1)
    batch_size: int = Field(32, ge=1)
    dtype: DType = "float32"


class CSDScorer(EmbeddingScorer):
    name = "csd"
    scores = ("style_cos", "style_gain")
    Options = CSDOptions

    def setup(self) -> None:
        from styledistill.scoring.csd_model import CSDStyleEncoder  # torch and open_clip: in the actor only

        self.weights_path = weights_file(self.options.weights, CSD_FILENAME, "CSD")
        self.encoder = CSDStyleEncoder(self.weights_path, self.options, self.device)
        self.weights_sha256 = sha256_files([self.weights_path])

    def embed(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Unit-norm style embeddings, one per HxWx3 uint8 RGB image."""
        return self.encoder.embed(images)

    def compare(self, features: dict[str, np.ndarray]) -> dict[str, float]:
        content_cos, style_cos = reference_cosines(features)
        return {"style_cos": style_cos, "style_gain": style_cos - content_cos}

    def model_info(self) -> dict[str, str]:
        import torch  # loaded by setup already; its version names the build (e.g. +cu130)

        return {
            "csd_weights": str(self.options.weights),
            "csd_weights_sha256": self.weights_sha256,
            "open_clip": version("open_clip_torch"),
            "torch": torch.__version__,
        }
