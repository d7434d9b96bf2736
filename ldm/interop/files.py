"""Reading and writing the files of diffusers folders and single-file checkpoints as plain data: JSON configs and
state dicts (safetensors, or pickles read with weights_only=True). diffusers itself is never imported here."""
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ldm.utils.atomic import atomic_write_bytes, atomic_write_json
from ldm.utils.checkpoint import read_checkpoint
from ldm.utils.errors import ConfigError, missing_file

# weight file names of diffusers models and transformers models, preferred first (safetensors before pickles)
WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from a file; anything else is a ConfigError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read {path} as JSON: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _weights_file(folder: Path, variant: str | None) -> list[Path]:
    suffix = f".{variant}" if variant else ""
    for ext in (".safetensors", ".bin"):
        for name in WEIGHT_NAMES:
            single = folder / f"{name}{suffix}{ext}"
            if single.is_file():
                return [single]
            index = folder / f"{name}{suffix}{ext}.index.json"
            if index.is_file():  # sharded: the index names each tensor's file
                files = sorted(set(read_json(index).get("weight_map", {}).values()))
                return [folder / f for f in files]
    raise ConfigError(f"no weights in {folder} (looked for {'|'.join(WEIGHT_NAMES)}{suffix}.safetensors|.bin; "
                      f"config key `task.variant` picks e.g. fp16 files)")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of one weights file: .safetensors, or a pickle read with weights_only=True (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise missing_file(str(path), "task.src", "weights file")
    if path.suffix == ".safetensors":
        return load_file(path)
    ckpt = read_checkpoint(path)
    state = ckpt.get("state_dict", ckpt)  # original SD .ckpt files nest the weights under state_dict
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:10]))}")
    return state


def read_component(folder: str | Path, config_name: str = "config.json",
                   variant: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, state dict) of one diffusers/transformers model folder, e.g. <pipeline>/vae."""
    folder = Path(folder)
    if not (folder / config_name).is_file():
        raise missing_file(str(folder / config_name), "task.src", "model config")
    state = {}
    for path in _weights_file(folder, variant):
        state |= read_state_dict(path)
    return read_json(folder / config_name), state


def write_component(folder: str | Path, config: dict[str, Any], state: dict[str, torch.Tensor] | None,
                    weights_name: str = "diffusion_pytorch_model", config_name: str = "config.json") -> None:
    """Write config.json and <weights_name>.safetensors (contiguous copies; tensors may share memory in a module)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / config_name, config)
    if state is not None:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        atomic_write_bytes(folder / f"{weights_name}.safetensors", safetensors_bytes(tensors, metadata={"format": "pt"}))


def write_folder_atomically(out: str | Path, write) -> Path:
    """Run `write(tmp_folder)` then rename the folder to `out`: a crash never leaves a half-written export under
    its name. An existing `out` is never replaced (ConfigError naming `task.out`)."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} exists: exports never overwrite; pick another `task.out` or move it away")
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
