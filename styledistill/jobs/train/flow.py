"""Flow-matching maths shared by SFT and DMD.

Convention (Qwen-Image, SD3): sigma in [0, 1], sigma 0 is data, sigma 1 is noise.
    x_sigma = (1 - sigma) * x0 + sigma * noise,   v = noise - x0,   x0 = x_sigma - sigma * v
The transformer is called with `timestep = sigma` (the pipeline passes scheduler timesteps / 1000).
"""

from __future__ import annotations

import torch
from diffusers import QwenImageEditPlusPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from styledistill.jobs.train.config import FlowConfig


def _bcast(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = _bcast(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def x0_from_velocity(x_sigma: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return x_sigma - _bcast(sigma, x_sigma) * v


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler's static shift: more time at high noise when shift > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(n: int, cfg: FlowConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training sigmas: uniform or logit-normal density (SD3), then shifted."""
    u = compute_density_for_timestep_sampling(
        cfg.sampling, n, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std, generator=generator
    )
    return shift_sigma(u, cfg.shift)


def loss_weight(sigma: torch.Tensor, cfg: FlowConfig) -> torch.Tensor:
    return compute_loss_weighting_for_sd3(cfg.weighting, sigma)


def flow_loss(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted MSE against the velocity target, mean per sample then over the batch."""
    per_sample = ((v_pred.float() - velocity(x0, noise).float()) ** 2).flatten(1).mean(1)
    return (weight.to(per_sample) * per_sample).mean()


def normalize_latents(latents: torch.Tensor, latents_mean: list[float], latents_std: list[float]) -> torch.Tensor:
    """VAE latents (B, C, F, H, W) to the transformer's space, as the pipeline's _encode_vae_image does."""
    mean = torch.tensor(latents_mean).view(1, -1, 1, 1, 1).to(latents)
    std = torch.tensor(latents_std).view(1, -1, 1, 1, 1).to(latents)
    return (latents - mean) / std


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, h, w) latents to (B, h/2 * w/2, 4C) tokens of 2x2 patches."""
    b, c, _, h, w = latents.shape
    return QwenImageEditPlusPipeline._pack_latents(latents, b, c, h, w)

