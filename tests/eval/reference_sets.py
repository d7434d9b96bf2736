"""Tiny reference sets for the eval=reference tests: built-in shapes scenes written as PNG folders."""
from pathlib import Path

import torch
from torch import nn

from ldm.data.shapes import ShapesDataset
from ldm.utils.images import save_png, to_uint8


class ChannelStats(nn.Module):
    """A stand-in for InceptionFeatures (its interface, microseconds): per-channel means and stds."""

    name, resize = "channel-stats", "none"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], 1)

    def pool_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(images), self(images)[:, :3]


def shapes_images(n: int, *, resolution: int = 32, num_objects: int = 1, seed: int = 1) -> torch.Tensor:
    """n shapes scenes [n, 3, H, W] in [-1, 1]."""
    data = ShapesDataset(size=n, resolution=resolution, num_objects=num_objects, seed=seed)
    return torch.stack([data[i]["image"] for i in range(n)])


def write_folder(images: torch.Tensor, folder: Path) -> Path:
    """images [N, 3, H, W] in [-1, 1] as 000.png, 001.png, ... (sorted names: every reader sees the same order)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_png(to_uint8(image).permute(1, 2, 0), folder / f"{i:03d}.png")
    return folder


def write_prompts(path: Path, n: int, seed: int = 1) -> Path:
    """The captions of n shapes scenes, one per line (words a shapes model's vocabulary holds)."""
    data = ShapesDataset(size=n, seed=seed)
    path.write_text("".join(data[i]["caption"] + "\n" for i in range(n)), encoding="utf-8")
    return path
