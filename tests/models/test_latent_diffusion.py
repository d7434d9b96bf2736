"""LatentDiffusionModule: training lowers the loss for every formulation, checkpoints rebuild the same sampler,
EMA, latent scaling from the cache, CFG dropout, the NaN guard, DiT and class conditioning, DDP on CPU."""
import inspect
import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from conftest import CONFIGS, ROOT, TINY_LDM, TINY_TEXT, TINY_TXT2IMG, TINY_UNET, compose_run, run_main
from ldm.callbacks.image_grid import ImageGrid
from ldm.data.latents import LatentDataModule
from ldm.diffusion.formulations import EDMFormulation, FlowFormulation, VPFormulation
from ldm.diffusion.loss import denoising_loss
from ldm.models import latent_diffusion
from ldm.models.latent_diffusion import LatentDiffusionModule
from ldm.utils.errors import DivergedError, NonFiniteLossError
from ldm.models.optimizer import AdamWSchedule
from ldm.models.sampling import Sampling
from ldm.nn.conditioners import ClassConditioner, TextTransformerConditioner, Unconditional
from ldm.nn.dit import DiT
from ldm.nn.unet import UNet
from ldm.tasks.fit import build_trainer
from ldm.utils.checkpoint import load_module, read_checkpoint
from ldm.utils.images import grid

LATENT_SHAPE = (4, 8, 8)


class PrototypeLatents(Dataset):
    """Four fixed latent patterns (one per class and caption) plus a little noise: a distribution a tiny net learns."""

    def __init__(self, size: int = 64):
        g = torch.Generator().manual_seed(0)
        self.prototypes = torch.randn(4, *LATENT_SHAPE, generator=g)
        self.noise = 0.1 * torch.randn(size, *LATENT_SHAPE, generator=g)
        self.words = ["red circle", "blue square", "green triangle", "white circle"]

    def __len__(self) -> int:
        return len(self.noise)

    def __getitem__(self, i: int) -> dict:
        return {"latent": self.prototypes[i % 4] + self.noise[i], "caption": f"a {self.words[i % 4]}", "label": i % 4}


def loader(batch_size: int = 16) -> DataLoader:
    return DataLoader(PrototypeLatents(), batch_size=batch_size, shuffle=True, drop_last=True)


def fit(module: L.LightningModule, steps: int) -> None:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader())


@torch.no_grad()
def held_out_loss(module: LatentDiffusionModule) -> float:
    """Mean denoising loss of the 64 latents at fixed noise levels and noise: comparable before and after training."""
    data = PrototypeLatents()
    batch = {"caption": [data[i]["caption"] for i in range(64)], "label": torch.arange(64) % 4}
    x0 = torch.stack([data[i]["latent"] for i in range(64)])
    denoiser, conditioner = module.inference_parts(use_ema=False)
    loss, _ = denoising_loss(denoiser, x0, conditioner.encode(batch), module.formulation,
                             generator=torch.Generator().manual_seed(0))
    return loss.mean().item()


def tiny_unet(**conditioning) -> UNet:
    return UNet(4, model_channels=32, channel_mult=[1], num_res_blocks=1, attention_resolutions=[], head_dim=32,
                **conditioning)


FORMULATIONS = {
    "vp_eps": lambda: VPFormulation(prediction="eps"),
    "vp_v": lambda: VPFormulation(prediction="v"),
    "edm": lambda: EDMFormulation(sigma_data=1.0),
    "flow": lambda: FlowFormulation(),
}


@pytest.mark.parametrize("name", FORMULATIONS)
def test_training_lowers_the_loss(name):
    torch.manual_seed(0)
    module = LatentDiffusionModule(tiny_unet(), FORMULATIONS[name](), Unconditional(), latent_shape=LATENT_SHAPE,
                                   optimizer=AdamWSchedule(lr=5e-3), ema_decay=None, cfg_dropout_prob=0.0)
    before = held_out_loss(module)
    fit(module, steps=40)
    after = held_out_loss(module)
    assert after < 0.9 * before, f"{name}: held-out loss {before:.4f} -> {after:.4f}"


