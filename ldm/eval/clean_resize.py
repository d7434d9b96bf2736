"""clean-fid's "clean" resize (Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN
Evaluation"): PIL's antialiased bicubic on the uint8 pixels, each channel resized as a float image, not quantised.

Library resizes disagree (TF1 and PyTorch bilinear alias when shrinking), and the choice moves FID by more than
many published gaps; PIL bicubic is the one that filters properly, so clean-fid recommends it.
"""
import numpy as np
import torch
from PIL import Image


def clean_resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 [B, 3, size, size] in [0, 255]: PIL bicubic per channel in float ("F") mode,
    clipped to [0, 255] (bicubic overshoots at edges) and left unquantised, as clean-fid's "clean" mode does."""
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"clean_resize expects uint8 images [B, 3, H, W], got {pixels.dtype} {tuple(pixels.shape)}")
    planes = pixels.cpu().numpy().astype(np.float32)  # a float32 plane opens as a PIL "F" image
    out = [[np.asarray(Image.fromarray(plane).resize((size, size), Image.Resampling.BICUBIC))
            for plane in image] for image in planes]
    return torch.from_numpy(np.clip(np.array(out, dtype=np.float32), 0, 255))
