"""ldm: latent diffusion for researchers (see README.md)."""
import torch

TORCH_FLOOR = (2, 6)  # FSDP2's public API (torch.distributed.fsdp.fully_shard); pyproject.toml says the same


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


if _release(torch.__version__) < TORCH_FLOOR:
    raise ImportError(f"ldm needs torch >= {'.'.join(map(str, TORCH_FLOOR))}, found {torch.__version__}: "
                      f"pip install 'torch>={'.'.join(map(str, TORCH_FLOOR))}'")


def load(path, device=None):
    """A trained checkpoint (or run directory) as a Pipeline: `.sample(prompts=..., seeds=...)`, `.encode`, `.decode`.

    See ldm/models/pipeline.py. Imported on call, so `import ldm` stays light."""
    from ldm.models.pipeline import load as load_pipeline

    return load_pipeline(path, device)
