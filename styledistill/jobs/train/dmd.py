"""DMD2-style distillation of a few-step student LoRA (tianweiy/DMD2, FastVideo's distillation pipeline).

Roles, all the same transformer architecture:
- teacher (real score): the frozen base, optionally with an SFT style LoRA fused in; CFG on its velocity;
- student (generator): a LoRA trained to produce x0 in `student_steps` Euler steps;
- critic (fake score): a LoRA trained with flow matching on the student's detached outputs, so it tracks
  the student's distribution.
With `shared_base` (default) the three are one frozen base with two named peft adapters switched per
role (teacher = adapters disabled): one copy of the 20B weights instead of three.

Generator update (every `generator_every` steps): x0_g = student output at a random step of its schedule
(reached by running the earlier steps without gradient, or by noising the data target); noise x0_g at
sigma ~ U[sigma_min, sigma_max]; grad = (x0_fake - x0_real) / mean|x0_g - x0_real| per sample;
loss = 0.5 * MSE(x0_g, stopgrad(x0_g - grad)), whose gradient w.r.t. x0_g is grad / numel.
Critic update (every step): flow-matching loss on re-noised, detached student outputs.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

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
from styledistill.jobs.train.config import DMDConfig
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

TEACHER, STUDENT, CRITIC = "teacher", "student", "critic"
LORA_DIR = "lora"


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


class DMDTrainer:
    def __init__(self, cfg: DMDConfig):
        self.cfg = cfg
        self.acc = make_accelerator(cfg)
        self.pipe = load_pipeline(cfg.model, self.acc.device)
        if cfg.teacher_lora:
            # Teacher = base + SFT LoRA, fused into the frozen weights; student and critic start from it.
            self.pipe.load_lora_weights(cfg.teacher_lora, adapter_name="teacher")
            self.pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
            self.pipe.unload_lora_weights()
        self.roles = Roles(self.pipe.transformer, cfg)
        self.optimizers = {
            STUDENT: make_optimizer(self.roles.params[STUDENT], cfg.generator_optim),
            CRITIC: make_optimizer(self.roles.params[CRITIC], cfg.critic_optim),
        }
        self.schedule = flow.student_schedule(cfg.student_steps, cfg.student_shift)
        self.conditioner = EditConditioner(self.pipe, cfg.model)
        self.generator = noise_generator(cfg.seed, self.acc.process_index)
        self.checkpointer = Checkpointer(cfg.output_dir, self.acc, cfg.keep_checkpoints)
        self.log = MetricsLog(cfg.output_dir, self.acc, cfg.log_every)
        self.step, self.updates, consumed = 0, {STUDENT: 0, CRITIC: 0}, 0
        latest = self.checkpointer.latest()
        if latest is not None:
            consumed = self._resume(latest)
        self.loader = TripletLoader(cfg.data, self.acc.process_index, self.acc.num_processes, consumed)

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
        sigmas = self.schedule
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

    def generator_loss(self, batch: EditBatch) -> tuple[torch.Tensor, float]:
        x0_g = self.student_x0(batch, with_grad=True)
        n = x0_g.shape[0]
        sigma = self.cfg.sigma_min + (self.cfg.sigma_max - self.cfg.sigma_min) * torch.rand(n, generator=self.generator)
        sigma = sigma.to(x0_g.device)
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
        sigma = flow.sample_sigmas(x0_g.shape[0], self.cfg.critic_flow, self.generator).to(x0_g.device)
        x_sigma = flow.add_noise(x0_g, noise, sigma)
        v = self.roles.velocity(CRITIC, x_sigma, sigma, batch)
        return flow.flow_loss(v, x0_g, noise, flow.loss_weight(sigma, self.cfg.critic_flow))

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

    def train(self) -> Path:
        samples = iter(self.loader)
        for module in self.roles.modules.values():
            module.train()
        while self.step < self.cfg.max_steps:
            metrics = self.train_step(samples)
            self.log(self.step, **metrics, **{f"skipped_{k}": v for k, v in self.loader.skipped.items()})
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.max_steps:
                self.save_checkpoint()
        return self.save_lora()

    # -- saving ----------------------------------------------------------------------------------
    def save_lora(self) -> Path:
        """The student LoRA in diffusers format. With `teacher_lora`, load both at weight 1.0 to infer."""
        out = Path(self.cfg.output_dir) / LORA_DIR
        if self.acc.is_main_process:
            save_lora(self.roles.modules[STUDENT], STUDENT, out)
        self.acc.wait_for_everyone()
        return out

    def save_checkpoint(self) -> Path:
        shared = {"step": self.step, "updates": dict(self.updates)}
        for role in (STUDENT, CRITIC):
            optimizer, scheduler = self.optimizers[role]
            shared[role] = {
                "lora": lora_state_dict(self.roles.modules[role], role),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
            }
        local = {"rng": rng_state(self.generator), "consumed": self.loader.consumed}
        return self.checkpointer.save(self.step, shared, local)

    def _resume(self, path: Path) -> int:
        shared, local = self.checkpointer.load(path)
        for role in (STUDENT, CRITIC):
            optimizer, scheduler = self.optimizers[role]
            load_lora_state_dict(self.roles.modules[role], shared[role]["lora"], role)
            optimizer.load_state_dict(shared[role]["optimizer"])
            scheduler.load_state_dict(shared[role]["scheduler"])
        set_rng_state(local["rng"], self.generator)
        self.step, self.updates = shared["step"], shared["updates"]
        logger.info("resumed from %s at step %d", path, self.step)
        return local["consumed"]


def train_dmd(cfg: DMDConfig) -> Path:
    return DMDTrainer(cfg).train()
