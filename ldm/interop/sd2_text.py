"""SD 2.x's text tower in original single files: OpenCLIP ViT-H/14 in open_clip's layout with all 24 blocks, of which
SD reads the penultimate, plus the CLIP projection and logit scale; diffusers (and our sd2_clip config) keep the 23
blocks that make the context. Between the two, the unused tail is dropped on import and written as a no-op on export."""
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

BLOCK = "transformer.resblocks.{}."
TAIL_EXTRAS = ("text_projection", "logit_scale")


def writes_open_clip_layout(cond_cfg: Mapping[str, Any]) -> bool:
    """SD 2.x-shaped towers (OpenCLIP: gelu, width 1024, or a named open_clip model) go to single files in open_clip's
    layout, which is what diffusers expects once the UNet's 1024-wide context marks the file as SD 2.x; others
    (CLIP ViT-L/14, SD 1.x) in transformers' layout."""
    if cond_cfg.get("text_cfg") is None:
        return True
    return cond_cfg.get("activation") == "gelu" and cond_cfg["text_cfg"].get("width") == 1024


def _reads_last_of_short_tower(cond_cfg: Mapping[str, Any]) -> bool:
    return cond_cfg.get("text_cfg") is not None and cond_cfg.get("layer") == "last"


def unused_tail(cond_cfg: Mapping[str, Any], theirs: Mapping[str, Tensor]) -> tuple[str, ...]:
    """Names in an open_clip-layout text state that our short tower (read at its last block) has no place for: the
    block after it and the projection / logit scale. Empty unless the file has exactly that one extra block."""
    if not _reads_last_of_short_tower(cond_cfg):
        return ()
    n = cond_cfg["text_cfg"]["layers"]
    tail = tuple(k for k in theirs if k.startswith(BLOCK.format(n)) or k in TAIL_EXTRAS)
    if any(k.startswith(BLOCK.format(n + 1)) for k in theirs) or not any(k.startswith(BLOCK.format(n)) for k in theirs):
        return ()
    return tail


def with_noop_tail(theirs: dict[str, Tensor], cond_cfg: Mapping[str, Any]) -> dict[str, Tensor]:
    """Our short tower's open_clip-layout state plus what SD 2.x tools load but never use: a block N whose residual
    branches output zero (zero output projections), an identity text projection and CLIP's initial logit scale."""
    if not _reads_last_of_short_tower(cond_cfg):
        return theirs
    n, width = cond_cfg["text_cfg"]["layers"], cond_cfg["text_cfg"]["width"]
    hidden = int(width * cond_cfg["text_cfg"].get("mlp_ratio", 4.0))
    block = BLOCK.format(n)
    shapes = {"ln_1.weight": (width,), "ln_1.bias": (width,), "attn.in_proj_weight": (3 * width, width),
              "attn.in_proj_bias": (3 * width,), "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
              "ln_2.weight": (width,), "ln_2.bias": (width,), "mlp.c_fc.weight": (hidden, width),
              "mlp.c_fc.bias": (hidden,), "mlp.c_proj.weight": (width, hidden), "mlp.c_proj.bias": (width,)}
    out = dict(theirs)
    for name, shape in shapes.items():
        out[block + name] = torch.ones(shape) if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") \
            else torch.zeros(shape)
    out["text_projection"] = torch.eye(width)
    out["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return out
