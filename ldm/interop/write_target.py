"""Our modules -> diffusers folders and original-layout single files (task=export task.format=diffusers|single_file).

Only what the formats can hold is exported: a KL autoencoder, and latent diffusion models with our SD-style UNet and
OpenCLIP-style text tower on the VP formulation; anything else is a ConfigError naming what does not fit."""
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.interop.clip_text import (
    clip_text_keymap, clip_token, text_encoder_to_transformers_config, transformers_text_state, write_clip_tokenizer,
)
from ldm.interop.files import write_component, write_folder_atomically
from ldm.interop.keymap import to_theirs
from ldm.interop.lora import lora_to_diffusers
from ldm.interop.latent_scale import SD_SCALING_FACTOR, export_scaling_factor, fold_latent_norm
from ldm.interop.scheduler import scheduler_to_diffusers, single_file_schedule
from ldm.interop.sd2_text import with_noop_tail, writes_open_clip_layout
from ldm.interop.single_file import TEXT_OPEN_CLIP, TEXT_TRANSFORMERS, UNET, VAE
from ldm.interop.unet import unet_keymap, unet_to_diffusers_config
from ldm.interop.vae import vae_keymap, vae_to_diffusers_config
from ldm.models.autoencoder import AutoencoderModule
from ldm.models.latent_diffusion import LatentDiffusionModule
from ldm.nn.autoencoder import AutoencoderKL
from ldm.nn.conditioners import OpenCLIPTextConditioner
from ldm.nn.lora import LoRA, lora_state_dict
from ldm.nn.unet import UNet
from ldm.utils.atomic import atomic_write_bytes, atomic_write_json
from ldm.utils.errors import ConfigError
from safetensors.torch import save as safetensors_bytes

DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers our test extra takes; newer versions read these files too


def _check_exportable(module: nn.Module) -> None:
    if isinstance(module, AutoencoderModule):
        return
    if not isinstance(module, LatentDiffusionModule):
        raise ConfigError(f"{type(module).__name__} has no Stable Diffusion / diffusers counterpart")
    net = module.denoiser.net
    parts = {"model.backbone": (net.net if isinstance(net, LoRA) else net, UNet),
             "model.conditioner": (module.conditioner, OpenCLIPTextConditioner)}
    for key, (part, cls) in parts.items():
        if not isinstance(part, cls):
            raise ConfigError(f"{key} is a {type(part).__name__}: Stable Diffusion formats hold a {cls.__name__} "
                              f"(export with task.format=ldm instead)")
    if module.first_stage is None or not isinstance(module.first_stage.net, AutoencoderKL):
        raise ConfigError("the model has no KL autoencoder first stage to export (model.first_stage)")
    if type(module.formulation).__name__ != "VPFormulation":
        raise ConfigError(f"model.formulation is {type(module.formulation).__name__}: SD schedulers are discrete VP "
                          f"(model/formulation=vp_eps|vp_v)")


def unet_part(module: LatentDiffusionModule, backbone_cfg: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The UNet's weights and config; a LoRA-wrapped UNet gives its merged weights (W + alpha/rank B A)."""
    if isinstance(module.denoiser.net, LoRA):
        return module.denoiser.net.merged_state_dict(), backbone_cfg["net"]
    return module.denoiser.net.state_dict(), backbone_cfg


def export_lora(module: nn.Module, config: dict[str, Any], first_stage_config: dict | None, out: str | Path) -> Path:
    """The adapters alone, in the LoRA file diffusers loads (`pipe.load_lora_weights(path)`) onto the base model."""
    net = getattr(getattr(module, "denoiser", None), "net", None)
    if not isinstance(net, LoRA):
        raise ConfigError("task.format=lora needs a LoRA run (model.backbone: ldm.nn.lora.LoRA, e.g. "
                          "model/backbone=lora_unet_sd)")
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} exists: exports never overwrite; pick another `task.out_dir` or move it away")
    tensors = lora_to_diffusers(lora_state_dict(net), config["model"]["backbone"]["net"], net.scale)
    atomic_write_bytes(out, safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                              metadata={"format": "pt"}))
    return out


def _vae_parts(module: nn.Module, vae_cfg: dict, scaling_factor: float | None) -> tuple[dict, float]:
    """The autoencoder's weights with our latent normalisation folded in, and the scaling factor to record."""
    if isinstance(module, AutoencoderModule):
        net = module.inference_net()
        factor = net.scaling_factor if net.scaling_factor is not None else 1.0
        return net.state_dict(), factor
    norm = module.latent_norm
    factor = scaling_factor if scaling_factor is not None else export_scaling_factor(norm.scale, norm.shift)
    return fold_latent_norm(module.first_stage.net.state_dict(), norm.scale, norm.shift, factor), factor


