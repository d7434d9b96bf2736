"""From conditions and seeds to latents: default step schedules per formulation, guidance, sampler call."""
import torch

from ldm.diffusion.formulations import EDMFormulation, FlowFormulation, VPFormulation
from ldm.diffusion.guidance import CFGDenoiser
from ldm.diffusion.noise import SampleNoise
from ldm.diffusion.samplers import SAMPLERS
from ldm.diffusion.step_schedules import discrete_sigmas, flow_sigmas, karras_sigmas


def step_sigmas(formulation, steps: int, schedule: str = "default") -> torch.Tensor:
    """Descending sigmas (ending in 0) for `steps` sampler steps; `default` is each family's usual choice."""
    if schedule == "default":
        schedule = {VPFormulation: "trailing", EDMFormulation: "karras", FlowFormulation: "flow"}[type(formulation)]
    if schedule in ("leading", "trailing", "linspace"):
        if not isinstance(formulation, VPFormulation):
            raise ValueError(f"schedule {schedule!r} needs a discrete VP model, not {type(formulation).__name__}")
        return discrete_sigmas(formulation.sigmas_table, steps, spacing=schedule)
    if schedule == "karras":
        return karras_sigmas(steps, formulation.sigma_min, min(formulation.sigma_max, 1e4))
    if schedule == "flow":
        return flow_sigmas(steps, t_max=formulation.t_max if isinstance(formulation, FlowFormulation) else 0.999)
    raise ValueError(f"unknown step schedule {schedule!r}: default | leading | trailing | linspace | karras | flow")


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
    device: torch.device | str = "cpu",
    **sampler_opts,
) -> torch.Tensor:
    """Sample latents [B, *latent_shape], sample i drawing all its noise from seeds[i] (batch-independent).

    img2img (SDEdit, Meng et al. 2022): with `init` latents, noise them to the sigma reached after
    (1 - strength) of the steps and denoise from there with the same sampler.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    sigmas = step_sigmas(formulation, steps, schedule).to(device)
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
    return SAMPLERS[sampler](denoiser, x, sigmas, cond=cond, generator=noise, **sampler_opts)
