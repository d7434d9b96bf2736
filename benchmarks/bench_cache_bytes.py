"""Disk of a latent cache per image at 256 and 512 px: img2dataset shards of shapes scenes cached through an f=8,
4-channel KL first stage (random weights, narrow: the record size depends on the latent shape alone), then the
cache's shard bytes divided by the latents written; sidecar indexes counted apart.

    python benchmarks/bench_cache_bytes.py [--images 24] [--sizes 256 512] [--out DIR]

Records hold the posterior mean and std, and with task.flip=true (the default) those of the mirrored image too,
as float16 [4, s/8, s/8], plus key, caption, original size and crop box.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "rehearsal"))

import inputs  # noqa: E402
import weights  # noqa: E402

from ldm.data.latent_cache.format import read_json  # noqa: E402


def cache_bytes(out: Path, resolution: int, images: int) -> dict:
    """Write `images` scenes (plus the 4 corrupt ones of inputs.CORRUPT) as 2 shards, cache them, measure."""
    per_shard = (images + len(inputs.CORRUPT)) // 2
    urls = inputs.write_shards(out / "shards", 2, per_shard, resolution)
    data = ["data=webdataset", f"data.urls='{urls}'", f"data.resolution={resolution}",
            f"data.min_size={resolution // 2}", f"paths.root_dir={out}"]
    ckpt = out / "experiments" / "autoencoder_kl_f8" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    weights.first_stage_checkpoint(ckpt, ["model.net.ch=8", *data])
    subprocess.run([sys.executable, "main.py", "+experiment=autoencoder_kl_f8", *data, "task=cache_latents",
                    "task.num_workers=0", "task.progress=false", "task.batch_size=8"], cwd=ROOT, check=True)
    cache_dir = out / "data" / "latents" / "autoencoder_kl_f8" / "train"
    manifest = read_json(cache_dir / "manifest.json")
    shards = [p for p in cache_dir.glob("*.tar")]
    sidecars = [p for p in cache_dir.iterdir() if p.suffix != ".tar" and p.name != "manifest.json" and p.is_file()]
    n = manifest["num_samples"]
    return {"resolution": resolution, "latent_shape": manifest["latent_shape"], "num_samples": n,
            "skipped": manifest["skipped"]["total"], "shard_bytes": sum(p.stat().st_size for p in shards),
            "sidecar_bytes": sum(p.stat().st_size for p in sidecars)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        for resolution in args.sizes:
            r = cache_bytes(out / str(resolution), resolution, args.images)
            per = r["shard_bytes"] / r["num_samples"]
            side = r["sidecar_bytes"] / r["num_samples"]
            print(f"{resolution} px: latents {r['latent_shape']}, {r['num_samples']} cached ({r['skipped']} skipped), "
                  f"{r['shard_bytes']} shard bytes -> {per:,.0f} bytes/image (+{side:,.0f} sidecar); "
                  f"1M images {per * 1e6 / 1e9:,.1f} GB, 100M images {per * 1e8 / 1e12:,.2f} TB")


if __name__ == "__main__":
    main()
