"""Tar shards in the img2dataset layout ({key}.jpg|png|webp, {key}.txt, {key}.json) read with webdataset.

Three modes; the last two give every rank the same count, so DDP never waits at an epoch end:
  finite     (resampled=False, epoch_samples=None): every sample once per pass; shards split by rank, then
             by DataLoader worker. Ranks may get different counts: for validation, caching, evaluation.
  equalized  (resampled=False, epoch_samples=N): the same split, but each rank yields exactly N samples per
             pass, cycling its own shards when they run short (like DistributedSampler's padding).
  resampled  (resampled=True, epoch_samples=N): each rank and worker draws shards with replacement and
             yields exactly its share of N; needs no split and never runs dry (training at LAION scale).

A pass's shard order, draws and shuffle buffer are seeded by (seed, epoch, rank, worker); StreamLoader
(ldm/data/stream_loader.py) numbers the passes and keeps the count in checkpoints, so a resumed run does not replay its stream.
The rank comes from set_rank() (ImageDataModule.setup passes the trainer's), else torch.distributed at
construction, else `dist_env()` when iterating (a spawned DataLoader worker has no process group, only env).
"""

import itertools
import logging
import multiprocessing
import random
from collections.abc import Iterator, Sequence
from multiprocessing.context import get_spawning_popen
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.tariterators import url_opener

from ldm.data.preprocess import Preprocess, prepare_sample
from ldm.data.skips import SkipCounter, is_skipped
from ldm.data.tar_samples import tar_samples
from ldm.data.transforms import CROPS, uint8_to_tensor
from ldm.utils.dist_env import dist_env

log = logging.getLogger(__name__)

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


def stream_seed(seed: int, epoch: int, rank: int, worker: int) -> int:
    """The seed of one rank's worker's pass: independent streams for every (seed, epoch, rank, worker)."""
    return int(np.random.SeedSequence([seed, epoch, rank, worker]).generate_state(1)[0])


def worker_share(total: int, worker: int, num_workers: int) -> int:
    """Worker `worker`'s part of `total` samples: equal parts, the first `total % num_workers` workers one more."""
    return total // num_workers + int(worker < total % num_workers)


def shard_samples(streams: Iterator[dict]) -> Iterator[dict]:
    """Grouped samples of each opened shard (ldm/data/tar_samples.py), tagged with the shard's url.

    The sample in progress where a shard is truncated (read error or no end-of-archive block) comes marked with
    `__error__`: webdataset's own grouping would hand its members on as a complete-looking sample.
    """
    for shard in streams:
        try:
            for sample in tar_samples(shard["stream"], shard["url"]):
                yield {**sample, "__url__": shard["url"]}
        finally:
            shard["stream"].close()


