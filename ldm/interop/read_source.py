"""What `task=import task.src=PATH` reads: a diffusers Stable Diffusion pipeline folder, a diffusers AutoencoderKL
folder, an original SD 1.x/2.x single file, or a standalone VAE file, as our configs and state dicts."""
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.interop.clip_text import (
    SD1_PAD_TOKEN_ID, SD1_TEXT_CONFIG, TRANSFORMERS_IGNORE, clip_text_keymap, open_clip_text_encoder,
    read_clip_tokenizer, text_encoder_from_transformers_config, transformers_text_names,
)
from ldm.interop.files import read_component, read_json, read_state_dict
from ldm.interop.keymap import to_ours
from ldm.interop.sd2_text import unused_tail
from ldm.interop.scheduler import check_single_file_schedule, formulation_from_scheduler, sampling_from_scheduler
from ldm.interop.single_file import split_single_file
from ldm.interop.unet import unet_from_diffusers_config, unet_from_single_file, unet_keymap
from ldm.interop.vae import vae_from_diffusers_config, vae_from_single_file, vae_keymap
from ldm.utils.errors import ConfigError, missing_file
from ldm.utils.safe_config import safe_instantiate

PIPELINES = ("StableDiffusionPipeline",)
SD_SCALING_FACTOR = 0.18215  # SD 1.x/2.x: the factor their UNets were trained with (single files do not store it)


@dataclass
class Part:
    """One network: our config (with `_target_`) and its state dict in our names."""

    config: dict
    state: dict[str, torch.Tensor]


@dataclass
class Imported:
    """The parts found at the source; a lone autoencoder has no unet/text/formulation."""

    vae: Part
    unet: Part | None = None
    text: Part | None = None
    formulation: dict | None = None
    latent_size: int | None = None  # the UNet's trained latent height/width (diffusers' unet sample_size)
    sampling: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what a user should know (e.g. EMA weights taken)

    @property
    def kind(self) -> str:
        return "autoencoder" if self.unet is None else "latent_diffusion"


def converted(config: dict, theirs: dict[str, torch.Tensor], keymap_of, layout: str, what: str,
              ignore: tuple[str, ...] = ()) -> Part:
    """Their tensors in our names, checked against the shapes of the network our config builds."""
    with torch.device("meta"):  # shapes only: no memory, no random init (an SD UNet is 3.5 GB in fp32)
        shapes = {k: v.shape for k, v in safe_instantiate(config, stored=False, where=what).state_dict().items()}
    state = to_ours(theirs, keymap_of(config, layout), shapes, what=what, ignore=ignore)
    return Part(config, {k: v.float() for k, v in state.items()})


def _vae_part(config: dict, state: dict, layout: str, scaling_factor: float) -> Part:
    return converted({**config, "scaling_factor": scaling_factor}, state, vae_keymap, layout, "the autoencoder")


def read_pipeline_folder(src: Path, variant: str | None) -> Imported:
    """A diffusers StableDiffusionPipeline folder: vae, unet, text_encoder, tokenizer, scheduler."""
    index = read_json(src / "model_index.json")
    if index.get("_class_name") not in PIPELINES:
        raise ConfigError(f"{src}: a {index.get('_class_name')} folder; task=import reads {' | '.join(PIPELINES)} "
                          f"(SD 1.x/2.x; SDXL and other pipelines are not supported)")
    vae_cfg, vae_state = read_component(src / "vae", variant=variant)
    vae_net, scaling_factor = vae_from_diffusers_config(vae_cfg)
    unet_cfg, unet_state = read_component(src / "unet", variant=variant)
    text_cfg, text_state = read_component(src / "text_encoder", variant=variant)
    tokenizer = read_clip_tokenizer(src / "tokenizer")
    scheduler = read_json(src / "scheduler" / "scheduler_config.json")
    text_net = text_encoder_from_transformers_config(text_cfg, pad_token_id=tokenizer["pad_token_id"],
                                                     model_max_length=tokenizer["model_max_length"])
    return Imported(
        vae=_vae_part(vae_net, vae_state, "diffusers", scaling_factor),
        unet=converted(unet_from_diffusers_config(unet_cfg), unet_state, unet_keymap, "diffusers", "the unet"),
        text=converted(text_net, transformers_text_names(text_state), clip_text_keymap, "transformers",
                       "the text encoder", ignore=TRANSFORMERS_IGNORE),
        formulation=formulation_from_scheduler(scheduler),
        latent_size=unet_cfg.get("sample_size"),
        sampling=sampling_from_scheduler(scheduler),
    )