def test_the_module_takes_at_most_twelve_training_concepts():
    parameters = [p for p in inspect.signature(LatentDiffusionModule.__init__).parameters if p != "self"]
    assert len(parameters) <= 12, parameters


def test_plain_dataloader_cannot_scale_lr_with_an_unknown_batch():
    module = LatentDiffusionModule(tiny_unet(), VPFormulation(), Unconditional(), latent_shape=LATENT_SHAPE,
                                   optimizer=AdamWSchedule(scale_lr=True))
    with pytest.raises(ValueError, match="scale_lr"):
        fit(module, steps=1)


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_cfg_dropout_swaps_whole_conditions_for_the_null_one(monkeypatch, p):
    conditioner = TextTransformerConditioner(width=32, layers=1, heads=2, context_length=8)
    module = LatentDiffusionModule(tiny_unet(context_dim=32), VPFormulation(prediction="v"), conditioner,
                                   latent_shape=LATENT_SHAPE, ema_decay=None, cfg_dropout_prob=p)
    dropped = []

    def spy(denoiser, x0, cond, formulation, *, generator=None):
        null = module.conditioner.null(x0.shape[0])["context"]
        dropped.extend((cond["context"] == null).flatten(1).all(1).tolist())  # per sample: is it the null one?
        return denoising_loss(denoiser, x0, cond, formulation, generator=generator)

    monkeypatch.setattr(latent_diffusion, "denoising_loss", spy)
    fit(module, steps=3)
    assert len(dropped) == 3 * 16
    fraction = sum(dropped) / len(dropped)
    assert fraction == p if p in (0.0, 1.0) else 0.2 < fraction < 0.8


@pytest.mark.parametrize("every", [1, 4])
def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path, every):
    """Checked every step, the NaN loss stops the run at once; checked every 4 steps (no per-step GPU sync), the
    first checkpoint of NaN weights stops it instead, and last.ckpt is the last good state either way."""
    cfg = compose_run("shapes_txt2img", [
        f"paths.root_dir={tmp_path}", "name=nan", "model.first_stage=null", f"finite_check_every_n_steps={every}",
        *TINY_TXT2IMG, "callbacks=none", "checkpoint_every_n_steps=1", "trainer.max_steps=10",
    ])
    module = instantiate(cfg.model)
    trainer = build_trainer(cfg)
    last = Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt"
    before = {}

    def poison(net, inputs, output):  # the backbone turns to NaN from step 2 on
        if module.global_step < 2:
            return output
        if not before:
            before.update(data=last.read_bytes(), mtime=last.stat().st_mtime_ns)
        return output * float("nan")

    module.denoiser.net.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError if every == 1 else DivergedError, match="step 2" if every == 1 else "step 3"):
        trainer.fit(module, train_dataloaders=loader(batch_size=8))
    assert last.read_bytes() == before["data"] and last.stat().st_mtime_ns == before["mtime"]
    assert read_checkpoint(last)["global_step"] == 2
    names = sorted(p.name for p in last.parent.iterdir() if not p.name.startswith("diverged-"))
    assert names == ["last.ckpt", "step-00000001.ckpt", "step-00000002.ckpt"]


# --- the txt2img run of the shared tiny flow (fit task, cached latents, text conditioner, EMA) ---

SAMPLE_OPTIONS = dict(sampler="ddim", eta=1.0, steps=4, guidance_scale=2.0)  # per-step noise and CFG


def test_checkpoint_rebuilds_a_module_that_samples_the_same(tiny_runs):
    live = tiny_runs.ldm_trainer.lightning_module.eval()
    loaded, cfg, ckpt = load_module(tiny_runs.ldm_ckpt)
    assert ckpt["global_step"] == tiny_runs.ldm_steps and cfg.name == "ldm"
    batch = live.sample_batch(["a large red circle in the center", "a small blue square in the top left"], None)
    images = live.sample(batch, [3, 4], **SAMPLE_OPTIONS)
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(loaded.sample(batch, [3, 4], **SAMPLE_OPTIONS), images)
    assert not torch.equal(live.sample(batch, [5, 4], **SAMPLE_OPTIONS)[0], images[0])  # the seed matters


