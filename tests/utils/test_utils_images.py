"""The one [-1, 1] <-> uint8 image conversion pair."""
import pytest
import torch

from ldm.utils.images import from_uint8, to_uint8


def test_uint8_round_trip_is_exact():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(4, 8, 8)  # every level once
    images = from_uint8(pixels)
    assert images.dtype == torch.float32 and images.min() == -1 and images.max() == 1
    assert torch.equal(to_uint8(images), pixels)


def test_to_uint8_clamps_and_rounds():
    images = torch.tensor([-3.0, -1.0, 0.0, 1 / 255, 1.0, 2.5])
    assert to_uint8(images).tolist() == [0, 0, 128, 128, 255, 255]  # 127.5 and 128.0 both round to 128


def test_from_uint8_refuses_other_dtypes():
    with pytest.raises(ValueError, match="uint8"):
        from_uint8(torch.zeros(3, 2, 2))
