"""KL-regularised convolutional autoencoder: the LDM first stage (Rombach et al. 2022, Sec. 3.1 and App. G)."""

from collections.abc import Sequence
from math import gcd

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x) = N(mean, diag(exp(logvar)))."""

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        if mean.shape != logvar.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} must have the same shape")
        self.mean = mean
        # The clamp keeps exp(logvar) finite early in training, when the encoder's outputs are arbitrary.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised sample z = mean + std * n, n ~ N(0, I) (Kingma & Welling 2014, eq. 10)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        """The posterior mode, which is its mean."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over all latent dims: 0.5 * sum(mean^2 + var - 1 - logvar)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (LDM), fewer for narrow layers so each group keeps at least 4 channels."""
    # One channel per group is instance norm, which erases each image's per-channel level (its colours):
    # on the 32 px shapes, ch=16 nets train ~2.5x slower with it than with groups of 4 channels.
    return nn.GroupNorm(gcd(channels, max(1, min(32, channels // 4))), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, conv3x3) twice, 1x1 projection on the skip path."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map, with a residual connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        qkv = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(h)


class PadDownsample(nn.Module):
    """Stride-2 3x3 conv; padding only right/bottom so an even H, W halves exactly (as in LDM)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv (avoids transposed-conv checkerboards)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: residual blocks, optional attention, optional resampling."""

    def __init__(
        self, in_channels: int, out_channels: int, num_blocks: int, attention: bool, resample: nn.Module, dropout: float
    ) -> None:
        super().__init__()
        channels = [in_channels] + [out_channels] * num_blocks
        self.blocks = nn.ModuleList(ResnetBlock(c_in, out_channels, dropout) for c_in in channels[:-1])
        self.attns = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks if attention else 0))
        self.resample = resample

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.attns:
                x = self.attns[i](x)
        return self.resample(x)


class MidBlock(nn.Module):
    """ResNet block, self-attention, ResNet block at the lowest resolution."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block1 = ResnetBlock(channels, channels, dropout)
        self.attn = AttnBlock(channels)
        self.block2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block2(self.attn(self.block1(x)))


def _check_arch(ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_levels: Sequence[int]) -> None:
    if ch < 1 or num_res_blocks < 1 or not ch_mult or min(ch_mult) < 1:
        raise ValueError(f"need ch, num_res_blocks >= 1 and positive ch_mult; got {ch=}, {ch_mult=}, {num_res_blocks=}")
    bad = [level for level in attn_levels if not 0 <= level < len(ch_mult)]
    if bad:
        raise ValueError(f"attn_levels {bad} out of range for {len(ch_mult)} levels (0 = input resolution)")


class Encoder(nn.Module):
    """Convolutional encoder x [B,C,H,W] -> moments [B, 2*z_channels, H/f, W/f], f = 2^(len(ch_mult)-1)."""

    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        z_channels: int = 4,
        attn_levels: Sequence[int] = (),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_arch(ch, ch_mult, num_res_blocks, attn_levels)
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        last = len(widths) - 1
        self.levels = nn.ModuleList(
            Level(
                in_channels=([ch] + widths)[i],
                out_channels=width,
                num_blocks=num_res_blocks,
                attention=i in attn_levels,
                resample=PadDownsample(width) if i < last else nn.Identity(),
                dropout=dropout,
            )
            for i, width in enumerate(widths)
        )
        self.mid = MidBlock(widths[-1], dropout)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Convolutional decoder z [B, z_channels, h, w] -> x [B, out_channels, h*f, w*f], mirroring the Encoder."""

    def __init__(
        self,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        z_channels: int = 4,
        attn_levels: Sequence[int] = (),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_arch(ch, ch_mult, num_res_blocks, attn_levels)
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], dropout)
        # Levels run from the lowest resolution up; each has one block more than the encoder's (as in LDM).
        order = list(reversed(range(len(widths))))
        self.levels = nn.ModuleList(
            Level(
                in_channels=widths[min(i + 1, len(widths) - 1)],
                out_channels=widths[i],
                num_blocks=num_res_blocks + 1,
                attention=i in attn_levels,
                resample=Upsample(widths[i]) if i > 0 else nn.Identity(),
                dropout=dropout,
            )
            for i in order
        )
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (LDM first stage): images in [-1, 1] <-> latents [B, embed_dim, H/f, W/f]."""

    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        z_channels: int = 4,
        embed_dim: int = 4,
        attn_levels: Sequence[int] = (),
        dropout: float = 0.0,
        scaling_factor: float | None = None,
    ) -> None:
        super().__init__()
        # The latent scale its diffusion models were trained with (SD: 0.18215), for weights imported with one;
        # `data.scale=auto` and on-the-fly training use it (None: ours, estimated from the data).
        self.scaling_factor = scaling_factor
        arch = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels)
        self.encoder = Encoder(in_channels=in_channels, attn_levels=tuple(attn_levels), dropout=dropout, **arch)
        self.decoder = Decoder(out_channels=in_channels, attn_levels=tuple(attn_levels), dropout=dropout, **arch)
        # 1x1 convs between the nets' z_channels and the latent width embed_dim (moments: mean and logvar).
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.in_channels = in_channels
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.latent_channels = embed_dim

    def encode(self, images: Tensor) -> DiagonalGaussian:
        """Posterior q(z|x) for images [B, C, H, W] in [-1, 1]; H and W must be multiples of the factor f."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"expected images [B, {self.in_channels}, H, W], got {tuple(images.shape)}")
        f = self.downsample_factor
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"H and W must be multiples of the downsampling factor {f}, got {tuple(images.shape)}")
        moments = self.quant_conv(self.encoder(images))
        # Posterior statistics in fp32: exp(logvar) and the KL lose too much precision in bf16.
        mean, logvar = moments.float().chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: Tensor) -> Tensor:
        """Images [B, C, h*f, w*f] (roughly in [-1, 1], not clamped) from latents [B, embed_dim, h, w]."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents [B, {self.latent_channels}, h, w], got {tuple(z.shape)}")
        # Posterior samples are fp32; match the weights so a model cast to bf16 decodes them too.
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))

    def forward(
        self, images: Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct images through a posterior sample (or its mode); returns (recon, posterior)."""
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    @property
    def last_layer(self) -> Tensor:
        """Weight of the decoder's final conv: where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight
