"""trainer=fsdp: FSDP2 sharding of the backbone, text encoder and their EMA on 2 gloo processes equals unsharded
training; sharded (DCP) checkpoints consolidate to a .ckpt and .safetensors that sample the same; safetensors
export of an ordinary checkpoint; the sharding units, config and strategy; main.py trains, checkpoints and
resumes under FSDP on CPU."""
import copy
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from conftest import TINY_TXT2IMG, compose_experiment, compose_run, restored_environ, run_main
from ldm.diffusion.guidance import cfg_dropout
from ldm.diffusion.loss import denoising_loss
from ldm.models.fsdp import FSDP2Strategy, outermost_blocks, shard_module, shard_with_ema
from ldm.nn.attention import SpatialTransformer, TransformerBlock
from ldm.nn.conditioners import TextTransformerConditioner
from ldm.nn.dit import DiT, DiTBlock
from ldm.nn.unet import ResBlock, UNet
from ldm.tasks import export, fit
from ldm.tasks.export import export_checkpoint
from ldm.utils.checkpoint import CONFIG_KEY, load_module, read_checkpoint
from ldm.utils.consolidate import SHARDED_META, is_sharded_checkpoint
from ldm.utils.safe_config import safe_instantiate

STEPS = 2
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a white circle"]
SAMPLE = dict(sampler="ddim", eta=1.0, steps=3, guidance_scale=2.0)  # per-step noise and CFG: every part counts


def tiny_config(root: Path) -> dict:
    """shapes_txt2img with a tiny UNet and a jointly trained text encoder, no first stage."""
    cfg = compose_run("shapes_txt2img", [f"paths.root_dir={root}", "name=sharded", "model.first_stage=null",
                                         *TINY_TXT2IMG, "model.ema_decay=0.9"])
    return OmegaConf.to_container(cfg, resolve=True)


def train_step(module, x0: torch.Tensor, captions: list[str], step: int, part: int) -> torch.Tensor:
    """The training step's loss on one part of the batch, with noise and CFG dropout fixed by (step, part)."""
    g = torch.Generator().manual_seed(100 * step + part)
    cond = module.conditioner.encode({"caption": captions})
    cond = cfg_dropout(cond, module.conditioner.null(len(captions)), 0.5, generator=g)
    return denoising_loss(module.denoiser, x0, cond, module.formulation, generator=g)[0].mean()


