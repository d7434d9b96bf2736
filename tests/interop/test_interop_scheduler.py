"""diffusers schedulers <-> our formulation and sampling configs, SD single-file schedule buffers, and whole
classifier-free-guided sampling runs of a tiny random diffusers UNet: ours equal diffusers' DDIM and Euler loops."""

import inspect
import math
import sys
import warnings

import diffusers
import pytest
import torch
from torch import nn

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.formulations import VPFormulation
from ldm.diffusion.noise import SampleNoise
from ldm.diffusion.samplers import resolve_sampler
from ldm.interop.scheduler import (
    _CLASS_DEFAULTS,
    SINGLE_FILE_BUFFERS,
    _settings,
    check_single_file_schedule,
    formulation_from_scheduler,
    sampling_from_scheduler,
    scheduler_to_diffusers,
    single_file_schedule,
)
from ldm.models.generate import generate_latents
from ldm.utils.errors import ConfigError

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
# As on the hub: SD 1.x (PNDM) and SD 2.x 768-v (DDIM); old configs leave out fields (prediction_type, spacing)
SD1 = {"_class_name": "PNDMScheduler", **SD_BETAS, "set_alpha_to_one": False, "skip_prk_steps": True,
       "steps_offset": 1, "trained_betas": None, "clip_sample": False}
