"""Our per-channel latent normalisation folded into the autoencoder's quant convs for formats with one scalar
scaling factor (diffusers, SD single files): the exported autoencoder encodes and decodes our normalised latents."""
import torch

from ldm.interop.latent_scale import SD_SCALING_FACTOR, export_scaling_factor, fold_latent_norm
from ldm.nn.autoencoder import AutoencoderKL


def test_folding_per_channel_scale_and_shift_is_exact():
    torch.manual_seed(0)
    net = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1).eval()
    scale, shift = torch.rand(4) + 0.5, torch.randn(4)
    factor = export_scaling_factor(scale, shift)
    assert factor == SD_SCALING_FACTOR  # not a scalar normalisation: folded to SD's factor
    folded = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1).eval()
    folded.load_state_dict(fold_latent_norm(net.state_dict(), scale, shift, factor))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    c = lambda t: t[:, None, None]  # noqa: E731  [C] -> [C, 1, 1]
    with torch.no_grad():
        ours, theirs = net.encode(x), folded.encode(x)
        torch.testing.assert_close(theirs.mean * factor, (ours.mean - c(shift)) * c(scale), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.std * factor, ours.std * c(scale), atol=1e-5, rtol=1e-5)
        z_n = torch.randn(2, 4, 8, 8)
        torch.testing.assert_close(folded.decode(z_n / factor), net.decode(z_n / c(scale) + c(shift)), atol=1e-5,
                                   rtol=1e-5)


def test_a_scalar_normalisation_is_kept_as_the_scaling_factor_and_folds_to_nothing():
    net = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    scale, shift = torch.full((4,), 0.18215), torch.zeros(4)
    factor = export_scaling_factor(scale, shift)
    assert factor == torch.tensor(0.18215).item()
    folded = fold_latent_norm(net.state_dict(), scale, shift, factor)
    assert all(torch.equal(folded[k], v) for k, v in net.state_dict().items())