def read_single_file(src: Path, *, weights: str, prediction: str, formulation: dict, text_encoder: dict | None
                     ) -> Imported:
    """An original SD 1.x/2.x checkpoint. It does not record its prediction type (SD 2.x 768-v models predict v):
    `prediction` says it; `formulation` is the experiment's, checked against the file's schedule buffers."""
    state = read_state_dict(src)
    if all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in state):
        vae = vae_from_single_file(state)  # a standalone VAE file (e.g. SD's fine-tuned vae-ft-mse)
        return Imported(vae=_vae_part(vae, state, "single_file", SD_SCALING_FACTOR),
                        notes=[f"scaling factor {SD_SCALING_FACTOR} (SD's; single files do not store it)"])
    parts = split_single_file(state, weights)
    if prediction not in ("eps", "v"):
        raise ConfigError(f"task.prediction={prediction!r}: eps | v (the single file does not say; SD 2.x 768-v "
                          f"checkpoints are v, SD 1.x and SD 2.x base eps)")
    formulation = {**formulation, "prediction": prediction}
    consumed = set(check_single_file_schedule(parts.rest, formulation))
    unknown = sorted(set(parts.rest) - consumed)
    if unknown:
        raise ConfigError(f"{src}: tensors that belong to no part ({len(unknown)}): {', '.join(unknown[:20])}")
    if parts.text_layout is None:
        raise ConfigError(f"{src}: no text encoder (cond_stage_model.*) in the file")
    text_layout = parts.text_layout  # SD 2.x: open_clip names; SD 1.x: transformers names (text_model.*)
    if text_encoder is None:
        raise ConfigError("importing a single file needs the experiment's text encoder config (model.conditioner)")
    unet = unet_from_single_file(parts.unet, **({"num_heads": None, "head_dim": 64} if text_layout == "open_clip"
                                                else {"num_heads": 8, "head_dim": None}))
    notes = [f"scaling factor {SD_SCALING_FACTOR} (SD's; single files do not store it)", f"prediction {prediction}"]
    tail = unused_tail(text_encoder, parts.text) if text_layout == "open_clip" else ()
    if tail:
        notes.append(f"text tower: {len(tail)} tensors SD 2.x never reads left out (its last block, the CLIP "
                     f"projection and logit scale; the context is the penultimate block's, as in diffusers)")
    if parts.unet_from_ema:
        notes.append("UNet from the file's EMA weights (model_ema.*; task.weights=raw for the trained ones)")
    return Imported(
        vae=_vae_part(vae_from_single_file(parts.vae), parts.vae, "single_file", SD_SCALING_FACTOR),
        unet=converted(unet, parts.unet, unet_keymap, "single_file", "the unet"),
        text=converted(text_encoder, parts.text, clip_text_keymap, text_layout, "the text encoder",
                       ignore=TRANSFORMERS_IGNORE + tail),
        formulation=formulation, notes=notes,
    )


def read_source(src: str | Path, *, variant: str | None = None, weights: str = "ema", prediction: str | None = None,
                formulation: dict | None = None, text_encoder: dict | None = None) -> Imported:
    """Whatever `task.src` names, by its layout."""
    src = Path(src).expanduser()
    if not src.exists():
        raise missing_file(str(src), "task.src", "weights to import")
    if src.is_dir() and (src / "model_index.json").is_file():
        return read_pipeline_folder(src, variant)
    if src.is_dir() and (src / "config.json").is_file():
        config, state = read_component(src, variant=variant)
        if config.get("_class_name") != "AutoencoderKL":
            raise ConfigError(f"{src}: a {config.get('_class_name')} folder; task=import reads an AutoencoderKL "
                              f"folder or a whole pipeline folder (with model_index.json)")
        net, scaling_factor = vae_from_diffusers_config(config)
        return Imported(vae=_vae_part(net, state, "diffusers", scaling_factor))
    if src.is_file() and src.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        return read_single_file(src, weights=weights, prediction=prediction, formulation=formulation or {},
                                text_encoder=text_encoder)
    raise ConfigError(f"task.src={str(src)!r}: expected a diffusers folder (model_index.json or config.json) or a "
                      f".safetensors/.ckpt single file")