SD2_V = {"_class_name": "DDIMScheduler", **SD_BETAS, "clip_sample": False, "prediction_type": "v_prediction",
         "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}


def _formulation(cfg: dict) -> VPFormulation:
    return VPFormulation(**{k: v for k, v in cfg.items() if k != "_target_"})


def _diffusers_scheduler(config: dict):
    return getattr(diffusers, config["_class_name"]).from_config(config)


def _no_warning(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args)


# ---------------------------------------------------------------- scheduler config -> our formulation


@pytest.mark.parametrize("config,expected", [
    (SD1, dict(schedule="scaled_linear", prediction="eps", zero_terminal_snr=False, steps_offset=1)),
    (SD2_V, dict(schedule="scaled_linear", prediction="v", zero_terminal_snr=False, steps_offset=1)),
    ({"_class_name": "DDPMScheduler", "clip_sample": False},
     dict(schedule="linear", prediction="eps", zero_terminal_snr=False, steps_offset=0)),
    ({"_class_name": "EulerDiscreteScheduler", "beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"},
     dict(schedule="cosine", prediction="x0", zero_terminal_snr=False, steps_offset=0)),
    ({"_class_name": "DDIMScheduler", **SD_BETAS, "clip_sample": False, "prediction_type": "v_prediction",
      "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
     dict(schedule="scaled_linear", prediction="v", zero_terminal_snr=True, steps_offset=0)),
], ids=["sd1-pndm", "sd2-ddim-v", "ddpm-defaults", "euler-cosine-x0", "ddim-zero-snr"])
def test_scheduler_config_becomes_our_formulation(config, expected):
    cfg = formulation_from_scheduler(config)
    assert cfg == {"_target_": "ldm.diffusion.formulations.VPFormulation", "num_timesteps": 1000, **expected}
    ours = 1 / (1 + _formulation(cfg).sigmas_table.double() ** 2)  # alphas_cumprod
    theirs = _diffusers_scheduler(config).alphas_cumprod.double()
    # the same training schedule (the zero-SNR end is 0 there, tiny here); diffusers computes in float32
    torch.testing.assert_close(ours[:-1], theirs[:-1], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("override,key", [
    (dict(beta_schedule="sigmoid"), "beta_schedule"),
    (dict(beta_start=0.001), "beta_schedule"),
    (dict(trained_betas=torch.linspace(1e-4, 0.03, 1000).tolist()), "trained_betas"),
    (dict(thresholding=True), "thresholding"),
    (dict(clip_sample=True), "clip_sample"),
    (dict(prediction_type="flow_prediction"), "prediction_type"),
    (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    (dict(timestep_type="continuous", prediction_type="v_prediction"), "timestep_type"),
    (dict(variance_type="learned_range"), "variance_type"),
    (dict(_class_name="FlowMatchEulerDiscreteScheduler"), "_class_name"),
])
def test_what_our_formulation_cannot_express_is_an_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"`{key}`"):
        formulation_from_scheduler({"_class_name": "DDIMScheduler", **SD_BETAS, "clip_sample": False, **override})


def test_our_table_of_class_defaults_is_diffusers():
    for name in _CLASS_DEFAULTS:
        signature = inspect.signature(getattr(diffusers, name).__init__).parameters
        _, ours = _settings({"_class_name": name})
        differ = {k: (v, signature[k].default) for k, v in ours.items() if k in signature and signature[k].default != v}
        assert not differ, f"{name}: ours vs diffusers {differ}"


def test_missing_fields_take_the_class_default():
    # DDIM clips x0 by default, which D(x, sigma) cannot do; Heun's default betas are SD's
    with pytest.raises(ConfigError, match="`clip_sample`"):
        formulation_from_scheduler({"_class_name": "DDIMScheduler", **SD_BETAS})
    assert formulation_from_scheduler({"_class_name": "HeunDiscreteScheduler", "beta_schedule": "scaled_linear"})[
        "schedule"] == "scaled_linear"


def test_trained_betas_equal_to_one_of_our_schedules_are_that_schedule():
    betas = diffusers.DDPMScheduler(**SD_BETAS).betas.tolist()  # float32, as a saved config holds them
    config = {"_class_name": "EulerDiscreteScheduler", "trained_betas": betas, "beta_schedule": "linear"}
    assert formulation_from_scheduler(config)["schedule"] == "scaled_linear"


def test_steps_offset_shifts_leading_steps_only():
    vp = VPFormulation(steps_offset=1)
    sched = diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1)
    sched.set_timesteps(13)
    torch.testing.assert_close(vp.step_sigmas(13, "leading").float(), sched.sigmas, rtol=2e-5, atol=0)
    torch.testing.assert_close(vp.step_sigmas(13), VPFormulation().step_sigmas(13), rtol=0, atol=0)  # trailing
    with pytest.raises(ValueError, match="steps_offset"):
        VPFormulation(steps_offset=-1)


# ---------------------------------------------------------------- scheduler config -> our sampling settings


def _sched(name: str, **fields) -> dict:
    return {"_class_name": name, **SD_BETAS, **fields}


@pytest.mark.parametrize("config,expected", [
    (_sched("DDIMScheduler", clip_sample=False, steps_offset=1), ("ddim", "leading", 0.0)),
    (_sched("EulerDiscreteScheduler", timestep_spacing="trailing"), ("euler", "trailing", None)),
    (_sched("EulerDiscreteScheduler", use_karras_sigmas=True), ("euler", "karras", None)),
    (_sched("EulerAncestralDiscreteScheduler", timestep_spacing="leading", steps_offset=1), ("ddim", "leading", 1.0)),
    (_sched("HeunDiscreteScheduler", timestep_spacing="trailing"), ("heun", "trailing", None)),
    (_sched("DDPMScheduler", clip_sample=False, timestep_spacing="trailing"), ("ddpm", "trailing", None)),
    (_sched("DPMSolverMultistepScheduler", timestep_spacing="trailing"), ("dpmpp_2m", "trailing", None)),
    (_sched("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", timestep_spacing="trailing"),
     ("dpmpp_2m_sde", "trailing", 1.0)),
])
def test_schedulers_we_have_become_our_sampler_without_warning(config, expected):
    assert _no_warning(sampling_from_scheduler, config) == dict(zip(("sampler", "schedule", "eta"), expected))


@pytest.mark.parametrize("config,expected,match", [
    (SD1, ("dpmpp_2m", "leading"), "no PNDMScheduler"),
    (SD2_V, ("ddim", "leading"), "set_alpha_to_one=false"),
    (_sched("EulerDiscreteScheduler"), ("euler", "linspace"), "fractional"),
    (_sched("DDIMScheduler", clip_sample=False, timestep_spacing="linspace"), ("ddim", "linspace"), "steps back"),
    (_sched("DPMSolverMultistepScheduler"), ("dpmpp_2m", "linspace"), r"steps \+ 1"),
    (_sched("DPMSolverMultistepScheduler", solver_order=3, timestep_spacing="trailing"), ("dpmpp_2m", "trailing"),
     "solver_order=3"),
    (_sched("EulerDiscreteScheduler", use_exponential_sigmas=True), ("euler", "karras"), "use_exponential_sigmas"),
    (_sched("LMSDiscreteScheduler", use_karras_sigmas=True), ("dpmpp_2m", "karras"), "no LMSDiscreteScheduler"),
])
def test_schedulers_we_lack_become_the_nearest_with_a_warning(config, expected, match):
    with pytest.warns(UserWarning, match=match):
        out = sampling_from_scheduler(config)
    assert (out["sampler"], out["schedule"]) == expected


def test_unknown_scheduler_class_is_an_error():
    with pytest.raises(ConfigError, match="LCMScheduler"):
        sampling_from_scheduler(_sched("LCMScheduler"))


# ---------------------------------------------------------------- ours -> scheduler_config.json, exactly

T = 1000
SHAPE = (2, 4, 8, 8)
EPS_SD1 = dict(_target_="ldm.diffusion.formulations.VPFormulation", schedule="scaled_linear", num_timesteps=T,
               prediction="eps", zero_terminal_snr=False, steps_offset=1)
V_SD2 = {**EPS_SD1, "prediction": "v", "steps_offset": 0}
V_ZSNR = {**V_SD2, "zero_terminal_snr": True}

EXPORTS = [  # (formulation, sampling, the diffusers class that runs it exactly)
    (EPS_SD1, dict(sampler="ddim", schedule="leading", steps=10), "DDIMScheduler"),
    (V_SD2, dict(sampler="ddim", schedule="leading", steps=12), "DDIMScheduler"),
    (V_SD2, dict(sampler="ddim", schedule="trailing", steps=12), "EulerDiscreteScheduler"),  # DDIM would step by 83
    (EPS_SD1, dict(sampler="euler", schedule="default", steps=12), "EulerDiscreteScheduler"),
    (V_SD2, dict(sampler="euler", schedule="karras", steps=10), "EulerDiscreteScheduler"),
    (EPS_SD1, dict(sampler="heun", schedule="leading", steps=6), "HeunDiscreteScheduler"),
    (V_SD2, dict(sampler="heun", schedule="karras", steps=6), "HeunDiscreteScheduler"),
    (EPS_SD1, dict(sampler="ddim", schedule="trailing", steps=12, eta=1.0), "EulerAncestralDiscreteScheduler"),
    (V_SD2, dict(sampler="ddpm", schedule="linspace", steps=10), "DDPMScheduler"),
    (EPS_SD1, dict(sampler="dpmpp_2m", schedule="trailing", steps=12), "DPMSolverMultistepScheduler"),
    (V_ZSNR, dict(sampler="dpmpp_2m_sde", schedule="trailing", steps=12), "DPMSolverMultistepScheduler"),
]
SIGMA_SPACE = {"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler"}


class FieldBackbone(nn.Module):
    """A fixed smooth 'network' F(x_in, t) in our backbone signature; diffusers calls the same function."""

    def forward(self, x_in, c_noise, context=None, y=None):
        t = torch.as_tensor(c_noise, dtype=torch.float32).reshape(-1, *([1] * (x_in.ndim - 1)))
        return torch.tanh(x_in) * (0.4 + 0.6 * torch.cos(t / T * math.pi / 2)) + 0.1 * torch.sin(3 * x_in)


class ListNoise:
    """Our samplers' noise (the randn_like protocol) from a fixed list, to feed diffusers the same draws."""

    def __init__(self, noises):
        self.noises, self.used = list(noises), 0

    def randn_like(self, x):
        self.used += 1
        return self.noises[self.used - 1].to(x)


def _diffusers_start(sched, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Our start x = x0 + sigma n in the scheduler's own sample space: k-style ones keep it, VP ones hold
    x / sqrt(1 + sigma^2). (Their pipelines start from n * init_noise_sigma: n * sqrt(1 + sigma^2) in our
    space for VP schedulers and "leading" Euler, n * sigma for other Euler ones; ours is n * sigma.)"""
    return x if type(sched).__name__ in SIGMA_SPACE else x / math.sqrt(1 + sigma**2)


@pytest.mark.parametrize("formulation_cfg,sampling_cfg,cls", EXPORTS,
                         ids=[f"{s['sampler']}-{s['schedule']}-{s['steps']}-{c}" for _, s, c in EXPORTS])
def test_exported_scheduler_samples_as_ours(formulation_cfg, sampling_cfg, cls, monkeypatch):
    config = scheduler_to_diffusers(formulation_cfg, sampling_cfg)
    assert config["_class_name"] == cls
    # the exported file imports back to the same formulation, and to the same sampler without a warning
    assert formulation_from_scheduler(config) == formulation_cfg
    back = _no_warning(sampling_from_scheduler, config)
    if cls == "EulerDiscreteScheduler" and sampling_cfg["sampler"] == "ddim":
        assert back["sampler"] == "euler"  # the same update (samplers.sample_ddim with eta 0)
    else:
        assert back["sampler"] == sampling_cfg["sampler"]
        default_eta = {"ddim": 0.0, "dpmpp_2m_sde": 1.0}.get(back["sampler"])
        assert back["eta"] == (default_eta if sampling_cfg.get("eta") is None else sampling_cfg["eta"])

    formulation = _formulation(formulation_cfg)
    n = sampling_cfg["steps"]
    sigmas = formulation.step_sigmas(n, sampling_cfg["schedule"])
    noises = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(10 + i)) for i in range(2 * n)]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)) * sigmas[0]
    eta = {} if sampling_cfg.get("eta") is None else {"eta": sampling_cfg["eta"]}
    ours = resolve_sampler(sampling_cfg["sampler"])(
        Denoiser(FieldBackbone(), formulation), x, sigmas, generator=ListNoise(noises), **eta)

    sched = _diffusers_scheduler(config)
    draws = iter(noises)
    monkeypatch.setattr(sys.modules[type(sched).__module__], "randn_tensor", lambda *a, **k: next(draws), raising=False)
    sched.set_timesteps(n)
    latents = _diffusers_start(sched, x, sigmas[0].item())
    for t in sched.timesteps:
        latents = sched.step(FieldBackbone()(sched.scale_model_input(latents, t), t.expand(SHAPE[0])), t,
                             latents).prev_sample
    diff = (ours - latents).abs().max().item()
    print(f"{cls} from {sampling_cfg}: max |ours - diffusers| {diff:.2e} (max |x| {latents.abs().max():.2f})")
    assert diff <= 1e-4 * max(1.0, latents.abs().max().item())


@pytest.mark.parametrize("formulation_cfg,sampling_cfg,match", [
    (dict(_target_="ldm.diffusion.formulations.EDMFormulation"), dict(sampler="euler"), "EDMFormulation"),
    (EPS_SD1, dict(sampler="dpmpp_2m", schedule="leading", steps=20), "no exact"),
    (EPS_SD1, dict(sampler="ddim", schedule="trailing", steps=20, eta=0.5), "no exact"),
    (EPS_SD1, dict(sampler="euler", schedule="linspace", steps=10), "no exact"),  # fractional in diffusers
    (EPS_SD1, dict(sampler="ddim", schedule="linspace", steps=10), "no exact"),
    (EPS_SD1, dict(sampler="euler", schedule="flow", steps=30), "no exact"),
    (EPS_SD1, dict(sampler="flow_euler", schedule="trailing", steps=30), "no exact"),
    ({**EPS_SD1, "schedule": "sigmoid"}, dict(sampler="euler"), "schedule"),
])
def test_export_without_an_exact_scheduler_is_an_error(formulation_cfg, sampling_cfg, match):
    with pytest.raises(ConfigError, match=match):
        scheduler_to_diffusers(formulation_cfg, sampling_cfg)


# ---------------------------------------------------------------- SD single-file schedule buffers


def _original_sd_buffers(linear_start=0.00085, linear_end=0.012, T=1000) -> dict:
    """The buffers an original SD checkpoint carries, from the LDM config recipe (betas linear in sqrt(beta)),
    computed here in float64 from the DDPM formulas and stored in float32."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, T, dtype=torch.float64) ** 2
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    var = betas * (1 - prev) / (1 - abar)
    out = dict(betas=betas, alphas_cumprod=abar, alphas_cumprod_prev=prev, sqrt_alphas_cumprod=abar**0.5,
               sqrt_one_minus_alphas_cumprod=(1 - abar) ** 0.5, log_one_minus_alphas_cumprod=torch.log(1 - abar),
               sqrt_recip_alphas_cumprod=(1 / abar) ** 0.5, sqrt_recipm1_alphas_cumprod=(1 / abar - 1) ** 0.5,
               posterior_variance=var, posterior_log_variance_clipped=torch.log(torch.clamp(var, min=1e-20)),
               posterior_mean_coef1=betas * prev**0.5 / (1 - abar),
               posterior_mean_coef2=(1 - prev) * alphas**0.5 / (1 - abar))
    return {k: v.float() for k, v in out.items()}


def test_single_file_schedule_buffers_are_checked_and_consumed():
    state = {**_original_sd_buffers(), "model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3),
             "model_ema.decay": torch.tensor(0.9999)}
    consumed = check_single_file_schedule(state, EPS_SD1)
    assert consumed == list(SINGLE_FILE_BUFFERS)  # everything but the weights and the EMA's own counters
    # fp16 files round the buffers; a file without them has nothing to check
    assert check_single_file_schedule({k: state[k].half() for k in consumed}, EPS_SD1) == consumed
    assert check_single_file_schedule({"model_ema.decay": state["model_ema.decay"]}, EPS_SD1) == []
    # our own buffers (written on export) pass the check, and equal the original recipe's
    ours = single_file_schedule(EPS_SD1)
    assert check_single_file_schedule(ours, V_SD2) == consumed
    for name in consumed:
        torch.testing.assert_close(ours[name], state[name], rtol=1e-6, atol=0)


def test_a_different_single_file_schedule_is_an_error_listing_the_buffers():
    other = _original_sd_buffers(1e-4, 0.02)  # sqrt-linear betas with DDPM's ends: none of our schedules
    with pytest.raises(ConfigError, match=r"betas \(1000,\), alphas_cumprod \(1000,\)"):
        check_single_file_schedule(other, EPS_SD1)
    linear = {**EPS_SD1, "schedule": "linear"}
    assert check_single_file_schedule(single_file_schedule(linear), linear) == list(SINGLE_FILE_BUFFERS)
    with pytest.raises(ConfigError, match="posterior_mean_coef2"):
        check_single_file_schedule(single_file_schedule(linear), EPS_SD1)
    with pytest.raises(ConfigError, match=r"betas \(500,\)"):
        check_single_file_schedule(_original_sd_buffers(T=500), EPS_SD1)
    with pytest.raises(ConfigError, match="EDMFormulation"):
        check_single_file_schedule(other, {"_target_": "ldm.diffusion.formulations.EDMFormulation"})


# ---------------------------------------------------------------- whole CFG sampling runs with a tiny UNet


class DiffusersUNetBackbone(nn.Module):
    """Test-only adapter: diffusers' UNet2DConditionModel in our backbone signature net(x_in, c_noise, context, y);
    our VP formulation passes c_noise = the (continuous) training timestep of sigma."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x_in, c_noise, context=None, y=None):
        return self.unet(x_in, c_noise, encoder_hidden_states=context).sample


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
    ).eval()


PIPELINE_RUNS = [  # a pipeline folder's scheduler config, and the steps to sample
    (_sched("DDIMScheduler", clip_sample=False, set_alpha_to_one=True, steps_offset=1), 10),  # SD 1.x-style, eps
    (_sched("DDIMScheduler", clip_sample=False, set_alpha_to_one=True, prediction_type="v_prediction",
            steps_offset=1), 20),  # SD 2.x-style, v
    (_sched("EulerDiscreteScheduler", timestep_spacing="leading", steps_offset=1), 12),
    (_sched("EulerDiscreteScheduler", prediction_type="v_prediction", timestep_spacing="trailing"), 15),
    (_sched("EulerDiscreteScheduler", use_karras_sigmas=True), 10),
]


@pytest.mark.parametrize("config,steps", PIPELINE_RUNS, ids=["ddim-eps-leading-offset1", "ddim-v-leading-offset1",
                                                             "euler-eps-leading-offset1", "euler-v-trailing",
                                                             "euler-karras"])
def test_cfg_sampling_equals_diffusers_loop(tiny_unet, one_thread, config, steps):
    # import the scheduler config as our formulation and sampling settings, then sample with both
    formulation = _formulation(formulation_from_scheduler(config))
    sampling = _no_warning(sampling_from_scheduler, config)
    seeds, scale = [3, 7], 7.5
    g = torch.Generator().manual_seed(1)
    context, null = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    eta = {} if sampling["eta"] is None else {"eta": sampling["eta"]}
    ours = generate_latents(
        Denoiser(DiffusersUNetBackbone(tiny_unet), formulation), formulation, {"context": context},
        {"context": null}, seeds, (4, 8, 8), sampler=sampling["sampler"], steps=steps, schedule=sampling["schedule"],
        guidance_scale=scale, **eta)

    sched = _diffusers_scheduler(config)
    sched.set_timesteps(steps)
    noise = SampleNoise(seeds).randn((4, 8, 8))  # the noise generate_latents draws
    sigma_0 = formulation.step_sigmas(steps, sampling["schedule"])[0].item()
    if isinstance(sched, diffusers.EulerDiscreteScheduler) and config.get("timestep_spacing") != "leading":
        latents = noise * sched.init_noise_sigma  # the pipeline's own start is ours here
    else:
        latents = _diffusers_start(sched, noise * sigma_0, sigma_0)
    with torch.no_grad():
        for t in sched.timesteps:
            x_in = sched.scale_model_input(torch.cat([latents, latents]), t)
            cond, uncond = tiny_unet(x_in, t, encoder_hidden_states=torch.cat([context, null])).sample.chunk(2)
            latents = sched.step(uncond + scale * (cond - uncond), t, latents).prev_sample
    diff = (ours - latents).abs().max().item()
    print(f"{config['_class_name']} {sampling}: max |ours - diffusers| {diff:.2e} (max |x| {latents.abs().max():.2f})")
    assert diff <= 1e-4 * max(1.0, latents.abs().max().item())
