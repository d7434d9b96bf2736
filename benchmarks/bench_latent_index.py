"""Latent cache start-up at scale: synthetic small latent records across shards, written by the cache's own
ShardWriter (sidecar index included), then LatentDataset's start-up time, index bytes per sample and random reads.

    python benchmarks/bench_latent_index.py [--records 1000000] [--shards 1000] [--workers 2] [--out DIR]
    python benchmarks/bench_latent_index.py --loader-workers 0 1 2 4 8 [--demand 342.7] [--seconds 5]

The records are stream-cache records (input shard s, sample j -> index s * STREAM_SHARD_SLOTS + j) with a
[4, 4, 4] latent, a caption, original size and crop box; no first stage runs, so this measures the index alone.
Start-up is timed with the shards just written (warm page cache). Targets (issue 14): start-up <= 10 s and
<= 100 index bytes per sample for 1,000,000 records in 1,000 shards.

`--loader-workers` measures instead the supply of SD-size records ([4, 32, 32], `--loader-records` of them) through
a torch DataLoader as training builds it (LatentSampler order, posterior draws, collate) with each number of worker
processes, in samples/s and as a multiple of a training step's demand (`--demand` images/s). Worker counts beyond the
machine's free cores only compete for them.
"""
import argparse
import json
import multiprocessing
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ldm.data.latent_cache import LatentDataset
from ldm.data.latent_cache.claims import try_claim
from ldm.data.latent_cache.format import read_json, sidecar_path, stream_layout
from ldm.data.latent_cache.manifest import ensure_plan, write_manifest_if_complete
from ldm.data.latent_cache.stream import stream_plan
from ldm.data.latent_cache.writer import ShardWriter
from ldm.data.latents import LatentSampler
from ldm.data.preprocess import Preprocess
from ldm.data.skips import collate_kept

LATENT_SHAPE = (4, 4, 4)
SD_LATENT_SHAPE = (4, 32, 32)  # 256 px through an f=8, 4-channel first stage, as txt2img trains
# The demand of one GPU training the SD2-size UNet: 342.7 images/s on an H200 in bf16 (benchmarks/RESULTS.md,
# `python benchmarks/bench_backbones.py`, 2026-12-04).
SD_STEP_IMAGES_PER_S = 342.7


def write_shard(out_dir: Path, num_shards: int, shard: int, count: int, shape: tuple[int, ...] = LATENT_SHAPE) -> None:
    """One shard of `count` random float16 posteriors, as the stream cache writes them."""
    layout, rng = stream_layout(num_shards), np.random.default_rng(shard)
    mean = rng.standard_normal((count, *shape)).astype(np.float16)
    std = np.abs(rng.standard_normal((count, *shape))).astype(np.float16)
    claim = try_claim(out_dir, shard, stale_after_s=600)
    writer = ShardWriter(out_dir, layout, claim, flip=False)
    for j in range(count):
        meta = {"key": f"{shard:05d}{j:04d}", "caption": f"a synthetic caption number {j}", "label": -1,
                "original_size": [640, 480], "crop_box": [80, 0, 560, 480]}
        writer.add(layout.indices(shard).start + j, meta, {"mean.npy": mean[j], "std.npy": std[j]})
    writer.add_stats(torch.from_numpy(mean), torch.from_numpy(std))
    writer.commit(input=f"synthetic/{shard:05d}.tar")
    claim.release(shard_complete=True)


