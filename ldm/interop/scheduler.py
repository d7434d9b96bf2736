"""diffusers scheduler configs <-> our VP formulation and sampling settings; SD single-file schedule buffers.

A diffusers `scheduler_config.json` mixes two things we keep apart. The training schedule (betas, prediction type,
sample clipping) fixes the denoiser D(x, sigma): it becomes our formulation, exactly or not at all (ConfigError).
The scheduler class and its spacing only choose how to sample: they become `sampling:` settings, the nearest ones
we have, with one warning naming what differs when they are not the same sampler.
Configs are plain dicts (read from json); diffusers itself is never imported here.
"""

import math
import warnings

import torch
from torch import Tensor

from ldm.diffusion import schedules, step_schedules
from ldm.utils.errors import ConfigError

VP_TARGET = "ldm.diffusion.formulations.VPFormulation"

# Our schedule names as diffusers (beta_schedule, beta_start, beta_end); cosine ignores the two betas.
_BETAS = {"linear": ("linear", 1e-4, 0.02), "scaled_linear": ("scaled_linear", 0.00085, 0.012),
          "cosine": ("squaredcos_cap_v2", 1e-4, 0.02)}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}

# The fields read here, at the defaults of diffusers' scheduler classes: old hub configs leave many of them out.
_COMMON = dict(
    num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    prediction_type="epsilon", rescale_betas_zero_snr=False, steps_offset=0, timestep_spacing="linspace",
    clip_sample=False, thresholding=False, variance_type=None, timestep_type="discrete", use_flow_sigmas=False,
    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
    interpolation_type="linear", final_sigmas_type="zero", sigma_min=None, sigma_max=None,
)
_CLASS_DEFAULTS = {
    "DDPMScheduler": dict(clip_sample=True, timestep_spacing="leading", variance_type="fixed_small"),
    "DDIMScheduler": dict(clip_sample=True, timestep_spacing="leading", set_alpha_to_one=True),
    "PNDMScheduler": dict(timestep_spacing="leading", set_alpha_to_one=False),
    "EulerDiscreteScheduler": {},
    "EulerAncestralDiscreteScheduler": {},
    "HeunDiscreteScheduler": dict(beta_start=0.00085, beta_end=0.012),
    "DPMSolverMultistepScheduler": dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                        euler_at_final=False),
    "DPMSolverSinglestepScheduler": {},
    "LMSDiscreteScheduler": {},
    "UniPCMultistepScheduler": {},
    "DEISMultistepScheduler": {},
    "KDPM2DiscreteScheduler": dict(beta_start=0.00085, beta_end=0.012),
}
_EULER_LIKE = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler")


def _settings(config: dict) -> tuple[str, dict]:
    """The class name and every field read here (the class's default where the config leaves one out)."""
    name = config.get("_class_name")
    if name not in _CLASS_DEFAULTS:
        raise ConfigError(f"scheduler `_class_name` {name!r} is not a discrete VP scheduler we can read; "
                          f"known: {', '.join(_CLASS_DEFAULTS)}")
    return name, {**_COMMON, **_CLASS_DEFAULTS[name], **config}


def _schedule_name(s: dict) -> str:
    """Our beta schedule for the config's betas, or a ConfigError naming the key that has none."""
    T = s["num_train_timesteps"]
    if s["trained_betas"] is not None:
        theirs = torch.as_tensor(s["trained_betas"], dtype=torch.float64)
        for name in _BETAS:
            ours = schedules.make_betas(name, T)
            if theirs.shape == ours.shape and torch.allclose(theirs, ours, rtol=1e-5, atol=0):
                return name
        raise ConfigError(f"scheduler `trained_betas` ({len(theirs)} values) equal none of our schedules "
                          f"{', '.join(_BETAS)} with num_train_timesteps={T}")
    for name, (theirs, start, end) in _BETAS.items():
        if s["beta_schedule"] == theirs and (name == "cosine" or (
                math.isclose(s["beta_start"], start, rel_tol=1e-6) and math.isclose(s["beta_end"], end, rel_tol=1e-6))):
            return name
    raise ConfigError(f"scheduler `beta_schedule`={s['beta_schedule']!r} with beta_start={s['beta_start']}, "
                      f"beta_end={s['beta_end']} is none of ours: "
                      + ", ".join(f"{n} ({b[0]} {b[1]}..{b[2]})" for n, b in _BETAS.items()))


