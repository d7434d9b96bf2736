"""Attention layers: multi-head attention, GEGLU feed-forward, transformer block, LDM SpatialTransformer."""

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, Eq. 1); cross-attention when context_dim is set."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x [B, N, dim], context [B, M, context_dim] (None: self-attention), mask bool broadcastable to
        [B, heads, N, M] with True where attention is allowed."""
        context = x if context is None else context
        q, k, v = (
            rearrange(t, "b n (heads d) -> b heads n d", heads=self.num_heads)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(rearrange(out, "b heads n d -> b n (heads d)"))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, Eq. 6): x W * GELU(x V)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer feed-forward with a GEGLU hidden layer, as in Stable Diffusion."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to context (if context_dim), GEGLU FF.

    only_cross_attention: the first attention attends to the context instead of to x, as the second does (SD's x4
    upscaler at its high-resolution levels, where attention over every pixel pair costs the most; LDM's
    disable_self_attn, diffusers' only_cross_attention)."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, dropout: float = 0.0,
                 only_cross_attention: bool = False):
        super().__init__()
        if only_cross_attention and context_dim is None:
            raise ValueError("only_cross_attention needs a context_dim to attend to")
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, context_dim if only_cross_attention else None, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim) if context_dim is not None else None
        self.attn2 = Attention(dim, num_heads, context_dim, dropout=dropout) if context_dim is not None else None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x [B, N, dim], context [B, M, context_dim]; mask applies to self-attention."""
        if self.only_cross_attention and mask is not None:
            raise ValueError("mask applies to self-attention; this block's first attention attends to the context")
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None, mask=mask)
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, cross-attending to context (LDM, Rombach et al. 2022, Sec. 3.3)."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        depth: int = 1,
        context_dim: int | None = None,
        dropout: float = 0.0,
        only_cross_attention: bool = False,
    ):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(
            TransformerBlock(channels, num_heads, context_dim, dropout, only_cross_attention) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels)
        # Zero-init: the block starts as the identity, so a fresh UNet behaves like one without attention.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x [B, C, H, W], context [B, M, context_dim] -> [B, C, H, W]."""
        height, width = x.shape[-2:]
        h = rearrange(self.norm(x), "b c h w -> b (h w) c")
        h = self.proj_in(h)
        for block in self.blocks:
            h = block(h, context)
        h = rearrange(self.proj_out(h), "b (h w) c -> b c h w", h=height, w=width)
        return x + h
