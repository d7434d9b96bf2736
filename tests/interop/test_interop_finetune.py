"""Fine-tuning: init_from starts a new run at another checkpoint's (EMA) weights, trainable patterns freeze the rest,
LoRA (peft) trains only adapters whose merge equals the adapted model; mismatches and bad patterns fail clearly."""
import copy

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch.utils.data import DataLoader, Dataset

from conftest import compose_run, restored_environ
from ldm.diffusion.formulations import VPFormulation
from ldm.diffusion.loss import denoising_loss
from ldm.interop.init_from import INIT_KEY, init_from_checkpoint
from ldm.models.latent_diffusion import LatentDiffusionModule
from ldm.models.optimizer import AdamWSchedule
from ldm.models.trainable import apply_trainable
from ldm.nn.conditioners import ClassConditioner
from ldm.nn.lora import LoRA, is_adapter, lora_state_dict, merge_lora
from ldm.nn.unet import UNet
from ldm.utils.checkpoint import load_module, read_checkpoint
from ldm.utils.errors import ConfigError
from ldm.utils.hashing import sha256_path

SHAPE = (4, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Latents(Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"latent": torch.randn(*SHAPE, generator=g) + i % 4, "label": i % 4}


def train(module: L.LightningModule, steps: int) -> None:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(Latents(), batch_size=8, shuffle=True))


def pretrained_unet(seed: int = 0, channels: int = 32) -> UNet:
    """A tiny cross-attention UNet whose zero-initialised layers are filled, as after training: every part counts."""
    torch.manual_seed(seed)
    net = UNet(4, model_channels=channels, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2],
               head_dim=16, context_dim=16, y_dim=16)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return net


def ldm(backbone: torch.nn.Module, ema_decay: float | None = 0.9) -> LatentDiffusionModule:
    return LatentDiffusionModule(backbone, VPFormulation(prediction="eps"), ClassConditioner(4, 16, as_context=True),
                                 latent_shape=SHAPE, latent_scale=1.0, optimizer=AdamWSchedule(lr=1e-2),
                                 ema_decay=ema_decay, cfg_dropout_prob=0.0)


def inputs(n: int = 2) -> tuple:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, *SHAPE, generator=g), torch.rand(n, generator=g), torch.randn(n, 3, 16, generator=g),
            torch.randn(n, 16, generator=g))


@torch.no_grad()
def batch_loss(module: LatentDiffusionModule, use_ema: bool) -> torch.Tensor:
    batch = {"latent": torch.stack([Latents()[i]["latent"] for i in range(8)]), "label": torch.arange(8) % 4}
    denoiser, conditioner = module.inference_parts(use_ema)
    loss, _ = denoising_loss(denoiser, batch["latent"], conditioner.encode(batch), module.formulation,
                             generator=torch.Generator().manual_seed(0))
    return loss


def source_checkpoint() -> dict:
    """A trained tiny LDM whose EMA weights differ from its raw ones."""
    source = ldm(pretrained_unet())
    train(source, steps=3)
    return {"state_dict": source.state_dict()}


# --- LoRA ---

def test_lora_starts_at_the_backbone_and_trains_only_adapters():
    plain = pretrained_unet()
    module = ldm(LoRA(copy.deepcopy(plain), rank=2, alpha=4.0))
    torch.testing.assert_close(module.denoiser.net(*inputs()), plain(*inputs()), rtol=0, atol=0)  # B = 0
    before = {k: v.clone() for k, v in module.denoiser.net.state_dict().items()}
    train(module, steps=3)
    after = module.denoiser.net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(is_adapter(k) for k in changed)
    assert any(".lora_B." in k for k in changed)  # the update B A is no longer zero
    assert set(lora_state_dict(module.denoiser.net)) == {k for k in after if is_adapter(k)}
    assert {k.split(".")[-3] for k in after if is_adapter(k)} == {"lora_A", "lora_B"}


