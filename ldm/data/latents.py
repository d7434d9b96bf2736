"""Training on cached latents: the distributed, restartable sampler, its loader and the LatentDataModule.

The dataset itself (reading shards, posterior draws, crc32 checks) is LatentDataset in ldm/data/latent_cache/.
A cache made with aspect-ratio buckets holds latents of several sizes; BucketBatchSampler then deals out whole
batches, each from one bucket, so every batch stacks latents of one size.
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
        self.pass_epoch, self.pass_start = epoch, position  # a checkpoint before the first batch keeps the position

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


def bucket_batches(order: np.ndarray, bucket_of: np.ndarray, batch_size: int, drop_last: bool
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut an epoch's order into batches of one bucket each: (indices grouped by bucket, each batch's start and length).

    Each bucket keeps the order's sequence of its indices; its last partial batch is dropped with `drop_last`, else
    kept.
    """
    grouped = order[np.argsort(bucket_of[order], kind="stable")]  # bucket 0's indices in epoch order, then 1's, ...
    counts = np.bincount(bucket_of)
    starts, lengths = [], []
    for first, count in zip(np.cumsum(counts) - counts, counts):
        offsets = np.arange(0, count - batch_size + 1 if drop_last else count, batch_size)
        starts.append(first + offsets)
        lengths.append(np.minimum(batch_size, count - offsets))
    return grouped, np.concatenate(starts).astype(np.int64), np.concatenate(lengths).astype(np.int64)


class BucketBatchSampler(LatentSampler):
    """Whole batches of (epoch, index), each from one aspect-ratio bucket, for a DataLoader with batch_size=None.

    Each epoch cuts the (seed, epoch) permutation of all latents into per-bucket batches, then shuffles the batches
    with the same seed: the epoch's batch order is the same on any number of ranks, and rank r of W takes batches
    r, r + W, ... (with `even`, wrapping around to the epoch's first batches so every rank takes as many). Positions
    count batches, not items. A sampler (a DistributedSampler) rather than a batch_sampler, so Lightning keeps it.
    """

    def __init__(self, dataset: Dataset, bucket_of: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0, even: bool = True, drop_last: bool = True):
        super().__init__(dataset, rank, world_size, shuffle, seed, even)
        if batch_size <= 0 or len(bucket_of) != self.size:
            raise ValueError(f"need batch_size > 0 and a bucket per item, got {batch_size=}, {len(bucket_of)} buckets "
                             f"for {self.size} items")
        self.bucket_of, self.batch_size, self.drop_last = np.asarray(bucket_of), batch_size, drop_last
        self.bucket_counts = np.bincount(self.bucket_of).tolist()
        self.num_batches = len(bucket_batches(np.arange(self.size), self.bucket_of, batch_size, drop_last)[1])
        if self.num_batches == 0:
            raise ValueError(f"no bucket holds a whole batch of {batch_size} ({self.bucket_counts} latents per "
                             "bucket): lower data.batch_size")

    def global_length(self) -> int:
        """Batches in one epoch over all ranks (padded to a multiple of the world size with `even`)."""
        return math.ceil(self.num_batches / self.num_replicas) * self.num_replicas if self.even else self.num_batches

    def epoch_batches(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indices grouped by bucket, batch starts, batch lengths), the batches in this epoch's order."""
        grouped, starts, lengths = bucket_batches(self.epoch_order(epoch), self.bucket_of, self.batch_size,
                                                  self.drop_last)
        if self.shuffle:  # else batches stay in bucket order: validation sees the same batches every time
            state = np.random.SeedSequence([self.seed, epoch, 1]).generate_state(1, dtype=np.uint64)[0]
            batch_order = torch.randperm(len(starts), generator=torch.Generator().manual_seed(int(state))).numpy()
            starts, lengths = starts[batch_order], lengths[batch_order]
        return grouped, starts, lengths

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # a generator: the DataLoader is this sampler's only batcher, and with workers it calls iter() twice, dropping
        # the first iterator unused; the resume position goes to the iterator that runs
        epoch = self.epoch
        start = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self._resume, self.pass_epoch, self.pass_start = None, epoch, start
        grouped, starts, lengths = self.epoch_batches(epoch)
        batches = np.arange(start, len(starts))
        if self.even:  # pad the remainder to a multiple of the world size, wrapping around the epoch's batches
            batches = np.concatenate([batches, np.resize(np.arange(len(starts)), -len(batches) % self.num_replicas)])
        for b in batches[self.rank :: self.num_replicas]:
            yield [(epoch, int(i)) for i in grouped[starts[b] : starts[b] + lengths[b]]]

    def __len__(self) -> int:
        """Batches of a full epoch on this rank (Lightning sizes the epoch with it)."""
        if self.even:
            return self.global_length() // self.num_replicas
        return len(range(self.rank, self.num_batches, self.num_replicas))


