"""What SFT and DMD share: accelerator setup, optimisers, gradient sync, checkpoints, RNG, logging.

Only LoRA weights train, so instead of wrapping the transformer in DDP (which fights adapter switching
and unused parameters) each rank runs its own forward/backward and the LoRA gradients are averaged with
one all-reduce before the optimiser step. Every rank therefore holds identical LoRA and optimiser state;
rank 0 writes them, and each rank writes its own RNG and data position.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from styledistill.jobs.train.config import OptimConfig, TrainCommon

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"


def make_accelerator(cfg: TrainCommon) -> Accelerator:
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu)
    # The same seed on every rank: LoRA initialisation must be identical, gradients are then averaged.
    set_seed(cfg.seed)
    return accelerator


def make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig):
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    warmup = max(cfg.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return optimizer, scheduler


def sync_and_clip(params: list[torch.nn.Parameter], accelerator: Accelerator, max_norm: float) -> float:
    """Average LoRA gradients over ranks (one flat all-reduce), then clip; returns the total norm."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if accelerator.num_processes > 1:
        flat = torch.cat([g.flatten() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= accelerator.num_processes
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g)
            offset += g.numel()
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def noise_generator(seed: int, rank: int) -> torch.Generator:
    """The trainer's own RNG for noise and sigmas: reproducible, per rank, and saved in checkpoints."""
    return torch.Generator().manual_seed(seed * 100_003 + rank)


def rng_state(generator: torch.Generator) -> dict:
    state = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """`<output>/checkpoints/step-00000100/{train.pt, rank0.pt, ...}`; a folder appears only when complete."""

    def __init__(self, output_dir: str | Path, accelerator: Accelerator, keep: int):
        self.root = Path(output_dir) / CHECKPOINTS_DIR
        self.accelerator, self.keep = accelerator, keep

    def latest(self) -> Path | None:
        done = sorted(self.root.glob("step-*[0-9]")) if self.root.exists() else []
        return done[-1] if done else None

    def save(self, step: int, shared: dict, local: dict) -> Path:
        acc = self.accelerator
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f"step-{step:08d}.tmp"
        if acc.is_main_process:
            tmp.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        torch.save(local, tmp / f"rank{acc.process_index}.pt")
        if acc.is_main_process:
            torch.save(shared, tmp / "train.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            tmp.rename(final)
            for old in sorted(self.root.glob("step-*[0-9]"))[: -self.keep]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> tuple[dict, dict]:
        shared = torch.load(path / "train.pt", map_location="cpu", weights_only=False)
        local = torch.load(path / f"rank{self.accelerator.process_index}.pt", map_location="cpu", weights_only=False)
        return shared, local


class MetricsLog:
    """JSON lines in `<output>/metrics.jsonl` (rank 0) and a log line every `every` steps."""

    def __init__(self, output_dir: str | Path, accelerator: Accelerator, every: int):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.accelerator, self.every = accelerator, every
        self.started = time.perf_counter()

    def __call__(self, step: int, **values: float) -> None:
        if not self.accelerator.is_main_process or step % self.every:
            return
        record = {"step": step, "elapsed_s": round(time.perf_counter() - self.started, 3), **values}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        logger.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in values.items()))


class Trainer:
    """The loop SFT and DMD share: load the frozen pipeline, resume, step until `max_steps` with metrics
    and checkpoints, write the LoRA. A subclass adds its adapters in `setup`, does one optimiser step in
    `train_step`, and says what its checkpoint holds (`state_dict` / `load_state_dict`) and which adapter
    is the result (`write_lora`)."""

    LORA_DIR = "lora"

    def __init__(self, cfg: TrainCommon):
        from styledistill.generation.telestyle import resolve_model
        from styledistill.jobs.train.data import TripletLoader
        from styledistill.jobs.train.model import EditConditioner, load_pipeline

        self.cfg = cfg
        resolve_model(cfg.model.path, "model.path")  # missing weights: fail before any process-wide setup
        self.acc = make_accelerator(cfg)
        self.pipe = load_pipeline(cfg.model, self.acc.device)
        self.setup()
        self.conditioner = EditConditioner(self.pipe, cfg.model)
        self.generator = noise_generator(cfg.seed, self.acc.process_index)
        self.checkpointer = Checkpointer(cfg.output_dir, self.acc, cfg.keep_checkpoints)
        self.log = MetricsLog(cfg.output_dir, self.acc, cfg.log_every)
        self.step, consumed = 0, 0
        latest = self.checkpointer.latest()
        if latest is not None:
            consumed = self._resume(latest)
        self.loader = TripletLoader(cfg.data, self.acc.process_index, self.acc.num_processes, consumed)

    # -- what a trainer defines ----------------------------------------------------------------
    def setup(self) -> None:
        raise NotImplementedError

    def trained_modules(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def train_step(self, samples) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def write_lora(self, out: Path) -> None:
        raise NotImplementedError

    # -- the shared loop -----------------------------------------------------------------------
    def train(self) -> Path:
        samples = iter(self.loader)
        for module in self.trained_modules():
            module.train()
        while self.step < self.cfg.max_steps:
            metrics = self.train_step(samples)
            self.log(self.step, **metrics, **{f"skipped_{k}": v for k, v in self.loader.skipped.items()})
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.max_steps:
                self.save_checkpoint()
        return self.save_lora()

    def save_lora(self) -> Path:
        """The resulting LoRA in diffusers format, written by rank 0."""
        out = Path(self.cfg.output_dir) / self.LORA_DIR
        if self.acc.is_main_process:
            self.write_lora(out)
        self.acc.wait_for_everyone()
        return out

    def save_checkpoint(self) -> Path:
        shared = {"step": self.step, **self.state_dict()}
        local = {"rng": rng_state(self.generator), "consumed": self.loader.consumed}
        return self.checkpointer.save(self.step, shared, local)

    def _resume(self, path: Path) -> int:
        shared, local = self.checkpointer.load(path)
        self.load_state_dict(shared)
        set_rng_state(local["rng"], self.generator)
        self.step = shared["step"]
        logger.info("resumed from %s at step %d", path, self.step)
        return local["consumed"]
