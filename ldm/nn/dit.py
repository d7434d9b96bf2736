"""Diffusion Transformer with adaLN-Zero blocks (DiT, Peebles & Xie 2023), optionally cross-attending to text."""

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.nn.attention import Attention
from ldm.nn.embeddings import TimestepEmbedder, check_conditioning, concat_condition, sincos_pos_embed_2d


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Adaptive layer-norm modulation x * (1 + scale) + shift (DiT Sec. 3.2); x [B, N, D], shift/scale [B, D]."""
    return x * (1 + rearrange(scale, "b d -> b 1 d")) + rearrange(shift, "b d -> b 1 d")


class Mlp(nn.Module):
    """Transformer MLP with tanh-approximated GELU, as in ViT / DiT."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning (DiT Fig. 3), plus cross-attention to context (PixArt-alpha style)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6) if context_dim is not None else None
        self.cross_attn = (
            Attention(hidden_size, num_heads, context_dim, qkv_bias=True) if context_dim is not None else None
        )
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None = None) -> Tensor:
        """x [B, N, D] tokens, c [B, D] noise-level (+ y) embedding, context [B, L, context_dim]."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + rearrange(gate_msa, "b d -> b 1 d") * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context)
        return x + rearrange(gate_mlp, "b d -> b 1 d") * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated layer norm and linear map from tokens to patches of the output."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie 2023): patchify, adaLN-Zero blocks, unpatchify.

    net(x_in [B, C, H, W], c_noise [B], context [B, L, context_dim] | None, y [B, y_dim] | None) -> [B, C_out, H, W].
    y (e.g. a class embedding) is projected and added to the noise-level embedding; context (text tokens)
    is cross-attended in every block; concat [B, concat_channels, H, W] (an image-shaped condition) is patchified
    together with x_in. The position embedding is fixed and built for the input's grid.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        context_dim: int | None = None,
        y_dim: int | None = None,
        gradient_checkpointing: bool = False,
        concat_channels: int = 0,
    ):
        super().__init__()
        if concat_channels < 0:
            raise ValueError(f"concat_channels must be >= 0, got {concat_channels}")
        self.patch_size, self.concat_channels = patch_size, concat_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.context_dim, self.y_dim = context_dim, y_dim
        self.gradient_checkpointing = gradient_checkpointing

        self.x_embedder = nn.Conv2d(in_channels + concat_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_dim=256)
        self.y_embedder = nn.Linear(y_dim, hidden_size) if y_dim is not None else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT initialisation: Xavier linears, then adaLN-Zero (every residual branch and the output start at 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # The patch embedding is a linear map of flattened patches: Xavier on its [D, C*p*p] view.
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for layer in (self.t_embedder.mlp.mlp[0], self.t_embedder.mlp.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        zeroed = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for block in self.blocks:
            zeroed.append(block.adaLN_modulation[-1])
            if block.cross_attn is not None:
                zeroed.append(block.cross_attn.to_out[0])  # text enters as a zero residual (PixArt-alpha)
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c_noise: Tensor, context: Tensor | None = None, y: Tensor | None = None,
                concat: Tensor | None = None) -> Tensor:
        check_conditioning(context, y, self.context_dim, self.y_dim, x.shape[0])
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"DiT input height and width must be multiples of patch_size={p}, got {x.shape[-2:]}")
        x = self.x_embedder(concat_condition(x, concat, self.concat_channels))  # [B, D, H/p, W/p]
        grid_h, grid_w = x.shape[-2:]
        x = rearrange(x, "b d h w -> b (h w) d")
        x = x + sincos_pos_embed_2d(x.shape[-1], grid_h, grid_w, device=x.device).to(x.dtype)
        c = self.t_embedder(c_noise)  # [B, D]
        if self.y_embedder is not None:
            c = c + self.y_embedder(y.to(c.dtype))
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, context, use_reentrant=False)
            else:
                x = block(x, c, context)
        x = self.final_layer(x, c)  # [B, N, p*p*C_out]
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=grid_h, w=grid_w, p=p, q=p)
