"""Trainer configs (SFT and DMD) as pydantic data, loaded from YAML with `--set a.b=value` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from styledistill.schemas.config import Strict, parse_model, read_yaml_mapping

# The LoRA targets of DiffSynth-Studio's Qwen-Image trainer (attention, MLP outputs, modulation).
DEFAULT_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
    "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1",
]  # fmt: skip


class DataConfig(Strict):
    """Where triplets come from and how they are sized."""

    run: str | None = None  # a styledistill run folder: reads <run>/shards/*.tar (or its wids index)
    shards: list[str] = []  # or explicit shard URLs / brace patterns
    area: int = 512 * 512  # every image is resized to about this many pixels, aspect kept
    multiple_of: int = Field(16, ge=16)  # VAE factor 8 x 2x2 packing
    shuffle_buffer: int = Field(256, ge=0)
    num_workers: int = Field(0, ge=0)
    use_wids: bool = False  # random access through wids-index.json: exact resume, per-epoch shuffles
    seed: int = 0

    @model_validator(mode="after")
    def _some_source(self) -> "DataConfig":
        if not self.run and not self.shards:
            raise ValueError("set data.run or data.shards")
        if self.use_wids and not self.run:
            raise ValueError("data.use_wids needs data.run (the wids index lives in the run folder)")
        return self


class LoraConfig(Strict):
    rank: int = Field(32, ge=1)
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = DEFAULT_LORA_TARGETS


class ModelConfig(Strict):
    path: str  # a diffusers QwenImageEditPlusPipeline folder (local; no hub access on the cluster)
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # frozen weights; LoRA stays fp32
    condition_area: int = 384 * 384  # what the VLM sees of each reference, as the pipeline does
    gradient_checkpointing: bool = False
    # Keep each sample's latents and prompt embeddings in memory by key: frozen encoders give the same
    # result every epoch. For small datasets (about 2 MB a sample at 1 MP with the 7B text encoder).
    cache_conditioning: bool = False


class FlowConfig(Strict):
    """Timestep sampling and loss weighting for flow-matching losses."""

    sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = Field(3.0, gt=0)  # sigma' = shift*s / (1 + (shift-1)*s), as FlowMatchEuler(shift=3)
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"


class OptimConfig(Strict):
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    warmup_steps: int = Field(0, ge=0)


class TrainCommon(Strict):
    output_dir: str
    data: DataConfig
    model: ModelConfig
    max_steps: int = Field(1000, ge=1)
    gradient_accumulation: int = Field(1, ge=1)  # samples differ in size, so a step is 1 sample x this
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 0
    cpu: bool = False  # force CPU (tests, gloo runs)


class SFTConfig(TrainCommon):
    lora: LoraConfig = LoraConfig()
    flow: FlowConfig = FlowConfig()
    optim: OptimConfig = OptimConfig()
    ema_decay: float | None = Field(None, gt=0, lt=1)  # EMA of the LoRA weights; the saved LoRA is the EMA


class DMDConfig(TrainCommon):
    teacher_lora: str | None = None  # e.g. the SFT style LoRA, fused into the frozen base = the teacher
    student_lora: LoraConfig = LoraConfig()
    critic_lora: LoraConfig = LoraConfig()
    generator_optim: OptimConfig = OptimConfig(lr=5e-6, max_grad_norm=10.0)
    critic_optim: OptimConfig = OptimConfig(lr=5e-6, max_grad_norm=10.0)
    generator_every: int = Field(5, ge=1)  # two time-scale rule: critic every step, generator every N
    cfg_scale: float = Field(4.0, ge=1.0)  # the teacher's real score; 1.0 skips the unconditional pass
    negative_prompt: str = " "
    # DMD noise range, DMD2's [0.02T, 0.98T]: where the critic and the teacher are queried in the generator
    # update, and (uniformly, as in DMD2) where the critic is trained.
    sigma_min: float = Field(0.02, ge=0, le=1)
    sigma_max: float = Field(0.98, ge=0, le=1)
    student_steps: int = Field(4, ge=1)  # the few-step schedule the student is distilled for
    # The sampler the student LoRA will run under, as the generator's `scheduler` option: "model" is the
    # pipeline folder's scheduler config (Qwen-Image-Edit-2509: dynamic shift, shift_terminal 0.02), so the
    # student's sigmas depend on the image size exactly as the pipeline's do.
    student_scheduler: Literal["model", "qwen-image-edit-2509", "lightning"] = "model"
    backward_simulation: bool = True  # True: run earlier student steps from noise; False: noise the data
    shared_base: bool = True  # one frozen base with named adapters switched per role, not three copies

    @model_validator(mode="after")
    def _sigma_range(self) -> "DMDConfig":
        if self.sigma_min >= self.sigma_max:
            raise ValueError("sigma_min must be < sigma_max")
        return self


def load_train_config(path: str | Path, kind: type[TrainCommon], overrides: list[str] | None = None):
    """Read a YAML config of `kind` (SFTConfig / DMDConfig), applying KEY=VALUE overrides."""
    return parse_model(kind, read_yaml_mapping(path), overrides)
