"""Reference-set statistics, computed once and cached as .npz beside what decided them.

The key (feature extractor with its weights hash, reference-set content hash, resize protocol) is part of the file
name and stored inside it: the cache is reused only when every field matches, recomputed otherwise (a changed
image, other weights, another resize), never silently stale.
"""
import hashlib
import json
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm.eval.frechet import feature_stats
from ldm.utils.atomic import atomic_write

KEY_FIELDS = ("feature_extractor", "reference_hash", "resize")


@dataclass(frozen=True)
class ReferenceStats:
    """Features of a real reference set and their Gaussian (mu, sigma) for FID; KID and precision/recall need the
    features themselves."""

    features: np.ndarray  # [N, D] float32
    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64

    @property
    def n(self) -> int:
        return len(self.features)


def _checked_key(key: Mapping[str, str]) -> dict[str, str]:
    if set(key) != set(KEY_FIELDS) or not all(isinstance(v, str) and v for v in key.values()):
        raise ValueError(f"reference statistics need a key with non-empty strings for {KEY_FIELDS}, got {dict(key)}")
    return {k: key[k] for k in KEY_FIELDS}


def cache_path(cache_dir: str | Path, key: Mapping[str, str]) -> Path:
    """<cache_dir>/reference-<hash of the key>.npz"""
    digest = hashlib.sha256(json.dumps(_checked_key(key), sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / f"reference-{digest[:16]}.npz"


def load_cached(path: str | Path, key: Mapping[str, str]) -> ReferenceStats | None:
    """The statistics stored at `path` if they were computed for exactly `key`; None if absent, unreadable or not."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if any(str(f[k]) != v for k, v in _checked_key(key).items()):
                return None
            stats = ReferenceStats(features=f["features"], mu=f["mu"], sigma=f["sigma"])
            n = int(f["n"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # missing, truncated or written by something else
        return None
    return stats if n == stats.n and stats.mu.shape == stats.features.shape[1:] else None


def reference_stats(
    compute_features: Callable[[], np.ndarray], *, cache_dir: str | Path, key: Mapping[str, str]
) -> tuple[ReferenceStats, Path]:
    """Reference statistics for `key` from the cache, or from compute_features() (called only on a miss) written
    there atomically; also returns the cache file."""
    path = cache_path(cache_dir, key)
    cached = load_cached(path, key)
    if cached is not None:
        return cached, path
    features = np.asarray(compute_features(), dtype=np.float32)
    mu, sigma = feature_stats(features)
    stored_key = {k: np.array(v) for k, v in _checked_key(key).items()}
    atomic_write(path, lambda f: np.savez(f, features=features, mu=mu, sigma=sigma, n=np.int64(len(features)),
                                          **stored_key))
    return ReferenceStats(features=features, mu=mu, sigma=sigma), path
