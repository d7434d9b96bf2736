"""Backbones (UNet, DiT) and their attention / embedding parts: shapes, references, parameter counts."""

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from ldm.nn.attention import Attention, SpatialTransformer
from ldm.nn.dit import DiT
from ldm.nn.embeddings import sincos_pos_embed_2d, timestep_embedding
from ldm.nn.unet import UNet

BACKBONE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model" / "backbone"


def tiny_unet(**kwargs) -> UNet:
    args = dict(
        in_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(2,), head_dim=16,
    )
    return UNet(**(args | kwargs))


def tiny_dit(**kwargs) -> DiT:
    return DiT(**(dict(in_channels=4, hidden_size=32, depth=2, num_heads=4) | kwargs))


def randomize(net: nn.Module) -> nn.Module:
    """Replace the zero inits by small random weights so every parameter influences the output."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return net


def count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def load_backbone(name: str, **overrides):
    cfg = OmegaConf.load(BACKBONE_CONFIGS / f"{name}.yaml")
    cfg.merge_with(overrides)
    return instantiate(cfg)


COND_CASES = {"uncond": (None, None), "context": (24, None), "y": (None, 8), "context+y": (24, 8)}


@pytest.mark.parametrize("make", [tiny_unet, tiny_dit], ids=["unet", "dit"])
@pytest.mark.parametrize("case", COND_CASES)
def test_backbone_shapes_and_gradients(make, case):
    context_dim, y_dim = COND_CASES[case]
    net = randomize(make(context_dim=context_dim, y_dim=y_dim, out_channels=3))
    x = torch.randn(2, 4, 8, 12, requires_grad=True)
    context = torch.randn(2, 5, context_dim, requires_grad=True) if context_dim else None
    y = torch.randn(2, y_dim, requires_grad=True) if y_dim else None
    out = net(x, torch.tensor([0.1, 3.0]), context=context, y=y)
    assert out.shape == (2, 3, 8, 12)
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for t in (x, context, y):
        assert t is None or t.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [tiny_unet, tiny_dit], ids=["unet", "dit"])
def test_untrained_backbone_outputs_zero(make):
    net = make(context_dim=24, y_dim=8)
    out = net(torch.randn(2, 4, 8, 8), torch.rand(2), context=torch.randn(2, 5, 24), y=torch.randn(2, 8))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("make", [tiny_unet, tiny_dit], ids=["unet", "dit"])
def test_gradient_checkpointing_gives_same_gradients(make):
    torch.manual_seed(0)
    plain = randomize(make(context_dim=24, y_dim=8))
    ckpt = randomize(make(context_dim=24, y_dim=8, gradient_checkpointing=True))
    inputs = (torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 5, 24), torch.randn(2, 8))
    grads = []
    for net in (plain, ckpt):
        net(*inputs).square().mean().backward()
        grads.append([p.grad for p in net.parameters()])
    for g_plain, g_ckpt in zip(*grads):
        torch.testing.assert_close(g_ckpt, g_plain)


@pytest.mark.parametrize("make", [tiny_unet, tiny_dit], ids=["unet", "dit"])
def test_backbone_rejects_mismatched_conditioning(make):
    net = make(context_dim=24)
    x, c_noise = torch.randn(2, 4, 8, 8), torch.rand(2)
    with pytest.raises(ValueError, match="context_dim"):
        net(x, c_noise)
    with pytest.raises(ValueError, match="y_dim"):
        net(x, c_noise, context=torch.randn(2, 5, 24), y=torch.randn(2, 8))
    with pytest.raises(ValueError, match="context must be"):
        net(x, c_noise, context=torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="multiples"):
        net(torch.randn(2, 4, 7, 8), c_noise, context=torch.randn(2, 5, 24))


def test_unet_needs_exactly_one_of_num_heads_and_head_dim():
    with pytest.raises(ValueError, match="exactly one"):
        tiny_unet(num_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="exactly one"):
        tiny_unet(head_dim=None)


def test_stable_diffusion_unet_config_has_sd_parameter_count():
    with torch.device("meta"):
        sd2 = load_backbone("unet_sd")
        sd1 = load_backbone("unet_sd", num_heads=8, head_dim=None, context_dim=768)
    # Stable Diffusion 2.x UNet: 865,910,724 parameters; 1.x: 859,520,964.
    assert count(sd2) == pytest.approx(865.9e6, rel=0.02)
    assert count(sd1) == pytest.approx(859.5e6, rel=0.02)


@pytest.mark.parametrize("size, paper_params", [("s", 33e6), ("b", 130e6), ("l", 458e6), ("xl", 675e6)])
def test_dit_configs_match_paper_parameter_counts(size, paper_params):
    cfg = OmegaConf.load(BACKBONE_CONFIGS / f"dit_{size}.yaml")
    with torch.device("meta"):
        net = load_backbone(f"dit_{size}", in_channels=4, y_dim=cfg.hidden_size)
    label_table = 1001 * cfg.hidden_size  # ImageNet classes + null class, held by ClassConditioner
    assert count(net) + label_table == pytest.approx(paper_params, rel=0.03)


def test_tiny_unet_config_builds_and_runs():
    net = load_backbone("unet_tiny", in_channels=4, context_dim=16)
    out = net(torch.randn(1, 4, 16, 16), torch.rand(1), context=torch.randn(1, 3, 16))
    assert out.shape == (1, 4, 16, 16)


def naive_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d)) v, written out."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(dim=-1) @ v


@pytest.mark.parametrize("cross, masked", [(False, False), (True, False), (False, True)])
def test_attention_matches_naive_softmax(cross, masked):
    torch.manual_seed(0)
    heads, dim, ctx_dim = 4, 32, 12
    attn = Attention(dim, heads, context_dim=ctx_dim if cross else None, qkv_bias=True)
    x = torch.randn(3, 7, dim)
    context = torch.randn(3, 5, ctx_dim) if cross else None
    mask = torch.ones(7, 7, dtype=torch.bool).tril() if masked else None
    kv_in = context if cross else x

    def split(t):  # [B, N, heads*d] -> [B, heads, N, d]
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    ref = naive_attention(split(attn.to_q(x)), split(attn.to_k(kv_in)), split(attn.to_v(kv_in)), mask)
    ref = attn.to_out(ref.transpose(1, 2).reshape(3, 7, dim))
    torch.testing.assert_close(attn(x, context, mask=mask), ref, atol=1e-5, rtol=1e-5)


def test_spatial_transformer_starts_as_identity():
    block = SpatialTransformer(32, num_heads=2, context_dim=8)
    x = torch.randn(2, 32, 4, 4)
    assert torch.equal(block(x, torch.randn(2, 3, 8)), x)


def test_timestep_embedding_formula():
    c_noise = torch.tensor([0.0, 0.5, 250.0])
    emb = timestep_embedding(c_noise, 8, max_period=10000.0)
    freqs = torch.tensor([10000.0 ** (-i / 4) for i in range(4)])
    expected = torch.cat([torch.cos(c_noise[:, None] * freqs), torch.sin(c_noise[:, None] * freqs)], dim=-1)
    torch.testing.assert_close(emb, expected)
    with pytest.raises(ValueError):
        timestep_embedding(torch.zeros(2, 1), 8)


def test_sincos_pos_embed_is_fixed_and_distinct():
    emb = sincos_pos_embed_2d(16, 3, 5)
    assert emb.shape == (15, 16)
    assert torch.cdist(emb, emb).add(torch.eye(15)).min() > 0.1  # every position is distinguishable
    torch.testing.assert_close(emb[0], torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1] * 2))
