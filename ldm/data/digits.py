"""scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, offline) as a small class/text dataset."""

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "val", "all")


def split_indices(num_items: int, split: str, val_fraction: float, split_seed: int) -> np.ndarray:
    """Deterministic train/val partition: a seeded permutation, the first round(val_fraction * N) are val."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(split_seed).permutation(num_items)
    num_val = round(val_fraction * num_items)
    return {"train": np.sort(order[num_val:]), "val": np.sort(order[:num_val]), "all": np.arange(num_items)}[split]


class DigitsDataset(Dataset):
    """sklearn digits upsampled bilinearly to `resolution`: white ink on black, grey in 3 channels, label = digit."""

    def __init__(self, split: str = "train", resolution: int = 32, val_fraction: float = 0.1, split_seed: int = 0):
        digits = load_digits()
        self.indices = split_indices(len(digits.target), split, val_fraction, split_seed)
        self.labels = digits.target[self.indices].tolist()
        ink = torch.from_numpy(digits.images[self.indices]).float()[:, None] / 16.0  # [N,1,8,8], 16 = full ink
        ink = F.interpolate(ink, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
        self.images = (ink.clamp(0, 1) * 2 - 1).contiguous()  # [N,1,H,W] in [-1,1]
        self.split, self.resolution = split, resolution

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        label = self.labels[index]
        return {
            "image": self.images[index].expand(3, -1, -1).clone(),  # grey replicated to RGB
            "caption": f"a handwritten digit {DIGIT_NAMES[label]}",
            "label": label,
            "key": f"digits-{int(self.indices[index]):04d}",
        }
