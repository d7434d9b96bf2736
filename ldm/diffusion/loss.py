"""Denoising score-matching loss in x0 space, shared by every formulation (Karras et al. 2022, Eq. 2 and 8)."""

import math

import torch
from einops import reduce
from torch import Tensor, nn

from ldm.diffusion.denoiser import append_dims
from ldm.diffusion.formulations import Formulation
from ldm.diffusion.noise_levels import standard_normal


def training_noise(x0: Tensor, offset_noise: float, *, generator: torch.Generator | None) -> Tensor:
    """float32 n ~ N(0, I) plus offset noise (Guttenberg 2023): a per-sample, per-channel constant of std `offset_noise`."""
    n = standard_normal(tuple(x0.shape), generator=generator, device=x0.device)
    if offset_noise > 0:
        if x0.ndim < 3:
            raise ValueError(f"offset noise needs data shaped [B, C, *spatial], got {tuple(x0.shape)}")
        # [B, C, 1, ..., 1]: one value per channel, so the model learns to change an image's mean brightness
        offset = standard_normal((x0.shape[0], x0.shape[1]), generator=generator, device=x0.device)
        n = n + offset_noise * offset.reshape(*offset.shape, *([1] * (x0.ndim - 2)))
    return n


def denoising_loss(
    denoiser: nn.Module,
    x0: Tensor,
    cond: dict[str, Tensor | None] | None,
    formulation: Formulation,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Weighted x0-space MSE lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2; returns (per-sample loss [B], sigma [B])."""
    sigma = formulation.sample_sigma(x0.shape[0], generator=generator, device=x0.device)
    n = training_noise(x0, formulation.offset_noise, generator=generator)
    # noised in float32 and rounded once: the backbone then runs in the data's dtype
    x = (x0.float() + append_dims(sigma, x0.ndim) * n).to(x0.dtype)
    x0_hat = denoiser(x, sigma, cond)
    mse = reduce((x0_hat.float() - x0.float()) ** 2, "b ... -> b", "mean")
    return formulation.loss_weight(sigma) * mse, sigma


def sigma_buckets(sigma: Tensor, formulation: Formulation, num: int = 4) -> Tensor:
    """Bucket index in [0, num) of each sigma, equal widths in log sigma over [sigma_min, sigma_max], for logging."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    lo, hi = math.log(formulation.sigma_min), math.log(formulation.sigma_max)
    position = (sigma.float().log() - lo) / (hi - lo)
    return (position * num).floor().long().clamp(0, num - 1)
