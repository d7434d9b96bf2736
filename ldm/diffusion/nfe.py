"""Denoiser evaluations per image (NFE), the cost axis on which samplers are compared at equal quality."""
from ldm.diffusion.samplers import SAMPLER_ALIASES, SAMPLERS

# Heun's 2nd-order step evaluates the denoiser twice, except the last step to sigma = 0, an Euler step (EDM Alg. 1)
SECOND_ORDER = ("heun",)


def nfe(sampler: str, steps: int, guidance_scale: float = 1.0) -> int:
    """Denoiser evaluations for one image: `steps` for first-order and multistep samplers, 2 * steps - 1 for Heun,
    doubled under classifier-free guidance (a conditional and an unconditional branch per evaluation)."""
    canonical = SAMPLER_ALIASES[sampler][0] if sampler in SAMPLER_ALIASES else sampler
    if canonical not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    evals = 2 * steps - 1 if canonical in SECOND_ORDER else steps
    return evals * (2 if guidance_scale != 1.0 else 1)
