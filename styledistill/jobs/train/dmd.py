"""DMD2-style distillation of a few-step student LoRA (tianweiy/DMD2, FastVideo's distillation pipeline).

Roles, all the same transformer architecture:
- teacher (real score): the frozen base, optionally with an SFT style LoRA fused in; CFG on its velocity;
- student (generator): a LoRA trained to produce x0 in `student_steps` Euler steps;
- critic (fake score): a LoRA trained with flow matching on the student's detached outputs, so it tracks
  the student's distribution.
With `shared_base` (default) the three are one frozen base with two named peft adapters switched per
role (teacher = adapters disabled): one copy of the 20B weights instead of three.

Student schedule: the sigmas the pipeline samples with for `student_steps` steps at the sample's size,
from the same scheduler config as the generator (Qwen-Image-Edit-2509's dynamic shift with
shift_terminal 0.02 gives [1, 0.767, 0.456, 0.02] at 1024x1024, not a fixed shift's [1, 0.9, 0.75, 0.5]):
a few-step student only works on the sigmas it was trained on.
Generator update (every `generator_every` steps): x0_g = student output at a random step of its schedule
(reached by running the earlier steps without gradient, or by noising the data target); noise x0_g at
sigma ~ U[sigma_min, sigma_max]; grad = (x0_fake - x0_real) / mean|x0_g - x0_real| per sample;
loss = 0.5 * MSE(x0_g, stopgrad(x0_g - grad)), whose gradient w.r.t. x0_g is grad / numel.
Critic update (every step): flow-matching loss on re-noised, detached student outputs, at sigmas from the
same U[sigma_min, sigma_max] it is queried at (DMD2 uses one range for both).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

from styledistill.generation.lora import LoraSpec, load_loras
from styledistill.generation.qwen_edit import SCHEDULER_CONFIGS, edit_sigmas
from styledistill.jobs.train import flow
from styledistill.jobs.train.common import Trainer, make_optimizer, sync_and_clip
from styledistill.jobs.train.config import DMDConfig
from styledistill.jobs.train.model import (
    EditBatch,
    add_lora,
    load_lora_state_dict,
    lora_state_dict,
    predict_velocity,
    save_lora,
)

logger = logging.getLogger(__name__)

TEACHER, STUDENT, CRITIC = "teacher", "student", "critic"
LORA_DIR = Trainer.LORA_DIR


class Roles:
    """Velocity of each role, over one shared base with named adapters or over three separate copies."""

    def __init__(self, transformer: torch.nn.Module, cfg: DMDConfig):
        self.shared = cfg.shared_base
        if self.shared:
            student = critic = transformer
        else:
            student, critic = copy.deepcopy(transformer), copy.deepcopy(transformer)
        self.params = {
            STUDENT: add_lora(student, cfg.student_lora, STUDENT),
            CRITIC: add_lora(critic, cfg.critic_lora, CRITIC),
        }
        self.modules = {TEACHER: transformer, STUDENT: student, CRITIC: critic}

    def activate(self, role: str) -> torch.nn.Module:
        """Make `role` the active adapter. Needed again before a backward pass when gradient
        checkpointing is on: the recomputed forward uses whatever adapter is active at that time."""
        module = self.modules[role]
        if self.shared:
            if role == TEACHER:
                module.disable_adapters()
            else:
                module.enable_adapters()
                module.set_adapter(role)
        return module

    def velocity(self, role: str, x: torch.Tensor, sigma: torch.Tensor, batch: EditBatch, negative=False):
        return predict_velocity(self.activate(role), x, sigma, batch, negative=negative)


class DMDTrainer(Trainer):
    cfg: DMDConfig

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.teacher_lora:
            # Teacher = base + SFT LoRA, fused into the frozen weights; student and critic start from it.
            # The verified loader fails when the file's keys match no module (diffusers only warns, and the
            # teacher would silently be the base model).
            path = Path(cfg.teacher_lora)
            path = path / LORA_WEIGHT_NAME_SAFE if path.is_dir() else path
            self.teacher_lora = load_loras(self.pipe, [LoraSpec(str(path), TEACHER)], fuse=True)[0]
            logger.info("teacher = base + %s (%d LoRA layers, fused)", path, self.teacher_lora.lora_layers)
        self.roles = Roles(self.pipe.transformer, cfg)
        self.optimizers = {
            STUDENT: make_optimizer(self.roles.params[STUDENT], cfg.generator_optim),
            CRITIC: make_optimizer(self.roles.params[CRITIC], cfg.critic_optim),
        }
        self.updates = {STUDENT: 0, CRITIC: 0}
        self.scheduler_config = (
            self.pipe.scheduler.config if cfg.student_scheduler == "model" else SCHEDULER_CONFIGS[cfg.student_scheduler]
        )
        self._schedules: dict[int, torch.Tensor] = {}

    def trained_modules(self) -> list[torch.nn.Module]:
        return list(self.roles.modules.values())

    def schedule(self, image_seq_len: int) -> torch.Tensor:
        """The student's sigmas for a target of `image_seq_len` tokens: those the pipeline samples with at
        that size under the same scheduler config (dynamic shifting makes them depend on the size)."""
        if image_seq_len not in self._schedules:
            self._schedules[image_seq_len] = edit_sigmas(self.scheduler_config, self.cfg.student_steps, image_seq_len)
        return self._schedules[image_seq_len]

    # -- the maths -------------------------------------------------------------------------------
    def _randn(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.generator).to(like)

    def _sigma(self, value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(value, dtype=torch.float32).reshape(-1).expand(like.shape[0]).to(like.device)

    def teacher_velocity(self, x: torch.Tensor, sigma: torch.Tensor, batch: EditBatch) -> torch.Tensor:
        """Real score with CFG `uncond + s * (cond - uncond)` (DMD2), renormalised to the conditional
        velocity's norm as the pipeline's true_cfg does; s = 1 is the conditional pass alone."""
        cond = self.roles.velocity(TEACHER, x, sigma, batch)
        if self.cfg.cfg_scale == 1.0:
            return cond
        uncond = self.roles.velocity(TEACHER, x, sigma, batch, negative=True)
        guided = uncond + self.cfg.cfg_scale * (cond - uncond)
        return guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))

    def student_x0(self, batch: EditBatch, with_grad: bool) -> torch.Tensor:
        """The student's x0 at a random step k of its schedule; only step k carries gradient."""
        sigmas = self.schedule(batch.x0.shape[1])
        k = int(torch.randint(len(sigmas), (1,), generator=self.generator))
        if self.cfg.backward_simulation:
            # Reach step k the way inference does: Euler steps from pure noise (sigmas[0] = 1).
            x = self._randn(batch.x0)
            with torch.no_grad():
                for i in range(k):
                    v = self.roles.velocity(STUDENT, x, self._sigma(sigmas[i], x), batch)
                    x = x + (sigmas[i + 1] - sigmas[i]) * v
        else:
            x = flow.add_noise(batch.x0, self._randn(batch.x0), self._sigma(sigmas[k], batch.x0))
        sigma_k = self._sigma(sigmas[k], x)
        with torch.set_grad_enabled(with_grad):
            v = self.roles.velocity(STUDENT, x, sigma_k, batch)
            return flow.x0_from_velocity(x, sigma_k, v)

    def dmd_sigma(self, like: torch.Tensor) -> torch.Tensor:
        """sigma ~ U[sigma_min, sigma_max], one per sample: where the critic is trained and queried (DMD2)."""
        n = like.shape[0]
        sigma = self.cfg.sigma_min + (self.cfg.sigma_max - self.cfg.sigma_min) * torch.rand(n, generator=self.generator)
        return sigma.to(like.device)

    def generator_loss(self, batch: EditBatch) -> tuple[torch.Tensor, float]:
        x0_g = self.student_x0(batch, with_grad=True)
        n = x0_g.shape[0]
        sigma = self.dmd_sigma(x0_g)
        x_sigma = flow.add_noise(x0_g.detach(), self._randn(x0_g), sigma)
        with torch.no_grad():
            x0_fake = flow.x0_from_velocity(x_sigma, sigma, self.roles.velocity(CRITIC, x_sigma, sigma, batch))
            x0_real = flow.x0_from_velocity(x_sigma, sigma, self.teacher_velocity(x_sigma, sigma, batch))
            norm = (x0_g.detach() - x0_real).abs().flatten(1).mean(1).view(n, 1, 1)
            grad = torch.nan_to_num((x0_fake - x0_real) / norm)
        self.roles.activate(STUDENT)  # backward (and any checkpoint recompute) runs the student
        loss = 0.5 * torch.nn.functional.mse_loss(x0_g.float(), (x0_g - grad).detach().float())
        return loss, float(grad.abs().mean())

    def critic_loss(self, batch: EditBatch) -> torch.Tensor:
        x0_g = self.student_x0(batch, with_grad=False)
        noise = self._randn(x0_g)
        sigma = self.dmd_sigma(x0_g)
        x_sigma = flow.add_noise(x0_g, noise, sigma)
        v = self.roles.velocity(CRITIC, x_sigma, sigma, batch)
        return flow.flow_loss(v, x0_g, noise, torch.ones_like(sigma))

    # -- updates ---------------------------------------------------------------------------------
    def _update(self, role: str, batches: list[EditBatch]) -> dict[str, float]:
        optimizer, scheduler = self.optimizers[role]
        params = self.roles.params[role]
        optim_cfg = self.cfg.generator_optim if role == STUDENT else self.cfg.critic_optim
        optimizer.zero_grad(set_to_none=True)
        total, dmd_grad = 0.0, 0.0
        for batch in batches:
            with self.acc.autocast():
                if role == STUDENT:
                    loss, g = self.generator_loss(batch)
                    dmd_grad += g / len(batches)
                else:
                    loss = self.critic_loss(batch)
            (loss / len(batches)).backward()
            total += loss.item() / len(batches)
        grad_norm = sync_and_clip(params, self.acc, optim_cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        self.updates[role] += 1
        if role == STUDENT:
            return {"generator_loss": total, "generator_grad_norm": grad_norm, "dmd_grad": dmd_grad}
        return {"critic_loss": total, "critic_grad_norm": grad_norm}

    def generator_update(self, batches: list[EditBatch]) -> dict[str, float]:
        return self._update(STUDENT, batches)

    def critic_update(self, batches: list[EditBatch]) -> dict[str, float]:
        return self._update(CRITIC, batches)

    def train_step(self, samples) -> dict[str, float]:
        """Two time-scale step: the generator every `generator_every` steps, then the critic."""
        negative = self.cfg.negative_prompt if self.cfg.cfg_scale > 1 else None
        batches = [self.conditioner(next(samples), negative) for _ in range(self.cfg.gradient_accumulation)]
        self.step += 1
        metrics = {}
        if self.step % self.cfg.generator_every == 0:
            metrics.update(self.generator_update(batches))
        metrics.update(self.critic_update(batches))
        return metrics

    def write_lora(self, out: Path) -> None:
        """The student LoRA. With `teacher_lora`, load both at weight 1.0 to infer."""
        save_lora(self.roles.modules[STUDENT], STUDENT, out)

    def state_dict(self) -> dict:
        state = {"updates": dict(self.updates)}
        for role in (STUDENT, CRITIC):
            optimizer, scheduler = self.optimizers[role]
            state[role] = {
                "lora": lora_state_dict(self.roles.modules[role], role),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
            }
        return state

    def load_state_dict(self, state: dict) -> None:
        for role in (STUDENT, CRITIC):
            optimizer, scheduler = self.optimizers[role]
            load_lora_state_dict(self.roles.modules[role], state[role]["lora"], role)
            optimizer.load_state_dict(state[role]["optimizer"])
            scheduler.load_state_dict(state[role]["scheduler"])
        self.updates = state["updates"]


def train_dmd(cfg: DMDConfig) -> Path:
    return DMDTrainer(cfg).train()
