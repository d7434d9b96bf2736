"""Load a trained module from its checkpoint alone: the stored config rebuilds it (allow-listed targets only)."""
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.utils.consolidate import read_safetensors, read_sharded_checkpoint
from ldm.utils.safe_config import safe_instantiate, stored_config

CONFIG_KEY = "ldm_config"
FIRST_STAGE_CONFIG_KEY = "first_stage_config"  # a diffusion checkpoint's autoencoder config (weights in state_dict)
EMA_FOLDED_KEY = "ema_folded"  # modules whose EMA weights replaced their trained ones (exported safetensors)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint as a dict (state_dict, config, step): a .ckpt file (torch.load with weights_only=True: tensors
    and plain containers only, no pickled code), a .safetensors export, or a sharded (trainer=fsdp) directory,
    consolidated in memory."""
    path = Path(path)
    if path.is_dir():
        return read_sharded_checkpoint(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise
        found = re.search(r"GLOBAL ([\w.]+)", str(error))  # torch names the first object it would not unpickle
        raise PermissionError(f"refusing checkpoint {path}: it pickles {found.group(1) if found else 'a Python object'}"
                              f", which could run code (ldm reads tensors and plain containers only)") from error


def checkpoint_config(ckpt: dict[str, Any], source: str = "the checkpoint") -> DictConfig:
    """The training config stored in a checkpoint dict, refused if it could run code (see safe_config)."""
    if CONFIG_KEY not in ckpt:
        raise KeyError(f"checkpoint has no `{CONFIG_KEY}`: it was not written by ldm's fit or export task")
    return stored_config(ckpt[CONFIG_KEY], source)


def build_module(ckpt: dict[str, Any], source: str = "the checkpoint") -> torch.nn.Module:
    """Rebuild `cfg.model` from a checkpoint dict's stored config and load its weights (EMA included), eval mode."""
    model_cfg = checkpoint_config(ckpt, source).model.copy()
    if ckpt.get(FIRST_STAGE_CONFIG_KEY) is not None:
        # build the first stage from its stored config; its weights come with this state_dict
        model_cfg.first_stage = stored_config(ckpt[FIRST_STAGE_CONFIG_KEY], source)
    for name in ckpt.get(EMA_FOLDED_KEY, []):  # the weights are the EMA ones already: no second copy
        (model_cfg if name == "" else OmegaConf.select(model_cfg, name)).ema_decay = None
    module = safe_instantiate(model_cfg, where="model", source=source)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def load_module(path: str | Path) -> tuple[torch.nn.Module, DictConfig, dict[str, Any]]:
    """The module, its training config and the checkpoint dict, from a .ckpt, .safetensors or sharded directory."""
    ckpt = read_checkpoint(path)
    return build_module(ckpt, str(path)), checkpoint_config(ckpt, str(path)), ckpt
