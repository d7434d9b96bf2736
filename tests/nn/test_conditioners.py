"""Conditioners: offline tokenizer, encode/null shapes and values, CFG dropout, OpenCLIP weight loading."""

import time
from pathlib import Path

import huggingface_hub.constants
import open_clip
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.diffusion.guidance import cfg_dropout
from ldm.nn.conditioners import (
    ClassConditioner,
    OpenCLIPTextConditioner,
    TextTransformerConditioner,
    Unconditional,
)

CONDITIONER_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model" / "conditioner"
CAPTIONS = ["a red square", "two blue circles at the top left", ""]


def test_tokenizer_and_joint_text_encoder_work_offline(no_network):
    torch.manual_seed(0)
    cond = TextTransformerConditioner(width=32, layers=2, heads=2, context_length=16)
    tokens = cond.tokenizer(CAPTIONS)
    assert tokens.shape == (3, 16)
    assert (tokens[:, 0] == cond.tokenizer.sot_token_id).all()
    assert tokens[2, 1] == cond.tokenizer.eot_token_id  # empty caption: start, end, padding
    out = cond.encode({"caption": CAPTIONS, "label": torch.zeros(3)})
    assert out["context"].shape == (3, 16, 32) and out["y"] is None
    assert cond.dims == {"context_dim": 32, "y_dim": None}
    assert not torch.allclose(out["context"][0], out["context"][1])


def test_joint_text_encoder_pooled_null_and_gradients():
    torch.manual_seed(0)
    cond = TextTransformerConditioner(width=32, layers=2, heads=2, context_length=16, pooled=True)
    out = cond.encode({"caption": CAPTIONS})
    assert out["y"].shape == (3, 32) and cond.dims == {"context_dim": 32, "y_dim": 32}
    eot = cond.tokenizer(CAPTIONS).argmax(dim=-1)
    torch.testing.assert_close(out["y"], out["context"][torch.arange(3), eot])
    null = cond.null(3)
    empty = cond.encode({"caption": [""] * 3})
    for key in ("context", "y"):
        torch.testing.assert_close(null[key], empty[key])
    torch.testing.assert_close(null["context"][0], out["context"][2])
    (out["context"].square().mean() + out["y"].square().mean()).backward()
    assert cond.token_embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in cond.blocks.parameters())
    with pytest.raises(ValueError, match="caption"):
        cond.encode({"label": torch.zeros(3)})


def test_class_conditioner_encode_null_and_bad_labels():
    torch.manual_seed(0)
    cond = ClassConditioner(num_classes=5, dim=8, as_context=True)
    out = cond.encode({"label": torch.tensor([0, 4, 4]), "caption": ["x"] * 3})
    assert out["y"].shape == (3, 8) and out["context"].shape == (3, 1, 8)
    torch.testing.assert_close(out["y"][1], out["y"][2])
    torch.testing.assert_close(out["context"][:, 0], out["y"])
    null = cond.null(2)
    torch.testing.assert_close(null["y"], cond.embedding.table.weight[5].expand(2, 8))
    assert cond.dims == {"context_dim": 8, "y_dim": 8}
    assert ClassConditioner(num_classes=5, dim=8).dims == {"context_dim": None, "y_dim": 8}
    for bad in ([-1, 0], [5, 0]):
        with pytest.raises(ValueError, match="label"):
            cond.encode({"label": torch.tensor(bad)})


def test_unconditional():
    cond = Unconditional()
    assert cond.encode({"caption": ["a"]}) == {"context": None, "y": None}
    assert cond.null(4) == {"context": None, "y": None}
    assert cfg_dropout(cond({"caption": ["a"]}), cond.null(1), 0.5) == {"context": None, "y": None}
    assert cond.dims == {"context_dim": None, "y_dim": None}


def test_cfg_dropout_rate_is_p_and_per_sample():
    cond = ClassConditioner(num_classes=3, dim=4, as_context=True)
    batch_size, p = 20000, 0.1
    encoded = cond.encode({"label": torch.arange(batch_size) % 3})
    null = cond.null(batch_size)
    out = cfg_dropout(encoded, null, p, generator=torch.Generator().manual_seed(0))
    dropped = (out["y"] == null["y"]).all(dim=-1)
    kept = (out["y"] == encoded["y"]).all(dim=-1)
    assert (dropped | kept).all()  # every sample is either its own condition or the null one
    assert dropped.float().mean().item() == pytest.approx(p, abs=0.01)
    assert torch.equal((out["context"][:, 0] == null["context"][:, 0]).all(dim=-1), dropped)  # y, context together
    again = cfg_dropout(encoded, null, p, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["y"], out["y"])  # reproducible from the generator
    assert torch.equal(cfg_dropout(encoded, null, 0.0)["y"], encoded["y"])
    assert torch.equal(cfg_dropout(encoded, null, 1.0)["y"], null["y"])
    with pytest.raises(ValueError):
        cfg_dropout(encoded, null, 1.5)


def test_cfg_dropout_with_text_null():
    torch.manual_seed(0)
    cond = TextTransformerConditioner(width=32, layers=1, heads=2, context_length=8)
    batch = {"caption": ["a red square"] * 64}
    out = cfg_dropout(cond(batch), cond.null(64), 0.5, generator=torch.Generator().manual_seed(1))
    null_row = cond.null(1)["context"][0]
    is_null = torch.tensor([torch.allclose(row, null_row) for row in out["context"]])
    assert 0 < is_null.sum() < 64
    assert torch.equal(cond(batch)["context"], cond.encode(batch)["context"])


