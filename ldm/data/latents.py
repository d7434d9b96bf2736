"""Training on cached latents: the distributed, restartable sampler, its loader and the LatentDataModule.

The dataset itself (reading shards, posterior draws, crc32 checks) is LatentDataset in ldm/data/latent_cache/.
"""
import math
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ldm.data.latent_cache.reader import LatentDataset
from ldm.data.latent_norm import LatentNorm
from ldm.data.skips import KeptLoader, collate_kept, kept_batches
from ldm.utils.dist_env import dist_env


class LatentSampler(DistributedSampler):
    """A permutation per (seed, epoch) split across ranks, yielding (epoch, index); restartable mid-epoch.

    Rank r of W takes positions r, r + W, ... of the epoch's order; with `even`, the order is padded by
    wrapping around so every rank gets the same count (DDP steps stay in lockstep), else ranks are
    disjoint and complete but may differ by one. Without `shuffle` the epoch is ignored: validation sees
    the same order and the same posterior draws every time. A DistributedSampler subclass, so Lightning keeps it.
    """

    def __init__(
        self, dataset: Dataset, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0, even: bool = True
    ):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.size, self.even = len(dataset), even
        self._resume: tuple[int, int] | None = None  # (epoch, global position) to start the next pass at
        self.pass_epoch, self.pass_start = 0, 0  # of the pass in progress

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch if self.shuffle else 0

    def resume(self, epoch: int, position: int) -> None:
        """Start the next pass of `epoch` after `position` items of its global order (all ranks together)."""
        if position >= self.global_length():
            epoch, position = epoch + 1, 0
        self.epoch, self._resume = epoch, (epoch, position)

    def global_length(self) -> int:
        """Items in one epoch over all ranks (padded to a multiple of the world size with `even`)."""
        return math.ceil(self.size / self.num_replicas) * self.num_replicas if self.even else self.size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All indices in this epoch's order (a numpy array: Python lists of 100M ints would not fit)."""
        if not self.shuffle:
            return np.arange(self.size)
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(1, dtype=np.uint64)[0]
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(int(state))).numpy()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        start = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self._resume, self.pass_epoch, self.pass_start = None, epoch, start
        order = self.epoch_order(epoch)
        remaining = order[start:]
        if self.even:  # pad the remainder to a multiple of the world size, wrapping around the order
            remaining = np.concatenate([remaining, np.resize(order, -len(remaining) % self.num_replicas)])
        mine = remaining[self.rank :: self.num_replicas]
        return ((epoch, int(index)) for index in mine)

    def __len__(self) -> int:
        """Items of a full epoch on this rank (Lightning sizes the epoch with it)."""
        if self.even:
            return self.global_length() // self.num_replicas
        return len(range(self.rank, self.size, self.num_replicas))


class ResumableDataLoader(DataLoader):
    """A DataLoader over a LatentSampler whose position in the epoch goes into Lightning checkpoints.

    Lightning stores `state_dict()` with the fit loop and calls `load_state_dict()` before the first
    batch after a restart; the next pass then starts exactly after the last batch trained on. A batch whose
    records were all skipped (collate_kept gives None) still counts towards the position but is left out.
    """

    _batches = 0

    def _counted(self) -> Iterator:
        self._batches = 0
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def __iter__(self) -> Iterator:
        return kept_batches(self._counted())

    def state_dict(self) -> dict:
        sampler: LatentSampler = self.sampler
        position = sampler.pass_start + self._batches * self.batch_size * sampler.num_replicas
        if self.drop_last and (sampler.global_length() - position) // sampler.num_replicas < self.batch_size:
            position = sampler.global_length()  # only the dropped partial batch is left: the epoch is done
        position = min(position, sampler.global_length())
        return {"epoch": sampler.pass_epoch, "position": position, "seed": sampler.seed, "num_samples": sampler.size}

    def load_state_dict(self, state: dict) -> None:
        sampler: LatentSampler = self.sampler
        if (state["seed"], state["num_samples"]) != (sampler.seed, sampler.size):
            raise ValueError(
                f"the checkpoint's data position is for {state['num_samples']} latents with seed {state['seed']}, "
                f"this loader has {sampler.size} with seed {sampler.seed}: same cache and data.seed needed to resume"
            )
        sampler.resume(state["epoch"], state["position"])


class LatentDataModule(L.LightningDataModule):
    """Train/val loaders over latent caches; exposes the latent normalisation (`norm`) the diffusion model stores."""

    def __init__(
        self,
        train_path: str,
        val_path: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        scale: str | float = "auto",
        flip: bool = True,
        verify: bool = False,
        expected_first_stage_hash: str | None = None,
        seed: int = 0,
        val_batch_size: int | None = None,
        pin_memory: bool = True,
        on_corrupt: str = "raise",
    ):
        super().__init__()
        if batch_size <= 0 or num_workers < 0:
            raise ValueError(f"need batch_size > 0 and num_workers >= 0, got {batch_size=}, {num_workers=}")
        for key, path in (("data.train_path", train_path), ("data.val_path", val_path)):
            if path is not None and not Path(path).expanduser().is_dir():
                raise FileNotFoundError(f"latent cache {path!r} not found; set `{key}` (written by task=cache_latents)")
        options = dict(scale=scale, verify=verify, expected_first_stage_hash=expected_first_stage_hash, seed=seed,
                       on_corrupt=on_corrupt)
        self.train = LatentDataset(train_path, flip=flip, **options)
        # validation reads the unmirrored posteriors, scaled like training (the train cache's statistics)
        self.val = LatentDataset(val_path, flip=False, **options) if val_path is not None else None
        if self.val is not None:
            self.val.norm = self.train.norm
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed

    def check_first_stage(self, first_stage_hash: str) -> None:
        """Refuse caches encoded by another first stage than the one (by weight hash) the model decodes with."""
        for dataset in (self.train, self.val):
            if dataset is not None:
                dataset.check_first_stage(first_stage_hash)

    @property
    def norm(self) -> LatentNorm:
        """The training cache's latent normalisation, which the diffusion model stores in its checkpoint."""
        return self.train.norm

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.train.latent_shape

    def _rank_and_world_size(self) -> tuple[int, int]:
        """From the trainer when there is one, else torch.distributed or the launcher's env (see dist_env)."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        env = dist_env()
        return env.rank, env.world_size

    def _loader_options(self) -> dict:
        return dict(
            collate_fn=collate_kept,  # with on_corrupt=skip, a damaged record is a skip marker, not a sample
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )

    def train_dataloader(self) -> ResumableDataLoader:
        rank, world_size = self._rank_and_world_size()
        sampler = LatentSampler(self.train, rank, world_size, shuffle=True, seed=self.seed, even=True)
        return ResumableDataLoader(self.train, self.batch_size, sampler=sampler, drop_last=True, **self._loader_options())

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None:
            return []
        rank, world_size = self._rank_and_world_size()
        sampler = LatentSampler(self.val, rank, world_size, shuffle=False, seed=self.seed, even=False)
        return KeptLoader(self.val, self.val_batch_size, sampler=sampler, **self._loader_options())
