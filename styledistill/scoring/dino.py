"""DINOv2 content similarity (transformers), more sensitive to layout than CLIP.

Scores: `content_cos` = cosine of the CLS embeddings of the content reference and the target;
`leakage` = cos(style ref, target) - cos(content ref, target); > 0 means the target resembles the style
reference more than its own content, i.e. the style image's content leaked in.

`model` is a local save_pretrained directory or a repo id already in the local Hugging Face cache; the
image processor saved with it (resize 256, centre crop 224, ImageNet mean/std for the released models)
is used as is.
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
from pydantic import Field

from styledistill.backends import BackendOptions
from styledistill.scoring.base import EmbeddingScorer, reference_cosines
from styledistill.io.weights import DType, batched, model_dir, sha256_files, torch_dtype

DINOV2_TYPES = ("dinov2", "dinov2_with_registers")


class DinoOptions(BackendOptions):
    model: str = "facebook/dinov2-large"
    batch_size: int = Field(32, ge=1)
    dtype: DType = "float32"


class DinoScorer(EmbeddingScorer):
    name = "dino"
    scores = ("content_cos", "leakage")
    Options = DinoOptions

    def setup(self) -> None:
        import torch  # torch and transformers load in the actor, not in a driver checking options
        from transformers import AutoImageProcessor, AutoModel

        path = model_dir(self.options.model, "DINOv2")
        self.torch_device = torch.device(self.device)
        self.dtype = torch_dtype(self.options.dtype)
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=self.dtype)
        if model.config.model_type not in DINOV2_TYPES:
            raise ValueError(f"DINOv2: {path} holds a {model.config.model_type!r} model, not one of {DINOV2_TYPES}")
        self.model = model.to(self.torch_device).eval()
        self.weights_sha256 = sha256_files(sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")))

    def embed(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Unit-norm CLS embeddings (after DINOv2's final layer norm), one per HxWx3 uint8 RGB image."""
        import torch
        import torch.nn.functional as F

        embeddings = []
        with torch.no_grad():
            for chunk in batched(images, self.options.batch_size):
                pixels = self.processor(images=list(chunk), return_tensors="pt")["pixel_values"]
                cls = self.model(pixel_values=pixels.to(self.torch_device, self.dtype)).pooler_output
                embeddings.extend(F.normalize(cls.float(), dim=-1).cpu().numpy())
        return embeddings

    def compare(self, features: dict[str, np.ndarray]) -> dict[str, float]:
        content_cos, style_cos = reference_cosines(features)
        return {"content_cos": content_cos, "leakage": style_cos - content_cos}

    def model_info(self) -> dict[str, str]:
        import torch  # loaded by setup already; its version names the build (e.g. +cu130)

        return {
            "dino_model": self.options.model,
            "dino_weights_sha256": self.weights_sha256,
            "transformers": version("transformers"),
            "torch": torch.__version__,
        }
