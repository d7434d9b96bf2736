"""Classifier-free guidance (Ho & Salimans 2022): condition dropout in training, and at sampling a denoiser
wrapper combining the conditional and unconditional predictions, with rescale and a guidance interval."""

import torch

from ldm.diffusion.samplers import DenoiserFn


def cfg_dropout(cond: dict, null: dict, p: float = 0.1, generator: torch.Generator | None = None) -> dict:
    """Classifier-free guidance training dropout (Ho & Salimans 2022): per sample, with probability p,
    replace the whole condition (context and y together) by the null condition."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"cfg dropout probability must be in [0, 1], got {p}")
    present = [v for v in cond.values() if v is not None]
    if not present:
        return dict(cond)
    batch_size, device = present[0].shape[0], present[0].device
    u = torch.rand(batch_size, generator=generator, device=generator.device if generator is not None else device)
    drop = u.to(device) < p  # [B]
    out = {}
    for key, value in cond.items():
        if value is None:
            out[key] = None
            continue
        null_value = null.get(key)
        if null_value is None or null_value.shape != value.shape:
            got = None if null_value is None else tuple(null_value.shape)
            raise ValueError(f"null condition for {key!r} must have shape {tuple(value.shape)}, got {got}")
        keep_shape = (batch_size,) + (1,) * (value.ndim - 1)
        out[key] = torch.where(drop.view(keep_shape), null_value.to(value.dtype), value)
    return out


def _concat_cond(cond: dict, uncond: dict, batch_size: int) -> dict:
    # cond rows first, then uncond rows: one forward pass of 2B samples
    if cond.keys() != uncond.keys():
        raise ValueError(f"cond keys {sorted(cond)} differ from uncond keys {sorted(uncond)}")
    joined = {}
    for key, c in cond.items():
        u = uncond[key]
        if c is None or u is None:
            if c is not None or u is not None:
                raise ValueError(f"cond[{key!r}] and uncond[{key!r}] must both be None or both tensors")
            joined[key] = None
            continue
        if c.shape[0] != batch_size or u.shape != c.shape:
            raise ValueError(
                f"cond[{key!r}] {tuple(c.shape)} and uncond[{key!r}] {tuple(u.shape)} need the same shape "
                f"with batch {batch_size}"
            )
        joined[key] = torch.cat([c, u])
    return joined


def rescale_guidance(guided: torch.Tensor, cond_pred: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, sec. 3.4, eq. 15-16): pull the guided per-sample std back to the cond one."""
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond_pred.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return torch.lerp(guided, rescaled, rescale)


class CFGDenoiser:
    """Classifier-free guidance D_u + scale (D_c - D_u) on x0 predictions, cond and uncond in one batched call.

    uncond: the unconditional cond dict (e.g. conditioner.null(batch_size)), same keys and shapes as cond.
    rescale: Lin et al. 2024 guidance rescale phi, applied to the x0 prediction (the quantity this
    interface exposes). interval: (lo, hi) guidance interval (Kynkaanniemi et al. 2024); outside
    lo <= sigma <= hi the cond prediction is returned, and no unconditional pass is made when no
    sample of the batch is inside.
    """

    def __init__(
        self,
        denoiser: DenoiserFn,
        scale: float,
        uncond: dict,
        rescale: float = 0.0,
        interval: tuple[float, float] | None = None,
    ):
        if not 0 <= rescale <= 1:
            raise ValueError(f"rescale must lie in [0, 1], got {rescale}")
        if interval is not None and not 0 <= interval[0] <= interval[1]:
            raise ValueError(f"interval must be (lo, hi) with 0 <= lo <= hi, got {interval}")
        self.denoiser = denoiser
        self.scale = float(scale)
        self.uncond = uncond
        self.rescale = rescale
        self.interval = interval
        self._joined: tuple[dict, int, dict] | None = None  # (cond, batch, both concatenated): the same every step

    def _both(self, cond: dict, batch_size: int) -> dict:
        """cond rows then uncond rows, concatenated once per cond dict rather than at every sampler step."""
        if self._joined is None or self._joined[0] is not cond or self._joined[1] != batch_size:
            self._joined = (cond, batch_size, _concat_cond(cond, self.uncond, batch_size))
        return self._joined[2]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None) -> torch.Tensor:
        if cond is None:
            raise ValueError("classifier-free guidance needs a cond dict")
        guide = torch.ones_like(sigma, dtype=torch.bool)
        if self.interval is not None:
            guide = (sigma >= self.interval[0]) & (sigma <= self.interval[1])
        if not bool(guide.any()):
            return self.denoiser(x, sigma, cond)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), self._both(cond, x.shape[0]))
        cond_pred, uncond_pred = both.chunk(2)
        guided = torch.lerp(uncond_pred, cond_pred, self.scale)  # exact at scale 0 and 1
        if self.rescale > 0:
            guided = rescale_guidance(guided, cond_pred, self.rescale)
        guide = guide.view(-1, *([1] * (x.ndim - 1)))  # [B] -> [B, 1, ...] to broadcast over x
        return torch.where(guide, guided, cond_pred)