def shard_and_train(rank: int, world: int, port: int, cfg: dict, out: Path) -> None:
    """One rank: the module sharded on a CPU mesh trains on its half of each batch; an unsharded copy trains on
    the whole batch. Writes what the parent compares: states, samples, and a sharded checkpoint as Lightning does."""
    torch.set_num_threads(1)  # 2 processes on 2 cores (a forked child's own setting)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        module = safe_instantiate(OmegaConf.create(cfg["model"]))
        reference = copy.deepcopy(module)
        mesh = init_device_mesh("cpu", (world,))
        blocks = (ResBlock, SpatialTransformer, TransformerBlock)
        shard_with_ema(module, lambda part, trained, forward_methods: shard_module(
            part, mesh, blocks, activation_checkpointing=trained, forward_methods=forward_methods))
        opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in (module, reference)]
        x0 = torch.randn(4, *module.latent_shape, generator=torch.Generator().manual_seed(1))
        half = slice(2 * rank, 2 * rank + 2)
        for step in range(STEPS):
            train_step(module, x0[half], CAPTIONS[half], step, rank).backward()  # FSDP averages over ranks
            parts = [slice(2 * r, 2 * r + 2) for r in range(world)]
            (sum(train_step(reference, x0[p], CAPTIONS[p], step, r) for r, p in enumerate(parts)) / world).backward()
            for m, opt in zip((module, reference), opts):
                opt.step()
                opt.zero_grad()
                m.ema.update(m.ema_target())
        ema_pairs = zip(module.ema.net.parameters(), module.ema_target().parameters(), strict=True)
        same_shards = all(e.placements == p.placements and e.to_local().shape == p.to_local().shape
                          for e, p in ema_pairs)
        full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in module.state_dict().items()}
        batch = module.sample_batch(CAPTIONS[:2], None)
        samples = module.sample(batch, [3, 4], decode=False, **SAMPLE)  # through the sharded EMA: all ranks gather
        dcp.save({"state_dict": get_model_state_dict(module)}, checkpoint_id=out / "sharded")
        if rank == 0:
            torch.save({CONFIG_KEY: cfg, "global_step": STEPS}, out / "sharded" / SHARDED_META)
            torch.save(dict(full=full, reference=reference.state_dict(), same_shards=same_shards, samples=samples,
                            reference_samples=reference.sample(batch, [3, 4], decode=False, **SAMPLE),
                            local_numel=module.denoiser.net.out[2].weight.to_local().numel()), out / "result.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# FSDP2's collectives record events on the device's stream; torch 2.6 (the declared floor) has no
# torch.cpu.Stream.record_event, so sharding on CPU ranks needs a newer torch. GPUs are unaffected.
needs_cpu_fsdp = pytest.mark.skipif(not hasattr(torch.cpu.Stream, "record_event"),
                                    reason=f"FSDP2 on CPU needs torch.cpu.Stream.record_event (torch {torch.__version__})")


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    # forked children skip the ~10 s of imports a fresh interpreter needs
    mp.start_processes(shard_and_train, args=(2, free_port(), tiny_config(out), out), nprocs=2, start_method="fork")
    return out


@pytest.mark.slow
@needs_cpu_fsdp
def test_sharded_training_and_ema_equal_unsharded(sharded_run):
    result = torch.load(sharded_run / "result.pt", weights_only=True)
    full, reference = result["full"], result["reference"]
    assert full.keys() == reference.keys()
    for name in full:
        torch.testing.assert_close(full[name], reference[name], rtol=0, atol=1e-5, msg=name)
    assert int(full["ema.num_updates"]) == STEPS
    assert result["same_shards"]  # EMA shards match the trained ones: the update is local to each rank
    assert result["local_numel"] == 4 * 32 * 9 // 2  # each rank holds half of the output conv
    backbone = [k.removeprefix("denoiser.net.") for k in full if k.startswith("denoiser.net.")]
    assert any(not torch.equal(full[f"denoiser.net.{k}"], full[f"ema.net.backbone.{k}"]) for k in backbone)
    assert any(k.startswith("ema.net.conditioner.") for k in full)  # the trained text encoder is averaged too
    torch.testing.assert_close(result["samples"], result["reference_samples"], rtol=0, atol=1e-4)


@pytest.mark.slow
@needs_cpu_fsdp
def test_sharded_checkpoint_consolidates_to_ckpt_and_safetensors(sharded_run, tmp_path):
    sharded = sharded_run / "sharded"
    assert is_sharded_checkpoint(sharded)
    result = torch.load(sharded_run / "result.pt", weights_only=True)
    consolidated = read_checkpoint(sharded)
    assert consolidated["global_step"] == STEPS and "optimizer_0" not in consolidated
    for name, value in result["full"].items():
        assert torch.equal(consolidated["state_dict"][name], value), name

    written = export_checkpoint(sharded, tmp_path)
    assert [p.name for p in written] == [f"step-{STEPS:08d}.ckpt", f"step-{STEPS:08d}.safetensors"]
    modules = [load_module(p)[0] for p in (sharded, *written)]
    batch = modules[0].sample_batch(CAPTIONS[:2], None)
    samples = [m.sample(batch, [3, 4], decode=False, **SAMPLE) for m in modules]
    torch.testing.assert_close(samples[0], result["samples"], rtol=0, atol=1e-4)
    assert torch.equal(samples[0], samples[1]) and torch.equal(samples[0], samples[2])


def test_sharding_units_are_the_outermost_blocks():
    strategy = FSDP2Strategy()
    unet = UNet(4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2], head_dim=32,
                context_dim=32)
    # every ResBlock and SpatialTransformer; the TransformerBlocks inside the latter are not units of their own
    assert outermost_blocks(unet, strategy.block_types) == [
        m for m in unet.modules() if isinstance(m, (ResBlock, SpatialTransformer))]
    assert len(outermost_blocks(unet, strategy.block_types)) == 12
    dit = DiT(4, hidden_size=32, depth=3, num_heads=2, context_dim=32)
    assert outermost_blocks(dit, strategy.block_types) == list(dit.blocks)
    text = TextTransformerConditioner(width=32, layers=2, heads=2, context_length=8)
    assert outermost_blocks(text, strategy.block_types) == list(text.blocks)


