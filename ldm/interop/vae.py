"""Stable Diffusion's KL autoencoder <-> ours (ldm.nn.autoencoder.AutoencoderKL).

Two layouts of their tensors: "diffusers" (AutoencoderKL state dict) and "single_file" (the original LDM / SD
checkpoint names, without the "first_stage_model." prefix). The networks match layer for layer; only names differ,
and our attention fuses q, k, v into one 1x1 conv where diffusers has three linear layers.
"""

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ldm.interop.keymap import KeyMap, key
from ldm.interop.settings import block_lists, our_args, read_settings
from ldm.nn.autoencoder import AutoencoderKL, group_norm
from ldm.utils.errors import ConfigError

LAYOUTS = ("diffusers", "single_file")

_WHAT = "diffusers AutoencoderKL config"
# Settings we read (with diffusers' defaults for a config.json that omits them).
_USED = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}
# Settings our network has no counterpart for: they must hold the value it implies.
_FIXED = {
    "act_fn": ("silu",),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
    "mid_block_add_attention": (True,),
    "shift_factor": (None,),  # SD3 / Flux latents: z = (x - shift) * scale is not our formulation
    "latents_mean": (None,),  # SDXL-style per-channel statistics (Playground, ...)
    "latents_std": (None,),
}
# sample_size only sets diffusers' tiling tile size; force_upcast only its fp16 decoding.
_IGNORED = frozenset({"sample_size", "force_upcast"})


def _block_attention(types: list[str], plain: str, attn: str, key_name: str) -> list[bool]:
    bad = [t for t in types if t not in (plain, attn)]
    if bad:
        raise ConfigError(f"{_WHAT}: {key_name} {bad} not supported (only {plain} and {attn})")
    return [t == attn for t in types]


