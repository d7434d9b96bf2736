"""Samplers: integrate from noise level sigmas[0] down to sigmas[-1] with any denoiser D(x, sigma, cond) -> x0_hat.

All share `sample_x(denoiser, x, sigmas, *, cond=None, callback=None, generator=None, **opts) -> x`:
- x = x0 + sigma * n (Karras et al. 2022). The caller passes the initial x already at noise level
  sigmas[0], e.g. `sigmas[0] * noise.randn(shape)` (its data part is negligible at large sigma).
- sigmas: strictly decreasing 1-D tensor or sequence, normally ending at 0 (see step_schedules).
- callback(dict(i=, x=, sigma=, denoised=)) after each step's first denoiser call, with the x and
  sigma it was called at (sigma a float).
- generator: a SampleNoise (per-sample seeds) for the stochastic samplers, None = torch's global RNG.
No gradient mode is set: wrap calls in torch.inference_mode() unless you differentiate through sampling.
"""

import math
import warnings
from collections.abc import Callable, Sequence
from functools import partial

import torch

from ldm.diffusion.noise import SampleNoise, randn_like
from ldm.utils.errors import ConfigError

DenoiserFn = Callable[[torch.Tensor, torch.Tensor, dict | None], torch.Tensor]  # D(x, sigma, cond) -> x0_hat
Callback = Callable[[dict], None]


