"""The frozen first stage for latent caching and diffusion: rebuilt from an autoencoder checkpoint alone."""
import hashlib
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ldm.models.autoencoder import AutoencoderModule
from ldm.utils.checkpoint import load_module
from ldm.utils.errors import ConfigError, missing_file


def load_first_stage_with_config(ckpt_path: str | Path) -> tuple[AutoencoderModule, dict[str, Any]]:
    """The checkpoint's AutoencoderModule (frozen, eval mode) and its model config as a plain dict."""
    if not Path(ckpt_path).is_file():
        raise missing_file(str(ckpt_path), "ckpt", "autoencoder checkpoint")
    module, cfg, _ = load_module(ckpt_path)
    if not isinstance(module, AutoencoderModule):
        raise ConfigError(f"{ckpt_path} holds a {type(module).__name__}, not an AutoencoderModule (config key `ckpt`)")
    module.requires_grad_(False).eval()
    return module, OmegaConf.to_container(cfg.model, resolve=True)


def load_first_stage(ckpt_path: str | Path) -> AutoencoderModule:
    """The frozen, eval-mode first stage stored in an autoencoder checkpoint (EMA weights kept inside)."""
    return load_first_stage_with_config(ckpt_path)[0]


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
