"""Training-free inpainting: the known region is re-noised along the sampler's own trajectory and comes out exact."""
import pytest
import torch

from ldm.diffusion.formulations import EDMFormulation
from ldm.diffusion.known_region import KnownRegionDenoiser, latent_mask
from ldm.models.generate import generate_latents


def test_latent_mask_regenerates_every_latent_touching_the_hole():
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 1, 2] = 1  # one pixel in the top-right 2 x 2 block
    assert latent_mask(mask, (2, 2)).tolist() == [[[[0.0, 1.0], [0.0, 0.0]]]]
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        latent_mask(torch.zeros(1, 3, 4, 4), (2, 2))


def test_known_region_denoiser_replaces_the_prediction_outside_the_hole():
    known, mask = torch.randn(2, 4, 8, 8), torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1
    wrapped = KnownRegionDenoiser(lambda x, sigma, cond: torch.full_like(x, 7.0), known, mask)
    out = wrapped(torch.zeros(2, 4, 8, 8), torch.ones(2), None)
    assert (out[..., :4] == 7).all() and torch.equal(out[..., 4:], known[..., 4:])
    with pytest.raises(ValueError, match="must match the known latents"):
        KnownRegionDenoiser(lambda *a: a[0], known, torch.zeros(2, 1, 4, 4))


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
def test_sampling_renoises_the_known_region_and_lands_on_it(sampler):
    """A model that always predicts 0: the hole comes out 0, the known region exactly the known latents, and at
    every step the known region is z_known + sigma n for the run's first noise n (re-noised to the current level)."""
    known, mask = torch.randn(2, 4, 8, 8), torch.zeros(2, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    formulation = EDMFormulation(sigma_data=1.0)
    steps = []
    z = generate_latents(lambda x, sigma, cond: torch.zeros_like(x), formulation, {}, None, [0, 1], (4, 8, 8),
                         sampler=sampler, steps=8, known=(known, mask), callback=steps.append)
    outside = (mask == 0).expand_as(known)
    assert torch.allclose(z[outside], known[outside], atol=1e-5)
    assert z[~outside].abs().max() < 1e-5
    first = steps[0]
    noise = (first["x"] - known) / first["sigma"]
    for step in steps[1:]:
        expected = known + step["sigma"] * noise
        assert torch.allclose(step["x"][outside], expected[outside], atol=1e-4)
