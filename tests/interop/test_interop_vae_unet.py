"""Autoencoder and UNet interop: configs and key maps against diffusers' AutoencoderKL / UNet2DConditionModel and the
original single-file (LDM) names, with tiny random-initialised models (offline)."""

import json

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from ldm.interop.single_file import split_single_file
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.interop.keymap import to_ours, to_theirs
from ldm.interop.unet import unet_from_diffusers_config, unet_from_single_file, unet_keymap, unet_to_diffusers_config
from ldm.interop.vae import vae_from_diffusers_config, vae_from_single_file, vae_keymap, vae_to_diffusers_config
from ldm.nn.autoencoder import AutoencoderKL
from ldm.nn.unet import UNet
from ldm.utils.errors import ConfigError
from tiny_sizes import ROOT


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- tiny diffusers models ---------------------------------------------------------------------------------------

TINY_VAES = {
    # one width: our group_norm() gives 8 groups at 32 channels, as norm_num_groups=8 does everywhere
    "plain": dict(block_out_channels=(32, 32), norm_num_groups=8, layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    "attention": dict(block_out_channels=(32, 32), norm_num_groups=8, layers_per_block=2,
                      down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D"),
                      up_block_types=("UpDecoderBlock2D", "AttnUpDecoderBlock2D")),
    # widths that change (skip convs); 32 groups from 128 channels up, as in SD
    "widening": dict(block_out_channels=(128, 256), norm_num_groups=32, layers_per_block=1, latent_channels=3,
                     down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
}
_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=24, sample_size=16)
TINY_UNETS = {
    # SD 1.x style: 2 heads everywhere, proj_in/out as 1x1 convs, no attention at the lowest level
    "sd1": dict(_UNET, attention_head_dim=2, use_linear_projection=False,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SD 2.x style: 16 channels per head (2 then 4 heads), linear proj_in/out, two transformer blocks
    "sd2": dict(_UNET, attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2),
}


def _diffusers_vae(name: str) -> DiffusersVAE:
    torch.manual_seed(0)
    return DiffusersVAE(**TINY_VAES[name]).eval()


def _diffusers_unet(name: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNETS[name]).eval()


def _build(cls: type, cfg: dict) -> torch.nn.Module:
    return cls(**{k: v for k, v in cfg.items() if k != "_target_"})


def _from_folder(cls: type, config: dict, state: dict, folder) -> torch.nn.Module:
    """What diffusers' from_pretrained builds from a folder holding this config.json and these tensors."""
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    return cls.from_pretrained(folder)


def _shapes(module: torch.nn.Module) -> dict:
    return {k: v.shape for k, v in module.state_dict().items()}


def _assert_identical(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape and torch.equal(got[k], want[k]), k


def _import_vae(theirs: DiffusersVAE) -> tuple[dict, AutoencoderKL]:
    cfg, _ = vae_from_diffusers_config(dict(theirs.config))
    ours = instantiate(cfg).eval()
    ours.load_state_dict(to_ours(theirs.state_dict(), vae_keymap(cfg, "diffusers"), _shapes(ours), what="vae"))
    return cfg, ours


def _import_unet(theirs: UNet2DConditionModel) -> tuple[dict, UNet]:
    cfg = unet_from_diffusers_config(dict(theirs.config))
    ours = instantiate(cfg).eval()
    ours.load_state_dict(to_ours(theirs.state_dict(), unet_keymap(cfg, "diffusers"), _shapes(ours), what="unet"))
    return cfg, ours


# --- autoencoder -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TINY_VAES))
def test_vae_matches_diffusers_and_round_trips(name, tmp_path):
    theirs = _diffusers_vae(name)
    cfg, ours = _import_vae(theirs)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, cfg["embed_dim"], 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = theirs.encode(x).latent_dist, ours.encode(x)
        torch.testing.assert_close(got.mean, want.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.logvar, want.logvar, atol=1e-5, rtol=0)
        decoded = ours.decode(z)
        torch.testing.assert_close(decoded, theirs.decode(z).sample, atol=1e-5, rtol=0)
    assert decoded.std() > 0.01  # not a trivially zero network

    back = to_theirs(ours.state_dict(), vae_keymap(cfg, "diffusers"), what="vae")
    _assert_identical(back, theirs.state_dict())
    exported = vae_to_diffusers_config(cfg, 0.18215)
    rebuilt = DiffusersVAE.from_config(exported)
    rebuilt.load_state_dict(back, strict=True)
    assert vae_from_diffusers_config(exported) == (cfg, 0.18215)
    _assert_identical(_from_folder(DiffusersVAE, exported, back, tmp_path).state_dict(), back)


@pytest.mark.parametrize("name", sorted(TINY_VAES))
def test_vae_single_file_round_trip_and_diffusers_converter(name):
    theirs = _diffusers_vae(name)
    cfg, ours = _import_vae(theirs)
    single = to_theirs(ours.state_dict(), vae_keymap(cfg, "single_file"), what="vae")
    assert "encoder.down.0.block.0.conv1.weight" in single and "decoder.up.1.upsample.conv.weight" in single
    assert vae_from_single_file(single) == cfg
    _assert_identical(to_ours(single, vae_keymap(cfg, "single_file"), _shapes(ours), what="vae"), ours.state_dict())
    if cfg["attn_levels"]:
        return  # diffusers' converter drops attention outside the middle block: nothing to compare
    # diffusers' own LDM converter (offline: it only renames) reads our single-file names back into its model
    converted = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in single.items()},
                                           dict(theirs.config))
    _assert_identical(converted, theirs.state_dict())


SD_VAE_CONFIG = {  # Stable Diffusion 1.x / 2.x vae/config.json as published (diffusers 0.6 era: few keys)
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def test_sd_vae_config_is_our_kl_f8_and_maps_all_248_tensors():
    cfg, scale = vae_from_diffusers_config(SD_VAE_CONFIG)
    want = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/model/autoencoder/kl_f8.yaml"))
    assert cfg == {k: v for k, v in want.items() if k != "scaling_factor"}  # returned separately
    assert scale == 0.18215
    with torch.device("meta"):  # full size without allocating memory
        theirs, ours = DiffusersVAE.from_config(SD_VAE_CONFIG), _build(AutoencoderKL, cfg)
    assert len(theirs.state_dict()) == 248
    mapped = to_ours(theirs.state_dict(), vae_keymap(cfg, "diffusers"), _shapes(ours), what="vae")
    assert len(mapped) == len(_shapes(ours))
    assert vae_to_diffusers_config(cfg, scale)["block_out_channels"] == SD_VAE_CONFIG["block_out_channels"]


@pytest.mark.parametrize("setting, value", [
    ("act_fn", "gelu"), ("use_quant_conv", False), ("use_post_quant_conv", False), ("mid_block_add_attention", False),
    ("latents_mean", [0.0] * 4), ("shift_factor", 0.1), ("norm_num_groups", 16), ("out_channels", 1),
    ("down_block_types", ["DownEncoderBlock2D", "SomeOtherBlock2D"]), ("some_new_option", 1),
])
def test_vae_config_rejects_unsupported_settings(setting, value):
    config = dict(_diffusers_vae("plain").config) | {setting: value}
    with pytest.raises(ConfigError, match=setting):
        vae_from_diffusers_config(config)


def test_vae_config_rejects_group_counts_our_norm_cannot_express():
    # 32 then 64 channels: our group_norm() gives 8 and 16 groups, diffusers one count for all
    with pytest.raises(ConfigError, match="norm_num_groups"):
        vae_from_diffusers_config(dict(TINY_VAES["plain"], block_out_channels=(32, 64)))
    ours = {"_target_": "ldm.nn.autoencoder.AutoencoderKL", "ch": 32, "ch_mult": [1, 2]}
    with pytest.raises(ConfigError, match="group"):
        vae_to_diffusers_config(ours, 0.18215)
    with pytest.raises(ConfigError, match="embed_dim"):
        vae_to_diffusers_config({"ch": 128, "ch_mult": [1], "z_channels": 4, "embed_dim": 8}, 0.18215)


def _assert_bad_tensors_listed(theirs, imported, keymap, what: str, unknown: str, missing: str, misshaped: tuple):
    """A state with an unknown, a missing and a mis-shaped tensor: the import's one error names all three."""
    cfg, ours = imported
    state = dict(theirs.state_dict())
    state[unknown] = torch.zeros(1)
    del state[missing]
    state[misshaped[0]] = torch.zeros(misshaped[1])
    with pytest.raises(ConfigError) as err:
        to_ours(state, keymap(cfg, "diffusers"), _shapes(ours), what=what)
    for name in (unknown, missing, misshaped[0]):
        assert name in str(err.value)


def test_vae_bad_tensors_are_listed():
    theirs = _diffusers_vae("plain")
    _assert_bad_tensors_listed(theirs, _import_vae(theirs), vae_keymap, "vae", "encoder.extra.weight",
                               "decoder.conv_out.bias", ("quant_conv.weight", (8, 8, 3, 3)))


# --- UNet --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TINY_UNETS))
def test_unet_matches_diffusers_and_round_trips(name, tmp_path):
    theirs = _diffusers_unet(name)
    cfg, ours = _import_unet(theirs)
    assert (cfg["num_heads"], cfg["head_dim"]) == ((2, None) if name == "sd1" else (None, 16))
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 7, 24, generator=g)
    t = torch.tensor([0.0, 37.0, 999.0])
    with torch.no_grad():
        got = ours(x, t, context)
        torch.testing.assert_close(got, theirs(x, t, encoder_hidden_states=context).sample, atol=1e-5, rtol=0)
    assert got.std() > 0.01

    # diffusers' own proj_in/out form comes back: conv1x1 for use_linear_projection=False
    proj_form = "linear" if theirs.config.use_linear_projection else "conv1x1"
    back = to_theirs(ours.state_dict(), unet_keymap(cfg, "diffusers", proj_form=proj_form), what="unet")
    _assert_identical(back, theirs.state_dict())
    exported = unet_to_diffusers_config(cfg, sample_size=16)
    rebuilt = _from_folder(UNet2DConditionModel, exported,
                           to_theirs(ours.state_dict(), unet_keymap(cfg, "diffusers"), what="unet"), tmp_path)
    assert unet_from_diffusers_config(exported) == cfg
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x, t, context).sample, got, atol=1e-5, rtol=0)


