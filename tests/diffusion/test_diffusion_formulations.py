"""Diffusion formulations: schedules against diffusers, preconditioning identities, loss weightings, noise levels, training."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.formulations import EDMFormulation, FlowFormulation, VPFormulation
from ldm.diffusion.loss import denoising_loss, sigma_buckets, training_noise
from ldm.diffusion.noise_levels import edm_lognormal_sigma, logit_normal_t, uniform_t, vp_discrete_sigma
from ldm.diffusion.schedules import (
    alphas_cumprod,
    alphas_cumprod_from_sigma,
    make_betas,
    rescale_zero_terminal_snr,
    sigma_from_alphas_cumprod,
    sigma_to_t,
    t_to_sigma,
)
from ldm.diffusion.step_schedules import discrete_sigmas, flow_sigmas, karras_sigmas

DIFFUSERS_SCHEDULES = {  # ours -> DDPMScheduler kwargs
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}


class Oracle(nn.Module):
    """Backbone that returns a fixed tensor and records what it was called with."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x_in, c_noise, **cond):
        self.x_in, self.c_noise, self.cond = x_in, c_noise, cond
        return self.out.to(x_in.dtype)


def expand(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.reshape(-1, *([1] * (like.ndim - 1)))  # [B] -> [B, 1, ..., 1]


def x0_space_loss(formulation, x0, n, sigma, F) -> torch.Tensor:
    """lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2 per sample, for a backbone whose output is F."""
    D = Denoiser(Oracle(F), formulation)
    x0_hat = D(x0 + expand(sigma, x0) * n, sigma)
    return formulation.loss_weight(sigma) * ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))


def random_problem(batch_size=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0, n, F = (torch.randn(batch_size, 3, 4, 4, generator=g, dtype=dtype) for _ in range(3))
    return x0, n, F


# --- schedules ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_alphas_cumprod_match_diffusers(schedule, zero_snr):
    reference = DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=zero_snr, **DIFFUSERS_SCHEDULES[schedule])
    betas = make_betas(schedule, 1000)
    if zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    ours = alphas_cumprod(betas)
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    torch.testing.assert_close(ours.float(), reference.alphas_cumprod, rtol=1e-4, atol=1e-9)
    if zero_snr:
        assert ours[-1] == 0


