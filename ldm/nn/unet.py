"""UNet of the LDM / Stable Diffusion family (Rombach et al. 2022; Ho et al. 2020; Dhariwal & Nichol 2021)."""

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.nn.attention import SpatialTransformer
from ldm.nn.autoencoder import Upsample
from ldm.nn.embeddings import MLPEmbedder, TimestepEmbedder, check_conditioning, concat_condition


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so its residual branch starts switched off."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


def _cross_only_levels(flags: Sequence[bool] | None, channel_mult: Sequence[int], attention_resolutions: Sequence[int],
                       context_dim: int | None) -> list[bool]:
    """only_cross_attention per level -> a flag for each level; raises where a flag could have no effect."""
    if flags is None:
        return [False] * len(channel_mult)
    flags = list(flags)
    if len(flags) != len(channel_mult) or not all(isinstance(f, bool) for f in flags):
        raise ValueError(f"only_cross_attention needs one bool per level of channel_mult {list(channel_mult)}, "
                         f"got {flags}")
    idle = [level for level, f in enumerate(flags) if f and 2**level not in set(attention_resolutions)]
    if idle:
        raise ValueError(f"only_cross_attention is set at levels {idle}, which have no attention "
                         f"(attention_resolutions {list(attention_resolutions)})")
    if any(flags) and context_dim is None:
        raise ValueError("only_cross_attention needs a context_dim to attend to")
    return flags


def _check_class_labels(labels: Tensor | None, num_classes: int | None, batch_size: int) -> None:
    if (labels is None) != (num_classes is None):
        raise ValueError(f"backbone built with num_classes={num_classes} but got class_labels="
                         f"{None if labels is None else tuple(labels.shape)}")
    if labels is not None and (labels.dtype not in (torch.int32, torch.int64) or labels.shape != (batch_size,)):
        raise ValueError(f"class_labels must be an integer tensor [{batch_size}], got {labels.dtype} "
                         f"{tuple(labels.shape)}")


class ResBlock(nn.Module):
    """ResNet block whose features are shifted by the (noise level + y) embedding (DDPM / ADM)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x [B, C_in, H, W], emb [B, emb_dim] -> [B, C_out, H, W]."""
        h = self.in_layers(x)
        h = h + rearrange(self.emb_proj(emb), "b c -> b c 1 1")
        return self.skip(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Strided 3x3 convolution halving the resolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class EmbedSequential(nn.Sequential):
    """Runs its layers in order, giving the embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            else:
                h = layer(h)
        return h


class UNet(nn.Module):
    """Diffusion UNet with ResNet blocks and cross-attention SpatialTransformers (LDM / Stable Diffusion).

    net(x_in [B, C, H, W], c_noise [B], context [B, L, context_dim] | None, y [B, y_dim] | None,
    concat [B, concat_channels, H, W] | None, class_labels [B] int | None) -> [B, C_out, H, W]. concat
    (inpainting, super-resolution, layout) joins x_in before the first convolution, so in_channels stays the
    latent's (SD's 9-channel inpainting UNet: in_channels 4, concat_channels 5). attention_resolutions are
    downsampling factors (1 = full resolution) at which a SpatialTransformer follows each ResBlock. Set exactly one
    of num_heads (fixed head count, SD1) or head_dim (fixed channels per head, SD2). All channel counts must be
    multiples of 32 (GroupNorm with 32 groups).

    num_classes: a learned table with that many rows; the row of each sample's class_labels entry is added to the
    noise-level embedding (SD's x4 upscaler: the noise level of its low-res image's augmentation, 0..999).
    only_cross_attention, one flag per level of channel_mult: that level's transformers attend to the context in
    both attentions (the x4 upscaler); the middle block keeps its self-attention.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        model_channels: int = 320,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4, 2, 1),
        num_heads: int | None = None,
        head_dim: int | None = None,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        y_dim: int | None = None,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        concat_channels: int = 0,
        num_classes: int | None = None,
        only_cross_attention: Sequence[bool] | None = None,
    ):
        super().__init__()
        if (num_heads is None) == (head_dim is None):
            raise ValueError(f"set exactly one of num_heads and head_dim, got {num_heads=} and {head_dim=}")
        if concat_channels < 0:
            raise ValueError(f"concat_channels must be >= 0, got {concat_channels}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
        cross_only = _cross_only_levels(only_cross_attention, channel_mult, attention_resolutions, context_dim)
        self.context_dim, self.y_dim, self.concat_channels = context_dim, y_dim, concat_channels
        self.gradient_checkpointing = gradient_checkpointing
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        out_channels = in_channels if out_channels is None else out_channels
        attention_resolutions = set(attention_resolutions)
        emb_dim = 4 * model_channels

        def attention(channels: int, only_cross: bool = False) -> SpatialTransformer:
            heads = num_heads if num_heads is not None else channels // head_dim
            return SpatialTransformer(channels, heads, transformer_depth, context_dim, dropout, only_cross)

        self.time_embed = TimestepEmbedder(emb_dim, freq_dim=model_channels)
        self.y_embed = MLPEmbedder(y_dim, emb_dim) if y_dim is not None else None
        self.num_classes = num_classes
        # No null row: the labels are a measured quantity (a noise level), not a class guidance could drop.
        self.class_embed = nn.Embedding(num_classes, emb_dim) if num_classes is not None else None

        # Encoder: each entry's output is kept as a skip connection for the decoder.
        self.input_blocks = nn.ModuleList([EmbedSequential(
            nn.Conv2d(in_channels + concat_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]
        ch, factor = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, mult * model_channels, emb_dim, dropout)]
                ch = mult * model_channels
                if factor in attention_resolutions:
                    layers.append(attention(ch, cross_only[level]))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                factor *= 2

        self.middle_block = EmbedSequential(
            ResBlock(ch, ch, emb_dim, dropout), attention(ch), ResBlock(ch, ch, emb_dim, dropout)
        )

        # Decoder: one more ResBlock per level than the encoder, each eating one skip connection.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), mult * model_channels, emb_dim, dropout)]
                ch = mult * model_channels
                if factor in attention_resolutions:
                    layers.append(attention(ch, cross_only[level]))
                if level != 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    factor //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        # Zero-init output: an untrained network predicts 0, a neutral start for every preconditioning.
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_init(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def _run(self, block: EmbedSequential, h: Tensor, emb: Tensor, context: Tensor | None) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x: Tensor, c_noise: Tensor, context: Tensor | None = None, y: Tensor | None = None,
                concat: Tensor | None = None, class_labels: Tensor | None = None) -> Tensor:
        check_conditioning(context, y, self.context_dim, self.y_dim, x.shape[0])
        _check_class_labels(class_labels, self.num_classes, x.shape[0])
        if x.shape[-2] % self.downsample_factor or x.shape[-1] % self.downsample_factor:
            raise ValueError(
                f"UNet input height and width must be multiples of {self.downsample_factor}, got {tuple(x.shape[-2:])}"
            )
        emb = self.time_embed(c_noise)  # [B, emb_dim]
        if self.y_embed is not None:
            emb = emb + self.y_embed(y)
        if self.class_embed is not None:
            emb = emb + self.class_embed(class_labels)

        skips = []
        h = concat_condition(x, concat, self.concat_channels)
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
