"""What the encode loop reads: dataset items checked one by one (a bad one is a counted skip, or with the
dataset's on_corrupt="raise" an error in the main process), batched shard after shard as claims allow."""
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from ldm.data.latent_cache.format import ShardPlan
from ldm.data.skips import is_skipped
from ldm.utils.errors import CorruptDataError


def check_image(image: Any, shape: tuple[int, ...] | None) -> str | None:
    """Why `image` cannot be encoded (None if it can): a finite float [3,H,W] tensor in [-1, 1] of the cache's shape."""
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        return "bad image: not a float tensor"
    if image.ndim != 3 or image.shape[0] != 3 or (shape is not None and tuple(image.shape) != tuple(shape)):
        return f"bad image: shape {tuple(image.shape)}, expected {tuple(shape) if shape else '[3, H, W]'}"
    if not torch.isfinite(image).all():
        return "bad image: non-finite values"
    if image.min() < -1.001 or image.max() > 1.001:
        return "bad image: values outside [-1, 1]"
    return None


def _metadata(item: dict) -> dict:
    """The sample's json member: source key, caption, label and attribute lists."""
    meta = {"key": str(item.get("key", "")), "caption": str(item.get("caption", "")), "label": int(item.get("label", -1))}
    if "attrs" in item:
        meta["attrs"] = {name: torch.as_tensor(value).tolist() for name, value in item["attrs"].items()}
    return meta


class CheckedItems(Dataset):
    """Wraps a dataset so that a raising, skipped or malformed item becomes a counted skip instead of a crash.

    A CorruptDataError (a dataset told to raise) travels as `fatal` to the main process, which raises it there:
    raised in a DataLoader worker it would arrive wrapped in the worker's traceback.
    """

    def __init__(self, dataset: Dataset, image_shape: tuple[int, ...] | None):
        self.dataset, self.image_shape = dataset, image_shape

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            item = self.dataset[index]
        except CorruptDataError as err:
            return {"index": index, "fatal": str(err)}
        except Exception as err:  # a corrupt input must cost one sample, not the run
            return {"index": index, "skip": f"error: {type(err).__name__}", "key": None, "message": str(err)[:500]}
        if is_skipped(item):  # the dataset skipped it itself (e.g. an unreadable image file)
            return {"index": index, "skip": item["skip"], "key": item["key"], "message": item["message"]}
        reason = check_image(item.get("image"), self.image_shape) if isinstance(item, dict) else "bad item: not a dict"
        if reason is None:
            return {"index": index, "image": item["image"], "meta": _metadata(item)}
        key = str(item.get("key")) if isinstance(item, dict) else None
        return {"index": index, "skip": reason, "key": key, "message": reason}


def collate_checked(items: list[dict]) -> dict:
    """Stack the good images of a batch; keep the skipped items' indices and reasons, and any fatal error."""
    good = [item for item in items if "image" in item]
    return {
        "indices": [item["index"] for item in good],
        "images": torch.stack([item["image"] for item in good]) if good else None,
        "meta": [item["meta"] for item in good],
        "skipped": [item for item in items if "skip" in item],
        "fatal": [item["fatal"] for item in items if "fatal" in item],
    }


def probe_image_shape(dataset: Dataset, max_tries: int = 100) -> tuple[int, ...]:
    """The image shape of the first readable item (every cached image must share it)."""
    for index in range(min(len(dataset), max_tries)):
        item = CheckedItems(dataset, None)[index]
        if "fatal" in item:
            raise CorruptDataError(item["fatal"])
        if "image" in item:
            return tuple(item["image"].shape)
    raise ValueError(f"none of the first {max_tries} items of {type(dataset).__name__} is a valid image")


class ClaimedShardBatches(Sampler[list[int]]):
    """Batches of dataset indices, shard after shard; `claim(shard)` runs just before a shard's first batch."""

    def __init__(self, plan: ShardPlan, shards: range, batch_size: int, claim: Callable[[int], bool]):
        self.plan, self.shards, self.batch_size, self.claim = plan, shards, batch_size, claim

    def __iter__(self) -> Iterator[list[int]]:
        for shard in self.shards:
            if not self.claim(shard):
                continue
            indices = self.plan.indices(shard)
            for start in range(indices.start, indices.stop, self.batch_size):
                yield list(range(start, min(start + self.batch_size, indices.stop)))
