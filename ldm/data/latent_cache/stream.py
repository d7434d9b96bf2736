"""The streaming encode loop: cache_stream_latents() turns input tar shard i (webdataset / img2dataset layout)
into latent shard i, shard after shard as claims allow.

Shards are the unit of work, as in encode.py: processes split them through claims, a killed run redoes only the
shards it had not committed, and each shard's bytes depend only on its input, the first stage, the preprocessing and
batch_size (and the device's arithmetic: CPU convolutions may round differently with another thread count), so a
resumed cache is byte-identical to an uninterrupted one. Input shard s's j-th sample is record
s * STREAM_SHARD_SLOTS + j (format.stream_layout); skipped samples are counted per reason in the shard's sidecar.
Worker processes decode and crop (PIL, no torch); the main process encodes, in tar order. With aspect-ratio buckets
(Preprocess.buckets) each bucket fills its own batches, so a shard's records come grouped by batch, not in tar
order; its sidecar counts the records per bucket and names each record's bucket.
"""
import multiprocessing
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from itertools import islice
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ldm.data.buckets import check_divisible
from ldm.data.latent_cache.encode import CacheResult, ShardClaimer, encode_moments, finish
from ldm.data.latent_cache.format import STREAM_SHARD_SLOTS, stream_layout
from ldm.data.tar_samples import open_shard, tar_samples
from ldm.data.latent_cache.manifest import ensure_plan, new_plan
from ldm.data.latent_cache.writer import ShardWriter
from ldm.data.preprocess import Preprocess, prepare_sample
from ldm.data.transforms import uint8_to_tensor

AHEAD_CHUNKS = 4  # chunks in flight per worker: decoding overlaps encoding, memory stays bounded


def ordered_map(fn: Callable, items: Iterable, *, pool, chunk_size: int, ahead: int) -> Iterator:
    """fn over items in order, by `pool` (None: in this process), up to `ahead` chunks ahead of the consumer."""
    if pool is None:
        yield from map(fn, items)
        return
    items, pending = iter(items), deque()
    while chunk := list(islice(items, chunk_size)):
        pending.append(pool.map_async(fn, chunk))
        if len(pending) >= ahead:
            yield from pending.popleft().get()
    while pending:
        yield from pending.popleft().get()


def stream_plan(urls: list[str], pre: Preprocess, latent_shape: tuple[int, ...], *, first_stage_hash: str,
                first_stage_config: dict | None, flip: bool,
                bucket_latent_shapes: list[tuple[int, ...]] | None = None) -> dict:
    """plan.json of a stream cache: input shards and preprocessing recorded; num_inputs null (counts unknown).

    With buckets, `bucket_latent_shapes` lists each bucket's latent shape; the first bucket is the plan's image and
    latent shape (readers that want one shape, e.g. for statistics' channel count, read that).
    """
    if (pre.buckets is None) != (bucket_latent_shapes is None):
        raise ValueError("bucket_latent_shapes goes with Preprocess.buckets, one shape per bucket")
    image_shape = (3, pre.resolution, pre.resolution) if pre.buckets is None else (3, *pre.buckets[0])
    plan = new_plan(stream_layout(len(urls)), image_shape,
                    latent_shape if bucket_latent_shapes is None else bucket_latent_shapes[0],
                    first_stage_hash=first_stage_hash, first_stage_config=first_stage_config,
                    source={"urls": urls, "preprocess": pre.as_dict()}, flip=flip)
    if pre.buckets is not None:
        plan.update(buckets=[list(b) for b in pre.buckets], latent_shapes=[list(s) for s in bucket_latent_shapes])
    return {**plan, "num_inputs": None}  # samples_per_shard is the slot count per input shard (STREAM_SHARD_SLOTS)


