"""Checkpoint containers besides a Lightning .ckpt file: the sharded DCP directories of trainer=fsdp (consolidated
into one state_dict in memory) and safetensors weights carrying their config as metadata."""
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from ldm.utils.atomic import atomic_write_bytes

SHARDED_META = "meta.pt"  # what Lightning's ModelParallelStrategy writes beside the shards: everything but tensors


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A DCP directory (trainer=fsdp's last.ckpt/ and step-*.ckpt/)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def read_sharded_checkpoint(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint directory -> the dict a .ckpt file holds: full CPU tensors, no optimizer state.

    Reads every shard in this one process (no process group), so any world size can read any checkpoint.
    """
    path = Path(path)
    if not is_sharded_checkpoint(path) or not (path / SHARDED_META).is_file():
        raise FileNotFoundError(f"{path} is not a sharded checkpoint directory (no .metadata and {SHARDED_META} in it)")
    meta = torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)
    state: dict[str, Any] = {}
    # What torch's dcp_to_torch_save does, in memory: the planner fills `state` with full-size tensors built from
    # the checkpoint's metadata (`keys` skips the optimizer states).
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(path),
                     planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}), no_dist=True)
    return {**meta, "state_dict": state["state_dict"]}


def fold_ema(module: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The module's state_dict with every EMA copied over the weights it averages and its copy dropped.

    Applies to each submodule with an `ema` and an `ema_target()` (LatentDiffusionModule); returns the state and
    the paths of those submodules ("" = the root). Overwrites the module's trained weights in place.
    """
    folded = []
    for name, owner in module.named_modules():
        if getattr(owner, "ema", None) is not None and hasattr(owner, "ema_target"):
            owner.ema.copy_to(owner.ema_target())
            folded.append(name)
    prefixes = tuple(f"{name}.ema." if name else "ema." for name in folded)
    state = module.state_dict()
    return {k: v for k, v in state.items() if not k.startswith(prefixes)} if folded else state, folded


def save_safetensors(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Weights + metadata (each value as JSON: config, step) in one safetensors file, written atomically."""
    path = Path(path)
    # safetensors refuses tensors that share memory (a module registered twice): each name gets its own copy
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    metadata = {k: json.dumps(v) for k, v in metadata.items()}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={"format": "pt", **metadata}))
    return path


def read_safetensors(path: str | Path) -> dict[str, Any]:
    """A safetensors file written by save_safetensors -> {**metadata, "state_dict": weights}, like a .ckpt's dict."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return {**{k: json.loads(v) for k, v in metadata.items() if k != "format"}, "state_dict": load_file(str(path))}
