"""Metric suites: what to sample for a dataset, how to score the samples, and the real-vs-real floor.

A suite is configured per experiment (`eval:`) and used by task=evaluate and the eval-during-training callback.
"""
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ldm.data.digits import DigitsDataset
from ldm.data.shapes import ShapesDataset
from ldm.eval.digits_classifier import class_accuracy, digits_classifier
from ldm.eval.frechet import feature_stats, frechet_distance
from ldm.eval.inception import weights_hash
from ldm.eval.shapes_attributes import attribute_accuracy
from ldm.eval.shapes_features import shapes_feature_net


def _stack(dataset) -> dict:
    items = [dataset[i] for i in range(len(dataset))]
    return {
        "image": torch.stack([it["image"] for it in items]),
        "caption": [it["caption"] for it in items],
        "label": torch.tensor([it["label"] for it in items]),
        "attrs": {k: torch.stack([it["attrs"][k] for it in items]) for k in items[0].get("attrs", {})},
        "held_out": torch.tensor([it.get("held_out", False) for it in items]),
    }


Transform = Callable[[torch.Tensor], torch.Tensor]  # images [N, 3, H, W] in [-1, 1] -> the same


def _apply(transform: Transform | None, images: torch.Tensor) -> torch.Tensor:
    return images if transform is None else transform(images)