def test_unet_inputs_beyond_the_output_are_concatenated_conditions():
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**TINY_UNETS["sd1"] | {"in_channels": 9, "out_channels": 4}).eval()  # inpainting
    cfg, ours = _import_unet(theirs)
    assert (cfg["in_channels"], cfg["concat_channels"], cfg["out_channels"]) == (4, 5, 4)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 9, 16, 16, generator=g), torch.randn(2, 7, 24, generator=g)
    t = torch.tensor([3.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(ours(x[:, :4], t, context, concat=x[:, 4:]),
                                   theirs(x, t, encoder_hidden_states=context).sample, atol=1e-5, rtol=0)
    assert unet_to_diffusers_config(cfg)["in_channels"] == 9
    single = to_theirs(ours.state_dict(), unet_keymap(cfg, "single_file"), what="unet")
    assert unet_from_single_file(single, num_heads=2, head_dim=None) == cfg


@pytest.mark.parametrize("name", sorted(TINY_UNETS))
def test_unet_single_file_round_trip_and_diffusers_converter(name):
    theirs = _diffusers_unet(name)
    cfg, ours = _import_unet(theirs)
    single = to_theirs(ours.state_dict(), unet_keymap(cfg, "single_file"), what="unet")
    # default form: SD 1.x files (fixed head count) hold 1x1 convs, SD 2.x files linear layers
    assert single["input_blocks.1.1.proj_in.weight"].dim() == (4 if name == "sd1" else 2)
    assert unet_from_single_file(single, num_heads=cfg["num_heads"], head_dim=cfg["head_dim"]) == cfg
    _assert_identical(to_ours(single, unet_keymap(cfg, "single_file"), _shapes(ours), what="unet"), ours.state_dict())
    # diffusers' own LDM converter (offline: it only renames) reads our single-file names back into its model
    converted = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in single.items()},
                                            dict(theirs.config))
    _assert_identical(converted, theirs.state_dict())


