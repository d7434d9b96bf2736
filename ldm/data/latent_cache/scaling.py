"""Latent scale and shift from a cache's exact statistics, so that scaled latents have about unit variance."""
import torch

SCALES = ("per_channel", "global_std")


def latent_scaling(stats: dict, scale: str | float, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each [C, 1, 1], so that (z - shift) * scale has about unit variance (Rombach et al. 2022, sec. 4.3.2).

    per_channel: shift = E[z_c], scale = 1 / std(z_c); global_std: shift = 0, scale = 1 / std(z) over all
    channels; a number: shift = 0 and that scale (e.g. SD's 0.18215).
    """
    if isinstance(scale, str):
        if scale == "per_channel":
            shift, factor = torch.tensor(stats["mean"]), 1.0 / torch.tensor(stats["std"])
        elif scale == "global_std":
            shift, factor = torch.zeros(channels), torch.full((channels,), 1.0 / stats["std_all"])
        else:
            raise ValueError(f"scale must be one of {SCALES} or a positive number, got {scale!r}")
    else:
        if not scale > 0:
            raise ValueError(f"a fixed latent scale must be positive, got {scale}")
        shift, factor = torch.zeros(channels), torch.full((channels,), float(scale))
    if not torch.isfinite(factor).all():
        raise ValueError(f"latent scale {scale!r} is not finite: the cache has a channel with zero variance")
    return factor.float().view(channels, 1, 1), shift.float().view(channels, 1, 1)
