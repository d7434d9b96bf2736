"""Condition inputs made on the fly from a batch's images: inpainting masks and super-resolution's low-res image.

They run after collation (`ImageDataModule(inputs=[...])`), so the same config works on the shapes, an image
folder or webdataset shards. Randomness comes from torch's generator (seeded per DataLoader worker) unless one is
passed (evaluation: the same masks every time). Cached latents hold no images, so these need image data.
"""
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.data.skips import collate_kept

MASK_KINDS = ("box", "free_form")


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def box_mask(height: int, width: int, generator: torch.Generator | None = None,
             min_side: float = 0.25, max_side: float = 0.6) -> Tensor:
    """A random axis-aligned rectangle, each side a uniform fraction in [min_side, max_side] of the image's: [1, H, W],
    1 inside (the pixels to fill)."""
    h = max(1, round(_uniform(min_side, max_side, generator) * height))
    w = max(1, round(_uniform(min_side, max_side, generator) * width))
    top = int(torch.randint(height - h + 1, (), generator=generator))
    left = int(torch.randint(width - w + 1, (), generator=generator))
    mask = torch.zeros(1, height, width)
    mask[:, top : top + h, left : left + w] = 1
    return mask


def free_form_mask(height: int, width: int, generator: torch.Generator | None = None, max_strokes: int = 3,
                   max_vertices: int = 6) -> Tensor:
    """Brush strokes in the style of free-form inpainting masks (Yu et al. 2019): 1-max_strokes polylines of random
    turns, steps of 10-30% of the side and a width of 6-16% of it; [1, H, W], 1 on the strokes."""
    side = min(height, width)
    y, x = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")  # pixel centres
    mask = torch.zeros(height, width, dtype=torch.bool)
    for _ in range(1 + int(torch.randint(max_strokes, (), generator=generator))):
        radius = _uniform(0.03, 0.08, generator) * side
        point = torch.rand(2, generator=generator) * torch.tensor([width, height])
        angle = _uniform(0, 2 * math.pi, generator)
        for _ in range(2 + int(torch.randint(max_vertices - 1, (), generator=generator))):
            angle += _uniform(-math.pi / 2, math.pi / 2, generator)
            step = _uniform(0.1, 0.3, generator) * side
            end = (point + step * torch.tensor([math.cos(angle), math.sin(angle)])).clamp(
                torch.zeros(2), torch.tensor([width, height], dtype=torch.float32))
            # distance of every pixel centre to the segment point -> end
            d = end - point
            t = (((x - point[0]) * d[0] + (y - point[1]) * d[1]) / d.square().sum().clamp(min=1e-6)).clamp(0, 1)
            mask |= (x - point[0] - t * d[0]).square() + (y - point[1] - t * d[1]).square() <= radius**2
            point = end
    return mask[None].float()


class RandomMasks:
    """Inpainting masks for a batch: batch['mask'] [B, 1, H, W], 1 = to fill, each a box or free-form strokes."""

    def __init__(self, kinds: Sequence[str] = MASK_KINDS):
        unknown = sorted(set(kinds) - set(MASK_KINDS))
        if not kinds or unknown:
            raise ValueError(f"mask kinds must be a non-empty subset of {MASK_KINDS}, got {list(kinds)}")
        self.kinds = tuple(kinds)

    def __call__(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        b, _, h, w = batch["image"].shape
        makers = {"box": box_mask, "free_form": free_form_mask}
        picks = torch.randint(len(self.kinds), (b,), generator=generator).tolist()
        return {"mask": torch.stack([makers[self.kinds[k]](h, w, generator) for k in picks])}


def downsample(images: Tensor, factor: int) -> Tensor:
    """[B, C, H, W] -> [B, C, H/f, W/f] by f x f box averages (an anti-aliased low-resolution view)."""
    if factor < 1 or images.shape[-2] % factor or images.shape[-1] % factor:
        raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by the factor {factor}")
    return F.avg_pool2d(images, factor)


class LowRes:
    """Super-resolution input: batch['lowres'] = the image downsampled `factor` times (box filter)."""

    def __init__(self, factor: int = 4):
        if factor < 2:
            raise ValueError(f"super-resolution factor must be >= 2, got {factor}")
        self.factor = factor

    def __call__(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        return {"lowres": downsample(batch["image"], self.factor)}


def collate_with_inputs(inputs: Sequence[Callable[[dict], dict]], items: list) -> dict | None:
    """collate_kept, then each input maker's keys added to the batch (after collation: one call per batch)."""
    batch = collate_kept(items)
    if batch is None:
        return None
    for make in inputs:
        batch.update(make(batch))
    return batch
