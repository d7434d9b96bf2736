"""Every experiment composes; small ones build; the SD-sized first stage runs forward/backward."""
import subprocess
import sys
from itertools import product

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.data.shapes import VOCABULARIES, ShapeObject
from conftest import EXPERIMENTS, ROOT, compose_experiment


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_with_a_stable_run_dir(name, tmp_path):
    cfg = compose_experiment(name, [f"paths.root_dir={tmp_path}"])
    assert cfg.name == name
    assert cfg.paths.run_dir == f"{tmp_path}/experiments/{name}"  # no timestamps: resume finds it again
    assert cfg.hydra.run.dir == cfg.paths.run_dir
    assert OmegaConf.select(cfg, "model._target_", default=None), "experiment must pick a model"


def test_autoencoder_kl_f8_builds_and_trains_one_step():
    cfg = compose_experiment("autoencoder_kl_f8", ["data.root=/nonexistent"])
    net = instantiate(cfg.model.net)
    assert 80e6 < sum(p.numel() for p in net.parameters()) < 90e6  # SD's first stage: 83.7M
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    rec, posterior = net(x)
    assert rec.shape == x.shape and posterior.mean.shape == (1, 4, 4, 4)  # f = 8
    (rec - x).abs().mean().backward()
    assert net.encoder.conv_in.weight.grad.abs().sum() > 0


def test_shapes_autoencoder_module_builds_from_config():
    module = instantiate(compose_experiment("shapes_autoencoder").model)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = module.encode(x).mean
    assert z.shape == (2, 4, 8, 8) and module.decode(z).shape == x.shape


def _main(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_unknown_key_and_missing_path_give_clear_errors(tmp_path):
    typo = _main("+experiment=shapes_autoencoder", "model.lrr=1", cwd=tmp_path)
    assert typo.returncode != 0 and "model.lrr" in typo.stderr and "Traceback" not in typo.stderr
    missing = _main("+experiment=shapes_autoencoder", "data=image_folder", "data.root=/no/such/dir", cwd=tmp_path)
    assert missing.returncode == 2, missing.stderr
    assert "data.root" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("name", ["shapes_txt2img", "shapes_txt2img_dit", "digits_class2img"])
def test_latent_diffusion_experiments_build_and_denoise(name):
    module = instantiate(compose_experiment(name, ["model.first_stage=null"]).model)
    prompts, labels = (None, [3, 7]) if name == "digits_class2img" else (["a small red circle in the center"] * 2, None)
    z = module.sample(module.sample_batch(prompts, labels), [0, 1], decode=False, steps=2)
    assert z.shape == (2, 4, 8, 8) and torch.isfinite(z).all()


@pytest.mark.parametrize("name, num_objects", [("shapes_txt2img", 1), ("shapes_txt2img_dit", 1),
                                               ("shapes_txt2img_two", 2)])
def test_shapes_captions_fit_the_text_encoder_whole(name, num_objects):
    """Every caption of the experiment's scenes is in the vocabulary and fits the context untruncated (a truncated
    second object loses its position words)."""
    conditioner = instantiate(compose_experiment(name).model.conditioner)
    phrases = [ShapeObject(c, s, z, p, 0.3, 0.5, 0.5).phrase()
               for c, s, z, p in product(*(range(len(v)) for v in VOCABULARIES.values()))]
    longest = max(phrases, key=lambda phrase: len(conditioner.tokenizer.encode(phrase)))
    caption = " and ".join([longest] * num_objects)
    assert len(conditioner.tokenizer.encode(caption)) + 2 <= conditioner.positional_embedding.shape[0]  # start, end
    assert conditioner.encode({"caption": phrases + [caption]})["context"].shape[0] == len(phrases) + 1


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb"])
def test_loggers_write_under_the_run_dir(logger, tmp_path):
    cfg = compose_experiment("shapes_autoencoder", [f"logger={logger}", f"paths.root_dir={tmp_path}"])
    [built] = [instantiate(c) for c in cfg.logger.values()]
    assert str(built.save_dir).startswith(str(tmp_path / "experiments" / "shapes_autoencoder" / "logs"))
    if logger == "wandb":
        assert cfg.logger.wandb.offline is True and cfg.logger.wandb.id is None  # task=fit sets run_id
