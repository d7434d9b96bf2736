"""Training noise-level distributions as pure functions of an explicit generator.

Draws happen on the generator's device and are then moved to `device`, so a seeded generator gives the same
numbers whatever device trains; with generator=None they come from torch's global RNG on `device`.
"""

import torch
from torch import Tensor


def _draw_device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device | str | None:
    return generator.device if generator is not None else device


def standard_normal(
    shape: tuple[int, ...], *, generator: torch.Generator | None, device: torch.device | str | None = None
) -> Tensor:
    """float32 N(0, 1) draws of `shape` from `generator`, returned on `device`."""
    draw = torch.randn(shape, generator=generator, device=_draw_device(generator, device))
    return draw.to(device)


def standard_uniform(
    shape: tuple[int, ...], *, generator: torch.Generator | None, device: torch.device | str | None = None
) -> Tensor:
    """float32 U[0, 1) draws of `shape` from `generator`, returned on `device`."""
    draw = torch.rand(shape, generator=generator, device=_draw_device(generator, device))
    return draw.to(device)


def vp_discrete_sigma(
    batch_size: int, sigmas_table: Tensor, *, generator: torch.Generator | None, device: torch.device | str | None = None
) -> Tensor:
    """DDPM training noise levels (Ho et al. 2020, Alg. 1): t ~ U{0, ..., T-1}, returned as sigma = sigmas_table[t]."""
    t = torch.randint(0, len(sigmas_table), (batch_size,), generator=generator, device=_draw_device(generator, device))
    return sigmas_table.to(t.device)[t].to(device)


def edm_lognormal_sigma(
    batch_size: int,
    P_mean: float,
    P_std: float,
    *,
    generator: torch.Generator | None,
    device: torch.device | str | None = None,
) -> Tensor:
    """EDM training noise levels (Karras et al. 2022, Table 1): ln(sigma) ~ N(P_mean, P_std^2)."""
    return (P_mean + P_std * standard_normal((batch_size,), generator=generator, device=device)).exp()


def logit_normal_t(
    batch_size: int, m: float, s: float, *, generator: torch.Generator | None, device: torch.device | str | None = None
) -> Tensor:
    """Logit-normal flow times (Esser et al. 2024, Sec. 3.1): t = sigmoid(u), u ~ N(m, s^2)."""
    return torch.sigmoid(m + s * standard_normal((batch_size,), generator=generator, device=device))


def uniform_t(batch_size: int, *, generator: torch.Generator | None, device: torch.device | str | None = None) -> Tensor:
    """Uniform flow times t ~ U[0, 1) (Liu et al. 2022, rectified flow)."""
    return standard_uniform((batch_size,), generator=generator, device=device)


def shift_t(t: Tensor, shift: float) -> Tensor:
    """Timestep shift (Esser et al. 2024, Sec. 5.3.2): t' = shift t / (1 + (shift - 1) t), i.e. sigma' = shift * sigma."""
    return shift * t / (1 + (shift - 1) * t)
