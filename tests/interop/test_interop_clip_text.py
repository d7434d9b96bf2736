"""CLIP text encoders: our conditioner equals transformers' CLIPTextModel, tokenizer folders equal open_clip's ids,
tensors survive both layouts unchanged, SD 2.x's penultimate layer equals a one-layer-shorter CLIPTextModel."""

import json

import open_clip
import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.interop.clip_text import (
    SD1_PAD_TOKEN_ID,
    SD1_TEXT_CONFIG,
    TRANSFORMERS_IGNORE,
    _USED,
    clip_text_keymap,
    clip_token,
    not_in_transformers,
    open_clip_text_encoder,
    read_clip_tokenizer,
    text_encoder_from_transformers_config,
    text_encoder_to_transformers_config,
    transformers_text_names,
    transformers_text_state,
    write_clip_tokenizer,
)
from ldm.interop.files import read_json
from ldm.interop.keymap import to_ours, to_theirs
from ldm.nn.conditioners import OpenCLIPTextConditioner
from ldm.utils.errors import ConfigError

CAPTIONS = [
    "a photo of a cat, sitting on a mat.",
    "Café naïve 日本語 🐱 Ünïcödé: (1/2) -- 3.14; don't won't they're",
    "  lots   of\twhitespace\n here ",
    "",
    "word " * 100,  # truncated to 77 tokens, ending with <|endoftext|>
]
PADS = {"eot": "<|endoftext|>", "bang": "!"}


def tiny_config(act: str, layers: int = 3) -> dict:
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 2,
            "max_position_embeddings": 77, "hidden_act": act, "layer_norm_eps": 1e-5}


def clip_text_model(config: dict, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**config)).eval()


def our_shapes(cond) -> dict:
    return {n: t.shape for n, t in cond.state_dict().items()}


def import_transformers(model: CLIPTextModel, config: dict, pad_token_id: int):
    cfg = text_encoder_from_transformers_config(config, pad_token_id=pad_token_id, model_max_length=77)
    cond = instantiate(cfg)
    theirs = transformers_text_names(model.state_dict())  # transformers >= 5 names have no "text_model."
    cond.load_state_dict(to_ours(theirs, clip_text_keymap(cfg, "transformers"), our_shapes(cond), what="text encoder",
                                 ignore=TRANSFORMERS_IGNORE))
    return cfg, cond


def export_transformers(cond, cfg: dict, folder) -> CLIPTextModel:
    folder.mkdir()
    save_file(transformers_text_state(cond.state_dict(), cfg), folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(text_encoder_to_transformers_config(cfg)))
    return CLIPTextModel.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict:
    dirs = {}
    for name, pad in PADS.items():
        dirs[name] = tmp_path_factory.mktemp(f"tokenizer_{name}")
        write_clip_tokenizer(dirs[name], pad_token=pad)
    return dirs


def hf_ids(folder, captions: list[str]) -> torch.Tensor:
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@pytest.mark.parametrize("pad", PADS)
def test_tokenizer_folder_gives_open_clip_ids(tokenizer_dirs, pad):
    folder = tokenizer_dirs[pad]
    info = read_clip_tokenizer(folder)
    pad_id = info["pad_token_id"]
    assert info == {"pad_token": PADS[pad], "pad_token_id": {"eot": 49407, "bang": 0}[pad], "model_max_length": 77}
    assert clip_token(pad_id) == PADS[pad]
    ours = OpenCLIPTextConditioner(model_name=None, pretrained=None, layer="last", activation="gelu",
                                   text_cfg={"width": 8, "heads": 2, "layers": 1}, pad_token_id=pad_id)
    ids = hf_ids(folder, CAPTIONS)
    assert torch.equal(ids, ours._tokenize(CAPTIONS))
    assert ids[4, -1] == 49407 and (ids[3, 2:] == pad_id).all()
    expected = open_clip.get_tokenizer("ViT-H-14")(CAPTIONS)  # open_clip's ids, then our padding after the end
    for row, n in zip(expected, [len(open_clip.tokenize(c)[0].nonzero()) for c in CAPTIONS]):
        row[n:] = pad_id
    assert torch.equal(ids, expected)

    # Documented differences: transformers matches the pad token "!" inside captions and skips ftfy/HTML fixes.
    bang = hf_ids(folder, ["wow!"])[0, :4].tolist()
    assert bang == ([49406, 2781, 256, 49407] if pad == "eot" else [49406, 2781, 0, 49407])
    assert ours._tokenize(["wow!"])[0, :4].tolist() == [49406, 2781, 256, 49407]
    assert not torch.equal(hf_ids(folder, ["a &amp; b"]), ours._tokenize(["a &amp; b"]))


