"""The denoiser D(x, sigma, cond) -> x0_hat that every loss and sampler talks to."""

import torch
from torch import Tensor, nn

from ldm.diffusion.formulations import Formulation


def append_dims(c: Tensor, ndim: int) -> Tensor:
    """[B] -> [B, 1, ..., 1] with `ndim` dims in all, to broadcast per-sample coefficients over x."""
    return c.reshape(-1, *([1] * (ndim - 1)))


class Denoiser(nn.Module):
    """Preconditioned denoiser D(x, sigma) = c_skip x + c_out net(c_in x, c_noise) (Karras et al. 2022, Eq. 7)."""

    def __init__(self, net: nn.Module, formulation: Formulation) -> None:
        super().__init__()
        self.net = net
        self.formulation = formulation

    def forward(self, x: Tensor, sigma: Tensor | float, cond: dict[str, Tensor | None] | None = None) -> Tensor:
        """x0_hat for x = x0 + sigma n; sigma is [B] (or a scalar, used for every sample); cond goes to net as kwargs.

        Coefficients are computed in float32 (float64 for float64 x) and the backbone runs in x's dtype.
        """
        batch_size = x.shape[0]
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        sigma = torch.as_tensor(sigma, dtype=compute_dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(batch_size)
        if sigma.shape != (batch_size,):
            raise ValueError(f"sigma must be a scalar or have shape [{batch_size}], got {tuple(sigma.shape)}")
        c_skip, c_out, c_in, c_noise = self.formulation.precondition(sigma)
        x_c = x.to(compute_dtype)
        F = self.net((append_dims(c_in, x.ndim) * x_c).to(x.dtype), c_noise, **(cond or {}))
        return append_dims(c_skip, x.ndim) * x_c + append_dims(c_out, x.ndim) * F.to(compute_dtype)
