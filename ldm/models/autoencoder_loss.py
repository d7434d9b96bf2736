"""First-stage losses: reconstruction, KL, hinge GAN, adaptive GAN weight (Esser et al. 2021; Rombach et al. 2022)."""

import torch
from torch import Tensor

from ldm.nn.autoencoder import DiagonalGaussian


def reconstruction_loss(x: Tensor, x_rec: Tensor, l1: float = 1.0, l2: float = 0.0) -> Tensor:
    """Pixel reconstruction loss l1 * |x - x_rec| + l2 * (x - x_rec)^2, mean over C, H, W: one value per sample [B]."""
    if x.shape != x_rec.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_rec {tuple(x_rec.shape)} must have the same shape")
    diff = (x - x_rec).float()
    return (l1 * diff.abs() + l2 * diff.pow(2)).flatten(1).mean(dim=1)


def kl_loss(posterior: DiagonalGaussian) -> Tensor:
    """Batch mean of KL(q(z|x) || N(0, I)), each summed over the latent dims (Kingma & Welling 2014, App. B)."""
    return posterior.kl().mean()


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))]) (Lim & Ye 2017)."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake: Tensor) -> Tensor:
    """Generator's adversarial loss -E[D(x_rec)] (hinge GAN generator objective)."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's adaptive weight lambda = ||grad_GL rec|| / (||grad_GL g|| + delta) at the decoder's last layer GL.

    Esser et al. 2021, eq. 7 (delta = 1e-4 as in their code); clamped to [0, max_weight] and detached.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def adopt_weight(weight: float, step: int, start: int) -> float:
    """`weight` from step `start` on, 0 before: the GAN term waits until reconstructions are reasonable."""
    return weight if step >= start else 0.0
