"""The per-step overheads removed from the demo's training step, each timed side by side (interleaved) in one run:
the null caption encoded once and broadcast vs once per sample, the EMA update in one fused call vs a Python loop
over parameters, and a whole training step (loss, backward, AdamW, EMA) with both vs neither.

    python benchmarks/bench_step_overheads.py [--batch-size 64] [--rounds 10]

The model is shapes_txt2img's (UNet, joint text transformer, EMA) on random latents [4, 8, 8] with shapes captions.
"""
import argparse
import time

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldm.diffusion.guidance import cfg_dropout
from ldm.diffusion.loss import denoising_loss
from ldm.models.ema import ema_decay
from ldm.utils.precision import cpu_name

from bench_train import CONFIGS  # noqa: E402  (benchmarks/ is the working directory's sibling of configs/)


def null_per_sample(conditioner, n: int) -> dict:
    """Before: the empty caption encoded n times."""
    return conditioner._encode_captions([""] * n)


@torch.no_grad()
def ema_loop(ema, net) -> None:
    """Before: one lerp per parameter, the count read back from the buffer every step."""
    d = ema_decay(int(ema.num_updates), ema.decay, ema.warmup)
    for p_ema, p in zip(ema.net.parameters(), net.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - d)
    for b_ema, b in zip(ema.net.buffers(), net.buffers()):
        b_ema.copy_(b)
    ema.num_updates += 1


def train_step(module, optimizer, batch: dict, g: torch.Generator, old: bool) -> None:
    null = null_per_sample(module.conditioner, len(batch["caption"])) if old else module.conditioner.null(
        len(batch["caption"]))
    cond = cfg_dropout(module.conditioner.encode(batch), null, 0.1, generator=g)
    loss, _ = denoising_loss(module.denoiser, batch["latent"], cond, module.formulation, generator=g)
    loss.mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    (ema_loop if old else type(module.ema).update)(module.ema, module.ema_target())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds; the median of each is reported")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=shapes_txt2img", "model.first_stage=null"])
    torch.manual_seed(0)
    module = instantiate(cfg.model).train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    prompts = list(cfg.sampling.prompts)
    batch = {"latent": torch.randn(args.batch_size, *module.latent_shape),
             "caption": [prompts[i % len(prompts)] for i in range(args.batch_size)],
             "label": torch.full((args.batch_size,), -1)}
    g = torch.Generator().manual_seed(0)
    cases = {
        "null condition": (lambda: null_per_sample(module.conditioner, args.batch_size),
                           lambda: module.conditioner.null(args.batch_size)),
        "EMA update": (lambda: ema_loop(module.ema, module.ema_target()),
                       lambda: module.ema.update(module.ema_target())),
        "training step": (lambda: train_step(module, optimizer, batch, g, old=True),
                          lambda: train_step(module, optimizer, batch, g, old=False)),
    }
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch_size}, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'':16s} {'before ms':>10s} {'after ms':>10s} {'speed-up':>9s}")
    for name, (before, after) in cases.items():
        with torch.no_grad() if name != "training step" else torch.enable_grad():
            before(), after()  # warm-up
            times = [(timed(before), timed(after)) for _ in range(args.rounds)]
        b, a = (sorted(t[i] for t in times)[len(times) // 2] for i in (0, 1))
        print(f"{name:16s} {b * 1e3:10.2f} {a * 1e3:10.2f} {b / a:8.2f}x", flush=True)


if __name__ == "__main__":
    main()