def test_sigma_conversions_and_timestep_interpolation():
    sigmas = sigma_from_alphas_cumprod(alphas_cumprod(make_betas("scaled_linear", 1000)))
    torch.testing.assert_close(alphas_cumprod_from_sigma(sigmas), alphas_cumprod(make_betas("scaled_linear", 1000)))
    assert (sigmas.diff() > 0).all()
    # table entries map to integer timesteps, in-between values to log-linear fractions, and back
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(sigma_to_t(sigmas, sigmas), t)
    t_frac = torch.tensor([0.0, 0.25, 10.5, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(sigma_to_t(t_to_sigma(t_frac, sigmas), sigmas), t_frac)
    torch.testing.assert_close(t_to_sigma(torch.tensor([10.5]), sigmas), (sigmas[10] * sigmas[11]).sqrt()[None])
    # out-of-table noise levels clamp to the ends; out-of-range timesteps are an error
    torch.testing.assert_close(sigma_to_t(torch.tensor([0.0, 1e6], dtype=torch.float64), sigmas), t[[0, -1]])
    with pytest.raises(ValueError, match="timesteps"):
        t_to_sigma(torch.tensor([1000.0]), sigmas)
    with pytest.raises(ValueError, match="unknown VP schedule"):
        make_betas("squaredcos", 1000)


def test_vp_matches_diffusers_forward_process():
    """c_in x is DDPM's x_t, c_noise is its timestep, and each target (eps, v, x0) gives back x0 exactly."""
    scheduler = DDPMScheduler(prediction_type="v_prediction", **DIFFUSERS_SCHEDULES["scaled_linear"])
    timesteps = torch.tensor([0, 1, 250, 500, 998, 999])
    x0, n, _ = random_problem(dtype=torch.float32)
    targets = {"eps": n, "v": scheduler.get_velocity(x0, n, timesteps), "x0": x0}
    for prediction, target in targets.items():
        formulation = VPFormulation(prediction=prediction)
        sigma = formulation.sigmas_table[timesteps]
        backbone = Oracle(target)
        x0_hat = Denoiser(backbone, formulation)(x0 + expand(sigma, x0) * n, sigma)
        torch.testing.assert_close(backbone.x_in, scheduler.add_noise(x0, n, timesteps), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(backbone.c_noise, timesteps.float(), rtol=0, atol=1e-4)
        torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)


def test_vp_sigmas_table_and_zero_terminal_snr():
    vp = VPFormulation(schedule="scaled_linear")
    assert vp.sigmas_table.shape == (1000,) and (vp.sigmas_table.diff() > 0).all()
    assert vp.sigma_min == vp.sigmas_table[0].item() and vp.sigma_max == vp.sigmas_table[-1].item()
    assert vp.sigma_max == pytest.approx(14.6146, rel=1e-4)  # Stable Diffusion's sigma_max

    with pytest.raises(ValueError, match="zero_terminal_snr"):
        VPFormulation(prediction="eps", zero_terminal_snr=True)
    for schedule in ["linear", "scaled_linear", "cosine"]:
        ztsnr = VPFormulation(schedule=schedule, prediction="v", zero_terminal_snr=True)
        assert math.isfinite(ztsnr.sigma_max) and ztsnr.sigma_max > 1000
        assert (ztsnr.sigmas_table.diff() > 0).all()
        # at the last step the network input is pure noise to float32 precision, and D is finite
        x0, n, F = random_problem(dtype=torch.float32)
        sigma = torch.full((6,), ztsnr.sigma_max)
        backbone = Oracle(F)
        x0_hat = Denoiser(backbone, ztsnr)(x0 + ztsnr.sigma_max * n, sigma)
        assert x0_hat.isfinite().all()
        torch.testing.assert_close(backbone.x_in, n, rtol=0, atol=1e-3)
        torch.testing.assert_close(backbone.c_noise, torch.full((6,), 999.0))
        torch.testing.assert_close(x0_hat, -F, rtol=0, atol=5e-3)  # x0 = -v at SNR 0


# --- preconditioning identities ----------------------------------------------------------------------------------


def test_edm_preconditioning_table1():
    edm = EDMFormulation(sigma_data=0.5)
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.precondition(sigma)
    torch.testing.assert_close(c_skip, torch.tensor([0.5, 0.25 / 4.25], dtype=torch.float64))
    torch.testing.assert_close(c_out, torch.tensor([0.25 / 0.5**0.5, 1.0 / 4.25**0.5], dtype=torch.float64))
    torch.testing.assert_close(c_in, torch.tensor([1 / 0.5**0.5, 1 / 4.25**0.5], dtype=torch.float64))
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # the effective target F = (x0 - c_skip x) / c_out (Eq. 8) makes D exact
    x0, n, _ = random_problem()
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 10.0, 80.0], dtype=torch.float64)
    c_skip, c_out, _, _ = edm.precondition(sigma)
    x = x0 + expand(sigma, x0) * n
    F_target = (x0 - expand(c_skip, x0) * x) / expand(c_out, x0)
    torch.testing.assert_close(Denoiser(Oracle(F_target), edm)(x, sigma), x0)


def test_flow_preconditioning_velocity_identity():
    flow = FlowFormulation()
    x0, n, _ = random_problem()
    t = torch.tensor([1e-4, 0.1, 0.3, 0.5, 0.9, 0.9999], dtype=torch.float64)
    sigma = t / (1 - t)
    backbone = Oracle(n - x0)  # rectified-flow velocity
    x0_hat = Denoiser(backbone, flow)(x0 + expand(sigma, x0) * n, sigma)
    torch.testing.assert_close(backbone.x_in, expand(1 - t, x0) * x0 + expand(t, x0) * n)
    torch.testing.assert_close(backbone.c_noise, 1000 * t)
    torch.testing.assert_close(x0_hat, x0)


