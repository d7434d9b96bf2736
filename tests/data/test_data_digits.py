"""sklearn digits: deterministic disjoint split, labels/captions, faithful upsampling."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sklearn.datasets import load_digits
from torch.utils.data import default_collate

from ldm.data.digits import DigitsDataset

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_split_is_deterministic_disjoint_and_complete():
    train, val = DigitsDataset("train"), DigitsDataset("val")
    assert len(val) == 180 and len(train) + len(val) == 1797
    assert not set(train.indices) & set(val.indices)
    assert np.array_equal(DigitsDataset("val").indices, val.indices)
    assert not np.array_equal(DigitsDataset("val", split_seed=1).indices, val.indices)
    assert len(DigitsDataset("all")) == 1797 and len(DigitsDataset("val", val_fraction=0.2)) == 359


def test_items_labels_captions_and_pixels():
    ds, digits = DigitsDataset("all", resolution=32), load_digits()
    item = ds[7]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["label"] == digits.target[7] == 7 and item["caption"] == "a handwritten digit seven"
    assert item["key"] == "digits-0007" and "attrs" not in item
    assert torch.equal(item["image"][0], item["image"][1]) and torch.equal(item["image"][0], item["image"][2])
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["image"][:, 0, 0].eq(-1).all()  # no ink in the corner: black background
    # box-downsampling the upsampled image recovers the 8x8 scan
    original = torch.from_numpy(digits.images[:50]).float() / 16 * 2 - 1
    restored = F.avg_pool2d(torch.stack([ds[i]["image"][:1] for i in range(50)]), 4)[:, 0]
    assert (restored - original).abs().mean() < 0.2  # bilinear up + box down blurs edges a little
    assert np.corrcoef(restored.flatten(), original.flatten())[0, 1] > 0.97


def test_resolution_collate_and_bad_arguments():
    ds = DigitsDataset("val", resolution=64)
    batch = default_collate([ds[i] for i in range(5)])
    assert batch["image"].shape == (5, 3, 64, 64) and batch["label"].dtype == torch.long
    assert all(c.startswith("a handwritten digit ") for c in batch["caption"])
    with pytest.raises(ValueError, match="split"):
        DigitsDataset("test")
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataset("train", val_fraction=1.5)


def test_config_builds_train_and_val():
    cfg = OmegaConf.create({"data": OmegaConf.load(CONFIGS / "data" / "digits.yaml")})
    dm = instantiate(cfg.data)
    assert len(dm.train) == 1617 and len(dm.val) == 180 and dm.resolution == 32
    assert not set(dm.train.indices) & set(dm.val.indices)
    assert next(iter(dm.train_dataloader()))["image"].shape == (64, 3, 32, 32)
