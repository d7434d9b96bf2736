"""Samplers, step schedules, guidance and per-sample noise: analytic convergence and diffusers step-by-step parity."""

import math
from functools import partial

import pytest
import torch

from ldm.diffusion.guidance import CFGDenoiser
from ldm.diffusion.noise import SampleNoise
from ldm.diffusion.samplers import (
    SAMPLER_ALIASES,
    SAMPLERS,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_flow_euler,
    sample_heun,
    resolve_sampler,
)
from ldm.diffusion.step_schedules import (
    discrete_sigmas,
    discrete_timesteps,
    exponential_sigmas,
    flow_sigmas,
    karras_sigmas,
)

try:
    import diffusers
except ImportError:  # a dev extra: only the parity tests need it
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers (dev extra) is not installed")

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
sample_euler_ancestral = partial(sample_ddim, eta=1.0)  # what the alias "euler_ancestral" runs


# ---------------------------------------------------------------- analytic denoisers (exact posterior means)

def _per_sample(sigma, x):
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))  # [B] -> [B, 1, ...]


MU = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64)
S = torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=torch.float64)


def gaussian_denoiser(x, sigma, cond):
    """Exact E[x0 | x] for x0 ~ N(MU, S^2) per dim: MU + S^2 / (S^2 + sigma^2) (x - MU); x: [B, ..., 4]."""
    mu, s = MU.to(x.dtype), S.to(x.dtype)
    var = s**2 + _per_sample(sigma, x).to(x.dtype) ** 2
    return mu + s**2 / var * (x - mu)


MIX_W = torch.tensor([0.3, 0.7], dtype=torch.float64)
MIX_M = torch.tensor([-1.5, 1.0], dtype=torch.float64)
MIX_S = torch.tensor([0.3, 0.5], dtype=torch.float64)
MIX_MEAN = (MIX_W * MIX_M).sum()
MIX_VAR = (MIX_W * (MIX_S**2 + MIX_M**2)).sum() - MIX_MEAN**2


def mixture_denoiser(x, sigma, cond):
    """Exact E[x0 | x] for a 1-D two-component Gaussian mixture; x: [B, ..., 1]."""
    var = MIX_S**2 + _per_sample(sigma, x) ** 2  # [B, ..., 2]
    logit = MIX_W.log() - 0.5 * (x - MIX_M) ** 2 / var - 0.5 * var.log()
    post_mean = MIX_M + MIX_S**2 / var * (x - MIX_M)  # per-component posterior means
    # responsibility of component 0 as a sigmoid: elementwise ops only (a softmax reduction over 2 is slow here)
    resp0 = torch.sigmoid(logit[..., :1] - logit[..., 1:])
    return post_mean[..., 1:] + resp0 * (post_mean[..., :1] - post_mean[..., 1:])


def mixture_quadrature(n_points: int = 1001):
    """Grid over the exact prior at SIGMA_MAX (mixture convolved with N(0, SIGMA_MAX^2)) and its normalised weights."""
    grid = torch.linspace(-8 * SIGMA_MAX, 8 * SIGMA_MAX, n_points, dtype=torch.float64)[:, None]
    var = MIX_S**2 + SIGMA_MAX**2
    weights = (MIX_W * torch.exp(-0.5 * (grid - MIX_M) ** 2 / var) / var.sqrt()).sum(-1)
    return grid, weights / weights.sum()


def gaussian_std_error(sampler, n: int) -> float:
    # every sampler maps x = MU + c (x_T - MU) with D affine, so one point at +1 prior std gives the output std
    x = (MU + (S**2 + SIGMA_MAX**2).sqrt())[None]
    out = sampler(gaussian_denoiser, x, karras_sigmas(n, SIGMA_MIN, SIGMA_MAX))
    return (out[0] - MU - S).abs().max().item()


def mixture_var_error(sampler, n: int) -> float:
    grid, weights = mixture_quadrature()
    out = sampler(mixture_denoiser, grid, karras_sigmas(n, SIGMA_MIN, SIGMA_MAX))[:, 0]
    mean = (weights * out).sum()
    return abs((weights * (out - mean) ** 2).sum() - MIX_VAR).item()


