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
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import PIL.Image
from pydantic import BaseModel, ConfigDict, Field

from styledistill.backends import BackendOptions
from styledistill.generation.base import GenerationRequest, Generator
from styledistill.generation.lora import LoadedLora, LoraLoader, LoraSpec, load_loras
from styledistill.io.staging import staged
from styledistill.io.weights import DType, model_dir_revision, torch_dtype

if TYPE_CHECKING:
    from styledistill.generation.telestyle_pipeline import EditReferences


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
        # torch and diffusers load here, in the actor, not in a driver that only checks the options.
        import torch
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, VAE_IMAGE_SIZE

        from styledistill.generation.qwen_edit import dtype_kwargs, make_scheduler
        from styledistill.generation.telestyle_pipeline import TeleStyleEditPipeline

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
        import torch

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
        import torch

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
