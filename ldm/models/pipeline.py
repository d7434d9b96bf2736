"""The Python API: a trained checkpoint as an object that samples, encodes and decodes, without Hydra.

    import ldm
    model = ldm.load("experiments/shapes_txt2img/checkpoints/last.ckpt")   # or the run directory
    images = model.sample(prompts=["a red circle"], seeds=[0, 1, 2], sampler="dpmpp_2m", steps=25, guidance=5.0)

task=sample draws its images through `Pipeline.render` too, so a script and the task give the same pixels for the
same settings. Defaults (sampler, steps, guidance, ...) are the run's own `sampling` config, stored in the checkpoint.
"""
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ldm.data.transforms import load_rgb, prepare_image
from ldm.diffusion.known_region import latent_mask
from ldm.eval.image_tasks import read_layout
from ldm.models.autoencoder import AutoencoderModule
from ldm.models.first_stage import load_first_stage_with_config
from ldm.models.generate import Job, render
from ldm.models.latent_diffusion import LatentDiffusionModule
from ldm.models.sampling import Sampling, conditions
from ldm.utils.checkpoint import build_module, checkpoint_config, read_checkpoint
from ldm.utils.errors import ConfigError
from ldm.utils.images import to_uint8
from ldm.utils.rundir import LAST, checkpoint_dir

OUTPUTS = ("pil", "tensor")


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint (.ckpt, .safetensors, sharded directory) or a run directory, meaning its checkpoints/last.ckpt."""
    path = Path(path)
    if (checkpoint_dir(path) / LAST).exists():
        return checkpoint_dir(path) / LAST
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (give a .ckpt/.safetensors file or a run directory)")
    return path


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N,3,H,W] in [-1, 1] -> PIL RGB images."""
    return [Image.fromarray(pixels.permute(1, 2, 0).numpy()) for pixels in to_uint8(images.cpu())]


def image_batch(images: Sequence[Image.Image | str | Path], resolution: int) -> torch.Tensor:
    """PIL images or files -> [N,3,R,R] in [-1, 1], prepared like training data: the centred square (never
    stretched), resized to `resolution`."""
    return torch.stack([prepare_image(i if isinstance(i, Image.Image) else load_rgb(i), resolution) for i in images])


