"""Concatenation conditioning: backbone input channels, each task's condition and null, CFG dropout and guidance that
keep the image condition, hybrid with text, and the first-stage hook of inpainting."""
import pytest
import torch

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.formulations import EDMFormulation
from ldm.diffusion.guidance import CFGDenoiser, cfg_dropout
from ldm.nn.conditioners import TextTransformerConditioner
from ldm.nn.dit import DiT
from ldm.nn.image_conditions import ConcatConditioner, LowResImage, MaskedImage, SemanticMap, resize_to
from ldm.nn.unet import UNet


def unet(concat_channels: int, **kw) -> UNet:
    return UNet(4, model_channels=32, channel_mult=[1], num_res_blocks=1, attention_resolutions=[], head_dim=32,
                concat_channels=concat_channels, **kw)


def dit(concat_channels: int) -> DiT:
    return DiT(4, patch_size=2, hidden_size=32, depth=1, num_heads=2, concat_channels=concat_channels)


def randomize(net: torch.nn.Module) -> torch.nn.Module:
    """Zero-initialised outputs ignore their input: give every parameter a value so the output depends on concat."""
    torch.manual_seed(0)
    for p in net.parameters():
        p.data.normal_(0, 0.2)
    return net


@pytest.mark.parametrize("make", [unet, dit])
def test_backbone_concat_widens_the_input_and_changes_the_output(make):
    net = randomize(make(3))
    assert net(torch.zeros(2, 4, 8, 8), torch.zeros(2), concat=torch.zeros(2, 3, 8, 8)).shape == (2, 4, 8, 8)
    x, c_noise = torch.randn(2, 4, 8, 8), torch.zeros(2)
    a = net(x, c_noise, concat=torch.zeros(2, 3, 8, 8))
    b = net(x, c_noise, concat=torch.ones(2, 3, 8, 8))
    assert (a - b).abs().mean() > 1e-3  # the condition reaches the output
    plain = make(0)
    first = plain.input_blocks[0][0] if isinstance(plain, UNet) else plain.x_embedder
    assert first.in_channels == 4  # in_channels stays the latent's; concat adds its own
    assert (net.input_blocks[0][0] if isinstance(net, UNet) else net.x_embedder).in_channels == 7


@pytest.mark.parametrize("make", [unet, dit])
def test_backbone_refuses_a_missing_or_misshaped_concat(make):
    with pytest.raises(ValueError, match="concat_channels=3 but got concat=None"):
        make(3)(torch.zeros(1, 4, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="concat_channels=0 but got concat"):
        make(0)(torch.zeros(1, 4, 8, 8), torch.zeros(1), concat=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"concat must be \[1, 3, 8, 8\]"):
        make(3)(torch.zeros(1, 4, 8, 8), torch.zeros(1), concat=torch.zeros(1, 3, 4, 4))


def test_lowres_condition_is_the_low_res_image_at_the_latent_size():
    lowres = torch.rand(2, 3, 8, 8) * 2 - 1
    cond = ConcatConditioner(LowResImage(), latent_size=8)
    out = cond.encode({"lowres": lowres})
    assert out["context"] is None and out["y"] is None and torch.equal(out["concat"], lowres)  # same size: as is
    assert cond.dims == {"context_dim": None, "y_dim": None, "concat_channels": 3}
    bigger = ConcatConditioner(LowResImage(), latent_size=16).encode({"lowres": lowres})["concat"]
    assert bigger.shape == (2, 3, 16, 16)
    # shrinking averages: a 2x2 block of a mask becomes its coverage
    assert resize_to(torch.tensor([[[[1.0, 0], [1, 1]]]]), (1, 1)).item() == 0.75
    assert torch.equal(cond.null(2)["concat"], torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"batch\['lowres'\]"):
        cond.encode({"image": lowres})


def test_masked_image_condition_asks_the_first_stage_for_the_masked_image():
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, :8] = 1  # top half to fill
    cond = ConcatConditioner(MaskedImage(latent_channels=4), latent_size=8)
    [(name, masked)] = cond.first_stage_images({"image": image, "mask": mask}).items()
    assert name == "masked_image" and torch.equal(masked[:, :, 8:], image[:, :, 8:]) and (masked[:, :, :8] == 0).all()
    latent = torch.randn(2, 4, 8, 8)
    out = cond.encode({"mask": mask, "masked_image_latent": latent})["concat"]
    assert out.shape == (2, 5, 8, 8) and torch.equal(out[:, 1:], latent)  # SD's order: mask first
    assert (out[:, 0, :4] == 1).all() and (out[:, 0, 4:] == 0).all()  # the mask at the latent size
    null = cond.null(2)["concat"]
    assert (null[:, 1:] == 0).all() and (null[:, 0] == 1).all()  # nothing known
    with pytest.raises(ValueError, match="not on cached latents"):
        cond.first_stage_images({"latent": latent, "mask": mask})


