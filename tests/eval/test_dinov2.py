"""FD_DINOv2: a tiny random timm DINOv2 ViT saved as a local weights file stands in for the real one (no download):
the preprocessing is DINOv2's, timm and official state dicts load, mismatches and missing files are one-line errors
naming the key, FD is the Frechet distance of ldm/eval/frechet.py, and its reference statistics are cached."""
import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from timm.models import register_model
from timm.models.vision_transformer import vit_small_patch14_dinov2
from torch import nn

from ldm.eval import reference_suite
from ldm.eval.dinov2 import DINOv2Features
from ldm.eval.frechet import frechet_distance_features
from ldm.eval.reference_suite import ReferenceSuite
from ldm.utils.errors import ConfigError
from ldm.utils.images import to_uint8
from ldm.utils.safe_config import safe_instantiate
from reference_sets import ChannelStats, shapes_images, write_folder, write_prompts

TINY = "ldm_test_tiny_dinov2"


@register_model
def ldm_test_tiny_dinov2(pretrained: bool = False, **kwargs):
    """timm's ViT-S/14 DINOv2 architecture, 2 blocks of width 32: same code path, milliseconds."""
    return vit_small_patch14_dinov2(pretrained=False, **{**dict(embed_dim=32, depth=2, num_heads=2), **kwargs})


def tiny_state(seed: int, img_size: int = 224) -> dict[str, torch.Tensor]:
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = timm.create_model(TINY, pretrained=False, num_classes=0, img_size=img_size).state_dict()
        # timm starts layer scale at 1e-5 and patch weights small: a random ViT would give every image one feature
        for name, tensor in state.items():
            if ".ls" in name:
                tensor.fill_(1.0)
        state["patch_embed.proj.weight"].normal_(0, 0.1)
    return state


@pytest.fixture
def tiny_weights(tmp_path):
    """A timm-format state dict of the tiny DINOv2, saved where eval.dinov2.weights_path points."""
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(tiny_state(seed=0), path)
    return path


