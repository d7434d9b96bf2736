"""Image folders: recursive discovery, captions, crops/flips, clear errors, corrupt files skipped and counted."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.image_folder import ImageFolderDataset
from ldm.data.skips import KeptLoader, collate_kept

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def bands(*colors: tuple, band: int = 32, height: int = 32) -> Image.Image:
    """Vertical colour bands, left to right."""
    return Image.fromarray(np.concatenate([np.full((height, band, 3), c, np.uint8) for c in colors], axis=1))


def rgb(image: torch.Tensor) -> np.ndarray:
    return ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "cats" / "deep").mkdir(parents=True)
    (tmp_path / "dogs").mkdir()
    bands(RED, GREEN, BLUE).save(tmp_path / "cats" / "wide.png")
    (tmp_path / "cats" / "wide.txt").write_text("three bands\n")
    bands(GREEN, band=40, height=50).save(tmp_path / "cats" / "deep" / "tall.jpg", quality=95)
    bands(BLUE).save(tmp_path / "dogs" / "blue.webp", lossless=True)
    (tmp_path / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    bands(RED).save(tmp_path / "dogs" / "truncated.png")
    data = (tmp_path / "dogs" / "truncated.png").read_bytes()
    (tmp_path / "dogs" / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.md").write_text("not an image")
    with (tmp_path / "captions.jsonl").open("w") as f:
        f.write(json.dumps({"file": "dogs/blue.webp", "caption": "a blue square"}) + "\n")
        f.write(json.dumps({"file": "cats/wide.png", "caption": "loses to the .txt file"}) + "\n")
    return tmp_path


def test_discovery_captions_keys_and_pixels(folder):
    ds = ImageFolderDataset(str(folder), resolution=16)
    assert [f.as_posix() for f in ds.files] == [
        "cats/deep/tall.jpg", "cats/wide.png", "dogs/blue.webp", "dogs/broken.jpg", "dogs/truncated.png"
    ]
    tall, wide, blue = ds[0], ds[1], ds[2]
    assert wide["caption"] == "three bands" and blue["caption"] == "a blue square" and tall["caption"] == ""
    assert wide["key"] == "cats/wide" and wide["label"] == -1
    for item in (tall, wide, blue):
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1 and item["image"].max() <= 1
    # centre crop of red|green|blue is the green band
    assert np.abs(rgb(wide["image"]) - GREEN).max() <= 1
    assert np.abs(rgb(blue["image"]) - BLUE).max() <= 1
    assert np.abs(rgb(tall["image"]) - GREEN).max() <= 3  # jpeg


def test_corrupt_files_are_skipped_and_counted_across_workers(folder):
    ds = ImageFolderDataset(str(folder), resolution=8)
    loader = KeptLoader(ds, batch_size=1, num_workers=2, collate_fn=collate_kept)
    keys = [batch["key"][0] for batch in loader]
    # each bad file is left out, never replaced by another image; its all-skipped batch is dropped
    assert keys == ["cats/deep/tall", "cats/wide", "dogs/blue"]
    assert ds.num_skipped == 2  # broken.jpg and truncated.png


def test_random_crop_and_flip(folder, tmp_path):
    ds = ImageFolderDataset(str(folder), resolution=16, crop="random")
    torch.manual_seed(0)
    means = {tuple(rgb(ds[1]["image"]).mean(axis=(0, 1)).round()) for _ in range(30)}
    assert len(means) > 3  # the window moves along the wide image
    half = tmp_path / "flip"
    half.mkdir()
    bands(RED, BLUE, band=16).save(half / "a.png")
    flipping = ImageFolderDataset(str(half), resolution=16, flip=True)
    left_colours = {tuple(rgb(flipping[0]["image"])[8, 0]) for _ in range(30)}
    assert left_colours == {RED, BLUE}
    assert tuple(rgb(ImageFolderDataset(str(half), resolution=16)[0]["image"])[8, 0]) == RED


def test_labels_from_subfolders_and_transparency(folder):
    ds = ImageFolderDataset(str(folder), resolution=8, labels_from_subfolders=True)
    assert ds.classes == ("cats", "dogs") and [ds[i]["label"] for i in range(3)] == [0, 0, 1]
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red but fully transparent -> white
    Image.fromarray(rgba, "RGBA").save(folder / "clear.png")
    ds = ImageFolderDataset(str(folder), resolution=8)
    item = ds[[f.as_posix() for f in ds.files].index("clear.png")]
    assert item["key"] == "clear" and (rgb(item["image"]) == 255).all()


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.root") as err:
        ImageFolderDataset(str(tmp_path / "missing"))
    assert "missing" in str(err.value)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(str(tmp_path))
    bands(RED).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="crop"):
        ImageFolderDataset(str(tmp_path), crop="middle")
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png", "caption": "ok"}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:2"):
        ImageFolderDataset(str(tmp_path))


def test_config_requires_root_and_builds(folder):
    cfg = OmegaConf.create({"data": OmegaConf.load(CONFIGS / "data" / "image_folder.yaml")})
    assert OmegaConf.is_missing(cfg.data, "root")
    cfg.data.root, cfg.data.resolution = str(folder), 16
    dm = instantiate(cfg.data)
    assert len(dm.train) == 5 and dm.val is None and dm.root == str(folder)
