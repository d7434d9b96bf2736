"""CLIP score (Hessel et al. 2021) of images against their captions, with an open_clip model."""
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ldm.utils.errors import ConfigError, missing_file

PRETRAINED_KEY = "eval.clip.pretrained"


def load_open_clip(model_name: str, pretrained: str | None, image_size: int | None = None) -> nn.Module:
    """An open_clip model: `pretrained` is a local weights file, an open_clip tag (downloaded from the hub, e.g.
    'openai'), or None for random weights (tests only: the scores then mean nothing). 'hf-hub:org/repo' model
    names download their weights from the hub as well."""
    if not model_name.startswith("hf-hub:") and model_name not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip model {model_name!r} (eval.clip.model_name); see open_clip.list_models()")
    from_hub = model_name.startswith("hf-hub:") or pretrained in open_clip.list_pretrained_tags_by_model(model_name)
    if not from_hub and pretrained is not None and not Path(pretrained).is_file():
        raise missing_file(pretrained, PRETRAINED_KEY, f"CLIP weights (neither a file nor a {model_name} tag)")
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, force_image_size=image_size)
    except (OSError, RuntimeError) as e:  # open_clip reports a failed hub download as a RuntimeError
        if not from_hub:
            raise
        raise ConfigError(
            f"cannot fetch open_clip weights {model_name} / {pretrained} ({e}). Offline, download them elsewhere "
            f"and set the config key `{PRETRAINED_KEY}` to the local file."
        ) from e
    return model.eval().requires_grad_(False)


class CLIPScore(nn.Module):
    """CLIP score: 100 * max(cos(E_image, E_text), 0) per image-caption pair (Hessel et al. 2021, eq. 1 with w=100,
    the scale torchmetrics reports)."""

    def __init__(
        self, *, model_name: str = "ViT-B-32", pretrained: str | None = "openai", image_size: int | None = None
    ):
        super().__init__()
        self.model = load_open_clip(model_name, pretrained, image_size)
        self.name = f"{model_name}/{Path(pretrained).name if pretrained and Path(pretrained).is_file() else pretrained}"
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg["size"]
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images [B, 3, H, W] -> the model's input: bicubic (antialiased) resize, CLIP normalisation."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        x = F.interpolate((images.float() + 1) / 2, size=self.image_size, mode="bicubic", antialias=True).clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Per-pair CLIP scores [B] in [0, 100]."""
        if len(captions) != len(images):
            raise ValueError(f"need one caption per image, got {len(captions)} captions for {len(images)} images")
        image_emb = F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)
        text_emb = F.normalize(self.model.encode_text(self.tokenizer(captions).to(images.device)).float(), dim=-1)
        return 100 * (image_emb * text_emb).sum(-1).clamp(min=0)