def test_safetensors_export_of_an_ordinary_checkpoint(tiny_runs, tmp_path):
    """task=export ckpt=last on a single-device checkpoint: EMA weights only, config inside, samples unchanged."""
    with restored_environ():
        [ema_only] = export.run(compose_run("shapes_txt2img", [*tiny_runs.ldm_overrides, "task=export",
                                                               f"task.out_dir={tmp_path}"]))
    [both] = export_checkpoint(tiny_runs.ldm_ckpt, tmp_path / "all", weights="all")
    assert ema_only == tmp_path / f"step-{tiny_runs.ldm_steps:08d}.safetensors"
    original, _, ckpt = load_module(tiny_runs.ldm_ckpt)
    exported, cfg, meta = load_module(ema_only)
    assert cfg.name == "ldm" and meta["global_step"] == ckpt["global_step"] and meta["ema_folded"] == [""]
    assert exported.ema is None and not any(k.startswith("ema.") for k in meta["state_dict"])
    assert ema_only.stat().st_size < both.stat().st_size  # one copy of the diffusion weights, not two
    batch = original.sample_batch(["a red circle", "a blue square"], None)
    images = original.sample(batch, [3, 4], steps=3)  # decoded by the stored first stage
    assert torch.equal(exported.sample(batch, [3, 4], steps=3), images)
    with pytest.raises(FileNotFoundError, match="not a sharded checkpoint"):
        read_checkpoint(tmp_path / "all")  # a directory without shards
    with pytest.raises(ValueError, match="task.weights"):
        export_checkpoint(tiny_runs.ldm_ckpt, tmp_path, weights="raw")
    kept = load_module(both)[0]
    assert torch.equal(kept.sample(batch, [3, 4], steps=3), images)
    assert torch.equal(kept.sample(batch, [3, 4], steps=3, use_ema=False),
                       original.sample(batch, [3, 4], steps=3, use_ema=False))


def test_fsdp_trainer_config_composes_with_txt2img():
    cfg = compose_experiment("txt2img", ["trainer=fsdp"])
    assert cfg.trainer.strategy._target_ == "ldm.models.fsdp.FSDP2Strategy"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val == 1.0  # the experiment's stays
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDP2Strategy)
    assert strategy.block_types == (ResBlock, SpatialTransformer, DiTBlock, TransformerBlock)
    assert strategy.mp_policy.param_dtype == torch.bfloat16 and strategy.mp_policy.reduce_dtype == torch.float32
    with pytest.raises(ValueError, match="param_dtype"):
        FSDP2Strategy(param_dtype="bfloat61")


def fit_rank(rank: int, world: int, port: int, cfg) -> None:
    """One rank of `task=fit`, its rank given by torchrun's variables (so Lightning starts no processes)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      GROUP_RANK="0", WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    fit.run(cfg)


@pytest.mark.slow
@needs_cpu_fsdp
def test_fsdp_trains_checkpoints_and_resumes_through_main(tiny_runs, monkeypatch):
    """task=fit on 2 forked ranks trains 1 step and writes sharded checkpoints; `main.py` re-run on 1 process
    resumes from them (DCP reshards 2 -> 1), EMA included."""
    args = ["name=fsdp", "first_stage_name=ae", f"paths.root_dir={tiny_runs.root}", *TINY_TXT2IMG, "callbacks=none",
            "trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.strategy.param_dtype=null",
            "trainer.limit_val_batches=0", "checkpoint_every_n_steps=1"]
    cfg = compose_run("shapes_txt2img", [*args, "trainer.devices=2", "trainer.max_steps=1"])
    mp.start_processes(fit_rank, args=(2, free_port(), cfg), nprocs=2, start_method="fork")
    checkpoints = tiny_runs.root / "experiments" / "fsdp" / "checkpoints"
    assert all(is_sharded_checkpoint(checkpoints / name) for name in ("last.ckpt", "step-00000001.ckpt"))
    assert len(list((checkpoints / "last.ckpt").glob("*.distcp"))) == 2  # one shard file per rank
    assert not list(checkpoints.glob(".*"))  # no temporary directory left behind

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    resumed = run_main("+experiment=shapes_txt2img", *args, "trainer.devices=1", "trainer.max_steps=2", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {checkpoints / 'last.ckpt'} at step 1" in resumed.stdout
    ckpt = read_checkpoint(checkpoints / "last.ckpt")
    assert ckpt["global_step"] == 2 and int(ckpt["state_dict"]["ema.num_updates"]) == 2
    module, cfg, _ = load_module(checkpoints / "last.ckpt")
    assert cfg.trainer.strategy._target_ == "ldm.models.fsdp.FSDP2Strategy"
    z = module.sample(module.sample_batch(["a red circle"], None), [0], decode=False, steps=2)
    assert torch.isfinite(z).all()