def test_semantic_map_is_embedded_at_the_latent_size_and_its_null_is_the_empty_map():
    torch.manual_seed(0)
    cond = ConcatConditioner(SemanticMap(num_classes=3, channels=5, hidden=8, downsample_factor=2), latent_size=8)
    layout = torch.randint(0, 3, (2, 16, 16))
    out = cond.encode({"layout": layout})["concat"]
    assert out.shape == (2, 5, 8, 8) and cond.dims["concat_channels"] == 5
    other = cond.encode({"layout": (layout + 1) % 3})["concat"]
    assert (out - other).abs().mean() > 1e-4
    null = cond.null(2)["concat"]
    assert null.shape == (2, 5, 8, 8) and torch.equal(null[0], null[1])
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 3\)"):
        cond.encode({"layout": torch.full((1, 16, 16), 3)})
    with pytest.raises(ValueError, match="downsample_factor to the first stage's"):
        ConcatConditioner(SemanticMap(3, downsample_factor=4), latent_size=8).encode({"layout": layout})


def hybrid(keep_image: bool) -> ConcatConditioner:
    torch.manual_seed(0)
    text = TextTransformerConditioner(width=32, layers=1, heads=2, context_length=16)
    return ConcatConditioner(LowResImage(), latent_size=8, inner=text, keep_image=keep_image)


def test_cfg_dropout_drops_the_text_and_keeps_or_drops_the_image_as_configured():
    batch = {"caption": ["a red circle"] * 4, "lowres": torch.rand(4, 3, 8, 8)}
    for keep in (True, False):
        cond = hybrid(keep)
        c = cond.encode(batch)
        assert c["context"].shape == (4, 16, 32) and c["concat"].shape == (4, 3, 8, 8)  # hybrid: both kinds
        dropped = cfg_dropout(c, cond.null_like(c, 4), p=1.0)
        assert torch.allclose(dropped["context"], cond.null(4)["context"])  # the text is always dropped
        expected = c["concat"] if keep else torch.zeros(4, 3, 8, 8)
        assert torch.equal(dropped["concat"], expected)
        kept = cfg_dropout(c, cond.null_like(c, 4), p=0.0)
        assert torch.equal(kept["concat"], c["concat"]) and torch.equal(kept["context"], c["context"])


def test_guidance_with_a_kept_image_guides_the_text_alone():
    """With keep_image, both CFG branches see the same image: scale 0 gives exactly the image-only prediction."""
    cond = hybrid(True)
    net = randomize(unet(3, context_dim=32))
    denoiser = Denoiser(net, EDMFormulation())
    batch = {"caption": ["a red circle"] * 2, "lowres": torch.rand(2, 3, 8, 8)}
    with torch.no_grad():
        c = cond.encode(batch)
        uncond = cond.null_like(c, 2)
        x, sigma = torch.randn(2, 4, 8, 8), torch.full((2,), 1.0)
        image_only = denoiser(x, sigma, uncond)
        assert torch.allclose(CFGDenoiser(denoiser, 0.0, uncond)(x, sigma, c), image_only, atol=1e-5)
        assert torch.allclose(CFGDenoiser(denoiser, 1.0, uncond)(x, sigma, c), denoiser(x, sigma, c), atol=1e-5)
        other_image = denoiser(x, sigma, {**uncond, "concat": torch.zeros_like(c["concat"])})
        assert (image_only - other_image).abs().mean() > 1e-4  # the unconditional branch still sees the image
