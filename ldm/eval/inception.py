"""Inception-v3 features for FID/KID as torch-fidelity computes them, and cached reference statistics per dataset."""
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torchmetrics.image.fid import NoTrainInceptionV3

from ldm.eval.frechet import feature_stats
from ldm.utils.atomic import atomic_write
from ldm.utils.errors import ConfigError, missing_file
from ldm.utils.images import to_uint8

WEIGHTS_KEY = "eval.fid.inception_weights"


def inception_weights(weights_path: str | None) -> str:
    """A local file of torch-fidelity's Inception-v3 weights; with None, the torch hub cache, downloading once."""
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise missing_file(weights_path, WEIGHTS_KEY, "Inception-v3 FID weights")
        return str(weights_path)
    # Same place torch.hub.load_state_dict_from_url (torch-fidelity's own loader) caches it.
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), progress=False)
        except OSError as e:
            raise ConfigError(
                f"cannot download the Inception-v3 FID weights ({e}). Offline, fetch {URL_INCEPTION_V3} "
                f"elsewhere and set the config key `{WEIGHTS_KEY}` to the local file."
            ) from e
    return str(cached)


class InceptionFeatures(nn.Module):
    """Inception-v3 pool3 features [B, 2048] (Heusel et al. 2017), the network and preprocessing of torch-fidelity.

    Resize to 299 px: antialias=False is torch-fidelity's TF1-compatible bilinear, which gives the published FID
    numbers. torchmetrics 1.9's FrechetInceptionDistance defaults to antialias=True, which shifts FID; pass
    antialias=False there (or True here) when comparing with it.
    """

    def __init__(self, *, weights_path: str | None = None, antialias: bool = False):
        super().__init__()
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=inception_weights(weights_path),
            antialias=antialias,
        )
        self.name = "inception-v3-2048" + ("-antialias" if antialias else "-tf1resize")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> features [B, 2048] float32 (quantised to uint8 first, like PNGs)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        return self.net(to_uint8(images)).float()


@torch.no_grad()
def extract_features(
    extract: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Run a feature extractor over image batches [B, 3, H, W] in [-1, 1]; features [N, D] float32 on the CPU."""
    feats = [extract(images.to(device)).float().cpu() for images in batches]
    if not feats:
        raise ValueError("extract_features got no image batches")
    return torch.cat(feats)


@dataclass(frozen=True)
class ReferenceStats:
    """Features of a real reference set and their Gaussian (mu, sigma) for FID; features also serve KID and floors."""

    features: np.ndarray  # [N, D] float32
    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64


def _config_json(dataset_config: Mapping) -> str:
    if isinstance(dataset_config, DictConfig):
        dataset_config = OmegaConf.to_container(dataset_config, resolve=True)
    return json.dumps(dataset_config, sort_keys=True, default=str)


def config_hash(dataset_config: Mapping, extractor_name: str) -> str:
    """Stable short hash of a dataset config (a dict or DictConfig, as sorted JSON) and the feature extractor's name."""
    return hashlib.sha256(f"{extractor_name}\n{_config_json(dataset_config)}".encode()).hexdigest()[:16]


def weights_hash(module: nn.Module) -> str:
    """Short hash of a module's parameters and buffers: put it in `extractor_name` for trained extractors, so that
    retrained weights never reuse statistics cached with the old ones."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def reference_stats(
    extract: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    *,
    cache_dir: str | Path,
    dataset_config: Mapping,
    extractor_name: str,
    device: str | torch.device = "cpu",
) -> ReferenceStats:
    """Reference features + statistics, computed once and cached as <cache_dir>/<extractor>-<config hash>.npz.

    `batches` is only iterated on a cache miss. The key covers the whole dataset config (name, split, resolution,
    count, seed...) and the extractor, so a change of either recomputes instead of reusing stale statistics.
    """
    path = Path(cache_dir) / f"{extractor_name}-{config_hash(dataset_config, extractor_name)}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return ReferenceStats(features=cached["features"], mu=cached["mu"], sigma=cached["sigma"])
    features = extract_features(extract, batches, device).numpy()
    mu, sigma = feature_stats(features)
    config = np.array(_config_json(dataset_config))
    atomic_write(path, lambda f: np.savez(f, features=features, mu=mu, sigma=sigma, dataset_config=config))
    return ReferenceStats(features=features, mu=mu, sigma=sigma)
