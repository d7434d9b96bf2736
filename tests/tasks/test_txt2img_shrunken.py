"""The cluster experiment `txt2img`, shrunken to CPU size: same UNet class, frozen OpenCLIP tower from a local file,
cached latents, v-prediction; only the widths, the tower's architecture and the trainer are small."""
import pytest
import torch

from conftest import QUIET, compose_run, restored_environ
from ldm.utils.checkpoint import load_module


@pytest.mark.slow
def test_shrunken_txt2img_trains_with_a_frozen_local_openclip_tower(tiny_runs, tiny_clip, tmp_path, no_network):
    from ldm.nn.conditioners import OpenCLIPTextConditioner
    from ldm.tasks import fit

    torch.manual_seed(0)
    tower = tmp_path / "open_clip_text.pt"  # what users pass as model.conditioner.pretrained=/weights/...
    torch.save(OpenCLIPTextConditioner(model_name=tiny_clip, pretrained=None).model.state_dict(), tower)
    steps = 4
    overrides = [
        f"paths.root_dir={tiny_runs.root}", "name=txt2img_shrunken", "first_stage_name=ae", "trainer=cpu", "trainer.devices=1",
        f"trainer.max_steps={steps}", "trainer.val_check_interval=4", "checkpoint_every_n_steps=4",
        "model.latent_shape=[4,8,8]", "model.backbone.model_channels=32", "model.backbone.channel_mult=[1,2]",
        "model.backbone.num_res_blocks=1", "model.backbone.attention_resolutions=[2,1]", "model.backbone.head_dim=16",
        "model.backbone.context_dim=32", f"model.conditioner.model_name={tiny_clip}",
        f"model.conditioner.pretrained={tower}", "model.optimizer.warmup_steps=2", "data.batch_size=4", "data.num_workers=0",
        "data.flip=false", "sampling.steps=2", "sampling.seeds=[0]", "callbacks=none", "~callbacks.periodic_eval", *QUIET,
    ]
    cfg = compose_run("txt2img", overrides)
    # everything not overridden is the cluster setting
    assert cfg.model.backbone._target_ == "ldm.nn.unet.UNet" and cfg.model.backbone.gradient_checkpointing
    assert cfg.model.conditioner.layer == "penultimate" and cfg.model.formulation.prediction == "v"
    assert cfg.model.optimizer.scale_lr and cfg.trainer.gradient_clip_val == 1.0
    with restored_environ():
        trainer = fit.run(cfg)
    trained = trainer.lightning_module
    assert trainer.global_step == steps
    frozen = torch.load(tower, weights_only=True)
    for name, p in trained.conditioner.model.state_dict().items():
        torch.testing.assert_close(p, frozen[name], rtol=0, atol=0)  # the tower never moves
    assert not any(p.requires_grad for p in trained.conditioner.parameters())
    # lr scaled by the global batch: 1e-4 x 4 / 256
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(1e-4 * 4 / 256)

    ckpt = tiny_runs.root / "experiments" / "txt2img_shrunken" / "checkpoints" / "last.ckpt"
    module, stored, _ = load_module(ckpt)  # rebuilds the tower from the stored config and the local file
    assert stored.model.conditioner.pretrained == str(tower)
    cond = module.sample_batch(["a red circle in the center"], [-1])
    with torch.no_grad():
        again = module.sample(cond, [0], steps=2)
        first = trained.eval().sample(trained.sample_batch(["a red circle in the center"], [-1]), [0], steps=2)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
