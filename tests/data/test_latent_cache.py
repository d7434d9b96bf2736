"""Latent cache: writer (shards, manifest, resume, parallel writers, corrupt inputs) and reader (scaling, flips,
hash check, verification, distributed and resumable sampling)."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from key_recorder import KeyRecorder
from ldm.data.latent_cache import LatentDataset, cache_latents
from ldm.data.latent_cache.format import ShardPlan, read_json
from ldm.data.latent_cache.reader import sample_generator
from ldm.data.latents import LatentDataModule, LatentSampler, ResumableDataLoader
from ldm.data.shapes import ShapesDataset
from ldm.eval.reconstruction import psnr
from ldm.models.first_stage import first_stage_hash, load_first_stage, load_first_stage_with_config
from ldm.tasks import cache_latents as task
from ldm.tasks.fit import check_latent_cache
from ldm.utils.errors import ConfigError
from ldm.utils.safe_config import safe_instantiate
from shard_fixtures import FailingEncoder

ROOT = Path(__file__).resolve().parents[2]
RESOLUTION = 16


def model_config(width: int = 8) -> dict:
    net = {"_target_": "ldm.nn.autoencoder.AutoencoderKL", "ch": width, "ch_mult": [1, 2], "num_res_blocks": 1,
           "z_channels": 4, "embed_dim": 4}
    return {"_target_": "ldm.models.autoencoder.AutoencoderModule", "net": net, "ema_decay": 0.999}


def save_autoencoder(path: Path, seed: int) -> Path:
    """A tiny untrained AutoencoderModule whose EMA differs from its raw net, saved as the fit task saves it."""
    torch.manual_seed(seed)
    cfg = {"model": model_config()}
    module = safe_instantiate(OmegaConf.create(cfg["model"]))
    with torch.no_grad():  # raw weights move away from the EMA copy: caching must use the EMA ones
        for p in module.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "ldm_config": cfg}, path)
    return path


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory) -> Path:
    return save_autoencoder(tmp_path_factory.mktemp("ae") / "checkpoints" / "last.ckpt", seed=0)


@pytest.fixture(scope="module")
def first_stage(ae_ckpt):
    return load_first_stage(ae_ckpt)


def write_cache(first_stage, dataset, out_dir, **options):
    options = {"first_stage_hash": first_stage_hash(first_stage), "first_stage_config": model_config(),
               "samples_per_shard": 8, "batch_size": 8, "flip": True, "progress": False, **options}
    return cache_latents(first_stage, dataset, out_dir, **options)


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(size=44, resolution=RESOLUTION, num_objects=1, seed=3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, ae_ckpt, first_stage, shapes) -> Path:
    """44 shapes in shards of 8 (the last one holds 4), flips stored."""
    out = tmp_path_factory.mktemp("cache") / "train"
    result = write_cache(first_stage, shapes, out)
    assert read_json(out / "manifest.json")["first_stage"]["config"] == load_first_stage_with_config(ae_ckpt)[1]
    assert result.manifest == out / "manifest.json" and result.encoded == 44 and result.shards_written == 6
    return out


def tar_samples(out_dir: Path) -> list[str]:
    """Every sample key in every committed shard (duplicates kept)."""
    keys = []
    for tar_path in sorted(out_dir.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            keys += [m.name.split(".")[0] for m in tar if m.name.endswith(".json")]
    return keys


# --- first stage ---

def test_first_stage_hash_is_weights_identity(ae_ckpt, first_stage, tmp_path):
    module, config = load_first_stage_with_config(ae_ckpt)
    assert config["net"]["ch"] == 8 and not module.training
    assert not any(p.requires_grad for p in module.parameters())
    # another file with the same weights: same hash; the hash is the EMA (inference) net's
    copy = tmp_path / "copy.ckpt"
    torch.save(torch.load(ae_ckpt, weights_only=True), copy)
    assert first_stage_hash(load_first_stage(copy)) == first_stage_hash(first_stage) == first_stage_hash(first_stage.ema.net)
    assert first_stage_hash(first_stage.net) != first_stage_hash(first_stage.ema.net)
    with pytest.raises(FileNotFoundError, match="ckpt"):
        load_first_stage(tmp_path / "missing.ckpt")


def test_first_stage_loads_without_loss_modules(tmp_path):
    """A checkpoint trained with a discriminator and LPIPS loads without them (no VGG weights needed to encode)."""
    disc = {"_target_": "ldm.nn.discriminator.NLayerDiscriminator", "in_channels": 3, "ndf": 8, "n_layers": 1}
    module = safe_instantiate(OmegaConf.create({**model_config(), "discriminator": disc}))
    lpips = {"_target_": "ldm.nn.lpips.LPIPS", "vgg_weights_path": str(tmp_path / "absent_vgg16.pth")}
    cfg = {"model": {**model_config(), "discriminator": disc, "lpips": lpips}}
    torch.save({"state_dict": module.state_dict(), "ldm_config": cfg}, tmp_path / "gan.ckpt")
    loaded, config = load_first_stage_with_config(tmp_path / "gan.ckpt")
    assert loaded.discriminator is None and loaded.lpips is None
    assert config == loaded.model_config == {**model_config(), "discriminator": None, "lpips": None}
    assert first_stage_hash(loaded) == first_stage_hash(module)
    assert isinstance(safe_instantiate(OmegaConf.create(config)), type(loaded))  # the config alone rebuilds it


# --- writer ---

def test_round_trip_psnr_and_metadata(cache, first_stage, shapes):
    """Cached means decode as well as direct encodings (EMA net, float16 storage); metadata survives."""
    data = LatentDataset(cache, scale=1.0, flip=False)
    assert len(data) == 44 and data.latent_shape == (4, RESOLUTION // 2, RESOLUTION // 2)
    images = torch.stack([shapes[i]["image"] for i in range(len(data))])
    cached = torch.stack([data.moments(i)["mean"].float() for i in range(len(data))])
    with torch.no_grad():
        direct = first_stage.ema.net.encode(images).mean
        torch.testing.assert_close(cached, direct, atol=2e-3, rtol=2e-3)
        psnr_cached = psnr(images, first_stage.decode(cached).clamp(-1, 1)).mean()
        psnr_direct = psnr(images, first_stage.decode(direct).clamp(-1, 1)).mean()
    assert abs(psnr_cached - psnr_direct) < 0.5
    item = data[5]
    assert item["key"] == shapes[5]["key"] and item["caption"] == shapes[5]["caption"] and item["label"] == -1
    assert set(item["attrs"]) == {"color", "shape", "size", "position"}
    assert torch.equal(item["attrs"]["color"], shapes[5]["attrs"]["color"])
    assert item["latent"].dtype == torch.float32 and item["latent"].shape == data.latent_shape


def test_manifest_statistics_match_direct_computation(cache, first_stage, shapes):
    manifest = read_json(cache / "manifest.json")
    assert manifest["num_samples"] == 44 and [s["count"] for s in manifest["shards"]] == [8] * 5 + [4]
    assert manifest["first_stage"]["hash"] == first_stage_hash(first_stage)
    assert manifest["first_stage"]["config"]["net"]["ch"] == 8 and manifest["resolution"] == RESOLUTION
    images = torch.stack([shapes[i]["image"] for i in range(44)])
    with torch.no_grad():
        posterior = first_stage.encode(images)
    mean, std = posterior.mean.half().double(), posterior.std.half().double()  # what the cache stores
    second = (mean.square() + std.square()).mean((0, 2, 3))
    expected_std = (second - mean.mean((0, 2, 3)).square()).sqrt()
    np.testing.assert_allclose(manifest["stats"]["mean"], mean.mean((0, 2, 3)).numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(manifest["stats"]["std"], expected_std.numpy(), rtol=1e-6)
    # Monte Carlo over sampled latents agrees, and per_channel scaling standardises them
    data = LatentDataset(cache, scale="per_channel", flip=False)
    z = torch.stack([data[(epoch, i)]["latent"] for epoch in range(6) for i in range(44)])
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(4), atol=0.05, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3)), torch.ones(4), atol=0.05, rtol=0)
    unscaled = LatentDataset(cache, scale=1.0, flip=False)[3]["latent"]
    assert torch.allclose(data.norm.unnormalize(data[3]["latent"]), unscaled, atol=1e-5)
    overall = LatentDataset(cache, scale="global_std", flip=False)
    assert torch.allclose(overall.norm.scale, torch.full((4, 1, 1), 1 / manifest["stats"]["std_all"]))
    assert not overall.norm.shift.any()


def test_flip_copies_stored_and_used(cache, first_stage, shapes):
    data = LatentDataset(cache, scale=1.0, flip=True)
    images = torch.stack([shapes[i]["image"] for i in range(4)])
    with torch.no_grad():
        mirrored = first_stage.encode(images.flip(-1)).mean
        decoded_flip = first_stage.decode(torch.stack([data.moments(i)["flip.mean"].float() for i in range(4)]))
        torch.testing.assert_close(decoded_flip, first_stage.decode(mirrored), atol=5e-3, rtol=5e-3)
    # each draw picks one copy: rebuild both candidates from the draw's generator to see which one it was
    picks = []
    for epoch in range(10):
        for i in range(len(data)):
            m = {k: v.float() for k, v in data.moments(i).items()}
            generator = sample_generator(0, epoch, i)
            torch.rand((), generator=generator)  # the coin
            noise = torch.randn(m["mean"].shape, generator=generator)
            z = data[(epoch, i)]["latent"]
            is_flip = torch.allclose(z, m["flip.mean"] + m["flip.std"] * noise)
            assert is_flip != torch.allclose(z, m["mean"] + m["std"] * noise)
            picks.append(is_flip)
    assert 0.4 < np.mean(picks) < 0.6
    assert torch.equal(data[(2, 7)]["latent"], data[(2, 7)]["latent"])  # (seed, epoch, index) fixes the draw
    assert not torch.equal(data[(2, 7)]["latent"], data[(3, 7)]["latent"])
    unflipped = LatentDataset(cache, scale=1.0, flip=False)
    z, m = unflipped[(0, 1)]["latent"], unflipped.moments(1)
    assert ((z - m["mean"]).abs() <= 6 * m["std"].float() + 1e-3).all()


class Corrupted(torch.utils.data.Dataset):
    """Shapes with a raising item, a wrong-size image and a NaN image."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        if index == 3:
            raise OSError("image file is truncated")
        item = dict(self.base[index])
        if index == 7:
            item["image"] = torch.zeros(3, RESOLUTION * 2, RESOLUTION * 2)
        if index == 9:
            item["image"] = torch.full_like(item["image"], float("nan"))
        return item


