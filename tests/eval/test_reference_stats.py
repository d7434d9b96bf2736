"""Cached reference statistics: computed once, reused while extractor, images and resize match, recomputed when
any of them changes; files are read without pickle and a damaged or foreign file is never trusted."""
import numpy as np
import pytest
import torch
from torch import nn

from ldm.eval import reference_suite
from ldm.eval.frechet import feature_stats
from ldm.eval.reference_stats import cache_path, load_cached, reference_stats
from ldm.eval.reference_suite import ReferenceSuite
from reference_sets import shapes_images, write_folder, write_prompts

KEY = dict(feature_extractor="inception-v3-2048-abc", reference_hash="f00d", resize="tf1-bilinear-299")


class Counting:
    """A stand-in feature computation that counts its calls."""

    def __init__(self, n: int = 20, d: int = 4, seed: int = 0):
        self.calls, self.features = 0, np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return self.features


def test_statistics_are_computed_once_then_reused_for_the_same_key(tmp_path):
    compute = Counting()
    stats, path = reference_stats(compute, cache_dir=tmp_path, key=KEY)
    mu, sigma = feature_stats(compute.features)
    np.testing.assert_allclose(stats.mu, mu)
    np.testing.assert_allclose(stats.sigma, sigma)
    again, same_path = reference_stats(compute, cache_dir=tmp_path, key=KEY)
    assert compute.calls == 1 and same_path == path and again.n == 20
    np.testing.assert_array_equal(again.features, stats.features)
    with np.load(path, allow_pickle=False) as f:  # everything in the file is plain arrays: no pickle needed
        assert {k: str(f[k]) for k in KEY} == KEY and int(f["n"]) == 20 and f["sigma"].shape == (4, 4)


@pytest.mark.parametrize("field", sorted(KEY))
def test_a_changed_extractor_reference_set_or_resize_recomputes(tmp_path, field):
    compute = Counting()
    reference_stats(compute, cache_dir=tmp_path, key=KEY)
    reference_stats(compute, cache_dir=tmp_path, key={**KEY, field: KEY[field] + "-changed"})
    assert compute.calls == 2 and len(list(tmp_path.glob("reference-*.npz"))) == 2


def test_a_file_for_another_key_or_a_damaged_file_is_recomputed_not_trusted(tmp_path):
    compute = Counting()
    _, path = reference_stats(compute, cache_dir=tmp_path, key=KEY)
    other = {**KEY, "reference_hash": "beef"}
    path.rename(cache_path(tmp_path, other))  # a file whose name says `other` but whose content is for KEY
    assert load_cached(cache_path(tmp_path, other), other) is None
    reference_stats(compute, cache_dir=tmp_path, key=other)
    assert compute.calls == 2
    cache_path(tmp_path, KEY).write_bytes(b"PK\x03\x04 truncated")
    reference_stats(compute, cache_dir=tmp_path, key=KEY)
    assert compute.calls == 3 and load_cached(cache_path(tmp_path, KEY), KEY) is not None
    with pytest.raises(ValueError, match="non-empty strings"):
        cache_path(tmp_path, {**KEY, "resize": ""})


class ChannelStats(nn.Module):
    """A stand-in for InceptionFeatures (same interface, microseconds): per-channel means and stds, times a weight."""

    resize = "none"

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight), requires_grad=False)
        self.name = f"channel-stats-{weight:g}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.cat([images.mean((2, 3)), images.std((2, 3))], 1)

    def pool_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(images), self(images)[:, :3]


def test_the_suite_reuses_statistics_until_an_image_or_the_extractor_changes(tmp_path, monkeypatch):
    reference = write_folder(shapes_images(6), tmp_path / "reference")
    prompts = str(write_prompts(tmp_path / "prompts.txt", 6))
    computed = []
    extract = reference_suite.extract_features
    monkeypatch.setattr(reference_suite, "extract_features", lambda *a: computed.append(1) or extract(*a))

    def suite(extractor=None):
        return ReferenceSuite(prompts_file=prompts, reference_dir=str(reference), inception=extractor or ChannelStats(),
                              stats_dir=str(tmp_path / "stats"), num_samples=6, resolution=32, kid_subsets=2,
                              is_splits=2)

    first = suite().reference_stats()
    second = suite().reference_stats()  # a new run over the same images and extractor: read from the cache
    assert len(computed) == 1
    np.testing.assert_array_equal(first.features, second.features)
    write_folder(shapes_images(1, seed=9), tmp_path / "reference" / "extra")  # the reference set grows by one image
    assert suite().reference_stats().n == 7 and len(computed) == 2
    (tmp_path / "reference" / "000.png").write_bytes((tmp_path / "reference" / "001.png").read_bytes())  # same n
    suite().reference_stats()
    assert len(computed) == 3
    suite(ChannelStats(weight=2.0)).reference_stats()  # other extractor weights
    assert len(computed) == 4
    suite().reference_stats()  # back to the first extractor and the current images: cached
    assert len(computed) == 4
