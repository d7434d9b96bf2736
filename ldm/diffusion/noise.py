"""Reproducible sampling noise: one seeded generator per sample, independent of batching and device."""

from collections.abc import Sequence

import torch


class SampleNoise:
    """Per-sample seeded Gaussian noise: sample i draws from its own CPU generator seeded with seeds[i].

    Noise is always drawn in float32 on the CPU and only then cast and moved, so sample i with seed s
    gets the same initial and per-step noise whatever the batch size, batch order, device or dtype.
    """

    def __init__(self, seeds: Sequence[int]):
        if len(seeds) == 0:
            raise ValueError("SampleNoise needs at least one seed")
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator(device="cpu").manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(
        self,
        shape: Sequence[int],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Standard normal noise [len(seeds), *shape], row i from generator i."""
        draws = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(draws).to(device=device, dtype=dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like x, whose batch axis must hold one row per seed."""
        if x.shape[0] != len(self):
            raise ValueError(f"batch of {x.shape[0]} samples but SampleNoise holds {len(self)} seeds")
        return self.randn(x.shape[1:], device=x.device, dtype=x.dtype)


def randn_like(x: torch.Tensor, generator: SampleNoise | None) -> torch.Tensor:
    """Noise shaped like x from a SampleNoise, or from torch's global RNG when generator is None."""
    if generator is None:
        return torch.randn_like(x)
    return generator.randn_like(x)
