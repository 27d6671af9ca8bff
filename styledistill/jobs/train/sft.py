"""Supervised fine-tuning of a style LoRA on accepted triplets (flow matching on the target tokens).

Per sample: x0 = normalised target latents, sigma from the configured density (shifted), noise;
loss = w(sigma) * MSE(v_hat(x_sigma | content, style, instruction), noise - x0).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from styledistill.jobs.train import flow
from styledistill.jobs.train.common import (
    Checkpointer,
    MetricsLog,
    make_accelerator,
    make_optimizer,
    noise_generator,
    rng_state,
    set_rng_state,
    sync_and_clip,
)
from styledistill.jobs.train.config import SFTConfig
from styledistill.jobs.train.data import TripletLoader
from styledistill.jobs.train.model import (
    EditBatch,
    EditConditioner,
    add_lora,
    load_lora_state_dict,
    load_pipeline,
    lora_state_dict,
    predict_velocity,
    save_lora,
)

logger = logging.getLogger(__name__)

ADAPTER = "style"
LORA_DIR = "lora"


class SFTTrainer:
    def __init__(self, cfg: SFTConfig):
        self.cfg = cfg
        self.acc = make_accelerator(cfg)
        self.pipe = load_pipeline(cfg.model, self.acc.device)
        self.transformer = self.pipe.transformer
        self.params = add_lora(self.transformer, cfg.lora, ADAPTER)
        self.optimizer, self.scheduler = make_optimizer(self.params, cfg.optim)
        self.ema = EMAModel(self.params, decay=cfg.ema_decay) if cfg.ema_decay else None
        self.conditioner = EditConditioner(self.pipe, cfg.model)
        self.generator = noise_generator(cfg.seed, self.acc.process_index)
        self.checkpointer = Checkpointer(cfg.output_dir, self.acc, cfg.keep_checkpoints)
        self.log = MetricsLog(cfg.output_dir, self.acc, cfg.log_every)
        self.step, consumed = 0, 0
        latest = self.checkpointer.latest()
        if latest is not None:
            consumed = self._resume(latest)
        self.loader = TripletLoader(cfg.data, self.acc.process_index, self.acc.num_processes, consumed)

    def loss(self, batch: EditBatch) -> torch.Tensor:
        x0 = batch.x0
        noise = torch.randn(x0.shape, generator=self.generator).to(x0)
        sigma = flow.sample_sigmas(x0.shape[0], self.cfg.flow, self.generator).to(x0.device)
        x_sigma = flow.add_noise(x0, noise, sigma)
        with self.acc.autocast():
            v_pred = predict_velocity(self.transformer, x_sigma, sigma, batch)
        return flow.flow_loss(v_pred, x0, noise, flow.loss_weight(sigma, self.cfg.flow))

    def train_step(self, samples) -> dict[str, float]:
        """One optimiser step over `gradient_accumulation` samples."""
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(self.cfg.gradient_accumulation):
            loss = self.loss(self.conditioner(next(samples))) / self.cfg.gradient_accumulation
            loss.backward()
            total += loss.item()
        grad_norm = sync_and_clip(self.params, self.acc, self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.step(self.params)
        self.step += 1
        return {"loss": total, "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0]}

    def train(self) -> Path:
        samples = iter(self.loader)
        self.transformer.train()
        while self.step < self.cfg.max_steps:
            metrics = self.train_step(samples)
            self.log(self.step, **metrics, **{f"skipped_{k}": v for k, v in self.loader.skipped.items()})
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.max_steps:
                self.save_checkpoint()
        return self.save_lora()

    def save_lora(self) -> Path:
        """The final LoRA (the EMA weights when EMA is on) in diffusers format, written by rank 0."""
        out = Path(self.cfg.output_dir) / LORA_DIR
        if self.acc.is_main_process:
            if self.ema is not None:
                self.ema.store(self.params)
                self.ema.copy_to(self.params)
            save_lora(self.transformer, ADAPTER, out)
            if self.ema is not None:
                self.ema.restore(self.params)
        self.acc.wait_for_everyone()
        return out

    def save_checkpoint(self) -> Path:
        shared = {
            "step": self.step,
            "lora": lora_state_dict(self.transformer, ADAPTER),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }
        local = {"rng": rng_state(self.generator), "consumed": self.loader.consumed}
        return self.checkpointer.save(self.step, shared, local)

    def _resume(self, path: Path) -> int:
        shared, local = self.checkpointer.load(path)
        load_lora_state_dict(self.transformer, shared["lora"], ADAPTER)
        self.optimizer.load_state_dict(shared["optimizer"])
        self.scheduler.load_state_dict(shared["scheduler"])
        if self.ema is not None and shared["ema"] is not None:
            self.ema.load_state_dict(shared["ema"])
        set_rng_state(local["rng"], self.generator)
        self.step = shared["step"]
        logger.info("resumed from %s at step %d", path, self.step)
        return local["consumed"]


def train_sft(cfg: SFTConfig) -> Path:
    return SFTTrainer(cfg).train()
