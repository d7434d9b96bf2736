"""Metrics and baselines of the image-conditioned tasks against hand-computed values."""
import math

import torch

from ldm.data.shapes import ShapesDataset
from ldm.eval.image_tasks import (
    bicubic_upsample, blurred_fill, layout_accuracy, masked_psnr, read_layout, shapes_task_batch, task_baseline,
    task_scores,
)


def test_masked_psnr_counts_only_the_hole():
    real = torch.full((1, 3, 4, 4), -1.0)
    fake = real.clone()
    fake[..., :2, :] = 0.0  # top half off by 0.5 in [0, 1] units
    fake[..., 3, 3] = 1.0  # a big error outside the hole
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    assert math.isclose(masked_psnr(real, fake, mask).item(), 10 * math.log10(1 / 0.25), rel_tol=1e-6)
    half = mask.clone()
    half[..., 0, :] = 0  # one row of the hole right (error 0), one wrong: mse 0.125
    fake[..., 0, :] = -1.0
    assert math.isclose(masked_psnr(real, fake, half).item(), 10 * math.log10(1 / 0.25), rel_tol=1e-6)
    assert math.isclose(masked_psnr(real, fake, mask).item(), 10 * math.log10(1 / 0.125), rel_tol=1e-6)


def test_blurred_fill_keeps_known_pixels_and_fills_flat_images_exactly():
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1
    filled = blurred_fill(image, mask)
    assert torch.equal(filled[..., :4, :], image[..., :4, :])
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(blurred_fill(flat, mask[:1]), flat, atol=1e-5)  # a weighted mean of equal values
    # left half white, right half black, a hole across the edge: filled values stay between and follow the sides
    split = torch.cat([torch.ones(1, 3, 16, 8), -torch.ones(1, 3, 16, 8)], -1)
    out = blurred_fill(split, mask[:1])
    assert out[0, 0, 8, 4] > 0.3 and out[0, 0, 8, 11] < -0.3 and out.abs().max() <= 1


def test_bicubic_upsample_keeps_constants_and_size():
    low = torch.full((2, 3, 4, 4), 0.5)
    up = bicubic_upsample(low, 16)
    assert up.shape == (2, 3, 16, 16) and torch.allclose(up, torch.full_like(up, 0.5), atol=1e-6)


def test_layout_accuracy_by_hand():
    layout = torch.zeros(1, 2, 2, dtype=torch.long)
    layout[0, 0, 0] = 1  # one red pixel (colour 0 -> class 1)
    image = -torch.ones(1, 3, 2, 2)
    red = torch.tensor([230, 25, 25]) / 255 * 2 - 1
    image[0, :, 0, 0] = red
    assert read_layout(image).tolist() == [[[1, 0], [0, 0]]]
    assert layout_accuracy(image, layout) == {"accuracy": 1.0, "foreground_accuracy": 1.0, "miou": 1.0}
    image[0, :, 1, 1] = red  # a red pixel on the background: 3/4 right, IoU red 1/2, background 2/3
    scores = layout_accuracy(image, layout)
    assert scores["accuracy"] == 0.75 and scores["foreground_accuracy"] == 1.0
    assert math.isclose(scores["miou"], (0.5 + 2 / 3) / 2, rel_tol=1e-6)


def test_rendered_scenes_agree_with_their_maps_and_baselines_score_as_expected():
    data = ShapesDataset(32, resolution=32, seed=5, layout=True)
    images = torch.stack([data[i]["image"] for i in range(32)])
    layout = torch.stack([data[i]["layout"] for i in range(32)])
    truth = layout_accuracy(images, layout)
    assert truth["accuracy"] > 0.98 and truth["foreground_accuracy"] > 0.9  # only anti-aliased rims disagree
    black = layout_accuracy(-torch.ones_like(images), layout)
    assert black["foreground_accuracy"] == 0.0 and black["accuracy"] < 0.95
    batch = shapes_task_batch("sr", 16, resolution=32)
    sr = task_scores("sr", batch, task_baseline("sr", batch))
    assert 15 < sr["psnr"] < 35 and task_scores("sr", batch, batch["image"])["psnr"] == 100.0
    batch = shapes_task_batch("inpaint", 16, resolution=32)
    assert torch.equal(batch["mask"], shapes_task_batch("inpaint", 16, resolution=32)["mask"])  # fixed masks
    inpaint = task_scores("inpaint", batch, task_baseline("inpaint", batch))
    assert inpaint["psnr_known"] == 100.0 and inpaint["psnr_hole"] < 40  # the baseline keeps the known pixels