def broadcast(prompts: list, seeds: list) -> tuple[list, list]:
    """Pair conditions with seeds: equal lengths pair up, a single one of either is repeated."""
    if len(prompts) == len(seeds) or len(seeds) == 1 or len(prompts) == 1:
        n = max(len(prompts), len(seeds))
        return prompts * (n // len(prompts)), seeds * (n // len(seeds))
    raise ValueError(f"{len(prompts)} conditions and {len(seeds)} seeds: give equal numbers, or one of either")


class Pipeline:
    """A loaded latent diffusion model (sample, encode, decode) or autoencoder (encode, decode), in eval mode.

    `module` is the LightningModule itself, `config` the run's training config, `step` the checkpoint's step.
    """

    def __init__(self, module: torch.nn.Module, config: DictConfig, step: int, path: Path):
        self.module, self.config, self.step, self.path = module.eval(), config, step, path
        stored = config.get("sampling")
        known = {f.name for f in fields(Sampling)}
        self.sampling = Sampling(**{k: v for k, v in OmegaConf.to_container(stored, resolve=True).items()
                                    if k in known}) if stored else Sampling()

    def __repr__(self) -> str:
        return f"Pipeline({type(self.module).__name__}, step={self.step}, path={str(self.path)!r}, device={self.device})"

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def to(self, device: str | torch.device) -> "Pipeline":
        self.module.to(device)
        return self

    @property
    def is_diffusion(self) -> bool:
        return isinstance(self.module, LatentDiffusionModule)

    def _first_stage(self) -> AutoencoderModule:
        first = self.module.first_stage if self.is_diffusion else self.module
        if first is None:
            raise ValueError("this diffusion checkpoint has no first stage to encode or decode with")
        return first

    # --- images <-> latents ---
    @torch.no_grad()
    def encode(self, images: torch.Tensor | Sequence[Image.Image | str | Path], resolution: int | None = None
               ) -> torch.Tensor:
        """Images -> latents [N, C, h, w]: the posterior mean, normalised as the diffusion model sees it (a diffusion
        checkpoint) or raw (an autoencoder). Tensors are [N,3,H,W] in [-1, 1]; PIL images or files are centre-cropped
        and resized to `resolution` (default: the diffusion model's training size)."""
        if not isinstance(images, torch.Tensor):
            if not (resolution or self.resolution):
                raise ValueError("give `resolution` to encode PIL images or files with an autoencoder")
            images = image_batch(images, resolution or self.resolution)
        z = self._first_stage().encode(images.to(self.device)).mean
        return self.module.latent_norm.normalize(z) if self.is_diffusion else z

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output: str = "tensor") -> torch.Tensor | list[Image.Image]:
        """encode's inverse: latents -> images, [N,3,H,W] in [-1, 1] or PIL (output="pil")."""
        latents = latents.to(self.device)
        if self.is_diffusion:
            latents = self.module.latent_norm.unnormalize(latents)
        return self._as(self._first_stage().decode(latents).clamp(-1, 1), output)

    @property
    def resolution(self) -> int | None:
        """The pixel size the diffusion model was trained at (None for an autoencoder: any size works)."""
        if not self.is_diffusion:
            return None
        return self.module.latent_shape[-1] * self._first_stage().net.downsample_factor

    # --- sampling ---
    def settings(self, **overrides) -> Sampling:
        """The run's sampling settings with the given fields replaced (None keeps the run's value)."""
        known = {f.name for f in fields(Sampling)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown sampling settings {unknown}; known: {sorted(known)}")
        return replace(self.sampling, **{k: v for k, v in overrides.items() if v is not None})

    def render(self, jobs: list[Job], sampling: Sampling, init: torch.Tensor | None = None, *, strength: float = 1.0,
               progress: bool = False) -> torch.Tensor:
        """Images [N,3,H,W] in [-1, 1] on the CPU, one per job: the one path of task=sample and `sample`."""
        if not self.is_diffusion:
            raise ValueError(f"{self.path} is an autoencoder checkpoint: it encodes and decodes, it does not sample")
        return render(self.module, jobs, sampling, init, strength=strength, progress=progress)

    def sample(self, prompts: Sequence[str] | None = None, *, labels: Sequence[int] | None = None,
               seeds: Sequence[int] | None = None, sampler: str | None = None, steps: int | None = None,
               guidance: float | None = None, init_image: torch.Tensor | Image.Image | str | Path | None = None,
               strength: float = 0.6, output: str = "pil", progress: bool = False, **settings
               ) -> list[Image.Image] | torch.Tensor:
        """One image per (condition, seed) pair: prompts (text models) or class labels, paired with seeds; a single
        prompt or a single seed is repeated. Seeds default to 0..N-1; sampler, steps and guidance (and any other
        `Sampling` field: schedule, guidance_rescale, eta, use_ema, batch_size) default to the run's.
        `init_image`: img2img from that picture, noised by `strength`."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        conds = conditions(prompts, labels)
        if not conds:
            raise ValueError("nothing to sample: give prompts=[...] or labels=[...]")
        conds, seeds = broadcast(conds, list(seeds) if seeds is not None else list(range(len(conds))))
        sampling = self.settings(sampler=sampler, steps=steps, guidance_scale=guidance, **settings)
        jobs = [sampling.job(p, y, int(s)) for (p, y), s in zip(conds, seeds)]
        init = None if init_image is None else self.encode(
            init_image[None] if isinstance(init_image, torch.Tensor) and init_image.ndim == 3 else
            init_image if isinstance(init_image, torch.Tensor) else [init_image])
        return self._as(self.render(jobs, sampling, init, strength=strength if init is not None else 1.0,
                                    progress=progress), output)

    @property
    def image_task(self) -> str | None:
        """Which image condition the model takes: inpaint, sr, layout (ldm.nn.image_conditions), or None."""
        image = getattr(self.module, "conditioner", None) if self.is_diffusion else None
        name = type(getattr(image, "image", None)).__name__
        return {"MaskedImage": "inpaint", "LowResImage": "sr", "SemanticMap": "layout"}.get(name)

    def sr_factor(self) -> int:
        """The upscaling factor the run trained with (its data.inputs LowRes), 4 if the config does not say."""
        inputs = self.config.get("data", {}).get("inputs") or []
        return next((int(i.factor) for i in inputs if str(i.get("_target_", "")).endswith("LowRes")), 4)

    def condition_images(self, images: torch.Tensor | Sequence[Image.Image | str | Path], prompts: Sequence[str] |
                         None = None, *, seeds: Sequence[int] | None = None, output: str = "pil", **settings
                         ) -> list[Image.Image] | torch.Tensor:
        """Super-resolution and layout-to-image from conditioning images, one seed each (default 0..N-1): low-res
        pictures (any size, prepared at resolution / factor) or semantic maps drawn in the shapes palette (black
        background; ldm.eval.image_tasks.read_layout). Inpainting takes masks too: `inpaint`."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        task = self.image_task
        if task not in ("sr", "layout"):
            raise ValueError(f"{self.path} takes no conditioning image of its own (image task: {task}); inpainting "
                             "goes through `inpaint`")
        size = self.resolution // self.sr_factor() if task == "sr" else self.resolution
        pixels = images if isinstance(images, torch.Tensor) else image_batch(images, size)
        n = len(pixels)
        batch = self.module.sample_batch(list(prompts) if prompts is not None else [""] * n, None)
        batch["lowres" if task == "sr" else "layout"] = pixels.to(self.device) if task == "sr" else read_layout(pixels)
        sampling = self.settings(**settings)
        images = self.module.sample(
            batch, list(seeds) if seeds is not None else list(range(n)), use_ema=sampling.use_ema,
            sampler=sampling.sampler, steps=sampling.steps, schedule=sampling.schedule,
            guidance_scale=sampling.guidance_scale, guidance_rescale=sampling.guidance_rescale,
            **sampling.sampler_options())
        return self._as(images, output)

    def inpaint(self, images: torch.Tensor | Sequence[Image.Image | str | Path],
                masks: torch.Tensor | Sequence[Image.Image | str | Path], prompts: Sequence[str] | None = None, *,
                seeds: Sequence[int] | None = None, training_free: bool | None = None, output: str = "pil",
                **settings) -> list[Image.Image] | torch.Tensor:
        """Fill the masked part of each image (masks: [N, 1, H, W] or files, 1 / white = to fill), one seed each
        (default 0..N-1). An inpainting model (shapes_inpaint) is conditioned on the masked image; any other model,
        or training_free=True, imposes the known region at every step instead (ldm.diffusion.known_region), so the
        two can be compared on one text-to-image and one inpainting checkpoint."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        images = images if isinstance(images, torch.Tensor) else image_batch(images, self.resolution)
        if not isinstance(masks, torch.Tensor):
            masks = (image_batch(masks, self.resolution).mean(1, keepdim=True) > 0).float()  # white (> mid-grey)
        n = len(images)
        if masks.shape != (n, 1, *images.shape[-2:]):
            raise ValueError(f"masks must be [{n}, 1, H, W] like the images {tuple(images.shape)}, got "
                             f"{tuple(masks.shape)}")
        seeds = list(seeds) if seeds is not None else list(range(n))
        trained = type(getattr(self.module.conditioner, "image", None)).__name__ == "MaskedImage"
        if training_free is None:
            training_free = not trained
        if not training_free and not trained:
            raise ValueError(f"{self.path} is not an inpainting model: use training_free=True")
        sampling = self.settings(**settings)
        batch = self.module.sample_batch(list(prompts) if prompts is not None else [""] * n, None)
        batch.update(image=images.to(self.device), mask=masks.to(self.device))
        opts = dict(use_ema=sampling.use_ema, sampler=sampling.sampler, steps=sampling.steps,
                    schedule=sampling.schedule, guidance_scale=sampling.guidance_scale,
                    guidance_rescale=sampling.guidance_rescale, **sampling.sampler_options())
        if training_free:
            opts["known"] = (self.encode(images), latent_mask(masks, self.module.latent_shape[1:]))
        return self._as(self.module.sample(batch, seeds, **opts), output)

    @staticmethod
    def _as(images: torch.Tensor, output: str) -> torch.Tensor | list[Image.Image]:
        return to_pil(images) if output == "pil" else images.cpu()


def load(path: str | Path, device: str | torch.device | None = None) -> Pipeline:
    """A Pipeline from a checkpoint or run directory (code never comes from the file: allow-listed config targets,
    weights_only loading); on CUDA when available unless `device` says otherwise."""
    path = checkpoint_path(path)
    ckpt = read_checkpoint(path)
    config = checkpoint_config(ckpt, str(path))
    target = config.model.get("_target_", "")
    if target.endswith("AutoencoderModule"):  # encode/decode only: no LPIPS or discriminator (VGG weights)
        module = load_first_stage_with_config(path)[0]
    else:
        module = build_module(ckpt, str(path))
    if not isinstance(module, (LatentDiffusionModule, AutoencoderModule)):
        raise ConfigError(f"{path} holds a {type(module).__name__}; ldm.load reads diffusion and autoencoder checkpoints")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Pipeline(module, config, int(ckpt.get("global_step", 0)), path).to(device)