def test_corrupt_inputs_skipped_and_counted(first_stage, shapes, tmp_path):
    dataset = Corrupted(ShapesDataset(size=20, resolution=RESOLUTION))
    result = write_cache(first_stage, dataset, tmp_path / "c", num_workers=2)  # skips cross worker processes
    manifest = read_json(result.manifest)
    assert result.skipped == 3 and manifest["num_samples"] == 17
    assert manifest["skipped"]["total"] == 3
    assert set(manifest["skipped"]["reasons"]) == {
        "error: OSError", "bad image: non-finite values", f"bad image: shape (3, {2 * RESOLUTION}, {2 * RESOLUTION}), "
        f"expected (3, {RESOLUTION}, {RESOLUTION})",
    }
    assert sorted(e["index"] for e in manifest["skipped"]["examples"]) == [3, 7, 9]
    keys = {item["key"] for item in LatentDataset(tmp_path / "c")}
    assert len(keys) == 17 and not keys & {f"shapes-0-{i:07d}" for i in (3, 7, 9)}


def test_crash_then_rerun_completes_without_duplicates(first_stage, shapes, cache, tmp_path):
    out = tmp_path / "train"
    with pytest.raises(RuntimeError, match="simulated crash"):
        # call 1 probes the latent shape; calls 2-3 are shards 0 and 1 (one batch each); die in shard 2
        write_cache(FailingEncoder(first_stage, fail_on_call=4), shapes, out, first_stage_hash=first_stage_hash(first_stage))
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not list((out / "claims").iterdir()) and not list(out.glob(".*tmp*"))  # claims and temp files cleaned
    result = write_cache(first_stage, shapes, out)
    assert (result.shards_found_complete, result.shards_written) == (2, 4)
    keys = tar_samples(out)
    assert sorted(keys) == [f"{i:09d}" for i in range(44)]
    assert read_json(out / "manifest.json") == read_json(cache / "manifest.json")  # same shards, same sums


