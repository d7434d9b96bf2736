"""First-stage reconstruction quality: PSNR, SSIM and rFID between images and their autoencoder reconstructions."""
from collections.abc import Callable

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from ldm.eval.frechet import feature_stats, frechet_distance


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] float32, clamped (a decoder may overshoot)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def _check_pair(real: torch.Tensor, recon: torch.Tensor) -> None:
    if real.shape != recon.shape or real.ndim != 4:
        raise ValueError(f"expected two image batches [B, C, H, W] of one shape, got {real.shape} and {recon.shape}")


def psnr(real: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, 10 log10(1 / MSE) on images mapped from [-1, 1] to [0, 1]; shape [B]."""
    _check_pair(real, recon)
    mse = (_to_unit(real) - _to_unit(recon)).square().flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp(min=1e-10))  # identical images: 100 dB rather than inf


def ssim(real: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5) on images in [0, 1]; shape [B]."""
    _check_pair(real, recon)
    return structural_similarity_index_measure(_to_unit(recon), _to_unit(real), data_range=1.0, reduction="none")


@torch.no_grad()
def reconstruction_metrics(
    real: torch.Tensor,
    recon: torch.Tensor,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean PSNR and SSIM, and rFID (Frechet distance in `features`' space between real and reconstructed sets)."""
    out = dict(psnr=psnr(real, recon).mean().item(), ssim=ssim(real, recon).mean().item())
    if features is not None:
        out["rfid"] = frechet_distance(*feature_stats(features(real)), *feature_stats(features(recon)))
    return out
