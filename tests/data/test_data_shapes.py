"""Shapes benchmark: determinism, and colours/sizes/positions/shapes measured on the rendered pixels."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from ldm.data.datamodule import ImageDataModule
from ldm.data.shapes import (
    COLOR_RGB,
    COLORS,
    POSITION_XY,
    POSITIONS,
    SHAPES,
    SIZE_DIAMETER,
    SIZES,
    ShapeObject,
    ShapesDataset,
    describe,
    render_shapes,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def pixels(image: torch.Tensor) -> np.ndarray:
    """float [3,H,W] in [-1,1] -> uint8-valued float [H,W,3]."""
    return ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round()


def coverage(image: torch.Tensor, color: int) -> np.ndarray:
    """Per-pixel fraction covered by a single object of `color` on black: [H,W] in [0,1]."""
    rgb = np.asarray(COLOR_RGB[color], np.float64)
    return pixels(image) @ rgb / (rgb @ rgb)


def test_deterministic_per_seed_and_index_and_independent_of_global_rng():
    a, b = ShapesDataset(50, seed=3), ShapesDataset(50, seed=3)
    first = a[7]
    np.random.seed(123), torch.manual_seed(123)
    again = b[7]
    assert torch.equal(first["image"], again["image"]) and first["caption"] == again["caption"]
    assert first["key"] == again["key"] == "shapes-3-0000007"
    other = ShapesDataset(50, seed=4)
    assert sum(a[i]["caption"] != other[i]["caption"] for i in range(20)) > 10
    # the scene does not depend on the resolution
    big = ShapesDataset(50, resolution=64, seed=3)[7]
    assert big["caption"] == first["caption"] and big["image"].shape == (3, 64, 64)
    assert all(torch.equal(big["attrs"][k], first["attrs"][k]) for k in first["attrs"])


def test_pinned_scenes_keep_the_benchmark_stable():
    # the benchmark is only comparable across runs and versions if these never change
    ds = ShapesDataset(10, seed=0)
    assert [ds[i]["caption"] for i in range(3)] == [
        "a large white square in the top right",
        "a large yellow triangle in the bottom left",
        "a small white circle in the bottom left",
    ]
    assert ShapesDataset(10, num_objects=2, seed=0)[0]["caption"] == (
        "a small white square in the bottom right and a small yellow circle in the bottom left"
    )


def test_caption_format_and_attrs():
    obj = ShapeObject(color=0, shape=0, size=0, position=0, diameter=0.25, x=0.27, y=0.27)
    assert describe([obj]) == "a small red circle in the top left"
    center = ShapeObject(color=2, shape=1, size=1, position=4, diameter=0.45, x=0.5, y=0.5)
    assert describe([obj, center]) == "a small red circle in the top left and a large blue square in the center"
    ds = ShapesDataset(40, num_objects=2, seed=5)
    for i in range(40):
        item = ds[i]
        attrs = {k: v.tolist() for k, v in item["attrs"].items()}
        phrases = [
            f"a {SIZES[z]} {COLORS[c]} {SHAPES[s]} in the {POSITIONS[p]}"
            for c, s, z, p in zip(attrs["color"], attrs["shape"], attrs["size"], attrs["position"])
        ]
        assert item["caption"] == " and ".join(phrases)
        assert item["label"] == -1 and attrs["position"][0] != attrs["position"][1]


@pytest.mark.parametrize("resolution", [32, 64])
def test_colors_sizes_positions_shapes_measured_on_pixels(resolution):
    ds = ShapesDataset(60, resolution=resolution, seed=2)
    seen = {name: set() for name in ("color", "shape", "size", "position")}
    for i in range(len(ds)):
        item, (obj,) = ds[i], ds.scene(i)
        image = item["image"]
        assert image.dtype == torch.float32 and image.shape == (3, resolution, resolution)
        assert image.min() >= -1 and image.max() <= 1
        assert {k: v.item() for k, v in item["attrs"].items()} == {
            "color": obj.color, "shape": obj.shape, "size": obj.size, "position": obj.position
        }
        for name in seen:
            seen[name].add(getattr(obj, name))
        # colour: a pixel at the object's centre is fully covered, so it is exactly the palette colour
        centre = pixels(image)[int(obj.y * resolution), int(obj.x * resolution)]
        assert tuple(centre) == COLOR_RGB[obj.color]
        cover = coverage(image, obj.color)
        assert np.all(pixels(image)[cover < 1e-6] == 0)  # black background
        # size: vertical extent is d for all three shapes, to within the partly covered edge rows
        # (a triangle's apex can fall between the 4x supersamples)
        rows = np.nonzero(cover.max(axis=1) > 1e-3)[0]
        height = (rows[-1] - rows[0] + 1) / resolution
        assert obj.diameter - 1 / resolution <= height <= obj.diameter + 2 / resolution
        nominal = SIZE_DIAMETER[obj.size]
        assert nominal * 0.95 - 1 / resolution <= height <= nominal * 1.05 + 2 / resolution
        # shape: covered area is pi/4 d^2, d^2 or d^2 / 2
        area = cover.sum() / resolution**2
        expected_area = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}[SHAPES[obj.shape]] * obj.diameter**2
        assert area == pytest.approx(expected_area, rel=0.04)
        # position: coverage centroid; a triangle's centroid sits d/6 below its box centre
        ys, xs = np.mgrid[0:resolution, 0:resolution] + 0.5
        cx, cy = (cover * xs).sum() / cover.sum() / resolution, (cover * ys).sum() / cover.sum() / resolution
        offset = obj.diameter / 6 if SHAPES[obj.shape] == "triangle" else 0.0
        assert cx == pytest.approx(obj.x, abs=0.3 / resolution) and cy == pytest.approx(obj.y + offset, abs=0.3 / resolution)
        px, py = POSITION_XY[obj.position]
        assert abs(cx - px) <= 0.03 + 0.3 / resolution and abs(cy - offset - py) <= 0.03 + 0.3 / resolution
    assert seen["size"] == {0, 1} and seen["shape"] == {0, 1, 2} and len(seen["position"]) == 5 and len(seen["color"]) >= 5


def test_two_objects_do_not_overlap_and_both_render():
    ds = ShapesDataset(200, resolution=32, num_objects=2, seed=0)
    for i in range(len(ds)):
        a, b = ds.scene(i)
        ax0, ay0, ax1, ay1 = a.box()
        bx0, by0, bx1, by1 = b.box()
        assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0
        assert a.position != b.position
        assert all(0 <= v <= 1 for v in (*a.box(), *b.box()))
    for i in range(20):
        image, objects = pixels(ds[i]["image"]), ds.scene(i)
        for obj in objects:
            assert tuple(image[int(obj.y * 32), int(obj.x * 32)]) == COLOR_RGB[obj.color]


def test_render_is_antialiased_and_background_black():
    obj = ShapeObject(color=5, shape=0, size=1, position=4, diameter=0.45, x=0.5, y=0.5)
    image = render_shapes([obj], 32)
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    assert (image[0, 0] == 0).all()
    partial = np.unique(image[..., 0])
    assert ((partial > 0) & (partial < 240)).sum() >= 3  # edge pixels take intermediate values


def test_collate_and_datamodule():
    ds = ShapesDataset(20, num_objects=2)
    batch = default_collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and batch["attrs"]["color"].shape == (4, 2)
    assert batch["attrs"]["position"].dtype == torch.long and len(batch["caption"]) == 4
    dm = ImageDataModule(ShapesDataset(20), ShapesDataset(6, seed=1), batch_size=8)
    assert [len(b["key"]) for b in dm.train_dataloader()] == [8, 8]  # drop_last for training
    assert [len(b["key"]) for b in dm.val_dataloader()] == [6]


def test_config_builds_train_and_disjoint_val():
    cfg = OmegaConf.create({"data": OmegaConf.load(CONFIGS / "data" / "shapes.yaml")})  # as main.py composes it
    cfg.data.resolution = 64
    dm = instantiate(cfg.data)
    assert isinstance(dm, ImageDataModule) and dm.resolution == 64 and dm.batch_size == 64
    assert len(dm.train) == 10000 and len(dm.val) == 256
    assert dm.train.resolution == dm.val.resolution == 64 and dm.train.seed != dm.val.seed