def test_merged_weights_give_the_adapted_output_and_equal_peft_merge():
    from peft.tuners.lora import LoraLayer

    lora = LoRA(pretrained_unet(), rank=2, alpha=3.0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)  # as after training
    merged = lora.merged_state_dict()
    plain = pretrained_unet(seed=5)  # other weights: all of them are overwritten
    plain.load_state_dict(merged)  # strict: exactly the UNet's names
    torch.testing.assert_close(plain(*inputs()), lora(*inputs()), rtol=0, atol=1e-5)
    assert not torch.allclose(plain(*inputs()), pretrained_unet()(*inputs()), atol=1e-3)  # the adapters matter

    by_peft = copy.deepcopy(lora.net)
    for m in by_peft.modules():
        if isinstance(m, LoraLayer):
            m.merge()  # peft's own W + scale B A, into base_layer
    theirs = {k.replace(".base_layer.", "."): v for k, v in by_peft.state_dict().items() if not is_adapter(k)}
    assert theirs.keys() == merged.keys()
    for k in merged:
        torch.testing.assert_close(merged[k], theirs[k], rtol=0, atol=1e-6)


def test_lora_backbone_config_wraps_the_unet_config():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from conftest import CONFIGS

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=[
            "+model=latent_diffusion", "model/backbone=lora_unet_sd", "model.first_stage=null",
            "model.latent_shape=[4,8,8]", "model/conditioner=class", "model.conditioner.num_classes=4", "model.conditioner.dim=32",
            "model.backbone.net.model_channels=32", "model.backbone.net.channel_mult=[1,2]",
            "model.backbone.net.attention_resolutions=[2]", "model.backbone.net.head_dim=32",
            "model.backbone.net.context_dim=null", "model.backbone.net.y_dim=32"])
    module = instantiate(cfg.model)
    assert isinstance(module.denoiser.net, LoRA) and isinstance(module.denoiser.net.net, UNet)
    assert module.denoiser.net.y_dim == 32 and module.denoiser.net.context_dim is None
    trains = [n for n, p in module.denoiser.net.named_parameters() if p.requires_grad]
    assert trains and all(is_adapter(n) and ".attn1.to_" in n for n in trains)  # self-attention q, k, v, out


def test_merge_refuses_adapters_without_their_layer():
    state = {k: v for k, v in LoRA(pretrained_unet(), rank=2).state_dict().items()}
    [name] = [k for k in state if k.endswith("attn1.to_q.base_layer.weight")][:1]
    del state[name.replace(".base_layer.", ".lora_A.default.")]
    with pytest.raises(ValueError, match="has no adapter pair"):
        merge_lora(state, 1.0)


def test_lora_needs_a_matching_module():
    with pytest.raises(ValueError, match="nothing_here"):
        LoRA(pretrained_unet(), target_modules=["nothing_here"])


# --- init_from ---

def test_init_from_takes_the_ema_weights_and_restarts_the_ema():
    ckpt = source_checkpoint()
    state = ckpt["state_dict"]
    assert not torch.equal(state["denoiser.net.out.2.weight"], state["ema.net.backbone.out.2.weight"])
    module = ldm(pretrained_unet(seed=3))
    assert init_from_checkpoint(module, ckpt) == "ema"
    ours = module.state_dict()
    for name in ours:
        if name.startswith("denoiser.net."):
            assert torch.equal(ours[name], state[name.replace("denoiser.net.", "ema.net.backbone.")]), name
            assert torch.equal(ours[name.replace("denoiser.net.", "ema.net.backbone.")], ours[name])
        elif name.startswith("conditioner."):
            assert torch.equal(ours[name], state["ema.net." + name])
    assert int(ours["ema.num_updates"]) == 0

    source = ldm(pretrained_unet(seed=3))
    source.load_state_dict(state)
    assert torch.equal(batch_loss(module, use_ema=False), batch_loss(source, use_ema=True))  # the source's EMA model

    raw = ldm(pretrained_unet(seed=3))
    assert init_from_checkpoint(raw, ckpt, "raw") == "raw"
    assert torch.equal(raw.state_dict()["denoiser.net.out.2.weight"], state["denoiser.net.out.2.weight"])


