"""Image helpers shared by the datasets: decode to RGB, square crop + resize, flip, scale to [-1, 1]."""

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ldm.utils.images import from_uint8

CROPS = ("center", "random")


def load_rgb(source: str | Path | bytes) -> Image.Image:
    """Decode an image file or bytes to RGB, honouring EXIF orientation; transparency goes onto white."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
            return img
        return img.convert("RGB")  # also forces the full decode, so truncated files fail here


def square_crop_box(width: int, height: int, crop: str) -> tuple[int, int, int, int]:
    """The largest square inside a width x height image, centred or at a random offset (torch RNG)."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    side = min(width, height)
    if crop == "center":
        left, top = (width - side) // 2, (height - side) // 2
    else:  # torch's RNG is seeded per DataLoader worker, so this is reproducible under a seeded loader
        left = int(torch.randint(width - side + 1, ()))
        top = int(torch.randint(height - side + 1, ()))
    return left, top, left + side, top + side


def crop_and_resize(img: Image.Image, box: tuple[int, int, int, int], size: int | tuple[int, int]) -> Image.Image:
    """Crop to `box` (left, top, right, bottom), then bicubic resize to size x size, or to (width, height)."""
    width, height = (size, size) if isinstance(size, int) else size
    # crop first: resize(box=...) would let the filter reach pixels outside the crop
    return img.crop(box).resize((width, height), Image.Resampling.BICUBIC)  # antialiased when shrinking


def prepare_image(img: Image.Image, resolution: int, crop: str = "center", flip: bool = False) -> torch.Tensor:
    """Square crop, bicubic resize to resolution, optional random horizontal flip; float32 [3,H,W] in [-1,1]."""
    img = crop_and_resize(img, square_crop_box(img.width, img.height, crop), resolution)
    if flip and bool(torch.rand(()) < 0.5):
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return uint8_to_tensor(np.asarray(img))


def uint8_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H,W,3] pixels -> float32 [3,H,W] in [-1, 1]."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 [H,W,3] pixels, got {pixels.dtype} {pixels.shape}")
    return from_uint8(torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))))  # HWC -> CHW
