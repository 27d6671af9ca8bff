"""TeleStyle generator on a tiny random Qwen-Image-Edit-Plus pipeline, CPU and offline.

The pipeline is built once per session (conftest's `tiny_qwen_pipeline`) and loaded by the backend from disk
like real weights. Its weights are random: these tests check wiring (sizes, order, prompt, seed, LoRA
application), never image quality.
"""

from __future__ import annotations

import socket
from pathlib import Path

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as qwen_edit_plus
import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

from styledistill.generation.base import GenerationRequest
from styledistill.generation.lora import LoraLoadError, lora_layer_names, to_diffusers_lora
from styledistill.generation.telestyle import TeleStyleGenerator
from styledistill.generation.telestyle_pipeline import TeleStyleEditPipeline

PROMPT = "Style Transfer the style of Figure 2 to Figure 1, and keep the content and characteristics of Figure 1."
# Both attention blocks of the tiny transformer; its inner dimension is 3 heads x 16 = 48.
LORA_MODULES = [f"transformer_blocks.{i}.attn.{p}" for i in (0, 1) for p in ("to_q", "to_k", "to_v", "to_out.0")]


def make_generator(model: Path | str, **options) -> TeleStyleGenerator:
    # A 28x28 VLM view keeps the tiny vision tower cheap; references are VAE-encoded at their own size.
    generator = TeleStyleGenerator({"model": str(model), "condition_image_size": 28, **options}, device="cpu")
    generator.setup()
    return generator


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def request(seed: int = 123, content_size=(48, 64)) -> GenerationRequest:
    content, style = random_image(*content_size, seed=1), random_image(32, 32, seed=2)
    return GenerationRequest(content=content, style=style, seed=seed, prompt=PROMPT)


# Where each format puts the module path and the two matrices.
LORA_KEY_FORMATS = {
    "diffsynth": ("{}.lora_A.default.weight", "{}.lora_B.default.weight"),
    "diffusers": ("transformer.{}.lora_A.weight", "transformer.{}.lora_B.weight"),
    "peft_unprefixed": ("{}.lora_A.weight", "{}.lora_B.weight"),
    "down_up": ("diffusion_model.{}.lora_down.weight", "diffusion_model.{}.lora_up.weight"),
}