# Imports only torch-level modules (no Lightning): a cheap start for the subprocesses below.
SUBPROCESS_CACHE = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    import torch
    from ldm.data.latent_cache import cache_latents
    from ldm.data.shapes import ShapesDataset
    from ldm.nn.autoencoder import AutoencoderKL

    net_file, out, sleep_s, ready_dir, waiting_for = sys.argv[1:6]

    class Slow(ShapesDataset):
        def __getitem__(self, index):
            time.sleep(float(sleep_s))
            return super().__getitem__(index)

    saved = torch.load(net_file, weights_only=True)
    net = AutoencoderKL(**{k: v for k, v in saved["config"]["net"].items() if k != "_target_"})
    net.load_state_dict(saved["state_dict"])
    ready = Path(ready_dir)
    (ready / str(os.getpid())).touch()
    while len(list(ready.iterdir())) < int(waiting_for):  # start together with the other process
        time.sleep(0.01)
    result = cache_latents(net, Slow(size=44, resolution=%d, num_objects=1, seed=3), out, first_stage_hash=saved["hash"],
                           first_stage_config=saved["config"], samples_per_shard=8, batch_size=8, flip=True, progress=False)
    print(json.dumps({"written": result.shards_written, "manifest": result.manifest is not None}))
""" % RESOLUTION)


def start_cacher(tmp_path, first_stage, out, sleep_s, ready_dir, waiting_for=1):
    """A separate process caching the 44 shapes into `out` with the EMA net of `first_stage`."""
    script, net_file = tmp_path / "cacher.py", tmp_path / "net.pt"
    script.write_text(SUBPROCESS_CACHE)
    if not net_file.exists():
        state = first_stage.ema.net.state_dict()
        torch.save({"state_dict": state, "config": model_config(), "hash": first_stage_hash(first_stage)}, net_file)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RANK": "0", "WORLD_SIZE": "1"}
    args = [sys.executable, str(script), str(net_file), str(out), str(sleep_s), str(ready_dir), str(waiting_for)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_killed_process_resumes_exactly(first_stage, shapes, cache, tmp_path):
    out, ready = tmp_path / "train", tmp_path / "ready"
    ready.mkdir()
    proc = start_cacher(tmp_path, first_stage, out, sleep_s=0.05, ready_dir=ready)
    deadline = time.time() + 120
    while not (out / "shard-000000.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-way through shard 1: its claim and temp file stay behind
    proc.wait()
    assert not (out / "manifest.json").exists()
    result = write_cache(first_stage, shapes, out)  # the dead process's claim is taken over
    assert result.shards_found_complete >= 1 and result.manifest is not None
    assert sorted(tar_samples(out)) == [f"{i:09d}" for i in range(44)]
    assert not list(out.glob(".*tmp*")) and not list((out / "claims").iterdir())
    manifest, reference = read_json(out / "manifest.json"), read_json(cache / "manifest.json")
    assert [s["count"] for s in manifest["shards"]] == [s["count"] for s in reference["shards"]]
    np.testing.assert_allclose(manifest["stats"]["std"], reference["stats"]["std"], rtol=1e-4)
    LatentDataset(out, verify=True)


@pytest.mark.slow
def test_two_processes_share_one_cache(first_stage, tmp_path):
    out, ready = tmp_path / "train", tmp_path / "ready"
    ready.mkdir()
    procs = [start_cacher(tmp_path, first_stage, out, sleep_s=0.02, ready_dir=ready, waiting_for=2) for _ in range(2)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sum(r["written"] for r in results) == 6 and all(r["written"] > 0 for r in results), results
    assert any(r["manifest"] for r in results)  # the last one to finish wrote it
    assert sorted(tar_samples(out)) == [f"{i:09d}" for i in range(44)]
    assert len(LatentDataset(out, verify=True)) == 44


def test_ranks_write_disjoint_shards(first_stage, shapes, tmp_path):
    out = tmp_path / "train"
    first = write_cache(first_stage, shapes, out, rank=0, world_size=2)
    assert first.manifest is None and first.shards_written == 3  # shards 0, 2, 4; rank 1's are missing
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [f"shard-00000{i}.tar" for i in (0, 2, 4)]
    second = write_cache(first_stage, shapes, out, rank=1, world_size=2)
    assert second.shards_written == 3 and second.manifest is not None
    assert sorted(tar_samples(out)) == [f"{i:09d}" for i in range(44)]
    again = write_cache(first_stage, shapes, out)  # a re-run of a finished cache does nothing
    assert (again.shards_written, again.shards_found_complete, again.encoded) == (0, 6, 0)


def test_other_autoencoder_refused(cache, first_stage, shapes, tmp_path):
    other_ckpt = save_autoencoder(tmp_path / "other.ckpt", seed=1)
    other = load_first_stage(other_ckpt)
    assert first_stage_hash(other) != first_stage_hash(first_stage)
    with pytest.raises(ConfigError, match="encoded by first stage"):
        LatentDataset(cache, expected_first_stage_hash=first_stage_hash(other))
    LatentDataset(cache, expected_first_stage_hash=first_stage_hash(first_stage))
    with pytest.raises(ConfigError, match="encoded by first stage"):
        check_latent_cache(SimpleNamespace(first_stage=other), LatentDataModule(str(cache)))  # the fit wiring
    with pytest.raises(ConfigError, match="planned differently.*first_stage"):  # no mixing caches either
        write_cache(other, shapes, cache)


def test_verify_catches_modified_shard(cache, first_stage, shapes, tmp_path):
    out = tmp_path / "train"
    shutil.copytree(cache, out)
    shard = out / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2048] ^= 0xFF  # inside a member's data: same size, different bytes
    shard.write_bytes(bytes(data))
    LatentDataset(out, verify=False)  # sizes match: only the checksum can tell
    with pytest.raises(ValueError, match="shard-000001.tar.*checksum"):
        LatentDataset(out, verify=True)
    result = write_cache(first_stage, shapes, out)  # the writer re-checks sha256 and rewrites just that shard
    assert (result.shards_written, result.shards_found_complete) == (1, 5)
    LatentDataset(out, verify=True)
    shard.write_bytes(shard.read_bytes()[:-1024])  # truncated: caught without verify
    with pytest.raises(ValueError, match="shard-000001.tar"):
        LatentDataset(out)


# --- sampler and DataModule ---

def test_ranks_see_disjoint_complete_data(first_stage, tmp_path):
    # skipped inputs make the shards uneven: 6, 7, 8 and 2 samples
    out = tmp_path / "c"
    write_cache(first_stage, Corrupted(ShapesDataset(size=26, resolution=RESOLUTION)), out, flip=False)
    data = LatentDataset(out)
    assert [s["count"] for s in data.manifest["shards"]] == [6, 7, 8, 2] and len(data) == 23
    for world_size, epoch in ((2, 0), (2, 1), (3, 0)):
        exact = [LatentSampler(data, rank, world_size, seed=4, even=False) for rank in range(world_size)]
        for s in exact:
            s.set_epoch(epoch)
        seen = [[i for _, i in s] for s in exact]
        assert sorted(sum(seen, [])) == list(range(len(data)))  # disjoint and complete
        padded = [LatentSampler(data, rank, world_size, seed=4, even=True) for rank in range(world_size)]
        for s in padded:
            s.set_epoch(epoch)
        seen_padded = [[i for _, i in s] for s in padded]
        assert {len(s) for s in seen_padded} == {math.ceil(23 / world_size)}  # equal steps on every rank
        assert set(sum(seen_padded, [])) == set(range(len(data)))
        repeats = len(sum(seen_padded, [])) - len(set(sum(seen_padded, [])))
        assert repeats == -23 % world_size  # only the wrap-around padding repeats
    a, b = LatentSampler(data, 0, 1, seed=4), LatentSampler(data, 0, 1, seed=4)
    b.set_epoch(1)
    assert list(a) != list(b) and list(a) == list(LatentSampler(data, 0, 1, seed=4))


def test_datamodule_rank_without_trainer(cache, monkeypatch):
    """Outside Lightning the rank comes from torch.distributed or RANK/WORLD_SIZE (torchrun sets both)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dm = LatentDataModule(str(cache), batch_size=4)
    sampler = dm.train_dataloader().sampler
    assert (sampler.rank, sampler.num_replicas, len(sampler)) == (1, 2, 22)


