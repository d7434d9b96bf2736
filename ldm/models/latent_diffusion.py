"""Conditional latent diffusion training (Rombach et al. 2022): a denoiser on (scaled) first-stage latents."""
import math
from collections.abc import Callable

import lightning as L
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from ldm.data.latents import LatentDataModule
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.guidance import cfg_dropout
from ldm.diffusion.loss import denoising_loss, sigma_buckets
from ldm.models.ema import EMA
from ldm.models.first_stage import FIRST_STAGE_CONFIG_KEY, first_stage_hash
from ldm.models.fsdp import FSDP2Strategy
from ldm.models.generate import generate_latents
from ldm.models.step_seed import step_generator
from ldm.utils.errors import DivergedError


class NonFiniteLossError(DivergedError):
    """Training stopped on a NaN/inf loss; the last good checkpoint is kept untouched."""


def warmup_then(schedule: str, warmup_steps: int, total_steps: int):
    """LR multiplier: linear warm-up, then constant or cosine decay to 0 (Loshchilov & Hutter 2017)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    if schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown lr schedule {schedule!r}: constant | cosine")
    return factor


class LatentDiffusionModule(L.LightningModule):
    """Wires backbone + formulation (the denoiser), conditioner, frozen first stage, EMA and optimiser."""

    def __init__(
        self,
        backbone: nn.Module,
        formulation,
        conditioner: nn.Module,
        first_stage: nn.Module | None = None,
        latent_shape: tuple[int, int, int] = (4, 8, 8),
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        scale_lr: bool = False,
        base_batch_size: int = 256,
        cfg_dropout_prob: float = 0.1,
        ema_decay: float | None = 0.9999,
        compile: bool = False,
        latent_scale: float | None = None,
        loss_buckets: int = 4,
        sample_prompts: list[str] | None = None,
        sample_labels: list[int] | None = None,
        sample_seeds: list[int] = (0, 1, 2, 3),
        sample_sampler: str = "euler",
        sample_steps: int = 30,
        sample_guidance: float = 3.0,
        seed: int = 0,
    ):
        super().__init__()
        self.denoiser = Denoiser(backbone, formulation)
        self.formulation = formulation
        self.conditioner = conditioner
        self.first_stage = first_stage.requires_grad_(False).eval() if first_stage is not None else None
        self.ema = EMA(self.ema_target(), ema_decay) if ema_decay else None
        self.latent_shape = tuple(latent_shape)
        # Latent normalisation z_n = (z - shift) * scale: data from the cache manifest (or `latent_scale` when
        # encoding on the fly), stored with the checkpoint so sampling needs nothing else.
        c = self.latent_shape[0]
        init_scale = torch.full((c,), float(latent_scale) if latent_scale is not None else 1.0)
        self.register_buffer("latent_scale", init_scale)
        self.register_buffer("latent_shift", torch.zeros(c))
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.warmup_steps, self.lr_schedule = warmup_steps, lr_schedule
        self.scale_lr, self.base_batch_size = scale_lr, base_batch_size
        self.cfg_dropout_prob, self.loss_buckets, self.seed = cfg_dropout_prob, loss_buckets, seed
        self.compile = compile
        self.sample_prompts, self.sample_labels = sample_prompts, sample_labels
        self.sample_seeds, self.sample_sampler = list(sample_seeds), sample_sampler
        self.sample_steps, self.sample_guidance = sample_steps, sample_guidance
        self._train_denoiser = [self.denoiser]  # a list keeps a compiled wrapper out of the state_dict

    def ema_target(self) -> nn.ModuleDict:
        """What EMA averages (and FSDP shards): the backbone, and the conditioner unless it is frozen (OpenCLIP)."""
        parts = {"backbone": self.denoiser.net}
        if any(p.requires_grad for p in self.conditioner.parameters()):
            parts["conditioner"] = self.conditioner
        return nn.ModuleDict(parts)

    def configure_model(self) -> None:
        """trainer=fsdp: shard before the optimizer is built (once: validate/fit calls come here again)."""
        strategy = self.trainer.strategy
        if isinstance(strategy, FSDP2Strategy) and not isinstance(self.denoiser.net, FSDPModule):
            self.shard(strategy.shard)

    def shard(self, shard: Callable[..., None]) -> None:
        """Shard the trained parts and their EMA copy the same way, `shard(module, trained=, forward_methods=)`,
        so the EMA update stays local to each shard. Frozen parts (first stage, a frozen text encoder) stay
        whole: they have no gradients to synchronise."""
        averaged = self.ema.net if self.ema is not None else {}
        for name, part in self.ema_target().items():
            methods = ("encode", "null") if name == "conditioner" else ()  # called instead of forward
            shard(part, trained=True, forward_methods=methods)
            if name in averaged:
                shard(averaged[name], trained=False, forward_methods=methods)
        whole = [n for n, p in self.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
        if whole:  # FSDP synchronises only sharded gradients: these would drift apart across ranks
            raise RuntimeError(f"FSDP left trained parameters unsharded: {whole[:5]}")

    # --- set-up ---
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        if isinstance(dm, LatentDataModule):  # cached latents: scale/shift come from the cache manifest
            self.latent_scale.copy_(dm.scale.flatten())
            self.latent_shift.copy_(dm.shift.flatten())
        if self.compile and stage == "fit":
            self._train_denoiser = [torch.compile(self.denoiser)]

    def global_batch_size(self) -> int | None:
        """Global batch = per-device batch x devices x nodes x accumulation (None: no DataModule `batch_size`)."""
        per_device = getattr(self.trainer.datamodule, "batch_size", None)  # plain DataLoaders have no DataModule
        if per_device is None:
            return None
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self):
        batch = self.global_batch_size()
        if self.scale_lr and batch is None:
            raise ValueError("scale_lr needs the per-device batch size: train with a DataModule that has `batch_size`")
        lr = self.lr * batch / self.base_batch_size if self.scale_lr else self.lr
        params = [p for p in self.ema_target().parameters() if p.requires_grad]  # what EMA averages is what trains
        # fused: one kernel for all parameters; on 2 CPU cores torch's default (foreach) took 0.117 s of a 0.98 s
        # shapes_txt2img step, fused 0.027 s (benchmarks/bench_adamw.py). Sharded (DTensor) parameters keep the default.
        fused = not any(isinstance(p, DTensor) for p in params)
        opt = torch.optim.AdamW(params, lr=lr, betas=self.betas, weight_decay=self.weight_decay, fused=fused)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else 10**9
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then(self.lr_schedule, self.warmup_steps, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The first stage's identity and config travel with the weights: the checkpoint rebuilds alone."""
        if self.first_stage is not None:
            checkpoint["first_stage_hash"] = first_stage_hash(self.first_stage)
            checkpoint[FIRST_STAGE_CONFIG_KEY] = getattr(self.first_stage, "model_config", None)

    # --- latents ---
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_shift.view(1, -1, 1, 1)) * self.latent_scale.view(1, -1, 1, 1)

    def unnormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.latent_scale.view(1, -1, 1, 1) + self.latent_shift.view(1, -1, 1, 1)

    def batch_latents(self, batch, generator) -> torch.Tensor:
        """Cached latents arrive normalised; images are encoded on the fly by the frozen first stage."""
        if "latent" in batch:
            return batch["latent"]
        if self.first_stage is None:
            raise ValueError("batch has images but the model has no first_stage to encode them (model.first_stage)")
        with torch.no_grad():
            return self.normalize(self.first_stage.encode(batch["image"]).sample(generator=generator))

    # --- training ---
    def training_step(self, batch, batch_idx):
        g = step_generator(self.seed, self.global_step, self.global_rank, self.device)
        x0 = self.batch_latents(batch, g)
        cond = self.conditioner.encode(batch)
        cond = cfg_dropout(cond, self.conditioner.null(x0.shape[0]), self.cfg_dropout_prob, generator=g)
        loss, sigma = denoising_loss(self._train_denoiser[0], x0, cond, self.formulation, generator=g)
        mean = loss.mean()
        if self.trainer.strategy.reduce_boolean_decision(not torch.isfinite(mean).item(), all=False):
            raise NonFiniteLossError(
                f"non-finite loss at step {self.global_step}; stopped without saving. The last good checkpoint "
                "is in <run_dir>/checkpoints; lower the lr, enable grad clipping or check the data."
            )
        self.log("train/loss", mean, prog_bar=True, batch_size=len(x0))
        buckets = sigma_buckets(sigma, self.formulation, self.loss_buckets)
        for b in range(self.loss_buckets):
            picked = buckets == b
            if picked.any():
                self.log(f"train/loss_sigma_bucket{b}", loss[picked].mean(), batch_size=int(picked.sum()))
        return mean

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.ema_target())

    def validation_step(self, batch, batch_idx):
        g = step_generator(self.seed + 1, batch_idx, self.global_rank, self.device)  # same noise every validation
        x0 = self.batch_latents(batch, g)
        denoiser, conditioner = self.inference_parts()
        loss, _ = denoising_loss(denoiser, x0, conditioner.encode(batch), self.formulation, generator=g)
        self.log("val/loss", loss.mean(), prog_bar=True, sync_dist=True, batch_size=len(x0))

    # --- inference (EMA by default) ---
    def inference_parts(self, use_ema: bool = True) -> tuple[Denoiser, nn.Module]:
        if use_ema and self.ema is not None:
            averaged = self.ema.net
            conditioner = averaged["conditioner"] if "conditioner" in averaged else self.conditioner
            return Denoiser(averaged["backbone"], self.formulation), conditioner
        return self.denoiser, self.conditioner

    @torch.no_grad()
    def sample(self, batch: dict, seeds: list[int], *, use_ema: bool = True, decode: bool = True, **opts) -> torch.Tensor:
        """Images [B,3,H,W] in [-1,1] (or normalised latents) for the conditions in `batch`, noise from `seeds`."""
        denoiser, conditioner = self.inference_parts(use_ema)
        cond = conditioner.encode(batch)
        z = generate_latents(
            denoiser, self.formulation, cond, conditioner.null(len(seeds)), seeds, self.latent_shape,
            device=self.device, **opts,
        )
        if not decode:
            return z
        if self.first_stage is None:
            raise ValueError("decoding needs the first stage (model.first_stage)")
        return self.first_stage.decode(self.unnormalize(z)).clamp(-1, 1)

    def sample_batch(self, prompts: list[str] | None, labels: list[int] | None) -> dict:
        n = len(prompts) if prompts is not None else len(labels)
        return {
            "caption": list(prompts) if prompts is not None else [""] * n,
            "label": torch.as_tensor(labels if labels is not None else [-1] * n, device=self.device),
        }

    @torch.no_grad()
    def log_images(self, batch) -> dict[str, torch.Tensor]:
        """Grid of fixed prompts (rows) x fixed seeds (columns) from the EMA weights."""
        prompts = self.sample_prompts or (None if self.sample_labels else list(batch.get("caption", []))[:4])
        labels = self.sample_labels
        rows = len(prompts) if prompts is not None else len(labels)
        cols = len(self.sample_seeds)
        cond_batch = self.sample_batch(
            [p for p in prompts for _ in range(cols)] if prompts is not None else None,
            [y for y in labels for _ in range(cols)] if labels is not None else None,
        )
        images = self.sample(
            cond_batch, self.sample_seeds * rows, sampler=self.sample_sampler, steps=self.sample_steps,
            guidance_scale=self.sample_guidance,
        )
        return {"samples": images.reshape(rows, cols, *images.shape[1:])}
