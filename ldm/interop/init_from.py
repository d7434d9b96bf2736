"""`init_from=PATH`: a new run starts from another checkpoint's weights (fine-tuning), not from its training state.

The architecture is the new run's; the source must fit it exactly (one error lists every unknown, missing or
mis-shaped tensor). The weights are the source's EMA ones when it has them (`init_from_weights=ema`, the default),
and the new EMA starts equal to them; the optimizer and the step count start fresh (Lightning is given no ckpt_path).
Into a LoRA-wrapped backbone the source's plain names land on peft's base layers; the adapters keep their
initialisation (B = 0), so the first step starts exactly at the source model.
"""
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.interop.keymap import Key, to_ours
from ldm.nn.lora import LoRA, is_adapter, plain_name
from ldm.utils.checkpoint import EMA_FOLDED_KEY
from ldm.utils.errors import ConfigError
from ldm.utils.hashing import sha256_path

INIT_KEY = "init_from"  # the checkpoint entry recording where a fine-tuned run started
WEIGHTS = ("ema", "raw")


def averaged_part(module: nn.Module) -> nn.Module | None:
    """What the module's EMA averages: ema_target() (LatentDiffusionModule) or `net` (AutoencoderModule)."""
    if getattr(module, "ema", None) is None:
        return None
    return module.ema_target() if hasattr(module, "ema_target") else module.net


def ema_names(module: nn.Module) -> dict[str, str]:
    """{EMA copy's name: the live name it averages}, e.g. ema.net.backbone.X -> denoiser.net.X (by tensor identity)."""
    part = averaged_part(module)
    if part is None:
        return {}
    live = {id(t): name for name, t in module.state_dict(keep_vars=True).items() if not name.startswith("ema.")}
    return {f"ema.net.{name}": live[id(t)] for name, t in part.state_dict(keep_vars=True).items()}


def _plain_names(module: nn.Module) -> dict[str, str | None]:
    """{our name: the name a model without LoRA gives it} (None: an adapter, which such a model does not have)."""
    wrappers = [f"{prefix}." for prefix, m in module.named_modules() if isinstance(m, LoRA)]
    out = {}
    for name in module.state_dict():
        prefix = next((p for p in wrappers if name.startswith(p)), None)
        if prefix is None:
            out[name] = name
        elif not is_adapter(name):
            out[name] = prefix + plain_name(name[len(prefix):].removeprefix("net."))
        else:
            out[name] = None
    return out


def init_keymap(module: nn.Module, source: dict[str, torch.Tensor], read_ema: bool) -> tuple[dict[str, Key], list[str]]:
    """{our live name: Key(source name)} and the source names deliberately unused (the other copy of each weight).

    A source without adapters (a plain model, an import) is read under plain names; one with adapters (an earlier
    LoRA run of the same shape) under ours, adapters included."""
    names = _plain_names(module) if not any(is_adapter(n) for n in source) else {n: n for n in module.state_dict()}
    averaged = {live: ema for ema, live in ema_names(module).items()}
    keymap, unused = {}, ["ema.num_updates"]
    for ours, theirs in names.items():
        if ours.startswith("ema.") or theirs is None:
            continue  # the EMA is set from the live weights; adapters keep their initialisation
        if ours in averaged:
            their_ema = names[averaged[ours]]
            if read_ema:
                theirs, their_ema = their_ema, theirs
            unused.append(their_ema)
        keymap[ours] = Key((theirs,))
    return keymap, unused


def source_weights(ckpt: dict[str, Any], requested: str) -> str:
    """Which weights the source gives: "ema" when requested and it has an EMA copy (or is an export with the EMA
    folded in), else "raw"."""
    if requested not in WEIGHTS:
        raise ConfigError(f"init_from_weights={requested!r}: ema | raw")
    has_ema = any(k.startswith("ema.") for k in ckpt["state_dict"]) or "" in ckpt.get(EMA_FOLDED_KEY, [])
    return "ema" if requested == "ema" and has_ema else "raw"


@torch.no_grad()
def init_from_checkpoint(module: nn.Module, ckpt: dict[str, Any], weights: str = "ema",
                         source: str = "init_from") -> str:
    """Load a checkpoint dict's weights into `module` strictly and reset its EMA to them; returns which weights
    were read, "ema" or "raw" (`source` names the file in errors)."""
    used = source_weights(ckpt, weights)
    state = ckpt["state_dict"]
    source_ema = sorted(k for k in state if k.startswith("ema."))
    part = averaged_part(module)
    if part is None and source_ema and used == "ema":
        raise ConfigError(f"init_from={source} has EMA weights, but this model keeps no EMA (ema_decay null) to "
                          f"tell which weights they average: set init_from_weights=raw, or an ema_decay")
    keymap, unused = init_keymap(module, state, used == "ema" and bool(source_ema))
    if part is None:
        unused += source_ema  # raw weights into a model without EMA: the source's EMA copy is not read
    ours = module.state_dict()
    shapes = {name: ours[name].shape for name in keymap}
    loaded = to_ours(state, keymap, shapes, what=f"init_from={source}", ignore=tuple(unused))
    for name, t in loaded.items():
        ours[name].copy_(t)  # state_dict tensors share storage with the parameters and buffers
    if part is not None:  # the EMA restarts at the loaded weights, its warm-up count at zero
        module.ema.load_state_dict({**{f"net.{k}": v for k, v in part.state_dict().items()},
                                    "num_updates": torch.zeros_like(module.ema.num_updates)})
    return used


def init_record(path: str | Path, weights: str) -> dict[str, str]:
    """What a fine-tuned run's checkpoints keep about its start: the source path, its sha256 and the weights read."""
    return {"path": str(path), "sha256": sha256_path(path), "weights": weights}
