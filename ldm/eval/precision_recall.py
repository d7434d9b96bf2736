"""Improved precision and recall (Kynkaanniemi et al. 2019): k-NN balls around feature vectors as the manifolds."""
import numpy as np
import torch


def _as_tensor(feats: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(feats.detach().cpu() if torch.is_tensor(feats) else feats), dtype=torch.float64)


def knn_radii(feats: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Distance from each feature [N, D] to its k-th nearest neighbour in the same set (itself excluded) [N]."""
    return torch.cat([torch.cdist(rows, feats).kthvalue(k + 1, dim=1).values for rows in feats.split(chunk)])


def in_manifold(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """f(q, Phi) of the paper: whether each query [M, D] lies in any ball B(phi, r_phi) of the support
    [N, D], radii [N]."""
    return torch.cat([(torch.cdist(rows, support) <= radii).any(dim=1) for rows in queries.split(chunk)])


def precision_recall(
    real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray, *, k: int = 3
) -> dict[str, float]:
    """Precision: fraction of generated features inside the real manifold; recall: fraction of real features inside
    the generated manifold (Kynkaanniemi et al. 2019, k = 3 as in the paper)."""
    real, fake = _as_tensor(real), _as_tensor(fake)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall needs features [N1, D] and [N2, D], got {tuple(real.shape)}, "
                         f"{tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k or k < 1:
        raise ValueError(f"precision_recall needs more than k={k} (>= 1) features in each set, got {len(real)} real "
                         f"and {len(fake)} generated")
    precision = in_manifold(fake, real, knn_radii(real, k)).double().mean().item()
    recall = in_manifold(real, fake, knn_radii(fake, k)).double().mean().item()
    return dict(precision=precision, recall=recall)
