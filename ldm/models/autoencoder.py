"""First-stage training: KL autoencoder with L1/L2 + LPIPS + KL + hinge PatchGAN (Rombach et al. 2022, sec. 3)."""
import lightning as L
import torch
from torch import nn

from ldm.eval.reconstruction import psnr, ssim
from ldm.models.autoencoder_loss import (
    adaptive_weight,
    adopt_weight,
    generator_adv_loss,
    hinge_d_loss,
    kl_loss,
    reconstruction_loss,
)
from ldm.models.ema import EMA
from ldm.models.step_seed import step_generator
from ldm.nn.autoencoder import AutoencoderKL, DiagonalGaussian


class AutoencoderModule(L.LightningModule):
    """Wires the autoencoder, its discriminator and losses; two optimizers, manual optimisation."""

    def __init__(
        self,
        net: AutoencoderKL,
        discriminator: nn.Module | None = None,
        lpips: nn.Module | None = None,
        lr: float = 4.5e-6,
        disc_lr: float | None = None,
        betas: tuple[float, float] = (0.5, 0.9),
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        lpips_weight: float = 1.0,
        kl_weight: float = 1e-6,
        disc_start: int = 50001,
        disc_weight: float = 0.5,
        grad_clip: float | None = None,
        ema_decay: float | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.automatic_optimization = False  # generator and discriminator alternate (Esser et al. 2021)
        self.net, self.discriminator, self.lpips = net, discriminator, lpips
        if lpips is not None:
            lpips.requires_grad_(False).eval()
        self.ema = EMA(net, ema_decay) if ema_decay else None
        self.lr, self.disc_lr, self.betas = lr, disc_lr or lr, tuple(betas)
        self.l1_weight, self.l2_weight, self.lpips_weight = l1_weight, l2_weight, lpips_weight
        self.kl_weight, self.disc_start, self.disc_weight = kl_weight, disc_start, disc_weight
        self.grad_clip, self.seed = grad_clip, seed

    # --- first-stage interface (used by latent caching and the diffusion model) ---
    def inference_net(self) -> AutoencoderKL:
        """EMA weights when present: sampling, caching and evaluation use them."""
        return self.ema.net if self.ema is not None else self.net

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        return self.inference_net().encode(images)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.inference_net().decode(z)

    # --- training ---
    def configure_optimizers(self):
        opt_ae = torch.optim.Adam(self.net.parameters(), lr=self.lr, betas=self.betas)
        if self.discriminator is None:
            return opt_ae
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.disc_lr, betas=self.betas)
        return [opt_ae, opt_d]

    def _generator_losses(self, x, x_rec, posterior, disc_factor):
        rec = reconstruction_loss(x, x_rec, l1=self.l1_weight, l2=self.l2_weight)
        if self.lpips is not None and self.lpips_weight > 0:
            rec = rec + self.lpips_weight * self.lpips(x, x_rec).flatten()
        rec = rec.mean()
        losses = {"rec": rec, "kl": kl_loss(posterior).mean()}
        total = rec + self.kl_weight * losses["kl"]
        if self.discriminator is not None and disc_factor > 0:
            g = generator_adv_loss(self.discriminator(x_rec))
            w = adaptive_weight(rec, g, self.net.last_layer) * self.disc_weight
            losses.update(g=g, d_weight=w)
            total = total + disc_factor * w * g
        losses["total"] = total
        return losses

    def training_step(self, batch, batch_idx):
        x = batch["image"]
        step = self.global_step
        generator = step_generator(self.seed, step, self.global_rank, x.device)
        x_rec, posterior = self.net(x, sample=True, generator=generator)
        disc_factor = adopt_weight(1.0, step, self.disc_start) if self.discriminator is not None else 0.0

        opts = self.optimizers()
        opt_ae, opt_d = (opts if isinstance(opts, list) else [opts, None])
        losses = self._generator_losses(x, x_rec, posterior, disc_factor)
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(losses["total"])
        if self.grad_clip:
            self.clip_gradients(opt_ae, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt_ae.step()

        if opt_d is not None and disc_factor > 0:
            d_loss = hinge_d_loss(self.discriminator(x.detach()), self.discriminator(x_rec.detach()))
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            # Step the raw optimizer: Lightning counts every LightningOptimizer.step() as a global step,
            # which would make one batch count twice once the discriminator starts.
            opt_d.optimizer.step()
            losses["d"] = d_loss
        if self.ema is not None:
            self.ema.update(self.net)
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, prog_bar=False, batch_size=len(x))
        self.log("train/loss", losses["total"].detach(), prog_bar=True, batch_size=len(x))

    def validation_step(self, batch, batch_idx):
        x = batch["image"]
        x_rec = self.inference_net()(x, sample=False)[0].clamp(-1, 1)
        self.log_dict(
            {
                "val/psnr": psnr(x_rec, x).mean(),
                "val/ssim": ssim(x_rec, x).mean(),
                "val/l1": (x_rec - x).abs().mean(),
            },
            prog_bar=True,
            sync_dist=True,
            batch_size=len(x),
        )

    @torch.no_grad()
    def log_images(self, batch) -> dict[str, torch.Tensor]:
        """Input | reconstruction pairs for the image-grid callback."""
        x = batch["image"]
        x_rec = self.inference_net()(x, sample=False)[0].clamp(-1, 1)
        return {"reconstruction": torch.stack([x, x_rec], dim=1)}  # [B, 2, C, H, W]: pairs side by side