DETERMINISTIC = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}
EXPECTED_RATIO = {"euler": (1.6, 2.6), "heun": (3.2, 8.0), "dpmpp_2m": (3.2, 8.0)}  # err(n) / err(2n): order 1 or 2


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_deterministic_order_gaussian(name):
    e16, e32, e64 = (gaussian_std_error(DETERMINISTIC[name], n) for n in (16, 32, 64))
    lo, hi = EXPECTED_RATIO[name]
    print(f"{name} Gaussian std error: n=16 {e16:.2e} n=32 {e32:.2e} n=64 {e64:.2e} ratio {e32 / e64:.2f}")
    assert lo < e16 / e32 < hi and lo < e32 / e64 < hi
    assert e64 < (0.08 if name == "euler" else 0.006)


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_deterministic_order_mixture(name):
    e16, e32 = mixture_var_error(DETERMINISTIC[name], 16), mixture_var_error(DETERMINISTIC[name], 32)
    lo, hi = EXPECTED_RATIO[name]
    print(f"{name} mixture variance error: n=16 {e16:.2e} n=32 {e32:.2e} ratio {e16 / e32:.2f}")
    assert lo < e16 / e32 < hi


def test_second_order_beats_euler():
    euler = gaussian_std_error(sample_euler, 32)
    assert gaussian_std_error(sample_heun, 32) < euler / 5
    assert gaussian_std_error(sample_dpmpp_2m, 32) < euler / 5


