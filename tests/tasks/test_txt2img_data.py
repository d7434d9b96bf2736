"""`+experiment=txt2img` on img2dataset shards, both ways, at tiny size: the cache written from the shards
(data=stream_latents, the experiment's default) and encoding on the fly (data=webdataset); the same records either
way."""
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import QUIET, compose_run, restored_environ
from ldm.data.shapes import ShapesDataset
from ldm.utils.cli import composition_problem, normalise_experiment

ROOT = Path(__file__).resolve().parents[2]
STEPS = 2
SHARDS, PER_SHARD = 2, 6


def write_shards(folder: Path) -> str:
    """img2dataset layout: {key}.jpg (24 x 20, so the centre crop has an offset), .txt, .json; one non-image member."""
    scenes = iter(ShapesDataset(size=SHARDS * PER_SHARD, resolution=24, seed=5))
    for shard in range(SHARDS):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for j in range(PER_SHARD):
                item, key = next(scenes), f"{shard:05d}{j:04d}"
                pixels = ((item["image"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels.numpy()).crop((0, 0, 24, 20)).save(buffer, "JPEG", quality=95)
                image = b"not an image" if (shard, j) == (1, 0) else buffer.getvalue()
                members = {"jpg": image, "txt": item["caption"].encode(), "json": json.dumps({"key": key}).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{SHARDS - 1:05d}}}.tar")


@pytest.fixture(scope="module")
def setup(tiny_runs, tiny_clip, tmp_path_factory) -> dict:
    """Shards, a local OpenCLIP tower file and the overrides a user sets (first stage, tower, URLs), shrunk."""
    from ldm.nn.conditioners import OpenCLIPTextConditioner

    tmp = tmp_path_factory.mktemp("txt2img_data")
    (tmp / "shards").mkdir()
    urls = write_shards(tmp / "shards")
    tower = tmp / "open_clip_text.pt"
    torch.save(OpenCLIPTextConditioner(model_name=tiny_clip, pretrained=None).model.state_dict(), tower)
    # the keys the README names: first stage (here the tiny f=2 shapes autoencoder), tower weights, shard URLs
    user = [f"paths.root_dir={tiny_runs.root}", "first_stage_name=ae", f"paths.latents_dir={tmp / 'latents'}",
            f"model.conditioner.model_name={tiny_clip}", f"model.conditioner.pretrained={tower}"]
    tiny = ["trainer=cpu", "trainer.devices=1", f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}",
            f"checkpoint_every_n_steps={STEPS}", "model.latent_shape=[4,8,8]", "model.backbone.model_channels=32",
            "model.backbone.channel_mult=[1,2]", "model.backbone.num_res_blocks=1",
            "model.backbone.attention_resolutions=[2]", "model.backbone.head_dim=16", "model.backbone.context_dim=32",
            "model.optimizer.warmup_steps=0", "data.batch_size=4", "data.num_workers=0", "callbacks=none",
            "~callbacks.periodic_eval", *QUIET]  # the experiment's reference suite needs real images
    return {"urls": urls, "user": user, "tiny": tiny}


def test_the_documented_commands_compose_as_typed():
    """`+experiment=txt2img` (cached) and `... data=webdataset data.urls='...'` (on the fly) compose for main.py."""
    for extra in ([], ["data=webdataset", "data.urls='/data/laion/{00000..01023}.tar'"]):
        argv = normalise_experiment(["main.py", "+experiment=txt2img", *extra])
        assert composition_problem(argv, ROOT / "configs", "config") is None
    cached = compose_run("txt2img")
    assert cached.data._target_ == "ldm.data.latents.LatentDataModule" and cached.data.val_path is None
    streamed = compose_run("txt2img", ["data=webdataset", "data.urls=x.tar"])
    assert streamed.data.train._target_ == "ldm.data.webdataset_images.WebImageDataset"
    assert streamed.data.batch_size == cached.data.batch_size == 32  # the experiment's own per-GPU batch, both ways


def _first_batch(trainer) -> dict:
    return next(iter(trainer.datamodule.train_dataloader()))


@pytest.mark.slow
def test_txt2img_trains_on_the_fly_and_on_the_cache_of_the_same_shards(setup, tiny_runs):
    from ldm.tasks import cache_latents, fit

    urls, user, tiny = setup["urls"], setup["user"], setup["tiny"]
    shards = ["data=webdataset", f"data.urls='{urls}'", "data.resolution=16"]
    with restored_environ():
        # on the fly: the frozen first stage encodes each batch of images (LatentDiffusionModule.batch_latents)
        streamed = fit.run(compose_run("txt2img", [
            *user, *tiny, *shards, "name=txt2img_streamed", "data.train.epoch_samples=8", "data.train.shuffle_buffer=4",
            "model.latent_scale=1.0",  # on the fly nothing measures the latents' std: the user sets it (README)
        ]))
        # cached: the autoencoder experiment writes the cache the txt2img experiment reads by default
        result = cache_latents.run(compose_run("autoencoder_kl_f8", [
            f"paths.root_dir={tiny_runs.root}", "name=ae", f"paths.latents_dir={user[2].split('=', 1)[1]}",
            *shards, "task=cache_latents", "task.num_workers=0", "task.progress=false",
        ]))
        cached = fit.run(compose_run("txt2img", [*user, *tiny, "name=txt2img_cached"]))

    assert streamed.global_step == cached.global_step == STEPS
    manifest = json.loads(result["train"].manifest.read_text())
    assert manifest["num_samples"] == SHARDS * PER_SHARD - 1 and manifest["skipped"]["reasons"] == {"not an image": 1}

    images = _first_batch(streamed)
    assert images["image"].shape == (4, 3, 16, 16)
    module = streamed.lightning_module
    assert module.batch_latents(images, torch.Generator().manual_seed(0)).shape == (4, 4, 8, 8)
    latents = _first_batch(cached)
    assert latents["latent"].shape == (4, 4, 8, 8) and "image" not in latents
    # the same record for a key from either source: caption, original size (w, h), centre crop box
    records = {}
    for batch in (images, latents):
        for i, key in enumerate(batch["key"]):
            records.setdefault(key, []).append((batch["caption"][i], batch["original_size"][i].tolist(),
                                                batch["crop_box"][i].tolist()))
    both = [r for r in records.values() if len(r) == 2]
    assert all(r[0] == r[1] for r in both)
    assert all(r[0][1:] == ([24, 20], [2, 0, 22, 20]) for r in records.values())
