"""Metrics: FID/KID maths against torch-fidelity and torchmetrics, Inception loading (offline),
CLIP score, shapes attribute measurement on real scenes, the small feature/classifier networks, reconstruction."""
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torchmetrics.image.fid import _compute_fid
from torchmetrics.image.kid import poly_mmd
from torchvision.transforms.functional import gaussian_blur

from ldm.data.digits import DigitsDataset
from ldm.data.shapes import ShapesDataset
from ldm.eval import inception
from ldm.eval.clip_score import CLIPScore
from ldm.eval.digits_classifier import class_accuracy, digits_classifier
from ldm.eval.frechet import feature_stats, fid_kid, frechet_distance, frechet_distance_features, kid, real_floor
from ldm.eval.reconstruction import psnr, reconstruction_metrics, ssim
from ldm.eval.shapes_attributes import ATTRIBUTES, attribute_accuracy, measure_attributes
from ldm.eval.shapes_features import render_scenes, shapes_feature_net, slot_accuracy
from ldm.eval.small_cnn import SmallCNN
from ldm.utils.errors import ConfigError
from ldm.utils.images import to_uint8


def random_features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g) / d**0.5  # correlated features, like a network's
    return torch.randn(n, d, generator=g) @ mixing + shift


def shapes_batch(num_scenes: int, resolution: int, num_objects: int, seed: int = 7):
    data = ShapesDataset(size=num_scenes, resolution=resolution, num_objects=num_objects, seed=seed)
    items = [data[i] for i in range(num_scenes)]
    attrs = {name: torch.stack([item["attrs"][name] for item in items]) for name in ATTRIBUTES}
    return torch.stack([item["image"] for item in items]), attrs


# --- FID / KID maths -------------------------------------------------------------------------------------------


