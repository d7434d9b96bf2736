"""Aspect-ratio buckets: a list of [height, width] pixel sizes; each image goes to the bucket nearest its aspect ratio
and is cropped to that bucket's shape, so wide and tall images keep most of their content instead of a centre square.

Pure functions of sizes (the random crop draws from torch's RNG, like square_crop_box): the cache
(ldm/data/preprocess.py) assigns and crops, the cache reader groups batches by bucket (ldm/data/latents.py).
"""
import math
from collections.abc import Sequence

import torch

from ldm.data.transforms import CROPS
from ldm.utils.errors import ConfigError

Bucket = tuple[int, int]  # (height, width) in pixels


def check_buckets(buckets: Sequence[Sequence[int]]) -> tuple[Bucket, ...]:
    """The buckets as (height, width) tuples; a clear error for an empty list, a bad size or a repeated bucket."""
    checked = tuple(tuple(int(side) for side in bucket) for bucket in buckets)
    if not checked:
        raise ConfigError("data.buckets must list at least one [height, width] (or be null for square crops)")
    for bucket in checked:
        if len(bucket) != 2 or min(bucket) <= 0:
            raise ConfigError(f"each bucket is [height, width] in pixels, both > 0; got {list(bucket)}")
    if len(set(checked)) != len(checked):
        raise ConfigError(f"data.buckets lists a bucket twice: {[list(b) for b in checked]}")
    return checked


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> int:
    """Index of the bucket whose aspect ratio h/w is nearest the image's, compared in log space (so 2:1 and 1:2 are
    equally far from 1:1); the first listed wins a tie."""
    log_aspect = math.log(height / width)
    return min(range(len(buckets)), key=lambda b: abs(math.log(buckets[b][0] / buckets[b][1]) - log_aspect))


def bucket_crop_box(width: int, height: int, bucket: Bucket, crop: str) -> tuple[int, int, int, int]:
    """The largest box of the bucket's aspect ratio inside a width x height image, centred or at a random offset:
    resizing it to the bucket is resizing the image to cover the bucket, then cropping the bucket's size.

    A square bucket gives square_crop_box's box exactly; the rounded side is at most half a pixel off the bucket's
    ratio.
    """
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    bucket_h, bucket_w = bucket
    if width * bucket_h >= height * bucket_w:  # wider than the bucket: full height, trim the sides
        box_w, box_h = max(1, min(width, round(height * bucket_w / bucket_h))), height
    else:  # taller: full width, trim top and bottom
        box_w, box_h = width, max(1, min(height, round(width * bucket_h / bucket_w)))
    if crop == "center":
        left, top = (width - box_w) // 2, (height - box_h) // 2
    else:  # torch's RNG is seeded per DataLoader worker, so this is reproducible under a seeded loader
        left, top = int(torch.randint(width - box_w + 1, ())), int(torch.randint(height - box_h + 1, ()))
    return left, top, left + box_w, top + box_h


def check_divisible(buckets: Sequence[Bucket], factor: int, what: str) -> None:
    """Raise ConfigError unless every bucket's height and width are multiples of `factor` (`what` names it)."""
    bad = [list(b) for b in buckets if b[0] % factor or b[1] % factor]
    if bad:
        raise ConfigError(f"data.buckets {bad}: height and width must be multiples of {what} ({factor})")
