"""A small CNN classifier for the built-in datasets, whose activations are the feature space of their FID.

Like Inception's pool3 features for natural images, but trained in seconds on the dataset's own real images, so
the distance reflects what the dataset is about. Training is seeded and cached to a weights file: FIDs are
comparable when they are computed with the same file, as Inception FIDs are with the same Inception weights
(retraining on another machine can differ in the last bits, and so in the FID's).
"""
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.utils.atomic import atomic_torch_save

INPUT_SIZE = 32  # inputs are box-filtered down to 32 px, so one network serves 32 and 64 px datasets


class SmallCNN(nn.Module):
    """Stride-2 3x3 convolutions, a linear layer to `feature_dim`, a linear classifier; features for FID are the
    spatial means of every convolution's activations and the linear layer's, standardised by real-data statistics."""

    def __init__(self, *, num_outputs: int, widths: tuple[int, ...] = (16, 32, 64), feature_dim: int = 128):
        super().__init__()
        self.convs = nn.ModuleList()
        channels = 3
        for width in widths:
            self.convs.append(nn.Sequential(nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.SiLU()))
            channels = width
        side = INPUT_SIZE // 2 ** len(widths)
        # flatten, not average-pool: positions are part of what the classifier must tell apart
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(channels * side**2, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_outputs)
        num_features = sum(widths) + feature_dim
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_std", torch.ones(num_features))

    def _activations(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        side = images.shape[-1]
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != side or (side % INPUT_SIZE and INPUT_SIZE % side):
            raise ValueError(f"expected square images [B, 3, H, H], H a multiple or divisor of {INPUT_SIZE}: "
                             f"{tuple(images.shape)}")
        x = images.float()
        if side < INPUT_SIZE:  # e.g. 16 px test models: each pixel becomes a block, no new detail is invented
            x = F.interpolate(x, scale_factor=INPUT_SIZE // side, mode="nearest")
        x = F.adaptive_avg_pool2d(x, INPUT_SIZE)
        pooled = []
        for conv in self.convs:
            x = conv(x)
            pooled.append(x.mean((2, 3)))
        return pooled, self.fc(x)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> standardised features [B, sum(widths) + feature_dim].

        The pooled convolution activations keep low-level statistics (sharpness, colour) in view, which the
        classifier's last layer learns to ignore; standardising puts every dimension on the scale of real data.
        """
        pooled, hidden = self._activations(images)
        return (torch.cat([*pooled, hidden], 1) - self.feature_mean) / self.feature_std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> logits [B, num_outputs]."""
        return self.head(self._activations(images)[1])


def train_small_cnn(
    net: SmallCNN,
    images: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> SmallCNN:
    """Adam with a cosine learning-rate decay on random minibatches drawn by a seeded generator; then records the
    feature statistics of `images` for standardisation. Returns net in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    net.train()
    for _ in range(steps):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        loss = loss_fn(net(images[index]), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval().requires_grad_(False)
    with torch.no_grad():  # feature statistics of the real training images, for standardised features
        net.feature_mean.zero_()
        net.feature_std.fill_(1)
        feats = torch.cat([net.features(batch) for batch in images.split(512)])
        net.feature_mean.copy_(feats.mean(0))
        net.feature_std.copy_(feats.std(0).clamp(min=1e-6))
    return net


def load_or_train(
    weights_path: str | Path, build: Callable[[], SmallCNN], train: Callable[[SmallCNN], SmallCNN]
) -> SmallCNN:
    """The network with weights from weights_path; if the file is missing, train it once and write it there."""
    path = Path(weights_path)
    if path.is_file():
        net = build()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval().requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # initialisation seeded here, the caller's RNG untouched
        torch.manual_seed(0)
        net = train(build())
    atomic_torch_save(net.state_dict(), path)
    return net
