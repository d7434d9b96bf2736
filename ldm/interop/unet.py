"""Stable Diffusion's UNet <-> ours (ldm.nn.unet.UNet).

Two layouts of their tensors: "diffusers" (UNet2DConditionModel state dict) and "single_file" (the original LDM / SD
names, without the "model.diffusion_model." prefix). The networks match layer for layer. SpatialTransformer
proj_in / proj_out are linear layers in ours, in SD 2.x files and in diffusers with use_linear_projection=True, but
1x1 convolutions in SD 1.x files and diffusers' default; importing accepts either form, `proj_form` picks the one
written on export.

Heads: our UNet has a fixed head count (num_heads, SD 1.x) or fixed channels per head (head_dim, SD 2.x). diffusers'
`attention_head_dim` is, for historical reasons, the number of heads (per level when a list), and its
`num_attention_heads` must stay unset.

SD's x4 upscaler (StableDiffusionUpscalePipeline) maps too: its 7 inputs are the latent's 4 and the low-res
image's 3 (our concat_channels), its `num_class_embeds` table (the low-res image's noise level, passed as
class_labels) is our num_classes, and its `only_cross_attention` levels are ours. Our configs carry those two keys
only where set, so every other config reads and writes as before.
"""

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ldm.interop.keymap import KeyMap, key
from ldm.interop.settings import block_lists, our_args, read_settings, uniform
from ldm.nn.unet import UNet
from ldm.utils.errors import ConfigError

LAYOUTS = ("diffusers", "single_file")

