"""The diffusion model's optimiser: AdamW with a linear warm-up, then constant or cosine decay, its peak lr
optionally scaled with the global batch (Goyal et al. 2017)."""
import math
from collections.abc import Callable, Sequence

import torch
from torch.distributed.tensor import DTensor

LR_SCHEDULES = ("constant", "cosine")


def warmup_then(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then constant or cosine decay to 0 (Loshchilov & Hutter 2017)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}: constant | cosine")
    return factor


class AdamWSchedule:
    """AdamW settings and their LR schedule; `configure` builds both for Lightning's `configure_optimizers`."""

    def __init__(
        self,
        lr: float = 1e-4,
        betas: Sequence[float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        scale_lr: bool = False,
        base_batch_size: int = 256,
    ):
        warmup_then(lr_schedule, warmup_steps, 1)  # an unknown schedule fails here, not at the first step
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.warmup_steps, self.lr_schedule = warmup_steps, lr_schedule
        self.scale_lr, self.base_batch_size = scale_lr, base_batch_size

    def peak_lr(self, global_batch: int | None) -> float:
        """`lr`, or with `scale_lr` lr x global batch / base_batch_size."""
        if not self.scale_lr:
            return self.lr
        if global_batch is None:
            raise ValueError("scale_lr needs the per-device batch size: train with a DataModule that has `batch_size`")
        return self.lr * global_batch / self.base_batch_size

    def configure(self, params: list[torch.nn.Parameter], global_batch: int | None, total_steps: int) -> dict:
        """The optimizer and its per-step scheduler, in the dict Lightning's `configure_optimizers` returns."""
        # fused: one kernel for all parameters; on 2 CPU cores torch's default (foreach) took 0.117 s of a 0.98 s
        # shapes_txt2img step, fused 0.027 s (benchmarks/bench_adamw.py). Sharded (DTensor) parameters keep the default.
        fused = not any(isinstance(p, DTensor) for p in params)
        opt = torch.optim.AdamW(params, lr=self.peak_lr(global_batch), betas=self.betas,
                                weight_decay=self.weight_decay, fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then(self.lr_schedule, self.warmup_steps, total_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