def build(out_dir: Path, records: int, shards: int, workers: int, shape: tuple[int, ...] = LATENT_SHAPE) -> float:
    """Write the cache (plan, shards, manifest); returns seconds taken."""
    urls = [f"synthetic/{s:05d}.tar" for s in range(shards)]
    ensure_plan(out_dir, stream_plan(urls, Preprocess(32), shape, first_stage_hash="synthetic",
                                     first_stage_config=None, flip=False))
    counts = [records // shards + int(s < records % shards) for s in range(shards)]
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.starmap(write_shard, [(out_dir, shards, s, counts[s], shape) for s in range(shards)], chunksize=4)
    write_manifest_if_complete(out_dir)
    return time.perf_counter() - start


def random_reads(data: LatentDataset, reads: int) -> float:
    """Samples per second of `reads` random items (epoch 0), one process."""
    picks = np.random.default_rng(0).integers(0, len(data), reads)
    start = time.perf_counter()
    for i in picks.tolist():
        data[(0, i)]
    return reads / (time.perf_counter() - start)


def loader_supply(data: LatentDataset, workers: int, batch_size: int, seconds: float) -> tuple[float, float]:
    """(samples/s after the first batch, seconds to the first batch) of a training-style DataLoader with `workers`
    processes, read for about `seconds`; passes over the data repeat with the next epoch's order."""
    sampler = LatentSampler(data, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size, sampler=sampler, drop_last=True, collate_fn=collate_kept,
                                         num_workers=workers, persistent_workers=workers > 0)
    start, first_s, samples, epoch = time.perf_counter(), None, 0, 0
    while True:
        sampler.set_epoch(epoch)
        for batch in loader:
            now = time.perf_counter()
            if first_s is None:  # worker start-up and their first batches: not part of the steady supply
                first_s, start = now - start, now
                continue
            samples += len(batch["latent"])
            if now - start >= seconds:
                return samples / (now - start), first_s
        epoch += 1


def bench_loader_workers(args: argparse.Namespace) -> None:
    """The `--loader-workers` mode: SD-size records through a DataLoader at each worker count."""
    # more workers than cores is the point of some rows here: the table shows what they cost
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sd"
        build_s = build(out, args.loader_records, args.loader_shards, args.workers, SD_LATENT_SHAPE)
        data = LatentDataset(out)
        print(f"{len(data)} SD-size records {list(SD_LATENT_SHAPE)} float16 in {args.loader_shards} shards "
              f"(written in {build_s:.0f} s), batches of {args.batch_size} in random order with the posterior draw, "
              f"{args.seconds:g} s per row; {os.cpu_count()} CPUs here")
        print(f"{'workers':>7}  {'samples/s':>10}  {'x demand':>8}  {'first batch':>11}   "
              f"(demand: {args.demand} images/s)")
        for workers in args.loader_workers:
            per_s, first_s = loader_supply(data, workers, args.batch_size, args.seconds)
            print(f"{workers:>7}  {per_s:>10,.0f}  {per_s / args.demand:>7.1f}x  {first_s:>9.2f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="processes writing shards")
    parser.add_argument("--reads", type=int, default=20000, help="random record reads timed after start-up")
    parser.add_argument("--out", type=Path, default=None, help="cache folder (default: a temporary one, deleted)")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=None, metavar="N",
                        help="instead: SD-size records through a DataLoader with each of these worker counts")
    parser.add_argument("--demand", type=float, default=SD_STEP_IMAGES_PER_S,
                        help="images/s one training step consumes (default: the H200 SD2 UNet step)")
    parser.add_argument("--loader-records", type=int, default=8192, help="SD-size records for --loader-workers")
    parser.add_argument("--loader-shards", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32, help="DataLoader batch size for --loader-workers")
    parser.add_argument("--seconds", type=float, default=5.0, help="reading time per worker count")
    args = parser.parse_args()
    if args.loader_workers:
        bench_loader_workers(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "train"
        build_s = build(out, args.records, args.shards, args.workers)

        start = time.perf_counter()
        data = LatentDataset(out)
        startup_s = time.perf_counter() - start
        assert len(data) == args.records

        sidecars = [read_json(sidecar_path(out, s)) for s in range(args.shards)]
        index_bytes = sum(len(json.dumps(s["index"])) for s in sidecars)
        sidecar_bytes = sum(sidecar_path(out, s).stat().st_size for s in range(args.shards))
        memory_bytes = sum(getattr(data, name).nbytes for name in ("shard_of", "record_of", "offsets", "json_bytes"))
        shard_bytes = sum(s["bytes"] for s in data.manifest["shards"])

        reads_per_s = random_reads(data, args.reads)
        build(Path(tmp) / "sd", 2048, 4, args.workers, SD_LATENT_SHAPE)  # SD-size records for the demand figure
        sd_reads_per_s = random_reads(LatentDataset(Path(tmp) / "sd"), 2000)

    n = args.records
    print(f"{n} records in {args.shards} shards, latent {list(LATENT_SHAPE)} float16, flip=False; written in "
          f"{build_s:.0f} s by {args.workers} processes")
    print(f"reader start-up (LatentDataset(), warm page cache): {startup_s:.2f} s")
    print(f"index in the sidecars: {index_bytes / n:.1f} bytes/sample (whole sidecars {sidecar_bytes / n:.1f}); "
          f"in memory {memory_bytes / n:.0f} bytes/sample")
    print(f"shards on disk: {shard_bytes / n:.0f} bytes/sample")
    print(f"random record reads, one process: {reads_per_s:.0f} samples/s")
    print(f"SD-size records {list(SD_LATENT_SHAPE)}, random reads (posterior draw included), one process: "
          f"{sd_reads_per_s:.0f} samples/s = {sd_reads_per_s / SD_STEP_IMAGES_PER_S:.1f}x the {SD_STEP_IMAGES_PER_S} "
          f"images/s one H200 trains the SD2 UNet at; k DataLoader workers per GPU give about k times that")


if __name__ == "__main__":
    main()
