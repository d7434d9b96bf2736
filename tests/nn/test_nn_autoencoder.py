"""First-stage networks and losses: autoencoder shapes, posterior maths, GAN/adaptive weights, LPIPS, PatchGAN."""

import copy
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.models.autoencoder_loss import (
    adaptive_weight,
    adopt_weight,
    generator_adv_loss,
    hinge_d_loss,
    kl_loss,
    reconstruction_loss,
)
from ldm.nn.autoencoder import AutoencoderKL, DiagonalGaussian, group_norm
from ldm.nn.discriminator import NLayerDiscriminator
from ldm.nn.lpips import LPIPS, packaged_lin_weights

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model" / "autoencoder"


def build(name: str) -> AutoencoderKL:
    return instantiate(OmegaConf.load(CONFIGS / f"{name}.yaml"))


@pytest.mark.parametrize("ch_mult, factor", [((1, 2, 4), 4), ((1, 2, 4, 4), 8)])
def test_encode_decode_shapes(ch_mult, factor):
    last = len(ch_mult) - 1
    net = AutoencoderKL(ch=8, ch_mult=ch_mult, num_res_blocks=1, z_channels=4, embed_dim=3, attn_levels=(last,))
    assert net.downsample_factor == factor and net.latent_channels == 3
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    posterior = net.encode(x)
    assert posterior.mean.shape == posterior.std.shape == (2, 3, 32 // factor, 48 // factor)
    assert net.decode(posterior.sample()).shape == x.shape
    recon, _ = net(x, sample=False)
    assert torch.equal(recon, net.decode(posterior.mode()))


def test_group_norm_keeps_four_channels_per_group():
    assert [group_norm(c).num_groups for c in (3, 8, 16, 48, 128, 512)] == [1, 2, 4, 12, 32, 32]


def test_bad_inputs_raise():
    net = AutoencoderKL(ch=8, ch_mult=(1, 2), num_res_blocks=1)
    with pytest.raises(ValueError, match="multiples"):
        net.encode(torch.zeros(1, 3, 31, 32))
    with pytest.raises(ValueError, match="latents"):
        net.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="attn_levels"):
        AutoencoderKL(ch=8, ch_mult=(1, 2), attn_levels=(2,))


@pytest.mark.parametrize("name, factor", [("kl_tiny", 4), ("kl_f4", 4), ("kl_f8", 8)])
def test_configs_instantiate(name, factor):
    with torch.device("meta"):
        net = build(name)
    assert isinstance(net, AutoencoderKL) and net.downsample_factor == factor and net.latent_channels == 4


def test_kl_f8_matches_stable_diffusion_size_and_trains():
    with torch.device("meta"):
        assert sum(p.numel() for p in build("kl_f8").parameters()) == 83_653_863  # SD's AutoencoderKL
    torch.manual_seed(0)
    net = build("kl_f8")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    recon, posterior = net(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and posterior.mean.shape == (1, 4, 4, 4)
    (recon - x).abs().mean().backward()
    assert net.last_layer is net.decoder.conv_out.weight and torch.isfinite(net.last_layer.grad).all()
    assert net.encoder.conv_in.weight.grad.abs().sum() > 0


def test_tiny_autoencoder_loss_goes_down():
    torch.manual_seed(0)
    net = AutoencoderKL(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        recon, posterior = net(x, sample=False)
        loss = reconstruction_loss(x, recon).mean() + 1e-6 * kl_loss(posterior)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_kl_matches_closed_form_and_torch_distributions():
    mean = torch.tensor([[0.0, 1.0], [2.0, -1.0]]).view(2, 2, 1, 1)
    logvar = torch.tensor([[0.0, 0.0], [1.0, -2.0]]).view(2, 2, 1, 1)
    kl = DiagonalGaussian(mean, logvar).kl()
    expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    torch.testing.assert_close(kl, expected)
    assert kl[0].item() == pytest.approx(0.5)  # N(0,1) vs N(0,1) contributes 0, N(1,1) gives mean^2 / 2
    normal = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    reference = torch.distributions.kl_divergence(normal, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(kl, reference)
    assert kl_loss(DiagonalGaussian(mean, logvar)).item() == pytest.approx(kl.mean().item())


def test_posterior_sample_statistics_and_seeding():
    mean = torch.full((4, 2, 64, 64), 1.5)
    logvar = torch.full((4, 2, 64, 64), 2 * torch.log(torch.tensor(0.5)))
    posterior = DiagonalGaussian(mean, logvar)
    z = posterior.sample(torch.Generator().manual_seed(0))
    assert z.mean().item() == pytest.approx(1.5, abs=0.01) and z.std().item() == pytest.approx(0.5, abs=0.01)
    torch.testing.assert_close(posterior.var, posterior.std**2)
    assert torch.equal(z, posterior.sample(torch.Generator().manual_seed(0)))
    assert torch.equal(posterior.mode(), mean)


def test_logvar_is_clamped():
    posterior = DiagonalGaussian(torch.zeros(1, 2), torch.tensor([[-100.0, 100.0]]))
    assert posterior.logvar.tolist() == [[-30.0, 20.0]] and torch.isfinite(posterior.kl()).all()
    with pytest.raises(ValueError, match="same shape"):
        DiagonalGaussian(torch.zeros(1, 2), torch.zeros(1, 3))


def test_reconstruction_loss_per_sample():
    x = torch.zeros(2, 3, 4, 4)
    x_rec = torch.stack([torch.full((3, 4, 4), 0.5), torch.full((3, 4, 4), -2.0)])
    torch.testing.assert_close(reconstruction_loss(x, x_rec), torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(reconstruction_loss(x, x_rec, l1=0.0, l2=2.0), torch.tensor([0.5, 8.0]))


def test_hinge_and_generator_losses():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.0 / 3))
    assert hinge_d_loss(torch.ones(5) * 3, -torch.ones(5) * 3).item() == 0.0  # confident and right: no loss
    assert generator_adv_loss(fake).item() == pytest.approx(1.0 / 3)


def test_adaptive_weight_matches_hand_computation():
    # Toy graph: rec = sum((w * a)^2), g = sum(w * b)  =>  grad rec = 2 a^2 w, grad g = b.
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.5, -1.0])
    rec, g = ((w * a) ** 2).sum(), (w * b).sum()
    weight = adaptive_weight(rec, g, w)
    expected = (2 * a**2 * w).norm() / (b.norm() + 1e-4)
    assert weight.item() == pytest.approx(expected.item()) and not weight.requires_grad
    (rec + weight * g).backward()  # the graph survives for the real backward pass
    torch.testing.assert_close(w.grad, 2 * a**2 * w.detach() + weight * b)
    w.grad = None
    assert adaptive_weight((w * a).sum(), 1e-9 * (w * b).sum(), w, max_weight=10.0).item() == 10.0