def probe_latent_shapes(first_stage: torch.nn.Module, pre: Preprocess, device: torch.device
                        ) -> tuple[tuple[int, ...], list[tuple[int, ...]] | None]:
    """(latent shape of a resolution x resolution image, each bucket's latent shape or None), by encoding zeros.

    A bucket whose sides are not multiples of the first stage's downsampling factor is a ConfigError: its latent would
    be rounded, and decode(encode(x)) would not give the bucket's size back.
    """
    def shape(height: int, width: int) -> tuple[int, ...]:
        probe = torch.zeros(1, 3, height, width, device=device)
        return tuple(encode_moments(first_stage, probe, flip=False)["mean.npy"].shape[1:])

    square = shape(pre.resolution, pre.resolution)
    if pre.buckets is None:
        return square, None
    check_divisible(pre.buckets, pre.resolution // square[-1], "the first stage's downsampling factor")
    return square, [shape(*bucket) for bucket in pre.buckets]


class StreamShardEncoder:
    """Encodes one claimed input shard into its ShardWriter: good samples in batches, skips counted by reason."""

    def __init__(self, first_stage: torch.nn.Module, device: torch.device, batch_size: int, flip: bool,
                 prepare: Callable[[Iterator[dict]], Iterator[dict]], counts: Counter, advance: Callable[[], None]):
        self.first_stage, self.device, self.batch_size, self.flip = first_stage, device, batch_size, flip
        self.prepare, self.counts, self.advance = prepare, counts, advance

    def _flush(self, writer: ShardWriter, batch: list[tuple[int, dict]]) -> None:
        """Encode one batch (one size: a bucket's, or the square) into the writer; the list is emptied."""
        images = torch.stack([uint8_to_tensor(item["pixels"]) for _, item in batch])
        moments = encode_moments(self.first_stage, images.to(self.device, non_blocking=True), self.flip)
        writer.add_batch({"indices": [i for i, _ in batch], "meta": [item["meta"] for _, item in batch],
                          "skipped": []}, moments)
        writer.claim.heartbeat()
        self.counts["encoded"] += len(batch)
        self.advance()
        batch.clear()

    def __call__(self, writer: ShardWriter, samples: Iterator[dict]) -> None:
        """Every sample of the shard, in tar order: position j is record writer.indices.start + j. Samples wait in their
        bucket's batch (one batch without buckets); the last partial batches are encoded in bucket order."""
        start, batches = writer.indices.start, defaultdict(list)
        for position, item in enumerate(self.prepare(samples)):
            if position >= STREAM_SHARD_SLOTS:
                raise ValueError(f"input shard {writer.claim.shard} holds more than {STREAM_SHARD_SLOTS} samples: "
                                 "split it into smaller shards")
            if "skip" in item:
                writer.skip(start + position, item["key"], item["skip"], item["message"])
                self.counts["skipped"] += 1
                continue
            batch = batches[item["meta"].get("bucket", 0)]
            batch.append((start + position, item))
            if len(batch) == self.batch_size:
                self._flush(writer, batch)
        for _, batch in sorted(batches.items()):
            if batch:
                self._flush(writer, batch)


def write_stream_shard(out_dir: Path, claimer: ShardClaimer, shard: int, url: str, encoder: StreamShardEncoder,
                       flip: bool, num_buckets: int | None = None) -> None:
    """Read, encode and commit one claimed shard; on any error drop the half-written shard and the claim."""
    claim = claimer.claims.pop(shard)
    writer, stream = ShardWriter(out_dir, claimer.layout, claim, flip, num_buckets), open_shard(url)
    try:
        encoder(writer, tar_samples(stream, url))
        stream.close()  # a failed `pipe:` command raises here, before anything is committed
    except BaseException:  # an error or interrupt: a re-run redoes this shard
        stream.close()
        writer.abort()
        claim.release(shard_complete=False)
        raise
    committed = writer.commit(input=url) is not None  # None: another process took the shard over
    claim.release(shard_complete=committed)
    claimer.counts["written"] += committed


def _progress(enabled: bool) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[images]}"))
    return Progress(*columns, disable=not enabled)


def cache_stream_latents(
    first_stage: torch.nn.Module,
    urls: list[str],
    out_dir: str | Path,
    preprocess: Preprocess,
    *,
    first_stage_hash: str,
    first_stage_config: dict | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    flip: bool = True,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    stale_after_s: float = 600.0,
    progress: bool = True,
) -> CacheResult:
    """Encode every sample of the tar shards `urls` (input shard i -> latent shard i) with the frozen `first_stage`."""
    if batch_size <= 0 or num_workers < 0 or not urls:
        raise ValueError(f"need urls, batch_size > 0 and num_workers >= 0, got {len(urls)} urls, {batch_size=}, "
                         f"{num_workers=}")
    out_dir, device = Path(out_dir), torch.device(device)
    first_stage = first_stage.to(device).eval()
    latent_shape, bucket_latent_shapes = probe_latent_shapes(first_stage, preprocess, device)
    ensure_plan(out_dir, stream_plan(list(urls), preprocess, latent_shape, first_stage_hash=first_stage_hash,
                                     first_stage_config=first_stage_config, flip=flip,
                                     bucket_latent_shapes=bucket_latent_shapes))
    num_buckets = None if preprocess.buckets is None else len(preprocess.buckets)
    layout = stream_layout(len(urls))
    my_shards = layout.shards_for_rank(rank, world_size)

    bar, counts = _progress(progress), Counter()
    bar_task = bar.add_task(f"caching {out_dir.name} (rank {rank} of {world_size})", total=len(my_shards),
                            images="0 images")
    claimer = ShardClaimer(out_dir, layout, stale_after_s, counts, lambda _: bar.advance(bar_task))
    # forked before the progress bar's thread starts; workers run PIL and numpy only
    pool = multiprocessing.get_context("fork").Pool(num_workers) if num_workers else None
    prepare = partial(ordered_map, partial(prepare_sample, pre=preprocess), pool=pool, chunk_size=batch_size,
                      ahead=AHEAD_CHUNKS * num_workers)
    start = time.perf_counter()

    def show_images() -> None:
        rate = counts["encoded"] / max(time.perf_counter() - start, 1e-9)
        bar.update(bar_task, images=f"{counts['encoded']} images, {rate:.1f} images/s")

    encoder = StreamShardEncoder(first_stage, device, batch_size, flip, prepare, counts, show_images)
    try:
        with bar:
            for shard in my_shards:
                if claimer(shard):
                    write_stream_shard(out_dir, claimer, shard, urls[shard], encoder, flip, num_buckets)
                    bar.advance(bar_task)
    finally:
        if pool is not None:
            pool.terminate()
    seconds = time.perf_counter() - start
    return finish(counts, seconds, out_dir)
