"""Grids written to `<run_dir>/samples/` and to the loggers every N steps: a diffusion model's samples with the
shared sampling settings, or what another module shows of a fixed validation batch (`log_images`)."""
from pathlib import Path

import lightning as L
import numpy as np
import torch

from ldm.models.generate import render
from ldm.models.latent_diffusion import LatentDiffusionModule
from ldm.models.sampling import Sampling, conditions
from ldm.utils.images import grid, save_png


def log_to_logger(logger, key: str, image_hwc: torch.Tensor, step: int) -> None:
    """Send one uint8 HWC image to TensorBoard or W&B; CSV loggers keep only the PNG on disk."""
    if isinstance(logger, L.pytorch.loggers.TensorBoardLogger):
        logger.experiment.add_image(key, image_hwc.numpy(), step, dataformats="HWC")
    elif isinstance(logger, L.pytorch.loggers.WandbLogger):
        logger.log_image(key=key, images=[np.asarray(image_hwc)], step=step)


class ImageGrid(L.Callback):
    """A LatentDiffusionModule shows `samples`: the sampling's prompts or labels (rows; without either, the captions
    of a fixed validation batch) x its seeds (columns), drawn with its settings. Other modules show `log_images` of
    a fixed validation batch of `num_images` (an autoencoder: input | reconstruction pairs)."""

    def __init__(self, out_dir: str, every_n_steps: int = 500, num_images: int = 8, sampling: Sampling | None = None):
        self.out_dir, self.every_n_steps, self.num_images = Path(out_dir), every_n_steps, num_images
        self.sampling = sampling or Sampling()
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

    def samples(self, trainer, pl_module: LatentDiffusionModule) -> torch.Tensor:
        """[rows, seeds, C, H, W]: every rank samples (a sharded model samples collectively)."""
        if getattr(pl_module.conditioner, "concat_channels", 0):  # image-conditioned: the validation batch's inputs
            return self.image_samples(trainer, pl_module)
        prompts, labels = self.sampling.prompts, self.sampling.labels
        if not prompts and not labels:
            prompts = list(self._fixed_batch(trainer, pl_module)["caption"])
        rows = self.sampling.grid_jobs(conditions(prompts, labels))
        images = render(pl_module, [job for row in rows for job in row], self.sampling)
        return images.reshape(len(rows), len(rows[0]), *images.shape[1:])

    def image_samples(self, trainer, pl_module: LatentDiffusionModule) -> torch.Tensor:
        """[images, 1 + seeds, C, H, W]: each image of the fixed validation batch (the truth), then one sample per seed
        from its condition (mask, low-res image or map, made by the data's inputs)."""
        batch = self._fixed_batch(trainer, pl_module)
        n, s = len(batch["image"]), self.sampling
        columns = [pl_module.sample(batch, [seed] * n, use_ema=s.use_ema, sampler=s.sampler, steps=s.steps,
                                    schedule=s.schedule, **s.sampler_options()) for seed in s.seeds]
        return torch.stack([batch["image"], *columns], dim=1).cpu()

    def write(self, trainer, pl_module) -> list[Path]:
        is_diffusion = isinstance(pl_module, LatentDiffusionModule)
        if not is_diffusion and not hasattr(pl_module, "log_images"):
            return []
        was_training = pl_module.training
        pl_module.eval()
        if is_diffusion:
            images = {"samples": self.samples(trainer, pl_module)}
        else:
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
