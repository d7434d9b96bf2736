"""Sampling step schedules: descending noise levels sigma_0 > ... > sigma_{n-1} followed by a final 0.

Sigma is the noise level of x = x0 + sigma * n for every formulation; a discrete VP model's table is
sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]) and a flow's time is t = sigma / (1 + sigma).
"""

import math

import torch

from ldm.utils.errors import ConfigError

SPACINGS = ("leading", "trailing", "linspace")  # discrete VP models only
SCHEDULES = ("default", *SPACINGS, "karras", "flow")  # "default": the formulation's usual choice


def _check_steps(n: int) -> None:
    if n < 1:
        raise ValueError(f"number of sampling steps must be >= 1, got {n}")


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 (EDM) schedule, eq. 5: uniform in sigma^(1/rho) from sigma_max to sigma_min."""
    _check_steps(n)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in log sigma from sigma_max to sigma_min (the rho -> infinity limit of karras_sigmas)."""
    _check_steps(n)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    return _append_zero(log_sigmas.exp())


def discrete_timesteps(
    num_train_timesteps: int, n: int, spacing: str = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """Descending integer timesteps of a discrete model, as diffusers' DDIM/DDPM `timestep_spacing`.

    Lin et al. 2024, Table 2: "leading" (DDIM) steps by T // n from 0 and adds steps_offset, "trailing"
    starts at T - 1, "linspace" rounds n points between 0 and T - 1.
    """
    _check_steps(n)
    T = num_train_timesteps
    if n > T:
        raise ValueError(f"{n} sampling steps exceed the {T} discrete training timesteps")
    if spacing == "leading":
        timesteps = torch.arange(n, dtype=torch.float64).flip(0) * (T // n) + steps_offset
    elif spacing == "trailing":
        timesteps = torch.arange(T, 0, -T / n, dtype=torch.float64) - 1  # float step, as numpy does
    elif spacing == "linspace":
        timesteps = torch.linspace(0, T - 1, n, dtype=torch.float64).flip(0)
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    timesteps = timesteps.round().long()  # round half to even, like numpy
    if timesteps.min() < 0 or timesteps.max() >= T:
        raise ValueError(f"timesteps {timesteps.tolist()} leave [0, {T - 1}] (check steps_offset={steps_offset})")
    return timesteps


def discrete_sigmas(
    sigmas_table: torch.Tensor, n: int, spacing: str = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """Sigmas of a discrete model at diffusers-style spaced timesteps, then 0.

    sigmas_table: the model's ascending sigma for each of its T training timesteps. Returns exact
    table entries (no interpolation), so a discrete denoiser recovers integer timesteps by lookup.
    diffusers' Euler schedulers keep fractional "linspace" timesteps; here they are rounded, as in DDIM/DDPM.
    """
    if sigmas_table.ndim != 1 or not bool((sigmas_table[1:] > sigmas_table[:-1]).all()):
        raise ValueError("sigmas_table must be a 1-D ascending tensor of one sigma per training timestep")
    timesteps = discrete_timesteps(len(sigmas_table), n, spacing, steps_offset)
    return _append_zero(sigmas_table[timesteps.to(sigmas_table.device)])


def flow_sigmas(n: int, shift: float = 1.0, t_max: float = 0.999) -> torch.Tensor:
    """Rectified-flow schedule: uniform in t on [0, t_max], shifted (Esser et al. 2024, eq. 23), as sigma = t / (1 - t).

    t = 1 is pure noise, sigma = infinity, which x = x0 + sigma * n cannot hold: start just below it.
    """
    _check_steps(n)
    if not 0 < t_max < 1:
        raise ValueError(f"t_max must lie in (0, 1), got {t_max}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    t = torch.linspace(t_max, 0, n + 1, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)  # shift > 1 spends more steps at high noise
    return t / (1 - t)


def check_schedule(schedule: str) -> str:
    """The schedule name, or a ConfigError listing the names (before any work is done)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown step schedule {schedule!r} (config key `sampling.schedule`): {' | '.join(SCHEDULES)}")
    return schedule


def continuous_step_sigmas(
    schedule: str, n: int, sigma_min: float, sigma_max: float, flow_t_max: float = 0.999, model: str = "this model"
) -> torch.Tensor:
    """The schedules every formulation offers: karras (Karras et al. 2022, eq. 5) over its sigma range, or flow."""
    if schedule == "karras":
        return karras_sigmas(n, sigma_min, min(sigma_max, 1e4))
    if schedule == "flow":
        return flow_sigmas(n, t_max=flow_t_max)
    if schedule in SPACINGS:
        raise ValueError(f"schedule {schedule!r} needs a discrete VP model, not {model}")
    check_schedule(schedule)  # an unknown name: the error lists the known ones
    raise AssertionError(f"schedule {schedule!r} is listed in SCHEDULES but has no sigmas here")
