"""Latent diffusion training throughput: steps/s and samples/s on cached latents vs on-the-fly encoding.

    python benchmarks/bench_train.py [--backbones unet dit] [--batch-size 16] [--steps 5] [--warmup 2] [--rows fp32]

Every row trains a fresh LatentDiffusionModule built from the shapes experiment configs (text conditioner,
EMA, AdamW) with Lightning for warmup + steps steps and times the last `steps`. `cached` reads a latent cache
written by the untrained shapes autoencoder (the real reader: tar reads and posterior sampling); `on-the-fly`
encodes images held in memory with that frozen first stage, so the ratio isolates the encoder's cost. CPU rows
compare fp32 with bf16 autocast; on a GPU, rows add torch.compile and SDPA's math kernel against its default
(flash / memory-efficient) kernels. FLOPs per step (forward + backward, encoder included) come from
torch.utils.flop_counter; MFU is against the GPU's dense bf16 peak (--peak-tflops for unlisted GPUs).
"""
import argparse
import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from ldm.callbacks.throughput import bf16_peak_flops
from ldm.data.latent_cache import LatentDataset, cache_latents
from ldm.data.shapes import ShapesDataset
from ldm.diffusion.loss import denoising_loss
from ldm.models.first_stage import first_stage_hash

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# backbone name -> overrides of +experiment=shapes_txt2img
DIT = ["model/backbone=dit_s", "model.backbone.hidden_size=192", "model.backbone.depth=6", "model.backbone.num_heads=3"]
BPE = ["model.conditioner.vocabulary=null"]  # the text encoder's full 49,408-row token table
BACKBONES = {
    "unet": [],                 # unet_tiny, as shapes_txt2img trains it
    "unet_bpe": BPE,            # the demo's model when issue 18 was filed: the step "before"
    "dit": DIT,                 # as shapes_txt2img_dit: `make demo`'s model, the step "after"
    "dit_bpe": DIT + BPE,
    "dit_128": [*DIT, "model.backbone.hidden_size=128", "model.backbone.num_heads=2"],  # a narrower DiT
    "dit_s": ["model/backbone=dit_s"],  # DiT-S/2, 33M parameters
}
BEFORE, AFTER = "unet_bpe", "dit"


@dataclass
class Row:
    backbone: str
    data: str  # cached | on-the-fly
    precision: str  # Lightning precision: 32-true | bf16-mixed
    compile: bool = False
    sdpa: str = "default"  # default | math


class StepTimer(L.Callback):
    """Wall and process CPU time at the end of every training step (CUDA synchronised)."""

    def __init__(self):
        self.wall, self.cpu = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def rates(self, warmup: int) -> tuple[float, float]:
        """(steps per wall second, CPU seconds per step) over the steps after `warmup`."""
        wall, cpu = self.wall[warmup:], self.cpu[warmup:]
        steps = len(wall) - 1
        return steps / (wall[-1] - wall[0]), (cpu[-1] - cpu[0]) / steps


