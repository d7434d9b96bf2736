"""Lightning's checkpoint file I/O, made safe: atomic writes (a kill at any moment leaves the previous good
checkpoint in place), never a diverged state under a checkpoint's name, and tensor-only reads (a resumed
checkpoint cannot run code)."""
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ldm.utils.atomic import atomic_torch_save
from ldm.utils.errors import DivergedError

DIVERGED_PREFIX = "diverged-"


def non_finite_tensors(tree: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a nested dict/list that hold a NaN or an inf."""
    if isinstance(tree, torch.Tensor):
        return [prefix] if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return [name for key, value in items for name in non_finite_tensors(value, f"{prefix}{key}.")]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves are temp-file + rename (Lightning's own write in place); a state with NaN/inf weights or optimizer
    moments goes to `diverged-<name>` instead and stops training, so `last.ckpt` stays the last good one; loads use
    `weights_only=True` whatever the caller asks (Lightning 2.6 defaults a resume to full unpickling)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        bad = non_finite_tensors({k: checkpoint.get(k) for k in ("state_dict", "optimizer_states")})
        if bad:
            aside = Path(path).with_name(DIVERGED_PREFIX + Path(path).name)
            atomic_torch_save(checkpoint, aside)
            raise DivergedError(
                f"non-finite values at step {checkpoint.get('global_step')} in {len(bad)} tensor(s) (e.g. {bad[0]}): "
                f"kept the last good checkpoint in {Path(path).parent}, wrote this state to {aside.name} for "
                f"debugging. Lower the lr (a resume takes the new one), clip gradients or check the data, then re-run"
            )
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None):
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
