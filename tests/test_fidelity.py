"""The real models run as their authors ran them: M-RoPE text positions, the sampler's sigmas, LoRA alpha
conventions, the from_pretrained dtype keyword. Tiny random models built in code; behaviour, not wiring."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines import pipeline_utils
from safetensors.torch import load_file, save_file
from tiny_qwen import build_tiny_pipeline

from styledistill.generation import qwen_edit
from styledistill.generation.lora import LoraSpec, load_lora
from styledistill.generation.qwen_edit import (
    LIGHTNING_SCHEDULER,
    QWEN_IMAGE_EDIT_2509_SCHEDULER,
    QwenEditPipeline,
    edit_sigmas,
)
from styledistill.generation.telestyle_pipeline import TeleStyleEditPipeline

PROMPT = "Style Transfer the style of Figure 2 to Figure 1, and keep the content and characteristics of Figure 1."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-qwen-fidelity"))


def _images() -> list[PIL.Image.Image]:
    rng = np.random.default_rng(0)
    # 56x56: a 4x4 patch grid, 2x2 tokens after the 2x2 merge, so height and width positions differ.
    return [PIL.Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(2)]


def _capture_positions(pipe) -> list:
    """Records the position_ids the Qwen2.5-VL language model receives."""
    seen = []
    pipe.text_encoder.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("position_ids")), with_kwargs=True
    )
    return seen


def test_text_encoder_gets_3d_mrope_positions(model_dir):
    pipe = QwenEditPipeline.from_pretrained(model_dir, local_files_only=True)
    seen = _capture_positions(pipe)
    images = _images()
    embeds, _ = pipe.encode_prompt(PROMPT, image=images, device="cpu")

    (positions,) = seen
    assert positions is not None and positions.shape[0] == 3  # (t, h, w) x batch x tokens
    inputs = pipe.processor(
        text=[pipe.prompt_template_encode.format(
            "".join(f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>" for i in range(2)) + PROMPT)],
        images=images, padding=True, return_tensors="pt",
    )  # fmt: skip
    image_tokens = inputs["mm_token_type_ids"][0] == 1
    assert image_tokens.sum() == 8  # 2 images x 2x2 tokens
    h, w = positions[1, 0, image_tokens], positions[2, 0, image_tokens]
    assert not torch.equal(h, w)  # a 1-D fallback has equal rows everywhere

    # Reference path: the text encoder called with M-RoPE positions computed explicitly.
    encoder = pipe.text_encoder
    explicit, _ = encoder.model.get_rope_index(
        inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
    )  # fmt: skip
    torch.testing.assert_close(positions, explicit)
    with torch.no_grad():
        out = encoder(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], position_ids=explicit,
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], output_hidden_states=True,
        )  # fmt: skip
    reference = out.hidden_states[-1][0, pipe.prompt_template_encode_start_idx :]
    torch.testing.assert_close(embeds[0], reference)

    # The stock diffusers path (0.42.1) gives the model no positions: the 1-D fallback, other embeddings.
    stock_seen = _capture_positions(stock := QwenEditPipeline.from_pretrained(model_dir, local_files_only=True))
    stock_embeds, _ = super(QwenEditPipeline, stock)._get_qwen_prompt_embeds(PROMPT, images, "cpu")
    if stock_seen[0] is None:  # diffusers without the fix: our embeddings must differ from its
        assert not torch.allclose(stock_embeds, embeds)


def test_telestyle_pipeline_encodes_with_mrope(model_dir):
    pipe = TeleStyleEditPipeline.from_pretrained(model_dir, local_files_only=True)
    seen = _capture_positions(pipe)
    pipe.encode_prompt(PROMPT, image=_images(), device="cpu")
    assert seen[0] is not None and seen[0].shape[0] == 3


def test_scheduler_config_gives_the_published_sigmas():
    # REFERENCE: Qwen-Image-Edit-2509 at 4 steps and 1024x1024 (64x64 = 4096 tokens): [1, 0.767, 0.456, 0.02].
    sigmas = edit_sigmas(QWEN_IMAGE_EDIT_2509_SCHEDULER, 4, 4096)
    torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.767, 0.456, 0.02]), atol=1e-3, rtol=0)
    # Lightning's constant shift 3: the fixed-shift schedule at any resolution.
    for tokens in (1024, 4096, 8192):
        torch.testing.assert_close(
            edit_sigmas(LIGHTNING_SCHEDULER, 4, tokens), torch.tensor([1.0, 0.9, 0.75, 0.5]), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("height,width", [(1024, 1024), (768, 1344)])
def test_edit_sigmas_are_what_the_pipeline_samples_with(model_dir, height, width):
    """The sigmas the pipeline's scheduler steps through equal `edit_sigmas` (what the DMD student uses)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_EDIT_2509_SCHEDULER)
    tokens = (height // 16) * (width // 16)
    sigmas, mu = qwen_edit.schedule_arguments(scheduler.config, 4, tokens)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    torch.testing.assert_close(edit_sigmas(QWEN_IMAGE_EDIT_2509_SCHEDULER, 4, tokens), scheduler.sigmas[:-1].float())

    # And the generator's own edit loop: record the sigma of every step it takes (tiny sizes, same rule).
    pipe = TeleStyleEditPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_EDIT_2509_SCHEDULER)
    pipe.set_progress_bar_config(disable=True)
    stepped = []
    original = pipe.scheduler.step

    def step(model_output, timestep, sample, **kwargs):
        stepped.append(float(pipe.scheduler.sigmas[pipe.scheduler.step_index or 0]))
        return original(model_output, timestep, sample, **kwargs)

    pipe.scheduler.step = step
    refs = pipe.prepare_references(_images(), vae_area=None, condition_area=28 * 28)
    pipe.edit(refs, prompt=PROMPT, height=32, width=48, num_inference_steps=4)
    patch = pipe.vae_scale_factor * 2  # 8 for the tiny VAE, 16 for the real one
    tiny_tokens = (32 // patch) * (48 // patch)
    torch.testing.assert_close(torch.tensor(stepped), edit_sigmas(QWEN_IMAGE_EDIT_2509_SCHEDULER, 4, tiny_tokens))


def _lora_with_alpha(path: Path, alpha: float, rank: int = 4) -> Path:
    gen = torch.Generator().manual_seed(0)
    module = "transformer_blocks.0.attn.to_q"
    save_file({f"{module}.lora_down.weight": torch.randn(rank, 48, generator=gen),
               f"{module}.lora_up.weight": torch.randn(48, rank, generator=gen),
               f"{module}.alpha": torch.tensor(float(alpha))}, str(path))  # fmt: skip
    return path


@pytest.mark.parametrize("loader,scale", [("diffusers", 2.0), ("diffsynth", 1.0)])
def test_lora_alpha_follows_its_framework(model_dir, tmp_path, caplog, loader, scale):
    path = _lora_with_alpha(tmp_path / "a.safetensors", alpha=8, rank=4)  # alpha / rank = 2
    pipe = QwenEditPipeline.from_pretrained(model_dir, local_files_only=True)
    with caplog.at_level(logging.INFO, logger="styledistill.generation.lora"):
        loaded = load_lora(pipe, LoraSpec(str(path), "x", loader=loader))
    assert loaded.effective_scale == scale and loaded.loader == loader
    assert "alpha != rank" in caplog.text and f"effective scale {scale:g}" in caplog.text
    # The applied delta: B @ A x scale, i.e. what the framework's own loader would add.
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    raw = load_file(str(path))
    delta = raw["transformer_blocks.0.attn.to_q.lora_up.weight"] @ raw["transformer_blocks.0.attn.to_q.lora_down.weight"]
    applied = layer.lora_B["x"].weight @ layer.lora_A["x"].weight * layer.scaling["x"]
    torch.testing.assert_close(applied, delta * scale)


def test_from_pretrained_dtype_keyword(monkeypatch):
    assert qwen_edit.dtype_kwargs(None) == {}
    assert qwen_edit.dtype_kwargs(torch.bfloat16) == {"dtype": torch.bfloat16}  # the pinned diffusers
    monkeypatch.delattr(pipeline_utils, "_resolve_dtype")  # a release from before `dtype` was accepted
    assert qwen_edit.dtype_kwargs(torch.bfloat16) == {"torch_dtype": torch.bfloat16}