def test_feature_stats_and_frechet_distance_match_torch_fidelity_torchmetrics_and_scipy():
    f1, f2 = random_features(300, 32, seed=0), random_features(400, 32, seed=1, shift=0.3)
    mu1, sigma1 = feature_stats(f1)
    mu2, sigma2 = feature_stats(f2)
    reference = fid_features_to_statistics(f1.double())
    np.testing.assert_allclose(mu1, reference["mu"], rtol=1e-12)
    np.testing.assert_allclose(sigma1, reference["sigma"], rtol=1e-10)

    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    fidelity = fid_statistics_to_metric(dict(mu=mu1, sigma=sigma1), dict(mu=mu2, sigma=sigma2), verbose=False)
    torchmetrics_fid = _compute_fid(*(torch.from_numpy(a) for a in (mu1, sigma1, mu2, sigma2))).item()
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    scipy_fid = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean)
    for reference_fid in (fidelity["frechet_inception_distance"], torchmetrics_fid, scipy_fid):
        assert ours == pytest.approx(reference_fid, rel=1e-7)
    assert ours > 1.0
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("n1,n2,d", [(20, 30, 64), (40, 10, 64), (80, 90, 16)])
def test_frechet_distance_from_features_equals_the_covariance_route(n1, n2, d):
    """Fewer features than dimensions (rank-deficient covariances, as with small n and Inception's 2048): the N x N
    nuclear-norm route gives the D x D eigendecomposition's number."""
    f1, f2 = random_features(n1, d, seed=6), random_features(n2, d, seed=7, shift=0.2)
    expected = frechet_distance(*feature_stats(f1), *feature_stats(f2))
    # 1e-7: the D x D route takes square roots of round-off eigenvalues (~1e-16 -> ~1e-8 each) of the null space
    assert frechet_distance_features(f1, f2) == pytest.approx(expected, rel=1e-7)
    assert frechet_distance_features(f1, f1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_gaussians_with_a_shared_eigenbasis_is_the_closed_form():
    """Covariances Q diag(a) Q^T and Q diag(b) Q^T commute: d^2 = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    g = np.random.default_rng(0)
    q, _ = np.linalg.qr(g.normal(size=(16, 16)))
    a, b = g.uniform(0.1, 4.0, 16), g.uniform(0.1, 4.0, 16)
    mu1, mu2 = g.normal(size=16), g.normal(size=16)
    closed_form = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(closed_form,
                                                                                                   rel=1e-10)


def test_kid_matches_torch_fidelity_subsets_and_torchmetrics_mmd():
    f1, f2 = random_features(120, 16, seed=2), random_features(150, 16, seed=3, shift=0.2)
    mean, std = kid(f1, f2, subsets=20, subset_size=50, seed=2020)
    reference = kid_features_to_metric(
        f1.double(), f2.double(), kid_subsets=20, kid_subset_size=50, rng_seed=2020, verbose=False
    )
    assert mean == pytest.approx(reference["kernel_inception_distance_mean"], rel=1e-9)
    assert std == pytest.approx(reference["kernel_inception_distance_std"], rel=1e-9)
    # one subset holding every sample is the MMD of the full sets, whatever the order
    full, _ = kid(f1[:120], f2[:120], subsets=1, subset_size=120)
    assert full == pytest.approx(poly_mmd(f1[:120].double(), f2[:120].double()).item(), rel=1e-9)
    with pytest.raises(ValueError, match="subset_size"):
        kid(f1, f2, subset_size=200)


def test_real_floor_splits_disjoint_halves_and_sits_below_a_shifted_set():
    real = random_features(400, 8, seed=4)
    floor = real_floor(real, 200, kid_subsets=10, kid_subset_size=100)
    shifted = fid_kid(real[:200], random_features(200, 8, seed=5, shift=0.5), kid_subsets=10, kid_subset_size=100)
    assert floor["fid"] < 0.5 * shifted["fid"] and floor["kid"] < shifted["kid"]
    with pytest.raises(ValueError, match="2 \\* n"):
        real_floor(real, 201)


# --- Inception: weights and reference statistics (offline parts) -----------------------------------------------


def test_inception_missing_weights_file_names_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.inception.weights_path"):
        inception.InceptionFeatures(weights_path=str(tmp_path / "missing.pth"))


def test_inception_failed_download_names_the_config_key(tmp_path, monkeypatch):
    def offline(url, dst, progress=True):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConfigError, match="eval.inception.weights_path"):
        inception.InceptionFeatures()


@pytest.mark.slow
def test_inception_features_equal_torch_fidelity_given_the_same_weights_file(inception_weights_file):
    # Random weights stand in for the real file (offline): the network and preprocessing must be torch-fidelity's.
    weights = inception_weights_file
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    ours = inception.InceptionFeatures(weights_path=str(weights))(images)
    reference_net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(weights))
    (reference,) = reference_net(to_uint8(images))
    assert ours.shape == (2, 2048)
    torch.testing.assert_close(ours, reference)


def test_weights_hash_tells_retrained_extractors_apart():
    net = SmallCNN(num_outputs=3)
    before = inception.weights_hash(net)
    assert inception.weights_hash(net) == before
    with torch.no_grad():
        net.head.bias.add_(1e-3)
    assert inception.weights_hash(net) != before


# --- CLIP score ------------------------------------------------------------------------------------------------


def test_clip_score_equals_open_clip_own_pipeline_computed_independently():
    """100 * max(cos, 0) between open_clip's own image pipeline (PIL bicubic resize, its Normalize) and its text
    features, computed here without ldm's code, on a random model (scores mean nothing, the arithmetic must agree)."""
    import open_clip
    from PIL import Image

    torch.manual_seed(0)
    score = CLIPScore(model_name="ViT-S-32", pretrained=None, image_size=64)
    images = torch.rand(32, 3, 64, 64) * 2 - 1  # already at the model's size: no resize differences to absorb
    captions = ["a small red circle in the center", "a large blue square in the top left", "a digit", "a cat",
                "a red square", "a blue circle", "two shapes", "nothing"] * 4
    ours = score(images, captions)

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-S-32", pretrained=None, force_image_size=64)
    model.load_state_dict(score.model.state_dict())
    pil = [Image.fromarray(to_uint8(image).permute(1, 2, 0).numpy()) for image in images]
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(p) for p in pil]), normalize=True)
        text_features = model.encode_text(open_clip.get_tokenizer("ViT-S-32")(captions), normalize=True)
    reference = 100 * (image_features * text_features).sum(-1).clamp(min=0)
    assert (reference > 0).sum() >= 4  # some pairs land on the positive side, so the values are compared
    torch.testing.assert_close(ours, reference, atol=0.3, rtol=0)  # uint8 rounding of the PIL path
    with pytest.raises(ValueError, match="one caption per image"):
        score(images, captions[:2])


def test_clip_missing_weights_name_the_config_key(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="eval.clip.pretrained"):
        CLIPScore(model_name="ViT-S-32", pretrained=str(tmp_path / "clip.bin"))

    def offline(*args, **kwargs):  # what open_clip raises when the hub is unreachable (after its retries)
        raise RuntimeError("Failed to download weights for tag 'openai'")

    monkeypatch.setattr("open_clip.create_model", offline)
    with pytest.raises(ConfigError, match="eval.clip.pretrained"):
        CLIPScore(model_name="ViT-B-32", pretrained="openai")