@pytest.mark.parametrize(
    "formulation, data_std",
    [(VPFormulation(prediction="eps"), 1.0), (VPFormulation(prediction="v"), 1.0), (EDMFormulation(sigma_data=0.5), 0.5)],
    ids=["vp-eps", "vp-v", "edm"],
)
def test_c_in_gives_unit_variance_inputs(formulation, data_std):
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.03, 0.5, 1.0, 5.0, 14.0], dtype=torch.float64)
    x0 = data_std * torch.randn(5, 200_000, generator=g, dtype=torch.float64)
    n = torch.randn(5, 200_000, generator=g, dtype=torch.float64)
    _, _, c_in, _ = formulation.precondition(sigma)
    variance = (expand(c_in, x0) * (x0 + expand(sigma, x0) * n)).var(dim=1)
    torch.testing.assert_close(variance, torch.ones(5, dtype=torch.float64), rtol=0.02, atol=0)


# --- loss weightings equal each paper's objective -----------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_vp_x0_space_loss_equals_prediction_space_loss(prediction, weighting):
    vp = VPFormulation(prediction=prediction, weighting=weighting, min_snr_gamma=5.0)
    x0, n, F = random_problem()
    sigma = vp.sigmas_table[[0, 10, 100, 400, 700, 999]].double()
    abar = 1 / (1 + sigma**2)
    a, b = expand(abar.sqrt(), x0), expand((1 - abar).sqrt(), x0)
    target = {"eps": n, "v": a * n - b * x0, "x0": x0}[prediction]  # Ho et al. 2020; Salimans & Ho 2022
    own_mse = ((F - target) ** 2).mean(dim=(1, 2, 3))
    snr = abar / (1 - abar)
    if weighting == "min_snr":  # Hang et al. 2023: min(SNR, gamma) / {SNR, SNR + 1, 1}
        own_mse = own_mse * snr.clamp(max=5.0) / {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[prediction]
    torch.testing.assert_close(x0_space_loss(vp, x0, n, sigma, F), own_mse)


def test_edm_and_flow_x0_space_loss_equals_paper_loss():
    x0, n, F = random_problem()
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 10.0, 80.0], dtype=torch.float64)
    # EDM: lambda ||D - x0||^2 = ||F - F_target||^2 (Karras et al. 2022, Eq. 8, lambda c_out^2 = 1)
    sd = 0.5
    x = x0 + expand(sigma, x0) * n
    F_target = ((sigma**2 + sd**2).sqrt() / (sigma * sd))[:, None, None, None] * (
        x0 - expand(sd**2 / (sigma**2 + sd**2), x0) * x
    )
    torch.testing.assert_close(
        x0_space_loss(EDMFormulation(sigma_data=sd), x0, n, sigma, F), ((F - F_target) ** 2).mean(dim=(1, 2, 3))
    )
    # flow: velocity MSE ||v_hat - (n - x0)||^2
    torch.testing.assert_close(
        x0_space_loss(FlowFormulation(), x0, n, sigma, F), ((F - (n - x0)) ** 2).mean(dim=(1, 2, 3))
    )


def test_denoising_loss_is_weighted_x0_mse_and_reproducible():
    formulation = VPFormulation(prediction="v", offset_noise=0.1)
    x0 = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    F = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    denoiser = Denoiser(Oracle(F), formulation)
    cond = {"context": torch.zeros(5, 2, 8), "y": None}
    loss, sigma = denoising_loss(denoiser, x0, cond, formulation, generator=torch.Generator().manual_seed(3))
    assert loss.shape == (5,) and sigma.shape == (5,)
    assert denoiser.net.cond["context"] is cond["context"] and denoiser.net.cond["y"] is None
    # the same draws, in the loss's order: sigma, then the noise
    g = torch.Generator().manual_seed(3)
    sigma_ref = formulation.sample_sigma(5, generator=g)
    n = training_noise(x0, 0.1, generator=g)
    expected = x0_space_loss(formulation, x0, n, sigma_ref, F)
    torch.testing.assert_close(sigma, sigma_ref)
    torch.testing.assert_close(loss, expected)
    again, _ = denoising_loss(denoiser, x0, cond, formulation, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again, loss, rtol=0, atol=0)