def formulation_from_scheduler(config: dict) -> dict:
    """Our VPFormulation config (with `_target_`) for a diffusers scheduler config's training schedule, exactly.

    `steps_offset` is carried too: it only shifts "leading" sampling timesteps, but it is the model's convention
    (Stable Diffusion: 1) and our formulation is where step sigmas are made.
    """
    name, s = _settings(config)
    refused = {
        "thresholding": s["thresholding"],  # dynamic thresholding changes x0_hat, which D(x, sigma) cannot express
        "clip_sample": s["clip_sample"],
        # continuous v-prediction timesteps: the network sees 0.25 log sigma (EDM's c_noise), not a timestep
        "timestep_type": s["timestep_type"] == "continuous" and s["prediction_type"] == "v_prediction",
        "variance_type": s["variance_type"] in ("learned", "learned_range"),  # extra output channels
        "use_flow_sigmas": s["use_flow_sigmas"],
    }
    for key, bad in refused.items():
        if bad:
            raise ConfigError(f"{name} `{key}`={s[key]!r} is not expressible in our VP formulation")
    if s["prediction_type"] not in _PREDICTIONS:
        raise ConfigError(f"scheduler `prediction_type` {s['prediction_type']!r} is none of {', '.join(_PREDICTIONS)}")
    prediction = _PREDICTIONS[s["prediction_type"]]
    if s["rescale_betas_zero_snr"] and prediction == "eps":
        raise ConfigError("scheduler `rescale_betas_zero_snr` needs v or sample prediction: "
                          "eps cannot reach x0 at SNR 0")
    return {
        "_target_": VP_TARGET,
        "schedule": _schedule_name(s),
        "num_timesteps": int(s["num_train_timesteps"]),
        "prediction": prediction,
        "zero_terminal_snr": bool(s["rescale_betas_zero_snr"]),
        "steps_offset": int(s["steps_offset"]),
    }


def _sampler_of(name: str, s: dict, notes: list[str]) -> tuple[str, float | None]:
    """Our sampler and eta for a scheduler class; `notes` gets what makes it differ from that class."""
    if name == "DDIMScheduler":
        if not s["set_alpha_to_one"]:
            notes.append("set_alpha_to_one=false stops at alphas_cumprod[0]; ours ends at sigma 0 (x0_hat)")
        return "ddim", 0.0
    if name == "EulerDiscreteScheduler":
        return "euler", None
    if name == "EulerAncestralDiscreteScheduler":
        return "ddim", 1.0  # Euler ancestral is the DDIM update with eta = 1 (see samplers.SAMPLER_ALIASES)
    if name == "HeunDiscreteScheduler":
        return "heun", None
    if name == "DDPMScheduler":
        if s["variance_type"] != "fixed_small":
            notes.append(f"variance_type={s['variance_type']!r}: ours samples the fixed_small posterior variance")
        return "ddpm", None
    if name == "DPMSolverMultistepScheduler":
        order = (s["algorithm_type"], s["solver_order"], s["solver_type"], s["euler_at_final"])
        if order == ("sde-dpmsolver++", 2, "midpoint", False):
            return "dpmpp_2m_sde", 1.0
        if order != ("dpmsolver++", 2, "midpoint", False):
            notes.append(f"algorithm_type={s['algorithm_type']!r} solver_order={s['solver_order']} "
                         f"solver_type={s['solver_type']!r} euler_at_final={s['euler_at_final']}: ours is "
                         "dpmsolver++ order 2 midpoint")
        return "dpmpp_2m", None
    if name == "PNDMScheduler" and not s["set_alpha_to_one"]:
        notes.append("set_alpha_to_one=false stops at alphas_cumprod[0]; ours ends at sigma 0 (x0_hat)")
    notes.append(f"we have no {name}: using the 2nd-order multistep DPM-Solver++(2M)")
    return "dpmpp_2m", None


def _schedule_of(name: str, s: dict, notes: list[str]) -> str:
    """Our sampling.schedule for the scheduler's spacing options; `notes` gets what differs."""
    if s["final_sigmas_type"] != "zero":
        notes.append(f"final_sigmas_type={s['final_sigmas_type']!r}: ours ends at sigma 0")
    for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
        if s[key]:
            notes.append(f"{key}: ours uses karras sigmas instead")
            return "karras"
    if s["interpolation_type"] != "linear":
        notes.append(f"interpolation_type={s['interpolation_type']!r}: ours uses karras sigmas instead")
        return "karras"
    if s["use_karras_sigmas"]:
        if s["sigma_min"] is not None or s["sigma_max"] is not None:
            notes.append("sigma_min/sigma_max: ours spans the whole training table")
        if name not in _EULER_LIKE or s["timestep_spacing"] != "linspace":
            notes.append(f"karras sigmas with {name} timestep_spacing={s['timestep_spacing']!r}: ours span the "
                         "whole training table and give the network the exact continuous timestep")
        return "karras"
    spacing = s["timestep_spacing"]
    if spacing not in step_schedules.SPACINGS:
        raise ConfigError(f"scheduler `timestep_spacing` {spacing!r} is none of {', '.join(step_schedules.SPACINGS)}")
    if spacing == "linspace" and name in _EULER_LIKE:
        notes.append("linspace timesteps: diffusers interpolates fractional ones, ours rounds to the nearest "
                     "training timestep (the same when (num_train_timesteps - 1) / (steps - 1) is whole)")
    if spacing != "leading" and name in ("DDIMScheduler", "PNDMScheduler"):
        notes.append(f"{spacing} spacing: {name} steps back by num_train_timesteps // steps, ours to the next "
                     "spaced timestep (the same for trailing when steps divides num_train_timesteps)")
    if spacing != "trailing" and name == "DPMSolverMultistepScheduler":
        notes.append(f"{spacing} spacing: DPMSolverMultistepScheduler spaces steps + 1 points, ours steps")
    return spacing


