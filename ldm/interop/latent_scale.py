"""Our latent normalisation z_n = (z - shift_c) * scale_c, expressed in diffusers' and SD's convention
z_n = z' * scaling_factor by folding the per-channel part into the autoencoder's 1x1 quant convolutions (exact)."""
import torch
from torch import Tensor

SD_SCALING_FACTOR = 0.18215  # SD 1.x/2.x (SD tools assume it for single files)


def export_scaling_factor(scale: Tensor, shift: Tensor) -> float:
    """A uniform scale with zero shift is kept as the scaling factor; anything else is folded to SD's factor."""
    if torch.all(shift == 0) and torch.all(scale == scale.reshape(-1)[0]):
        return float(scale.reshape(-1)[0])
    return SD_SCALING_FACTOR


def fold_latent_norm(vae: dict[str, Tensor], scale: Tensor, shift: Tensor, scaling_factor: float) -> dict[str, Tensor]:
    """Our AutoencoderKL state dict whose latents z' satisfy z' * scaling_factor = (z - shift) * scale.

    With a = scale / scaling_factor: the posterior mean' = (mean - shift) * a and logvar' = logvar + 2 log a (rows of
    quant_conv), and the decoder's input z = z' / a + shift (columns and bias of post_quant_conv).
    """
    # the ratio in float32, as the buffers are: a scale stored as float32(0.18215) folds to exactly 1
    a = (scale.reshape(-1).float() / torch.tensor(scaling_factor, dtype=torch.float32)).double()
    b = shift.reshape(-1).double()
    if torch.all(a == 1) and torch.all(b == 0):
        return dict(vae)
    channels = a.numel()
    out = dict(vae)
    w, bias = vae["quant_conv.weight"].double().clone(), vae["quant_conv.bias"].double().clone()
    w[:channels] *= a[:, None, None, None]
    bias[:channels] = (bias[:channels] - b) * a
    bias[channels:] += 2 * torch.log(a)
    wp, bp = vae["post_quant_conv.weight"].double(), vae["post_quant_conv.bias"].double()
    out["quant_conv.weight"], out["quant_conv.bias"] = w.float(), bias.float()
    out["post_quant_conv.weight"] = (wp / a[None, :, None, None]).float()
    out["post_quant_conv.bias"] = (bp + wp[:, :, 0, 0] @ b).float()
    return out
