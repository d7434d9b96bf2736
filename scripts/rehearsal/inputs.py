"""img2dataset-layout tar shards of captioned shapes scenes, with one of each kind of bad member the cache must skip.

A shard is `{shard:05d}.tar` with `KEY.jpg`, `KEY.txt` (the caption), `KEY.json` (url, sizes; no caption, as
img2dataset writes it without `--save_additional_columns`), next to `{shard:05d}_stats.json`.
"""
import io
import json
import tarfile
from pathlib import Path

import torch
from PIL import Image

from ldm.data.shapes import ShapesDataset
from ldm.utils.atomic import atomic_write_bytes, atomic_write_json

# the bad members in shard 0 -> the reason the cache counts them under (ldm/data/preprocess.py SKIP_REASONS)
CORRUPT = {"truncated jpeg": "undecodable image", "non-image bytes": "not an image",
           "missing caption": "missing caption", "tiny image": "below min_size"}


def scene_jpeg(image: torch.Tensor, width: int, height: int) -> bytes:
    """A [3,H,W] scene in [-1,1] as a width x height JPEG (wider than tall: the centre crop has an offset)."""
    pixels = ((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sample_members(key: str, jpeg: bytes, caption: str | None, width: int, height: int) -> list[tuple[str, bytes]]:
    meta = {"key": key, "url": f"https://example.com/{key}.jpg", "width": width, "height": height,
            "original_width": width, "original_height": height, "status": "success"}
    members = [(f"{key}.jpg", jpeg), (f"{key}.json", json.dumps(meta).encode())]
    return members + ([(f"{key}.txt", caption.encode())] if caption is not None else [])


def write_shards(folder: Path, num_shards: int, per_shard: int, resolution: int, seed: int = 0) -> str:
    """Write the shards (scenes of 5/4 x 1 the resolution) and return their brace pattern; shard 0 starts with
    one sample of each CORRUPT kind (the tiny image is an eighth of the resolution: below min_size = resolution/2)."""
    folder.mkdir(parents=True, exist_ok=True)
    scenes = iter(ShapesDataset(size=num_shards * per_shard, resolution=resolution, seed=seed))
    width, height = resolution * 5 // 4, resolution
    for shard in range(num_shards):
        members = []
        for j in range(per_shard):
            scene, key = next(scenes), f"{shard:05d}{j:04d}"
            jpeg, caption, size = scene_jpeg(scene["image"], width, height), scene["caption"], (width, height)
            kind = list(CORRUPT)[j] if shard == 0 and j < len(CORRUPT) else None
            if kind == "truncated jpeg":
                jpeg = jpeg[: len(jpeg) // 2]
            elif kind == "non-image bytes":
                jpeg = b"<html>403 Forbidden</html>"
            elif kind == "missing caption":
                caption = None
            elif kind == "tiny image":
                size = (resolution // 8, resolution // 8)
                jpeg = scene_jpeg(scene["image"], *size)
            members += sample_members(key, jpeg, caption, *size)
        atomic_write_bytes(folder / f"{shard:05d}.tar", tar_bytes(members))
        atomic_write_json(folder / f"{shard:05d}_stats.json", {"count": per_shard, "successes": per_shard})
    return str(folder / f"{{00000..{num_shards - 1:05d}}}.tar")


def reference_set(folder: Path, count: int, resolution: int, seed: int = 1) -> Path:
    """Held-out real scenes and their captions for eval=reference: `folder`/images/*.png and `folder`/prompts.txt."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    captions = []
    for i, scene in enumerate(ShapesDataset(size=count, resolution=resolution, seed=seed)):
        pixels = ((scene["image"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        atomic_write_bytes(folder / "images" / f"{i:05d}.png", buffer.getvalue())
        captions.append(scene["caption"])
    atomic_write_bytes(folder / "prompts.txt", ("\n".join(captions) + "\n").encode())
    return folder
