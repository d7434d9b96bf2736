"""Generation: from conditions and seeds to latents (step schedule, guidance, sampler call), and from a list of
jobs (condition, seed, sampler settings) to images with a trained module; used by tasks and callbacks alike."""
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from rich.progress import track

from ldm.diffusion.guidance import CFGDenoiser
from ldm.diffusion.known_region import KnownRegionDenoiser
from ldm.diffusion.noise import SampleNoise
from ldm.diffusion.samplers import resolve_sampler
from ldm.diffusion.step_schedules import check_schedule

if TYPE_CHECKING:  # sampling.py builds Jobs, so it imports this module
    from ldm.models.sampling import Sampling


def check_sampling(sampler: str, schedule: str) -> None:
    """Fail before any work (loading, sampling) when the sampler or the step schedule name is unknown."""
    resolve_sampler(sampler)
    check_schedule(schedule)


@torch.no_grad()
def generate_latents(
    denoiser,
    formulation,
    cond: dict,
    uncond: dict | None,
    seeds: list[int],
    latent_shape: tuple[int, int, int],
    *,
    sampler: str = "euler",
    steps: int = 50,
    schedule: str = "default",
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    known: tuple[torch.Tensor, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    **sampler_opts,
) -> torch.Tensor:
    """Sample latents [B, *latent_shape], sample i drawing all its noise from seeds[i] (batch-independent).

    img2img (SDEdit, Meng et al. 2022): with `init` latents, noise them to the sigma reached after
    (1 - strength) of the steps and denoise from there with the same sampler.
    Training-free inpainting: with `known` = (latents, latent mask, 1 = to fill), the known region is imposed at
    every step (ldm.diffusion.known_region).
    """
    sample = resolve_sampler(sampler)
    if not 0 < strength <= 1:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    sigmas = formulation.step_sigmas(steps, schedule).to(device)
    noise = SampleNoise(seeds)
    x = noise.randn(latent_shape, device=device)
    if init is None:
        x = x * sigmas[0]
    else:
        sigmas = sigmas[min(int(round(steps * (1 - strength))), steps - 1) :]
        x = init.to(device) + x * sigmas[0]
    if guidance_scale != 1.0:
        if uncond is None:
            raise ValueError("guidance_scale != 1 needs an unconditional branch (conditioner.null)")
        denoiser = CFGDenoiser(denoiser, guidance_scale, uncond, guidance_rescale, guidance_interval)
    if known is not None:
        denoiser = KnownRegionDenoiser(denoiser, known[0].to(device), known[1].to(device))
    return sample(denoiser, x, sigmas, cond=cond, generator=noise, **sampler_opts)


@dataclass(frozen=True)
class Job:
    """One image: its condition, seed and sampler settings (one line of samples.jsonl)."""

    prompt: str
    label: int
    seed: int
    sampler: str
    steps: int
    guidance: float

    def file_name(self, index: int) -> str:
        return f"{index:05d}-seed{self.seed}-{self.sampler}-{self.steps}-g{self.guidance:g}.png"


def render(module, jobs: list[Job], sampling: "Sampling", init: torch.Tensor | None = None, *, strength: float = 1.0,
           progress: bool = False) -> torch.Tensor:
    """Images [N,3,H,W] for the jobs, batched by identical sampler settings (noise is per seed, so batching
    never changes an image); the rest of the settings (schedule, rescale, eta, batch size, EMA) from `sampling`."""
    out: list[torch.Tensor | None] = [None] * len(jobs)
    key = lambda i: (jobs[i].sampler, jobs[i].steps, jobs[i].guidance)  # noqa: E731
    order = sorted(range(len(jobs)), key=key)
    batches = []
    for _, group in itertools.groupby(order, key=key):
        group = list(group)
        batches += [group[i : i + sampling.batch_size] for i in range(0, len(group), sampling.batch_size)]
    for batch in track(batches, description="sampling", disable=not progress):
        first = jobs[batch[0]]
        cond = module.sample_batch([jobs[i].prompt for i in batch], [jobs[i].label for i in batch])
        if not any(cond["caption"]):
            cond["caption"] = [""] * len(batch)
        images = module.sample(
            cond, [jobs[i].seed for i in batch], use_ema=sampling.use_ema, sampler=first.sampler, steps=first.steps,
            schedule=sampling.schedule, guidance_scale=first.guidance, guidance_rescale=sampling.guidance_rescale,
            init=None if init is None else init.expand(len(batch), -1, -1, -1), strength=strength,
            **sampling.sampler_options(),
        )
        for i, image in zip(batch, images.cpu()):
            out[i] = image
    return torch.stack(out)
