"""eval=reference over webdataset shards: local tar shards (a brace pattern or a list) give the same reference set as
the same images in a folder, prompts can be their captions in order, damage is an error, and changed shards
recompute the cached statistics."""
import numpy as np
import pytest
import torch

from ldm.eval.reference_suite import ReferenceSuite
from ldm.utils.errors import ConfigError, CorruptDataError
from ldm.utils.safe_config import safe_instantiate
from reference_sets import ChannelStats, shapes_images, write_folder, write_prompts
from shard_fixtures import write_shard

CAPTIONS = [f"a small shape number {i}" for i in range(6)]


def write_reference(tmp_path, captions=CAPTIONS, seed=1):
    """The same 6 PNGs as a folder and as two shards (4 + 2 samples, img2dataset layout); the shards' pattern."""
    folder = write_folder(shapes_images(6, seed=seed), tmp_path / "folder")
    samples = [(f"{i:06d}", {"png": (folder / f"{i:03d}.png").read_bytes(),
                             **({"txt": captions[i].encode()} if captions[i] is not None else {})}) for i in range(6)]
    write_shard(tmp_path / "ref-0.tar", samples[:4])
    write_shard(tmp_path / "ref-1.tar", samples[4:])
    return folder, str(tmp_path / "ref-{0..1}.tar")


def suite(tmp_path, reference_dir, **kwargs):
    defaults = dict(prompts_file=str(write_prompts(tmp_path / "prompts.txt", 6)), inception=ChannelStats(),
                    stats_dir=str(tmp_path / "stats"), num_samples=6, resolution=32, kid_subsets=2, is_splits=2)
    return ReferenceSuite(reference_dir=reference_dir, **{**defaults, **kwargs})


def test_shards_give_the_same_reference_set_and_scores_as_the_folder(tmp_path):
    folder, pattern = write_reference(tmp_path)
    from_folder, from_shards = suite(tmp_path, str(folder)), suite(tmp_path, pattern)
    assert len(from_shards.reference) == 6
    np.testing.assert_array_equal(from_shards.reference_stats().features, from_folder.reference_stats().features)
    samples = shapes_images(6, num_objects=2, seed=2)
    assert from_shards.score(samples) == from_folder.score(samples)
    listed = suite(tmp_path, [str(tmp_path / "ref-0.tar"), str(tmp_path / "ref-1.tar")])  # a list of paths
    assert listed.reference_hash() == from_shards.reference_hash() != from_folder.reference_hash()


def test_prompts_from_reference_are_the_shards_captions_in_order(tmp_path):
    _, pattern = write_reference(tmp_path)
    cfg = {"_target_": "ldm.eval.reference_suite.ReferenceSuite", "reference_dir": [str(tmp_path / "ref-0.tar"),
           str(tmp_path / "ref-1.tar")], "prompts_from": "reference", "prompts_file": None, "num_samples": 5,
           "resolution": 32, "stats_dir": str(tmp_path / "stats")}
    built = safe_instantiate(cfg, stored=False, inception=ChannelStats())  # a config list, as Hydra passes it
    assert built.conditions() == (CAPTIONS[:5], None) and built.protocol()["prompts_from"] == "reference"
    with pytest.raises(ConfigError, match="holds 6 images, fewer than eval.num_samples=7"):
        suite(tmp_path, pattern, prompts_from="reference", num_samples=7)
    _, uncaptioned = write_reference(tmp_path / "other", captions=[*CAPTIONS[:3], None, *CAPTIONS[4:]])
    with pytest.raises(ConfigError, match="reference image '000003' has no readable caption"):
        suite(tmp_path, uncaptioned, prompts_from="reference")


def test_missing_remote_or_damaged_shards_and_unset_prompts_are_clear_errors(tmp_path):
    _, pattern = write_reference(tmp_path)
    with pytest.raises(FileNotFoundError, match="eval.reference_dir"):
        suite(tmp_path, str(tmp_path / "ref-{0..2}.tar"))
    with pytest.raises(ConfigError, match="must be local .tar files"):
        suite(tmp_path, "https://example.com/ref-{0..1}.tar")
    with pytest.raises(ConfigError, match="eval.prompts_file is not set"):
        suite(tmp_path, pattern, prompts_file=None)
    with pytest.raises(ConfigError, match="eval.prompts_from='captions'"):
        suite(tmp_path, pattern, prompts_from="captions")
    folder = tmp_path / "folder"
    write_shard(tmp_path / "cut.tar", [(f"{i}", {"png": (folder / f"{i:03d}.png").read_bytes()}) for i in range(6)],
                cut_last=True)
    with pytest.raises(CorruptDataError, match="reference shard damaged"):
        suite(tmp_path, str(tmp_path / "cut.tar"))


def test_a_changed_shard_recomputes_the_cached_statistics(tmp_path):
    _, pattern = write_reference(tmp_path)
    first = suite(tmp_path, pattern).reference_stats()
    suite(tmp_path, pattern).reference_stats()
    assert len(list((tmp_path / "stats").glob("reference-*.npz"))) == 1  # reused
    write_reference(tmp_path, seed=7)  # same names, other images
    changed = suite(tmp_path, pattern).reference_stats()
    assert len(list((tmp_path / "stats").glob("reference-*.npz"))) == 2
    assert not np.array_equal(first.features, changed.features)
