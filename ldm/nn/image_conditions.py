"""Image-shaped conditions joined to the latent by concatenation (LDM, Rombach et al. 2022, Sec. 3.3, 4.3-4.5).

Each task's condition maps a batch to `concat` [B, channels, h, w] at the latent size and defines its null (the
condition "nothing given", for guidance): inpainting (masked-image latent + mask), super-resolution (the
low-resolution image), layout-to-image (an embedded semantic map). ConcatConditioner joins one of them with a
text or class conditioner (hybrid conditioning) under the Conditioner interface.
"""
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.nn.conditioners import Cond, Conditioner, Unconditional


def _batch_tensor(batch: dict, key: str, ndim: int, task: str) -> Tensor:
    value = batch.get(key)
    if not isinstance(value, Tensor) or value.ndim != ndim:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{task} conditioning needs batch[{key!r}] as a {ndim}-d tensor, got {got} (the data's "
                         f"`inputs` make it: ldm/data/condition_inputs.py)")
    return value


def resize_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, C, H, W] -> [B, C, *size]: area averages when shrinking (a mask becomes its coverage), else bicubic."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = x.shape[-2] >= size[0] and x.shape[-1] >= size[1]
    if shrink:
        return F.interpolate(x, size, mode="area")
    return F.interpolate(x, size, mode="bicubic", align_corners=False)


class ImageCondition(nn.Module):
    """One task's image-shaped condition: `encode(batch, size)`, `null(batch_size, size)` -> [B, channels, *size]."""

    channels: int

    def encode(self, batch: dict, size: tuple[int, int]) -> Tensor:
        raise NotImplementedError

    def null(self, batch_size: int, size: tuple[int, int]) -> Tensor:
        raise NotImplementedError

    def first_stage_images(self, batch: dict) -> dict[str, Tensor]:
        """Images [B, 3, H, W] the frozen first stage must encode first; each comes back as batch[name + '_latent']."""
        return {}


class LowResImage(ImageCondition):
    """Super-resolution (LDM Sec. 4.4): batch['lowres'] [B, 3, h', w'] in [-1, 1], resized to the latent size (none
    when the upscaling factor equals the first stage's, as with 4x on an f=4 autoencoder). Null: zeros (mid-grey)."""

    channels = 3

    def encode(self, batch: dict, size: tuple[int, int]) -> Tensor:
        return resize_to(_batch_tensor(batch, "lowres", 4, "super-resolution").float(), size)

    def null(self, batch_size: int, size: tuple[int, int]) -> Tensor:
        return torch.zeros(batch_size, self.channels, *size)


class MaskedImage(ImageCondition):
    """Inpainting (LDM Sec. 4.5; SD's inpainting UNet): the mask's coverage at the latent size, then the first-stage
    latent of the masked image (known pixels, 0 = grey in the hole): 1 + latent_channels channels, in the order of
    SD's 9-channel inpainting UNet (latent, mask, masked-image latent), so its imported weights read them right.
    batch['mask'] [B, 1, H, W] is 1 where pixels are to be filled. Null: nothing known (mask everywhere, zero latent)."""

    def __init__(self, latent_channels: int = 4):
        super().__init__()
        self.channels = latent_channels + 1

    @staticmethod
    def _mask(batch: dict) -> Tensor:
        return _batch_tensor(batch, "mask", 4, "inpainting").float()

    def first_stage_images(self, batch: dict) -> dict[str, Tensor]:
        if "image" not in batch:
            raise ValueError("inpainting conditioning encodes the masked image: train on images (data=shapes, "
                             "image_folder, webdataset), not on cached latents, whose masks could not change")
        image = _batch_tensor(batch, "image", 4, "inpainting")
        return {"masked_image": image * (1 - self._mask(batch))}

    def encode(self, batch: dict, size: tuple[int, int]) -> Tensor:
        latent = _batch_tensor(batch, "masked_image_latent", 4, "inpainting")
        if latent.shape[1] != self.channels - 1 or tuple(latent.shape[-2:]) != tuple(size):
            raise ValueError(f"masked image latent {tuple(latent.shape)} does not match latent_channels="
                             f"{self.channels - 1} and the latent size {tuple(size)}")
        return torch.cat([resize_to(self._mask(batch), size), latent.float()], dim=1)

    def null(self, batch_size: int, size: tuple[int, int]) -> Tensor:
        return torch.cat([torch.ones(batch_size, 1, *size), torch.zeros(batch_size, self.channels - 1, *size)], 1)


