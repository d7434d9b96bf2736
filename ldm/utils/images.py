"""Image grids: tensors in [-1, 1] to uint8 pictures and PNG files."""
from pathlib import Path

import torch
from einops import rearrange
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> [0, 255] uint8, same shape."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid(images: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """[rows, cols, C, H, W] in [-1, 1] -> one uint8 image [H', W', C] with `pad` black pixels between tiles."""
    images = torch.nn.functional.pad(to_uint8(images.cpu()), (pad, 0, pad, 0))
    return rearrange(images, "r k c h w -> (r h) (k w) c")


def save_png(image_hwc: torch.Tensor, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_hwc.numpy()).save(path)
    return path
