"""Conditional latent diffusion training (Rombach et al. 2022): a denoiser on normalised first-stage latents."""
import lightning as L
import torch
from torch import nn

from ldm.data.latent_norm import LatentNorm
from ldm.data.latents import LatentDataModule
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.guidance import cfg_dropout
from ldm.diffusion.loss import denoising_loss, sigma_buckets
from ldm.models.ema import EMA
from ldm.models.first_stage import FIRST_STAGE_CONFIG_KEY, first_stage_hash
from ldm.models.fsdp import FSDP2Strategy, shard_with_ema
from ldm.models.generate import generate_latents
from ldm.models.optimizer import AdamWSchedule
from ldm.models.step_seed import step_generator
from ldm.utils.errors import ConfigError


def on_the_fly_norm(first_stage: nn.Module | None, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) for latents encoded while training with model.latent_scale=null: the first stage's own scaling
    factor (imported SD weights: 0.18215); ours has none, and a silent 1 would train on latents of any variance."""
    factor = getattr(getattr(first_stage, "net", None), "scaling_factor", None)
    if factor is None:
        raise ConfigError(
            "model.latent_scale=null while encoding images on the fly, and the first stage has no scaling factor: "
            "set model.latent_scale (1 / std of its latents; a cache's manifest.json lists the std), or train on "
            "cached latents (task=cache_latents, data=latents), which measure it"
        )
    return torch.full((channels,), float(factor)), torch.zeros(channels)


def check_latent_sizes(backbone: nn.Module, latent_shapes: list[tuple[int, ...]]) -> None:
    """Every latent size the data yields (one per aspect-ratio bucket) must suit the backbone: both UNet and DiT take
    any height and width that are multiples of their downsampling factor or patch size (DiT builds its fixed sin-cos
    position embedding for each batch's grid), so only those multiples are checked, before the first step."""
    multiple = getattr(backbone, "downsample_factor", None) or getattr(backbone, "patch_size", 1)
    bad = [list(shape[-2:]) for shape in latent_shapes if shape[-2] % multiple or shape[-1] % multiple]
    if bad:
        raise ConfigError(
            f"cached latents of sizes {bad} do not fit the backbone {type(backbone).__name__}, which needs heights and "
            f"widths that are multiples of {multiple}: choose data.buckets (pixels) that are multiples of {multiple} x "
            "the first stage's downsampling factor when caching"
        )


class LatentDiffusionModule(L.LightningModule):
    """Wires backbone + formulation (the denoiser), conditioner, frozen first stage, EMA and optimiser.

    Image grids while training are the ImageGrid callback's, FSDP sharding is ldm/models/fsdp.py's.
    """

    def __init__(
        self,
        backbone: nn.Module,
        formulation,
        conditioner: nn.Module,
        first_stage: nn.Module | None = None,
        latent_shape: tuple[int, int, int] = (4, 8, 8),
        latent_scale: float | None = None,
        optimizer: AdamWSchedule | None = None,
        cfg_dropout_prob: float = 0.1,
        ema_decay: float | None = 0.9999,
        loss_buckets: int = 4,
        compile: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.denoiser = Denoiser(backbone, formulation)
        self.formulation = formulation
        self.conditioner = conditioner
        self.first_stage = first_stage.requires_grad_(False).eval() if first_stage is not None else None
        # decided once: freezing parts later (`trainable=`) must not change what the EMA holds
        self._conditioner_trains = any(p.requires_grad for p in conditioner.parameters())
        self.ema = EMA(self.ema_target(), ema_decay) if ema_decay else None
        self.latent_shape = tuple(latent_shape)
        # From the cache manifest at setup (or `latent_scale` when encoding on the fly); in the checkpoint, so
        # sampling needs nothing else.
        self.latent_norm = LatentNorm(self.latent_shape[0], latent_scale if latent_scale is not None else 1.0)
        self.latent_scale = latent_scale
        self.keep_latent_norm = False  # set by init_from: the source's normalisation, which its network learned
        self.optimizer = optimizer or AdamWSchedule()
        self.cfg_dropout_prob, self.loss_buckets, self.seed = cfg_dropout_prob, loss_buckets, seed
        self.compile = compile
        self._train_denoiser = [self.denoiser]  # a list keeps a compiled wrapper out of the state_dict

    def ema_target(self) -> nn.ModuleDict:
        """What EMA averages (and FSDP shards): the backbone, and the conditioner unless it is frozen (OpenCLIP)."""
        parts = {"backbone": self.denoiser.net}
        if self._conditioner_trains:
            parts["conditioner"] = self.conditioner
        return nn.ModuleDict(parts)

    # --- set-up ---
    def configure_model(self) -> None:
        """trainer=fsdp: shard before the optimizer is built."""
        strategy = self.trainer.strategy
        if isinstance(strategy, FSDP2Strategy):
            shard_with_ema(self, strategy.shard)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        if self.keep_latent_norm:
            pass
        elif isinstance(dm, LatentDataModule):  # cached latents: scale/shift come from the cache manifest
            self.latent_norm.set(dm.norm.scale, dm.norm.shift)
        elif stage == "fit" and self.latent_scale is None and self.first_stage is not None:  # images encoded on the fly
            self.latent_norm.set(*on_the_fly_norm(self.first_stage, self.latent_shape[0]))
        if isinstance(dm, LatentDataModule) and stage == "fit":  # with buckets, batches come in several sizes
            check_latent_sizes(self.denoiser.net, dm.latent_shapes)
        if self.compile and stage == "fit":
            self._train_denoiser = [torch.compile(self.denoiser)]

    def global_batch_size(self) -> int | None:
        """Global batch = per-device batch x devices x nodes x accumulation (None: no DataModule `batch_size`)."""
        per_device = getattr(self.trainer.datamodule, "batch_size", None)  # plain DataLoaders have no DataModule
        if per_device is None:
            return None
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self):
        params = [p for p in self.ema_target().parameters() if p.requires_grad]  # what EMA averages is what trains
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else 10**9
        return self.optimizer.configure(params, self.global_batch_size(), total)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The first stage's identity and config travel with the weights: the checkpoint rebuilds alone."""
        if self.first_stage is not None:
            checkpoint["first_stage_hash"] = first_stage_hash(self.first_stage)
            checkpoint[FIRST_STAGE_CONFIG_KEY] = getattr(self.first_stage, "model_config", None)

    # --- latents ---
    def batch_latents(self, batch, generator) -> torch.Tensor:
        """Cached latents arrive normalised; images are encoded on the fly by the frozen first stage."""
        if "latent" in batch:
            return batch["latent"]
        if self.first_stage is None:
            raise ValueError("batch has images but the model has no first_stage to encode them (model.first_stage)")
        with torch.no_grad():
            return self.latent_norm.normalize(self.first_stage.encode(batch["image"]).sample(generator=generator))

    def with_condition_latents(self, batch: dict, conditioner: nn.Module) -> dict:
        """The batch plus `<name>_latent` for each image the conditioner needs encoded (inpainting's masked image):
        normalised posterior means of the frozen first stage. Unchanged for other conditioners."""
        images = getattr(conditioner, "first_stage_images", lambda _: {})(batch)
        if images and self.first_stage is None:
            raise ValueError(f"the conditioner needs {sorted(images)} encoded, but the model has no first_stage")
        with torch.no_grad():
            encoded = {f"{name}_latent": self.latent_norm.normalize(self.first_stage.encode(image.to(self.device)).mean)
                       for name, image in images.items()}
        return {**batch, **encoded}

    # --- training ---
    def training_step(self, batch, batch_idx):
        g = step_generator(self.seed, self.global_step, self.global_rank, self.device)
        x0 = self.batch_latents(batch, g)
        cond = self.conditioner.encode(self.with_condition_latents(batch, self.conditioner))
        cond = cfg_dropout(cond, self.conditioner.null_like(cond, x0.shape[0]), self.cfg_dropout_prob, generator=g)
        loss, sigma = denoising_loss(self._train_denoiser[0], x0, cond, self.formulation, generator=g)
        mean = loss.mean()  # a NaN/inf stops the run before backward: callbacks/finite_loss.py
        self.log("train/loss", mean, prog_bar=True, batch_size=len(x0))
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:  # the loggers' steps: no syncs in between
            self.log_sigma_buckets(loss, sigma)
        return mean

    def log_sigma_buckets(self, loss: torch.Tensor, sigma: torch.Tensor) -> None:
        """The loss per noise-level bucket (which noise levels the model still gets wrong)."""
        buckets = sigma_buckets(sigma, self.formulation, self.loss_buckets)
        for b in range(self.loss_buckets):
            picked = buckets == b
            if picked.any():
                self.log(f"train/loss_sigma_bucket{b}", loss[picked].mean(), batch_size=int(picked.sum()))

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.ema_target())

    def validation_step(self, batch, batch_idx):
        g = step_generator(self.seed + 1, batch_idx, self.global_rank, self.device)  # same noise every validation
        x0 = self.batch_latents(batch, g)
        denoiser, conditioner = self.inference_parts()
        cond = conditioner.encode(self.with_condition_latents(batch, conditioner))
        loss, _ = denoising_loss(denoiser, x0, cond, self.formulation, generator=g)
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
        cond = conditioner.encode(self.with_condition_latents(batch, conditioner))
        z = generate_latents(
            denoiser, self.formulation, cond, conditioner.null_like(cond, len(seeds)), seeds, self.latent_shape,
            device=self.device, **opts,
        )
        if not decode:
            return z
        if self.first_stage is None:
            raise ValueError("decoding needs the first stage (model.first_stage)")
        return self.first_stage.decode(self.latent_norm.unnormalize(z)).clamp(-1, 1)

    def sample_batch(self, prompts: list[str] | None, labels: list[int] | None) -> dict:
        n = len(prompts) if prompts is not None else len(labels)
        return {
            "caption": list(prompts) if prompts is not None else [""] * n,
            "label": torch.as_tensor(labels if labels is not None else [-1] * n, device=self.device),
        }