def test_offset_noise_adds_per_channel_constant():
    x0 = torch.zeros(4096, 3, 8, 8)
    plain = training_noise(x0, 0.0, generator=torch.Generator().manual_seed(0))
    offset = training_noise(x0, 0.5, generator=torch.Generator().manual_seed(0))
    assert plain.dtype == torch.float32 and plain.shape == x0.shape
    # std of per-channel means: 1/8 from 64 independent pixels, plus the offset's 0.5 when it is on
    assert plain.mean(dim=(2, 3)).std().item() == pytest.approx(1 / 8, rel=0.05)
    assert offset.mean(dim=(2, 3)).std().item() == pytest.approx((0.25 + 1 / 64) ** 0.5, rel=0.05)
    with pytest.raises(ValueError, match="offset noise"):
        training_noise(torch.zeros(4, 2), 0.1, generator=None)


# --- noise-level distributions -----------------------------------------------------------------------------------


def test_noise_level_statistics():
    N = 200_000
    g = torch.Generator().manual_seed(0)
    log_sigma = edm_lognormal_sigma(N, -1.2, 1.2, generator=g).log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.02)
    assert log_sigma.std().item() == pytest.approx(1.2, rel=0.01)

    t = logit_normal_t(N, 0.5, 0.8, generator=g)
    logit = (t / (1 - t)).log()
    assert 0 < t.min() and t.max() < 1
    assert logit.mean().item() == pytest.approx(0.5, abs=0.01)
    assert logit.std().item() == pytest.approx(0.8, rel=0.01)

    t = uniform_t(N, generator=g)
    assert t.mean().item() == pytest.approx(0.5, abs=0.005) and t.var().item() == pytest.approx(1 / 12, rel=0.02)

    table = VPFormulation().sigmas_table
    sigma = vp_discrete_sigma(N, table, generator=g)
    index = torch.searchsorted(table, sigma)
    assert (table[index] == sigma).all()
    assert index.float().mean().item() == pytest.approx(499.5, rel=0.01)
    assert index.min() == 0 and index.max() == 999

    draws = [edm_lognormal_sigma(4, 0.0, 1.0, generator=torch.Generator().manual_seed(7), device="cpu") for _ in range(2)]
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)


def test_flow_sigma_sampling_clamps_and_shifts():
    flow = FlowFormulation(time_sampling="uniform", t_min=0.01, t_max=0.99)
    sigma = flow.sample_sigma(10_000, generator=torch.Generator().manual_seed(0), device="cpu")
    assert sigma.min().item() == pytest.approx(flow.sigma_min, rel=1e-5)
    assert sigma.max().item() == pytest.approx(flow.sigma_max, rel=1e-4)
    # logit-normal m = 0 has median t = 1/2, i.e. sigma = 1; a shift multiplies sigma
    shifted = FlowFormulation(shift=3.0).sample_sigma(20_001, generator=torch.Generator().manual_seed(0))
    assert shifted.median().item() == pytest.approx(3.0, rel=0.05)


def test_sigma_buckets_split_log_sigma_range():
    edm = EDMFormulation(sigma_min=0.01, sigma_max=100.0)
    sigma = torch.tensor([0.001, 0.02, 0.5, 2.0, 50.0, 1000.0])
    assert sigma_buckets(sigma, edm, num=4).tolist() == [0, 0, 1, 2, 3, 3]


# --- denoiser surface --------------------------------------------------------------------------------------------