def batches_of(loader, count):
    out = []
    for batch in loader:
        out.append((batch["key"], batch["latent"]))
        if len(out) == count:
            break
    return out


def test_loader_resumes_mid_epoch_exactly(cache):
    data = LatentDataset(cache, seed=7)

    def loader(rank=0):
        return ResumableDataLoader(data, 4, sampler=LatentSampler(data, rank, 2, seed=7), drop_last=True)

    reference = []
    full = loader()
    for epoch in range(2):
        full.sampler.set_epoch(epoch)
        reference += batches_of(full, 10**6)
    assert len(reference) == 2 * (22 // 4)
    first = loader()
    got = batches_of(first, 3)
    state = first.state_dict()
    assert state["position"] == 3 * 4 * 2
    resumed = loader()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # a checkpoint stores plain values
    resumed.sampler.set_epoch(0)
    got += batches_of(resumed, 10**6)
    resumed.sampler.set_epoch(1)
    got += batches_of(resumed, 10**6)
    assert [k for k, _ in got] == [k for k, _ in reference]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, reference))  # same posterior draws too
    done = loader()
    batches_of(done, 5)
    assert done.state_dict()["position"] == 44  # only the dropped partial batch was left: epoch over
    after = loader()
    after.load_state_dict(done.state_dict())
    assert after.sampler.epoch == 1 and len(batches_of(after, 10**6)) == 5


