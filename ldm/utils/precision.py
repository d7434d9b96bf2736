"""`trainer.precision=auto`: bf16 autocast where it is faster, measured on this machine at start-up.

CPUs differ by an order of magnitude here: bf16 autocast took 0.57-0.79x the fp32 time of a training step on a CPU
with AVX-512-BF16/AMX and 11.7x on one without. So on a CPU a short probe (a convolution, a linear layer and
attention, forward and backward, as in a diffusion backbone) is timed both ways; GPUs that support bf16 take it.
"""
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

AUTO = "auto"
MARGIN = 0.9  # bf16 must be at least 10% faster: a tie keeps fp32's exactness


def choose(fp32_s: float, bf16_s: float) -> str:
    """Lightning precision from the probe's seconds per step."""
    return "bf16-mixed" if bf16_s < MARGIN * fp32_s else "32-true"


def _probe_step(generator: torch.Generator) -> Callable[[], None]:
    x = torch.randn(8, 64, 16, 16, generator=generator)
    conv = torch.randn(64, 64, 3, 3, generator=generator, requires_grad=True)
    linear = torch.randn(256, 64, generator=generator, requires_grad=True)

    def step() -> None:
        h = F.silu(F.conv2d(x, conv, padding=1))  # [8, 64, 16, 16]
        tokens = h.flatten(2).transpose(1, 2) @ linear.T  # [8, 256, 256]
        q = k = v = tokens.view(8, 256, 4, 64).transpose(1, 2)
        F.scaled_dot_product_attention(q, k, v).float().square().mean().backward()

    return step


def seconds_per_step(step: Callable[[], None], bf16: bool) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        start = time.perf_counter()
        step()
    return time.perf_counter() - start


def probe(rounds: int = 9) -> tuple[float, float]:
    """(fp32, bf16) seconds of the probe step: the fastest of `rounds` alternating runs each (after a warm-up of
    both), so that load from other processes, which only ever slows a run, affects both alike."""
    step = _probe_step(torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: the kernels' speed, less of whatever else shares the machine
    try:
        seconds_per_step(step, bf16=False), seconds_per_step(step, bf16=True)  # first-call kernel selection
        times = [(seconds_per_step(step, bf16=False), seconds_per_step(step, bf16=True)) for _ in range(rounds)]
    finally:
        torch.set_num_threads(threads)
    return min(t[0] for t in times), min(t[1] for t in times)


def cpu_name() -> str:
    """The CPU's model name (Linux), else the architecture: every measured speed says where it was measured."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def resolve_precision(precision: str | int, accelerator: str, world_size: int = 1) -> tuple[str | int, str]:
    """(Lightning precision, why) for `trainer.precision`; anything but "auto" passes through unchanged (Lightning
    judges it, with its own message)."""
    if precision != AUTO:
        return precision, "as configured"
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"{torch.cuda.get_device_name()} supports bf16"
        return "16-mixed", f"{torch.cuda.get_device_name()} has no bf16"
    if world_size > 1:  # each rank would time its own probe and might choose differently
        return "32-true", f"{world_size} CPU ranks: fp32 (a probe per rank could disagree)"
    fp32, bf16 = probe()
    return choose(fp32, bf16), f"bf16 autocast took {bf16 / fp32:.2f}x the fp32 time of a probe step on {cpu_name()}"