class SemanticMap(ImageCondition):
    """Layout-to-image (LDM Sec. 4.3, semantic synthesis): batch['layout'] LongTensor [B, H, W] of class ids, one-hot,
    through a small learned encoder strided down by `downsample_factor` (the first stage's f) -> [B, channels, h, w].
    Null: the map of no class (an all-zero one-hot) through the same encoder."""

    def __init__(self, num_classes: int, channels: int = 8, hidden: int = 32, downsample_factor: int = 4):
        super().__init__()
        steps = int(math.log2(downsample_factor))
        if num_classes < 2 or 2**steps != downsample_factor:
            raise ValueError(f"need num_classes >= 2 and a power-of-two downsample_factor, got {num_classes=}, "
                             f"{downsample_factor=}")
        self.num_classes, self.channels, self.downsample_factor = num_classes, channels, downsample_factor
        layers: list[nn.Module] = [nn.Conv2d(num_classes, hidden, 3, padding=1), nn.SiLU()]
        for _ in range(steps):
            layers += [nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.SiLU()]
        self.encoder = nn.Sequential(*layers, nn.Conv2d(hidden, channels, 3, padding=1))

    def _embed(self, one_hot: Tensor, size: tuple[int, int]) -> Tensor:
        out = self.encoder(one_hot)
        if tuple(out.shape[-2:]) != tuple(size):
            raise ValueError(f"a {tuple(one_hot.shape[-2:])} map downsampled {self.downsample_factor}x gives "
                             f"{tuple(out.shape[-2:])}, not the latent size {tuple(size)}: set downsample_factor to "
                             "the first stage's")
        return out

    def encode(self, batch: dict, size: tuple[int, int]) -> Tensor:
        layout = _batch_tensor(batch, "layout", 3, "layout-to-image").long()
        if layout.numel() and (layout.min() < 0 or layout.max() >= self.num_classes):
            raise ValueError(f"batch['layout'] class ids must lie in [0, {self.num_classes}), got "
                             f"[{layout.min().item()}, {layout.max().item()}]")
        layout = layout.to(self.encoder[0].weight.device)
        one_hot = F.one_hot(layout, self.num_classes).permute(0, 3, 1, 2)  # [B, H, W] -> [B, K, H, W]
        return self._embed(one_hot.float(), size)

    def null(self, batch_size: int, size: tuple[int, int]) -> Tensor:
        side = [s * self.downsample_factor for s in size]
        zeros = torch.zeros(1, self.num_classes, *side, device=self.encoder[0].weight.device)
        return self._embed(zeros, size).expand(batch_size, -1, -1, -1)  # one row, encoded once


class ConcatConditioner(Conditioner):
    """Concatenation conditioning (LDM Sec. 3.3): `concat` [B, C, h, w] from an image condition, beside an inner
    conditioner's context / y (text or class: hybrid conditioning; none by default).

    Classifier-free guidance: the unconditional branch (`null_like`, used by training dropout and at sampling) is the
    inner conditioner's null with the image condition kept (keep_image=True: inpainting and super-resolution, whose
    output must agree with the given pixels; guidance then acts on the text alone) or replaced by its null
    (keep_image=False: the image condition is dropped with the text and guidance strengthens it too).
    """

    def __init__(self, image: ImageCondition, latent_size: int | Sequence[int], inner: Conditioner | None = None,
                 keep_image: bool = True):
        super().__init__()
        self.image, self.inner, self.keep_image = image, inner or Unconditional(), keep_image
        self.latent_size = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)
        self.context_dim, self.y_dim = self.inner.context_dim, self.inner.y_dim
        self.concat_channels = image.channels
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # follows .to(device): where nulls go

    @property
    def dims(self) -> dict[str, int | None]:
        return {**super().dims, "concat_channels": self.concat_channels}

    def first_stage_images(self, batch: dict) -> dict[str, Tensor]:
        return self.image.first_stage_images(batch)

    def encode(self, batch: dict) -> Cond:
        concat = self.image.encode(batch, self.latent_size).to(self._anchor.device)
        return {**self.inner.encode(batch), "concat": concat}

    def null(self, batch_size: int) -> Cond:
        concat = self.image.null(batch_size, self.latent_size)
        return {**self.inner.null(batch_size), "concat": concat.to(self._anchor.device)}

    def null_like(self, cond: Cond, batch_size: int) -> Cond:
        if not self.keep_image:
            return self.null(batch_size)
        return {**self.inner.null(batch_size), "concat": cond["concat"]}