SD1_UNET_CONFIG = {  # Stable Diffusion 1.5 unet/config.json as published
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
# Stable Diffusion 2.1: heads per level (64 channels each), OpenCLIP-H context, linear projections
SD2_UNET_CONFIG = SD1_UNET_CONFIG | {"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                                     "dual_cross_attention": False, "num_class_embeds": None,
                                     "only_cross_attention": False, "upcast_attention": True,
                                     "use_linear_projection": True, "sample_size": 96}


@pytest.mark.parametrize("config, tensors", [(SD1_UNET_CONFIG, 686), (SD2_UNET_CONFIG, 686)])
def test_sd_unet_configs_map_at_full_size(config, tensors):
    cfg = unet_from_diffusers_config(config)
    want = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/model/backbone/unet_sd.yaml"))
    if config is SD1_UNET_CONFIG:  # the SD 1.x settings the yaml's comment names
        want |= {"num_heads": 8, "head_dim": None, "context_dim": 768}
    assert cfg == want
    exported = unet_to_diffusers_config(cfg)
    assert exported["attention_head_dim"] == config["attention_head_dim"]
    with torch.device("meta"):  # full size without allocating memory
        theirs, ours = UNet2DConditionModel.from_config(config), _build(UNet, cfg)
    assert len(theirs.state_dict()) == tensors
    assert len(to_ours(theirs.state_dict(), unet_keymap(cfg, "diffusers"), _shapes(ours), what="unet")) == tensors
    single = to_theirs(ours.state_dict(), unet_keymap(cfg, "single_file"), what="unet")
    assert unet_from_single_file(single, num_heads=cfg["num_heads"], head_dim=cfg["head_dim"]) == cfg


@pytest.mark.parametrize("setting, value", [
    ("addition_embed_type", "text_time"), ("class_embed_type", "projection"), ("only_cross_attention", [True]),
    ("mid_block_only_cross_attention", True), ("num_attention_heads", 2), ("norm_num_groups", 16),
    ("flip_sin_to_cos", False), ("freq_shift", 1),
    ("time_cond_proj_dim", 256), ("resnet_time_scale_shift", "scale_shift"), ("only_cross_attention", True),
    ("transformer_layers_per_block", [1, 2]), ("layers_per_block", [2, 1]),
    ("up_block_types", ["CrossAttnUpBlock2D", "UpBlock2D"]), ("attention_head_dim", [2, 3]),
    ("mid_block_type", "UNetMidBlock2D"), ("encoder_hid_dim", 32), ("some_new_option", 1),
])
def test_unet_config_rejects_unsupported_settings(setting, value):
    config = dict(_diffusers_unet("sd1").config) | {setting: value}
    with pytest.raises(ConfigError, match=setting):
        unet_from_diffusers_config(config)


def test_unet_export_and_single_file_errors():
    base = {"_target_": "ldm.nn.unet.UNet", "in_channels": 4, "model_channels": 32, "channel_mult": [1, 2],
            "num_heads": 2, "context_dim": 24}
    with pytest.raises(ConfigError, match="y_dim"):
        unet_to_diffusers_config(base | {"y_dim": 8})
    with pytest.raises(ConfigError, match="context_dim"):
        unet_to_diffusers_config(base | {"context_dim": None})
    with pytest.raises(ConfigError, match="attention_resolutions"):
        unet_to_diffusers_config(base | {"attention_resolutions": [8]})
    with pytest.raises(ConfigError, match="_target_"):
        unet_keymap(base | {"_target_": "ldm.nn.dit.DiT"}, "diffusers")
    with pytest.raises(ConfigError, match="layout"):
        unet_keymap(base, "ckpt")

    cfg, ours = _import_unet(_diffusers_unet("sd2"))
    single = to_theirs(ours.state_dict(), unet_keymap(cfg, "single_file"), what="unet")
    with pytest.raises(ConfigError, match="num_heads"):
        unet_from_single_file(single, num_heads=None, head_dim=None)
    # an extra transformer block in one place: depth varies over blocks, as in SDXL
    extra = {k.replace("transformer_blocks.1.", "transformer_blocks.2."): v for k, v in single.items()
             if k.startswith("middle_block.1.transformer_blocks.1.")}
    with pytest.raises(ConfigError, match="SDXL"):
        unet_from_single_file(single | extra, num_heads=None, head_dim=16)


def test_unet_bad_tensors_are_listed():
    theirs = _diffusers_unet("sd1")
    _assert_bad_tensors_listed(theirs, _import_unet(theirs), unet_keymap, "unet", "add_embedding.linear_1.weight",
                               "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                               ("conv_in.weight", (32, 4, 1, 1)))


# --- SD's x4 upscaler: 4 latent + 3 low-res image inputs, a noise-level table, cross-attention-only levels -------

# The upscaler's structure at tiny size: no attention at the first level (its only_cross_attention flag there is
# ignored, as in the published config), cross-attention only at the next, self-attention at the last.
TINY_UPSCALER = dict(_UNET, block_out_channels=(32, 64, 64), in_channels=7, out_channels=4, num_class_embeds=1000,
                     only_cross_attention=[True, True, False], attention_head_dim=2, use_linear_projection=True,
                     down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                     up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",))


def test_upscaler_unet_matches_diffusers_and_round_trips(tmp_path):
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**TINY_UPSCALER).eval()
    torch.nn.init.normal_(theirs.class_embedding.weight)  # diffusers' default init; said so the labels visibly count
    cfg, ours = _import_unet(theirs)
    assert (cfg["in_channels"], cfg["concat_channels"], cfg["out_channels"]) == (4, 3, 4)
    assert (cfg["num_classes"], cfg["only_cross_attention"]) == (1000, [False, True, False])
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(3, 7, 16, 16, generator=g), torch.randn(3, 5, 24, generator=g)
    t, noise_level = torch.tensor([0.0, 37.0, 999.0]), torch.tensor([20, 0, 350])  # the pipeline's default is 20
    with torch.no_grad():
        got = ours(x[:, :4], t, context, concat=x[:, 4:], class_labels=noise_level)
        want = theirs(x, t, encoder_hidden_states=context, class_labels=noise_level).sample
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        other = ours(x[:, :4], t, context, concat=x[:, 4:], class_labels=noise_level + 1)
    assert (got - other).abs().max() > 1e-3  # the noise level reaches the output

    back = to_theirs(ours.state_dict(), unet_keymap(cfg, "diffusers"), what="unet")
    _assert_identical(back, theirs.state_dict())
    exported = unet_to_diffusers_config(cfg, sample_size=16)
    assert (exported["in_channels"], exported["num_class_embeds"]) == (7, 1000)
    assert unet_from_diffusers_config(exported) == cfg
    rebuilt = _from_folder(UNet2DConditionModel, exported, back, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t, context, class_labels=noise_level).sample, got, atol=1e-5, rtol=0)

    # LDM's layout: label_emb.weight, attn1 projecting the context; diffusers' converter reads it back
    single = to_theirs(ours.state_dict(), unet_keymap(cfg, "single_file"), what="unet")
    assert single["label_emb.weight"].shape == (1000, 128) and single["input_blocks.4.1.proj_in.weight"].dim() == 2
    assert unet_from_single_file(single, num_heads=2, head_dim=None) == cfg
    _assert_identical(to_ours(single, unet_keymap(cfg, "single_file"), _shapes(ours), what="unet"), ours.state_dict())
    converted = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in single.items()},
                                            dict(theirs.config))
    _assert_identical(converted, theirs.state_dict())