def test_init_from_lists_every_tensor_that_does_not_fit():
    ckpt = source_checkpoint()
    del ckpt["state_dict"]["ema.net.backbone.out.2.bias"]
    ckpt["state_dict"]["denoiser.net.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError, match=r"missing in the source \(1\): ema\.net\.backbone\.out\.2\.bias; "
                                          r"unknown in the source \(1\): denoiser\.net\.extra\.weight"):
        init_from_checkpoint(ldm(pretrained_unet()), ckpt, source="src.ckpt")
    wider = ldm(pretrained_unet(channels=64))
    with pytest.raises(ConfigError, match=r"init_from=src.ckpt: .*mis-shaped \(\d+\): denoiser\.net\."):
        init_from_checkpoint(wider, source_checkpoint(), source="src.ckpt")
    with pytest.raises(ConfigError, match="init_from_weights='best'"):
        init_from_checkpoint(ldm(pretrained_unet()), ckpt, "best")
    with pytest.raises(ConfigError, match="init_from_weights=raw"):  # EMA weights, but no EMA to map them with
        init_from_checkpoint(ldm(pretrained_unet(), ema_decay=None), source_checkpoint())


def test_init_from_a_plain_model_into_lora_starts_at_its_output():
    ckpt = source_checkpoint()
    source = ldm(pretrained_unet())
    source.load_state_dict(ckpt["state_dict"])
    module = ldm(LoRA(pretrained_unet(seed=4), rank=2))
    adapters = {k: v.clone() for k, v in lora_state_dict(module).items()}
    init_from_checkpoint(module, ckpt)
    assert all(torch.equal(v, lora_state_dict(module)[k]) for k, v in adapters.items())  # kept at init (B = 0)
    assert torch.equal(batch_loss(module, use_ema=False), batch_loss(source, use_ema=True))
    assert torch.equal(batch_loss(module, use_ema=True), batch_loss(source, use_ema=True))
    again = ldm(LoRA(pretrained_unet(seed=6), rank=2))  # an earlier LoRA run: read under its own names
    init_from_checkpoint(again, {"state_dict": module.state_dict()})
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in again.state_dict().items())


# --- trainable ---

def test_trainable_patterns_freeze_the_rest_bit_for_bit():
    module = ldm(pretrained_unet())
    trained, total = apply_trainable(module, ["denoiser.net.output_blocks.*", "conditioner.*"])
    assert 0 < trained < total
    before = {k: v.clone() for k, v in module.state_dict().items()}
    train(module, steps=3)
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("denoiser.net.output_blocks.") for k in changed)
    assert not {k for k in changed if k.startswith("denoiser.net.") and ".output_blocks." not in k}
    assert not {k for k in changed if k.startswith("ema.net.backbone.") and ".output_blocks." not in k}


def test_trainable_refuses_patterns_that_match_nothing():
    module = ldm(pretrained_unet())
    with pytest.raises(ConfigError, match=r"trainable: 'first_stage\.\*', 'unet\.\*' match\(es\) no trainable"):
        apply_trainable(module, ["denoiser.net.out.*", "first_stage.*", "unet.*"])
    with pytest.raises(ConfigError, match="trainable="):
        apply_trainable(module, "denoiser.*")


def test_trainable_keeps_the_ema_parts_when_the_conditioner_is_frozen():
    module = ldm(pretrained_unet())
    apply_trainable(module, ["denoiser.net.out.*"])  # the trained class embedding frozen: the EMA still holds it
    assert set(module.ema_target()) == {"backbone", "conditioner"}
    train(module, steps=1)


# --- the fit task: new run from a checkpoint, resume keeps LoRA and trainable ---

def finetune_cfg(tiny_runs, name: str, *overrides: str, lora: bool = False):
    cfg = compose_run("shapes_txt2img", [*tiny_runs.ldm_overrides, f"name={name}", "callbacks=none",
                                         "checkpoint_every_n_steps=2", "trainer.log_every_n_steps=1",
                                         f"init_from={tiny_runs.ldm_ckpt}", *overrides])
    if lora:  # wrap the experiment's backbone as configs/model/backbone/lora_unet_sd.yaml wraps unet_sd
        with open_dict(cfg):
            cfg.model.backbone = OmegaConf.create({"_target_": "ldm.nn.lora.LoRA", "net": cfg.model.backbone,
                                                   "rank": 2, "alpha": 2.0})
    return cfg


