"""Training-step throughput of the full-size backbones: the SD2-size UNet (865.9M) and DiT-XL/2 (675M), and
diffusers' UNet2DConditionModel built to the same SD2 configuration, side by side in one run.

    python benchmarks/bench_backbones.py [--models unet_sd diffusers_unet dit_xl] [--batch-size 64] [--steps 10]
                                         [--compile] [--sdpa default math] [--tiny]

One step = forward + backward + AdamW on random latents [B, 4, 32, 32] (256 px through an f=8 first stage), noise
levels and, for the UNets, 77 text tokens of width 1024 (OpenCLIP ViT-H/14), in bf16 autocast on a GPU (fp32 on the
CPU). Prints images/s, achieved TFLOP/s (FLOPs of one step counted by torch.utils.flop_counter) and MFU against the
card's dense bf16 peak. `--tiny` shrinks every model so the script can be checked on a CPU in seconds.
"""
import argparse
import contextlib
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ldm.callbacks.throughput import bf16_peak_flops
from ldm.utils.safe_config import safe_instantiate

BACKBONES = Path(__file__).resolve().parents[1] / "configs" / "model" / "backbone"
CONTEXT = (77, 1024)  # OpenCLIP ViT-H/14 penultimate tokens
TINY_UNET = {"model_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [2], "head_dim": 16}
TINY_DIT = {"hidden_size": 64, "depth": 2, "num_heads": 2}


def ours(name: str, tiny: bool) -> torch.nn.Module:
    cfg = OmegaConf.load(BACKBONES / f"{name}.yaml")
    dit = name.startswith("dit")
    if tiny:
        cfg.merge_with(TINY_DIT if dit else TINY_UNET)
    if dit:
        cfg.in_channels, cfg.context_dim = 4, None
        cfg.y_dim = cfg.hidden_size  # class-conditional, as DiT-XL/2 on ImageNet: an embedding of the label
    return safe_instantiate(cfg, stored=False, where=f"model.backbone ({name})")


def diffusers_unet(tiny: bool) -> torch.nn.Module:
    """UNet2DConditionModel with SD 2.x's configuration (the same 865.9M parameters as unet_sd)."""
    from diffusers import UNet2DConditionModel

    channels = (32, 64) if tiny else (320, 640, 1280, 1280)
    down = ("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1)
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=channels, down_block_types=down,
        up_block_types=up, layers_per_block=2, cross_attention_dim=CONTEXT[1],
        attention_head_dim=[c // 64 if not tiny else 2 for c in channels], use_linear_projection=True,
    )


REGIONS = ("DiTBlock", "ResBlock", "SpatialTransformer",  # ours
           "BasicTransformerBlock", "ResnetBlock2D")        # diffusers'


class Step:
    """One training step of `net` on fixed random inputs; `forward` adapts the call to each model's signature."""

    def __init__(self, name: str, net: torch.nn.Module, batch: int, device: torch.device, compile: bool):
        self.name, self.device = name, device
        self.net = net.to(device).train()
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=1e-4, fused=device.type == "cuda")
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 4, 32, 32, generator=g).to(device)
        self.target = torch.randn(batch, 4, 32, 32, generator=g).to(device)
        self.t = torch.rand(batch, generator=g).to(device)
        self.context = torch.randn(batch, *CONTEXT, generator=g).to(device)
        self.y = torch.randn(batch, getattr(net, "y_dim", None) or 1, generator=g).to(device)
        self.forward = self._forward
        if compile == "regional":  # each repeated block compiled on its own: compile time of a block, not a model
            torch._dynamo.config.cache_size_limit = 64  # one graph per block shape (the UNet has ~10)
            for module in self.net.modules():
                if type(module).__name__ in REGIONS:
                    module.compile()
        elif compile:
            self.forward = torch.compile(self._forward)

    def _forward(self) -> torch.Tensor:
        if self.name == "diffusers_unet":
            out = self.net(self.x, self.t * 999, encoder_hidden_states=self.context).sample
        elif self.name.startswith("dit"):
            out = self.net(self.x, self.t, y=self.y)
        else:
            out = self.net(self.x, self.t, context=self.context)
        return torch.nn.functional.mse_loss(out.float(), self.target)

    def __call__(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = self.forward()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def flops(self) -> float:
        with FlopCounterMode(display=False) as counter:
            self._forward().backward()
        self.optimizer.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())


def timed(step: Step, warmup: int, steps: int) -> float:
    """Seconds per step over `steps` steps after `warmup` (compilation happens in the warm-up)."""
    for _ in range(warmup):
        step()
    if step.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if step.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["unet_sd", "diffusers_unet", "dit_xl"],
                        choices=["unet_sd", "diffusers_unet", "dit_xl"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on a GPU, 2 on the CPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time each model under torch.compile")
    parser.add_argument("--regional", action="store_true",
                        help="with --compile: compile each block (DiT block, ResBlock, transformer) instead of the model")
    parser.add_argument("--sdpa", nargs="+", default=["default"], choices=["default", "math"],
                        help="attention kernels: default (flash / memory-efficient) and/or math")
    parser.add_argument("--tiny", action="store_true", help="tiny models: check the script on a CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch_size or (64 if device.type == "cuda" else 2)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = bf16_peak_flops(card)
    print(f"{card}, torch {torch.__version__}, batch {batch}, latents [4, 32, 32], "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, {args.steps} timed steps after {args.warmup}")
    print(f"{'model':16s} {'params':>8s} {'compile':>7s} {'sdpa':>7s} {'ms/step':>8s} {'images/s':>9s} "
          f"{'TFLOP/s':>8s} {'MFU':>6s}")
    for name in args.models:
        torch.manual_seed(0)
        net = diffusers_unet(args.tiny) if name == "diffusers_unet" else ours(name, args.tiny)
        params = sum(p.numel() for p in net.parameters())
        for compile in (False, "regional" if args.regional else True) if args.compile else (False,):
            step = Step(name, net, batch, device, compile)
            flops = step.flops()
            for kernel in args.sdpa:
                if kernel == "math" and compile:
                    continue  # the kernel comparison is an eager one
                context = sdpa_kernel(SDPBackend.MATH) if kernel == "math" else contextlib.nullcontext()
                with context:
                    seconds = timed(step, args.warmup, args.steps)
                mfu = f"{flops / seconds / peak:6.1%}" if peak else "     -"
                print(f"{name:16s} {params / 1e6:7.1f}M {str(compile)[:7]:>7s} {kernel:>7s} {seconds * 1e3:8.1f} "
                      f"{batch / seconds:9.1f} {flops / seconds / 1e12:8.1f} {mfu}", flush=True)
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