def test_existing_unets_gain_no_keys_and_the_new_inputs_are_checked():
    cfg, ours = _import_unet(_diffusers_unet("sd1"))
    assert "num_classes" not in cfg and "only_cross_attention" not in cfg
    assert not any(k.startswith("class_embed") for k in ours.state_dict())
    assert "num_class_embeds" not in unet_to_diffusers_config(cfg)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([5.0])
    with pytest.raises(ValueError, match="num_classes"):
        ours(x, t, torch.randn(1, 3, 24), class_labels=torch.tensor([1]))
    _, upscaler = _import_unet(UNet2DConditionModel(**TINY_UPSCALER).eval())
    with pytest.raises(ValueError, match="class_labels"):
        upscaler(x, t, torch.randn(1, 3, 24), concat=torch.randn(1, 3, 16, 16), class_labels=torch.tensor([1.0]))
    base = dict(in_channels=4, model_channels=32, channel_mult=[1, 2], num_heads=2, context_dim=24)
    with pytest.raises(ValueError, match="no attention"):
        UNet(**base, attention_resolutions=[2], only_cross_attention=[True, False])
    with pytest.raises(ValueError, match="one bool per level"):
        UNet(**base, only_cross_attention=[True])
    with pytest.raises(ValueError, match="context_dim"):
        UNet(**base | {"context_dim": None}, only_cross_attention=[True, False])