@pytest.mark.parametrize("act, pad", [("quick_gelu", "eot"), ("gelu", "bang")])
def test_context_equals_clip_text_model_and_round_trips(tokenizer_dirs, act, pad, tmp_path):
    config = tiny_config(act)
    model = clip_text_model(config)
    cfg, cond = import_transformers(model, config, read_clip_tokenizer(tokenizer_dirs[pad])["pad_token_id"])
    assert cfg["activation"] == act and cfg["layer"] == "last" and cond.dims == {"context_dim": 32, "y_dim": None}
    with torch.no_grad():
        expected = model(hf_ids(tokenizer_dirs[pad], CAPTIONS)).last_hidden_state
    context = cond.encode({"caption": CAPTIONS})["context"]
    torch.testing.assert_close(context, expected, rtol=0, atol=1e-5)

    # ours -> transformers: the same tensors under the names SD folders use, and a config that rebuilds the model
    theirs = to_theirs(cond.state_dict(), clip_text_keymap(cfg, "transformers"), what="text encoder")
    original = transformers_text_names(model.state_dict())
    assert set(theirs) == set(original) - set(TRANSFORMERS_IGNORE)
    assert all(torch.equal(theirs[n], original[n]) for n in theirs)
    exported = text_encoder_to_transformers_config(cfg)
    assert {k: exported[k] for k in config} == config
    assert exported["pad_token_id"] == cond.pad_token_id
    reloaded = export_transformers(cond, cfg, tmp_path / "text_encoder")
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in reloaded.state_dict().items())


def test_open_clip_layout_round_trip_is_identical(tiny_clip):
    for cfg, extras in ((open_clip_text_encoder(tiny_clip, layer="penultimate"), {"text_projection", "logit_scale"}),
                        (text_encoder_from_transformers_config(tiny_config("gelu"), pad_token_id=0), set())):
        torch.manual_seed(0)
        cond = instantiate(cfg)
        keymap = clip_text_keymap(cfg, "open_clip")
        theirs = to_theirs(cond.state_dict(), keymap, what="text encoder")
        assert {"token_embedding.weight", "positional_embedding", "transformer.resblocks.2.mlp.c_proj.bias"} \
            <= set(theirs)
        assert {"text_projection", "logit_scale"} & set(theirs) == extras  # nothing invented for a bare tower
        back = to_ours(theirs, keymap, our_shapes(cond), what="text encoder")
        assert back.keys() == cond.state_dict().keys()
        assert all(torch.equal(back[n], t) for n, t in cond.state_dict().items())


