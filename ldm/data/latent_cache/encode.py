"""The encode loop: cache_latents() encodes a dataset with a frozen first stage into the shards this process claims.

Safe to run as several ranks, as independent processes on the same directory, and again after a kill: complete
shards are kept, claimed ones left to their live writer, the rest (re)written; the last process to finish
writes the manifest.
"""
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.data.latent_cache.claims import Claim, try_claim
from ldm.data.latent_cache.format import ShardPlan
from ldm.data.latent_cache.inputs import CheckedItems, ClaimedShardBatches, collate_checked, probe_image_shape
from ldm.data.latent_cache.manifest import ensure_plan, new_plan, write_manifest_if_complete
from ldm.data.latent_cache.verify import completed_shard
from ldm.data.latent_cache.writer import ShardWriter
from ldm.utils.errors import ConfigError, CorruptDataError


@dataclass
class CacheResult:
    """What one process did: images it encoded and skipped, shards it wrote or found done, the manifest."""

    encoded: int
    skipped: int
    shards_written: int
    shards_found_complete: int
    shards_left_to_others: int
    seconds: float
    manifest: Path | None

    @property
    def images_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def finish(counts: dict, seconds: float, out_dir: Path) -> CacheResult:
    """Wait for every rank's shards, then write the manifest if all are done (any process may) and report."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return CacheResult(
        encoded=counts["encoded"],
        skipped=counts["skipped"],
        shards_written=counts["written"],
        shards_found_complete=counts["found_complete"],
        shards_left_to_others=counts["left_to_others"],
        seconds=seconds,
        manifest=write_manifest_if_complete(out_dir),
    )


def _progress(enabled: bool) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, disable=not enabled)


@torch.inference_mode()
def encode_moments(first_stage: torch.nn.Module, images: torch.Tensor, flip: bool) -> dict[str, torch.Tensor]:
    """Posterior mean and std [B, C, h, w] of the images (and of their mirror images), cast to float16 on CPU."""
    x = torch.cat([images, images.flip(-1)]) if flip else images
    posterior = first_stage.encode(x)
    mean, std = posterior.mean.float(), posterior.std.float()
    if not (torch.isfinite(mean).all() and mean.abs().max() < 6e4 and std.max() < 6e4):
        raise ValueError("posterior moments overflow float16 (|mean| or std >= 6e4): is this a trained first stage?")
    mean, std = mean.to("cpu", torch.float16), std.to("cpu", torch.float16)
    batch = images.shape[0]
    moments = {"mean.npy": mean[:batch], "std.npy": std[:batch]}
    if flip:
        moments.update({"flip.mean.npy": mean[batch:], "flip.std.npy": std[batch:]})
    return moments


class ShardClaimer:
    """The loader's claim hook: a shard that is complete (sha256-verified) or held by a live process is left out."""

    def __init__(self, out_dir: Path, layout: ShardPlan, stale_after_s: float, counts: Counter, advance: Callable):
        self.out_dir, self.layout, self.stale_after_s = out_dir, layout, stale_after_s
        self.counts, self.advance = counts, advance
        self.claims: dict[int, Claim] = {}  # held now, released as each shard is committed

    def _complete(self, shard: int) -> bool:
        return completed_shard(self.out_dir, self.layout, shard, check_sha256=True) is not None

    def __call__(self, shard: int) -> bool:
        if self._complete(shard):
            self.counts["found_complete"] += 1
        elif (held := try_claim(self.out_dir, shard, self.stale_after_s)) is None:
            self.counts["left_to_others"] += 1
        elif self._complete(shard):  # finished while we claimed
            held.release(shard_complete=True)
            self.counts["found_complete"] += 1
        else:
            self.claims[shard] = held
            return True
        self.advance(len(self.layout.indices(shard)))
        return False


def _write_shards(
    loader: DataLoader, first_stage: torch.nn.Module, device: torch.device, flip: bool, claimer: ShardClaimer
) -> None:
    """Encode each batch into its shard's writer; commit a shard once all its inputs are written or skipped."""
    writers: dict[int, ShardWriter] = {}
    claims, counts, layout = claimer.claims, claimer.counts, claimer.layout
    try:
        for batch in loader:
            if batch["fatal"]:  # a dataset told to raise on corrupt data (raised here, not in a worker)
                raise CorruptDataError(batch["fatal"][0])
            shard = layout.shard_of((batch["indices"] or [s["index"] for s in batch["skipped"]])[0])
            if shard not in writers:
                writers[shard] = ShardWriter(claimer.out_dir, layout, claims[shard], flip)
            images = batch["images"]
            moments = None if images is None else encode_moments(first_stage, images.to(device, non_blocking=True), flip)
            writers[shard].add_batch(batch, moments)
            counts["encoded"] += len(batch["indices"])
            counts["skipped"] += len(batch["skipped"])
            claims[shard].heartbeat()
            claimer.advance(len(batch["indices"]) + len(batch["skipped"]))
            if writers[shard].done:
                committed = writers.pop(shard).commit() is not None
                claims.pop(shard).release(shard_complete=committed)
                counts["written"] += committed
    finally:  # an exception or interrupt: drop half-written shards and our claims so a re-run redoes them
        for writer in writers.values():
            writer.abort()
        for held in claims.values():
            held.release(shard_complete=False)


def cache_latents(
    first_stage: torch.nn.Module,
    dataset: Dataset,
    out_dir: str | Path,
    *,
    first_stage_hash: str,
    first_stage_config: dict | None = None,
    source: dict | None = None,
    samples_per_shard: int = 1000,
    batch_size: int = 64,
    num_workers: int = 0,
    flip: bool = True,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    stale_after_s: float = 600.0,
    progress: bool = True,
) -> CacheResult:
    """Encode every item of `dataset` with the frozen `first_stage` (anything with encode(x) -> .mean, .std)."""
    if isinstance(dataset, IterableDataset):
        raise ConfigError("latent caching needs a map-style dataset (indexable, with a length), not a stream")
    if batch_size <= 0 or num_workers < 0:
        raise ValueError(f"need batch_size > 0 and num_workers >= 0, got {batch_size=}, {num_workers=}")
    out_dir, device = Path(out_dir), torch.device(device)
    first_stage = first_stage.to(device).eval()
    layout = ShardPlan(len(dataset), samples_per_shard)
    image_shape = probe_image_shape(dataset)
    latent_shape = encode_moments(first_stage, torch.zeros(1, *image_shape, device=device), flip=False)["mean.npy"].shape[1:]
    ensure_plan(out_dir, new_plan(layout, image_shape, latent_shape, first_stage_hash=first_stage_hash,
                                  first_stage_config=first_stage_config, source=source, flip=flip))

    my_shards = layout.shards_for_rank(rank, world_size)
    bar, counts = _progress(progress), Counter()
    total = sum(len(layout.indices(s)) for s in my_shards)
    bar_task = bar.add_task(f"caching {out_dir.name} (rank {rank} of {world_size})", total=total)
    claimer = ShardClaimer(out_dir, layout, stale_after_s, counts, partial(bar.advance, bar_task))
    loader = DataLoader(
        CheckedItems(dataset, image_shape),
        batch_sampler=ClaimedShardBatches(layout, my_shards, batch_size, claimer),
        num_workers=num_workers,
        collate_fn=collate_checked,
        pin_memory=device.type == "cuda",
    )
    start = time.perf_counter()
    with bar:
        _write_shards(loader, first_stage, device, flip, claimer)
    seconds = time.perf_counter() - start

    return finish(counts, seconds, out_dir)