_WHAT = "diffusers UNet2DConditionModel config"
# Settings we read (with diffusers' defaults for a config.json that omits them).
_USED = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "dropout": 0.0,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
}
# Settings our network has no counterpart for: they must hold the value it implies.
_FIXED = {
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),  # our timestep embedding is [cos, sin]
    "freq_shift": (0,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "act_fn": ("silu",),
    "norm_num_groups": (32,),
    "norm_eps": (1e-5,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),  # with num_class_embeds: a plain table (the upscaler's); others are MLPs
    "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,),
    "addition_embed_type": (None,),  # SDXL's "text_time" added embeddings
    "addition_time_embed_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}
# sample_size is the pipeline's default latent size; use_linear_projection only the proj_in/out tensor form (both
# load); upcast_attention only fp16 softmax precision; addition_embed_type_num_heads is unused without
# addition_embed_type.
_IGNORED = frozenset({"sample_size", "use_linear_projection", "upcast_attention", "addition_embed_type_num_heads"})


def _attention_per_level(down: list[str], up: list[str]) -> list[bool]:
    for name, types, options in (("down_block_types", down, ("CrossAttnDownBlock2D", "DownBlock2D")),
                                 ("up_block_types", up, ("CrossAttnUpBlock2D", "UpBlock2D"))):
        bad = [t for t in types if t not in options]
        if bad:
            raise ConfigError(f"{_WHAT}: {name} {bad} not supported (only {' and '.join(options)})")
    attn = [t.startswith("CrossAttn") for t in down]
    if attn != [t.startswith("CrossAttn") for t in reversed(up)]:
        raise ConfigError(f"{_WHAT}: cross-attention in down_block_types {down} and up_block_types {up} must mirror")
    return attn


def _heads(heads_cfg: Any, widths: list[int], levels: list[int]) -> dict:
    """diffusers' per-level head counts at the levels with attention -> {"num_heads"} or {"head_dim"}."""
    heads = list(heads_cfg) if isinstance(heads_cfg, (list, tuple)) else [heads_cfg] * len(widths)
    if len(heads) != len(widths):
        raise ConfigError(f"{_WHAT}: attention_head_dim {heads_cfg} needs one entry per block_out_channels {widths}")
    used = {heads[i] for i in levels}
    if any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in used):
        raise ConfigError(f"{_WHAT}: attention_head_dim {heads_cfg} needs positive head counts where blocks attend")
    if len(used) == 1:
        return {"num_heads": used.pop(), "head_dim": None}
    dims = {widths[i] // heads[i] if widths[i] % heads[i] == 0 else None for i in levels}
    if len(dims) == 1 and None not in dims:
        return {"num_heads": None, "head_dim": dims.pop()}
    raise ConfigError(f"{_WHAT}: attention_head_dim {heads_cfg} (heads per level) gives neither a fixed head count "
                      f"nor a fixed head width over block_out_channels {widths}")


def _input_channels(total: int, out_channels: int) -> dict:
    """Their input width -> ours: inputs beyond the output's are concatenated conditions (SD inpainting: 4 latent
    channels + 5 for the masked image's latent and the mask)."""
    concat = max(0, total - out_channels)
    return {"in_channels": total - concat, "out_channels": out_channels, "concat_channels": concat}


def _cross_only(c: Mapping[str, Any], attn: list[bool]) -> list[bool]:
    """diffusers' only_cross_attention (one bool, or one per down block) -> ours per level; False where a level has
    no attention, since diffusers ignores it there (the upscaler sets it on its attention-free first level)."""
    flags, mid = c["only_cross_attention"], c["mid_block_only_cross_attention"]
    if isinstance(flags, bool):
        mid = flags if mid is None else mid  # diffusers: a single bool also applies to the middle block
        flags = [flags] * len(attn)
    flags = list(flags)
    if len(flags) != len(attn) or not all(isinstance(f, bool) for f in flags):
        raise ConfigError(f"{_WHAT}: only_cross_attention {c['only_cross_attention']} needs one bool per block")
    if mid:
        raise ConfigError(f"{_WHAT}: only_cross_attention / mid_block_only_cross_attention turn off the middle "
                          "block's self-attention; ours always keeps it")
    return [f and a for f, a in zip(flags, attn)]


def _optional(num_classes: int | None, cross_only: list[bool]) -> dict:
    """The keys of our config that only networks using them carry (the x4 upscaler's)."""
    return ({"num_classes": num_classes} if num_classes is not None else {}) | (
        {"only_cross_attention": cross_only} if any(cross_only) else {})


def unet_from_diffusers_config(config: Mapping[str, Any]) -> dict:
    """diffusers UNet2DConditionModel config.json dict -> our UNet net config."""
    c = read_settings(config, used=_USED, fixed=_FIXED, ignored=_IGNORED, what=_WHAT)
    widths, down, up = block_lists(c, _WHAT)
    ch = widths[0]
    attn = _attention_per_level(down, up)
    # The middle block always attends, with the last level's heads.
    heads = _heads(c["attention_head_dim"], widths, [i for i, a in enumerate(attn) if a] + [len(widths) - 1])
    return {
        "_target_": "ldm.nn.unet.UNet",
        **_input_channels(c["in_channels"], c["out_channels"]),
        "model_channels": ch,
        "channel_mult": [w // ch for w in widths],
        "num_res_blocks": uniform(c["layers_per_block"], "layers_per_block", _WHAT),
        "attention_resolutions": [2**i for i, a in reversed(list(enumerate(attn))) if a],  # LDM order: 4, 2, 1
        **heads,
        "transformer_depth": uniform(c["transformer_layers_per_block"], "transformer_layers_per_block", _WHAT),
        "context_dim": uniform(c["cross_attention_dim"], "cross_attention_dim", _WHAT),
        "y_dim": None,
        "dropout": float(c["dropout"]),
        "gradient_checkpointing": False,
        **_optional(c["num_class_embeds"], _cross_only(c, attn)),
    }


def _levels_with_attention(a: dict, what: str) -> list[bool]:
    levels = len(a["channel_mult"])
    factors = set(a["attention_resolutions"])
    bad = sorted(factors - {2**i for i in range(levels)})
    if bad:
        raise ConfigError(f"{what}: attention_resolutions {bad} match no level of channel_mult "
                          f"{list(a['channel_mult'])} (factors 1, 2, 4, ...)")
    return [2**i in factors for i in range(levels)]


def unet_to_diffusers_config(net_cfg: Mapping[str, Any], *, sample_size: int = 64,
                             upcast_attention: bool = False) -> dict:
    """Our UNet net config -> a diffusers UNet2DConditionModel config.json dict building the same network
    (use_linear_projection=True: proj_in / proj_out as linear layers, as ours)."""
    what = "UNet config"
    a = our_args(net_cfg, UNet, what)
    if a["y_dim"] is not None:
        raise ConfigError(f"{what}: y_dim={a['y_dim']} (vector conditioning) has no diffusers UNet2DConditionModel "
                          "counterpart in this exporter")
    if a["context_dim"] is None:
        raise ConfigError(f"{what}: context_dim is null; diffusers' UNet2DConditionModel always cross-attends")
    widths = [a["model_channels"] * m for m in a["channel_mult"]]
    attn = _levels_with_attention(a, what)
    if a["num_heads"] is not None:
        heads: int | list[int] = a["num_heads"]
    else:
        # Levels without attention get any valid count; diffusers ignores it there.
        heads = [max(1, w // a["head_dim"]) for w in widths]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": a["in_channels"] + a["concat_channels"],  # diffusers concatenates conditions to the input
        "out_channels": a["in_channels"] if a["out_channels"] is None else a["out_channels"],
        "down_block_types": ["CrossAttnDownBlock2D" if x else "DownBlock2D" for x in attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if x else "UpBlock2D" for x in reversed(attn)],
        "block_out_channels": widths,
        "layers_per_block": a["num_res_blocks"],
        "transformer_layers_per_block": a["transformer_depth"],
        "cross_attention_dim": a["context_dim"],
        "attention_head_dim": heads,
        "use_linear_projection": True,
        "upcast_attention": upcast_attention,
        "dropout": a["dropout"],
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "center_input_sample": False,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        **({"num_class_embeds": a["num_classes"]} if a["num_classes"] is not None else {}),
        # a list leaves diffusers' middle block self-attending, as ours
        **({"only_cross_attention": list(a["only_cross_attention"])} if a["only_cross_attention"] else {}),
    }


def _module(ours: str, theirs: str, form: str | None = None, params: tuple[str, ...] = ("weight", "bias")) -> KeyMap:
    return {f"{ours}.{p}": key(f"{theirs}.{p}", form=form) for p in params}


def _resblock(ours: str, theirs: str, has_skip: bool, sf: bool) -> KeyMap:
    names = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_proj.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip": "conv_shortcut"}
    if sf:  # LDM's names are ours but for two
        names = {o: o for o in names} | {"emb_proj.1": "emb_layers.1", "skip": "skip_connection"}
    table = {}
    for o, t in names.items():
        if o != "skip" or has_skip:
            table |= _module(f"{ours}.{o}", f"{theirs}.{t}")
    return table


def _transformer(ours: str, theirs: str, depth: int, cross: bool, proj_form: str) -> KeyMap:
    # Inside a transformer block both layouts use our names.
    inner = ["norm1", "attn1.to_out.0", "norm3", "ff.net.0.proj", "ff.net.2"]
    inner += ["norm2", "attn2.to_out.0"] if cross else []
    qkv = [f"{a}.{p}" for a in (["attn1", "attn2"] if cross else ["attn1"]) for p in ("to_q", "to_k", "to_v")]
    table = _module(f"{ours}.norm", f"{theirs}.norm")
    table |= _module(f"{ours}.proj_in", f"{theirs}.proj_in", proj_form)
    table |= _module(f"{ours}.proj_out", f"{theirs}.proj_out", proj_form)
    for d in range(depth):
        block, their_block = f"{ours}.blocks.{d}", f"{theirs}.transformer_blocks.{d}"
        for name in inner:
            table |= _module(f"{block}.{name}", f"{their_block}.{name}")
        for name in qkv:  # bias-free projections
            table |= _module(f"{block}.{name}", f"{their_block}.{name}", params=("weight",))
    return table


def unet_keymap(net_cfg: Mapping[str, Any], layout: str, *, proj_form: str | None = None) -> KeyMap:
    """Key map {our UNet state-dict name: theirs} for layout "diffusers" or "single_file" (LDM names). proj_form
    ("linear" | "conv1x1") is the form written for proj_in / proj_out; None: linear for diffusers (exported with
    use_linear_projection=True), and for single files conv1x1 with num_heads (SD 1.x), linear with head_dim (SD 2.x)
    or num_classes (the x4 upscaler, an SD 2.x model with 8 heads)."""
    what = "UNet config"
    if layout not in LAYOUTS:
        raise ConfigError(f"UNet layout must be one of {LAYOUTS}, got {layout!r}")
    a = our_args(net_cfg, UNet, what)
    sf = layout == "single_file"
    if proj_form is None:
        proj_form = "conv1x1" if sf and a["num_heads"] is not None and a["num_classes"] is None else "linear"
    if proj_form not in ("linear", "conv1x1"):
        raise ConfigError(f"proj_form must be linear or conv1x1, got {proj_form!r}")
    if a["y_dim"] is not None and not sf:
        raise ConfigError(f"{what}: y_dim={a['y_dim']} (vector conditioning) has no diffusers counterpart here")
    if a["y_dim"] is not None and a["num_classes"] is not None:
        raise ConfigError(f"{what}: y_dim and num_classes both set; LDM's label_emb holds one of them")
    attn = _levels_with_attention(a, what)
    mc, depth, cross = a["model_channels"], a["transformer_depth"], a["context_dim"] is not None
    widths = [mc * m for m in a["channel_mult"]]
    levels, blocks = len(widths), a["num_res_blocks"]

    def transformer(ours: str, theirs: str) -> KeyMap:
        return _transformer(ours, theirs, depth, cross, proj_form)

    if sf:
        table = _module("time_embed.mlp.mlp.0", "time_embed.0") | _module("time_embed.mlp.mlp.2", "time_embed.2")
        if a["y_dim"] is not None:  # LDM's "sequential" adm label embedding (SDXL's size vectors)
            table |= _module("y_embed.mlp.0", "label_emb.0.0") | _module("y_embed.mlp.2", "label_emb.0.2")
        if a["num_classes"] is not None:  # LDM's integer num_classes (the x4 upscaler's noise level)
            table |= _module("class_embed", "label_emb", params=("weight",))
        table |= _module("input_blocks.0.0", "input_blocks.0.0") | _module("out.0", "out.0") | _module("out.2", "out.2")
    else:
        table = (_module("time_embed.mlp.mlp.0", "time_embedding.linear_1")
                 | _module("time_embed.mlp.mlp.2", "time_embedding.linear_2")
                 | _module("input_blocks.0.0", "conv_in")
                 | _module("out.0", "conv_norm_out") | _module("out.2", "conv_out"))
        if a["num_classes"] is not None:
            table |= _module("class_embed", "class_embedding", params=("weight",))

    # Encoder: input_blocks counts every ResBlock (+ transformer) and downsampler in order, as LDM does.
    k, ch, skips = 1, mc, [mc]
    for level, width in enumerate(widths):
        for j in range(blocks):
            ours = f"input_blocks.{k}"
            theirs = [f"{ours}.0", f"{ours}.1"] if sf else [f"down_blocks.{level}.resnets.{j}",
                                                             f"down_blocks.{level}.attentions.{j}"]
            table |= _resblock(f"{ours}.0", theirs[0], ch != width, sf)
            if attn[level]:
                table |= transformer(f"{ours}.1", theirs[1])
            ch = width
            skips.append(ch)
            k += 1
        if level < levels - 1:
            table |= _module(f"input_blocks.{k}.0.conv",
                             f"input_blocks.{k}.0.op" if sf else f"down_blocks.{level}.downsamplers.0.conv")
            skips.append(ch)
            k += 1

    mid = ["middle_block.0", "middle_block.1", "middle_block.2"] if sf else [
        "mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]
    table |= _resblock("middle_block.0", mid[0], False, sf)
    table |= transformer("middle_block.1", mid[1])
    table |= _resblock("middle_block.2", mid[2], False, sf)

    # Decoder: diffusers' up_blocks.u is level levels-1-u; LDM keeps our output_blocks numbering.
    k = 0
    for u, level in enumerate(reversed(range(levels))):
        width = widths[level]
        for j in range(blocks + 1):
            ours = f"output_blocks.{k}"
            theirs = [f"{ours}.0", f"{ours}.1"] if sf else [f"up_blocks.{u}.resnets.{j}",
                                                             f"up_blocks.{u}.attentions.{j}"]
            table |= _resblock(f"{ours}.0", theirs[0], ch + skips.pop() != width, sf)
            if attn[level]:
                table |= transformer(f"{ours}.1", theirs[1])
            ch = width
            if level > 0 and j == blocks:
                up = f"{ours}.{2 if attn[level] else 1}.conv"
                table |= _module(up, up if sf else f"up_blocks.{u}.upsamplers.0.conv")
            k += 1
    return table


def _indices(state: Mapping[str, Tensor], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for name in state if (m := pattern.match(name))})


def _attends_to_context(state: Mapping[str, Tensor], transformer: str) -> bool:
    """Whether a transformer's first attention reads the context (LDM's disable_self_attn): its keys are projected
    from another width. Where the context is as wide as the features the shapes cannot tell; read as self-attention,
    LDM's default (and the x4 upscaler's, whose only such level self-attends)."""
    to_k = state[f"{transformer}.transformer_blocks.0.attn1.to_k.weight"]
    return to_k.shape[1] != state[f"{transformer}.norm.weight"].shape[0]


def unet_from_single_file(state: Mapping[str, Tensor], *, num_heads: int | None, head_dim: int | None) -> dict:
    """Our UNet net config inferred from the tensor shapes of an LDM / SD single-file UNet state dict (the
    "model.diffusion_model." prefix removed). Heads are not visible in the shapes: give num_heads (SD 1.x: 8) or
    head_dim (SD 2.x: 64). The x4 upscaler's integer label table (label_emb.weight) and its levels without
    self-attention are read from the shapes too."""
    what = "single-file UNet"
    if (num_heads is None) == (head_dim is None):
        raise ConfigError(f"{what}: give exactly one of num_heads and head_dim, got {num_heads=}, {head_dim=}")
    if "input_blocks.0.0.weight" not in state or "out.2.weight" not in state:
        raise ConfigError(f"{what}: no input_blocks.0.0.weight / out.2.weight; is it an LDM UNet with the "
                          "'model.diffusion_model.' prefix removed?")
    model_channels, in_channels = state["input_blocks.0.0.weight"].shape[:2]
    level_widths: list[list[int]] = [[]]  # ResBlock output widths per level
    level_attn: list[list[str]] = [[]]  # per block: "none", "self" or "cross" (only_cross_attention)
    for k in _indices(state, "input_blocks.")[1:]:
        if f"input_blocks.{k}.0.op.weight" in state:
            level_widths.append([])
            level_attn.append([])
            continue
        level_widths[-1].append(state[f"input_blocks.{k}.0.in_layers.2.weight"].shape[0])
        if f"input_blocks.{k}.1.norm.weight" not in state:
            level_attn[-1].append("none")
        else:
            level_attn[-1].append("cross" if _attends_to_context(state, f"input_blocks.{k}.1") else "self")
    blocks = {len(w) for w in level_widths}
    if len(blocks) != 1 or any(len(set(w)) != 1 for w in level_widths) or any(len(set(x)) != 1 for x in level_attn):
        raise ConfigError(f"{what}: levels differ in block count, width or attention: widths {level_widths}, "
                          f"attention {level_attn}")
    if "middle_block.1.norm.weight" in state and _attends_to_context(state, "middle_block.1"):
        raise ConfigError(f"{what}: the middle block's first attention reads the context (LDM's "
                          "disable_middle_self_attn); ours always keeps its self-attention")
    transformers = {m.group(1) for name in state if (m := re.match(r"(.+?)transformer_blocks\.", name))}
    depths = {len(_indices(state, f"{t}transformer_blocks.")) for t in transformers}
    if len(depths) > 1:
        raise ConfigError(f"{what}: transformer depth varies over blocks ({sorted(depths)}), as in SDXL; our UNet "
                          "has one depth for all (SDXL is not supported)")
    context = next((t.shape[1] for n, t in state.items() if n.endswith("attn2.to_k.weight")), None)
    y, labels = state.get("label_emb.0.0.weight"), state.get("label_emb.weight")
    cross_only = [x[0] == "cross" for x in level_attn]
    return {
        "_target_": "ldm.nn.unet.UNet",
        **_input_channels(int(in_channels), int(state["out.2.weight"].shape[0])),
        "model_channels": int(model_channels),
        "channel_mult": [int(w[0] // model_channels) for w in level_widths],
        "num_res_blocks": blocks.pop(),
        "attention_resolutions": [2**i for i, x in reversed(list(enumerate(level_attn))) if x[0] != "none"],
        "num_heads": num_heads,
        "head_dim": head_dim,
        "transformer_depth": depths.pop() if depths else 1,
        "context_dim": None if context is None else int(context),
        "y_dim": None if y is None else int(y.shape[1]),
        "dropout": 0.0,
        "gradient_checkpointing": False,
        **_optional(None if labels is None else int(labels.shape[0]), cross_only),
    }