def test_openclip_hub_tag_offline_fails_fast_naming_config_key(no_network, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"model\.conditioner\.pretrained.*local"):
        OpenCLIPTextConditioner(model_name="ViT-H-14", pretrained="laion2b_s32b_b79k")
    assert time.monotonic() - start < 10
    with pytest.raises(ValueError, match=r"model\.conditioner\.pretrained"):
        OpenCLIPTextConditioner(model_name="ViT-H-14", pretrained="no-such-tag")


def test_openclip_random_tower_shapes_null_and_frozen(tiny_clip, no_network):
    torch.manual_seed(0)
    cond = OpenCLIPTextConditioner(model_name=tiny_clip, pretrained=None, pooled=True)
    out = cond.encode({"caption": CAPTIONS})
    assert out["context"].shape == (3, 77, 32) and out["y"].shape == (3, 16)
    assert cond.dims == {"context_dim": 32, "y_dim": 16}
    assert not hasattr(cond.model, "visual")
    torch.testing.assert_close(cond.null(2)["context"], cond.encode({"caption": ["", ""]})["context"])
    assert not out["context"].requires_grad and not any(p.requires_grad for p in cond.parameters())
    cond.train()
    assert not cond.model.training
    last = OpenCLIPTextConditioner(model_name=tiny_clip, pretrained=None, layer="last")
    last.model.load_state_dict(cond.model.state_dict())
    assert not torch.allclose(last.encode({"caption": CAPTIONS})["context"], out["context"])


def test_openclip_local_weights_file_gives_identical_outputs(tiny_clip, tmp_path, no_network):
    torch.manual_seed(0)
    source = OpenCLIPTextConditioner(model_name=tiny_clip, pretrained=None)
    text_only = tmp_path / "text.pt"
    torch.save(source.model.state_dict(), text_only)
    loaded = OpenCLIPTextConditioner(model_name=tiny_clip, pretrained=str(text_only))
    batch = {"caption": CAPTIONS}
    torch.testing.assert_close(loaded.encode(batch)["context"], source.encode(batch)["context"], rtol=0, atol=0)

    full_clip = open_clip.create_model(tiny_clip, pretrained=None)  # a full checkpoint, image tower included
    full = tmp_path / "full.pt"
    torch.save(full_clip.state_dict(), full)
    from_full = OpenCLIPTextConditioner(model_name=tiny_clip, pretrained=str(full))
    torch.testing.assert_close(from_full.model.token_embedding.weight, full_clip.token_embedding.weight)

    wrong = tmp_path / "wrong.pt"
    torch.save({"token_embedding.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match=r"model\.conditioner\.pretrained"):
        OpenCLIPTextConditioner(model_name=tiny_clip, pretrained=str(wrong))


@pytest.mark.parametrize("name, overrides", [
    ("text_joint", {"width": 32, "layers": 1, "heads": 2, "context_length": 8}),
    ("class", {"num_classes": 4, "dim": 8}),
    ("uncond", {}),
])
def test_conditioner_configs_instantiate(name, overrides):
    cfg = OmegaConf.load(CONDITIONER_CONFIGS / f"{name}.yaml")
    cfg.merge_with(overrides)
    cond = instantiate(cfg)
    assert set(cond.dims) == {"context_dim", "y_dim"}
    assert set(cond.null(2)) == {"context", "y"}


def test_openclip_config_targets_sd2_text_encoder():
    cfg = OmegaConf.load(CONDITIONER_CONFIGS / "text_openclip.yaml")
    assert cfg.model_name == "ViT-H-14" and cfg.layer == "penultimate"
    assert open_clip.get_pretrained_cfg(cfg.model_name, cfg.pretrained)  # a real open_clip tag


def test_joint_text_encoder_vocabulary_keeps_only_its_rows_and_same_maths():
    """A vocabulary maps the same captions to a 7-row table (4 words + start, end, padding); with those rows copied
    from the full table the encoder is the same function, and other words are refused in one line."""
    torch.manual_seed(0)
    full = TextTransformerConditioner(width=32, layers=1, heads=2, context_length=8, pooled=True)
    small = TextTransformerConditioner(width=32, layers=1, heads=2, context_length=8, pooled=True,
                                       vocabulary=["a", "red", "blue", "square"])
    assert small.token_embedding.num_embeddings == 7 and full.token_embedding.num_embeddings == 49408
    kept = (small.rows >= 0).nonzero().squeeze(1)
    assert kept.tolist() == sorted(kept.tolist()) and small.rows[kept].tolist() == list(range(7))
    state = full.state_dict()
    state["token_embedding.weight"] = state["token_embedding.weight"][kept]
    small.load_state_dict(state)
    captions = ["a red square", "a blue square", ""]
    for key, value in small.encode({"caption": captions}).items():
        torch.testing.assert_close(value, full.encode({"caption": captions})[key])
    with pytest.raises(ValueError, match=r"outside model.conditioner.vocabulary: \['circle', 'green'\]"):
        small.encode({"caption": ["a green circle", "a red square"]})
    with pytest.raises(ValueError, match="list of words"):
        TextTransformerConditioner(width=32, layers=1, heads=2, vocabulary="a red square")