def fit(datamodule, max_steps, root, ckpt_path=None):
    module = KeyRecorder("latent")
    every = ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[every], limit_val_batches=0, default_root_dir=root)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module.keys


def test_lightning_resumes_mid_epoch_exactly(cache, tmp_path):
    def datamodule():
        return LatentDataModule(str(cache), str(cache), batch_size=4, num_workers=0, seed=3)

    dm = datamodule()
    assert dm.norm.scale.shape == (4, 1, 1) and dm.latent_shape == (4, 8, 8) and len(dm.val_dataloader()) == 11
    reference = fit(dm, max_steps=25, root=tmp_path / "a")  # 11 batches per epoch: crosses two epochs
    first = fit(datamodule(), max_steps=8, root=tmp_path / "b")
    resumed = fit(datamodule(), max_steps=25, root=tmp_path / "c", ckpt_path=tmp_path / "b" / "step=8.ckpt")
    assert first + resumed == reference
    at_epoch_end = fit(datamodule(), max_steps=25, root=tmp_path / "d", ckpt_path=tmp_path / "a" / "step=11.ckpt")
    assert reference[:11] + at_epoch_end == reference


def test_task_caches_train_and_val(ae_ckpt, tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        try:
            cfg = compose("config", overrides=["task=cache_latents", "data=shapes", "name=shapes_ae"])
        except ConfigCompositionException:  # `data` not in the defaults list: experiments add it
            cfg = compose("config", overrides=["task=cache_latents", "+data=shapes", "name=shapes_ae"])
    run_dir = ae_ckpt.parent.parent
    cfg.paths.run_dir, cfg.paths.data_dir = str(run_dir), str(tmp_path / "data")
    cfg.data.train.size, cfg.data.val.size, cfg.data.resolution = 20, 9, RESOLUTION
    cfg.task.samples_per_shard, cfg.task.num_workers, cfg.task.progress = 8, 0, False
    results = task.run(cfg)
    cache_dir = tmp_path / "data" / "latents" / "shapes_ae"
    for split, count in (("train", 20), ("val", 9)):
        manifest = read_json(cache_dir / split / "manifest.json")
        assert manifest["num_samples"] == count and manifest["source"]["size"] == count
        assert results[split].encoded == count
    assert task.run(cfg)["train"].shards_found_complete == 3
    cfg.task.ckpt = str(tmp_path / "nope.ckpt")
    with pytest.raises(ConfigError, match="ckpt"):
        task.run(cfg)


def test_shard_plan():
    plan = ShardPlan(num_inputs=44, samples_per_shard=8)
    assert plan.num_shards == 6 and plan.indices(5) == range(40, 44)
    assert list(plan.shards_for_rank(1, 4)) == [1, 5]
    with pytest.raises(ValueError):
        ShardPlan(0, 8)
