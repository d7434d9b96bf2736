"""Images/s of every sampler from a trained checkpoint (EMA weights, classifier-free guidance on).

    python benchmarks/bench_samplers.py [--ckpt experiments/shapes_txt2img/checkpoints/last.ckpt] [--images 64]
"""
import argparse
import time

import torch

from ldm.diffusion.samplers import SAMPLERS
from ldm.utils.checkpoint import load_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", default="experiments/shapes_txt2img/checkpoints/last.ckpt")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args()
    module, _, _ = load_module(args.ckpt)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module.to(device)
    prompts = ["a large red circle in the center"] * args.images
    batch = module.sample_batch(prompts, None)
    print(f"{args.images} images, {args.steps} steps, guidance {args.guidance}, {device}, {torch.get_num_threads()} threads")
    print(f"{'sampler':16s} {'images/s':>9s} {'denoiser calls/image':>21s}")
    for name in SAMPLERS:
        start = time.perf_counter()
        module.sample(batch, list(range(args.images)), sampler=name, steps=args.steps, guidance_scale=args.guidance)
        elapsed = time.perf_counter() - start
        per_image = (2 * args.steps - 1) if name == "heun" else args.steps  # Heun: two evaluations but the last
        print(f"{name:16s} {args.images / elapsed:9.1f} {per_image:21d}")


if __name__ == "__main__":
    main()
