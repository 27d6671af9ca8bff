"""TeleStyle V1 as a generator: Qwen-Image-Edit-2509 in diffusers, with the TeleStyle and Lightning LoRAs.

Each request runs `[content, style]` with the request's prompt and seed, 4 steps, cfg 1 by default, and the
output has the content's size. Weights are never downloaded from the hub: `model` is a local pipeline folder,
a hub id already in the local Hugging Face cache, or a remote URL (s3://...) of a pipeline folder, copied once
per node by `io.staging` (as are LoRA URLs), so runs are offline whether or not HF_HUB_OFFLINE is set.

Fidelity note: the diffusers/transformers combination changes the outputs (see the reference notes on
Qwen2.5-VL M-RoPE); `model_info` records the versions with every sample.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    CONDITION_IMAGE_SIZE,
    VAE_IMAGE_SIZE,
    calculate_dimensions,
    retrieve_timesteps,
)
from pydantic import BaseModel, ConfigDict, Field

from styledistill.backends import BackendOptions
from styledistill.generation.base import GenerationRequest, Generator
from styledistill.generation.lora import LoadedLora, LoraLoader, LoraSpec, load_loras
from styledistill.generation.qwen_edit import QwenEditPipeline, dtype_kwargs, make_scheduler, schedule_arguments
from styledistill.io.staging import staged
from styledistill.io.weights import DType, model_dir_revision, torch_dtype


@dataclass
class EditReferences:
    """Reference images prepared for one edit call (CPU work, done ahead of the GPU)."""

    images: list[PIL.Image.Image]  # as given, in prompt order: Picture 1 is the content
    condition_images: list[PIL.Image.Image]  # what the VLM sees
    vae_images: list[torch.Tensor]  # 1x3x1xHxW in [-1, 1], what the VAE encodes
    vae_sizes: list[tuple[int, int]]  # (width, height) of each VAE image


class TeleStyleEditPipeline(QwenEditPipeline):
    """`QwenImageEditPlusPipeline` whose reference image sizes are explicit arguments (and whose text
    encoder gets its M-RoPE positions, see `qwen_edit.QwenEditPipeline`).

    diffusers' `__call__` resizes every reference to about 1 MP for the VAE and 384x384 for the VLM through
    module constants read inside the call. TeleStyle (V1 through DiffSynth with `edit_image_auto_resize=False`,
    V2 through a patched copy of the pipeline) VAE-encodes references at their given size instead. Patching
    those module globals would change every pipeline in the process and hide the rule from the call site, so
    `edit` takes the sizes from `prepare_references` and runs the same steps as the parent's `__call__`
    (`encode_prompt`, `prepare_latents`, the shifted sigma schedule, true CFG with norm rescale, VAE decode).
    With diffusers' size rule it reproduces the parent's output (tested).
    """

    def prepare_references(
        self, images: list[PIL.Image.Image], vae_area: int | None, condition_area: int = CONDITION_IMAGE_SIZE
    ) -> EditReferences:
        """`vae_area=None` encodes each reference at its own size (cropped down to the packing multiple);
        an area resizes it to about that many pixels, keeping the aspect ratio, as diffusers does."""
        multiple = self.vae_scale_factor * 2  # 8x VAE downsampling, then 2x2 latent patches
        condition_images, vae_images, vae_sizes = [], [], []
        for image in images:
            width, height = image.size
            condition_width, condition_height = calculate_dimensions(condition_area, width / height)
            if vae_area is None:
                vae_width, vae_height = width // multiple * multiple, height // multiple * multiple
            else:
                vae_width, vae_height = calculate_dimensions(vae_area, width / height)
            condition_images.append(self.image_processor.resize(image, condition_height, condition_width))
            vae_images.append(self.image_processor.preprocess(image, vae_height, vae_width).unsqueeze(2))
            vae_sizes.append((vae_width, vae_height))
        return EditReferences(list(images), condition_images, vae_images, vae_sizes)

    @torch.no_grad()
    def edit(
        self,
        references: EditReferences,
        prompt: str,
        height: int,
        width: int,
        num_inference_steps: int = 4,
        true_cfg_scale: float = 1.0,
        negative_prompt: str = " ",
        generator: torch.Generator | None = None,
    ) -> np.ndarray:
        """One image, HxWx3 uint8. Real CFG runs only when `true_cfg_scale > 1` (as in the parent)."""
        multiple = self.vae_scale_factor * 2
        if height % multiple or width % multiple:
            raise ValueError(f"output size {width}x{height} must be a multiple of {multiple} on both sides")
        if self.transformer.config.guidance_embeds:
            raise ValueError("guidance-distilled transformers are not supported (Qwen-Image-Edit-2509 is not one)")
        device = self._execution_device

        prompt_embeds, prompt_mask = self.encode_prompt(
            prompt=prompt, image=references.condition_images, device=device
        )
        do_true_cfg = true_cfg_scale > 1
        if do_true_cfg:
            negative_embeds, negative_mask = self.encode_prompt(
                prompt=negative_prompt, image=references.condition_images, device=device
            )

        latents, image_latents = self.prepare_latents(
            references.vae_images,
            1,
            self.transformer.config.in_channels // 4,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
        )
        # RoPE positions: the target first, then each reference at its own latent grid.
        patch = self.vae_scale_factor * 2
        reference_shapes = [(1, h // patch, w // patch) for w, h in references.vae_sizes]
        img_shapes = [[(1, height // patch, width // patch), *reference_shapes]]

        # The same (sigmas, mu) as the parent; a DMD student is trained on the resulting sigmas (qwen_edit).
        sigmas, mu = schedule_arguments(self.scheduler.config, num_inference_steps, latents.shape[1])
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        self.scheduler.set_begin_index(0)

        for t in self.progress_bar(timesteps):
            model_input = torch.cat([latents, image_latents], dim=1)
            timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
            with self.transformer.cache_context("cond"):
                noise_pred = self._velocity(model_input, timestep, prompt_embeds, prompt_mask, img_shapes)
            noise_pred = noise_pred[:, : latents.size(1)]
            if do_true_cfg:
                with self.transformer.cache_context("uncond"):
                    negative_pred = self._velocity(model_input, timestep, negative_embeds, negative_mask, img_shapes)
                negative_pred = negative_pred[:, : latents.size(1)]
                guided = negative_pred + true_cfg_scale * (noise_pred - negative_pred)
                # Keep the conditional prediction's norm per token, as diffusers does.
                noise_pred = guided * (noise_pred.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

        latents = self._unpack_latents(latents, height, width, self.vae_scale_factor).to(self.vae.dtype)
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        decoded = self.vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
        image = self.image_processor.postprocess(decoded, output_type="pt")[0]
        # Quantise on the device: a quarter of the bytes to copy back.
        image = (image.float() * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        self.maybe_free_model_hooks()
        return image

    def _velocity(self, model_input, timestep, embeds, mask, img_shapes) -> torch.Tensor:
        return self.transformer(
            hidden_states=model_input,
            timestep=timestep,
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=embeds,
            img_shapes=img_shapes,
            attention_kwargs={},
            return_dict=False,
        )[0]


def resolve_model(model: str, what: str = "TeleStyle model") -> tuple[Path, str | None]:
    """`weights.model_dir_revision` (a local folder, a remote URL of one, or a hub id in the local cache),
    checked to be a diffusers pipeline folder: (folder, cache revision)."""
    path, revision = model_dir_revision(model, what)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{what}: {path} is not a diffusers pipeline folder (no model_index.json); give the folder of "
            "`QwenImageEditPlusPipeline.save_pretrained` or a hub id already in the local cache"
        )
    return path, revision


class LoraOption(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    name: str
    weight: float = 1.0
    # How `.alpha` keys scale the LoRA: "diffsynth" ignores them (DiffSynth-Studio's loader, which V1 used
    # for both its LoRAs), "diffusers" scales by alpha / rank. The same only where alpha == rank.
    loader: LoraLoader = "diffusers"


class TeleStyleGenerator(Generator):
    name = "telestyle"

    class Options(BackendOptions):
        model: str  # pipeline folder, or a hub id in the local cache (e.g. Qwen/Qwen-Image-Edit-2509)
        loras: list[LoraOption] = []  # TeleStyle LoRA and the Lightning 4-step LoRA, both at weight 1.0
        fuse_loras: bool = False
        strict_loras: bool = True  # every module a LoRA file targets must exist in the transformer
        steps: int = Field(4, ge=1)
        true_cfg_scale: float = Field(1.0, ge=1.0)
        negative_prompt: str = " "
        dtype: DType | None = None  # None: bfloat16 on GPU, float32 on CPU
        cpu_offload: bool = False  # for 24-48 GB GPUs: one component on the GPU at a time
        # True: references VAE-encoded at their given size (TeleStyle V1 and V2); False: diffusers' ~1 MP.
        reference_vae_at_input_size: bool = True
        # Side of the square-equivalent area the VLM sees each reference at; None: diffusers' 384.
        condition_image_size: int | None = Field(None, ge=28)
        # Sampler config: "model" is the pipeline folder's own (Qwen-Image-Edit-2509: dynamic exponential
        # shift, shift_terminal 0.02); "lightning" the constant shift 3 of Qwen-Image-Lightning's README.
        # A DMD student (jobs/train) must be trained with the same choice (`student_scheduler`).
        scheduler: Literal["model", "qwen-image-edit-2509", "lightning"] = "model"

    def setup(self) -> None:
        options = self.options
        if self.device == "cpu":
            torch.set_num_threads(self.threads)
        if options.dtype is not None:
            self.dtype = torch_dtype(options.dtype)
        else:
            self.dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model_path, self.model_revision = resolve_model(options.model)
        try:
            pipe = TeleStyleEditPipeline.from_pretrained(
                self.model_path, local_files_only=True, **dtype_kwargs(self.dtype)
            )
        except OSError as err:  # a partial download or a folder of another model
            raise FileNotFoundError(f"cannot load model {options.model!r} from {self.model_path}: {err}") from err
        pipe.set_progress_bar_config(disable=True)
        if options.scheduler != "model":
            pipe.scheduler = make_scheduler(options.scheduler)
        if not options.cpu_offload:
            pipe.to(self.device)
        specs = [LoraSpec(path=staged(lora.path, f"LoRA {lora.name}"), name=lora.name, weight=lora.weight,
                          loader=lora.loader) for lora in options.loras]  # fmt: skip
        self.loras: list[LoadedLora] = load_loras(pipe, specs, fuse=options.fuse_loras, strict=options.strict_loras)
        if options.cpu_offload:
            pipe.enable_model_cpu_offload(device=self.device)
        self.pipe = pipe
        self.vae_area = None if options.reference_vae_at_input_size else VAE_IMAGE_SIZE
        side = options.condition_image_size
        self.condition_area = side * side if side is not None else CONDITION_IMAGE_SIZE

    def generate(self, requests: list[GenerationRequest]) -> list[np.ndarray | Exception]:
        # The pipeline takes one image per call. A worker thread prepares the next request's references
        # (PIL conversion and resizing) while the current one runs on the device.
        outputs: list[np.ndarray | Exception] = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            upcoming = pool.submit(self._references, requests[0]) if requests else None
            for i, request in enumerate(requests):
                current = upcoming
                if i + 1 < len(requests):
                    upcoming = pool.submit(self._references, requests[i + 1])
                try:
                    outputs.append(self._generate_one(request, current.result()))
                except torch.cuda.OutOfMemoryError:
                    raise  # the device is in trouble, not this request: let the stage see it
                except Exception as err:  # noqa: BLE001 - one bad request fails alone, the others are kept
                    outputs.append(err)
        return outputs

    def _references(self, request: GenerationRequest) -> EditReferences:
        images = [PIL.Image.fromarray(request.content), PIL.Image.fromarray(request.style)]
        return self.pipe.prepare_references(images, self.vae_area, self.condition_area)

    def _generate_one(self, request: GenerationRequest, references: EditReferences) -> np.ndarray:
        height, width = request.content.shape[:2]
        # The initial noise is drawn on the CPU (as TeleStyle V2's demo does, `torch.manual_seed(seed)`) and
        # moved to the device: a seed means the same noise on any GPU type or on the CPU.
        generator = torch.Generator("cpu").manual_seed(request.seed)
        image = self.pipe.edit(
            references,
            prompt=request.prompt,
            height=height,
            width=width,
            num_inference_steps=self.options.steps,
            true_cfg_scale=self.options.true_cfg_scale,
            negative_prompt=self.options.negative_prompt,
            generator=generator,
        )
        if image.shape != (height, width, 3):
            raise RuntimeError(f"TeleStyle returned {image.shape} for a {height}x{width} content image")
        return image

    def model_info(self) -> dict[str, str]:
        options = self.options
        info = {
            "backend": "telestyle",
            "model": options.model,
            "model_revision": self.model_revision or "local folder",
            "loras": ", ".join(
                f"{lora.name}={lora.path.name}@sha256:{lora.sha256[:16]}*{lora.weight:g}"
                f" ({lora.loader} alpha, effective scale {lora.effective_scale:g})"
                for lora in self.loras
            )
            or "none",
            "fuse_loras": str(options.fuse_loras),
            "steps": str(options.steps),
            "scheduler": options.scheduler,
            "true_cfg_scale": f"{options.true_cfg_scale:g}",
            "reference_vae_at_input_size": str(options.reference_vae_at_input_size),
            "condition_area": str(self.condition_area),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device,
        }
        for package in ("diffusers", "transformers", "torch", "peft"):
            info[package] = version(package)
        return info