def sampling_from_scheduler(config: dict) -> dict:
    """Our `sampling:` keys (sampler, schedule, eta) for a diffusers scheduler config; warns once naming what differs.

    Exact for DDIM (set_alpha_to_one, leading spacing), DDPM (fixed_small), Euler and Heun (leading/trailing,
    karras with linspace), Euler ancestral (ddim, eta 1) and DPM-Solver++(2M) and its SDE variant (trailing).
    The number of steps is not part of a scheduler config; diffusers pipelines default to 50.
    """
    name, s = _settings(config)
    notes: list[str] = []
    sampler, eta = _sampler_of(name, s, notes)
    schedule = _schedule_of(name, s, notes)
    if notes:
        warnings.warn(f"{name}: our nearest is sampler={sampler!r} schedule={schedule!r}, which differs: "
                      + "; ".join(notes), stacklevel=2)
    return {"sampler": sampler, "schedule": schedule, "eta": eta}


def _training_fields(formulation_cfg: dict) -> dict:
    """The scheduler fields that fix D(x, sigma): betas, prediction type, zero terminal SNR, steps_offset."""
    if formulation_cfg.get("_target_") != VP_TARGET:
        raise ConfigError(f"model.formulation `_target_` {formulation_cfg.get('_target_')!r}: diffusers' discrete "
                          f"schedulers hold only {VP_TARGET}")
    schedule = formulation_cfg.get("schedule", "scaled_linear")
    if schedule not in _BETAS:
        raise ConfigError(f"model.formulation.schedule {schedule!r} is none of {', '.join(_BETAS)}")
    beta_schedule, beta_start, beta_end = _BETAS[schedule]
    prediction = formulation_cfg.get("prediction", "eps")
    return {
        "num_train_timesteps": int(formulation_cfg.get("num_timesteps", 1000)),
        "beta_schedule": beta_schedule, "beta_start": beta_start, "beta_end": beta_end, "trained_betas": None,
        "prediction_type": {ours: theirs for theirs, ours in _PREDICTIONS.items()}[prediction],
        "rescale_betas_zero_snr": bool(formulation_cfg.get("zero_terminal_snr", False)),
        "steps_offset": int(formulation_cfg.get("steps_offset", 0)),
    }


def _euler_spacing(schedule: str) -> dict:
    """Euler-family fields giving our step sigmas for any number of steps, or {} when they have none."""
    if schedule == "karras":  # diffusers takes the karras ends from the linspace-spaced sigmas: the table's ends
        return {"timestep_spacing": "linspace", "use_karras_sigmas": True}
    # not linspace: diffusers' Euler keeps fractional linspace timesteps, ours are rounded
    return {"timestep_spacing": schedule} if schedule in ("leading", "trailing") else {}


def _export_class(sampler: str, schedule: str, eta: float | None, steps: int, training: dict) -> tuple[str, dict]:
    """The diffusers class and its sampling fields that run our sampler on our step sigmas exactly."""
    T, offset = training["num_train_timesteps"], training["steps_offset"]
    euler = _euler_spacing(schedule)
    if sampler == "ddim" and not eta:
        # DDIMScheduler steps from t to t - T // steps: our next sigma for leading spacing (then sigma 0 below t = 0)
        if schedule == "leading" and offset < T // steps:
            return "DDIMScheduler", {"timestep_spacing": "leading", "clip_sample": False, "set_alpha_to_one": True,
                                     "thresholding": False}
        if euler:  # DDIM with eta 0 is Euler on the same sigmas (samplers.sample_ddim)
            return "EulerDiscreteScheduler", euler
    if sampler == "ddim" and eta == 1.0 and euler and schedule != "karras":
        return "EulerAncestralDiscreteScheduler", euler
    if sampler in ("euler", "heun") and euler:
        return {"euler": "EulerDiscreteScheduler", "heun": "HeunDiscreteScheduler"}[sampler], euler
    if sampler == "ddpm" and schedule in step_schedules.SPACINGS:
        return "DDPMScheduler", {"timestep_spacing": schedule, "variance_type": "fixed_small", "clip_sample": False,
                                 "thresholding": False}
    dpm = {"dpmpp_2m": (None, "dpmsolver++"), "dpmpp_2m_sde": (1.0, "sde-dpmsolver++")}
    if sampler in dpm and schedule == "trailing" and eta in (None, dpm[sampler][0]):
        return "DPMSolverMultistepScheduler", {
            "algorithm_type": dpm[sampler][1], "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True,
            "euler_at_final": False, "final_sigmas_type": "zero", "timestep_spacing": "trailing", "thresholding": False}
    raise ConfigError(f"sampling.sampler={sampler!r} schedule={schedule!r} eta={eta} has no exact diffusers "
                      "scheduler; exact: euler, heun and ddim with eta 0 (leading, trailing, karras), ddim with eta 1 "
                      "(leading, trailing), ddpm (leading, trailing, linspace), dpmpp_2m/dpmpp_2m_sde (trailing)")