def test_sd2_penultimate_equals_one_layer_shorter_clip_text_model(tiny_clip, tokenizer_dirs, tmp_path):
    cfg = open_clip_text_encoder(tiny_clip, layer="penultimate", pad_token_id=0)  # as an SD 2.x single file
    torch.manual_seed(0)
    cond = instantiate(cfg)
    assert set(not_in_transformers(cfg)) == {"model.text_projection", "model.logit_scale",
                                             *(f"model.transformer.resblocks.2.{n}" for n in (
                                                 "ln_1.weight", "ln_1.bias", "attn.in_proj_weight",
                                                 "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
                                                 "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                                                 "mlp.c_proj.weight", "mlp.c_proj.bias"))}
    config = text_encoder_to_transformers_config(cfg)
    assert config["num_hidden_layers"] == 2 and config["hidden_act"] == "gelu"  # as diffusers' 23 of ViT-H's 24
    model = export_transformers(cond, cfg, tmp_path / "text_encoder")
    context = cond.encode({"caption": CAPTIONS})["context"]
    with torch.no_grad():
        expected = model(hf_ids(tokenizer_dirs["bang"], CAPTIONS)).last_hidden_state
    torch.testing.assert_close(context, expected, rtol=0, atol=1e-5)
    # a diffusers SD 2.x folder imports as the shorter tower read at its last layer: the same context
    folder_cfg, imported = import_transformers(model, read_json(tmp_path / "text_encoder" / "config.json"), 0)
    assert folder_cfg["text_cfg"]["layers"] == 2 and folder_cfg["layer"] == "last"
    torch.testing.assert_close(imported.encode({"caption": CAPTIONS})["context"], context, rtol=0, atol=1e-6)
    # the open_clip file's projection and logit scale have no place in that tower: an error, not dropped
    sd2_file = to_theirs(cond.state_dict(), clip_text_keymap(cfg, "open_clip"), what="text encoder")
    unknown = r"unknown in the source \(14\): logit_scale, text_projection, transformer.resblocks.2"
    with pytest.raises(ConfigError, match=unknown):
        to_ours(sd2_file, clip_text_keymap(folder_cfg, "open_clip"), our_shapes(imported), what="text encoder")


def test_bad_tensors_are_listed():
    config = tiny_config("quick_gelu")
    cfg = text_encoder_from_transformers_config(config, pad_token_id=SD1_PAD_TOKEN_ID)
    cond = instantiate(cfg)
    theirs = transformers_text_names(clip_text_model(config).state_dict())
    del theirs["text_model.encoder.layers.1.self_attn.k_proj.bias"]
    theirs["text_model.extra.weight"] = torch.zeros(1)
    theirs["text_model.final_layer_norm.weight"] = torch.zeros(33)
    with pytest.raises(ConfigError) as error:
        to_ours(theirs, clip_text_keymap(cfg, "transformers"), our_shapes(cond), what="text encoder")
    message = str(error.value)
    for name in ("layers.1.self_attn.k_proj.bias", "text_model.extra.weight", "final_layer_norm.weight (33,)"):
        assert name in message
    with pytest.raises(ConfigError, match="layers.0"):  # a transformers >= 5 and a legacy name together
        transformers_text_names({"text_model.a": torch.zeros(1), "encoder.layers.0.b": torch.zeros(1)})


@pytest.mark.parametrize("change, match", [
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"layer_norm_eps": 1e-6}, "layer_norm_eps"),
    ({"architectures": ["CLIPTextModelWithProjection"]}, "architectures"),
    ({"vocab_size": 49409}, "vocab_size"),
    ({"rope_theta": 1.0}, "rope_theta"),
    ({"hidden_size": 31}, "num_attention_heads"),
])
def test_unsupported_transformers_configs_name_the_key(change, match):
    with pytest.raises(ConfigError, match=match):
        text_encoder_from_transformers_config(tiny_config("gelu") | change, pad_token_id=0)


def test_config_defaults_sd1_and_export_errors(tiny_clip):
    defaults = CLIPTextConfig().to_dict()
    assert {k: defaults[k] for k in _USED} == _USED  # our table of CLIPTextConfig's defaults is true
    assert text_encoder_from_transformers_config(defaults, pad_token_id=0)["text_cfg"]["layers"] == 12
    sd1 = text_encoder_from_transformers_config(SD1_TEXT_CONFIG, pad_token_id=SD1_PAD_TOKEN_ID)
    assert sd1["text_cfg"] == {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12,
                               "mlp_ratio": 4.0}
    assert sd1["activation"] == "quick_gelu" and sd1["pad_token_id"] == 49407
    sd2 = text_encoder_to_transformers_config(open_clip_text_encoder())  # ViT-H-14 at its penultimate layer
    assert (sd2["num_hidden_layers"], sd2["hidden_size"], sd2["intermediate_size"], sd2["hidden_act"]) == \
           (23, 1024, 4096, "gelu")
    with pytest.raises(ConfigError, match="model_max_length"):
        text_encoder_from_transformers_config(SD1_TEXT_CONFIG, pad_token_id=0, model_max_length=64)
    with pytest.raises(ConfigError, match="pooled"):
        text_encoder_to_transformers_config(open_clip_text_encoder(tiny_clip) | {"pooled": True})
    with pytest.raises(ConfigError, match="layout"):
        clip_text_keymap(sd1, "diffusers")


def test_read_clip_tokenizer_accepts_transformers5_folders_and_refuses_others(tokenizer_dirs, tmp_path):
    saved = tmp_path / "saved"  # transformers >= 5 writes tokenizer.json instead of vocab.json and merges.txt
    CLIPTokenizer.from_pretrained(tokenizer_dirs["bang"]).save_pretrained(saved)
    assert not (saved / "vocab.json").exists()
    assert read_clip_tokenizer(saved)["pad_token_id"] == 0
    added = tmp_path / "added"
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dirs["eot"])
    tokenizer.add_tokens(["<cat-toy>"])
    tokenizer.save_pretrained(added)
    with pytest.raises(ConfigError, match="added tokens"):
        read_clip_tokenizer(added)
    broken = tmp_path / "broken"
    write_clip_tokenizer(broken, pad_token="!")
    (broken / "merges.txt").write_text("#version: 0.2\ni n\n")
    with pytest.raises(ConfigError, match="not CLIP's BPE"):
        read_clip_tokenizer(broken)
    with pytest.raises(ConfigError, match="pad_token"):
        write_clip_tokenizer(tmp_path / "x", pad_token="<pad>")


def test_conditioner_tower_arguments_are_checked(tiny_clip):
    sizes = {"width": 8, "heads": 2, "layers": 1}
    with pytest.raises(ValueError, match="exactly one"):
        OpenCLIPTextConditioner(model_name=tiny_clip, pretrained=None, text_cfg=sizes, activation="gelu")
    with pytest.raises(ValueError, match="text_cfg: unknown keys"):
        OpenCLIPTextConditioner(model_name=None, pretrained=None, text_cfg=sizes | {"ls_init_value": 1.0},
                                activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        OpenCLIPTextConditioner(model_name=None, pretrained=None, text_cfg=sizes)
    with pytest.raises(ValueError, match="activation"):
        OpenCLIPTextConditioner(model_name=tiny_clip, pretrained=None, activation="gelu")
    cond = OpenCLIPTextConditioner(model_name=None, pretrained=None, text_cfg=sizes, activation="gelu",
                                   pooled=True, layer="last", pad_token_id=49407)
    assert not hasattr(cond.model, "text_projection") or cond.model.text_projection is None
    out = cond.encode({"caption": ["a cat", "two dogs on a sofa"]})  # pooled = the first end-of-text token
    eot = cond._tokenize(["a cat", "two dogs on a sofa"]).eq(49407).int().argmax(1)
    torch.testing.assert_close(out["y"], out["context"][torch.arange(2), eot])
