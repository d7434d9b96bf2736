"""Training noise derived from (seed, step, rank): resume is exact and ranks draw different noise."""
import torch


def step_generator(seed: int, step: int, rank: int, device: torch.device | str) -> torch.Generator:
    """A generator seeded by (seed, global step, rank) for this step's random draws."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + rank) % (2**63 - 1))
    return g
