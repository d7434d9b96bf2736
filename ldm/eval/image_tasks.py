"""Metrics of the image-conditioned tasks and their trivial baselines (pure functions over [-1, 1] images).

Inpainting: PSNR on the filled region (`masked_psnr`) against a blurred fill of the hole (`blurred_fill`).
Super-resolution: PSNR / SSIM (ldm.eval.reconstruction) against bicubic upsampling (`bicubic_upsample`).
Layout-to-image: per-pixel class agreement of the generated image with the map (`layout_accuracy`), classes read
off the pixels as the nearest of black and the shapes palette (`read_layout`).
"""
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.data.condition_inputs import LowRes, RandomMasks
from ldm.data.shapes import COLOR_RGB, ShapesDataset
from ldm.eval.frechet import feature_stats, frechet_distance
from ldm.eval.reconstruction import _check_pair, _to_unit, psnr, ssim

LAYOUT_PALETTE = torch.tensor([(0, 0, 0), *COLOR_RGB], dtype=torch.float32) / 255  # [classes, 3]: background first


def masked_psnr(real: Tensor, fake: Tensor, mask: Tensor) -> Tensor:
    """Per-image PSNR in dB over the pixels where mask [B, 1, H, W] is 1 (inpainting's filled region); shape [B]."""
    _check_pair(real, fake)
    if mask.shape != (real.shape[0], 1, *real.shape[2:]):
        want = [real.shape[0], 1, *real.shape[2:]]
        raise ValueError(f"mask must be {want}, got {list(mask.shape)}")
    weight = mask.float().expand_as(real)
    se = (_to_unit(real) - _to_unit(fake)).square() * weight
    mse = se.flatten(1).sum(1) / weight.flatten(1).sum(1).clamp(min=1)
    return 10 * torch.log10(1 / mse.clamp(min=1e-10))


def _gaussian_blur(t: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of [B, C, H, W] with zero padding (callers normalise by a blurred weight)."""
    radius = int(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=t.device)
    k = torch.exp(-x.square() / (2 * sigma**2))
    k = (k / k.sum()).to(t.dtype)
    c = t.shape[1]
    t = F.conv2d(t, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, radius), groups=c)
    return F.conv2d(t, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(radius, 0), groups=c)


def blurred_fill(image: Tensor, mask: Tensor, sigma: float = 2.0) -> Tensor:
    """Inpainting baseline: each hole pixel (mask 1) the Gaussian-weighted mean of the known pixels near it
    (normalised convolution), the blur widened 2x at a time where none are near; known pixels kept."""
    hole = mask.float() > 0.5  # [B, 1, H, W]
    known = (~hole).to(image.dtype)
    out, done = image.clone(), ~hole
    while not bool(done.all()):
        if sigma > 4 * max(image.shape[-2:]):  # nothing known at all: mid-grey
            return torch.where(done, out, torch.zeros_like(out))
        weight = _gaussian_blur(known, sigma)
        fill = _gaussian_blur(image * known, sigma) / weight.clamp(min=1e-12)
        reached = ~done & (weight > 1e-4)
        out = torch.where(reached, fill, out)
        done, sigma = done | reached, 2 * sigma
    return out


def bicubic_upsample(lowres: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Super-resolution baseline: bicubic interpolation of the low-resolution image to `size`, clamped to [-1, 1]."""
    return F.interpolate(lowres.float(), size, mode="bicubic", align_corners=False).clamp(-1, 1)


def read_layout(images: Tensor) -> Tensor:
    """Per-pixel classes of images [B, 3, H, W] in [-1, 1]: the nearest of black (0) and the palette (1 + colour);
    LongTensor [B, H, W]."""
    pixels = _to_unit(images).permute(0, 2, 3, 1)  # [B, H, W, 3]
    return torch.cdist(pixels.reshape(-1, 3), LAYOUT_PALETTE.to(pixels)).argmin(-1).reshape(pixels.shape[:3])


def layout_accuracy(images: Tensor, layout: Tensor) -> dict[str, float]:
    """Agreement of images [B, 3, H, W] with their maps [B, H, W]: `accuracy` over all pixels, `foreground_accuracy`
    over the map's object pixels (an all-black image scores 0 there), `miou` the mean over classes present of IoU."""
    if layout.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"layout must be [B, H, W] = {[images.shape[0], *images.shape[2:]]}, got {list(layout.shape)}")
    read, layout = read_layout(images), layout.to(images.device).long()
    right = read == layout
    foreground = layout > 0
    ious = []
    for c in layout.unique().tolist():
        union = ((read == c) | (layout == c)).sum()
        ious.append((((read == c) & (layout == c)).sum() / union).item())
    return dict(accuracy=right.float().mean().item(),
                foreground_accuracy=right[foreground].float().mean().item() if foreground.any() else float("nan"),
                miou=sum(ious) / len(ious))


