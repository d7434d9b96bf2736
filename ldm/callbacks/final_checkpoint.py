"""Checkpoints the final step: ModelCheckpoint saves only every N steps, so a run whose max_steps is not a
multiple of N would lose its last steps and a re-run would train them again."""
from pathlib import Path

import lightning as L

from ldm.utils.rundir import LAST


class FinalCheckpoint(L.Callback):
    def __init__(self, dirpath: str | Path, every: L.pytorch.callbacks.ModelCheckpoint):
        self.dirpath, self.every = Path(dirpath), every
        self.start_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = trainer.global_step  # > 0 after a resume

    def on_train_end(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self.start_step or self.every._last_global_step_saved == step:
            return  # nothing trained, or the periodic checkpoint already holds this step
        trainer.save_checkpoint(self.dirpath / f"step-{step:08d}.ckpt")
        trainer.save_checkpoint(self.dirpath / LAST)
