"""Latent cache throughput on CPU: encode images/s (writer), reader samples/s, bytes on disk per sample.

    python benchmarks/bench_latent_cache.py [--images 2000] [--resolution 32] [--num-workers 2]

A tiny untrained KL autoencoder (f = 2, 4 latent channels) encodes procedural shapes; the numbers measure
the cache machinery (decode workers, tar writing, index, reads), not a real first stage.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ldm.data.latent_cache import LatentDataset, cache_latents
from ldm.data.latent_cache.encode import encode_moments
from ldm.data.latents import LatentSampler
from ldm.data.shapes import ShapesDataset
from ldm.models.first_stage import first_stage_hash
from ldm.utils.safe_config import safe_instantiate

TINY_AUTOENCODER = {
    "_target_": "ldm.models.autoencoder.AutoencoderModule",
    "net": {"_target_": "ldm.nn.autoencoder.AutoencoderKL", "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1,
            "z_channels": 4, "embed_dim": 4},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--no-flip", dest="flip", action="store_false")
    args = parser.parse_args()

    torch.manual_seed(0)
    first_stage = safe_instantiate(OmegaConf.create(TINY_AUTOENCODER)).eval().requires_grad_(False)
    dataset = ShapesDataset(size=args.images, resolution=args.resolution)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "train"
        result = cache_latents(
            first_stage, dataset, out, first_stage_hash=first_stage_hash(first_stage),
            samples_per_shard=args.samples_per_shard, batch_size=args.batch_size, num_workers=args.num_workers,
            flip=args.flip, progress=False,
        )
        shard_bytes = sum(p.stat().st_size for p in out.glob("shard-*.tar"))

        # the first stage alone on the same batches: what the cache machinery adds on top
        images = torch.stack([dataset[i]["image"] for i in range(min(args.images, 512))])
        start = time.perf_counter()
        for batch in images.split(args.batch_size):
            encode_moments(first_stage, batch, args.flip)
        encode_only_per_s = len(images) / (time.perf_counter() - start)

        start = time.perf_counter()
        latents = LatentDataset(out)
        index_s = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(len(latents)):
            latents[(0, i)]
        read_per_s = len(latents) / (time.perf_counter() - start)
        sampler = LatentSampler(latents, shuffle=True)
        loader = DataLoader(latents, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers)
        start = time.perf_counter()
        for _ in loader:
            pass
        loader_per_s = len(latents) / (time.perf_counter() - start)

    print(f"images: {args.images} at {args.resolution}px, flip={args.flip}, latent {list(latents.latent_shape)}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"encode (writer, {args.num_workers} workers, batch {args.batch_size}): {result.images_per_s:.1f} images/s")
    print(f"first stage alone on in-memory batches: {encode_only_per_s:.1f} images/s")
    print(f"reader index build: {index_s:.2f} s for {len(latents)} samples")
    print(f"reader, one process: {read_per_s:.0f} samples/s")
    print(f"reader, DataLoader with {args.num_workers} workers (shuffled): {loader_per_s:.0f} samples/s")
    print(f"bytes on disk per sample: {shard_bytes / len(latents):.0f}")


if __name__ == "__main__":
    main()
