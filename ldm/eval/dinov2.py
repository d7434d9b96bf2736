"""DINOv2 features for FD_DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics"): the
Frechet distance of ldm/eval/frechet.py on DINOv2 ViT CLS tokens instead of Inception pool3 features.

The network is timm's `vit_*_patch14_dinov2` built at 224 px, with weights from a local file: timm's state dict
(.pth, or its hub's model.safetensors), or the official facebookresearch/dinov2 one (`dinov2_vitl14_pretrain.pth`),
whose names map onto timm's.
Preprocessing is that of Stein et al.'s dgm-eval: uint8 pixels, PIL bicubic resize to 224 x 224, [0, 1], ImageNet
mean/std; the feature is the final-norm CLS token (DINOv2's `x_norm_clstoken`).
"""
import math
import pickle
import re
from pathlib import Path

import numpy as np
import safetensors.torch
import timm
import torch
from PIL import Image
from torch import nn

from ldm.eval.inception import weights_hash
from ldm.utils.errors import ConfigError, missing_file
from ldm.utils.images import to_uint8

WEIGHTS_KEY = "eval.dinov2.weights_path"
INPUT_SIZE, PATCH_SIZE = 224, 14
RESIZE = "pil-bicubic-224-imagenet-norm"  # recorded with every result and in the cached statistics' key
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
POS_EMBED_OFFSET = 0.1  # DINOv2 scales its position grid by (grid + 0.1) / trained grid (interpolate_pos_encoding)


def official_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """facebookresearch/dinov2 parameter names -> timm's: drop the masked-modelling token, rename ViT-g's SwiGLU
    layers (w12, w3 -> fc1, fc2); every other name is already timm's."""
    out = {}
    for name, tensor in state.items():
        if name == "mask_token":  # used only in training (iBOT masking)
            continue
        out[re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", name))] = tensor
    return out


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Position embeddings [1, 1 + M*M, D] trained on an M x M patch grid -> [1, 1 + grid*grid, D], as DINOv2 itself
    resamples them for a smaller input: bicubic with scale factor (grid + 0.1) / M, no antialiasing."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    trained = math.isqrt(patch_pos.shape[1])
    if trained == grid:
        return pos_embed
    # [1, M*M, D] -> [1, D, M, M]
    patch_pos = patch_pos.reshape(1, trained, trained, -1).permute(0, 3, 1, 2).float()
    scale = (grid + POS_EMBED_OFFSET) / trained
    patch_pos = nn.functional.interpolate(patch_pos, scale_factor=(scale, scale), mode="bicubic")
    # [1, D, grid, grid] -> [1, grid*grid, D]
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


def load_dinov2_state(path: str, net: nn.Module) -> dict[str, torch.Tensor]:
    """A timm or official DINOv2 state dict from a local file, renamed and resampled to fit `net`; a one-line error
    listing the mismatched names when it does not."""
    if not Path(path).is_file():
        raise missing_file(path, WEIGHTS_KEY, "DINOv2 weights")
    try:  # plain tensors only: a weights file holds no code
        if str(path).endswith(".safetensors"):  # timm's hub files (model.safetensors)
            state = safetensors.torch.load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, safetensors.SafetensorError) as e:
        raise ConfigError(f"{path!r} is not a DINOv2 state dict of plain tensors ({type(e).__name__}); check the "
                          f"config key `{WEIGHTS_KEY}`") from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"{path!r} is not a flat state dict of tensors; check the config key `{WEIGHTS_KEY}`")
    state = official_to_timm(state)
    if "pos_embed" in state:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], INPUT_SIZE // PATCH_SIZE)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                    if k in state and state[k].shape != v.shape)
    if missing or unexpected or shapes:
        def some(names: list[str]) -> str:
            return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "") or "none"

        raise ConfigError(f"{path!r} does not fit eval.dinov2.model_name: missing {some(missing)}; unexpected "
                          f"{some(unexpected)}; shapes {some(shapes)}. Check `{WEIGHTS_KEY}` and the model name")
    return state


class DINOv2Features(nn.Module):
    """DINOv2 CLS features [B, D] of images in [-1, 1], preprocessed as in Stein et al. 2023 (RESIZE)."""

    def __init__(self, *, weights_path: str, model_name: str = "vit_large_patch14_dinov2"):
        super().__init__()
        try:
            self.net = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=INPUT_SIZE)
        except RuntimeError as e:  # timm's "Unknown model"
            raise ConfigError(f"eval.dinov2.model_name={model_name!r}: {e}") from e
        self.net.load_state_dict(load_dinov2_state(weights_path, self.net))
        self.net.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.resize = RESIZE
        self.name = f"dinov2-{model_name}-{weights_hash(self.net)}"  # the weights decide the features, not the path

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images [B, 3, H, W] -> the network's input [B, 3, 224, 224]: quantised to uint8 (like PNGs), PIL
        bicubic (antialiased) resize to 224 x 224, scaled to [0, 1], ImageNet-normalised."""
        pixels = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]
        resized = np.stack([np.asarray(Image.fromarray(p).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC))
                            for p in pixels])
        x = torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.mean.device).float() / 255
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> CLS features [B, D] float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        return self.net(self.preprocess(images)).float()


def dinov2_features(*, weights_path: str | None, model_name: str = "vit_large_patch14_dinov2") -> DINOv2Features | None:
    """DINOv2Features from a local weights file, or None (FD_DINOv2 skipped) when eval.dinov2.weights_path is null."""
    return None if weights_path is None else DINOv2Features(weights_path=weights_path, model_name=model_name)