def test_adopt_weight():
    assert adopt_weight(0.5, step=9, start=10) == 0.0
    assert adopt_weight(0.5, step=10, start=10) == 0.5


@pytest.mark.parametrize("norm, n_layers, size", [("batch", 3, 2), ("group", 2, 6)])
def test_discriminator_patch_logits(norm, n_layers, size):
    torch.manual_seed(0)
    disc = NLayerDiscriminator(in_channels=3, ndf=16, n_layers=n_layers, norm=norm)
    assert disc(torch.randn(4, 3, 32, 32)).shape == (4, 1, size, size)
    conv_weights = torch.cat([m.weight.flatten() for m in disc.modules() if isinstance(m, torch.nn.Conv2d)])
    assert conv_weights.std().item() == pytest.approx(0.02, rel=0.05)


# --- LPIPS on a randomly initialised VGG16 trunk (no download) ---


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> Path:
    """A random torchvision-vgg16 state_dict file (the features part; LPIPS ignores the classifier)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        vgg = torchvision.models.vgg16(weights=None)
    features = vgg.features.to_empty(device="cpu")
    for module in features:
        if isinstance(module, torch.nn.Conv2d):
            module.reset_parameters()
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def lpips(vgg_file) -> LPIPS:
    return LPIPS(vgg_weights_path=str(vgg_file))


def test_lpips_zero_for_identical_grows_with_noise_and_backprops(lpips):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lpips(x, x).abs().max().item() < 1e-6
    distances = [lpips(x, (x + s * torch.randn_like(x)).clamp(-1, 1)).mean().item() for s in (0.05, 0.2, 0.8)]
    assert 0 < distances[0] < distances[1] < distances[2]
    y = x.clone().requires_grad_(True)
    lpips((x + 0.1 * torch.randn_like(x)), y).sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in lpips.parameters())
    assert not lpips.train().training  # a fixed metric stays in eval mode


def test_lpips_matches_torchmetrics(vgg_file, lpips, monkeypatch):
    from torchmetrics.functional.image import lpips as tm_lpips

    trunk = torch.nn.Sequential(*[layer for stage in lpips.stages for layer in stage])
    assert torch.equal(trunk[28].weight, torch.load(vgg_file, weights_only=True)["features.28.weight"])
    # Hand torchmetrics the same trunk (it would otherwise build and discard a whole random VGG16).
    monkeypatch.setattr(tm_lpips, "_get_tv_model_features", lambda net, pretrained=False: copy.deepcopy(trunk))
    reference = tm_lpips._LPIPS(pretrained=True, net="vgg", pnet_rand=True)  # its packaged linear heads
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(lpips(x, y), reference(x, y).flatten(), rtol=1e-4, atol=1e-6)


def test_lpips_missing_weights_name_the_config_key(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="model.lpips.vgg_weights_path"):
        LPIPS(vgg_weights_path=None)
    with pytest.raises(FileNotFoundError, match="model.lpips.vgg_weights_path"):
        LPIPS(vgg_weights_path=str(tmp_path / "missing.pth"))
    torch.save({"classifier.0.weight": torch.zeros(1)}, tmp_path / "not_vgg.pth")
    with pytest.raises(ValueError, match="not a torchvision vgg16"):
        LPIPS(vgg_weights_path=str(tmp_path / "not_vgg.pth"))

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.models, "vgg16", offline)
    with pytest.raises(RuntimeError, match="model.lpips.vgg_weights_path"):
        LPIPS(vgg_weights_path="torchvision")


def test_lpips_linear_heads_file(vgg_file, tmp_path):
    assert packaged_lin_weights() is not None  # torchmetrics ships the LPIPS v0.1 heads
    with pytest.raises(FileNotFoundError, match="model.lpips.lin_weights_path"):
        LPIPS(vgg_weights_path=str(vgg_file), lin_weights_path=str(tmp_path / "missing.pth"))
