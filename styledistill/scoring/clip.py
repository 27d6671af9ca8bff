"""CLIP (open_clip) scores and the realistic/stylized labeler.

`ClipScorer` ("clip") writes, per view:
- `content_cos`: cosine of the content and target image embeddings (InstructPix2Pix kept pairs >= 0.7);
- `leakage`: cos(style, target) - cos(content, target); > 0 means the target looks more like the style
  reference than like its content, i.e. content leaked from the style image;
- `target_stylized_prob`: zero-shot P(stylized) of the target from two prompt ensembles;
- `aesthetic`: the LAION improved-aesthetic-predictor v2 on the target, when `aesthetic_weights` is given.

`ClipLabeler` labels source images realistic/stylized with the same zero-shot probability and abstains
(label None) inside a band, so uncertain images are left out instead of mislabelled.

Weights never download: `pretrained` is a local file, or an open_clip tag whose weights are already in the
local Hugging Face cache. Prefer a tag: it also brings the tag's QuickGELU and mean/std settings, which a bare
file cannot (OpenAI weights given as a file need `model: ViT-L-14-quickgelu`). The aesthetic MLP was trained
on OpenAI CLIP ViT-L/14 embeddings only; other 768-d CLIP weights load without error but make it noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from styledistill.backends import Backend, BackendOptions
from styledistill.io.weights import DType, local_file, sha256_files
from styledistill.scoring.base import EmbeddingScorer, reference_cosines

# Each side is averaged over many phrasings, so no single prompt's quirks decide the label.
REALISTIC_PROMPTS = (
    "a photo",
    "a photograph of a scene",
    "a snapshot taken with a phone camera",
    "an amateur photo",
    "a DSLR photo",
    "a realistic photo of a person",
    "a photo of an object",
    "a photo of a landscape",
    "a street photograph",
    "a close-up photo",
)
STYLIZED_PROMPTS = (
    "a painting",
    "an oil painting",
    "a watercolor painting",
    "an illustration",
    "a digital illustration",
    "an anime drawing",
    "a cartoon",
    "a comic book drawing",
    "a 3D render",
    "a pencil sketch",
    "line art",
    "pixel art",
    "an ink drawing",
    "a pastel drawing",
    "a stylized artwork",
)


class ClipOptions(BackendOptions):
    model: str = "ViT-L-14"  # an open_clip architecture name
    pretrained: str = "openai"  # a local weights file, or an open_clip tag resolved from the local HF cache
    # Architecture fields that replace the named model's config (open_clip's `model_cfg` layout: embed_dim,
    # vision_cfg, text_cfg, ...). Tests build tiny models with it. (`model_config` is reserved by pydantic.)
    model_cfg: dict[str, Any] | None = None
    batch_size: int = Field(32, ge=1)
    dtype: DType = "float32"
    realistic_prompts: list[str] = Field(default_factory=lambda: list(REALISTIC_PROMPTS), min_length=1)
    stylized_prompts: list[str] = Field(default_factory=lambda: list(STYLIZED_PROMPTS), min_length=1)

    @field_validator("model")
    @classmethod
    def _architecture_name(cls, model: str) -> str:
        # open_clip's hf-hub:/local-dir: schemas fetch or pick weights themselves, bypassing `pretrained`.
        if ":" in model:
            raise ValueError(f"needs an open_clip architecture name such as ViT-L-14, got {model!r}")
        return model


class ClipScorerOptions(ClipOptions):
    aesthetic_weights: str | None = None  # sac+logos+ava1-l14-linearMSE.pth (LAION aesthetic predictor v2)


class ClipLabelerOptions(ClipOptions):
    abstain: tuple[float, float] = (0.35, 0.65)  # P(stylized) in this closed band -> no label

    @field_validator("abstain")
    @classmethod
    def _ordered_band(cls, band: tuple[float, float]) -> tuple[float, float]:
        low, high = band
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"needs 0 <= low <= high <= 1, got {list(band)}")
        return band


def label_for(stylized_prob: float, abstain: tuple[float, float]) -> str | None:
    low, high = abstain
    if stylized_prob < low:
        return "realistic"
    if stylized_prob > high:
        return "stylized"
    return None


@dataclass(frozen=True)
class ClipImageFeatures:
    embedding: np.ndarray  # unit norm
    stylized_prob: float
    aesthetic: float | None


class ClipScorer(EmbeddingScorer):
    name = "clip"
    scores = ("content_cos", "leakage", "target_stylized_prob", "aesthetic")
    Options = ClipScorerOptions

    def declared_scores(self) -> tuple[str, ...]:
        return self.scores if self.options.aesthetic_weights else self.scores[:-1]

    def setup(self) -> None:
        from styledistill.scoring.clip_model import ClipModel, load_aesthetic_mlp  # torch: in the actor only

        self.clip = ClipModel(self.options, self.device)
        self.aesthetic = None  # the LAION aesthetic MLP, when its weights are given
        self.info = self.clip.model_info()
        if self.options.aesthetic_weights is not None:
            weights = local_file(self.options.aesthetic_weights, "LAION aesthetic predictor")
            self.aesthetic = load_aesthetic_mlp(weights, self.clip.embed_dim)
            self.info["aesthetic_weights_sha256"] = sha256_files([weights])

    def embed(self, images: list[np.ndarray]) -> list[ClipImageFeatures]:
        embeddings = self.clip.encode_images(images)
        probs = self.clip.stylized_prob(embeddings).tolist()
        aesthetic = self.aesthetic.score(embeddings) if self.aesthetic is not None else [None] * len(images)
        return [
            ClipImageFeatures(embedding.numpy(), prob, score)
            for embedding, prob, score in zip(embeddings, probs, aesthetic)
        ]

    def compare(self, features: dict[str, ClipImageFeatures]) -> dict[str, float]:
        content_cos, style_cos = reference_cosines({role: f.embedding for role, f in features.items()})
        scores = {
            "content_cos": content_cos,
            "leakage": style_cos - content_cos,
            "target_stylized_prob": features["target"].stylized_prob,
        }
        if features["target"].aesthetic is not None:
            scores["aesthetic"] = features["target"].aesthetic
        return scores

    def model_info(self) -> dict[str, str]:
        return dict(self.info)


class ClipLabeler(Backend):
    """Realistic/stylized labels for source pools with `label: classify`."""

    kind = "labeler"
    name = "clip"
    Options = ClipLabelerOptions

    def setup(self) -> None:
        from styledistill.scoring.clip_model import ClipModel

        self.clip = ClipModel(self.options, self.device)

    def label(self, images: list[np.ndarray]) -> list[tuple[str | None, float]]:
        """(label or None when abstaining, P(stylized)) per HxWx3 uint8 RGB image."""
        probs = self.clip.stylized_prob(self.clip.encode_images(images)).tolist()
        return [(label_for(prob, self.options.abstain), prob) for prob in probs]

    def model_info(self) -> dict[str, str]:
        return self.clip.model_info()
