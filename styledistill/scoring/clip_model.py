"""The torch side of the CLIP backends (clip.py): open_clip weights resolved offline, the model with its
prompt-ensemble text embeddings, the zero-shot P(stylized) head and the LAION aesthetic MLP. Imported by the
backends' setup, so a driver that only checks their options never imports torch or open_clip."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from PIL import Image
from torch import nn

from styledistill.io.weights import batched, cached_hf_file, local_file, sha256_files, torch_dtype

if TYPE_CHECKING:
    from styledistill.scoring.clip import ClipOptions


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

    @torch.no_grad()
    def score(self, embeddings: torch.Tensor) -> list[float]:
        """The aesthetic score of each unit-norm CLIP image embedding (a row)."""
        return self(embeddings).tolist()


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