# --- shapes attribute measurement ------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution,num_objects", [(32, 1), (32, 2), (64, 1), (64, 2)])
def test_attribute_accuracy_on_real_shapes_is_at_least_99_percent(resolution, num_objects):
    images, attrs = shapes_batch(500, resolution, num_objects)  # 2,000 scenes over the four cases
    accuracy = attribute_accuracy(images, attrs)
    assert set(accuracy) == {*ATTRIBUTES, "binding", "object_count"}
    assert min(accuracy.values()) >= 0.99, accuracy


def test_measure_attributes_reads_real_scenes_and_counts_objects():
    images, attrs = shapes_batch(64, 32, 2, seed=3)
    measured = measure_attributes(images, num_objects=2)
    assert measured["valid"].all() and measured["color"].shape == (64, 2)

    def scene(attributes, i):  # the objects of image i, order-free
        return sorted(tuple(int(attributes[name][i, j]) for name in ATTRIBUTES) for j in range(2))

    assert all(scene(measured, i) == scene(attrs, i) for i in range(64))
    single, _ = shapes_batch(200, 32, 1, seed=3)  # one object where two are asked for: never cut in two
    assert (measure_attributes(single, num_objects=2)["count"] == 1).all()
    blank = measure_attributes(-torch.ones(2, 3, 32, 32), num_objects=1)
    assert not blank["valid"].any() and (blank["color"] == -1).all() and (blank["count"] == 0).all()


def test_attribute_accuracy_survives_blur_and_noise_and_catches_wrong_bindings():
    images, attrs = shapes_batch(200, 32, 2, seed=11)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    noisy = gaussian_blur(images, kernel_size=5, sigma=0.5) + 0.05 * noise
    assert min(attribute_accuracy(noisy.clamp(-1, 1), attrs).values()) >= 0.97
    swapped = dict(attrs, color=attrs["color"].flip(1))  # right colours, on the wrong objects
    accuracy = attribute_accuracy(images, swapped)
    differ = (attrs["color"][:, 0] != attrs["color"][:, 1]).float().mean().item()
    assert accuracy["color"] == pytest.approx(1 - differ) and accuracy["binding"] == pytest.approx(1 - differ)
    assert accuracy["shape"] == 1.0 and accuracy["position"] == 1.0


# --- the small feature / classifier networks --------------------------------------------------------------------


@pytest.mark.slow
def test_shapes_feature_net_reads_scenes_and_its_fid_sees_blur(shapes_feature_weights, monkeypatch):
    weights = shapes_feature_weights  # written by shapes_feature_net on first use
    assert weights.is_file()
    net = shapes_feature_net(weights)
    images, targets = render_scenes(600, seed=5)
    order = torch.randperm(600, generator=torch.Generator().manual_seed(0))  # mix one- and two-object scenes
    images, targets = images[order], targets[order]
    readout = slot_accuracy(net, images, targets)
    assert min(readout.values()) >= 0.95, readout
    with torch.no_grad():
        real_a, real_b = net.features(images[:300]), net.features(images[300:])
        blurred = net.features(gaussian_blur(images[300:], kernel_size=9, sigma=2.0))
    assert frechet_distance(*feature_stats(real_a), *feature_stats(real_b)) < 0.5 * frechet_distance(
        *feature_stats(real_a), *feature_stats(blurred)
    )
    monkeypatch.setattr("ldm.eval.shapes_features.train_shapes_feature_net", lambda *a, **k: pytest.fail("retrained"))
    with torch.no_grad():
        torch.testing.assert_close(shapes_feature_net(weights).features(images[:8]), real_a[:8])


@pytest.mark.slow
def test_digits_classifier_is_accurate_on_held_out_real_digits(tmp_path):
    classifier = digits_classifier(tmp_path / "digits.pt")
    for resolution in (32, 64):
        val = DigitsDataset(split="val", resolution=resolution)
        images = torch.stack([val[i]["image"] for i in range(len(val))])
        assert class_accuracy(classifier, images, torch.tensor(val.labels)) >= 0.95
    reloaded = digits_classifier(tmp_path / "digits.pt")
    torch.testing.assert_close(reloaded.features(images[:4]), classifier.features(images[:4]))


# --- reconstruction ----------------------------------------------------------------------------------------------


def test_psnr_ssim_and_rfid_of_reconstructions():
    real = torch.rand(4, 3, 16, 16) * 2 - 1
    offset = (real + 0.2).clamp(-1, 1)
    mse = (((offset - real) / 2) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(psnr(real, offset), 10 * torch.log10(1 / mse))
    assert torch.all(psnr(real, real) >= 99) and torch.allclose(ssim(real, real), torch.ones(4))
    assert torch.all(ssim(real, offset) < 1)
    metrics = reconstruction_metrics(real, real, features=lambda x: x.mean((2, 3)))
    assert metrics["rfid"] == pytest.approx(0.0, abs=1e-8) and metrics["ssim"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one shape"):
        psnr(real, real[:2])
