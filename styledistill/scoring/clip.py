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
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from PIL import Image
from pydantic import Field, field_validator
from torch import nn

from styledistill.backends import Backend, BackendOptions
from styledistill.scoring.base import EmbeddingScorer, reference_cosines
from styledistill.io.weights import (
    DType,
    batched,
    cached_hf_file,
    local_file,
    sha256_files,
    torch_dtype,
)

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


def resolve_clip_weights(model: str, pretrained: str) -> tuple[str, dict[str, Any]]:
    """The weights file for `pretrained` and, for an open_clip tag, the tag's config (QuickGELU, mean/std)."""
    what = f"CLIP {model}"
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not tag_cfg or Path(pretrained).expanduser().is_file():
        return str(local_file(pretrained, what)), {}
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        raise FileNotFoundError(
            f"{what}: tag {pretrained!r} has no Hugging Face repo to look up in the local cache; "
            f"download {tag_cfg.get('url', 'its weights')} and give the file path as `pretrained`"
        )
    repo_id, filename = _split_hub_entry(hub)
    if filename:
        return str(cached_hf_file(repo_id, filename, what)), tag_cfg
    # open_clip prefers the safetensors copy of its default file name; do the same, cache only.
    try:
        return str(cached_hf_file(repo_id, HF_SAFE_WEIGHTS_NAME, what)), tag_cfg
    except FileNotFoundError:
        return str(cached_hf_file(repo_id, HF_WEIGHTS_NAME, what)), tag_cfg


def _split_hub_entry(hub: str) -> tuple[str, str]:
    """open_clip writes `org/repo/` (default file name) or `org/repo/file.bin`."""
    org, repo, *rest = hub.split("/")
    return f"{org}/{repo}", "/".join(part for part in rest if part)


class ClipModel:
    """An open_clip model, its eval preprocessing and the two prompt-ensemble text embeddings, loaded once.

    Embeddings leave this class L2-normalised, float32, on the CPU: the zero-shot and aesthetic heads on top
    are a few small matrix products, not worth a device round trip.
    """

    def __init__(self, options: ClipOptions, device: str):
        self.options = options
        self.device = torch.device(device)
        self.dtype = torch_dtype(options.dtype)
        self.weights_path, tag_cfg = resolve_clip_weights(options.model, options.pretrained)
        model, _, self.preprocess = open_clip.create_model_and_transforms(
            options.model,
            pretrained=self.weights_path,
            force_quick_gelu=tag_cfg.get("quick_gelu", False),  # e.g. the OpenAI weights were trained with it
            image_mean=tag_cfg.get("mean"),
            image_std=tag_cfg.get("std"),
            image_interpolation=tag_cfg.get("interpolation"),
            image_resize_mode=tag_cfg.get("resize_mode"),
            **(options.model_cfg or {}),
        )
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = open_clip.get_tokenizer(options.model, context_length=model.context_length)
        self.logit_scale = model.logit_scale.detach().exp().clamp(max=100.0).item()
        self.realistic_text = self.encode_prompt_ensemble(options.realistic_prompts)
        self.stylized_text = self.encode_prompt_ensemble(options.stylized_prompts)
        self.weights_sha256 = sha256_files([self.weights_path])  # once per actor, for every sample's metadata

    @property
    def embed_dim(self) -> int:
        return int(self.realistic_text.shape[0])

    @torch.no_grad()
    def encode_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """[N, D] unit-norm image embeddings of HxWx3 uint8 RGB images, `batch_size` at a time."""
        chunks = []
        for chunk in batched(images, self.options.batch_size):
            pixels = torch.stack([self.preprocess(Image.fromarray(image)) for image in chunk])
            features = self.model.encode_image(pixels.to(device=self.device, dtype=self.dtype))
            chunks.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, self.embed_dim)

    @torch.no_grad()
    def encode_prompt_ensemble(self, prompts: list[str]) -> torch.Tensor:
        """The usual CLIP zero-shot class embedding: mean of unit-norm prompt embeddings, renormalised."""
        tokens = self.tokenizer(prompts).to(self.device)
        features = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return F.normalize(features.mean(dim=0), dim=0).cpu()

    def stylized_prob(self, embeddings: torch.Tensor) -> torch.Tensor:
        return stylized_probability(embeddings, self.realistic_text, self.stylized_text, self.logit_scale)

    def model_info(self) -> dict[str, str]:
        return {
            "clip_model": self.options.model,
            "clip_pretrained": self.options.pretrained,
            "clip_weights_sha256": self.weights_sha256,
            "open_clip": open_clip.__version__,
            "torch": torch.__version__,
        }


def stylized_probability(
    embeddings: torch.Tensor, realistic_text: torch.Tensor, stylized_text: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """P(stylized) per row: softmax over the two classes of CLIP's scaled cosine logits."""
    logits = logit_scale * embeddings @ torch.stack([realistic_text, stylized_text]).T
    return logits.softmax(dim=-1)[:, 1]


def label_for(stylized_prob: float, abstain: tuple[float, float]) -> str | None:
    low, high = abstain
    if stylized_prob < low:
        return "realistic"
    if stylized_prob > high:
        return "stylized"
    return None


class AestheticMLP(nn.Module):
    """LAION improved-aesthetic-predictor v2, laid out like its public checkpoint (keys layers.0 ... layers.7).

    As published it has no activations between the Linear layers; the dropouts only keep the key indices.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_aesthetic_mlp(weights: Path, input_size: int) -> AestheticMLP:
    state = torch.load(weights, map_location="cpu", weights_only=True)
    mlp = AestheticMLP(input_size)
    try:
        mlp.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"LAION aesthetic predictor {weights} does not match the v2 MLP on {input_size}-d CLIP embeddings "
            f"(it needs CLIP ViT-L/14, 768-d): {err}"
        ) from None
    return mlp.eval()


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
        self.clip = ClipModel(self.options, self.device)
        self.aesthetic: AestheticMLP | None = None
        self.info = self.clip.model_info()
        if self.options.aesthetic_weights is not None:
            weights = local_file(self.options.aesthetic_weights, "LAION aesthetic predictor")
            self.aesthetic = load_aesthetic_mlp(weights, self.clip.embed_dim)
            self.info["aesthetic_weights_sha256"] = sha256_files([weights])

    @torch.no_grad()
    def embed(self, images: list[np.ndarray]) -> list[ClipImageFeatures]:
        embeddings = self.clip.encode_images(images)
        probs = self.clip.stylized_prob(embeddings).tolist()
        aesthetic = self.aesthetic(embeddings).tolist() if self.aesthetic is not None else [None] * len(images)
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
        self.clip = ClipModel(self.options, self.device)

    def label(self, images: list[np.ndarray]) -> list[tuple[str | None, float]]:
        """(label or None when abstaining, P(stylized)) per HxWx3 uint8 RGB image."""
        probs = self.clip.stylized_prob(self.clip.encode_images(images)).tolist()
        return [(label_for(prob, self.options.abstain), prob) for prob in probs]

    def model_info(self) -> dict[str, str]:
        return self.clip.model_info()
