"""Random-initialised stand-ins for the weights a txt2img user brings, saved as local files (nothing downloaded):
the f=8 KL first stage as the checkpoint `task=fit` of `autoencoder_kl_f8` would write, and an OpenCLIP text tower
with the ViT-H-14 tower's structure (causal transformer, 77 tokens, 49,408-token vocabulary, 64 channels per head)
at a smaller width and depth, as a `local-dir:` architecture plus a weights file."""
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ldm.utils.atomic import atomic_torch_save, atomic_write_json
from ldm.utils.checkpoint import CONFIG_KEY
from ldm.utils.safe_config import safe_instantiate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def first_stage_checkpoint(path: Path, overrides: list[str], seed: int = 0) -> None:
    """`+experiment=autoencoder_kl_f8 *overrides` built with random weights, saved as a fit checkpoint would be."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=autoencoder_kl_f8", *overrides])
    torch.manual_seed(seed)
    module = safe_instantiate(cfg.model, stored=False, where="model")
    # what read_checkpoint / load_first_stage_with_config need: the resolved config and the weights
    atomic_torch_save({CONFIG_KEY: OmegaConf.to_container(cfg, resolve=True), "state_dict": module.state_dict(),
                       "global_step": 0}, path)


def vit_h_text_config(width: int, layers: int) -> dict:
    """open_clip's ViT-H-14 config with the text tower at `width` (heads of 64 channels) and `layers`; the image
    tower (dropped by the conditioner) shrunk to the smallest that builds."""
    text = {"context_length": 77, "vocab_size": 49408, "width": width, "heads": width // 64, "layers": layers}
    vision = {"image_size": 32, "layers": 1, "width": 64, "head_width": 64, "patch_size": 16}
    return {"model_cfg": {"embed_dim": width, "vision_cfg": vision, "text_cfg": text}}


def openclip_tower(folder: Path, width: int, layers: int, seed: int = 0) -> tuple[str, Path]:
    """(model_name, weights file) for model.conditioner.model_name / .pretrained: `local-dir:FOLDER` holds the
    architecture, the weights file only the text tower (the conditioner's own state_dict)."""
    from ldm.nn.conditioners import OpenCLIPTextConditioner

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "open_clip_config.json", vit_h_text_config(width, layers))
    model_name = f"local-dir:{folder}"
    torch.manual_seed(seed)
    weights = folder.parent / f"{folder.name}_text.pt"  # outside the folder: open_clip would load it as a full CLIP
    atomic_torch_save(OpenCLIPTextConditioner(model_name=model_name, pretrained=None).model.state_dict(), weights)
    return model_name, weights


def inception_file(path: Path, seed: int = 0) -> None:
    """torch-fidelity's Inception-v3 with random weights as a local file, for eval.inception.weights_path (FID/KID
    without the download). He-normal convolutions keep its 2048-d features at unit scale, not vanishing."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    # the constructor fetches the published weights: hand it none and keep the random ones
    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *a: None):
        torch.manual_seed(seed)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    atomic_torch_save(net.state_dict(), path)
