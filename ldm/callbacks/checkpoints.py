"""Which checkpoints a run writes (all atomically, through AtomicCheckpointIO):

- `step-XXXXXXXX.ckpt` every `every_n_steps` optimizer steps, the newest `keep_last` of them kept (all when None),
  and `last.ckpt` beside them, the one a re-run resumes from;
- `last.ckpt` also every `every_minutes` of wall clock (preemptible clusters: lose at most that much);
- `best.ckpt` by a monitored metric (`monitor`, `mode`), for `ckpt=best`;
- the final step (FinalCheckpoint), so a finished run is never retrained.
"""
from datetime import timedelta
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from ldm.callbacks.final_checkpoint import FinalCheckpoint


def checkpoint_callbacks(checkpoint_dir: str | Path, every_n_steps: int, every_minutes: float | None = None,
                         keep_last: int | None = None, monitor: str | None = None,
                         mode: str = "min") -> list[L.Callback]:
    """The ModelCheckpoint callbacks above plus FinalCheckpoint, writing into `checkpoint_dir`."""
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"checkpoint_keep_last must be a positive count or null (keep all), got {keep_last}")
    common = dict(dirpath=checkpoint_dir, auto_insert_metric_name=False,
                  enable_version_counter=False)  # last.ckpt is overwritten (atomically), never last-v1.ckpt
    steps = ModelCheckpoint(filename="step-{step:08d}", every_n_train_steps=every_n_steps, save_last=True,
                            save_top_k=keep_last or -1, monitor="step" if keep_last else None, mode="max", **common)
    callbacks = [steps]
    if every_minutes:
        callbacks.append(ModelCheckpoint(filename="last", train_time_interval=timedelta(minutes=every_minutes),
                                         save_top_k=1, **common))
    if monitor:
        callbacks.append(ModelCheckpoint(filename="best", monitor=monitor, mode=mode, save_top_k=1, **common))
    return [*callbacks, FinalCheckpoint(checkpoint_dir, steps)]
