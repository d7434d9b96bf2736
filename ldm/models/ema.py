"""Exponential moving average of a network's weights, stored as a submodule so it lives in every checkpoint."""
import copy

import torch
from torch import nn


def ema_decay(step: int, decay: float, warmup: bool = True) -> float:
    """EMA decay with warm-up min(decay, (1 + n) / (10 + n)) (as in TensorFlow's ExponentialMovingAverage)."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


class EMA(nn.Module):
    """Shadow copy of `net` updated as theta_ema <- d theta_ema + (1 - d) theta after each optimizer step.

    Under FSDP the shadow is sharded exactly like `net` (LatentDiffusionModule.configure_model): both hold DTensors
    with the same placements, so the update is a local lerp on each rank's shard, with no communication.
    """

    def __init__(self, net: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        self.net = copy.deepcopy(net).requires_grad_(False).eval()
        self.decay = decay
        self.warmup = warmup
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._count: int | None = None  # num_updates on the host: reading the buffer every step would sync a GPU

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._count = None  # a loaded (resumed) count replaces the host copy

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        if self._count is None:
            self._count = int(self.num_updates)  # once per run (and after a load): the only host sync
        d = ema_decay(self._count, self.decay, self.warmup)
        shadow, params = list(self.net.parameters()), list(net.parameters())
        if len(shadow) != len(params):
            raise ValueError(f"EMA holds {len(shadow)} parameters, the network {len(params)}")
        # one fused call for all parameters instead of a Python loop of small kernels
        torch._foreach_lerp_(shadow, [p.detach().to(e.dtype) for e, p in zip(shadow, params)], 1.0 - d)
        shadow_buffers, buffers = list(self.net.buffers()), list(net.buffers())
        if shadow_buffers:
            torch._foreach_copy_(shadow_buffers, buffers)
        self.num_updates += 1
        self._count += 1

    @torch.no_grad()
    def copy_to(self, net: nn.Module) -> None:
        """Overwrite `net`'s weights with the averaged ones (export of EMA weights only)."""
        for p_ema, p in zip(self.net.parameters(), net.parameters(), strict=True):
            p.copy_(p_ema)
        for b_ema, b in zip(self.net.buffers(), net.buffers(), strict=True):
            b.copy_(b_ema)

    def train(self, mode: bool = True) -> "EMA":
        super().train(mode)
        self.net.eval()  # the shadow always evaluates (dropout off)
        return self