def export_diffusers(module: nn.Module, config: dict[str, Any], first_stage_config: dict | None, out: str | Path) -> Path:
    """A diffusers folder: AutoencoderKL alone for an autoencoder, a StableDiffusionPipeline folder otherwise
    (module holds the weights to export, EMA already folded in; config is the run's stored config)."""
    _check_exportable(module)
    if isinstance(module, AutoencoderModule):
        vae_cfg = config["model"]["net"]
        state, factor = _vae_parts(module, vae_cfg, None)

        def write_vae(folder: Path) -> None:
            write_component(folder, {**vae_to_diffusers_config(vae_cfg, factor), "_diffusers_version": DIFFUSERS_VERSION},
                            to_theirs(state, vae_keymap(vae_cfg, "diffusers"), what="the autoencoder"))
        return write_folder_atomically(out, write_vae)

    model = config["model"]
    vae_cfg, text_cfg = first_stage_config["net"], model["conditioner"]
    unet_state, unet_cfg = unet_part(module, model["backbone"])
    vae_state, factor = _vae_parts(module, vae_cfg, None)
    f = module.first_stage.net.downsample_factor
    size = module.latent_shape[1]
    text_config = text_encoder_to_transformers_config(text_cfg)
    text_state = transformers_text_state(module.conditioner.state_dict(), text_cfg)
    scheduler = scheduler_to_diffusers(model["formulation"], config.get("sampling") or {})

    def write_pipeline(folder: Path) -> None:
        version = {"_diffusers_version": DIFFUSERS_VERSION}
        write_component(folder / "vae", {**vae_to_diffusers_config(vae_cfg, factor, sample_size=size * f), **version},
                        to_theirs(vae_state, vae_keymap(vae_cfg, "diffusers"), what="the autoencoder"))
        write_component(folder / "unet", {**unet_to_diffusers_config(unet_cfg, sample_size=size), **version},
                        to_theirs(unet_state, unet_keymap(unet_cfg, "diffusers"), what="the unet"))
        write_component(folder / "text_encoder", text_config, text_state, weights_name="model")
        write_clip_tokenizer(folder / "tokenizer", pad_token=clip_token(text_cfg.get("pad_token_id", 0)))
        atomic_write_json(folder / "scheduler" / "scheduler_config.json", {**scheduler, **version})
        atomic_write_json(folder / "model_index.json", {
            "_class_name": "StableDiffusionPipeline", **version,
            "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", scheduler["_class_name"]],
            "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
        })
    return write_folder_atomically(out, write_pipeline)


def export_single_file(module: nn.Module, config: dict[str, Any], first_stage_config: dict | None, out: str | Path
                       ) -> Path:
    """One .safetensors in the original SD layout (what `StableDiffusionPipeline.from_single_file` and SD tools
    read). The autoencoder is folded to SD's scaling factor 0.18215, which those tools assume."""
    _check_exportable(module)
    if isinstance(module, AutoencoderModule):
        raise ConfigError("task.format=single_file holds a whole SD model; export an autoencoder with "
                          "task.format=diffusers")
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} exists: exports never overwrite; pick another `task.out` or move it away")
    model = config["model"]
    vae_cfg, text_cfg = first_stage_config["net"], model["conditioner"]
    unet_state, unet_cfg = unet_part(module, model["backbone"])
    vae_state, _ = _vae_parts(module, vae_cfg, SD_SCALING_FACTOR)
    if writes_open_clip_layout(text_cfg):  # SD 2.x: 24 open_clip blocks, the last a no-op if ours has 23
        text = with_noop_tail(to_theirs(module.conditioner.state_dict(), clip_text_keymap(text_cfg, "open_clip"),
                                        what="the text encoder"), text_cfg)
        text_prefix = TEXT_OPEN_CLIP
    else:  # SD 1.x: CLIP ViT-L/14 in transformers' names
        text, text_prefix = transformers_text_state(module.conditioner.state_dict(), text_cfg), TEXT_TRANSFORMERS
    tensors: dict[str, torch.Tensor] = {}
    for prefix, state in (
        (VAE, to_theirs(vae_state, vae_keymap(vae_cfg, "single_file"), what="the autoencoder")),
        (UNET, to_theirs(unet_state, unet_keymap(unet_cfg, "single_file"), what="the unet")),
        (text_prefix, text),
        ("", single_file_schedule(model["formulation"])),  # the buffers SD's own code carries (betas, alphas, ...)
    ):
        tensors |= {prefix + k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    atomic_write_bytes(out, safetensors_bytes(tensors, metadata={"format": "pt"}))
    return out
