"""Embeddings of the noise level, class labels and patch positions, shared by the backbones."""

import math

import torch
from einops import rearrange
from torch import Tensor, nn


def timestep_embedding(c_noise: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of the noise level c_noise [B] -> [B, dim] (Vaswani et al. 2017, Sec. 3.5)."""
    if c_noise.ndim != 1:
        raise ValueError(f"c_noise must have shape [B], got {tuple(c_noise.shape)}")
    if dim % 2:
        raise ValueError(f"timestep embedding dim must be even, got {dim}")
    half = dim // 2
    # Geometric frequencies from 1 down to 1/max_period; c_noise is a float, not an integer step.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=c_noise.device) / half)
    args = rearrange(c_noise.float(), "b -> b 1") * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(dim: int, height: int, width: int, device: torch.device | None = None) -> Tensor:
    """Fixed 2-D sine-cosine position embedding [height*width, dim] (MAE / DiT): half the channels per axis."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )

    def axis(pos: Tensor) -> Tensor:  # [h, w] -> [h*w, dim/2]
        args = rearrange(pos, "h w -> (h w) 1") * omega
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)

    return torch.cat([axis(rows), axis(cols)], dim=-1)


class MLPEmbedder(nn.Module):
    """Two-layer MLP (Linear, SiLU, Linear) that maps a conditioning vector to the embedding width."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x.to(self.mlp[0].weight.dtype))


class TimestepEmbedder(nn.Module):
    """Noise-level embedding: sinusoidal features of c_noise followed by an MLP (DDPM / LDM / DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = MLPEmbedder(freq_dim, dim)

    def forward(self, c_noise: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(c_noise, self.freq_dim, self.max_period))


class LabelEmbedding(nn.Module):
    """Learned class embedding with one extra row, index num_classes, for the null class of CFG."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_index(self) -> int:
        return self.num_classes

    def forward(self, labels: Tensor) -> Tensor:
        if labels.dtype not in (torch.int32, torch.int64) or labels.ndim != 1:
            raise ValueError(f"labels must be an integer tensor [B], got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() > self.null_index):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}) (or {self.null_index} for the null class), "
                f"got range [{labels.min().item()}, {labels.max().item()}]"
            )
        return self.table(labels.to(self.table.weight.device))


def check_conditioning(
    context: Tensor | None, y: Tensor | None, context_dim: int | None, y_dim: int | None, batch_size: int
) -> None:
    """Raise if the conditioning a backbone receives does not match the one it was built for."""
    if (context is None) != (context_dim is None):
        raise ValueError(
            f"backbone built with context_dim={context_dim} but got context="
            f"{None if context is None else tuple(context.shape)}; set the backbone's context_dim to the "
            "conditioner's (conditioner.dims['context_dim'])"
        )
    if (y is None) != (y_dim is None):
        raise ValueError(
            f"backbone built with y_dim={y_dim} but got y={None if y is None else tuple(y.shape)}; "
            "set the backbone's y_dim to the conditioner's (conditioner.dims['y_dim'])"
        )
    if context is not None and (context.ndim != 3 or context.shape[0] != batch_size or context.shape[2] != context_dim):
        raise ValueError(f"context must be [{batch_size}, L, {context_dim}], got {tuple(context.shape)}")
    if y is not None and y.shape != (batch_size, y_dim):
        raise ValueError(f"y must be [{batch_size}, {y_dim}], got {tuple(y.shape)}")


def concat_condition(x: Tensor, concat: Tensor | None, concat_channels: int) -> Tensor:
    """Concatenation conditioning (LDM, Rombach et al. 2022, Sec. 3.3): x [B, C, H, W] and an image-shaped
    condition [B, concat_channels, H, W] (masked-image latent + mask, low-res image, embedded map) as one input."""
    if (concat is None) != (concat_channels == 0):
        raise ValueError(
            f"backbone built with concat_channels={concat_channels} but got concat="
            f"{None if concat is None else tuple(concat.shape)}; set the backbone's concat_channels to the "
            "conditioner's (conditioner.dims['concat_channels'])"
        )
    if concat is None:
        return x
    want = (x.shape[0], concat_channels, *x.shape[2:])
    if tuple(concat.shape) != want:
        raise ValueError(f"concat must be {list(want)} (batch, concat_channels, latent size), got {list(concat.shape)}")
    return torch.cat([x, concat.to(x.dtype)], dim=1)
