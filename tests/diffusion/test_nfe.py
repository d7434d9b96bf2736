"""NFE (denoiser evaluations per image), the x axis of task=evaluate's sampler sweep: counted on every sampler."""
import pytest
import torch

from ldm.diffusion.formulations import VPFormulation
from ldm.diffusion.guidance import CFGDenoiser
from ldm.diffusion.nfe import nfe
from ldm.diffusion.noise import SampleNoise
from ldm.diffusion.samplers import SAMPLER_ALIASES, SAMPLERS, resolve_sampler


class RowCounter:
    """A denoiser that predicts zeros and counts the rows (images) it was asked to denoise."""

    def __init__(self):
        self.rows = 0

    def __call__(self, x, sigma, cond):
        self.rows += x.shape[0]
        return torch.zeros_like(x)


@pytest.mark.filterwarnings("ignore:sampler")
@pytest.mark.parametrize("sampler", [*SAMPLERS, *SAMPLER_ALIASES])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_nfe_counts_the_denoiser_calls_each_image_costs(sampler, guidance_scale):
    steps, batch = 6, 2
    counter = RowCounter()
    cond = {"context": torch.zeros(batch, 1, 4)}
    uncond = {"context": torch.ones(batch, 1, 4)}
    denoiser = counter if guidance_scale == 1.0 else CFGDenoiser(counter, guidance_scale, uncond)
    sigmas = VPFormulation().step_sigmas(steps)
    noise = SampleNoise(list(range(batch)))
    resolve_sampler(sampler)(denoiser, noise.randn((4, 2, 2)) * sigmas[0], sigmas, cond=cond, generator=noise)
    assert counter.rows / batch == nfe(sampler, steps, guidance_scale)
    assert nfe(sampler, steps, guidance_scale) == (2 * steps - 1 if sampler == "heun" else steps) * (
        2 if guidance_scale != 1 else 1)


def test_nfe_rejects_an_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler 'rk4'"):
        nfe("rk4", 10)
