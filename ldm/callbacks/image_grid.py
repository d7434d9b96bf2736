"""Writes `pl_module.log_images(batch)` grids to `<run_dir>/samples/` and to the logger every N steps."""
from pathlib import Path

import lightning as L
import numpy as np
import torch

from ldm.utils.images import grid, save_png


def log_to_logger(logger, key: str, image_hwc: torch.Tensor, step: int) -> None:
    """Send one uint8 HWC image to TensorBoard or W&B; CSV loggers keep only the PNG on disk."""
    if isinstance(logger, L.pytorch.loggers.TensorBoardLogger):
        logger.experiment.add_image(key, image_hwc.numpy(), step, dataformats="HWC")
    elif isinstance(logger, L.pytorch.loggers.WandbLogger):
        logger.log_image(key=key, images=[np.asarray(image_hwc)], step=step)


class ImageGrid(L.Callback):
    """Fixed validation batch -> grids of what the module chooses to show (reconstructions, samples)."""

    def __init__(self, out_dir: str, every_n_steps: int = 500, num_images: int = 8):
        self.out_dir, self.every_n_steps, self.num_images = Path(out_dir), every_n_steps, num_images
        self._batch = None
        self._written_step = -1

    def _fixed_batch(self, trainer, pl_module):
        if self._batch is None:
            dm = trainer.datamodule
            loader = dm.val_dataloader()
            if isinstance(loader, list) and not loader:  # no validation split: show training data
                loader = dm.train_dataloader()
            batch = next(iter(loader))
            self._batch = {k: v[: self.num_images] for k, v in batch.items() if not isinstance(v, dict)}
        return pl_module.transfer_batch_to_device(self._batch, pl_module.device, 0)

    def write(self, trainer, pl_module) -> list[Path]:
        if not hasattr(pl_module, "log_images"):
            return []
        was_training = pl_module.training
        pl_module.eval()
        images = pl_module.log_images(self._fixed_batch(trainer, pl_module))
        pl_module.train(was_training)
        paths = []
        step = self._written_step = trainer.global_step
        for name, tiles in images.items():
            picture = grid(tiles)
            if trainer.is_global_zero:
                paths.append(save_png(picture, self.out_dir / f"{name}-step{step:08d}.png"))
                for logger in trainer.loggers:
                    log_to_logger(logger, f"images/{name}", picture, step)
        return paths

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self._written_step != trainer.global_step:  # the last step may already have its grid
            self.write(trainer, pl_module)