def compose_model(backbone: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        overrides = ["experiment=shapes_txt2img", "model.first_stage=null", *BACKBONES[backbone]]
        return compose("config", overrides=overrides).model


def first_stage_and_cache(images: int, resolution: int, out_dir: Path):
    """The (untrained) shapes autoencoder, frozen, and a latent cache of `images` shapes written with it."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=shapes_autoencoder", f"data.resolution={resolution}"])
    torch.manual_seed(0)
    first_stage = instantiate(cfg.model).requires_grad_(False).eval()
    dataset = ShapesDataset(size=images, resolution=resolution)
    cache_latents(first_stage, dataset, out_dir, first_stage_hash=first_stage_hash(first_stage), flip=False,
                  samples_per_shard=images, progress=False)
    return first_stage, dataset


def flops_per_step(module, batch: dict, device: torch.device) -> float:
    """FLOPs of one training step's forward and backward (first-stage encoding included when the batch has images)."""
    module.to(device)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    generator = torch.Generator(device=device).manual_seed(0)
    with FlopCounterMode(display=False) as counter:
        x0 = module.batch_latents(batch, generator)
        cond = module.conditioner.encode(batch)
        loss, _ = denoising_loss(module.denoiser, x0, cond, module.formulation, generator=generator)
        loss.mean().backward()
    module.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    return bf16_peak_flops(torch.cuda.get_device_name(device))


def train_rate(row: Row, model_cfg, first_stage, loaders: dict, latent_shape, args, device: torch.device) -> dict:
    """Train a fresh module for warmup + steps steps; return its throughput."""
    torch.manual_seed(0)
    # latent_scale: the on-the-fly rows need one (a cache's rows take theirs from the manifest); speed only here
    module = instantiate(model_cfg, first_stage=first_stage, latent_shape=list(latent_shape), compile=row.compile,
                         latent_scale=1.0)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=device.type, devices=1, precision=row.precision, max_steps=args.warmup + args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
    )
    kernel = sdpa_kernel(SDPBackend.MATH) if row.sdpa == "math" else contextlib.nullcontext()
    with kernel:
        trainer.fit(module, train_dataloaders=loaders[row.data])
    steps_per_s, cpu_s_per_step = timer.rates(args.warmup)
    return {"params": sum(p.numel() for p in module.denoiser.parameters()), "steps_per_s": steps_per_s,
            "cpu_s_per_step": cpu_s_per_step, "module": module}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=None, choices=sorted(BACKBONES),
                        help=f"default: {BEFORE} {AFTER} on CPU, unet dit dit_s on a GPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 on CPU, 256 on a GPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default: 5 CPU, 50 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 CPU, 5 GPU)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (unlisted GPUs)")
    parser.add_argument("--rows", choices=["all", "fp32", "bf16"], default="all", help="precisions to run")
    parser.add_argument("--compile", action="store_true", help="on a CPU, add torch.compile rows (GPUs always have)")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    args.backbones = args.backbones or (["unet", "dit", "dit_s"] if gpu else [BEFORE, AFTER])
    args.batch_size = args.batch_size or (256 if gpu else 16)
    args.steps = args.steps or (50 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows as a GPU user would run them
        torch.backends.cudnn.allow_tf32 = True

    precisions = {"all": ["32-true", "bf16-mixed"], "fp32": ["32-true"], "bf16": ["bf16-mixed"]}[args.rows]
    rows = [Row(b, d, p) for b in args.backbones for d in ("cached", "on-the-fly") for p in precisions]
    if gpu and "bf16-mixed" in precisions:
        rows += [Row(b, "cached", "bf16-mixed", compile=True) for b in args.backbones]
        rows += [Row(b, "cached", "bf16-mixed", sdpa="math") for b in args.backbones]
    elif args.compile:
        rows += [Row(b, "cached", p, compile=True) for b in args.backbones for p in precisions]

    with tempfile.TemporaryDirectory() as tmp:
        images = args.batch_size * (args.warmup + args.steps + 1)  # one epoch covers a row: no epoch-boundary stall
        first_stage, shapes = first_stage_and_cache(images, args.resolution, Path(tmp) / "train")
        latents = LatentDataset(Path(tmp) / "train", flip=False)
        in_memory = [shapes[i] for i in range(len(shapes))]  # rendered once: on-the-fly pays only for encoding
        options = dict(batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.num_workers,
                       pin_memory=gpu)
        loaders = {"cached": DataLoader(latents, **options), "on-the-fly": DataLoader(in_memory, **options)}
        peak = peak_flops(device, args.peak_tflops)
        model_cfgs = {backbone: compose_model(backbone) for backbone in args.backbones}  # one model for all its rows
        flops: dict[tuple[str, str], float] = {}
        results = []
        for row in rows:
            result = train_rate(row, model_cfgs[row.backbone], first_stage, loaders, latents.latent_shape, args, device)
            key = (row.backbone, row.data)
            if key not in flops:
                flops[key] = flops_per_step(result["module"], next(iter(loaders[row.data])), device)
            results.append((row, result, flops[key]))
            print(f"done: {row}", flush=True)

    threads = "" if gpu else f", {torch.get_num_threads()} torch threads"
    print(f"\ndevice: {torch.cuda.get_device_name(device) if gpu else 'cpu'}{threads}; batch {args.batch_size}, "
          f"latents {list(latents.latent_shape)} from {args.resolution}px, {args.steps} timed steps after "
          f"{args.warmup}; torch {torch.__version__}")
    header = (f"{'backbone':<8} {'params':>7} {'data':<10} {'precision':<10} {'compile':<7} {'sdpa':<7} "
              f"{'steps/s':>8} {'samples/s':>10} {'GFLOP/step':>10} {'TFLOP/s':>8} {'MFU':>6} {'cpu s/step':>10}")
    print(header + "\n" + "-" * len(header))
    for row, r, f in results:
        achieved = f * r["steps_per_s"]
        mfu = f"{100 * achieved / peak:.1f}%" if peak else "-"
        print(f"{row.backbone:<8} {r['params'] / 1e6:>6.1f}M {row.data:<10} {row.precision:<10} "
              f"{'yes' if row.compile else 'no':<7} {row.sdpa:<7} {r['steps_per_s']:>8.2f} "
              f"{r['steps_per_s'] * args.batch_size:>10.1f} {f / 1e9:>10.2f} {achieved / 1e12:>8.3f} {mfu:>6} "
              f"{r['cpu_s_per_step']:>10.3f}")
    print("\non-the-fly encoding / cached latents (samples/s):")
    by_key = {(row.backbone, row.data, row.precision): r["steps_per_s"]
              for row, r, _ in results if not row.compile and row.sdpa == "default"}
    for backbone in args.backbones:
        for precision in precisions:
            ratio = by_key[(backbone, "on-the-fly", precision)] / by_key[(backbone, "cached", precision)]
            print(f"  {backbone:<8} {precision:<10} {ratio:.2f}x")
    if {BEFORE, AFTER} <= set(args.backbones):
        print(f"\ndemo training step, {AFTER} (make demo now) / {BEFORE} (before), steps/s:")
        for precision in precisions:
            ratio = by_key[(AFTER, "cached", precision)] / by_key[(BEFORE, "cached", precision)]
            print(f"  {precision:<10} {ratio:.2f}x")


if __name__ == "__main__":
    main()
