"""Tar shards in the img2dataset layout ({key}.jpg|png|webp, {key}.txt, {key}.json) read with webdataset.

Two modes:
  finite     (resampled=False): every sample once per pass; shards split by rank, then by DataLoader worker.
             Ranks may get different sample counts, so use it for validation, caching and evaluation.
  resampled  (resampled=True): each rank and worker draws shards with replacement, and a pass ends after
             `epoch_samples` samples per rank, so every rank runs the same number of steps (no DDP hang).

The rank is never read from RANK/WORLD_SIZE inside a worker (launchers differ on setting them): it is
given to the constructor, set by ImageDataModule.setup from the trainer, or read from torch.distributed.
"""

import itertools
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator, url_opener

from ldm.data.skips import SkipCounter
from ldm.data.transforms import CROPS, load_rgb, prepare_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_EMPTY_DRAWS = 100  # resampled mode: this many shards in a row without a usable sample is an error, not a hang


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Shard list from a brace pattern ('shards/{00000..00099}.tar', '::' joins patterns) or a list."""
    shards = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else [str(url) for url in urls]
    if not shards:
        raise ValueError(f"no shards in urls={urls!r}; set data.urls")
    local = [s for s in shards if "://" not in s and not s.startswith("pipe:")]
    missing = [s for s in local if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(shards)} shards not found, e.g. {missing[0]!r}; check data.urls"
        )
    return shards


def distributed_rank() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised in this process, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def tar_members(streams: Iterator[dict], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """Files of each opened shard, then an end-of-shard marker even when the shard is truncated.

    webdataset's own expander emits no marker after a read error, so the partial last sample of a
    truncated shard could merge with a same-named first sample of the next shard.
    """
    for shard in streams:
        try:
            for member in tar_file_iterator(shard["stream"], handler=handler):
                member["__url__"] = shard["url"]
                yield member
        except Exception as err:  # tarfile.ReadError on a truncated shard, OSError on a bad disk
            handler(err)
        finally:
            shard["stream"].close()
        yield {}


class WebImageDataset(IterableDataset):
    """Image(+caption) samples from webdataset tar shards; corrupt or partial samples are skipped and counted."""

    def __init__(
        self,
        urls: str | Sequence[str],
        resolution: int = 256,
        crop: str = "center",
        flip: bool = False,
        resampled: bool = False,
        epoch_samples: int | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if resampled and (epoch_samples is None or epoch_samples <= 0):
            raise ValueError("resampled=True streams forever: set epoch_samples (samples per rank per epoch) > 0")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.shards = expand_shards(urls)
        self.resolution, self.crop, self.flip = resolution, crop, flip
        self.resampled, self.epoch_samples = resampled, epoch_samples
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.rank, self.world_size = None, None
        if rank is not None or world_size is not None:
            self.set_rank(rank, world_size)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            self.set_rank(*distributed_rank())
        self.skipped = SkipCounter("sample")
        self.read_errors = SkipCounter("shard read")
        self._passes = 0
        self._draws_since_item = 0

    def set_rank(self, rank: int, world_size: int) -> None:
        """Fix this process's rank before DataLoader workers start (they copy it with the dataset)."""
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank=}, {world_size=}")
        self.rank, self.world_size = rank, world_size

    @property
    def num_skipped(self) -> int:
        """Samples skipped so far (undecodable or missing image, bad caption), summed over workers."""
        return self.skipped.count

    def _on_read_error(self, err: Exception) -> bool:
        self.read_errors.add("shard", err)
        return True  # keep going with the next file or shard

    def _to_item(self, sample: dict) -> dict | None:
        """Decode one grouped tar sample; a bad one is counted and dropped (webdataset handlers skip no map stage)."""
        key = sample.get("__key__", "?")
        try:
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if ext is None:
                raise ValueError(f"no image among {sorted(k for k in sample if not k.startswith('__'))}")
            image = prepare_image(load_rgb(sample[ext]), self.resolution, self.crop, self.flip)
            if "txt" in sample:
                caption = sample["txt"].decode("utf-8").strip()
            else:
                caption = str(json.loads(sample["json"]).get("caption") or "") if "json" in sample else ""
            label = int(sample["cls"].decode("utf-8")) if "cls" in sample else -1
        except Exception as err:
            self.skipped.add(f"{sample.get('__url__')}:{key}", err)
            return None
        self._draws_since_item = 0
        return {"image": image, "caption": caption, "label": label, "key": key}

    def __iter__(self) -> Iterator[dict]:
        rank, world_size = (self.rank, self.world_size) if self.rank is not None else distributed_rank()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # shard/sample order: distinct per rank, worker and pass; reproducible when torch is seeded
        # (torch.initial_seed() is the DataLoader's per-worker seed inside a worker)
        self._passes += 1
        entropy = [self.seed, rank, worker, self._passes, torch.initial_seed()]
        rng = random.Random(int(np.random.SeedSequence(entropy).generate_state(1)[0]))

        if self.resampled:
            # drawing independently per rank and worker needs no split and never runs dry
            shards = self._draw_shards(rng)
        else:
            mine = self.shards[rank::world_size][worker::num_workers]
            if not mine:
                log.warning("rank %d worker %d has no shards (%d shards for %d ranks x %d workers)",
                            rank, worker, len(self.shards), world_size, num_workers)
            if self.shuffle_buffer > 0:
                rng.shuffle(mine)
            shards = ({"url": url} for url in mine)

        samples = group_by_keys(tar_members(url_opener(shards, handler=self._on_read_error), self._on_read_error),
                                handler=self._on_read_error)
        items = (item for item in map(self._to_item, samples) if item is not None)
        if self.shuffle_buffer > 0:
            items = wds.shuffle(self.shuffle_buffer, rng=rng)(items)
        if self.resampled:  # `epoch_samples` per rank, spread over its workers
            per_worker = self.epoch_samples // num_workers + int(worker < self.epoch_samples % num_workers)
            items = itertools.islice(items, per_worker)
        yield from items

    def _draw_shards(self, rng: random.Random) -> Iterator[dict]:
        """Shards drawn with replacement, forever, unless none of the last MAX_EMPTY_DRAWS gave a sample."""
        self._draws_since_item = 0
        while self._draws_since_item < MAX_EMPTY_DRAWS:
            self._draws_since_item += 1
            yield {"url": rng.choice(self.shards)}
        raise RuntimeError(
            f"{MAX_EMPTY_DRAWS} shards in a row gave no usable sample (see the logged errors); check data.urls"
        )
