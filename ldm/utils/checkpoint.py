"""Load a trained module from its checkpoint alone: the stored config rebuilds it (allow-listed targets only)."""
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.utils.safe_config import safe_instantiate

CONFIG_KEY = "ldm_config"
FIRST_STAGE_CONFIG_KEY = "first_stage_config"  # a diffusion checkpoint's autoencoder config (weights in state_dict)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True: tensors and plain containers only, no pickled code."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def checkpoint_config(ckpt: dict[str, Any]) -> DictConfig:
    if CONFIG_KEY not in ckpt:
        raise KeyError(f"checkpoint has no `{CONFIG_KEY}`: it was not written by ldm's fit task")
    return OmegaConf.create(ckpt[CONFIG_KEY])


def load_module(path: str | Path) -> tuple[torch.nn.Module, DictConfig, dict[str, Any]]:
    """Rebuild `cfg.model` from the checkpoint's stored config and load its weights (EMA included)."""
    ckpt = read_checkpoint(path)
    cfg = checkpoint_config(ckpt)
    model_cfg = cfg.model.copy()
    if ckpt.get(FIRST_STAGE_CONFIG_KEY) is not None:
        # build the first stage from its stored config; its weights come with this state_dict
        model_cfg.first_stage = ckpt[FIRST_STAGE_CONFIG_KEY]
    module = safe_instantiate(model_cfg)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval(), cfg, ckpt