class Interleaved(Dataset):
    """`seen` and `held_out` scenes spread evenly through one prompt list (items flagged `held_out`), so the first
    prompts that periodic_eval samples hold both kinds in proportion."""

    def __init__(self, seen: Dataset, held_out: Dataset):
        n, k = len(seen) + len(held_out), len(held_out)
        self.order = []  # (held out?, index in its set) per position
        for i in range(n):
            before = i * k // n  # held-out prompts placed before position i
            self.order.append((True, before) if (i + 1) * k // n > before else (False, i - before))
        self.seen, self.held_out = seen, held_out

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> dict:
        held, i = self.order[index]
        return {**(self.held_out if held else self.seen)[i], "held_out": held}


@torch.no_grad()
def _fid(net, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Frechet distance between two image sets in a small network's feature space."""
    fa = torch.cat([net.features(b) for b in images_a.split(256)])
    fb = torch.cat([net.features(b) for b in images_b.split(256)])
    return frechet_distance(*feature_stats(fa), *feature_stats(fb))


class ShapesSuite:
    """Attribute accuracy (direct measurement) against the prompts, plus FID in the shapes feature net's space.

    With `held_out_samples`, that many prompts of HELD_OUT colour x shape x position triples (never trained on when
    the data draws combinations="seen") join the `num_samples` prompts of `combinations`; their accuracies are also
    reported apart as held_out_acc_* and the others as seen_acc_*: generalisation next to fit."""

    name = "shapes"
    fid_metric, alignment_metric = "fid_shapes", "acc_binding"  # the axes of task=evaluate's sweep plots

    def __init__(self, num_samples: int = 500, resolution: int = 32, num_objects: int = 1, seed: int = 7,
                 feature_weights: str = "data/eval/shapes_features.pt", combinations: str = "all",
                 held_out_samples: int = 0):
        self.prompts = ShapesDataset(size=num_samples, resolution=resolution, num_objects=num_objects, seed=seed,
                                     combinations=combinations)
        if held_out_samples:
            self.prompts = Interleaved(self.prompts, ShapesDataset(
                size=held_out_samples, resolution=resolution, num_objects=num_objects, seed=seed,
                combinations="held_out"))
        # a second, disjoint real set: FID reference for samples and for the real-vs-real floor
        self.reference = ShapesDataset(size=num_samples, resolution=resolution, num_objects=num_objects, seed=seed + 1)
        self.feature_weights = feature_weights
        self._real = self._ref = self._net = None

    def _load(self):
        if self._net is None:
            self._real, self._ref = _stack(self.prompts), _stack(self.reference)
            self._net = shapes_feature_net(Path(self.feature_weights))
        return self._real, self._ref, self._net

    def conditions(self) -> tuple[list[str] | None, list[int] | None]:
        return [self.prompts[i]["caption"] for i in range(len(self.prompts))], None

    def score(self, images: torch.Tensor) -> dict[str, float]:
        """Scores images generated for the first len(images) prompts (all of them for task=evaluate)."""
        real, ref, net = self._load()
        targets = {k: v[: len(images)] for k, v in real["attrs"].items()}
        held = real["held_out"][: len(images)]
        if not held.any():
            out = {f"acc_{k}": v for k, v in attribute_accuracy(images, targets).items()}
            return {**out, "fid_shapes": _fid(net, images, ref["image"])}
        out, total = {}, {}
        for split, rows in (("seen", ~held), ("held_out", held)):
            if rows.any():  # each image measured once; the totals are the splits' image-weighted means
                acc = attribute_accuracy(images[rows], {k: v[rows] for k, v in targets.items()})
                out.update({f"{split}_acc_{k}": v for k, v in acc.items()})
                for k, v in acc.items():
                    total[k] = total.get(k, 0.0) + v * int(rows.sum()) / len(images)
        return {**{f"acc_{k}": v for k, v in total.items()}, **out, "fid_shapes": _fid(net, images, ref["image"])}

    def floor(self, transform: Transform | None = None) -> dict[str, float]:
        """The same metrics for real images of the prompts: what a perfect model would score; with `transform` (e.g.
        a first stage's round trip), for those images transformed."""
        real, _, _ = self._load()
        return self.score(_apply(transform, real["image"]))

    def protocol(self) -> dict[str, str]:
        """What decides these numbers besides the samples: recorded with every result row."""
        return dict(feature_extractor=f"shapes-smallcnn-{weights_hash(self._load()[2])}", resize="box-32")


class DigitsSuite:
    """Class accuracy of class-conditional samples by a classifier trained on real digits, and FID in its features."""

    name = "digits"
    fid_metric, alignment_metric = "fid_digits", "acc_class"  # the axes of task=evaluate's sweep plots

    def __init__(self, num_samples: int = 500, resolution: int = 32, seed: int = 7,
                 classifier_weights: str = "data/eval/digits_classifier.pt", val_fraction: float = 0.1,
                 split_seed: int = 0):
        self.labels = torch.arange(num_samples) % 10
        self.real = DigitsDataset(split="val", resolution=resolution, val_fraction=val_fraction, split_seed=split_seed)
        self.reference = DigitsDataset(split="train", resolution=resolution, val_fraction=val_fraction,
                                       split_seed=split_seed)
        self.classifier_weights, self.val_fraction, self.split_seed = classifier_weights, val_fraction, split_seed
        self._net = self._reference_images = None

    def _classifier(self):
        if self._net is None:
            self._net = digits_classifier(self.classifier_weights, val_fraction=self.val_fraction,
                                          split_seed=self.split_seed)
        return self._net

    def conditions(self) -> tuple[list[str] | None, list[int] | None]:
        return None, self.labels.tolist()

    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """Scores images generated for the first len(images) labels, or for the `labels` given."""
        net = self._classifier()
        labels = self.labels[: len(images)] if labels is None else labels
        if self._reference_images is None:  # stacked once, reused for every checkpoint scored
            self._reference_images = _stack(self.reference)["image"]
        ref = self._reference_images
        return {"acc_class": class_accuracy(net, images, labels), "fid_digits": _fid(net, images, ref)}

    def protocol(self) -> dict[str, str]:
        """What decides these numbers besides the samples: recorded with every result row."""
        return dict(feature_extractor=f"digits-smallcnn-{weights_hash(self._classifier())}", resize="box-32")

    def floor(self, transform: Transform | None = None) -> dict[str, float]:
        """Held-out real digits (never seen by the classifier) scored like samples, after `transform` if given."""
        real = _stack(self.real)
        return self.score(_apply(transform, real["image"]), real["label"])
