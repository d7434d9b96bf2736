"""eval.inception.resize: clean-fid's PIL bicubic ("clean") against PIL itself, the network after it is
torch-fidelity's, and the resize is part of the protocol and of the cached statistics' key."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.eval.clean_resize import clean_resize
from ldm.eval.inception import InceptionFeatures
from ldm.eval.reference_suite import ReferenceSuite
from ldm.utils.errors import ConfigError
from reference_sets import shapes_images, write_folder, write_prompts


@pytest.mark.parametrize("height, width", [(37, 53), (512, 400)])  # upsampling, and downsampling (antialiased)
def test_clean_resize_is_pil_bicubic_per_channel_in_float(height, width):
    pixels = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = clean_resize(pixels, 299)
    assert ours.shape == (2, 3, 299, 299) and ours.dtype == torch.float32
    for image, out in zip(pixels.numpy(), ours.numpy()):
        for plane, resized in zip(image, out):
            direct = Image.fromarray(plane.astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC)
            np.testing.assert_array_equal(resized, np.clip(np.asarray(direct), 0, 255))
        rgb = Image.fromarray(image.transpose(1, 2, 0)).resize((299, 299), Image.BICUBIC)  # PIL's uint8 path
        # the same filter; PIL's uint8 path rounds, and clips between its two passes (which noise exercises)
        assert np.abs(out.transpose(1, 2, 0) - np.asarray(rgb)).mean() < 0.5
    assert not torch.equal(ours, ours.round())  # unquantised, as clean-fid leaves it
    with pytest.raises(ValueError, match="uint8"):
        clean_resize(pixels.float(), 299)


def test_clean_mode_runs_torch_fidelitys_network_after_the_resize(inception_weights_file):
    clean = InceptionFeatures(weights_path=str(inception_weights_file), resize="clean")
    at_299 = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    pool, logits = clean.net._torch_fidelity_forward(at_299)  # its own resize is the identity at 299 px
    ours_pool, ours_logits = clean._from_299(at_299.float())
    torch.testing.assert_close(ours_pool, pool)
    torch.testing.assert_close(ours_logits, logits)
    images = shapes_images(2)
    tf1 = InceptionFeatures(weights_path=str(inception_weights_file))
    assert (clean.resize, tf1.resize) == ("clean-pil-bicubic-299", "tf1-bilinear-299")
    assert not torch.allclose(clean(images), tf1(images))  # 32 -> 299 px: the filters differ
    with pytest.raises(ConfigError, match="eval.inception.resize='bilinear'"):
        InceptionFeatures(weights_path=str(inception_weights_file), resize="bilinear")


def test_a_different_resize_is_another_cache_entry_and_protocol(tmp_path, inception_weights_file):
    reference = write_folder(shapes_images(4), tmp_path / "reference")
    prompts = str(write_prompts(tmp_path / "prompts.txt", 4))

    def suite(resize):
        return ReferenceSuite(prompts_file=prompts, reference_dir=str(reference), stats_dir=str(tmp_path / "stats"),
                              inception=InceptionFeatures(weights_path=str(inception_weights_file), resize=resize),
                              num_samples=4, resolution=32, pr_k=2)

    tf1, clean = suite("tf1_bilinear"), suite("clean")
    assert (tf1.protocol()["resize"], clean.protocol()["resize"]) == ("tf1-bilinear-299", "clean-pil-bicubic-299")
    assert not np.allclose(tf1.reference_stats().mu, clean.reference_stats().mu)
    assert len(list((tmp_path / "stats").glob("reference-*.npz"))) == 2  # one per resize, same weights and images