def test_denoiser_dtypes_sigma_broadcast_and_cond():
    backbone = Oracle(torch.zeros(2, 4, 8, 8))
    denoiser = Denoiser(backbone, EDMFormulation())
    x = torch.randn(2, 4, 8, 8).to(torch.bfloat16)
    context = torch.randn(2, 3, 16)
    out = denoiser(x, 1.0, {"context": context, "y": None})
    assert backbone.x_in.dtype == torch.bfloat16 and backbone.c_noise.dtype == torch.float32
    assert backbone.c_noise.shape == (2,) and backbone.cond["context"] is context and backbone.cond["y"] is None
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, x.float() * 0.25 / 1.25)  # c_skip x with F = 0
    denoiser(x, torch.ones(2), None)
    assert backbone.cond == {}
    with pytest.raises(ValueError, match="sigma must be"):
        denoiser(x, torch.ones(3))


def test_constructors_reject_bad_arguments():
    for kwargs in [dict(prediction="epsilon"), dict(weighting="snr"), dict(min_snr_gamma=0.0), dict(offset_noise=-1)]:
        with pytest.raises(ValueError):
            VPFormulation(**kwargs)
    with pytest.raises(ValueError):
        EDMFormulation(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError):
        FlowFormulation(time_sampling="beta")
    with pytest.raises(ValueError):
        FlowFormulation(t_min=0.0)


# --- tiny training problems --------------------------------------------------------------------------------------


class TinyBackbone(nn.Module):
    """MLP on 2-D points with a sinusoidal embedding of c_noise, in the backbone signature."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.logspace(-3, 1, 8))  # covers c_noise in [-2, 1] (EDM) and [0, 1000]
        self.mlp = nn.Sequential(nn.Linear(2 + 16, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x_in, c_noise, context=None, y=None):
        angles = c_noise[:, None] * self.freqs  # [B, 8]
        return self.mlp(torch.cat([x_in, angles.sin(), angles.cos()], dim=1))


def gaussian_mixture(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Two tight Gaussians at (+-1, 0): enough structure that a trained denoiser beats the best linear one."""
    sign = torch.randint(0, 2, (batch_size, 1), generator=generator) * 2.0 - 1
    return sign * torch.tensor([1.0, 0.0]) + 0.02 * torch.randn(batch_size, 2, generator=generator)


@pytest.mark.parametrize(
    "formulation",
    [VPFormulation(prediction="eps"), VPFormulation(prediction="v"), EDMFormulation(), FlowFormulation()],
    ids=["vp-eps", "vp-v", "edm", "flow"],
)
def test_tiny_training_reduces_loss(formulation):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        denoiser = Denoiser(TinyBackbone(), formulation)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=1e-2)
    data_generator, noise_generator = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    losses = []
    for _ in range(200):
        x0 = gaussian_mixture(128, data_generator)
        loss, _ = denoising_loss(denoiser, x0, None, formulation, generator=noise_generator)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
        losses.append(loss.mean().item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    # the weighted losses keep a large irreducible part (high noise), so the ideal gain is ~0.6x for v, ~0.3x for EDM
    assert math.isfinite(last) and last < 0.9 * first, (first, last)


def test_each_formulation_owns_its_step_schedules():
    vp, edm, flow = VPFormulation(), EDMFormulation(), FlowFormulation(t_max=0.99)
    torch.testing.assert_close(vp.step_sigmas(10), discrete_sigmas(vp.sigmas_table, 10, "trailing"), rtol=0, atol=0)
    torch.testing.assert_close(vp.step_sigmas(10, "leading"), discrete_sigmas(vp.sigmas_table, 10, "leading"))
    torch.testing.assert_close(edm.step_sigmas(10), karras_sigmas(10, 0.002, 80.0))
    torch.testing.assert_close(flow.step_sigmas(10), flow_sigmas(10, t_max=0.99))
    torch.testing.assert_close(vp.step_sigmas(10, "flow"), flow_sigmas(10, t_max=0.999))
    torch.testing.assert_close(flow.step_sigmas(10, "karras"), karras_sigmas(10, flow.sigma_min, flow.sigma_max))
    with pytest.raises(ValueError, match="needs a discrete VP model, not EDMFormulation"):
        edm.step_sigmas(10, "trailing")
    with pytest.raises(ValueError, match="unknown step schedule 'cosine'"):
        vp.step_sigmas(10, "cosine")
