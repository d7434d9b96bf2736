"""Images as tensors in [-1, 1] and as uint8 pixels: the one conversion pair, grids and PNG files."""
from pathlib import Path

import torch
from einops import rearrange
from PIL import Image

from ldm.utils.atomic import atomic_write


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> [0, 255] uint8, same shape (clamped, rounded to nearest)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 255] uint8 -> [-1, 1] float32, same shape; to_uint8 inverts it exactly."""
    if pixels.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
    return pixels.float() / 127.5 - 1


def grid(images: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """[rows, cols, C, H, W] in [-1, 1] -> one uint8 image [H', W', C] with `pad` black pixels between tiles."""
    images = torch.nn.functional.pad(to_uint8(images.cpu()), (pad, 0, pad, 0))
    return rearrange(images, "r k c h w -> (r h) (k w) c")


def save_png(image_hwc: torch.Tensor, path: str | Path) -> Path:
    """Write uint8 [H, W, C] pixels as a PNG, atomically (a kill leaves no half image)."""
    path = Path(path)
    atomic_write(path, lambda f: Image.fromarray(image_hwc.numpy()).save(f, format="PNG"))
    return path
