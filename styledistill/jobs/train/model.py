"""The Qwen-Image-Edit-Plus parts a trainer needs, and the edit forward pass.

The forward follows QwenImageEditPlusPipeline: the noisy target is packed in 2x2 patches, each reference
(content, then style) is VAE-encoded at its own size, packed, left unnoised and appended after the target
tokens; `img_shapes` lists the target then the references (it drives RoPE); the output is sliced back to
the target tokens. Text conditioning is the pipeline's own `encode_prompt` with the references as the VLM
sees them (about `condition_area` pixels), so training and inference condition identically; the pipeline
is `QwenEditPipeline`, whose text encoder gets Qwen2.5-VL's M-RoPE positions as at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions
from diffusers.training_utils import cast_training_params
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image

from styledistill.generation.qwen_edit import QwenEditPipeline, dtype_kwargs
from styledistill.generation.telestyle import resolve_model
from styledistill.jobs.train import flow
from styledistill.jobs.train.config import LoraConfig, ModelConfig
from styledistill.io.weights import torch_dtype


def load_pipeline(cfg: ModelConfig, device: torch.device) -> QwenEditPipeline:
    """Load the pipeline with everything frozen; only LoRA weights added later train. A missing or
    incomplete folder raises FileNotFoundError naming the path (`model.path`) and how to provide it."""
    path, _ = resolve_model(cfg.path, "model.path")
    try:
        pipe = QwenEditPipeline.from_pretrained(path, local_files_only=True, **dtype_kwargs(torch_dtype(cfg.dtype)))
    except OSError as err:  # a partial download or a folder of another model
        raise FileNotFoundError(f"model.path: cannot load {path}: {err}") from err
    pipe.to(device)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    if cfg.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    return pipe


def add_lora(transformer: torch.nn.Module, cfg: LoraConfig, adapter_name: str) -> list[torch.nn.Parameter]:
    """Add a zero-initialised LoRA adapter (B = 0, so the model starts unchanged); returns its fp32 params."""
    config = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        init_lora_weights=True,
        target_modules=list(cfg.target_modules),
    )
    transformer.add_adapter(config, adapter_name=adapter_name)
    params = [p for n, p in transformer.named_parameters() if f".{adapter_name}." in n and "lora_" in n]
    if not params:
        raise ValueError(f"LoRA targets {cfg.target_modules} matched no module of the transformer")
    for p in params:
        p.requires_grad_(True)
    cast_training_params(transformer, torch.float32)  # fp32 master weights for the trainable part
    return params


def lora_state_dict(transformer: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(transformer, adapter_name=adapter_name).items()}


def load_lora_state_dict(transformer: torch.nn.Module, state: dict[str, torch.Tensor], adapter_name: str) -> None:
    result = set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
    if result.unexpected_keys:
        raise ValueError(f"unexpected LoRA keys: {result.unexpected_keys[:5]}")


def save_lora(transformer: torch.nn.Module, adapter_name: str, out_dir, state: dict | None = None) -> None:
    """A diffusers-format LoRA that `QwenImageEditPlusPipeline.load_lora_weights` loads (alpha kept)."""
    QwenImageEditPlusPipeline.save_lora_weights(
        out_dir,
        transformer_lora_layers=state if state is not None else lora_state_dict(transformer, adapter_name),
        transformer_lora_adapter_metadata=transformer.peft_config[adapter_name].to_dict(),
    )


@dataclass
class EditBatch:
    """One sample prepared for the transformer: clean target tokens, reference tokens, text."""

    x0: torch.Tensor  # (1, n_target, 4C) normalised, packed target latents
    refs: torch.Tensor  # (1, n_refs, 4C) content then style tokens
    img_shapes: list[list[tuple[int, int, int]]]
    prompt_embeds: torch.Tensor
    prompt_mask: torch.Tensor | None
    negative_embeds: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None
    height: int = 0  # target size in pixels, for unpacking
    width: int = 0


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


class EditConditioner:
    """Turns loader samples into EditBatch with the frozen VAE and text encoder (no gradients)."""

    def __init__(self, pipe: QwenImageEditPlusPipeline, cfg: ModelConfig):
        self.pipe, self.cfg = pipe, cfg
        self.vae_scale = pipe.vae_scale_factor
        self._cache: dict[tuple[str, str, str | None], EditBatch] = {}

    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(3, H, W) in [-1, 1] to packed normalised latents (1, n, 4C) and its img_shapes entry."""
        vae = self.pipe.vae
        pixels = image[None, :, None].to(vae.device, vae.dtype)  # (1, 3, 1, H, W): the VAE is video-shaped
        latents = vae.encode(pixels).latent_dist.mode()  # argmax, as the pipeline encodes references
        latents = flow.normalize_latents(latents, vae.config.latents_mean, vae.config.latents_std)
        _, _, _, h, w = latents.shape
        return flow.pack(latents), (1, h // 2, w // 2)

    def encode_text(self, text: str, refs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        images = []
        for ref in refs:
            _, height, width = ref.shape
            w, h = calculate_dimensions(self.cfg.condition_area, width / height)
            images.append(_to_pil(ref).resize((w, h), Image.Resampling.LANCZOS))
        return self.pipe.encode_prompt(text, image=images, device=self.pipe.transformer.device)

    @torch.no_grad()
    def __call__(self, sample: dict, negative_prompt: str | None = None) -> EditBatch:
        cache_key = (sample["key"], sample["instruction"], negative_prompt)
        if cache_key in self._cache:
            return self._cache[cache_key]
        x0, target_shape = self.encode_image(sample["target"])
        content, content_shape = self.encode_image(sample["content"])
        style, style_shape = self.encode_image(sample["style"])
        refs = [sample["content"], sample["style"]]
        embeds, mask = self.encode_text(sample["instruction"], refs)
        negative = self.encode_text(negative_prompt, refs) if negative_prompt is not None else (None, None)
        _, height, width = sample["target"].shape
        dtype = self.pipe.transformer.dtype
        batch = EditBatch(
            x0=x0.float(),
            refs=torch.cat([content, style], dim=1).to(dtype),
            img_shapes=[[target_shape, content_shape, style_shape]],
            prompt_embeds=embeds.to(dtype),
            prompt_mask=mask,
            negative_embeds=None if negative[0] is None else negative[0].to(dtype),
            negative_mask=negative[1],
            height=height,
            width=width,
        )
        if self.cfg.cache_conditioning:
            self._cache[cache_key] = batch
        return batch


def predict_velocity(
    transformer: torch.nn.Module, x_sigma: torch.Tensor, sigma: torch.Tensor, batch: EditBatch, negative: bool = False
) -> torch.Tensor:
    """The transformer's velocity for the noisy target tokens, conditioned on references and text."""
    embeds = batch.negative_embeds if negative else batch.prompt_embeds
    mask = batch.negative_mask if negative else batch.prompt_mask
    n_target = x_sigma.shape[1]
    hidden = torch.cat([x_sigma.to(batch.refs.dtype), batch.refs], dim=1)
    out = transformer(
        hidden_states=hidden,
        timestep=sigma.to(batch.refs.dtype),  # = scheduler timestep / 1000
        encoder_hidden_states=embeds,
        encoder_hidden_states_mask=mask,
        img_shapes=batch.img_shapes,
        return_dict=False,
    )[0]
    return out[:, :n_target].float()