def test_samples_do_not_depend_on_the_batch(tiny_runs):
    module = tiny_runs.ldm_trainer.lightning_module.eval()
    prompts = ["a red circle", "a blue square", "a green triangle", "a red circle"]
    seeds = [0, 1, 2, 7]
    together = module.sample(module.sample_batch(prompts, None), seeds, decode=False, **SAMPLE_OPTIONS)
    alone = torch.cat([module.sample(module.sample_batch([p], None), [s], decode=False, **SAMPLE_OPTIONS)
                       for p, s in zip(prompts, seeds)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    assert not torch.allclose(together[0], together[3])  # same prompt, another seed


def test_ema_lives_in_the_checkpoint_and_samples_by_default(tiny_runs):
    module = tiny_runs.ldm_trainer.lightning_module.eval()
    state = read_checkpoint(tiny_runs.ldm_ckpt)["state_dict"]
    assert int(state["ema.num_updates"]) == tiny_runs.ldm_steps
    backbone = [k.removeprefix("denoiser.net.") for k in state if k.startswith("denoiser.net.")]
    assert all(f"ema.net.backbone.{k}" in state for k in backbone)
    assert any(k.startswith("ema.net.conditioner.") for k in state)  # the text encoder trains, so it is averaged
    assert any(not torch.equal(state[f"denoiser.net.{k}"], state[f"ema.net.backbone.{k}"]) for k in backbone)
    batch = module.sample_batch(["a red circle"], None)
    default = module.sample(batch, [0], decode=False, **SAMPLE_OPTIONS)
    assert torch.equal(default, module.sample(batch, [0], decode=False, use_ema=True, **SAMPLE_OPTIONS))
    assert not torch.allclose(default, module.sample(batch, [0], decode=False, use_ema=False, **SAMPLE_OPTIONS))


def test_latent_scale_and_shift_come_from_the_cache(tiny_runs):
    module = tiny_runs.ldm_trainer.lightning_module
    data = LatentDataModule(str(tiny_runs.cache / "train"), batch_size=8)
    assert not torch.allclose(data.norm.scale, torch.ones(4, 1, 1))  # real statistics, not the defaults
    state = read_checkpoint(tiny_runs.ldm_ckpt)["state_dict"]
    for name, expected in (("scale", data.norm.scale), ("shift", data.norm.shift)):
        assert torch.equal(getattr(module.latent_norm, name), expected)
        assert torch.equal(state[f"latent_norm.{name}"], expected)
    z = torch.randn(2, *LATENT_SHAPE)
    torch.testing.assert_close(module.latent_norm.unnormalize(z), data.train.norm.unnormalize(z))


def test_on_the_fly_latents_take_the_first_stage_scaling_factor_or_stop():
    """model.latent_scale=null while encoding images: an imported SD first stage gives its 0.18215; ours has none,
    which is a one-line error naming the key instead of a silent scale of 1."""
    from types import SimpleNamespace

    from ldm.models.latent_diffusion import on_the_fly_norm
    from ldm.nn.autoencoder import AutoencoderKL
    from ldm.utils.errors import ConfigError

    sd = SimpleNamespace(net=AutoencoderKL(ch=32, ch_mult=(1,), num_res_blocks=1, scaling_factor=0.18215))
    scale, shift = on_the_fly_norm(sd, 4)
    assert torch.equal(scale, torch.full((4,), 0.18215)) and torch.equal(shift, torch.zeros(4))
    with pytest.raises(ConfigError, match="model.latent_scale"):
        on_the_fly_norm(SimpleNamespace(net=AutoencoderKL(ch=32, ch_mult=(1,), num_res_blocks=1)), 4)


def test_training_grids_use_the_shared_sampling_settings(tiny_runs):
    """The image_grid callback drew sampling.prompts (rows) x sampling.seeds (columns) with sampling.steps."""
    module = tiny_runs.ldm_trainer.lightning_module.eval()
    [grid_callback] = [c for c in tiny_runs.ldm_trainer.callbacks if isinstance(c, ImageGrid)]
    assert grid_callback.sampling == Sampling(steps=2, guidance_scale=3.0, prompts=["a red circle"], seeds=[0, 1])
    written = np.asarray(Image.open(tiny_runs.root / "experiments" / "ldm" / "samples" /
                                    f"samples-step{tiny_runs.ldm_steps:08d}.png"))
    expected = module.sample(module.sample_batch(["a red circle"] * 2, None), [0, 1], steps=2, guidance_scale=3.0)
    assert np.array_equal(written, grid(expected[None]).numpy())


# --- other backbones and conditioners through the same module and configs ---

def composed_module(*overrides: str) -> LatentDiffusionModule:
    cfg = compose_run("shapes_txt2img", ["model.first_stage=null", *TINY_LDM, *overrides])
    return instantiate(cfg.model)


def compose_model_group(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=["+model=latent_diffusion", "model.first_stage=null",
                                            f"model.latent_shape={list(LATENT_SHAPE)}", *overrides])


def test_dit_backbone_trains_and_samples():
    torch.manual_seed(0)
    module = composed_module(*TINY_TEXT, "model/backbone=dit_s", "model.backbone.hidden_size=32",
                             "model.backbone.depth=1", "model.backbone.num_heads=2", "model/formulation=flow",
                             "model.optimizer.lr=5e-3", "model.cfg_dropout_prob=0.2")
    assert isinstance(module.denoiser.net, DiT) and module.denoiser.net.context_dim == 32
    assert isinstance(module.formulation, FlowFormulation)
    before = held_out_loss(module)
    fit(module, steps=40)
    assert held_out_loss(module) < 0.9 * before
    batch = module.sample_batch(["a red circle", "a blue square"], None)
    z = module.sample(batch, [0, 0], decode=False, **SAMPLE_OPTIONS)
    assert z.shape == (2, *LATENT_SHAPE) and torch.isfinite(z).all()
    assert not torch.allclose(z[0], z[1])  # same noise, other caption: the text reaches the DiT


def test_class_conditioning_wires_y_dim():
    torch.manual_seed(0)
    # the model group alone, swapped as on the command line (shapes_txt2img's text-encoder keys would not fit)
    cfg = compose_model_group("model/conditioner=class", *TINY_UNET, "model.conditioner.num_classes=4",
                              "model.conditioner.dim=32", "model.backbone.y_dim=${model.conditioner.dim}",
                              "model.optimizer.lr=5e-3", "model.cfg_dropout_prob=0.2")
    module = instantiate(cfg.model)
    assert isinstance(module.conditioner, ClassConditioner) and module.denoiser.net.y_dim == 32
    before = held_out_loss(module)
    fit(module, steps=30)
    assert held_out_loss(module) < 0.8 * before
    z = module.sample(module.sample_batch(None, [0, 1]), [0, 0], decode=False, **SAMPLE_OPTIONS)
    assert z.shape == (2, *LATENT_SHAPE) and not torch.allclose(z[0], z[1])  # the label changes the sample
    with pytest.raises(ValueError, match="label"):
        module.sample(module.sample_batch(None, [4]), [0], decode=False, steps=2)


# --- two processes (gloo) through main.py ---

@pytest.mark.slow
def test_ddp_on_cpu_splits_the_data_and_counts_steps_once(tiny_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    steps, batch_size = 3, 8
    result = run_main(
        "+experiment=shapes_txt2img", "name=ddp", "first_stage_name=ae", f"paths.root_dir={tiny_runs.root}",
        *TINY_TXT2IMG, "callbacks=none", f"data.batch_size={batch_size}", f"trainer.max_steps={steps}",
        "trainer.val_check_interval=3", "trainer.accelerator=cpu", "trainer.devices=2", "+trainer.strategy=ddp",
        "+callbacks.keys._target_=launching.RecordBatchKeys", f"+callbacks.keys.out_dir={tmp_path}",
        "security.allow=[launching.RecordBatchKeys]",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[fit] world size    2 = 2 devices" in result.stdout
    assert f"[fit] global batch  {2 * batch_size} = {batch_size} per device x 2 ranks" in result.stdout
    ckpt = read_checkpoint(tiny_runs.root / "experiments" / "ddp" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == steps
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [[len(b) for b in rank] for rank in seen] == [[batch_size] * steps] * 2
    rank0, rank1 = ({k for b in rank for k in b} for rank in seen)
    assert len(rank0) == len(rank1) == steps * batch_size and not rank0 & rank1  # one epoch, split in two
