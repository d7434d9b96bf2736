"""Condition inputs made on the fly: inpainting masks, super-resolution's low-res image, the shapes' semantic map,
and the DataModule adding them to every batch."""
import pytest
import torch

from ldm.data.condition_inputs import LowRes, RandomMasks, box_mask, downsample, free_form_mask
from ldm.data.datamodule import ImageDataModule
from ldm.data.shapes import COLORS, LAYOUT_CLASSES, ShapesDataset, render_layout


def test_box_mask_is_one_rectangle_of_the_asked_size():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = box_mask(32, 32, g, min_side=0.25, max_side=0.5)
        rows, cols = mask[0].any(1).nonzero(), mask[0].any(0).nonzero()
        h, w = len(rows), len(cols)
        assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) == {0.0, 1.0}
        assert 8 <= h <= 16 and 8 <= w <= 16 and mask.sum() == h * w  # a full rectangle: rows x cols
        assert rows.max() - rows.min() + 1 == h and cols.max() - cols.min() + 1 == w


def test_free_form_masks_are_binary_strokes_that_differ_and_repeat_with_the_seed():
    masks = [free_form_mask(32, 32, torch.Generator().manual_seed(s)) for s in range(10)]
    for mask in masks:
        assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert 0.02 < mask.mean() < 0.9  # strokes, neither empty nor everything
    assert len({tuple(m.flatten().tolist()) for m in masks}) == 10
    assert torch.equal(masks[3], free_form_mask(32, 32, torch.Generator().manual_seed(3)))


def test_random_masks_mix_kinds_per_image():
    batch = {"image": torch.zeros(16, 3, 32, 32)}
    mask = RandomMasks()(batch, torch.Generator().manual_seed(0))["mask"]
    assert mask.shape == (16, 1, 32, 32)
    full_rectangles = [bool(m[0].sum() == m[0].any(1).sum() * m[0].any(0).sum()) for m in mask]
    assert any(full_rectangles) and not all(full_rectangles)  # boxes and strokes
    with pytest.raises(ValueError, match="mask kinds"):
        RandomMasks(["circle"])


def test_low_res_is_the_box_average():
    image = torch.arange(16.0).reshape(1, 1, 4, 4).expand(1, 3, 4, 4)
    low = LowRes(factor=2)({"image": image})["lowres"]
    assert torch.equal(low[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))  # mean of (0,1,4,5), (2,3,6,7), ...
    with pytest.raises(ValueError, match="not divisible"):
        downsample(torch.zeros(1, 3, 6, 6), 4)


def test_layout_is_the_renderers_geometry_with_one_class_per_colour():
    data = ShapesDataset(16, resolution=32, num_objects=2, seed=3, layout=True)
    assert LAYOUT_CLASSES == 1 + len(COLORS)
    for i in range(16):
        item = data[i]
        layout, brightness = item["layout"], (item["image"].amax(0) + 1) / 2
        assert layout.shape == (32, 32) and layout.dtype == torch.long
        assert sorted(layout.unique().tolist()) == sorted({0, *(1 + c for c in item["attrs"]["color"].tolist())})
        # object pixels (at least half covered) are at least ~half as bright as a palette colour, background ones less
        assert (brightness[layout > 0] > 0.35).all() and (brightness[layout == 0] < 0.5).all()
    assert "layout" not in ShapesDataset(1).__getitem__(0)
    objects = data.scene(0)
    assert (render_layout(objects, 64) > 0).sum() > 3.5 * (render_layout(objects, 32) > 0).sum()  # any resolution


def test_datamodule_adds_the_inputs_to_every_batch():
    dm = ImageDataModule(ShapesDataset(8, resolution=16), batch_size=4, inputs=[LowRes(4), RandomMasks()])
    batch = next(iter(dm.train_dataloader()))
    assert batch["lowres"].shape == (4, 3, 4, 4) and batch["mask"].shape == (4, 1, 16, 16)
    assert torch.allclose(batch["lowres"], downsample(batch["image"], 4))
