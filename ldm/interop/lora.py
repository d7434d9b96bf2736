"""Our UNet's LoRA adapters -> the LoRA file diffusers loads (`StableDiffusionPipeline.load_lora_weights`).

diffusers' peft-style names are "unet.<its module>.lora_A.weight" / "lora_B.weight"; the module names come from the
UNet key map. Without stored alphas diffusers scales B A by 1 (alpha = rank), so our alpha / rank is folded into
B: W + B' A with B' = (alpha / rank) B is the same update, and the file needs no metadata.
"""
import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ldm.interop.unet import unet_keymap
from ldm.utils.errors import ConfigError

_ADAPTER = re.compile(r"net\.(.+)\.lora_([AB])\.default\.weight")  # lora_state_dict(LoRA wrapper) names


def lora_to_diffusers(adapter_state: Mapping[str, Tensor], net_cfg: Mapping[str, Any],
                      scale: float) -> dict[str, Tensor]:
    """Adapter tensors of a LoRA-wrapped UNet (`lora_state_dict(wrapper)`, scale = alpha / rank) -> diffusers' LoRA
    state dict for the UNet2DConditionModel of `net_cfg`. Raises one ConfigError listing adapters it cannot name."""
    keymap = unet_keymap(net_cfg, "diffusers")
    out, unnamed = {}, []
    for name, t in adapter_state.items():
        m = _ADAPTER.fullmatch(name)
        k = keymap.get(f"{m.group(1)}.weight") if m else None
        if k is None or len(k.theirs) != 1 or k.their_form == "conv1x1":  # a 1x1 conv of theirs takes no linear LoRA
            unnamed.append(name)
            continue
        layer, part = k.theirs[0].removesuffix(".weight"), m.group(2)
        out[f"unet.{layer}.lora_{part}.weight"] = (t * scale if part == "B" else t).contiguous()
    if unnamed:
        raise ConfigError(f"LoRA export to diffusers: no diffusers linear layer for {len(unnamed)} adapter tensor(s): "
                          f"{', '.join(sorted(unnamed)[:10])}")
    return out
