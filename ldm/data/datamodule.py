"""ImageDataModule: DataLoaders around already-built train/val datasets (Hydra builds them recursively)."""

from collections.abc import Callable, Sequence
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.data.condition_inputs import collate_with_inputs
from ldm.data.skips import KeptLoader, collate_kept
from ldm.data.stream_loader import StreamLoader
from ldm.utils.errors import ConfigError


class ImageDataModule(L.LightningDataModule):
    """Train/val loaders: map-style datasets are shuffled, streaming (iterable) ones shard themselves per rank.

    `resolution`, `root`, `urls`, the stream filters (`min_size`, `max_aspect`, `empty_caption`) and `buckets` are the
    config's top-level data knobs; the datasets were built from them, and they are kept here only so that callers can
    read them (e.g. `datamodule.resolution`). `inputs`: condition inputs made from each collated batch (inpainting
    masks, super-resolution's low-res image: ldm/data/condition_inputs.py), whatever the dataset.
    """

    def __init__(
        self,
        train: Dataset,
        val: Dataset | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        val_batch_size: int | None = None,
        pin_memory: bool = True,
        resolution: int | None = None,
        root: str | None = None,
        urls: str | Sequence[str] | None = None,
        min_size: int | None = None,
        max_aspect: float | None = None,
        empty_caption: str | None = None,
        buckets: Sequence[Sequence[int]] | None = None,
        inputs: Sequence[Callable[[dict], dict]] = (),
    ):
        super().__init__()
        if batch_size <= 0 or num_workers < 0:
            raise ValueError(f"need batch_size > 0 and num_workers >= 0, got {batch_size=}, {num_workers=}")
        self.train, self.val = train, val
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_batch_size = val_batch_size or batch_size
        self.pin_memory = pin_memory
        self.resolution, self.root, self.urls = resolution, root, urls
        self.min_size, self.max_aspect, self.empty_caption = min_size, max_aspect, empty_caption
        self.buckets = buckets
        self.inputs = tuple(inputs)

    def setup(self, stage: str) -> None:
        # Lightning calls this once the process group exists; streaming datasets take the rank now,
        # because inside DataLoader workers neither torch.distributed nor RANK is reliably there
        if self.trainer is None:
            return
        for dataset in (self.train, self.val):
            set_rank = getattr(dataset, "set_rank", None)
            if set_rank is not None:
                set_rank(self.trainer.global_rank, self.trainer.world_size)

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        if getattr(getattr(dataset, "preprocess", None), "buckets", None) is not None:
            raise ConfigError(
                "data.buckets is applied by task=cache_latents: train on the cache (data=stream_latents), whose "
                "reader draws each batch from one bucket; streamed images in a batch must share one size (buckets=null)"
            )
        # a streaming training set is numbered pass by pass (StreamLoader), so a resumed run draws new samples;
        # a map-style one may return skip markers for corrupt files (skips.py), which never reach the model
        loader = StreamLoader if train and hasattr(dataset, "set_epoch") else KeptLoader
        return loader(
            dataset,
            batch_size=batch_size,
            collate_fn=partial(collate_with_inputs, self.inputs) if self.inputs else collate_kept,
            shuffle=train and not isinstance(dataset, IterableDataset),  # Lightning swaps in a DistributedSampler
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val is None else self._loader(self.val, self.val_batch_size, train=False)
