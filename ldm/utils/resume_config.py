"""What a resume may change: optimisation settings take effect and are recorded; the model and the data may not.

A run's identity is its model and its data. Resuming a checkpoint with another architecture, another first stage
or another dataset silently trains something else under the same name, so such changes are refused unless
`resume_force=true`. Optimisation settings (learning rate, schedule, batch size, step budget) and everything
outside `model`/`data` (trainer, logger, callbacks, sampling) may change: the differences are printed and appended to
`<run_dir>/config_history.yaml`.
"""
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ldm.utils.atomic import atomic_write_yaml
from ldm.utils.errors import ConfigError

IDENTITY = ("model.", "data.", "seed", "init_from", "trainable")  # what the run is, where it started, what trains
OPTIMISATION = {  # leaf names inside model/data that a resume may change
    "lr", "betas", "weight_decay", "warmup_steps", "lr_schedule", "scale_lr", "base_batch_size", "ema_decay",
    "disc_lr", "grad_clip", "compile", "batch_size", "num_workers", "verify", "cfg_dropout_prob",
}
HISTORY = "config_history.yaml"


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted.key: leaf value} of a nested dict/list config."""
    if isinstance(cfg, dict):
        items = cfg.items()
    elif isinstance(cfg, list) and any(isinstance(v, (dict, list)) for v in cfg):
        items = ((str(i), v) for i, v in enumerate(cfg))
    else:
        return {prefix[:-1]: cfg}
    return {k: v for key, value in items for k, v in flatten(value, f"{prefix}{key}.").items()}


def _moved(value: Any, old_root: str, new_root: str) -> Any:
    """A run copied to another paths.root_dir: the old root in a stored path reads as the new one."""
    if isinstance(value, str) and old_root and value.startswith(old_root):
        return new_root + value[len(old_root):]
    return value


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Keys whose resolved value differs between the stored and the new config: {key: (old, new)}."""
    old_root, new_root = old.get("paths", {}).get("root_dir", ""), new.get("paths", {}).get("root_dir", "")
    before = {k: _moved(v, str(old_root), str(new_root)) for k, v in flatten(old).items()}
    after = flatten(new)
    return {k: (before.get(k), after.get(k)) for k in sorted(before.keys() | after.keys())
            if before.get(k) != after.get(k) and not k.startswith("hydra.")}


def identity_changes(changes: dict[str, tuple[Any, Any]]) -> list[str]:
    """The changed keys that would make the resumed run a different run."""
    return [k for k in changes if k.startswith(IDENTITY) and not OPTIMISATION & set(k.split("."))]


def check_resume_config(run_dir: str | Path, cfg: Any, checkpoint: Path, force: bool = False) -> dict:
    """Compare the new resolved config with the run's `config.yaml`; refuse identity changes unless `force`.

    Returns the changes (possibly empty); a run directory without config.yaml has nothing to compare."""
    stored = Path(run_dir) / "config.yaml"
    if not stored.is_file():
        return {}
    changes = config_changes(OmegaConf.to_container(OmegaConf.load(stored)), cfg)
    refused = identity_changes(changes)
    if refused and not force:
        shown = ", ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        raise ConfigError(
            f"resuming {checkpoint} with another model/data config ({shown}{more}): that would be another run. "
            f"Pick a new `name=`, or resume_force=true if you mean it"
        )
    return changes


def record_changes(run_dir: str | Path, changes: dict, checkpoint: Path) -> None:
    """Print the changes and append them to `<run_dir>/config_history.yaml` (rewritten atomically)."""
    if not changes:
        return
    print("[fit] config changed since the last start: "
          + "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()), flush=True)
    path = Path(run_dir) / HISTORY
    history = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
    history.append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed_from": str(checkpoint),
                    "changes": {k: {"old": old, "new": new} for k, (old, new) in changes.items()}})
    atomic_write_yaml(path, history)