@pytest.mark.slow
def test_fit_starts_from_init_from_and_resumes_with_the_same_freezing(tiny_runs, capsys):
    from ldm.tasks import fit

    source = read_checkpoint(tiny_runs.ldm_ckpt)["state_dict"]
    cfg = finetune_cfg(tiny_runs, "ft", "trainer.max_steps=2", "trainable=[denoiser.net.output_blocks.*]")
    with restored_environ():
        fit.run(cfg)
    out = capsys.readouterr().out
    assert "[fit] init_from" in out and "fresh start" in out and "[fit] trainable" in out
    last = tiny_runs.root / "experiments" / "ft" / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(last)
    assert ckpt["global_step"] == 2
    assert int(ckpt["optimizer_states"][0]["state"][0]["step"]) == 2  # a fresh optimizer, not the source's
    assert ckpt[INIT_KEY] == {"path": str(tiny_runs.ldm_ckpt), "sha256": sha256_path(tiny_runs.ldm_ckpt),
                              "weights": "ema"}
    state = ckpt["state_dict"]
    frozen = [k for k in state if k.startswith("denoiser.net.") and ".output_blocks." not in k]
    assert all(torch.equal(state[k], source[k.replace("denoiser.net.", "ema.net.backbone.")]) for k in frozen)
    assert any(not torch.equal(state[k], source[k.replace("denoiser.net.", "ema.net.backbone.")])
               for k in state if k.startswith("denoiser.net.output_blocks."))
    assert all(torch.equal(state[k], source[k]) for k in state if k.startswith(("first_stage.", "latent_norm.")))

    with restored_environ():  # the same command, more steps: resumes, freezing and init record kept
        fit.run(finetune_cfg(tiny_runs, "ft", "trainer.max_steps=4", "trainable=[denoiser.net.output_blocks.*]"))
    assert "Resuming from" in capsys.readouterr().out
    resumed = read_checkpoint(last)
    assert resumed["global_step"] == 4 and resumed[INIT_KEY] == ckpt[INIT_KEY]
    assert all(torch.equal(resumed["state_dict"][k], state[k]) for k in frozen)

    with restored_environ(), pytest.raises(ConfigError, match="init_from"):  # a resume never changes the start
        fit.run(finetune_cfg(tiny_runs, "ft", "trainer.max_steps=6", "trainable=[denoiser.net.output_blocks.*]",
                             "init_from=/elsewhere.ckpt"))
    with restored_environ(), pytest.raises(ConfigError, match="trainable"):  # nor what trains
        fit.run(finetune_cfg(tiny_runs, "ft", "trainer.max_steps=6", "trainable=[denoiser.net.out.*]"))


@pytest.mark.slow
def test_init_from_an_exported_safetensors_reads_its_folded_ema(tiny_runs, tmp_path):
    from ldm.tasks.export import export_checkpoint

    [exported] = export_checkpoint(tiny_runs.ldm_ckpt, tmp_path)  # EMA weights folded into the trained ones
    source = read_checkpoint(tiny_runs.ldm_ckpt)["state_dict"]
    module, _, _ = load_module(tiny_runs.ldm_ckpt)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    assert init_from_checkpoint(module, read_checkpoint(exported), source=str(exported)) == "ema"
    ours = module.state_dict()
    assert all(torch.equal(ours[k], source[k.replace("denoiser.net.", "ema.net.backbone.")])
               for k in ours if k.startswith("denoiser.net."))
    assert int(ours["ema.num_updates"]) == 0


