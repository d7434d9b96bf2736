"""Inception Score (Salimans et al. 2016) from classifier logits, as a pure function."""
import numpy as np
import torch


def inception_score(logits: torch.Tensor | np.ndarray, *, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` chunks of a seeded shuffle (torch-fidelity's
    protocol, so with the same seed the numbers match its)."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.ndim != 2 or len(logits) < splits or splits < 1:
        raise ValueError(f"inception_score needs logits [N >= splits, C] and splits >= 1, got {tuple(logits.shape)}, "
                         f"splits={splits}")
    logits = logits[np.random.RandomState(seed).permutation(len(logits))]
    log_p = logits.log_softmax(dim=1)  # log p(y|x) [N, C]
    bounds = [i * len(log_p) // splits for i in range(splits + 1)]
    scores = []
    for chunk in (log_p[a:b] for a, b in zip(bounds, bounds[1:])):
        log_marginal = chunk.exp().mean(0).log()  # log p(y) over the chunk
        kl = (chunk.exp() * (chunk - log_marginal)).sum(1)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))
