"""Training throughput every `every_n_steps`: images/s, data wait (the share of step time spent waiting for the next
batch) and, on a GPU whose peak is known, the model FLOP utilisation (MFU).

Batch k's timeline: end of batch k-1 -> start_k (the loader's fetch, the host-to-device copy and the loop's own work
between steps: the wait) -> end_k (forward, backward, optimizer step). On a GPU the marks are CUDA events on the
current stream, read once per logging interval (no host sync per step), so they time the device: the wait is how long
the device sat idle for the host, and a slow loader that keeps ahead costs nothing. On a CPU they are perf_counter
readings. A gap holding validation or a checkpoint save is left out of both the wait and the step time, and the first
batch of a process (warm-up, compilation, the FLOP count) is not timed.
"""
import re
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, keyed by a regex over torch.cuda.get_device_name() without
# "NVIDIA ". Datasheets quote bf16 "with sparsity", twice the dense figure: H100 SXM5 and H200 1,979 TFLOPS (NVIDIA
# H100 and H200 datasheets), H100 PCIe 1,513, L4 242 (L4 datasheet); A100 312 dense (A100 datasheet); L40S 362.05
# dense (L40S datasheet); RTX 4090 165.2 dense: bf16 always accumulates in fp32, which GeForce cards run at half the
# fp16-accumulate rate (330.3), per the RTX 4090 column of NVIDIA's Ada GPU architecture whitepaper, appendix A.
# A card not listed gets no MFU.
BF16_PEAK_FLOPS = {
    r"H100 80GB HBM3|H100 SXM.*": 989.4e12,  # "H100 80GB HBM3" is how the SXM5 card names itself
    r"H100 PCIe": 756.0e12,
    r"H200": 989.4e12,
    r"A100.*": 312.0e12,
    r"L40S": 362.05e12,
    r"L4": 121.0e12,
    r"GeForce RTX 4090": 165.2e12,
}


def bf16_peak_flops(device_name: str) -> float | None:
    """The card's dense bf16 peak in FLOP/s from BF16_PEAK_FLOPS; None for a card not in it."""
    name = device_name.removeprefix("NVIDIA ").strip()
    return next((peak for pattern, peak in BF16_PEAK_FLOPS.items() if re.fullmatch(pattern, name)), None)


def throughput(images: int, busy_s: float, wait_s: float) -> tuple[float, float]:
    """(images/s, data-wait fraction) of an interval with `busy_s` inside the steps and `wait_s` between them."""
    step_s = busy_s + wait_s
    return images / step_s, wait_s / step_s


def model_flops_utilisation(flops_per_batch: float, batches: int, seconds: float, peak_flops: float) -> float:
    """MFU (Chowdhery et al. 2022, PaLM, appendix B): the model FLOP/s one device achieved over its peak FLOP/s."""
    return flops_per_batch * batches / seconds / peak_flops


def batch_images(batch: Any) -> int:
    """Samples in a batch: the leading size of its first tensor (dict values, then list/tuple items, in order)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        if isinstance(item, (torch.Tensor, dict, list, tuple)) and (n := batch_images(item)):
            return n
    return 0


class HostClock:
    """perf_counter marks: on a CPU the host runs the step, so host time is step time."""

    def __init__(self, now: Callable[[], float] = time.perf_counter):
        self.now = now

    def mark(self) -> float:
        return self.now()

    def settle(self, mark: float) -> None:
        pass

    def seconds(self, a: float, b: float) -> float:
        return b - a


class CudaClock:
    """CUDA events on the current stream: the device's timeline, marked without a sync; `settle` waits once."""

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def settle(self, mark: torch.cuda.Event) -> None:
        mark.synchronize()

    def seconds(self, a: torch.cuda.Event, b: torch.cuda.Event) -> float:
        return a.elapsed_time(b) / 1e3


