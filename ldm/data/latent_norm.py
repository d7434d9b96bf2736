"""Latent normalisation z_n = (z - shift) * scale per channel: diffusion runs on latents of about unit variance
(Rombach et al. 2022, sec. 4.3.2). Scale and shift are data (a cache's statistics, or a fixed number), kept in
buffers so that a checkpoint carries them; the cache reader and the diffusion module share this one class."""
import torch
from torch import nn

SCALES = ("auto", "per_channel", "global_std")


class LatentNorm(nn.Module):
    """Per-channel scale and shift, buffers [C, 1, 1] that broadcast over latents [..., C, h, w]."""

    def __init__(self, channels: int, scale: float = 1.0):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"a fixed latent scale must be positive, got {scale}")
        self.register_buffer("scale", torch.full((channels, 1, 1), float(scale)))
        self.register_buffer("shift", torch.zeros(channels, 1, 1))

    @classmethod
    def from_stats(cls, stats: dict, scale: str | float, channels: int, first_stage_scale: float | None = None
                   ) -> "LatentNorm":
        """From a cache's exact statistics. per_channel: shift = E[z_c], scale = 1 / std(z_c); global_std: shift = 0,
        scale = 1 / std(z) over all channels; a number: shift = 0 and that scale (e.g. SD's 0.18215); auto: the first
        stage's own scaling factor when it has one (imported SD weights), else per_channel."""
        if scale == "auto":
            scale = first_stage_scale if first_stage_scale is not None else "per_channel"
        if not isinstance(scale, str):
            return cls(channels, scale)
        norm = cls(channels)
        if scale == "per_channel":
            norm.set(1.0 / torch.tensor(stats["std"]), torch.tensor(stats["mean"]))
        elif scale == "global_std":
            norm.set(torch.full((channels,), 1.0 / stats["std_all"]), torch.zeros(channels))
        else:
            raise ValueError(f"scale must be one of {SCALES} or a positive number, got {scale!r}")
        return norm

    @torch.no_grad()
    def set(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Take the values of `scale` and `shift` ([C] or [C, 1, 1]) in place."""
        if not torch.isfinite(scale).all():
            raise ValueError("latent scale is not finite: the cache has a channel with zero variance")
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.shift.copy_(shift.reshape(self.shift.shape))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """First-stage latents -> the diffusion model's space."""
        return (z - self.shift.to(z)) * self.scale.to(z)

    def unnormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latents -> the first stage's space, for decoding."""
        return z / self.scale.to(z) + self.shift.to(z)
