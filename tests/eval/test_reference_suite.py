"""eval=reference: FID/KID/IS/precision-recall equal torch-fidelity's on the same PNGs and Inception weights file;
the pure IS and precision/recall functions; bad prompts files and weights files give one-line errors."""
import pytest
import torch
from torch_fidelity import calculate_metrics
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_full

from ldm.data.image_folder import ImageFolderDataset
from ldm.eval.inception import InceptionFeatures
from ldm.eval.inception_score import inception_score
from ldm.eval.precision_recall import precision_recall
from ldm.eval.reference_suite import ReferenceSuite, read_prompts
from ldm.utils.errors import ConfigError
from reference_sets import shapes_images, write_folder, write_prompts


def test_fid_kid_is_precision_recall_equal_torch_fidelity_on_the_same_files_and_weights(tmp_path,
                                                                                       inception_weights_file):
    reference = write_folder(shapes_images(8, num_objects=1, seed=1), tmp_path / "reference")
    generated = write_folder(shapes_images(8, num_objects=2, seed=2), tmp_path / "generated")
    suite = ReferenceSuite(
        prompts_file=str(write_prompts(tmp_path / "prompts.txt", 8)), reference_dir=str(reference),
        inception=InceptionFeatures(weights_path=str(inception_weights_file)), stats_dir=str(tmp_path / "stats"),
        num_samples=8, resolution=32, kid_subsets=10, kid_subset_size=6, is_splits=2,
    )
    samples = ImageFolderDataset(str(generated), resolution=32)  # the PNGs' pixels, as torch-fidelity reads them
    ours = suite.score(torch.stack([samples[i]["image"] for i in range(len(samples))]))

    theirs = calculate_metrics(
        input1=str(generated), input2=str(reference), cuda=False, fid=True, kid=True, isc=True, prc=True,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(inception_weights_file), kid_subsets=10, kid_subset_size=6, isc_splits=2,
        samples_find_ext="png", cache=False, verbose=False, save_cpu_ram=True,  # no DataLoader workers
    )
    assert ours["fid"] > 1.0  # distinct sets at distances of order one: the comparison is not of round-off
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-3)
    assert ours["is"] == pytest.approx(theirs["inception_score_mean"], rel=1e-3)
    assert (ours["precision"], ours["recall"]) == (theirs["precision"], theirs["recall"])
    assert suite.protocol()["resize"] == "tf1-bilinear-299"  # torch-fidelity's own resize, as the test used


def test_inception_score_matches_torch_fidelity_with_uneven_splits():
    logits = torch.randn(53, 20, generator=torch.Generator().manual_seed(0)) * 3
    mean, std = inception_score(logits, splits=10, seed=2020)
    reference = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    assert mean == pytest.approx(reference["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(reference["inception_score_std"], rel=1e-9)
    assert inception_score(torch.zeros(8, 5), splits=2)[0] == pytest.approx(1.0)  # no information: IS = 1
    with pytest.raises(ValueError, match="splits"):
        inception_score(logits, splits=60)


def test_precision_recall_matches_torch_fidelity_and_the_definition():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(60, 8, generator=g), torch.randn(50, 8, generator=g) * 1.5 + 0.5
    ours = precision_recall(real, fake, k=3)
    reference = calculate_precision_recall_full(fake.double(), real.double(), neighborhood=3)
    assert (ours["precision"], ours["recall"]) == pytest.approx(reference, abs=1e-6)  # it averages in float32
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1
    far = precision_recall(real, fake + 100, k=3)  # disjoint manifolds: nothing inside the other's balls
    assert far == dict(precision=0.0, recall=0.0)
    assert precision_recall(real, real.clone(), k=3) == dict(precision=1.0, recall=1.0)
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(real[:3], fake, k=3)


def test_prompts_file_errors_are_one_line_and_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.prompts_file"):
        read_prompts(tmp_path / "missing.txt", 2)
    path = write_prompts(tmp_path / "p.txt", 3)
    assert read_prompts(path, 2) == path.read_text().splitlines()[:2]
    with pytest.raises(ConfigError, match="fewer than eval.num_samples=4"):
        read_prompts(path, 4)
    path.write_text("a cat\n\na dog\n")
    with pytest.raises(ConfigError, match="p.txt:2: empty prompt"):
        read_prompts(path, 3)


class NotATensor:  # a pickled object that a weights file must not hold
    pass


def test_inception_weights_file_missing_or_not_plain_tensors_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.inception.weights_path"):
        InceptionFeatures(weights_path=str(tmp_path / "missing.pth"))
    evil = tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": NotATensor()}, evil)
    with pytest.raises(ConfigError, match="eval.inception.weights_path"):
        InceptionFeatures(weights_path=str(evil))


def test_reference_folder_too_small_or_missing_is_a_clear_error(tmp_path, inception_weights_file):
    prompts = str(write_prompts(tmp_path / "prompts.txt", 8))
    tiny = write_folder(shapes_images(3), tmp_path / "tiny")
    kwargs = dict(prompts_file=prompts, inception=None, stats_dir=str(tmp_path), num_samples=8, resolution=32)
    with pytest.raises(ConfigError, match="holds 3 images"):
        ReferenceSuite(reference_dir=str(tiny), **kwargs)
    with pytest.raises(FileNotFoundError, match="eval.reference_dir"):
        ReferenceSuite(reference_dir=str(tmp_path / "nowhere"), **kwargs)