def write_lora(path: Path, modules=LORA_MODULES, fmt: str = "diffsynth", rank: int = 4, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    down_key, up_key = LORA_KEY_FORMATS[fmt]
    state_dict = {}
    for module in modules:
        state_dict[down_key.format(module)] = torch.randn(rank, 48, generator=gen)
        state_dict[up_key.format(module)] = torch.randn(48, rank, generator=gen)
    save_file(state_dict, str(path))
    return path


class PipelineSpy:
    """Records every `edit` call and forwards everything to the real pipeline."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.calls = []

    def edit(self, references, **kwargs):
        self.calls.append({"references": references, "seed": kwargs["generator"].initial_seed(), **kwargs})
        return self.pipe.edit(references, **kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def test_outputs_have_the_content_size(tiny_qwen_pipeline):
    generator = make_generator(tiny_qwen_pipeline)
    outputs = generator.generate([request(content_size=(48, 64)), request(content_size=(64, 32))])
    assert [o.shape for o in outputs] == [(48, 64, 3), (64, 32, 3)]
    assert all(o.dtype == np.uint8 for o in outputs)


def test_pipeline_gets_content_then_style_the_prompt_and_the_seed(tiny_qwen_pipeline):
    generator = make_generator(tiny_qwen_pipeline, steps=2)
    generator.pipe = spy = PipelineSpy(generator.pipe)
    requests = [request(seed=7), GenerationRequest(random_image(32, 48, 5), random_image(48, 32, 6), 99, "other")]
    generator.generate(requests)

    assert len(spy.calls) == 2
    for call, req in zip(spy.calls, requests):
        content, style = call["references"].images
        np.testing.assert_array_equal(np.asarray(content), req.content)
        np.testing.assert_array_equal(np.asarray(style), req.style)
        assert call["prompt"] == req.prompt
        assert call["seed"] == req.seed
        assert (call["height"], call["width"]) == req.content.shape[:2]
        assert call["num_inference_steps"] == 2
        # V1/V2 behaviour: each reference is VAE-encoded at its given size.
        assert call["references"].vae_sizes == [content.size, style.size]


def test_same_seed_same_bytes_other_seed_other_bytes(tiny_qwen_pipeline):
    generator = make_generator(tiny_qwen_pipeline)
    first, again, other = generator.generate([request(seed=3), request(seed=3), request(seed=4)])
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()


def test_diffsynth_lora_is_applied_and_verified(tiny_qwen_pipeline, tmp_path):
    lora = write_lora(tmp_path / "diffsynth_telestyle.safetensors")
    base = make_generator(tiny_qwen_pipeline).generate([request()])[0]
    styled = make_generator(tiny_qwen_pipeline, loras=[{"path": str(lora), "name": "telestyle"}])

    (loaded,) = styled.loras
    assert loaded.target_modules == loaded.lora_layers == len(LORA_MODULES)
    assert styled.generate([request()])[0].tobytes() != base.tobytes()
    assert f"diffsynth_telestyle.safetensors@sha256:{loaded.sha256[:16]}*1" in styled.model_info()["loras"]


def test_every_key_format_gives_the_same_output(tiny_qwen_pipeline, tmp_path):
    outputs = []
    for fmt in LORA_KEY_FORMATS:
        path = write_lora(tmp_path / f"{fmt}.safetensors", fmt=fmt)
        generator = make_generator(tiny_qwen_pipeline, loras=[{"path": str(path), "name": fmt}])
        outputs.append(generator.generate([request()])[0])
    assert all(output.tobytes() == outputs[0].tobytes() for output in outputs)


def test_alpha_is_folded_into_lora_a():
    down, up = torch.ones(4, 48), torch.ones(48, 4)
    converted = to_diffusers_lora(
        {"m.lora_A.default.weight": down, "m.lora_B.default.weight": up, "m.alpha": torch.tensor(2.0)}, "x"
    )
    assert set(converted) == {"transformer.m.lora_A.weight", "transformer.m.lora_B.weight"}
    torch.testing.assert_close(converted["transformer.m.lora_A.weight"], down * 0.5)


def test_lora_matching_no_module_is_refused(tiny_qwen_pipeline, tmp_path):
    foreign = write_lora(tmp_path / "flux_lora.safetensors", modules=["single_transformer_blocks.0.attn.to_q"])
    with pytest.raises(LoraLoadError, match=r"flux_lora\.safetensors: none of its 1 target modules"):
        make_generator(tiny_qwen_pipeline, loras=[{"path": str(foreign), "name": "style"}])


def test_unrecognised_key_format_is_refused(tiny_qwen_pipeline, tmp_path):
    path = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight": torch.zeros(4, 48)}, str(path))
    with pytest.raises(LoraLoadError, match=r"kohya\.safetensors: kohya-style key"):
        make_generator(tiny_qwen_pipeline, loras=[{"path": str(path), "name": "style"}])
    path = tmp_path / "full_weights.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(48, 48)}, str(path))
    with pytest.raises(LoraLoadError, match=r"full_weights\.safetensors: unrecognised key"):
        make_generator(tiny_qwen_pipeline, loras=[{"path": str(path), "name": "style"}])


def test_partly_matching_lora_strict_refuses_lenient_counts(tiny_qwen_pipeline, tmp_path):
    path = write_lora(tmp_path / "partial.safetensors", modules=[*LORA_MODULES, "transformer_blocks.7.attn.to_q"])
    with pytest.raises(LoraLoadError, match=r"1 of its 9 target modules do not exist.*transformer_blocks\.7"):
        make_generator(tiny_qwen_pipeline, loras=[{"path": str(path), "name": "style"}])

    lenient = make_generator(tiny_qwen_pipeline, loras=[{"path": str(path), "name": "style"}], strict_loras=False)
    (loaded,) = lenient.loras
    assert (loaded.target_modules, loaded.lora_layers) == (9, 8)


def test_fused_adapters_match_unfused(tiny_qwen_pipeline, tmp_path):
    loras = [
        {"path": str(write_lora(tmp_path / "style.safetensors", seed=1)), "name": "style", "weight": 0.5},
        {"path": str(write_lora(tmp_path / "lightning.safetensors", seed=2)), "name": "lightning"},
    ]
    unfused = make_generator(tiny_qwen_pipeline, loras=loras).generate([request()])[0]
    fused = make_generator(tiny_qwen_pipeline, loras=loras, fuse_loras=True)
    assert lora_layer_names(fused.pipe.transformer, "style") == set()  # merged, then the layers dropped
    difference = np.abs(fused.generate([request()])[0].astype(int) - unfused.astype(int))
    assert difference.max() <= 2  # float rounding of merged vs separate matmuls


def test_missing_model_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        make_generator(missing)
    (tmp_path / "not-a-pipeline").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        make_generator(tmp_path / "not-a-pipeline")


def test_hub_ids_resolve_only_from_the_local_cache(tiny_qwen_pipeline, tmp_path, monkeypatch):
    # A hub cache holding "org/tiny-edit" at one revision; no network at all.
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-edit"
    (repo / "snapshots").mkdir(parents=True)
    (repo / "snapshots" / revision).symlink_to(tiny_qwen_pipeline, target_is_directory=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)

    generator = make_generator("org/tiny-edit")
    assert generator.model_info()["model_revision"] == revision
    assert generator.generate([request()])[0].shape == (48, 64, 3)
    with pytest.raises(FileNotFoundError, match=r"'org/absent' is not in the local Hugging Face cache"):
        make_generator("org/absent")


def test_reference_sizes(tiny_qwen_pipeline):
    pipe = TeleStyleEditPipeline.from_pretrained(tiny_qwen_pipeline, local_files_only=True)
    images = [PIL.Image.new("RGB", (64, 48)), PIL.Image.new("RGB", (44, 36))]

    # Cropped down to the packing grid: VAE factor x 2 latent patches, 8 pixels here (16 for the real VAE).
    given = pipe.prepare_references(images, vae_area=None, condition_area=28 * 28)
    assert given.vae_sizes == [(64, 48), (40, 32)]
    assert [tuple(t.shape) for t in given.vae_images] == [(1, 3, 1, 48, 64), (1, 3, 1, 32, 40)]

    area = pipe.prepare_references(images, vae_area=128 * 128, condition_area=28 * 28)
    assert area.vae_sizes == [(160, 96), (128, 128)]  # diffusers' rule: ~area, multiples of 32

    with pytest.raises(ValueError, match="multiple of 8"):
        pipe.edit(given, prompt=PROMPT, height=44, width=64)


@pytest.mark.parametrize("true_cfg_scale", [1.0, 2.5])
def test_edit_reproduces_the_diffusers_call(tiny_qwen_pipeline, monkeypatch, true_cfg_scale):
    """With diffusers' size rule, `edit` is the parent's `__call__` (sizes shrunk for speed)."""
    monkeypatch.setattr(qwen_edit_plus, "VAE_IMAGE_SIZE", 64 * 64)
    monkeypatch.setattr(qwen_edit_plus, "CONDITION_IMAGE_SIZE", 28 * 28)
    pipe = TeleStyleEditPipeline.from_pretrained(tiny_qwen_pipeline, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    images = [PIL.Image.fromarray(random_image(48, 64, 1)), PIL.Image.fromarray(random_image(32, 32, 2))]
    kwargs = dict(prompt=PROMPT, height=48, width=64, num_inference_steps=3, true_cfg_scale=true_cfg_scale)

    ours = pipe.edit(
        pipe.prepare_references(images, vae_area=64 * 64, condition_area=28 * 28),
        negative_prompt=" ",
        generator=torch.Generator().manual_seed(5),
        **kwargs,
    )
    theirs = diffusers_call(pipe, images, generator=torch.Generator().manual_seed(5), **kwargs)
    # Equal here; 1 allowed as ours de-normalises latents as x * std, diffusers as x / (1 / std).
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def diffusers_call(pipe, images, **kwargs) -> np.ndarray:
    """The stock diffusers call on the same components, as uint8 like ours."""
    result = qwen_edit_plus.QwenImageEditPlusPipeline.__call__(
        pipe, image=images, negative_prompt=" ", output_type="np", **kwargs
    )
    return (result.images[0] * 255).round().astype(np.uint8)