def scheduler_to_diffusers(formulation_cfg: dict, sampling_cfg: dict) -> dict:
    """A diffusers scheduler_config.json dict (with `_class_name`) running our sampler and step sigmas exactly,
    for any number of steps; a ConfigError when no diffusers class does (e.g. Euler with linspace spacing).

    DDIM with eta 0 is exported as DDIMScheduler for leading spacing and as the Euler scheduler (the same update)
    otherwise: diffusers' DDIM steps back by T // steps, not to the next spaced timestep.
    """
    training = _training_fields(formulation_cfg)
    schedule = sampling_cfg.get("schedule", "default")
    schedule = "trailing" if schedule == "default" else schedule
    steps = int(sampling_cfg.get("steps", 30))
    name, fields = _export_class(sampling_cfg.get("sampler", "euler"), schedule, sampling_cfg.get("eta"), steps,
                                 training)
    return {"_class_name": name, **training, **fields}


# Schedule buffers of original (CompVis) SD checkpoints, derived from the betas (Ho et al. 2020, Eq. 4, 6-7).
SINGLE_FILE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def single_file_schedule(formulation_cfg: dict) -> dict[str, Tensor]:
    """The SD single-file schedule buffers (float32) of a VP formulation config: betas, alphas_cumprod, posterior q."""
    if formulation_cfg.get("_target_") != VP_TARGET:
        raise ConfigError(f"model.formulation `_target_` {formulation_cfg.get('_target_')!r}: Stable Diffusion "
                          f"single files hold a {VP_TARGET} schedule")
    betas = schedules.make_betas(formulation_cfg.get("schedule", "scaled_linear"),
                                 int(formulation_cfg.get("num_timesteps", 1000)))
    if formulation_cfg.get("zero_terminal_snr", False):
        betas = schedules.rescale_zero_terminal_snr(betas)
    abar = schedules.alphas_cumprod(betas)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    # posterior q(x_{t-1} | x_t, x0) = N(coef1 x0 + coef2 x_t, beta_tilde) (Ho et al. 2020, Eq. 6-7)
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    buffers = {
        "betas": betas, "alphas_cumprod": abar, "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": abar.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - abar).log(), "sqrt_recip_alphas_cumprod": abar.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / abar - 1).sqrt(), "posterior_variance": beta_tilde,
        "posterior_log_variance_clipped": beta_tilde.clamp(min=1e-20).log(),  # beta_tilde_0 = 0: log finite
        "posterior_mean_coef1": betas * abar_prev.sqrt() / (1 - abar),
        "posterior_mean_coef2": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
    }
    return {name: t.float() for name, t in buffers.items()}


def _same_buffer(stored: Tensor, ours: Tensor) -> bool:
    # the file rounds float64 values to its dtype (fp16 and bf16 files exist): a few of its ulps
    if stored.shape != ours.shape:
        return False
    info = torch.finfo(stored.dtype) if stored.dtype.is_floating_point else torch.finfo(torch.float32)
    return torch.allclose(stored.double(), ours.double(), rtol=max(4 * info.eps, 1e-6), atol=info.tiny)


def check_single_file_schedule(state: dict[str, Tensor], formulation_cfg: dict) -> list[str]:
    """The schedule buffer names in an SD single-file state dict, after checking they equal our formulation's
    schedule (ConfigError listing those that differ); the importer counts them as consumed."""
    ours = single_file_schedule(formulation_cfg)
    present = [name for name in SINGLE_FILE_BUFFERS if name in state]
    differ = [f"{name} {tuple(state[name].shape)}" for name in present if not _same_buffer(state[name], ours[name])]
    if differ:
        raise ConfigError(f"the checkpoint's schedule buffers differ from model.formulation (schedule="
                          f"{formulation_cfg.get('schedule')!r}, num_timesteps={formulation_cfg.get('num_timesteps')}, "
                          f"zero_terminal_snr={formulation_cfg.get('zero_terminal_snr', False)}): {', '.join(differ)}")
    return present