def scipy_frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """The FID formula written out with scipy's matrix square root (pytorch-fid's way), as an independent check."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_preprocessing_is_pil_bicubic_224_with_imagenet_normalisation(tiny_weights):
    dino = DINOv2Features(weights_path=str(tiny_weights), model_name=TINY)
    images = shapes_images(2, resolution=32)
    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
    expected = np.stack([np.asarray(Image.fromarray(p).resize((224, 224), Image.BICUBIC)) for p in pixels]) / 255
    expected = (expected - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    torch.testing.assert_close(dino.preprocess(images), torch.from_numpy(expected).permute(0, 3, 1, 2).float())
    assert dino(images).shape == (2, 32) and dino.resize == "pil-bicubic-224-imagenet-norm"


def test_fd_is_zero_on_identical_sets_and_equals_a_direct_scipy_computation(tiny_weights):
    dino = DINOv2Features(weights_path=str(tiny_weights), model_name=TINY)
    real = dino(shapes_images(40, num_objects=1, seed=1)).double().numpy()
    fake = dino(shapes_images(40, num_objects=2, seed=2)).double().numpy()
    assert frechet_distance_features(real, real.copy()) == pytest.approx(0.0, abs=1e-7)  # round-off of ~0.1 traces
    fd = frechet_distance_features(real, fake)
    assert fd > 1e-3 and fd == pytest.approx(scipy_frechet(real, fake), rel=1e-6)


def test_official_facebookresearch_state_dict_loads_with_dinov2s_position_resampling(tmp_path, tiny_weights):
    """The official checkpoints hold a 37 x 37 position grid (518 px), a mask token, and for ViT-g w12/w3 names."""
    state = tiny_state(seed=3, img_size=518)
    official = {"mask_token": torch.zeros(1, 32), **state}
    official["blocks.0.mlp.w12.weight"] = official.pop("blocks.0.mlp.fc1.weight")
    path = tmp_path / "dinov2_official.pth"
    torch.save(official, path)
    loaded = DINOv2Features(weights_path=str(path), model_name=TINY).net.state_dict()
    grid = state["pos_embed"][:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2)  # what DINOv2 computes at 224 px
    resampled = nn.functional.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic")
    expected = torch.cat([state["pos_embed"][:, :1], resampled.permute(0, 2, 3, 1).reshape(1, 256, 32)], 1)
    torch.testing.assert_close(loaded["pos_embed"], expected)
    torch.testing.assert_close(loaded["blocks.0.mlp.fc1.weight"], state["blocks.0.mlp.fc1.weight"])
    assert "mask_token" not in loaded


def test_timm_hub_safetensors_file_gives_the_same_extractor(tmp_path, tiny_weights):
    import safetensors.torch

    safetensors.torch.save_file(tiny_state(seed=0), tmp_path / "model.safetensors")
    from_safetensors = DINOv2Features(weights_path=str(tmp_path / "model.safetensors"), model_name=TINY)
    assert from_safetensors.name == DINOv2Features(weights_path=str(tiny_weights), model_name=TINY).name


def test_weights_errors_name_the_key_and_list_the_mismatch(tmp_path, tiny_weights):
    with pytest.raises(FileNotFoundError, match="eval.dinov2.weights_path"):
        DINOv2Features(weights_path=str(tmp_path / "missing.pth"), model_name=TINY)
    state = tiny_state(seed=0)
    state["blocks.1.attn.qkv_renamed.weight"] = state.pop("blocks.1.attn.qkv.weight")
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="missing blocks.1.attn.qkv.weight; unexpected blocks.1.attn.qkv_renamed"
                                          ".weight; shapes none.*eval.dinov2.weights_path") as raised:
        DINOv2Features(weights_path=str(tmp_path / "other.pth"), model_name=TINY)
    assert "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match="shapes blocks.0.attn.proj.bias"):  # ViT-S/14 is wider than these weights
        DINOv2Features(weights_path=str(tiny_weights), model_name="vit_small_patch14_dinov2")
    with pytest.raises(ConfigError, match="eval.dinov2.model_name"):
        DINOv2Features(weights_path=str(tiny_weights), model_name="no_such_vit")


def test_config_node_with_a_null_weights_path_builds_nothing(tiny_weights):
    node = {"_target_": "ldm.eval.dinov2.dinov2_features", "weights_path": None, "model_name": TINY}
    assert safe_instantiate(node) is None  # FD_DINOv2 skipped
    assert isinstance(safe_instantiate({**node, "weights_path": str(tiny_weights)}), DINOv2Features)


def test_suite_scores_fd_dinov2_from_cached_statistics_keyed_by_the_weights(tmp_path, tiny_weights, monkeypatch):
    reference = write_folder(shapes_images(12, num_objects=1, seed=1), tmp_path / "reference")
    prompts = str(write_prompts(tmp_path / "prompts.txt", 12))
    computed = []
    extract = reference_suite.extract_features
    monkeypatch.setattr(reference_suite, "extract_features",
                        lambda net, *a: computed.append(net.name) or extract(net, *a))

    def suite(dinov2):
        return ReferenceSuite(prompts_file=prompts, reference_dir=str(reference), inception=ChannelStats(),
                              dinov2=dinov2, stats_dir=str(tmp_path / "stats"), num_samples=12, resolution=32,
                              kid_subsets=2, is_splits=2)

    dino = DINOv2Features(weights_path=str(tiny_weights), model_name=TINY)
    samples = shapes_images(12, num_objects=2, seed=2)
    first = suite(dino)
    score = first.score(samples)
    ref_feats = first.reference_stats(dino).features.astype(np.float64)
    assert score["fd_dinov2"] == pytest.approx(scipy_frechet(dino(samples).double().numpy(), ref_feats), rel=1e-5)
    protocol = first.protocol()
    assert protocol["extractor_dinov2"] == dino.name and protocol["resize_dinov2"] == "pil-bicubic-224-imagenet-norm"
    assert "fd_dinov2" in first.floor()
    reference_passes = computed.count(dino.name) - 1  # one pass over the samples in score()
    assert reference_passes == 1

    computed.clear()
    suite(dino).reference_stats(dino)  # a new run, same weights and images: from the cache
    assert computed == []
    torch.save(tiny_state(seed=5), tmp_path / "retrained.pth")
    other = DINOv2Features(weights_path=str(tmp_path / "retrained.pth"), model_name=TINY)
    assert other.name != dino.name
    suite(other).reference_stats(other)  # other weights: recomputed, into a file of their own
    assert computed == [other.name] and len(list((tmp_path / "stats").glob("reference-*.npz"))) == 3

    skipped = suite(None)  # eval.dinov2.weights_path=null
    assert "fd_dinov2" not in skipped.score(samples)
    assert skipped.protocol()["extractor_dinov2"] == "none" and skipped.protocol()["resize_dinov2"] == "none"
