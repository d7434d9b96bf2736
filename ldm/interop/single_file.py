"""Original Stable Diffusion single-file checkpoints (CompVis / Stability layout): one state dict whose prefixes name
the parts. Splitting it accounts for every tensor: each belongs to a part, or to the training schedule, or is an
EMA copy; anything else is an error that lists it."""
from dataclasses import dataclass

import torch

from ldm.utils.errors import ConfigError

VAE, UNET = "first_stage_model.", "model.diffusion_model."
TEXT_OPEN_CLIP = "cond_stage_model.model."          # SD 2.x: OpenCLIP ViT-H/14 in open_clip's layout
TEXT_TRANSFORMERS = "cond_stage_model.transformer."  # SD 1.x: CLIP ViT-L/14 in transformers' layout
EMA = "model_ema."                                   # LitEma: the UNet's names without dots, plus decay/num_updates
SDXL_MARKERS = ("conditioner.embedders.", "model.diffusion_model.label_emb.0.")
# SD's x4 upscaler: its noise-level table (an integer label_emb) and its low-res noise schedule (low_scale_model)
UPSCALER_MARKERS = ("model.diffusion_model.label_emb.weight", "low_scale_model.")


def ema_name(unet_name: str) -> str:
    """LitEma's buffer name for a UNet parameter X.Y (model.diffusion_model.X.Y -> model_ema.diffusion_modelXY)."""
    return EMA + ("diffusion_model." + unet_name).replace(".", "")


@dataclass
class SingleFile:
    """The parts of a single file, prefixes stripped; `rest` is what no part claimed (the schedule buffers)."""

    vae: dict[str, torch.Tensor]
    unet: dict[str, torch.Tensor]
    text: dict[str, torch.Tensor]
    text_layout: str | None  # "open_clip" (SD 2.x) | "transformers" (SD 1.x) | None: no text encoder in the file
    rest: dict[str, torch.Tensor]
    unet_from_ema: bool


def split_single_file(state: dict[str, torch.Tensor], weights: str = "ema") -> SingleFile:
    """The file's parts. weights="ema" takes the UNet from model_ema.* when the file has it (what SD's own sampling
    scripts use), "raw" the trained weights; the other copy is accounted for, not kept."""
    if any(k.startswith(SDXL_MARKERS) for k in state):
        raise ConfigError("this single file is SDXL (conditioner.embedders.*, label_emb): not supported; import "
                          "Stable Diffusion 1.x or 2.x, or a diffusers folder of an SD 1.x/2.x pipeline")
    if any(k.startswith(UPSCALER_MARKERS) for k in state):
        raise ConfigError("this single file is SD's x4 upscaler (label_emb.weight, low_scale_model.*): task=import "
                          "reads text-to-image SD 1.x/2.x files; its UNet alone maps onto ours with "
                          "ldm.interop.unet (unet_from_single_file, unet_keymap(cfg, 'single_file'))")
    if weights not in ("ema", "raw"):
        raise ConfigError(f"task.weights={weights!r}: ema | raw")
    parts: dict[str, dict[str, torch.Tensor]] = {"vae": {}, "unet": {}, "text": {}, "rest": {}}
    layouts = set()
    for name, tensor in state.items():
        for part, prefix in (("vae", VAE), ("unet", UNET), ("text", TEXT_OPEN_CLIP), ("text", TEXT_TRANSFORMERS)):
            if name.startswith(prefix):
                parts[part][name[len(prefix):]] = tensor
                if part == "text":
                    layouts.add("open_clip" if prefix == TEXT_OPEN_CLIP else "transformers")
                break
        else:
            parts["rest"][name] = tensor
    if not parts["unet"] or not parts["vae"]:
        raise ConfigError(f"not a Stable Diffusion single file: no {UNET}* or {VAE}* tensors "
                          f"(found e.g. {', '.join(list(state)[:5])})")
    if len(layouts) > 1:
        raise ConfigError(f"both {TEXT_OPEN_CLIP}* and {TEXT_TRANSFORMERS}* tensors: ambiguous text encoder")
    ema = {n: ema_name(n) for n in parts["unet"]}
    has_ema = [n for n, e in ema.items() if e in parts["rest"]]
    if has_ema and len(has_ema) != len(parts["unet"]):
        missing = sorted(set(parts["unet"]) - set(has_ema))
        raise ConfigError(f"model_ema.* covers {len(has_ema)} of {len(parts['unet'])} UNet tensors (missing e.g. "
                          f"{', '.join(missing[:5])}): a damaged file?")
    for n in has_ema:
        averaged = parts["rest"].pop(ema[n])
        if weights == "ema":
            parts["unet"][n] = averaged
    for counter in (EMA + "decay", EMA + "num_updates"):
        parts["rest"].pop(counter, None)
    return SingleFile(parts["vae"], parts["unet"], parts["text"], layouts.pop() if layouts else None, parts["rest"],
                      bool(has_ema) and weights == "ema")