class ResumableDataLoader(DataLoader):
    """A DataLoader over a LatentSampler whose position in the epoch goes into Lightning checkpoints.

    Lightning stores `state_dict()` with the fit loop and calls `load_state_dict()` before the first
    batch after a restart; the next pass then starts exactly after the last batch trained on. A batch whose
    records were all skipped (collate_kept gives None) still counts towards the position but is left out.
    Over a BucketBatchSampler (batch_size=None) the position counts batches, and the state also holds the batch size
    and the latents per bucket, since the batches depend on both.
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
        if isinstance(sampler, BucketBatchSampler):  # the sampler drops partial batches itself
            position = min(sampler.pass_start + self._batches * sampler.num_replicas, sampler.global_length())
            return {"epoch": sampler.pass_epoch, "position": position, "seed": sampler.seed, "num_samples": sampler.size,
                    "batch_size": sampler.batch_size, "bucket_counts": sampler.bucket_counts}
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
        bucketed = isinstance(sampler, BucketBatchSampler)
        if ("bucket_counts" in state) != bucketed:
            raise ValueError(
                f"the checkpoint's data position was saved {'without' if bucketed else 'with'} aspect-ratio buckets, "
                f"this cache is {'' if bucketed else 'not '}bucketed: resuming needs the cache the run started on"
            )
        if bucketed and (state["batch_size"], state["bucket_counts"]) != (sampler.batch_size, sampler.bucket_counts):
            raise ValueError(
                f"the checkpoint's data position counts batches of {state['batch_size']} from buckets of "
                f"{state['bucket_counts']} latents, this loader has batches of {sampler.batch_size} from "
                f"{sampler.bucket_counts}: a bucketed cache resumes exactly only with the same cache and data.batch_size"
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
        """The training latents' shape (with buckets: the first bucket's; all of them in `latent_shapes`)."""
        return self.train.latent_shape

    @property
    def latent_shapes(self) -> list[tuple[int, ...]]:
        """Each bucket's latent shape ([latent_shape] without buckets): a batch holds latents of one of them."""
        return self.train.latent_shapes

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
        if self.train.buckets is not None:  # whole one-bucket batches from the sampler; partial ones dropped
            sampler = BucketBatchSampler(self.train, self.train.bucket_of, self.batch_size, rank, world_size,
                                         shuffle=True, seed=self.seed, even=True, drop_last=True)
            return ResumableDataLoader(self.train, None, sampler=sampler, **self._loader_options())
        sampler = LatentSampler(self.train, rank, world_size, shuffle=True, seed=self.seed, even=True)
        return ResumableDataLoader(self.train, self.batch_size, sampler=sampler, drop_last=True, **self._loader_options())

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None:
            return []
        rank, world_size = self._rank_and_world_size()
        if self.val.buckets is not None:  # every latent once, partial batches kept, as without buckets
            sampler = BucketBatchSampler(self.val, self.val.bucket_of, self.val_batch_size, rank, world_size,
                                         shuffle=False, seed=self.seed, even=False, drop_last=False)
            return KeptLoader(self.val, None, sampler=sampler, **self._loader_options())
        sampler = LatentSampler(self.val, rank, world_size, shuffle=False, seed=self.seed, even=False)
        return KeptLoader(self.val, self.val_batch_size, sampler=sampler, **self._loader_options())
