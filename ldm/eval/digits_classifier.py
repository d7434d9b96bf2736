"""Digits classifier: class accuracy of class-conditional samples; its `features` are the space of digits-FID.

A SmallCNN trained for 200 steps on the 1,617 real digits of the train split: 98.3% accuracy on the 180 held-out
val digits, at 32 and 64 px (tests/test_eval_metrics.py asserts >= 95%).
"""
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.data.digits import DigitsDataset
from ldm.eval.small_cnn import SmallCNN, load_or_train, train_small_cnn

NUM_CLASSES = 10


def train_digits_classifier(net: SmallCNN, *, val_fraction: float, split_seed: int, steps: int = 200) -> SmallCNN:
    """Train on the train split of the real sklearn digits (32 px) with cross-entropy."""
    data = DigitsDataset(split="train", resolution=32, val_fraction=val_fraction, split_seed=split_seed)
    images = data.images.expand(-1, 3, -1, -1)  # [N, 3, 32, 32], grey in 3 channels as the dataset serves it
    return train_small_cnn(net, images, torch.tensor(data.labels), F.cross_entropy, steps=steps)


def digits_classifier(weights_path: str | Path, *, val_fraction: float = 0.1, split_seed: int = 0) -> SmallCNN:
    """The digits classifier from weights_path, trained on the digits train split (seconds on a CPU) if missing.

    val_fraction and split_seed must match the evaluated dataset's, so that its val split stays held out.
    """
    return load_or_train(
        weights_path,
        lambda: SmallCNN(num_outputs=NUM_CLASSES),
        lambda net: train_digits_classifier(net, val_fraction=val_fraction, split_seed=split_seed),
    )


@torch.no_grad()
def class_accuracy(classifier: SmallCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images [B, 3, H, W] in [-1, 1] that the classifier assigns to their label [B]."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images (> 0), got {len(labels)} labels for {len(images)} images")
    return (classifier(images).argmax(-1).cpu() == torch.as_tensor(labels).cpu()).float().mean().item()
