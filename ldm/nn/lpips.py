"""LPIPS perceptual distance (Zhang et al. 2018) on a frozen VGG16 trunk with the learned linear heads."""

import importlib.util
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from ldm.utils.errors import ConfigError, missing_file

# Indices of torchvision's vgg16().features that end each LPIPS stage: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_STAGE_ENDS = (4, 9, 16, 23, 30)
_STAGE_CHANNELS = (64, 128, 256, 512, 512)
VGG_KEY = "model.lpips.vgg_weights_path"
LIN_KEY = "model.lpips.lin_weights_path"


def packaged_lin_weights() -> Path | None:
    """The LPIPS-VGG linear heads shipped inside torchmetrics (same file as the `lpips` package), if installed."""
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "functional" / "image" / "lpips_models" / "vgg.pth"
    return path if path.is_file() else None


def _vgg16_features(vgg_weights_path: str | None) -> nn.Sequential:
    """VGG16 conv trunk up to relu5_3, from a local torchvision state_dict file or torchvision's hub download."""
    if vgg_weights_path is None:
        raise FileNotFoundError(
            f"LPIPS needs VGG16 weights: set the config key `{VGG_KEY}` to a torchvision vgg16 state_dict file "
            "(torch.save(torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict(), path)) "
            "or to 'torchvision' to download them through the torch hub cache"
        )
    if vgg_weights_path == "torchvision":
        # Real download path for machines with internet; torch hub caches the file under $TORCH_HOME.
        try:
            vgg = torchvision.models.vgg16(weights=torchvision.models.VGG16_Weights.IMAGENET1K_V1)
        except OSError as error:
            raise RuntimeError(
                f"`{VGG_KEY}`='torchvision' could not download the VGG16 weights; "
                "set it to a local torchvision vgg16 state_dict file"
            ) from error
        return vgg.features[: _STAGE_ENDS[-1]]
    path = Path(vgg_weights_path).expanduser()
    if not path.is_file():
        raise missing_file(str(path), VGG_KEY, "VGG16 weights for LPIPS")
    state = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):  # no memory for the unused 120M-parameter classifier; the file fills the trunk
        features = torchvision.models.vgg16(weights=None).features[: _STAGE_ENDS[-1]]
    prefix = "features."
    trunk = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    expected = set(features.state_dict())
    missing = expected - set(trunk)
    if missing:
        raise ConfigError(f"`{VGG_KEY}`: {path} is not a torchvision vgg16 state_dict (no features.{min(missing)})")
    features.load_state_dict({k: trunk[k] for k in expected}, assign=True)
    return features


def _linear_heads(lin_weights_path: str | None) -> nn.ModuleList:
    """The five 1x1 convs (no bias) weighting each stage's channels, loaded from an LPIPS v0.1 `vgg.pth`."""
    path = Path(lin_weights_path).expanduser() if lin_weights_path is not None else packaged_lin_weights()
    if path is None:
        raise FileNotFoundError(
            "LPIPS linear heads not found: install torchmetrics (it ships lpips_models/vgg.pth) "
            f"or set the config key `{LIN_KEY}` to the LPIPS v0.1 vgg.pth file"
        )
    if not path.is_file():
        raise missing_file(str(path), LIN_KEY, "LPIPS linear heads")
    state = torch.load(path, map_location="cpu", weights_only=True)
    heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _STAGE_CHANNELS)
    for i, head in enumerate(heads):
        # Keys are lin{i}.model.{j}.weight, j = 1 when the original net had a dropout in front.
        weights = [v for k, v in state.items() if k.startswith(f"lin{i}.") and k.endswith(".weight")]
        if len(weights) != 1 or weights[0].shape != head.weight.shape:
            raise ConfigError(f"`{LIN_KEY}`: {path} has no lin{i} weight of shape {tuple(head.weight.shape)}")
        head.weight.data.copy_(weights[0])
    return heads


class LPIPS(nn.Module):
    """LPIPS-VGG distance d(x, y) per sample [B] for images in [-1, 1]; frozen, gradients flow to the inputs."""

    def __init__(self, vgg_weights_path: str | None = None, lin_weights_path: str | None = None) -> None:
        super().__init__()
        features = _vgg16_features(vgg_weights_path)
        bounds = (0,) + _STAGE_ENDS
        self.stages = nn.ModuleList(features[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
        self.lins = _linear_heads(lin_weights_path)
        # LPIPS' input scaling from [-1, 1] to the ImageNet statistics VGG was trained on.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        """Always stays in eval mode: a fixed metric, never trained."""
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        # Zhang et al. 2018, eq. 1: sum_l mean_hw || w_l * (f_l(x) - f_l(y)) ||^2 on channel-normalised features.
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected two [B, 3, H, W] batches of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
        hx, hy = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        distance = x.new_zeros(x.shape[0])
        for stage, lin in zip(self.stages, self.lins):
            hx, hy = stage(hx), stage(hy)
            diff = (_unit_channels(hx) - _unit_channels(hy)).pow(2)
            distance = distance + lin(diff).mean(dim=(1, 2, 3))
        return distance


def _unit_channels(feats: Tensor, eps: float = 1e-8) -> Tensor:
    """Normalise each position's feature vector to unit length over channels."""
    # eps inside the root keeps the gradient finite where all of a position's (post-ReLU) features are zero.
    return feats * torch.rsqrt(feats.pow(2).sum(dim=1, keepdim=True) + eps)
