"""Rebuild objects from a config stored in a checkpoint, instantiating only allow-listed targets."""
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

ALLOWED_TARGET_PREFIXES = ("ldm.", "torch.", "lightning.", "open_clip.", "webdataset.")


def check_targets(cfg: Any, allowed: tuple[str, ...] = ALLOWED_TARGET_PREFIXES, where: str = "") -> None:
    """Raise if any `_target_` in `cfg` lies outside the allow-list (a shared checkpoint must not run code)."""
    if isinstance(cfg, (DictConfig, dict)):
        for key, value in cfg.items():
            path = f"{where}.{key}" if where else str(key)
            if key in ("_target_", "_partial_target_") and not str(value).startswith(allowed):
                raise PermissionError(f"refusing to instantiate `{value}` at `{path}`: not in {allowed}")
            check_targets(value, allowed, path)
    elif isinstance(cfg, (ListConfig, list, tuple)):
        for i, value in enumerate(cfg):
            check_targets(value, allowed, f"{where}[{i}]")


def safe_instantiate(cfg: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate after checking every target against the allow-list."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    check_targets(cfg)
    return instantiate(cfg, **kwargs)