# --- the shapes tasks: held-out conditions, the trivial baseline and the scores, for the script and the tests ---
TASKS = ("inpaint", "sr", "layout")


def shapes_task_batch(task: str, num_samples: int, resolution: int = 32, seed: int = 7, factor: int = 4) -> dict:
    """Held-out shapes scenes (ShapesDataset(seed)) with the task's condition inputs, masks drawn from a generator
    seeded by `seed`: the same batch for every checkpoint. Keys: image, caption, layout, and mask or lowres."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    data = ShapesDataset(num_samples, resolution, seed=seed, layout=True)
    items = [data[i] for i in range(num_samples)]
    batch = {"image": torch.stack([it["image"] for it in items]), "layout": torch.stack([it["layout"] for it in items]),
             "caption": [it["caption"] for it in items]}
    if task == "inpaint":
        batch.update(RandomMasks()(batch, torch.Generator().manual_seed(seed)))
    if task == "sr":
        batch.update(LowRes(factor)(batch))
    return batch


def task_baseline(task: str, batch: dict) -> Tensor:
    """The trivial answer each task must beat: a blurred fill of the hole, bicubic upsampling, an all-black image."""
    if task == "inpaint":
        return blurred_fill(batch["image"], batch["mask"])
    if task == "sr":
        return bicubic_upsample(batch["lowres"], batch["image"].shape[-2:])
    return -torch.ones_like(batch["image"])


def task_scores(task: str, batch: dict, images: Tensor, fid_features: Callable[[Tensor], Tensor] | None = None,
                lpips: Callable[[Tensor, Tensor], Tensor] | None = None) -> dict[str, float]:
    """The issue's numbers for images generated for `batch`: inpainting PSNR (and LPIPS) in the hole, SR PSNR / SSIM
    (and LPIPS) against the truth, layout per-pixel accuracy; FID (given a feature network) over whole images.

    Inpainting scores the composite (known pixels pasted back, as inpainting pipelines output) for LPIPS and FID, and
    reports how well the raw output kept the known pixels (`psnr_known`: the first stage's round trip bounds it)."""
    real = batch["image"].to(images)
    out: dict[str, float] = {}
    if task == "inpaint":
        mask = batch["mask"].to(images)
        out["psnr_hole"] = masked_psnr(real, images, mask).mean().item()
        out["psnr_known"] = masked_psnr(real, images, 1 - mask).mean().item()
        images = torch.where(mask > 0.5, images, real)  # the composite
        if lpips is not None:
            out["lpips"] = lpips(real, images).mean().item()
    elif task == "sr":
        out["psnr"], out["ssim"] = psnr(real, images).mean().item(), ssim(real, images).mean().item()
        if lpips is not None:
            out["lpips"] = lpips(real, images).mean().item()
    else:
        out.update({f"layout_{k}": v for k, v in layout_accuracy(images, batch["layout"]).items()})
    if fid_features is not None and task != "sr":
        out["fid_shapes"] = frechet_distance(*feature_stats(fid_features(real)), *feature_stats(fid_features(images)))
    return out
