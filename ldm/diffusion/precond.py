"""Preconditioning (c_skip, c_out, c_in, c_noise) of each formulation, so that D(x, sigma) = c_skip x + c_out F(c_in x, c_noise).

Karras et al. 2022 (EDM), Eq. 7; x = x0 + sigma * n. Every function takes sigma [B] and returns four [B] tensors.
The VP ones use a = sqrt(abar) = 1 / sqrt(1 + sigma^2) and b = sqrt(1 - abar) = sigma / sqrt(1 + sigma^2),
so the VP network input x_t = a x0 + b n is c_in x with c_in = a.
"""

import torch
from torch import Tensor

from ldm.diffusion.schedules import flow_sigma_to_t, sigma_to_t

Coefficients = tuple[Tensor, Tensor, Tensor, Tensor]


def vp_eps_precond(sigma: Tensor, sigmas_table: Tensor) -> Coefficients:
    """DDPM eps-prediction (Ho et al. 2020): x0 = (x_t - b eps) / a = x - sigma eps (Karras et al. 2022, Table 1, VP)."""
    c_skip = torch.ones_like(sigma)
    c_out = -sigma
    c_in = 1 / (sigma**2 + 1).sqrt()
    return c_skip, c_out, c_in, sigma_to_t(sigma, sigmas_table)


def vp_v_precond(sigma: Tensor, sigmas_table: Tensor) -> Coefficients:
    """v-prediction (Salimans & Ho 2022, App. D): v = a n - b x0, so x0 = a x_t - b v = a^2 x - b v."""
    c_skip = 1 / (sigma**2 + 1)
    c_out = -sigma / (sigma**2 + 1).sqrt()
    c_in = 1 / (sigma**2 + 1).sqrt()
    return c_skip, c_out, c_in, sigma_to_t(sigma, sigmas_table)


def vp_x0_precond(sigma: Tensor, sigmas_table: Tensor) -> Coefficients:
    """x0-prediction on a VP schedule (Ho et al. 2020, Sec. 3.2 alternative): the network output is x0 itself."""
    c_skip = torch.zeros_like(sigma)
    c_out = torch.ones_like(sigma)
    c_in = 1 / (sigma**2 + 1).sqrt()
    return c_skip, c_out, c_in, sigma_to_t(sigma, sigmas_table)


def edm_precond(sigma: Tensor, sigma_data: float) -> Coefficients:
    """EDM preconditioning (Karras et al. 2022, Table 1 / Eq. 7): unit-variance input and F-target, c_noise = ln(sigma)/4."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def flow_precond(sigma: Tensor, t_scale: float = 1000.0) -> Coefficients:
    """Rectified flow (Liu et al. 2022; Esser et al. 2024, Sec. 2): x_t = (1-t) x0 + t n, F predicts v = n - x0.

    With t = sigma / (1 + sigma), x_t = x / (1 + sigma) and x0 = x_t - t v; the backbone sees c_noise = t_scale * t.
    """
    t = flow_sigma_to_t(sigma)
    c_skip = 1 - t
    c_out = -t
    c_in = 1 - t
    return c_skip, c_out, c_in, t_scale * t