class SharedEpoch:
    """The epoch set in the main process, read at each pass by DataLoader workers, persistent ones included."""

    def __init__(self):
        # (epoch, times set); a "spawn" context array travels to forked and spawned workers alike
        self._shared = multiprocessing.get_context("spawn").Array("q", [0, 0])

    def set(self, epoch: int) -> None:
        with self._shared.get_lock():
            self._shared[0], self._shared[1] = epoch, self._shared[1] + 1

    def get(self) -> tuple[int, int]:
        """(epoch, how many times it was set)."""
        with self._shared.get_lock():
            return self._shared[0], self._shared[1]

    def __getstate__(self) -> dict:
        # shared memory may only travel to a process being started; any other copy gets its own
        return {"shared": self._shared if get_spawning_popen() is not None else None, "value": self.get()}

    def __setstate__(self, state: dict) -> None:
        self._shared = state["shared"]
        if self._shared is None:
            self._shared = multiprocessing.get_context("spawn").Array("q", list(state["value"]))


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
        min_size: int = 0,
        max_aspect: float | None = None,
        empty_caption: str = "keep",
        buckets: Sequence[Sequence[int]] | None = None,
    ):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if resampled and epoch_samples is None:
            raise ValueError("resampled=True streams forever: set epoch_samples (samples per rank per epoch) > 0")
        if epoch_samples is not None and epoch_samples <= 0:
            raise ValueError(f"epoch_samples (samples per rank per epoch) must be > 0, got {epoch_samples}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.shards = expand_shards(urls)
        self.resolution, self.crop, self.flip = resolution, crop, flip
        # the filters (ldm/data/preprocess.py), applied here and by task=cache_latents, which records them in its plan;
        # aspect-ratio buckets only by the cache, whose reader batches one bucket at a time (ImageDataModule refuses them)
        self.preprocess = Preprocess(resolution, min_size, max_aspect, empty_caption, buckets)
        self.resampled, self.epoch_samples = resampled, epoch_samples
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.rank, self.world_size = None, None
        if rank is not None or world_size is not None:
            self.set_rank(rank, world_size)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            self.set_rank(torch.distributed.get_rank(), torch.distributed.get_world_size())
        self.skipped = SkipCounter("sample")
        self.read_errors = SkipCounter("shard read")
        self._epoch = SharedEpoch()
        self._epoch_seen, self._passes = None, 0  # per process: which set_epoch call, passes started since
        self._draws_since_item = 0

    def set_rank(self, rank: int, world_size: int) -> None:
        """Fix this process's rank before DataLoader workers start (they copy it with the dataset)."""
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank=}, {world_size=}")
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        """Seed the next pass with `epoch` (passes after it without a new call use epoch + 1, + 2, ...).

        Call it every epoch when workers are not persistent: a fresh worker copy cannot count passes.
        """
        self._epoch.set(epoch)

    @property
    def num_skipped(self) -> int:
        """Samples skipped so far (undecodable or missing image, bad caption), summed over workers."""
        return self.skipped.count

    def _on_read_error(self, err: Exception) -> bool:
        self.read_errors.add("shard", err)
        return True  # keep going with the next file or shard

    def _to_item(self, sample: dict) -> dict | None:
        """Decode one grouped tar sample as the cache does (prepare_sample); a bad one is counted and dropped."""
        if "__error__" in sample:  # a truncated shard: its last sample is counted, then the shard itself
            self.read_errors.add(sample.get("__url__"), sample["__error__"])
        prepared = prepare_sample(sample, self.preprocess, self.crop)
        if is_skipped(prepared):
            self.skipped.add(f"{sample.get('__url__')}:{prepared['key']}", f"{prepared['skip']}: {prepared['message']}")
            return None
        pixels, meta = prepared["pixels"], prepared["meta"]
        if self.flip and bool(torch.rand(()) < 0.5):
            pixels = pixels[:, ::-1]  # [H,W,3]: mirror the width axis
        self._draws_since_item = 0
        # the cache's record fields, so size/crop conditioning reads the same keys from either source
        return {"image": uint8_to_tensor(pixels), "caption": meta["caption"], "label": meta["label"],
                "key": meta["key"], "original_size": torch.tensor(meta["original_size"]),
                "crop_box": torch.tensor(meta["crop_box"])}

    def _pass_epoch(self) -> int:
        """The epoch of the pass starting now: the last set_epoch value plus the passes this process began since."""
        epoch, times_set = self._epoch.get()
        if times_set != self._epoch_seen:
            self._epoch_seen, self._passes = times_set, 0
        self._passes += 1
        return epoch + self._passes - 1

    def __iter__(self) -> Iterator[dict]:
        env = dist_env()
        rank, world_size = (self.rank, self.world_size) if self.rank is not None else (env.rank, env.world_size)
        worker, num_workers = env.worker, env.num_workers
        rng = random.Random(stream_seed(self.seed, self._pass_epoch(), rank, worker))

        if self.resampled:  # drawing independently per rank and worker needs no split and never runs dry
            urls = (rng.choice(self.shards) for _ in itertools.count())
            shards = self._watch(urls, patience=MAX_EMPTY_DRAWS)
        else:
            mine = self.shards[rank::world_size][worker::num_workers]
            if not mine and self.epoch_samples is not None:
                raise ValueError(
                    f"rank {rank} worker {worker} has no shards ({len(self.shards)} shards for {world_size} ranks x "
                    f"{num_workers} workers), so it cannot yield its share of epoch_samples: use resampled=True, "
                    "more shards or fewer workers"
                )
            if not mine:
                log.warning("rank %d worker %d has no shards (%d shards for %d ranks x %d workers)",
                            rank, worker, len(self.shards), world_size, num_workers)
            if self.epoch_samples is None:  # one pass over this worker's shards
                shards = ({"url": url} for url in self._shuffled(mine, rng))
            else:  # round after round; 2 rounds' worth of empty shards in a row is an error, not a hang
                urls = itertools.chain.from_iterable(self._shuffled(mine, rng) for _ in itertools.count())
                shards = self._watch(urls, patience=2 * len(mine))

        samples = shard_samples(url_opener(shards, handler=self._on_read_error))
        items = (item for item in map(self._to_item, samples) if item is not None)
        if self.shuffle_buffer > 0:
            items = wds.shuffle(self.shuffle_buffer, rng=rng)(items)
        if self.epoch_samples is not None:  # `epoch_samples` per rank, spread over its workers
            items = itertools.islice(items, worker_share(self.epoch_samples, worker, num_workers))
        yield from items

    def _shuffled(self, urls: list[str], rng: random.Random) -> list[str]:
        """A round's shard order: shuffled when samples are (shuffle_buffer > 0), else as listed."""
        urls = list(urls)
        if self.shuffle_buffer > 0:
            rng.shuffle(urls)
        return urls

    def _watch(self, urls: Iterator[str], patience: int) -> Iterator[dict]:
        """Shards of an endless stream, stopped with an error once `patience` in a row gave no usable sample."""
        self._draws_since_item = 0
        for url in urls:
            if self._draws_since_item >= patience:
                raise RuntimeError(
                    f"{patience} shards in a row gave no usable sample (see the logged errors); check data.urls"
                )
            self._draws_since_item += 1
            yield {"url": url}