@pytest.mark.slow
def test_fit_with_lora_trains_adapters_and_resumes_as_lora(tiny_runs):
    from ldm.tasks import fit

    source = read_checkpoint(tiny_runs.ldm_ckpt)["state_dict"]
    with restored_environ():
        fit.run(finetune_cfg(tiny_runs, "lora", "trainer.max_steps=2", lora=True))
        fit.run(finetune_cfg(tiny_runs, "lora", "trainer.max_steps=3", lora=True))
    last = tiny_runs.root / "experiments" / "lora" / "checkpoints" / "last.ckpt"
    module, cfg, ckpt = load_module(last)
    assert ckpt["global_step"] == 3 and isinstance(module.denoiser.net, LoRA)
    state = ckpt["state_dict"]
    base = {k: k.replace("denoiser.net.net.", "ema.net.backbone.").replace(".base_layer.", ".")
            for k in state if k.startswith("denoiser.net.net.") and not is_adapter(k)}
    assert all(torch.equal(state[k], source[v]) for k, v in base.items())  # the UNet itself never moved
    assert any(".lora_B." in k and state[k].any() for k in state)
    merged = module.ema.net["backbone"].merged_state_dict()
    plain = UNet(**{k: v for k, v in OmegaConf.to_container(cfg.model.backbone.net).items() if k != "_target_"})
    plain.load_state_dict(merged)
    x, c = torch.randn(2, *SHAPE), torch.rand(2)
    ctx = torch.randn(2, 5, plain.context_dim)
    torch.testing.assert_close(plain(x, c, ctx), module.ema.net["backbone"](x, c, ctx), rtol=0, atol=1e-5)


# --- LoRA for diffusers ---

DIFFUSERS_UNET = dict(_target_="ldm.nn.unet.UNet", in_channels=4, model_channels=32, channel_mult=[1, 2],
                      num_res_blocks=1, attention_resolutions=[2, 1], num_heads=None, head_dim=16, context_dim=24)


def test_lora_file_loads_into_diffusers_and_merges_to_the_same_output(tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file

    from ldm.interop.keymap import to_theirs
    from ldm.interop.lora import lora_to_diffusers
    from ldm.interop.unet import unet_keymap, unet_to_diffusers_config

    torch.manual_seed(0)
    ours = UNet(**{k: v for k, v in DIFFUSERS_UNET.items() if k != "_target_"})
    with torch.no_grad():
        for p in ours.parameters():
            if not p.any():
                p.normal_(0, 0.1)  # zero-initialised output layers filled: the adapters reach the output
    lora = LoRA(copy.deepcopy(ours), rank=2, alpha=3.0).eval()
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    keymap = unet_keymap(DIFFUSERS_UNET, "diffusers")
    theirs = UNet2DConditionModel.from_config(unet_to_diffusers_config(DIFFUSERS_UNET)).eval()
    theirs.load_state_dict(to_theirs(ours.state_dict(), keymap, what="unet"))

    save_file(lora_to_diffusers(lora_state_dict(lora), DIFFUSERS_UNET, lora.scale), tmp_path / "lora.safetensors")
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(tmp_path / "lora.safetensors"))
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, theirs)  # what pipe.load_lora_weights does for the UNet
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 24, generator=g)
    t = torch.tensor([3.0, 500.0])
    with torch.no_grad():
        want = lora(x, t, context)
        torch.testing.assert_close(theirs(x, t, encoder_hidden_states=context).sample, want, rtol=0, atol=1e-5)
        assert (want - ours(x, t, context)).abs().max() > 1e-2  # the adapters change the output

        merged = UNet2DConditionModel.from_config(unet_to_diffusers_config(DIFFUSERS_UNET)).eval()
        merged.load_state_dict(to_theirs(lora.merged_state_dict(), keymap, what="unet"))
        torch.testing.assert_close(merged(x, t, encoder_hidden_states=context).sample, want, rtol=0, atol=1e-5)


def test_lora_to_diffusers_lists_adapters_it_cannot_name():
    from ldm.interop.lora import lora_to_diffusers

    state = {"net.nowhere.to_q.lora_A.default.weight": torch.zeros(2, 4), "bad name": torch.zeros(1)}
    with pytest.raises(ConfigError, match=r"2 adapter tensor\(s\): bad name, net\.nowhere\.to_q\.lora_A"):
        lora_to_diffusers(state, DIFFUSERS_UNET, 1.0)