def vae_from_diffusers_config(config: Mapping[str, Any]) -> tuple[dict, float]:
    """diffusers AutoencoderKL config.json dict -> (our AutoencoderKL net config, latent scaling factor)."""
    c = read_settings(config, used=_USED, fixed=_FIXED, ignored=_IGNORED, what=_WHAT)
    widths, down, up = block_lists(c, _WHAT)
    ch = widths[0]
    if c["in_channels"] != c["out_channels"]:
        raise ConfigError(f"{_WHAT}: in_channels {c['in_channels']} != out_channels {c['out_channels']}; ours "
                          "reconstructs its input")
    attn_down = _block_attention(down, "DownEncoderBlock2D", "AttnDownEncoderBlock2D", "down_block_types")
    # up_block_types run from the lowest resolution up.
    attn_up = _block_attention(up, "UpDecoderBlock2D", "AttnUpDecoderBlock2D", "up_block_types")[::-1]
    if attn_down != attn_up:
        raise ConfigError(f"{_WHAT}: attention in down_block_types {down} and up_block_types {up} must mirror")
    groups = {w: group_norm(w).num_groups for w in widths}
    if any(g != c["norm_num_groups"] for g in groups.values()):
        raise ConfigError(f"{_WHAT}: norm_num_groups={c['norm_num_groups']} but our GroupNorm uses {groups} "
                          "groups per width (32 from 128 channels up)")
    net_cfg = {
        "_target_": "ldm.nn.autoencoder.AutoencoderKL",
        "in_channels": c["in_channels"],
        "ch": ch,
        "ch_mult": [w // ch for w in widths],
        "num_res_blocks": c["layers_per_block"],
        "z_channels": c["latent_channels"],
        "embed_dim": c["latent_channels"],
        "attn_levels": [i for i, a in enumerate(attn_down) if a],
        "dropout": 0.0,
    }
    return net_cfg, float(c["scaling_factor"])


def vae_to_diffusers_config(net_cfg: Mapping[str, Any], scaling_factor: float, *, sample_size: int = 512) -> dict:
    """Our AutoencoderKL net config -> a diffusers AutoencoderKL config.json dict building the same network, recording
    `scaling_factor` (the net config's own scaling_factor is not read: exports may fold a different one in)."""
    a = our_args(net_cfg, AutoencoderKL, "autoencoder config")
    widths = [a["ch"] * m for m in a["ch_mult"]]
    if a["embed_dim"] != a["z_channels"]:
        raise ConfigError(f"autoencoder config: embed_dim {a['embed_dim']} != z_channels {a['z_channels']}; "
                          "diffusers ties them (latent_channels)")
    groups = {group_norm(w).num_groups for w in widths}
    if len(groups) != 1:
        raise ConfigError(f"autoencoder config: widths {widths} get GroupNorm group counts {sorted(groups)}; "
                          "diffusers uses one norm_num_groups for all")
    attn = [i in a["attn_levels"] for i in range(len(widths))]
    # dropout is a training setting only; the exported network is the same at inference.
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": a["in_channels"],
        "out_channels": a["in_channels"],
        "down_block_types": ["AttnDownEncoderBlock2D" if x else "DownEncoderBlock2D" for x in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if x else "UpDecoderBlock2D" for x in reversed(attn)],
        "block_out_channels": widths,
        "layers_per_block": a["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": a["z_channels"],
        "norm_num_groups": groups.pop(),
        "sample_size": sample_size,
        "scaling_factor": float(scaling_factor),
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }


# Their names for our sub-modules: (diffusers, single_file).
_NAMES = {
    "down": ("down_blocks", "down"),
    "blocks": ("resnets", "block"),
    "attns": ("attentions", "attn"),
    "downsample": ("downsamplers.0.conv", "downsample.conv"),
    "upsample": ("upsamplers.0.conv", "upsample.conv"),
    "mid": ("mid_block", "mid"),
    "block1": ("resnets.0", "block_1"),
    "attn": ("attentions.0", "attn_1"),
    "block2": ("resnets.1", "block_2"),
    "skip": ("conv_shortcut", "nin_shortcut"),
    "norm": ("group_norm", "norm"),
    "qkv": (("to_q", "to_k", "to_v"), ("q", "k", "v")),
    "proj_out": ("to_out.0", "proj_out"),
    "norm_out": ("conv_norm_out", "norm_out"),
    "attn_form": ("linear", "conv1x1"),  # diffusers' attention uses linear layers, LDM's 1x1 convs as ours
}


def _module(ours: str, theirs: str | tuple[str, ...], form: str | None = None) -> KeyMap:
    theirs = (theirs,) if isinstance(theirs, str) else theirs
    return {f"{ours}.{p}": key(*(f"{t}.{p}" for t in theirs), form=form) for p in ("weight", "bias")}


def _resnet(ours: str, theirs: str, has_skip: bool, n: dict) -> KeyMap:
    table = {}
    for name in ("norm1", "conv1", "norm2", "conv2"):
        table |= _module(f"{ours}.{name}", f"{theirs}.{name}")
    if has_skip:
        table |= _module(f"{ours}.skip", f"{theirs}.{n['skip']}")
    return table


def _attention(ours: str, theirs: str, n: dict) -> KeyMap:
    return (_module(f"{ours}.norm", f"{theirs}.{n['norm']}")
            | _module(f"{ours}.qkv", tuple(f"{theirs}.{q}" for q in n["qkv"]), n["attn_form"])
            | _module(f"{ours}.proj_out", f"{theirs}.{n['proj_out']}", n["attn_form"]))


def _mid(ours: str, theirs: str, n: dict) -> KeyMap:
    return (_resnet(f"{ours}.block1", f"{theirs}.{n['block1']}", False, n)
            | _attention(f"{ours}.attn", f"{theirs}.{n['attn']}", n)
            | _resnet(f"{ours}.block2", f"{theirs}.{n['block2']}", False, n))


def vae_keymap(net_cfg: Mapping[str, Any], layout: str) -> KeyMap:
    """Key map {our AutoencoderKL state-dict name: theirs} for layout "diffusers" or "single_file" (LDM names)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"autoencoder layout must be one of {LAYOUTS}, got {layout!r}")
    a = our_args(net_cfg, AutoencoderKL, "autoencoder config")
    sf = layout == "single_file"
    n = {role: names[sf] for role, names in _NAMES.items()}
    widths = [a["ch"] * m for m in a["ch_mult"]]
    levels, blocks, attn_levels = len(widths), a["num_res_blocks"], set(a["attn_levels"])
    table = {}
    for part in ("encoder", "decoder"):
        table |= _module(f"{part}.conv_in", f"{part}.conv_in")
        table |= _mid(f"{part}.mid", f"{part}.{n['mid']}", n)
        table |= _module(f"{part}.norm_out", f"{part}.{n['norm_out']}")
        table |= _module(f"{part}.conv_out", f"{part}.conv_out")
    for i, width in enumerate(widths):
        theirs = f"encoder.{n['down']}.{i}"
        c_in = ([a["ch"]] + widths)[i]
        for j in range(blocks):
            has_skip = (c_in if j == 0 else width) != width
            table |= _resnet(f"encoder.levels.{i}.blocks.{j}", f"{theirs}.{n['blocks']}.{j}", has_skip, n)
            if i in attn_levels:
                table |= _attention(f"encoder.levels.{i}.attns.{j}", f"{theirs}.{n['attns']}.{j}", n)
        if i < levels - 1:
            table |= _module(f"encoder.levels.{i}.resample.conv", f"{theirs}.{n['downsample']}")
    # Our decoder levels, like diffusers' up_blocks, run from the lowest resolution up; LDM's up.{i} is indexed
    # by resolution (up.0 = full resolution).
    for j, i in enumerate(reversed(range(levels))):
        theirs = f"decoder.up.{i}" if sf else f"decoder.up_blocks.{j}"
        c_in = widths[min(i + 1, levels - 1)]
        for b in range(blocks + 1):
            has_skip = (c_in if b == 0 else widths[i]) != widths[i]
            table |= _resnet(f"decoder.levels.{j}.blocks.{b}", f"{theirs}.{n['blocks']}.{b}", has_skip, n)
            if i in attn_levels:
                table |= _attention(f"decoder.levels.{j}.attns.{b}", f"{theirs}.{n['attns']}.{b}", n)
        if i > 0:
            table |= _module(f"decoder.levels.{j}.resample.conv", f"{theirs}.{n['upsample']}")
    table |= _module("quant_conv", "quant_conv") | _module("post_quant_conv", "post_quant_conv")
    return table


def _count(state: Mapping[str, Tensor], prefix: str) -> int:
    """How many consecutive indices i have tensors named prefix{i}.*"""
    i = 0
    while any(name.startswith(f"{prefix}{i}.") for name in state):
        i += 1
    return i


def vae_from_single_file(state: Mapping[str, Tensor]) -> dict:
    """Our AutoencoderKL net config inferred from the tensor shapes of an LDM / SD single-file VAE state dict
    (the "first_stage_model." prefix removed)."""
    if "encoder.conv_in.weight" not in state or "quant_conv.weight" not in state:
        raise ConfigError("single-file VAE: no encoder.conv_in.weight / quant_conv.weight; is it an LDM KL "
                          "autoencoder with the 'first_stage_model.' prefix removed?")
    ch, in_channels = state["encoder.conv_in.weight"].shape[:2]
    levels = _count(state, "encoder.down.")
    blocks = _count(state, "encoder.down.0.block.")
    if levels == 0 or blocks == 0:
        raise ConfigError("single-file VAE: no encoder.down.{i}.block.{j} tensors")
    widths = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    if any(w % ch for w in widths):
        raise ConfigError(f"single-file VAE: level widths {widths} are not multiples of conv_in's {ch}")
    return {
        "_target_": "ldm.nn.autoencoder.AutoencoderKL",
        "in_channels": int(in_channels),
        "ch": int(ch),
        "ch_mult": [int(w // ch) for w in widths],
        "num_res_blocks": blocks,
        "z_channels": int(state["encoder.conv_out.weight"].shape[0] // 2),
        "embed_dim": int(state["quant_conv.weight"].shape[0] // 2),
        "attn_levels": [i for i in range(levels) if f"encoder.down.{i}.attn.0.norm.weight" in state],
        "dropout": 0.0,
    }
