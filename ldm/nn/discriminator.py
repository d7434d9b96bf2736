"""PatchGAN discriminator (Isola et al. 2017, pix2pix), as used for the VQGAN/LDM first stage (Esser et al. 2021)."""

from typing import Literal

from torch import Tensor, nn

from ldm.nn.autoencoder import group_norm


class NLayerDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convs giving one real/fake logit per overlapping patch, [B, 1, h, w]."""

    def __init__(
        self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: Literal["batch", "group"] = "batch"
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
        make_norm = nn.BatchNorm2d if norm == "batch" else group_norm
        # First layer has no norm; width doubles per layer up to 8*ndf; the last two convs keep the resolution.
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            conv = nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False)  # the norm's shift is the bias
            layers += [conv, make_norm(out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: Tensor) -> Tensor:
        return self.main(images)


def _init_weights(module: nn.Module) -> None:
    # DCGAN initialisation (Radford et al. 2016): conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
