"""Loss weightings lambda(sigma) in x0 space: lambda ||D - x0||^2 equals each paper's objective in its own space.

With x = x0 + sigma n and SNR = 1 / sigma^2, the x0 error of each prediction type is a scaled error of its target:
eps: D - x0 = -sigma (eps_hat - eps); v: D - x0 = -b (v_hat - v) with b^2 = sigma^2 / (1 + sigma^2);
flow velocity: D - x0 = -t (v_hat - v) with t = sigma / (1 + sigma); EDM: D - x0 = c_out (F - F_target).
"""

from typing import Literal

import torch
from torch import Tensor

Prediction = Literal["eps", "v", "x0"]
PREDICTIONS = ("eps", "v", "x0")


def snr(sigma: Tensor) -> Tensor:
    """Signal-to-noise ratio of x = x0 + sigma n for unit-variance data: SNR = 1 / sigma^2 (= abar / (1 - abar))."""
    return sigma**-2


def vp_uniform_weight(sigma: Tensor, prediction: Prediction) -> Tensor:
    """Unweighted MSE in the prediction's own space (Ho et al. 2020 'simple' loss for eps; Salimans & Ho 2022 for v)."""
    if prediction == "eps":
        return snr(sigma)
    if prediction == "v":
        return snr(sigma) + 1
    if prediction == "x0":
        return torch.ones_like(sigma)
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def min_snr_weight(sigma: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma (Hang et al. 2023, Sec. 3.4): min(SNR, gamma) ||x0_hat - x0||^2 for every prediction type.

    In their own spaces this is min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v.
    """
    return snr(sigma).clamp(max=gamma)


def edm_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2 (Karras et al. 2022, Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def flow_velocity_weight(sigma: Tensor) -> Tensor:
    """Rectified-flow velocity MSE ||v_hat - (n - x0)||^2 (Liu et al. 2022; Esser et al. 2024, Sec. 2): lambda = 1 / t^2."""
    return ((1 + sigma) / sigma) ** 2
