"""Diffusion formulations: a preconditioning, a training noise-level distribution and a loss weighting each.

All share the surface of `Formulation`, in the EDM noise level sigma (x = x0 + sigma n), so any sampler runs
any model. Coefficients and sigmas are float32.
"""

import math
from typing import Literal, Protocol

import torch
from torch import Tensor

from ldm.diffusion import noise_levels, precond, schedules, step_schedules
from ldm.diffusion.precond import Coefficients
from ldm.diffusion.weighting import PREDICTIONS, edm_weight, flow_velocity_weight, min_snr_weight, vp_uniform_weight


class Formulation(Protocol):
    """What the denoiser, the loss and the samplers need from a formulation."""

    sigma_min: float
    sigma_max: float
    offset_noise: float

    def precondition(self, sigma: Tensor) -> Coefficients: ...

    def sample_sigma(
        self, batch_size: int, *, generator: torch.Generator | None, device: torch.device | str | None = None
    ) -> Tensor: ...

    def loss_weight(self, sigma: Tensor) -> Tensor: ...

    def step_sigmas(self, steps: int, schedule: str = "default") -> Tensor: ...


def _check_offset_noise(offset_noise: float) -> float:
    if offset_noise < 0:
        raise ValueError(f"offset_noise must be >= 0, got {offset_noise}")
    return offset_noise


