"""Preprocessing of streamed image-text samples, defined once for the latent cache and recorded in its plan:
filters (caption, shorter side, aspect ratio), then the largest centred square, resized to the resolution; or with
`buckets`, the largest centred box of the nearest bucket's aspect ratio, resized to that bucket (ldm/data/buckets.py).

A sample is the dict of one webdataset key's members ({ext: bytes}); a bad one becomes a skip marker
(ldm/data/skips.py) with one of SKIP_REASONS, so every skip is counted under a stable name.
"""
import json
from dataclasses import asdict, dataclass

import numpy as np
from PIL import UnidentifiedImageError

from ldm.data.buckets import Bucket, bucket_crop_box, check_buckets, nearest_bucket
from ldm.data.skips import skipped_item
from ldm.data.transforms import crop_and_resize, load_rgb, square_crop_box

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "caption")  # else the json member's "caption" (img2dataset writes both)
EMPTY_CAPTION = ("skip", "keep")
SKIP_REASONS = (
    "truncated tar member", "no image", "not an image", "undecodable image", "missing caption", "empty caption",
    "below min_size", "above max_aspect", "bad label",
)


Box = tuple[int, int, int, int]  # left, top, right, bottom


@dataclass(frozen=True)
class Preprocess:
    """Which samples are kept and how their images become resolution x resolution squares (or bucket-sized boxes)."""

    resolution: int
    min_size: int = 0  # skip images whose shorter side (pixels) is below this
    max_aspect: float | None = None  # skip images whose longer / shorter side exceeds this
    empty_caption: str = "skip"  # skip | keep (as "") a sample whose caption is missing or blank
    buckets: tuple[Bucket, ...] | None = None  # (height, width) sizes; None: resolution x resolution squares

    def __post_init__(self) -> None:
        if self.buckets is not None:  # lists from a config become tuples: hashable, and equal whatever their origin
            object.__setattr__(self, "buckets", check_buckets(self.buckets))
        if self.resolution <= 0 or self.min_size < 0:
            raise ValueError(f"need resolution > 0 and min_size >= 0, got {self.resolution=}, {self.min_size=}")
        if self.max_aspect is not None and self.max_aspect < 1:
            raise ValueError(f"max_aspect is longer / shorter side, so >= 1 (or null), got {self.max_aspect}")
        if self.empty_caption not in EMPTY_CAPTION:
            raise ValueError(f"empty_caption must be one of {EMPTY_CAPTION}, got {self.empty_caption!r}")

    def as_dict(self) -> dict:
        """The settings as recorded in a cache's plan, with the fixed steps spelled out (no `buckets` key without
        buckets: the plan of a square cache stays what it was, so existing caches are still accepted)."""
        settings = {k: v for k, v in asdict(self).items() if k != "buckets"}
        if self.buckets is None:
            return {**settings, "crop": "center square", "resize": "bicubic, antialiased"}
        return {**settings, "buckets": [list(b) for b in self.buckets],
                "crop": "center, nearest aspect-ratio bucket (log h/w)", "resize": "bicubic, antialiased"}

    def crop_for(self, width: int, height: int, crop: str) -> tuple[Box, tuple[int, int], int | None]:
        """(crop box in original pixels, output (width, height), bucket index or None) for a width x height image."""
        if self.buckets is None:
            return square_crop_box(width, height, crop), (self.resolution, self.resolution), None
        bucket = nearest_bucket(width, height, self.buckets)
        height_out, width_out = self.buckets[bucket]
        return bucket_crop_box(width, height, self.buckets[bucket], crop), (width_out, height_out), bucket


def caption_of(sample: dict[str, bytes]) -> str | None:
    """The sample's caption: a txt/caption member, else the json member's "caption"; None when it has neither."""
    for ext in CAPTION_EXTENSIONS:
        if ext in sample:
            return sample[ext].decode("utf-8").strip()
    meta = json.loads(sample["json"]) if "json" in sample else {}
    caption = meta.get("caption") if isinstance(meta, dict) else None
    return None if caption is None else str(caption).strip()


def size_filter(width: int, height: int, pre: Preprocess) -> tuple[str, str] | None:
    """(reason, message) when a width x height image fails the min_size or max_aspect filter, else None."""
    if min(width, height) < pre.min_size:
        return "below min_size", f"{width}x{height} < {pre.min_size}"
    if pre.max_aspect is not None and max(width, height) / min(width, height) > pre.max_aspect:
        return "above max_aspect", f"{width}x{height} > {pre.max_aspect}"
    return None


def prepare_sample(sample: dict, pre: Preprocess, crop: str = "center") -> dict:
    """One tar sample -> {"pixels": uint8 [H,W,3], "meta": {...}} or a skip marker. The meta keeps the key, caption,
    label, original size (w, h) and crop box (left, top, right, bottom) in original pixels, for size/crop conditioning,
    and with buckets the bucket's index. The cache crops the centre; training straight from the tars may crop at
    random (`crop`, the box is recorded).

    Pixels stay uint8 (no torch here): this runs in worker processes, and a quarter of the bytes travel back.
    """
    key = sample["__key__"]
    if "__error__" in sample:
        return skipped_item(key, "truncated tar member", sample["__error__"])
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        return skipped_item(key, "no image", f"members {sorted(k for k in sample if not k.startswith('__'))}")
    try:
        caption = caption_of(sample)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return skipped_item(key, "missing caption", f"unreadable caption: {err}")
    if not caption and pre.empty_caption == "skip":
        return skipped_item(key, "missing caption" if caption is None else "empty caption", "")
    try:
        label = int(sample["cls"].decode("utf-8")) if "cls" in sample else -1
    except (UnicodeDecodeError, ValueError) as err:
        return skipped_item(key, "bad label", str(err)[:200])
    try:
        img = load_rgb(sample[ext])
    except UnidentifiedImageError:  # its message names a memory address: not kept, so reruns write the same sidecar
        return skipped_item(key, "not an image", f"{ext} member of {len(sample[ext])} bytes in no known image format")
    except Exception as err:  # truncated or damaged data: PIL raises OSError, ValueError, SyntaxError, ...
        return skipped_item(key, "undecodable image", f"{type(err).__name__}: {str(err)[:200]}")
    width, height = img.size  # after EXIF orientation: the image as seen
    if (rejected := size_filter(width, height, pre)) is not None:
        return skipped_item(key, *rejected)
    box, size, bucket = pre.crop_for(width, height, crop)
    meta = {"key": key, "caption": caption or "", "label": label, "original_size": [width, height],
            "crop_box": list(box), **({} if bucket is None else {"bucket": bucket})}
    return {"pixels": np.asarray(crop_and_resize(img, box, size)), "meta": meta}