UPSCALER_UNET_CONFIG = {  # stabilityai/stable-diffusion-x4-upscaler unet/config.json (as recalled, not downloaded)
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [256, 512, 512, 1024], "center_input_sample": False, "class_embed_type": None,
    "cross_attention_dim": 1024, "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 7, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": 1000, "only_cross_attention": [True, True, True, False], "out_channels": 4,
    "sample_size": 128, "up_block_types": ["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"], "upcast_attention": False,
    "use_linear_projection": True,
}
UPSCALER_VAE_CONFIG = SD_VAE_CONFIG | {  # its f=4 autoencoder and the latent scale its UNet was trained with
    "block_out_channels": [128, 256, 512], "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3, "sample_size": 256, "scaling_factor": 0.08333,
}


def test_upscaler_configs_map_at_full_size():
    cfg = unet_from_diffusers_config(UPSCALER_UNET_CONFIG)
    assert cfg == {"_target_": "ldm.nn.unet.UNet", "in_channels": 4, "out_channels": 4, "concat_channels": 3,
                   "model_channels": 256, "channel_mult": [1, 2, 2, 4], "num_res_blocks": 2,
                   "attention_resolutions": [8, 4, 2], "num_heads": 8, "head_dim": None, "transformer_depth": 1,
                   "context_dim": 1024, "y_dim": None, "dropout": 0.0, "gradient_checkpointing": False,
                   "num_classes": 1000, "only_cross_attention": [False, True, True, False]}
    with torch.device("meta"):  # full size without allocating memory
        theirs, ours = UNet2DConditionModel.from_config(UPSCALER_UNET_CONFIG), _build(UNet, cfg)
    tensors = len(theirs.state_dict())
    assert len(to_ours(theirs.state_dict(), unet_keymap(cfg, "diffusers"), _shapes(ours), what="unet")) == tensors
    # the last level is as wide as the context (1024): its self-attention reads as such, as the file means
    single = to_theirs(ours.state_dict(), unet_keymap(cfg, "single_file"), what="unet")
    assert unet_from_single_file(single, num_heads=8, head_dim=None) == cfg

    vae, scale = vae_from_diffusers_config(UPSCALER_VAE_CONFIG)
    assert (vae["ch_mult"], vae["embed_dim"], scale) == ([1, 2, 4], 4, 0.08333)  # f = 4, 4 latent channels


def test_an_upscaler_single_file_is_named_by_the_whole_file_import():
    state = {"model.diffusion_model.label_emb.weight": torch.zeros(2, 2), "low_scale_model.betas": torch.zeros(2)}
    with pytest.raises(ConfigError, match="x4 upscaler"):
        split_single_file(state)
