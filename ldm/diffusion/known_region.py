"""Training-free inpainting with any text-to-image model: the known region is imposed at every step (the
replacement method of Song et al. 2021, App. I.2; RePaint, Lugmayr et al. 2022, without its resampling loops).

Wrapping the denoiser keeps it sampler-agnostic: D'(x, sigma) = m D(x, sigma) + (1 - m) z_known, with m = 1 in the
hole. A sampler stepping with D' moves the known region along z_known + sigma n, i.e. re-noises it to the current
noise level at every step, and lands on z_known at sigma = 0; the hole is generated to agree with it.
"""
import torch
from torch import Tensor

from ldm.diffusion.samplers import DenoiserFn


def latent_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A pixel mask [B, 1, H, W] (1 = to fill) at the latent size: a latent is regenerated when any pixel it covers
    is in the hole (max pooling), so no masked pixel is decoded from known latents alone."""
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be [B, 1, H, W], got {tuple(mask.shape)}")
    return torch.nn.functional.adaptive_max_pool2d(mask.float(), size)


class KnownRegionDenoiser:
    """D'(x, sigma, cond) = m D(x, sigma, cond) + (1 - m) z_known: the prediction outside the hole is the known latent.

    known: normalised latents [B, C, h, w] of the image to complete; mask: [B, 1, h, w] (or [B, C, h, w]), 1 where
    the latents are to be generated (latent_mask of the pixel mask).
    """

    def __init__(self, denoiser: DenoiserFn, known: Tensor, mask: Tensor):
        if mask.shape[0] != known.shape[0] or mask.shape[-2:] != known.shape[-2:]:
            raise ValueError(f"mask {tuple(mask.shape)} must match the known latents {tuple(known.shape)} in batch "
                             "and size (latent_mask gives it the latent size)")
        self.denoiser, self.known, self.mask = denoiser, known, mask.to(known.dtype)

    def __call__(self, x: Tensor, sigma: Tensor, cond: dict | None) -> Tensor:
        x0 = self.denoiser(x, sigma, cond)
        return torch.lerp(self.known.to(x0), x0, self.mask.to(x0))  # m x0 + (1 - m) known
