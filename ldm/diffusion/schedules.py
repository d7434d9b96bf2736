"""Noise schedules as pure functions: discrete VP beta tables and conversions to the EDM noise level sigma.

Convention (Karras et al. 2022): x = x0 + sigma * n. A VP sample x_t = sqrt(abar) x0 + sqrt(1 - abar) n is the
same point scaled by sqrt(abar), with sigma = sqrt((1 - abar) / abar); a rectified-flow sample
x_t = (1 - t) x0 + t n is the same point scaled by 1 - t, with sigma = t / (1 - t).
Tables are computed in float64; callers cast.
"""

import math

import torch
from torch import Tensor

VP_SCHEDULES = ("linear", "scaled_linear", "cosine")


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM linear beta schedule (Ho et al. 2020, Sec. 4: beta_1 = 1e-4 ... beta_T = 0.02)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Latent-diffusion / Stable Diffusion schedule: betas linear in sqrt(beta) (Rombach et al. 2022 configs)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, Eq. 17): abar(t) = cos^2((t/T + s)/(1 + s) * pi/2), betas capped."""
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    abar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    # beta_t = 1 - abar(t) / abar(t - 1); the cap avoids the singularity at t = T (Sec. 3.2).
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def make_betas(schedule: str, num_timesteps: int) -> Tensor:
    """Beta table of a named VP schedule: 'linear', 'scaled_linear' or 'cosine' (diffusers' squaredcos_cap_v2)."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    if schedule == "linear":
        return linear_betas(num_timesteps)
    if schedule == "scaled_linear":
        return scaled_linear_betas(num_timesteps)
    if schedule == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown VP schedule {schedule!r}; expected one of {VP_SCHEDULES}")


def alphas_cumprod(betas: Tensor) -> Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s) (Ho et al. 2020, Eq. 4)."""
    return torch.cumprod(1 - betas.double(), dim=0)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Zero terminal SNR (Lin et al. 2024, Alg. 1): shift and scale sqrt(abar) so sqrt(abar_T) = 0, keep sqrt(abar_1)."""
    sqrt_abar = alphas_cumprod(betas).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def sigma_from_alphas_cumprod(abar: Tensor) -> Tensor:
    """VP -> EDM noise level: sigma = sqrt((1 - abar) / abar) (Karras et al. 2022, Table 1 with s(t) = sqrt(abar))."""
    return ((1 - abar) / abar).sqrt()


def alphas_cumprod_from_sigma(sigma: Tensor) -> Tensor:
    """EDM noise level -> VP: abar = 1 / (1 + sigma^2)."""
    return 1 / (1 + sigma**2)


def sigma_to_t(sigma: Tensor, sigmas: Tensor) -> Tensor:
    """Continuous timestep index in [0, T-1] of sigma, linear in log sigma between entries of an ascending table.

    Noise levels outside the table are clamped to its ends (e.g. sigma = 0 maps to t = 0).
    """
    log_sigmas = sigmas.log()
    log_sigma = sigma.to(sigmas.dtype).log().clamp(log_sigmas[0], log_sigmas[-1])
    # lower neighbour index in [0, T-2]; an exact table entry i gives weight 0 (or 1 for the last one)
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(sigmas) - 2)
    w = (log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])
    return low.to(sigmas.dtype) + w


def t_to_sigma(t: Tensor, sigmas: Tensor) -> Tensor:
    """Noise level at a continuous timestep index t in [0, T-1] of an ascending table (log-sigma interpolation)."""
    num_timesteps = len(sigmas)
    t = t.to(sigmas.dtype)
    if bool(((t < 0) | (t > num_timesteps - 1)).any()):
        raise ValueError(f"timesteps must lie in [0, {num_timesteps - 1}], got range [{t.min()}, {t.max()}]")
    low = t.floor().long().clamp(0, num_timesteps - 2)
    w = t - low
    log_sigmas = sigmas.log()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


def flow_sigma_to_t(sigma: Tensor) -> Tensor:
    """Rectified-flow time of a noise level: t = sigma / (1 + sigma), so x_t = (1 - t) x0 + t n = x / (1 + sigma)."""
    return sigma / (1 + sigma)


def flow_t_to_sigma(t: Tensor) -> Tensor:
    """Noise level of a rectified-flow time: sigma = t / (1 - t) (inverse of flow_sigma_to_t)."""
    return t / (1 - t)
