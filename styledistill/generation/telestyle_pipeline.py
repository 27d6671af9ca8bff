"""The torch side of the TeleStyle generator (telestyle.py): Qwen-Image-Edit-2509's diffusers pipeline with
explicit reference sizes. Imported by the generator's setup, so a driver that only checks its options never
imports torch or diffusers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    CONDITION_IMAGE_SIZE,
    calculate_dimensions,
    retrieve_timesteps,
)

from styledistill.generation.qwen_edit import QwenEditPipeline, schedule_arguments


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
