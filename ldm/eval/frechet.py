"""Distances between two sets of features: Frechet distance (FID) and kernel distance (KID), as pure functions."""
import numpy as np
import torch


def feature_stats(feats: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of features [N, D], in float64 (the Gaussian that FID fits)."""
    feats = np.asarray(feats.detach().cpu() if torch.is_tensor(feats) else feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"feature_stats needs features [N >= 2, D], got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance matrix; tiny negative eigenvalues from round-off are clipped."""
    eigval, eigvec = np.linalg.eigh(sigma)
    return (eigvec * np.sqrt(eigval.clip(min=0))) @ eigvec.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982; FID, Heusel et al. 2017)."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}")
    # d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)); sigma1 sigma2 is not symmetric, but it is
    # similar to s sigma2 s with s = sigma1^(1/2), which is symmetric PSD: same trace of square root, stable eigh.
    s = _sqrt_psd(sigma1)
    tr_covmean = np.sqrt(np.linalg.eigvalsh(s @ sigma2 @ s).clip(min=0)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_features(feats1: torch.Tensor | np.ndarray, feats2: torch.Tensor | np.ndarray) -> float:
    """FID between the Gaussians fitted to two feature sets [N1, D], [N2, D]; the same number as frechet_distance
    on their feature_stats, computed in the N x N space when a set has fewer features than dimensions."""
    f1, f2 = (np.asarray(f.detach().cpu() if torch.is_tensor(f) else f, dtype=np.float64) for f in (feats1, feats2))
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"frechet_distance_features needs features [N >= 2, D] twice, got {f1.shape}, {f2.shape}")
    if min(len(f1), len(f2)) >= f1.shape[1]:
        return frechet_distance(*feature_stats(f1), *feature_stats(f2))
    # sigma1 = A^T A, sigma2 = B^T B with A, B the centred features / sqrt(N - 1). The non-zero eigenvalues of
    # sigma1 sigma2 are those of (A B^T)(A B^T)^T, so Tr((sigma1 sigma2)^(1/2)) is the nuclear norm of A B^T [N1, N2]:
    # one small SVD instead of two D x D eigendecompositions (D = 2048 for Inception).
    a = (f1 - f1.mean(0)) / np.sqrt(len(f1) - 1)
    b = (f2 - f2.mean(0)) / np.sqrt(len(f2) - 1)
    tr_covmean = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    diff = f1.mean(0) - f2.mean(0)
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2 * tr_covmean)


def _polynomial_mmd2(f1: np.ndarray, f2: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    """Unbiased MMD^2 with k(x, y) = (gamma x.y + coef0)^degree (Binkowski et al. 2018, eq. 2 with the KID kernel)."""
    m = f1.shape[0]
    k11 = (f1 @ f1.T * gamma + coef0) ** degree
    k22 = (f2 @ f2.T * gamma + coef0) ** degree
    k12 = (f1 @ f2.T * gamma + coef0) ** degree
    within = (k11.sum() - np.trace(k11) + k22.sum() - np.trace(k22)) / (m * (m - 1))
    return float(within - 2 * k12.sum() / (m * m))


def kid(
    feats1: torch.Tensor | np.ndarray,
    feats2: torch.Tensor | np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 2020,
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): mean and std of polynomial-kernel MMD^2 over random subsets.

    Subsets are drawn as torch-fidelity draws them (numpy RandomState(seed), without replacement), so with the same
    seed the numbers match torch-fidelity's.
    """
    f1, f2 = (np.asarray(f.detach().cpu() if torch.is_tensor(f) else f, dtype=np.float64) for f in (feats1, feats2))
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"kid needs features [N1, D] and [N2, D], got {f1.shape} and {f2.shape}")
    if min(len(f1), len(f2)) < subset_size or subset_size < 2:
        raise ValueError(f"kid subset_size={subset_size} must be in [2, min(N1, N2)={min(len(f1), len(f2))}]")
    gamma = 1.0 / f1.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)
    mmds = []
    for _ in range(subsets):
        i1 = rng.choice(len(f1), subset_size, replace=False)
        i2 = rng.choice(len(f2), subset_size, replace=False)
        mmds.append(_polynomial_mmd2(f1[i1], f2[i2], degree, gamma, coef0))
    return float(np.mean(mmds)), float(np.std(mmds))


def fid_kid(
    feats1: torch.Tensor | np.ndarray,
    feats2: torch.Tensor | np.ndarray,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 2020,
) -> dict[str, float]:
    """FID and KID between two feature sets; the KID subset size is capped at the smaller set."""
    subset_size = min(kid_subset_size, len(feats1), len(feats2))
    kid_mean, kid_std = kid(feats1, feats2, subsets=kid_subsets, subset_size=subset_size, seed=seed)
    return dict(fid=frechet_distance_features(feats1, feats2), kid=kid_mean, kid_std=kid_std)


def real_floor(
    real_feats: torch.Tensor | np.ndarray,
    n: int,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 2020,
) -> dict[str, float]:
    """FID/KID between two disjoint random halves of n real features each: the floor a perfect model reaches with n.

    FID is biased upwards at small n, so compare a model's FID on n samples with this floor at the same n.
    """
    if 2 * n > len(real_feats):
        raise ValueError(f"real_floor needs 2 * n = {2 * n} real features, got {len(real_feats)}")
    perm = np.random.RandomState(seed).permutation(len(real_feats))
    half_a, half_b = real_feats[perm[:n]], real_feats[perm[n : 2 * n]]
    return fid_kid(half_a, half_b, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed)
