"""Qwen-Image-Edit-2509 as its authors run it: what both the generator and the trainer depend on.

- `QwenEditPipeline`: diffusers' `QwenImageEditPlusPipeline` whose text encoding passes the processor's
  `mm_token_type_ids` on to Qwen2.5-VL. diffusers 0.42.1's `_get_qwen_prompt_embeds` passes only
  `input_ids`, `attention_mask`, `pixel_values` and `image_grid_thw`; transformers 5.x's Qwen2.5-VL computes
  its multimodal 3-D M-RoPE positions only when `mm_token_type_ids` is also given and otherwise silently
  falls back to 1-D positions (diffusers issue #14194), i.e. not the positions the model was trained with.
- The scheduler configs the sampler uses (`SCHEDULER_CONFIGS`) and `edit_sigmas`, the sigmas the pipeline
  steps through for a number of steps and an image size: a few-step student is trained on exactly these.
- `dtype_kwargs`: `from_pretrained(dtype=...)` where diffusers accepts it, `torch_dtype=...` on older ones.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift

# The scheduler config shipped with Qwen/Qwen-Image-Edit-2509 (scheduler/scheduler_config.json on the hub):
# dynamic exponential shift with a terminal sigma of 0.02. At 4 steps and 1024x1024 (4096 image tokens) it
# gives sigmas [1, 0.767, 0.456, 0.02] (tested), not the [1, 0.9, 0.75, 0.5] of a fixed shift of 3.
QWEN_IMAGE_EDIT_2509_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
# The config Qwen-Image-Lightning's README runs its 4/8-step LoRAs with in diffusers: a constant shift of 3
# (base_shift = max_shift = log 3, so mu = log 3 at any resolution) and no terminal stretch.
LIGHTNING_SCHEDULER = {
    **QWEN_IMAGE_EDIT_2509_SCHEDULER,
    "base_shift": math.log(3),
    "max_shift": math.log(3),
    "shift_terminal": None,
}
SCHEDULER_CONFIGS = {"qwen-image-edit-2509": QWEN_IMAGE_EDIT_2509_SCHEDULER, "lightning": LIGHTNING_SCHEDULER}


def make_scheduler(name: str) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIGS[name])


def schedule_arguments(config, steps: int, image_seq_len: int) -> tuple[np.ndarray, float]:
    """(sigmas, mu) that QwenImageEditPlusPipeline hands to `scheduler.set_timesteps` for `steps` steps
    and `image_seq_len` target tokens ((H/16) * (W/16)); `config` is the scheduler's config."""
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    return sigmas, mu


def edit_sigmas(config, steps: int, image_seq_len: int) -> torch.Tensor:
    """The `steps` sigmas (from 1 down, final 0 excluded) the pipeline samples with, as float32."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    sigmas, mu = schedule_arguments(scheduler.config, steps, image_seq_len)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    return scheduler.sigmas[:-1].float().cpu()


def dtype_kwargs(dtype: torch.dtype | None) -> dict:
    """`from_pretrained` keyword for a dtype: `dtype` where diffusers resolves it (it also accepts the
    deprecated `torch_dtype`), `torch_dtype` on releases that predate `dtype` and would ignore it."""
    from diffusers.pipelines import pipeline_utils

    if dtype is None:
        return {}
    return {"dtype": dtype} if hasattr(pipeline_utils, "_resolve_dtype") else {"torch_dtype": dtype}


class QwenEditPipeline(QwenImageEditPlusPipeline):
    """`QwenImageEditPlusPipeline` whose prompt encoding gives Qwen2.5-VL its M-RoPE positions."""

    def _get_qwen_prompt_embeds(self, prompt=None, image=None, device=None, dtype=None):
        # diffusers' own steps (template, processor, last hidden state, template prefix dropped, padded),
        # with `mm_token_type_ids` passed through where the text encoder takes it.
        device = device or self._execution_device
        dtype = dtype or self.text_encoder.dtype
        prompt = [prompt] if isinstance(prompt, str) else prompt
        images = image if isinstance(image, list) else ([image] if image is not None else [])
        pictures = "".join(f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>" for i in range(len(images)))
        texts = [self.prompt_template_encode.format(pictures + p) for p in prompt]
        inputs = self.processor(text=texts, images=image, padding=True, return_tensors="pt").to(device)
        outputs = self.text_encoder(**text_encoder_inputs(self.text_encoder, inputs), output_hidden_states=True)

        hidden = self._extract_masked_hidden(outputs.hidden_states[-1], inputs["attention_mask"])
        hidden = [h[self.prompt_template_encode_start_idx :] for h in hidden]
        longest = max(h.size(0) for h in hidden)
        embeds = torch.stack([torch.cat([h, h.new_zeros(longest - h.size(0), h.size(1))]) for h in hidden])
        mask = torch.stack(
            [torch.cat([torch.ones(h.size(0), dtype=torch.long, device=h.device),
                        torch.zeros(longest - h.size(0), dtype=torch.long, device=h.device)]) for h in hidden]
        )  # fmt: skip
        return embeds.to(dtype=dtype, device=device), mask


def text_encoder_inputs(text_encoder, inputs) -> dict:
    """The processor outputs Qwen2.5-VL's forward needs, `mm_token_type_ids` included when it takes it
    (transformers 5.x; 4.x derives M-RoPE from the image token ids and has no such argument)."""
    kwargs = {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "pixel_values": inputs.get("pixel_values"),
        "image_grid_thw": inputs.get("image_grid_thw"),
    }
    if inputs.get("mm_token_type_ids") is not None and "mm_token_type_ids" in inspect.signature(
        text_encoder.forward
    ).parameters:
        kwargs["mm_token_type_ids"] = inputs["mm_token_type_ids"]
    return kwargs


def mrope_check(pipe, images, prompt: str) -> tuple[bool, str]:
    """Encode one image+text prompt and report whether Qwen2.5-VL received 3-D M-RoPE positions (the GPU
    scripts print it; with 1-D positions every generation and training step is conditioned wrongly)."""
    seen = []
    language_model = pipe.text_encoder.model.language_model
    hook = language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("position_ids")), with_kwargs=True
    )
    try:
        with torch.no_grad():
            pipe.encode_prompt(prompt, image=images, device=pipe._execution_device)
    finally:
        hook.remove()
    positions = seen[0] if seen else None
    # Without mm_token_type_ids the model computes no positions (None) and falls back to 1-D ones.
    if positions is None or positions.dim() != 3 or positions.shape[0] < 3:
        return False, "M-RoPE: FAIL, the text encoder got no 3-D positions (1-D fallback, diffusers issue #14194)"
    return True, f"M-RoPE: ok, 3-D positions {tuple(positions.shape)} for {len(images)} images"