STOCHASTIC = {
    "ddpm": sample_ddpm,
    "ddim_eta1": partial(sample_ddim, eta=1.0),
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "heun_churn": partial(sample_heun, s_churn=40.0),
    "euler_churn": partial(sample_euler, s_churn=40.0),
}


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_stochastic_moments_gaussian(name):
    # 8 seeded samples of 1000 independent copies: per-sample noise costs a call per seed, and tensors
    # under torch's 32768-element grain stay single-threaded (fast on a loaded 2-core machine)
    n_samples = 8000
    noise = SampleNoise(range(8))
    x = MU + (S**2 + SIGMA_MAX**2).sqrt() * noise.randn((n_samples // 8, 4), dtype=torch.float64)
    out = STOCHASTIC[name](gaussian_denoiser, x, karras_sigmas(400, SIGMA_MIN, SIGMA_MAX), generator=noise)
    out = out.reshape(n_samples, 4)
    mean_z = ((out.mean(0) - MU) / (S / math.sqrt(n_samples))).abs().max().item()
    std_rel = (out.std(0) / S - 1).abs().max().item()
    print(f"{name}: mean error {mean_z:.2f} standard errors, std relative error {std_rel:.3f}")
    assert mean_z < 5
    # first-order samplers keep an O(1/n) std bias (~2.5% at 400 steps) on top of 0.8% sampling error
    assert std_rel < 0.05


@pytest.mark.parametrize("name", ["ddpm", "dpmpp_2m_sde", "heun_churn"])
def test_stochastic_moments_mixture(name):
    n_samples = 8000
    noise = SampleNoise(range(8))
    comp = torch.multinomial(MIX_W, n_samples, replacement=True, generator=torch.Generator().manual_seed(0))
    comp = comp.reshape(8, n_samples // 8, 1)
    x0 = MIX_M[comp] + MIX_S[comp] * noise.randn((n_samples // 8, 1), dtype=torch.float64)
    x = x0 + SIGMA_MAX * noise.randn((n_samples // 8, 1), dtype=torch.float64)  # exact prior sample at SIGMA_MAX
    out = STOCHASTIC[name](mixture_denoiser, x, karras_sigmas(400, SIGMA_MIN, SIGMA_MAX), generator=noise)
    out = out.flatten()
    assert abs(out.mean() - MIX_MEAN) < 5 * MIX_VAR.sqrt() / math.sqrt(n_samples)
    print(f"{name} mixture: mean {out.mean():.3f} (true {MIX_MEAN:.3f}), var {out.var():.3f} (true {MIX_VAR:.3f})")
    assert abs(out.var() / MIX_VAR - 1) < 0.06
    # bimodal: the right fraction of samples lands in each mode
    assert abs((out < -0.25).double().mean() - MIX_W[0]) < 0.025


# ---------------------------------------------------------------- identities between samplers


class ListNoise:
    """Injects a fixed list of noise tensors in order (the `generator` protocol: randn_like)."""

    def __init__(self, noises):
        self.noises = list(noises)
        self.used = 0

    def randn_like(self, x):
        self.used += 1
        return self.noises[self.used - 1].to(x)


def _noises(n, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_sampler_identities():
    sigmas = karras_sigmas(12, SIGMA_MIN, SIGMA_MAX)
    x = MU + SIGMA_MAX * torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    noises = [z.double() for z in _noises(12, (3, 4))]
    euler = sample_euler(gaussian_denoiser, x, sigmas)
    # DDIM eta=0 and ancestral eta=0 are Euler; the flow ODE in t is Euler after x -> x / (1 + sigma)
    torch.testing.assert_close(sample_ddim(gaussian_denoiser, x, sigmas), euler, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sample_euler_ancestral(gaussian_denoiser, x, sigmas, eta=0.0), euler)
    torch.testing.assert_close(sample_flow_euler(gaussian_denoiser, x, sigmas), euler, rtol=1e-10, atol=1e-10)
    # the DDPM posterior step is DDIM with eta=1
    torch.testing.assert_close(
        sample_ddpm(gaussian_denoiser, x, sigmas, generator=ListNoise(noises)),
        sample_ddim(gaussian_denoiser, x, sigmas, generator=ListNoise(noises), eta=1.0),
        rtol=1e-10,
        atol=1e-10,
    )
    torch.testing.assert_close(
        sample_dpmpp_2m_sde(gaussian_denoiser, x, sigmas, eta=0.0), sample_dpmpp_2m(gaussian_denoiser, x, sigmas)
    )


# ---------------------------------------------------------------- shared contract


def test_registry_callback_and_contract():
    sigmas = karras_sigmas(5, SIGMA_MIN, SIGMA_MAX)
    names = {"ddpm", "ddim", "euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "flow_euler"}
    assert set(SAMPLERS) == names and SAMPLER_ALIASES == {"euler_ancestral": ("ddim", {"eta": 1.0})}
    for name, sampler in SAMPLERS.items():
        seen = []
        x = SIGMA_MAX * SampleNoise([0, 1]).randn((4,), dtype=torch.float64)
        out = sampler(gaussian_denoiser, x, sigmas, cond=None, callback=seen.append, generator=SampleNoise([0, 1]))
        assert out.shape == x.shape and torch.isfinite(out).all(), name
        assert [d["i"] for d in seen] == list(range(5)), name
        assert [d["sigma"] for d in seen] == pytest.approx(sigmas[:-1].tolist()), name
        assert all(d["x"].shape == d["denoised"].shape == x.shape for d in seen), name


def test_an_alias_names_its_canonical_sampler_and_runs_it():
    x, sigmas = SIGMA_MAX * SampleNoise([0, 1]).randn((4,), dtype=torch.float64), karras_sigmas(5, SIGMA_MIN, SIGMA_MAX)
    with pytest.warns(UserWarning, match="'euler_ancestral' is 'ddim' with eta=1.0"):
        alias = resolve_sampler("euler_ancestral")
    assert torch.equal(alias(gaussian_denoiser, x, sigmas, generator=SampleNoise([0, 1])),
                       sample_ddim(gaussian_denoiser, x, sigmas, generator=SampleNoise([0, 1]), eta=1.0))
    assert resolve_sampler("heun") is sample_heun
    with pytest.raises(ValueError, match="unknown sampler 'k_euler'.*euler_ancestral"):
        resolve_sampler("k_euler")


def test_bad_input_raises():
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="decreasing"):
        sample_euler(gaussian_denoiser, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="1-D"):
        sample_euler(gaussian_denoiser, x, torch.ones(2, 2))
    with pytest.raises(ValueError, match="3 seeds"):
        sample_euler_ancestral(gaussian_denoiser, x, [2.0, 1.0, 0.0], generator=SampleNoise([1, 2, 3]))
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(gaussian_denoiser, x, [2.0, 1.0, 0.0], eta=1.5)


def test_half_precision_x_gets_float32_sigma():
    dtypes = []

    def denoiser(x, sigma, cond):
        dtypes.append(sigma.dtype)
        return x * 0.5

    out = sample_dpmpp_2m(denoiser, torch.ones(2, 3, dtype=torch.bfloat16), karras_sigmas(3, 0.1, 10.0))
    assert out.dtype == torch.bfloat16 and set(dtypes) == {torch.float32}


# ---------------------------------------------------------------- per-sample noise


def test_sample_noise_independent_of_batch_and_order():
    seeds = [11, 3, 7, 42, 0, 5, 99, 123]
    sigmas = karras_sigmas(10, SIGMA_MIN, SIGMA_MAX)
    mu = MU.float()

    def run(batch_seeds):
        noise = SampleNoise(batch_seeds)
        x = mu + SIGMA_MAX * noise.randn((4,))
        return sample_euler_ancestral(gaussian_denoiser, x, sigmas, generator=noise)

    batch = run(seeds)
    for i, seed in enumerate(seeds):
        assert torch.equal(run([seed])[0], batch[i])
    assert torch.equal(run(seeds[::-1]), batch.flip(0))
    assert not torch.equal(batch[0], batch[1])


def test_sample_noise_dtype_and_shape():
    noise = SampleNoise([1, 2])
    a = noise.randn((3, 4))
    b = SampleNoise([1, 2]).randn((3, 4), dtype=torch.float64)
    assert a.shape == (2, 3, 4) and b.dtype == torch.float64
    assert torch.equal(a.double(), b)  # drawn in float32, then cast
    with pytest.raises(ValueError):
        SampleNoise([])


# ---------------------------------------------------------------- step schedules


@needs_diffusers
def test_karras_sigmas_matches_diffusers():
    sched = diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True
    )
    sched.set_timesteps(20)
    table = sched_sigma_table()
    ours = karras_sigmas(20, table[0].item(), table[-1].item())
    torch.testing.assert_close(ours.float(), sched.sigmas, rtol=1e-6, atol=0)
    assert ours[-1] == 0 and len(ours) == 21


def test_exponential_and_flow_sigmas():
    exp = exponential_sigmas(5, 0.01, 100.0)
    torch.testing.assert_close(exp[:-1].log().diff(), torch.full((4,), math.log(1e-4) / 4, dtype=torch.float64))
    sig = flow_sigmas(4, t_max=0.8)
    t = sig / (1 + sig)
    torch.testing.assert_close(t, torch.tensor([0.8, 0.6, 0.4, 0.2, 0.0], dtype=torch.float64))
    t3 = (lambda s: s / (1 + s))(flow_sigmas(4, shift=3.0, t_max=0.8))
    torch.testing.assert_close(t3, 3 * t / (1 + 2 * t))  # SD3 shift spends more steps at high noise
    assert (t3[1:-1] > t[1:-1]).all()
    bad_calls = (partial(flow_sigmas, 4, t_max=1.0), partial(karras_sigmas, 0, 0.1, 1), partial(karras_sigmas, 4, 2, 1))
    for bad in bad_calls:
        with pytest.raises(ValueError):
            bad()


def sched_sigma_table() -> torch.Tensor:
    """Ascending sigma table of the SD ("scaled_linear") schedule, computed exactly as diffusers does (float32)."""
    ac = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    return ((1 - ac) / ac) ** 0.5


@needs_diffusers
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 7, 10, 50, 1000])
def test_discrete_timesteps_match_diffusers(spacing, n):
    offsets = (0, 1) if spacing == "leading" else (0,)
    for steps_offset in offsets:
        sched = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
        if n == 1000 and steps_offset == 1:
            with pytest.raises(ValueError, match="steps_offset"):
                discrete_timesteps(1000, n, spacing, steps_offset)
            continue
        sched.set_timesteps(n)
        assert discrete_timesteps(1000, n, spacing, steps_offset).tolist() == sched.timesteps.tolist()


@needs_diffusers
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_discrete_sigmas_match_diffusers_euler(spacing):
    table = sched_sigma_table()
    sched = diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing=spacing, steps_offset=1
    )
    sched.set_timesteps(13)
    assert torch.equal(discrete_sigmas(table, 13, spacing, steps_offset=1), sched.sigmas)
    with pytest.raises(ValueError, match="ascending"):
        discrete_sigmas(table.flip(0), 13, spacing)
    with pytest.raises(ValueError, match="spacing"):
        discrete_sigmas(table, 13, "uniform")


# ---------------------------------------------------------------- step-by-step parity with diffusers schedulers

T = 1000
SHAPE = (2, 4, 8, 8)


def eps_model(x_vp, t):
    """A fixed eps-prediction 'network' on diffusers' scaled latents, timestep t in [0, T)."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x_vp.ndim - 1)))
    return torch.tanh(x_vp) * (0.4 + 0.6 * torch.cos(t / T * math.pi / 2)) + 0.1 * torch.sin(3 * x_vp)


def vp_eps_denoiser(table):
    """The eps model as D(x, sigma): x_vp = x / sqrt(1 + sigma^2), t = table index of sigma, D = x - sigma * eps."""

    def denoiser(x, sigma, cond):
        t = (table.log()[None, :] - sigma.log()[:, None]).abs().argmin(-1)  # exact table sigmas
        sigma = sigma.reshape(-1, 1, 1, 1)
        return x - sigma * eps_model(x / (1 + sigma**2).sqrt(), t)

    return denoiser


def _record(store, scale):
    return lambda d: store.append(d["x"] / scale(d["sigma"]))


def _report_diff(name, ours, ref):
    diff = max((a - b).abs().max().item() for a, b in zip(ours, ref, strict=True))
    size = max(b.abs().max().item() for b in ref)
    print(f"diffusers parity {name}: max abs diff {diff:.2e} (max |x| {size:.2f})")
    assert diff <= 1e-5 * max(1.0, size)


def _vp_scale(sigma):
    return math.sqrt(1 + sigma**2)


@needs_diffusers
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0)])
def test_ddim_matches_diffusers(eta, spacing, offset):
    table, n = sched_sigma_table(), 10  # T divisible by n: diffusers' DDIM steps back by T // n
    sched = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        set_alpha_to_one=True, timestep_spacing=spacing, steps_offset=offset,
    )
    sched.set_timesteps(n)
    sigmas = discrete_sigmas(table, n, spacing, offset)
    noises = _noises(n, SHAPE)
    x_vp = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    ref = []
    for i, t in enumerate(sched.timesteps):
        ref.append(x_vp)
        x_vp = sched.step(eps_model(x_vp, t), t, x_vp, eta=eta, variance_noise=noises[i] if eta else None).prev_sample
    ref.append(x_vp)
    ours = []
    out = sample_ddim(
        vp_eps_denoiser(table), ref[0] * _vp_scale(sigmas[0].item()), sigmas,
        callback=_record(ours, _vp_scale), generator=ListNoise(noises), eta=eta,
    )
    _report_diff(f"DDIM eta={eta} {spacing}", ours + [out], ref)


def _run_sigma_space_scheduler(sched, n, noises=None, module=None, monkeypatch=None):
    """Run a diffusers k-style scheduler (sample in sigma space) with our eps model; returns per-step samples."""
    if noises is not None:
        it = iter(noises)
        monkeypatch.setattr(module, "randn_tensor", lambda *args, **kwargs: next(it))
    sched.set_timesteps(n)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)) * _vp_scale(sched.sigmas[0].item())
    ref = []
    for t in sched.timesteps:
        ref.append(x)
        x = sched.step(eps_model(sched.scale_model_input(x, t), t), t, x).prev_sample
    return ref + [x]


def _sd_kwargs(**kwargs):
    return dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **kwargs)


@needs_diffusers
def test_euler_matches_diffusers():
    table, n = sched_sigma_table(), 12
    ref = _run_sigma_space_scheduler(
        diffusers.EulerDiscreteScheduler(**_sd_kwargs(timestep_spacing="leading", steps_offset=1)), n
    )
    ours = []
    sigmas = discrete_sigmas(table, n, "leading", 1)
    out = sample_euler(vp_eps_denoiser(table), ref[0], sigmas, callback=_record(ours, lambda s: 1.0))
    _report_diff("Euler leading", ours + [out], ref)


@needs_diffusers
def test_euler_ancestral_matches_diffusers(monkeypatch):
    table, n = sched_sigma_table(), 12
    noises = _noises(n, SHAPE)
    ref = _run_sigma_space_scheduler(
        diffusers.EulerAncestralDiscreteScheduler(**_sd_kwargs(timestep_spacing="trailing")),
        n, noises, diffusers.schedulers.scheduling_euler_ancestral_discrete, monkeypatch,
    )
    ours = []
    out = sample_euler_ancestral(
        vp_eps_denoiser(table), ref[0], discrete_sigmas(table, n, "trailing"),
        callback=_record(ours, lambda s: 1.0), generator=ListNoise(noises),
    )
    _report_diff("Euler ancestral trailing", ours + [out], ref)


@needs_diffusers
def test_heun_matches_diffusers():
    table, n = sched_sigma_table(), 8
    ref = _run_sigma_space_scheduler(diffusers.HeunDiscreteScheduler(**_sd_kwargs(timestep_spacing="trailing")), n)
    out = sample_heun(vp_eps_denoiser(table), ref[0], discrete_sigmas(table, n, "trailing"))
    _report_diff("Heun trailing (final sample)", [out], ref[-1:])


@needs_diffusers
def test_ddpm_matches_diffusers(monkeypatch):
    table, n = sched_sigma_table(), 10
    noises = iter(_noises(n, SHAPE))
    monkeypatch.setattr(diffusers.schedulers.scheduling_ddpm, "randn_tensor", lambda *a, **k: next(noises))
    sched = diffusers.DDPMScheduler(**_sd_kwargs(clip_sample=False, variance_type="fixed_small"))
    sched.set_timesteps(n)  # "leading", steps_offset 0: the last step is t = 0 -> x0
    x_vp = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    ref = []
    for t in sched.timesteps:
        ref.append(x_vp)
        x_vp = sched.step(eps_model(x_vp, t), t, x_vp).prev_sample
    ref.append(x_vp)
    sigmas = discrete_sigmas(table, n, "leading")
    ours = []
    out = sample_ddpm(
        vp_eps_denoiser(table), ref[0] * _vp_scale(sigmas[0].item()), sigmas,
        callback=_record(ours, _vp_scale), generator=ListNoise(_noises(n, SHAPE)),
    )
    _report_diff("DDPM leading", ours + [out], ref)


@needs_diffusers
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
def test_dpmpp_2m_matches_diffusers(algorithm):
    table, n = sched_sigma_table(), 12
    sched = diffusers.DPMSolverMultistepScheduler(
        **_sd_kwargs(algorithm_type=algorithm, solver_order=2, timestep_spacing="trailing",
                     final_sigmas_type="zero", lower_order_final=True)
    )
    sched.set_timesteps(n)
    sigmas = discrete_sigmas(table, n, "trailing")
    assert torch.equal(sched.sigmas, sigmas)
    noises = _noises(n, SHAPE)
    x_vp = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    ref = []
    for i, t in enumerate(sched.timesteps):
        ref.append(x_vp)
        x_vp = sched.step(eps_model(x_vp, t), t, x_vp, variance_noise=noises[i]).prev_sample
    ref.append(x_vp)
    sampler = sample_dpmpp_2m if algorithm == "dpmsolver++" else sample_dpmpp_2m_sde
    ours = []
    out = sampler(
        vp_eps_denoiser(table), ref[0] * _vp_scale(sigmas[0].item()), sigmas,
        callback=_record(ours, _vp_scale), generator=ListNoise(noises),
    )
    _report_diff(f"DPM-Solver++(2M) {algorithm}", ours + [out], ref)


@needs_diffusers
def test_flow_euler_matches_diffusers():
    n = 10
    sigmas = flow_sigmas(n, shift=3.0).float()
    t_steps = sigmas / (1 + sigmas)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(sigmas=t_steps[:-1].numpy())  # an array: diffusers 0.30 does maths on it

    def velocity(x_t, timestep):
        return eps_model(x_t, timestep) - 0.5 * x_t

    def flow_denoiser(x, sigma, cond):
        t = (sigma / (1 + sigma)).reshape(-1, 1, 1, 1)
        x_t = x * (1 - t)
        return x_t - t * velocity(x_t, t * T)

    x_t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    ref = []
    for timestep in sched.timesteps:
        ref.append(x_t)
        x_t = sched.step(velocity(x_t, timestep), timestep, x_t).prev_sample
    ref.append(x_t)
    ours = []
    out = sample_flow_euler(
        flow_denoiser, ref[0] * (1 + sigmas[0].item()), sigmas, callback=_record(ours, lambda s: 1 + s)
    )
    _report_diff("flow-matching Euler (FlowMatchEulerDiscreteScheduler)", ours + [out], ref)


# ---------------------------------------------------------------- classifier-free guidance


class CountingDenoiser:
    """Toy conditional denoiser D = x / (1 + sigma^2) + context; records each call's batch size."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x, sigma, cond):
        self.batch_sizes.append(x.shape[0])
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2) + cond["context"].reshape(-1, 1, 1, 1) * x.mean(
            dim=(1, 2, 3), keepdim=True
        ).sin() + cond["context"].reshape(-1, 1, 1, 1)


def _cfg_inputs(batch=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 2, 4, 4, generator=g)
    cond = {"context": torch.randn(batch, generator=g) + 2, "y": None}
    uncond = {"context": torch.zeros(batch), "y": None}
    return x, cond, uncond


def test_cfg_scale_endpoints_and_one_batched_call():
    x, cond, uncond = _cfg_inputs()
    sigma = torch.full((3,), 2.0)
    net = CountingDenoiser()
    d_cond, d_uncond = net(x, sigma, cond), net(x, sigma, uncond)
    net.batch_sizes.clear()
    assert torch.equal(CFGDenoiser(net, 1.0, uncond)(x, sigma, cond), d_cond)
    assert torch.equal(CFGDenoiser(net, 0.0, uncond)(x, sigma, cond), d_uncond)
    torch.testing.assert_close(CFGDenoiser(net, 4.0, uncond)(x, sigma, cond), d_uncond + 4.0 * (d_cond - d_uncond))
    assert net.batch_sizes == [6, 6, 6]  # cond and uncond stacked in one call each time


def test_cfg_interval():
    x, cond, uncond = _cfg_inputs()
    net = CountingDenoiser()
    cfg = CFGDenoiser(net, 5.0, uncond, interval=(0.5, 3.0))
    sigma = torch.tensor([0.1, 1.0, 10.0])  # only the middle sample is inside the interval
    out = cfg(x, sigma, cond)
    d_cond, d_uncond = net(x, sigma, cond), net(x, sigma, uncond)
    torch.testing.assert_close(out[[0, 2]], d_cond[[0, 2]])
    torch.testing.assert_close(out[1], (d_uncond + 5.0 * (d_cond - d_uncond))[1])
    net.batch_sizes.clear()
    torch.testing.assert_close(cfg(x, torch.full((3,), 10.0), cond), net(x, torch.full((3,), 10.0), cond))
    assert net.batch_sizes == [3, 3]  # outside the interval: no unconditional pass at all


def test_cfg_rescale():
    x, cond, uncond = _cfg_inputs()
    sigma = torch.full((3,), 1.0)
    net = CountingDenoiser()
    d_cond = net(x, sigma, cond)
    full = CFGDenoiser(net, 7.0, uncond, rescale=1.0)(x, sigma, cond)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), d_cond.std(dim=(1, 2, 3)))
    plain = CFGDenoiser(net, 7.0, uncond)(x, sigma, cond)
    half = CFGDenoiser(net, 7.0, uncond, rescale=0.5)(x, sigma, cond)
    torch.testing.assert_close(half, (full + plain) / 2)


def test_cfg_in_sampler_and_errors():
    x, cond, uncond = _cfg_inputs()
    net = CountingDenoiser()
    out = sample_dpmpp_2m(CFGDenoiser(net, 3.0, uncond), x * 10, karras_sigmas(4, 0.1, 10.0), cond=cond)
    assert out.shape == x.shape and net.batch_sizes == [6] * 4
    with pytest.raises(ValueError, match="keys"):
        CFGDenoiser(net, 3.0, {"context": uncond["context"]})(x, torch.ones(3), cond)
    with pytest.raises(ValueError, match="shape"):
        CFGDenoiser(net, 3.0, {"context": torch.zeros(1), "y": None})(x, torch.ones(3), cond)
    with pytest.raises(ValueError, match="cond dict"):
        CFGDenoiser(net, 3.0, uncond)(x, torch.ones(3), None)
