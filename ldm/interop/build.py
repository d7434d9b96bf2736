"""Imported parts -> an ordinary ldm checkpoint dict (the one `task=fit` would write, at step 0), so sample,
evaluate, cache_latents, export and init_from read it like any other."""
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from ldm.interop.read_source import Imported
from ldm.models.autoencoder import AutoencoderModule
from ldm.models.first_stage import first_stage_hash
from ldm.models.latent_diffusion import LatentDiffusionModule
from ldm.utils.checkpoint import CONFIG_KEY, FIRST_STAGE_CONFIG_KEY
from ldm.utils.errors import ConfigError
from ldm.utils.safe_config import safe_instantiate

IMPORTED_KEY = "imported_from"  # provenance: source path, what was read, notes
IMPORTED_MARKER = "imported.json"  # in an import's run dir: fit refuses to resume it (no optimizer state)


def autoencoder_config(net: dict) -> dict:
    """An inference-only AutoencoderModule config (no LPIPS or discriminator: imports carry none)."""
    return {"_target_": "ldm.models.autoencoder.AutoencoderModule", "net": net, "lpips": None, "discriminator": None,
            "ema_decay": None}


def _autoencoder(imported: Imported, model: dict) -> tuple[AutoencoderModule, dict]:
    model = {**model, "net": imported.vae.config, "lpips": None, "discriminator": None}
    module = safe_instantiate(model, stored=False, where="model")
    module.net.load_state_dict(imported.vae.state)
    if module.ema is not None:
        module.ema.net.load_state_dict(imported.vae.state)
    return module, model


def _latent_diffusion(imported: Imported, model: dict) -> tuple[LatentDiffusionModule, dict, dict]:
    first_stage_cfg = autoencoder_config(imported.vae.config)
    first_stage = safe_instantiate(first_stage_cfg, stored=False, where="model.first_stage")
    first_stage.net.load_state_dict(imported.vae.state)
    channels = imported.vae.config.get("embed_dim", 4)
    size = imported.latent_size or model["latent_shape"][1]
    model = {**model, "backbone": imported.unet.config, "conditioner": imported.text.config,
             "formulation": imported.formulation, "latent_shape": [channels, size, size],
             "latent_scale": imported.vae.config["scaling_factor"]}
    module = safe_instantiate({**model, "first_stage": None}, stored=False, where="model")
    module.first_stage = first_stage.requires_grad_(False).eval()
    module.denoiser.net.load_state_dict(imported.unet.state)
    module.conditioner.load_state_dict(imported.text.state)
    if module.ema is not None:  # the imported weights are the ones to sample with: the EMA starts as them
        module.ema.net.load_state_dict(module.ema_target().state_dict())
    return module, model, first_stage_cfg


def resolved_parts(cfg: DictConfig) -> dict[str, Any]:
    """The config resolved group by group; a group with unset values (e.g. an image folder's data.root, which an
    import never reads) is stored as null, since stored configs hold no interpolations."""
    out = {}
    for key in cfg:
        try:
            out[key] = OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        except (MissingMandatoryValue, InterpolationResolutionError):
            out[key] = None
    return out


def import_checkpoint(imported: Imported, cfg: DictConfig, source: str) -> dict[str, Any]:
    """The checkpoint dict of a run made from `imported` under the experiment `cfg` (its model group decides what
    the run is: an autoencoder run takes a lone VAE, a latent diffusion run a whole pipeline)."""
    resolved = resolved_parts(cfg)
    target = resolved["model"]["_target_"]
    wanted = {"autoencoder": "ldm.models.autoencoder.AutoencoderModule",
              "latent_diffusion": "ldm.models.latent_diffusion.LatentDiffusionModule"}[imported.kind]
    if target != wanted:
        raise ConfigError(f"task.src holds a {imported.kind.replace('_', ' ')} model but the experiment's model is "
                          f"{target}: use an autoencoder experiment (e.g. +experiment=sd_vae) for a VAE and a latent "
                          f"diffusion one (e.g. +experiment=sd2_base) for a pipeline")
    ckpt: dict[str, Any] = {"global_step": 0, "epoch": 0,
                            IMPORTED_KEY: {"src": source, "kind": imported.kind, "notes": imported.notes,
                                           "sampling": imported.sampling}}
    if imported.kind == "autoencoder":
        module, model = _autoencoder(imported, resolved["model"])
    else:
        module, model, first_stage_cfg = _latent_diffusion(imported, resolved["model"])
        ckpt[FIRST_STAGE_CONFIG_KEY] = first_stage_cfg
        ckpt["first_stage_hash"] = first_stage_hash(module.first_stage)
    ckpt["state_dict"] = module.state_dict()
    ckpt[CONFIG_KEY] = {**resolved, "model": model}
    return ckpt
