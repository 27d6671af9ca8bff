"""Supervised fine-tuning of a style LoRA on accepted triplets (flow matching on the target tokens).

Per sample: x0 = normalised target latents, sigma from the configured density (shifted), noise;
loss = w(sigma) * MSE(v_hat(x_sigma | content, style, instruction), noise - x0).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from styledistill.jobs.train import flow
from styledistill.jobs.train.common import Trainer, make_optimizer, sync_and_clip
from styledistill.jobs.train.config import SFTConfig
from styledistill.jobs.train.model import (
    EditBatch,
    add_lora,
    load_lora_state_dict,
    lora_state_dict,
    predict_velocity,
    save_lora,
)

ADAPTER = "style"
LORA_DIR = Trainer.LORA_DIR


class SFTTrainer(Trainer):
    cfg: SFTConfig

    def setup(self) -> None:
        self.transformer = self.pipe.transformer
        self.params = add_lora(self.transformer, self.cfg.lora, ADAPTER)
        self.optimizer, self.scheduler = make_optimizer(self.params, self.cfg.optim)
        self.ema = EMAModel(self.params, decay=self.cfg.ema_decay) if self.cfg.ema_decay else None

    def trained_modules(self) -> list[torch.nn.Module]:
        return [self.transformer]

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

    def write_lora(self, out: Path) -> None:
        """The EMA weights when EMA is on."""
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        save_lora(self.transformer, ADAPTER, out)
        if self.ema is not None:
            self.ema.restore(self.params)

    def state_dict(self) -> dict:
        return {
            "lora": lora_state_dict(self.transformer, ADAPTER),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        load_lora_state_dict(self.transformer, state["lora"], ADAPTER)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])


def train_sft(cfg: SFTConfig) -> Path:
    return SFTTrainer(cfg).train()
