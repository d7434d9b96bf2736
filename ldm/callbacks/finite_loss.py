"""Stop on a NaN/inf loss before its backward pass, so no update and no checkpoint ever comes from it.

Reading the loss on the host is a GPU sync; checking every N steps lets the GPU run ahead (`finite_check_every_n_steps`),
and a NaN is then caught within N steps, while checkpoints refuse non-finite weights meanwhile (utils/checkpoint_io.py).
"""
import lightning as L
import torch

from ldm.utils.errors import NonFiniteLossError


class FiniteLoss(L.Callback):
    def __init__(self, every_n_steps: int = 1):
        if every_n_steps < 1:
            raise ValueError(f"finite_check_every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if trainer.global_step % self.every_n_steps:
            return  # every rank skips the same steps, so the collective below always pairs up
        if trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss.detach()).all()), all=False):
            raise NonFiniteLossError(
                f"non-finite loss at step {trainer.global_step}; stopped without saving. The last good checkpoint "
                "is in <run_dir>/checkpoints; lower the lr, enable grad clipping or check the data."
            )