def _sigma_list(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    s = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    if s.ndim != 1 or len(s) < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("sigmas must be finite and non-negative")
    if not bool((s[1:] < s[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing")
    return s.tolist()


def _denoise(denoiser: DenoiserFn, x: torch.Tensor, sigma: float, cond: dict | None) -> torch.Tensor:
    # sigma is at least float32 even for half-precision x: a discrete model looks its timestep up by sigma
    dtype = torch.promote_types(x.dtype, torch.float32)
    return denoiser(x, torch.full((x.shape[0],), sigma, device=x.device, dtype=dtype), cond)


def _report(callback: Callback | None, i: int, x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback(dict(i=i, x=x, sigma=sigma, denoised=denoised))


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """Probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split the step sigma -> sigma_next into a deterministic part to sigma_down and fresh noise sigma_up.

    DDIM (Song et al. 2021, eq. 16) in sigma space: sigma_up^2 = eta^2 sigma_next^2 (1 - sigma_next^2 / sigma^2)
    and sigma_down^2 + sigma_up^2 = sigma_next^2. eta = 1 is the DDPM posterior variance.
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    sigma_up = eta * sigma_next * math.sqrt(1 - (sigma_next / sigma) ** 2)
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def _churn(
    x: torch.Tensor, sigma: float, gamma: float, s_noise: float, generator: SampleNoise | None
) -> tuple[torch.Tensor, float]:
    # EDM Algorithm 2, lines 5-6: raise the noise level to sigma_hat = (1 + gamma) sigma with fresh noise
    if gamma == 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + s_noise * math.sqrt(sigma_hat**2 - sigma**2) * randn_like(x, generator), sigma_hat


def _churn_gamma(sigma: float, n: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    # EDM Algorithm 2, line 4: gamma_i, capped so churn never more than doubles the variance
    return min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0


def sample_euler(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    generator: SampleNoise | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler on the probability-flow ODE (Karras et al. 2022, eq. 3), optional churn (EDM Algorithm 2)."""
    s = _sigma_list(sigmas)
    n = len(s) - 1
    for i in range(n):
        x, sigma = _churn(x, s[i], _churn_gamma(s[i], n, s_churn, s_tmin, s_tmax), s_noise, generator)
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, x, sigma, denoised)
        x = x + (s[i + 1] - sigma) * to_d(x, sigma, denoised)
    return x


def sample_heun(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    generator: SampleNoise | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Heun's 2nd-order method (EDM Algorithm 1; Algorithm 2 when s_churn > 0), Euler on the final step to 0."""
    s = _sigma_list(sigmas)
    n = len(s) - 1
    for i in range(n):
        x, sigma = _churn(x, s[i], _churn_gamma(s[i], n, s_churn, s_tmin, s_tmax), s_noise, generator)
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, x, sigma, denoised)
        d = to_d(x, sigma, denoised)
        dt = s[i + 1] - sigma
        if s[i + 1] == 0:  # the trapezoidal correction would divide by sigma = 0
            x = x + dt * d
        else:
            x_next = x + dt * d
            d_next = to_d(x_next, s[i + 1], _denoise(denoiser, x_next, s[i + 1], cond))
            x = x + dt * (d + d_next) / 2
    return x


def sample_ddim(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    generator: SampleNoise | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) in sigma space: x' = x0_hat + sigma_down * eps_hat + sigma_up * z.

    Dividing the VP update by sqrt(alphas_cumprod) gives this form; eta = 0 is deterministic and equals
    Euler on the same sigmas, eta = 1 equals DDPM ancestral sampling.
    """
    s = _sigma_list(sigmas)
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i], cond)
        _report(callback, i, x, s[i], denoised)
        sigma_down, sigma_up = ancestral_sigmas(s[i], s[i + 1], eta)
        x = denoised + sigma_down * to_d(x, s[i], denoised)
        if sigma_up > 0:
            x = x + sigma_up * randn_like(x, generator)
    return x


def sample_ddpm(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    generator: SampleNoise | None = None,
) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, eq. 6-7): draw x_next from the posterior q(x_next | x, x0 = x0_hat).

    In sigma space the VP forward chain is x = x_next + sqrt(sigma^2 - sigma_next^2) z, so the posterior has
    mean x0_hat + (sigma_next / sigma)^2 (x - x0_hat) and std sigma_next sqrt(1 - (sigma_next / sigma)^2)
    (the "fixed small" variance beta_tilde, divided by alphas_cumprod of the next step).
    """
    s = _sigma_list(sigmas)
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i], cond)
        _report(callback, i, x, s[i], denoised)
        ratio = (s[i + 1] / s[i]) ** 2
        x = denoised + ratio * (x - denoised)
        if s[i + 1] > 0:
            x = x + s[i + 1] * math.sqrt(1 - ratio) * randn_like(x, generator)
    return x


def sample_dpmpp_2m(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    generator: SampleNoise | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) with lambda = -log sigma; 1st order on the first and last step."""
    s = _sigma_list(sigmas)
    old_denoised, h_last = None, None
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i], cond)
        _report(callback, i, x, s[i], denoised)
        if s[i + 1] == 0:  # lambda = inf: the exact 1st-order step lands on the data prediction
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            d = denoised
            if old_denoised is not None:  # linear extrapolation of the data prediction to the midpoint
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
    return x


def sample_dpmpp_2m_sde(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    generator: SampleNoise | None = None,
    eta: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022; diffusers' "sde-dpmsolver++", midpoint); eta = 0 is the 2M ODE solver."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    s = _sigma_list(sigmas)
    old_denoised, h_last = None, None
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i], cond)
        _report(callback, i, x, s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)
            x = (s[i + 1] / s[i]) * math.exp(-eta_h) * x + phi * denoised
            if old_denoised is not None:
                x = x + phi * (denoised - old_denoised) * h / (2 * h_last)
            if eta > 0:
                x = x + s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * randn_like(x, generator)
            h_last = h
        old_denoised = denoised
    return x


def sample_flow_euler(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    cond: dict | None = None,
    callback: Callback | None = None,
    generator: SampleNoise | None = None,
) -> torch.Tensor:
    """Euler on the rectified-flow ODE dx_t/dt = v = (x_t - x0_hat) / t, x_t = (1 - t) x0 + t n (Liu et al. 2023).

    x_t = x / (1 + sigma) at t = sigma / (1 + sigma). On the same step points this equals sample_euler:
    both are DDIM, which does not change under x -> x / (1 + sigma); it is kept as the flow's own ODE in t.
    """
    s = _sigma_list(sigmas)
    t = [sigma / (1 + sigma) for sigma in s]
    x_t = x / (1 + s[0])
    for i in range(len(s) - 1):
        x = x_t * (1 + s[i])  # the denoiser speaks sigma space
        denoised = _denoise(denoiser, x, s[i], cond)
        _report(callback, i, x, s[i], denoised)
        v = (x_t - denoised) / t[i]
        x_t = x_t + (t[i + 1] - t[i]) * v
    return x_t * (1 + s[-1])


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "flow_euler": sample_flow_euler,
}

# Other names users know, as (canonical name, options); resolve_sampler says which it runs.
SAMPLER_ALIASES: dict[str, tuple[str, dict]] = {
    "euler_ancestral": ("ddim", {"eta": 1.0}),  # k-diffusion's Euler ancestral is the DDIM update with eta
}


def resolve_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler function for a canonical name, or for an alias (with its options bound, and a warning naming it)."""
    if name in SAMPLER_ALIASES:
        canonical, options = SAMPLER_ALIASES[name]
        settings = "".join(f" {k}={v}" for k, v in options.items())
        warnings.warn(f"sampler {name!r} is {canonical!r} with{settings}: running that", stacklevel=2)
        return partial(SAMPLERS[canonical], **options)
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r} (config key `sampling.sampler`): choose one of "
                          f"{', '.join(sorted(SAMPLERS))} (aliases: {', '.join(sorted(SAMPLER_ALIASES))})")
    return SAMPLERS[name]