class Throughput(L.Callback):
    """Logs `train/images_per_s` (all ranks' images), `train/data_wait` (fraction of step time) and, on a GPU in
    BF16_PEAK_FLOPS, `train/mfu` (per device) every `every_n_steps` optimizer steps, from rank 0. `flops_per_batch`:
    the model FLOPs of one training batch on one device (forward + backward); None counts them on the first batch
    with FlopCounterMode (matmuls, convolutions and attention; recomputed activations count too)."""

    def __init__(self, every_n_steps: int = 50, flops_per_batch: float | None = None, clock: Any = None):
        if every_n_steps < 1:
            raise ValueError(f"Throughput: every_n_steps must be >= 1, got {every_n_steps}")
        if flops_per_batch is not None and flops_per_batch <= 0:
            raise ValueError(f"Throughput: flops_per_batch must be > 0 (or null to count them), got {flops_per_batch}")
        self.every_n_steps, self.flops_per_batch, self.clock = every_n_steps, flops_per_batch, clock
        self.peak_flops: float | None = None
        self._counter: FlopCounterMode | None = None
        self._spans: list[tuple] = []  # (end of the previous batch or None: gap left out, start, end) per batch
        self._images, self._prev_end, self._start, self._gap_left_out, self._logged_step = 0, None, None, False, -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        device = trainer.strategy.root_device
        on_cuda = device.type == "cuda"
        self.clock = self.clock or (CudaClock() if on_cuda else HostClock())
        self._spans, self._images, self._prev_end, self._logged_step = [], 0, None, trainer.global_step
        name = torch.cuda.get_device_name(device) if on_cuda else device.type.upper()
        self.peak_flops = bf16_peak_flops(name) if on_cuda else None
        line = f"images/s and data wait every {self.every_n_steps} steps"
        if not on_cuda:
            line += f"; no MFU on {name} (GPUs only)"
        elif self.peak_flops is None:
            line += f"; no MFU: no dense bf16 peak known for {name!r} (BF16_PEAK_FLOPS in ldm/callbacks/throughput.py)"
        else:
            counted = "counted on the first batch" if self.flops_per_batch is None else "given"
            line += (f"; MFU against the {name}'s dense bf16 peak of {self.peak_flops / 1e12:.0f} TFLOP/s "
                     f"(FLOPs per batch {counted})")
        print(f"[fit] throughput    {line}", flush=True)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        if self._prev_end is None and self.peak_flops is not None and self.flops_per_batch is None:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        self._start = self.clock.mark()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        end = self.clock.mark()
        if self._counter is not None:
            self.flops_per_batch = self._stop_counting() or None
        if self._prev_end is not None:  # the process's first batch is warm-up: not timed
            self._spans.append((None if self._gap_left_out else self._prev_end, self._start, end))
            self._images += batch_images(batch)
        self._prev_end, self._gap_left_out = end, False
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._logged_step and self._spans:
            for name, value in self.interval_metrics(trainer.world_size).items():
                pl_module.log(name, value, on_step=True, on_epoch=False, rank_zero_only=True)
            self._spans, self._images, self._logged_step = [], 0, step

    def interval_metrics(self, world_size: int) -> dict[str, float]:
        """The interval's metrics; waits once for the device to reach the last mark (a logging step's one sync)."""
        self.clock.settle(self._spans[-1][2])
        busy_s = sum(self.clock.seconds(start, end) for _, start, end in self._spans)
        wait_s = sum(self.clock.seconds(prev, start) for prev, start, _ in self._spans if prev is not None)
        images_per_s, data_wait = throughput(self._images * world_size, busy_s, wait_s)
        metrics = {"train/images_per_s": images_per_s, "train/data_wait": data_wait}
        if self.peak_flops is not None and self.flops_per_batch:
            metrics["train/mfu"] = model_flops_utilisation(self.flops_per_batch, len(self._spans), busy_s + wait_s,
                                                           self.peak_flops)
        return metrics

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._gap_left_out = True

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._gap_left_out = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._counter is not None:
            self._stop_counting()

    def _stop_counting(self) -> int:
        counter, self._counter = self._counter, None
        counter.__exit__(None, None, None)
        return counter.get_total_flops()
