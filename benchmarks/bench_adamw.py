"""AdamW implementations side by side on the shapes_txt2img model (UNet + jointly trained text encoder, 13.6M
parameters): seconds per optimizer step and per whole training step, on this machine's CPU or GPU.

    python benchmarks/bench_adamw.py [--batch 64] [--repeats 6]
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldm.diffusion.loss import denoising_loss

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=shapes_txt2img", "model.first_stage=null"])
    module = instantiate(cfg.model)
    params = [p for p in module.parameters() if p.requires_grad]
    batch = {"latent": torch.randn(args.batch, *cfg.model.latent_shape),
             "caption": ["a small red circle in the top left"] * args.batch, "label": torch.full((args.batch,), -1)}
    optimizers = {name: torch.optim.AdamW(params, 1e-4, **kw) for name, kw in
                  [("for-loop", dict(foreach=False)), ("foreach", dict(foreach=True)), ("fused", dict(fused=True))]}
    times = {name: ([], []) for name in optimizers}
    for _ in range(args.repeats):  # interleaved, so drifting load hits every variant alike
        for name, opt in optimizers.items():
            start = time.perf_counter()
            loss, _ = denoising_loss(module.denoiser, batch["latent"], module.conditioner.encode(batch),
                                     module.formulation)
            opt.zero_grad()
            loss.mean().backward()
            before_step = time.perf_counter()
            opt.step()
            end = time.perf_counter()
            times[name][0].append(end - before_step)
            times[name][1].append(end - start)
    print(f"{sum(p.numel() for p in params) / 1e6:.1f}M trained parameters, batch {args.batch}, "
          f"{torch.get_num_threads()} threads; medians of {args.repeats}")
    print(f"{'adamw':<10}{'optimizer s':>12}{'step s':>10}")
    for name, (opt_s, step_s) in times.items():
        print(f"{name:<10}{sorted(opt_s)[len(opt_s) // 2]:>12.3f}{sorted(step_s)[len(step_s) // 2]:>10.3f}")


if __name__ == "__main__":
    sys.exit(main())