class VPFormulation:
    """Discrete variance-preserving diffusion (DDPM / Stable Diffusion) with eps-, v- or x0-prediction."""

    def __init__(
        self,
        schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear",
        num_timesteps: int = 1000,
        prediction: Literal["eps", "v", "x0"] = "eps",
        zero_terminal_snr: bool = False,
        weighting: Literal["uniform", "min_snr"] = "uniform",
        min_snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
        steps_offset: int = 0,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
        if weighting not in ("uniform", "min_snr"):
            raise ValueError(f"unknown weighting {weighting!r}; expected 'uniform' or 'min_snr'")
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        if steps_offset < 0:
            raise ValueError(f"steps_offset must be >= 0, got {steps_offset}")
        if zero_terminal_snr and prediction == "eps":
            # At SNR 0 the input carries no signal and x0 = x - sigma eps is undefined (Lin et al. 2024, Sec. 3.2).
            raise ValueError("zero_terminal_snr=True needs prediction='v' or 'x0'; eps-prediction cannot reach x0 at SNR 0")
        self.schedule = schedule
        self.num_timesteps = num_timesteps
        self.prediction = prediction
        self.zero_terminal_snr = zero_terminal_snr
        self.weighting = weighting
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = _check_offset_noise(offset_noise)
        # diffusers' steps_offset: "leading" sampling timesteps start at this index (Stable Diffusion: 1)
        self.steps_offset = steps_offset

        betas = schedules.make_betas(schedule, num_timesteps)
        if zero_terminal_snr:
            betas = schedules.rescale_zero_terminal_snr(betas)
        abar = schedules.alphas_cumprod(betas)
        if zero_terminal_snr:
            # abar_T = 0 puts the last step at sigma = inf, which x = x0 + sigma n cannot hold. A tiny positive abar_T
            # (at most 2**-24, diffusers' Euler choice, and a quarter of abar_{T-1} so the table stays ascending; sigma_T
            # ~ 4e3 for scaled_linear) makes c_in x pure noise up to a 2**-12 x0 term, while D and the loss stay finite.
            abar[-1] = min(2.0**-24, abar[-2].item() / 4)
        self.sigmas_table = schedules.sigma_from_alphas_cumprod(abar).float()  # [T], ascending
        self.sigma_min = self.sigmas_table[0].item()
        self.sigma_max = self.sigmas_table[-1].item()
        self._tables: dict[torch.device, Tensor] = {}

    def _table_on(self, device: torch.device) -> Tensor:
        """The sigma table on `device`, copied once per device (kept out of any module so .half() cannot round it)."""
        if device not in self._tables:
            self._tables[device] = self.sigmas_table.to(device)
        return self._tables[device]

    def precondition(self, sigma: Tensor) -> Coefficients:
        """(c_skip, c_out, c_in, c_noise) for the prediction type; c_noise is the continuous timestep t(sigma)."""
        table = self._table_on(sigma.device)
        if self.prediction == "eps":
            return precond.vp_eps_precond(sigma, table)
        if self.prediction == "v":
            return precond.vp_v_precond(sigma, table)
        return precond.vp_x0_precond(sigma, table)

    def sample_sigma(
        self, batch_size: int, *, generator: torch.Generator | None, device: torch.device | str | None = None
    ) -> Tensor:
        """sigma of uniformly drawn discrete timesteps."""
        return noise_levels.vp_discrete_sigma(batch_size, self.sigmas_table, generator=generator, device=device)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """x0-space weight: uniform in the prediction's own space, or min-SNR-gamma."""
        if self.weighting == "min_snr":
            return min_snr_weight(sigma, self.min_snr_gamma)
        return vp_uniform_weight(sigma, self.prediction)

    def step_sigmas(self, steps: int, schedule: str = "default") -> Tensor:
        """Sampling sigmas then 0: table entries at spaced timesteps (default trailing), or karras/flow."""
        schedule = "trailing" if schedule == "default" else schedule
        if schedule in step_schedules.SPACINGS:
            return step_schedules.discrete_sigmas(self.sigmas_table, steps, schedule, self.steps_offset)
        return step_schedules.continuous_step_sigmas(schedule, steps, self.sigma_min, self.sigma_max)


class EDMFormulation:
    """EDM (Karras et al. 2022): sigma_data preconditioning, log-normal training sigmas, lambda = 1 / c_out^2."""

    def __init__(
        self,
        sigma_data: float = 0.5,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        offset_noise: float = 0.0,
    ) -> None:
        if sigma_data <= 0 or P_std <= 0:
            raise ValueError(f"sigma_data and P_std must be > 0, got {sigma_data} and {P_std}")
        if not 0 < sigma_min < sigma_max < math.inf:
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
        self.sigma_data = sigma_data
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.offset_noise = _check_offset_noise(offset_noise)

    def precondition(self, sigma: Tensor) -> Coefficients:
        """EDM (c_skip, c_out, c_in, c_noise)."""
        return precond.edm_precond(sigma, self.sigma_data)

    def sample_sigma(
        self, batch_size: int, *, generator: torch.Generator | None, device: torch.device | str | None = None
    ) -> Tensor:
        """ln(sigma) ~ N(P_mean, P_std^2)."""
        return noise_levels.edm_lognormal_sigma(batch_size, self.P_mean, self.P_std, generator=generator, device=device)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
        return edm_weight(sigma, self.sigma_data)

    def step_sigmas(self, steps: int, schedule: str = "default") -> Tensor:
        """Sampling sigmas then 0: karras (EDM eq. 5, the default) or flow."""
        schedule = "karras" if schedule == "default" else schedule
        return step_schedules.continuous_step_sigmas(
            schedule, steps, self.sigma_min, self.sigma_max, model=type(self).__name__
        )


class FlowFormulation:
    """Rectified flow (Liu et al. 2022; SD3, Esser et al. 2024): velocity prediction, logit-normal or uniform t.

    t is clamped to [t_min, t_max]: t = 0 and t = 1 are sigma = 0 and sigma = inf, where the velocity weight 1 / t^2
    and x = x0 + sigma n stop being finite. `shift` rescales training noise (sigma -> shift * sigma, SD3 Sec. 5.3.2).
    """

    def __init__(
        self,
        time_sampling: Literal["logit_normal", "uniform"] = "logit_normal",
        m: float = 0.0,
        s: float = 1.0,
        shift: float = 1.0,
        t_min: float = 1e-4,
        t_max: float = 1 - 1e-4,
        t_scale: float = 1000.0,
        offset_noise: float = 0.0,
    ) -> None:
        if time_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"unknown time_sampling {time_sampling!r}; expected 'logit_normal' or 'uniform'")
        if s <= 0 or shift <= 0:
            raise ValueError(f"s and shift must be > 0, got {s} and {shift}")
        if not 0 < t_min < t_max < 1:
            raise ValueError(f"need 0 < t_min < t_max < 1, got {t_min}, {t_max}")
        self.time_sampling = time_sampling
        self.m = m
        self.s = s
        self.shift = shift
        self.t_min = t_min
        self.t_max = t_max
        self.t_scale = t_scale
        self.offset_noise = _check_offset_noise(offset_noise)
        self.sigma_min = t_min / (1 - t_min)
        self.sigma_max = t_max / (1 - t_max)

    def precondition(self, sigma: Tensor) -> Coefficients:
        """Rectified-flow (c_skip, c_out, c_in, c_noise = t_scale * t)."""
        return precond.flow_precond(sigma, self.t_scale)

    def sample_sigma(
        self, batch_size: int, *, generator: torch.Generator | None, device: torch.device | str | None = None
    ) -> Tensor:
        """sigma = t / (1 - t) for t drawn logit-normal or uniform, shifted, then clamped to [t_min, t_max]."""
        if self.time_sampling == "logit_normal":
            t = noise_levels.logit_normal_t(batch_size, self.m, self.s, generator=generator, device=device)
        else:
            t = noise_levels.uniform_t(batch_size, generator=generator, device=device)
        t = noise_levels.shift_t(t, self.shift).clamp(self.t_min, self.t_max)
        return schedules.flow_t_to_sigma(t)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """Velocity MSE: lambda = 1 / t^2."""
        return flow_velocity_weight(sigma)

    def step_sigmas(self, steps: int, schedule: str = "default") -> Tensor:
        """Sampling sigmas then 0: uniform in t up to t_max (flow, the default) or karras."""
        schedule = "flow" if schedule == "default" else schedule
        return step_schedules.continuous_step_sigmas(
            schedule, steps, self.sigma_min, self.sigma_max, flow_t_max=self.t_max, model=type(self).__name__
        )
