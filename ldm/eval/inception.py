"""Inception-v3 features for FID/KID/IS/precision-recall, the network and preprocessing of torch-fidelity."""
import hashlib
import pickle
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torchmetrics.image.fid import NoTrainInceptionV3

from ldm.eval.clean_resize import clean_resize
from ldm.utils.errors import ConfigError, missing_file
from ldm.utils.images import to_uint8

WEIGHTS_KEY = "eval.inception.weights_path"
# How images reach 299 px (eval.inception.resize), recorded with every result and in the cached statistics' key:
#   tf1_bilinear  torch-fidelity's TF1-compatible bilinear: the original TF FID code, so published numbers
#   antialias     torchmetrics 1.9's default, antialiased bilinear
#   clean         clean-fid's PIL bicubic on the uint8 pixels, unquantised (ldm/eval/clean_resize.py)
RESIZE = {"tf1_bilinear": "tf1-bilinear-299", "antialias": "antialias-bilinear-299",
          "clean": "clean-pil-bicubic-299"}
INPUT_SIZE = 299
# torch-fidelity's Inception-v3 up to pool3, in forward order (for images already at 299 px)
TRUNK = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_2",
         "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a",
         "Mixed_7b", "Mixed_7c", "AvgPool")


def inception_weights(weights_path: str | None) -> str:
    """A local file of torch-fidelity's Inception-v3 weights; with None, the torch hub cache, downloading once."""
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise missing_file(weights_path, WEIGHTS_KEY, "Inception-v3 FID weights")
        return str(weights_path)
    # Same place torch.hub.load_state_dict_from_url (torch-fidelity's own loader) caches it.
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), progress=False)
        except OSError as e:
            raise ConfigError(
                f"cannot download the Inception-v3 FID weights ({e}). Offline, fetch {URL_INCEPTION_V3} "
                f"elsewhere and set the config key `{WEIGHTS_KEY}` to the local file."
            ) from e
    return str(cached)


def weights_hash(module: nn.Module) -> str:
    """Short hash of a module's parameters and buffers: part of a feature extractor's name, so that other weights
    never reuse reference statistics cached with these, and every result row says which weights scored it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


class InceptionFeatures(nn.Module):
    """Inception-v3 pool3 features [B, 2048] (Heusel et al. 2017) and unbiased logits [B, 1008] (Salimans et al.
    2016), the network and preprocessing of torch-fidelity.

    Resize to 299 px (RESIZE): "tf1_bilinear" is torch-fidelity's, which gives the published FID numbers.
    torchmetrics 1.9's FrechetInceptionDistance defaults to antialias=True ("antialias" here), which shifts FID.
    "clean" is clean-fid's PIL bicubic; the network after the resize is the same in all three.
    """

    def __init__(self, *, weights_path: str | None = None, resize: str = "tf1_bilinear"):
        super().__init__()
        if resize not in RESIZE:
            raise ConfigError(f"eval.inception.resize={resize!r}: expected one of {sorted(RESIZE)}")
        path = inception_weights(weights_path)
        try:  # the only read of the user's file: plain tensors, no code
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # foreign objects; a damaged file
            raise ConfigError(f"{path!r} is not an Inception-v3 state dict of plain tensors ({type(e).__name__}); "
                              f"check the config key `{WEIGHTS_KEY}`") from e
        # torch-fidelity unpickles any file it is given with full pickle: hand it one we wrote from those tensors
        with tempfile.TemporaryDirectory() as tmp:
            own = Path(tmp) / "inception.pth"
            torch.save(state, own)
            self.net = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=["2048", "logits_unbiased"],
                feature_extractor_weights_path=str(own),
                antialias=resize == "antialias",
            )
        self.resize_method, self.resize = resize, RESIZE[resize]
        self.name = f"inception-v3-2048-{weights_hash(self.net)}"  # the weights decide the features, not the path

    @torch.no_grad()
    def pool_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, H, W] in [-1, 1] -> pool3 features [B, 2048] and logits [B, 1008], float32 (quantised to
        uint8 first, like PNGs)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        pixels = to_uint8(images)
        if self.resize_method == "clean":
            return self._from_299(clean_resize(pixels, INPUT_SIZE).to(images.device))
        pool, logits = self.net._torch_fidelity_forward(pixels)  # its forward() returns only the first
        return pool.float(), logits.float()

    def _from_299(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float pixels [B, 3, 299, 299] in [0, 255] -> pool3 and unbiased logits: torch-fidelity's network after its
        resize, which only takes uint8 (and would round away what the clean resize keeps)."""
        x = (pixels - 128) / 128  # torch-fidelity's input scaling
        for name in TRUNK:
            x = getattr(self.net, name)(x)
        pool = x.flatten(1)
        return pool.float(), (pool @ self.net.fc.weight.T).float()  # logits without the bias, as torch-fidelity's

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> pool3 features [B, 2048] float32."""
        return self.pool_and_logits(images)[0]


@torch.no_grad()
def extract_features(
    extract: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Run a feature extractor over image batches [B, 3, H, W] in [-1, 1]; features [N, D] float32 on the CPU."""
    feats = [extract(images.to(device)).float().cpu() for images in batches]
    if not feats:
        raise ValueError("extract_features got no image batches")
    return torch.cat(feats)
