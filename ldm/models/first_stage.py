"""The frozen first stage for latent caching and diffusion: rebuilt from an autoencoder checkpoint alone."""
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ldm.models.autoencoder import AutoencoderModule
from ldm.utils.checkpoint import FIRST_STAGE_CONFIG_KEY, checkpoint_config, read_checkpoint
from ldm.utils.errors import ConfigError, missing_file
from ldm.utils.images import from_uint8, to_uint8
from ldm.utils.safe_config import safe_instantiate, stored_config

__all__ = ["FIRST_STAGE_CONFIG_KEY", "first_stage_hash", "load_first_stage", "load_first_stage_with_config", "round_trip"]

LOSS_ONLY = ("lpips", "discriminator")  # training-loss parts: not needed to encode or decode


def load_first_stage_with_config(ckpt_path: str | Path) -> tuple[AutoencoderModule, dict[str, Any]]:
    """The checkpoint's AutoencoderModule (frozen, eval mode) and the plain-dict config that rebuilds it; a latent
    diffusion checkpoint gives the first stage stored inside it (so an imported SD pipeline run caches its latents).

    The module is rebuilt from the stored config (allow-listed targets) without its LPIPS and discriminator
    (set to null in the returned config, also kept as `module.model_config` for diffusion checkpoints), so
    encoding and decoding need neither VGG weights nor their memory.
    """
    if not Path(ckpt_path).is_file():
        raise missing_file(str(ckpt_path), "model.first_stage.ckpt_path", "autoencoder checkpoint")
    ckpt = read_checkpoint(ckpt_path)
    if ckpt.get(FIRST_STAGE_CONFIG_KEY) is not None:  # a latent diffusion checkpoint carries its first stage
        inference_config = stored_config(ckpt[FIRST_STAGE_CONFIG_KEY], str(ckpt_path))
        state = {k.removeprefix("first_stage."): v for k, v in ckpt["state_dict"].items() if k.startswith("first_stage.")}
    else:
        model_config = checkpoint_config(ckpt, str(ckpt_path)).model
        inference_config = OmegaConf.merge(model_config, {part: None for part in LOSS_ONLY if part in model_config})
        state = {k: v for k, v in ckpt["state_dict"].items() if k.split(".", 1)[0] not in LOSS_ONLY}
    module = safe_instantiate(inference_config, where="model", source=str(ckpt_path))
    if not isinstance(module, AutoencoderModule):
        raise ConfigError(f"{ckpt_path} holds a {type(module).__name__}, not an AutoencoderModule (config key `first_stage_name`)")
    module.load_state_dict(state)
    module.requires_grad_(False).eval()
    module.model_config = OmegaConf.to_container(inference_config, resolve=True)
    return module, module.model_config


def load_first_stage(ckpt_path: str | Path) -> AutoencoderModule:
    """The frozen, eval-mode first stage stored in an autoencoder checkpoint (EMA weights kept inside)."""
    return load_first_stage_with_config(ckpt_path)[0]


def round_trip(first_stage: AutoencoderModule, batch_size: int = 64) -> Callable[[torch.Tensor], torch.Tensor]:
    """images [N, 3, H, W] in [-1, 1] (CPU) -> encoded to the posterior mean, decoded and rounded to 8 bits as samples
    are stored: what the first stage keeps of an image, so a suite scoring it gives a latent model's ceiling."""
    device = next(first_stage.parameters()).device

    @torch.no_grad()
    def transform(images: torch.Tensor) -> torch.Tensor:
        parts = [first_stage.decode(first_stage.encode(x.to(device)).mean).cpu() for x in images.split(batch_size)]
        return from_uint8(to_uint8(torch.cat(parts)))

    return transform


def first_stage_hash(net: torch.nn.Module) -> str:
    """sha256 over the net's state_dict (names, dtypes, shapes, bytes): equal weights give equal hashes.

    An AutoencoderModule is hashed by its inference net (EMA weights when present): the weights that encode.
    """
    if isinstance(net, AutoencoderModule):
        net = net.inference_net()
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # a byte view hashes every dtype (bf16 has no numpy equivalent)
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
