"""Aspect-ratio buckets: assignment and crop maths, a streaming cache of three aspect ratios (latents of each bucket's
size, counts per bucket in the sidecars), the reader's one-bucket batches (every latent once per epoch, exact resume)
and a short fit on bucketed latents."""
import io
import json
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from key_recorder import KeyRecorder
from ldm.data.buckets import bucket_crop_box, check_buckets, check_divisible, nearest_bucket
from ldm.data.datamodule import ImageDataModule
from ldm.data.latent_cache import LatentDataset
from ldm.data.latent_cache.encode import encode_moments
from ldm.data.latent_cache.format import read_json
from ldm.data.latent_cache.stream import cache_stream_latents
from ldm.data.latents import BucketBatchSampler, LatentDataModule, ResumableDataLoader, bucket_batches
from ldm.data.preprocess import Preprocess, prepare_sample
from ldm.data.skips import collate_kept
from ldm.data.transforms import square_crop_box, uint8_to_tensor
from ldm.data.webdataset_images import WebImageDataset
from ldm.diffusion.formulations import VPFormulation
from ldm.diffusion.loss import denoising_loss
from ldm.models import latent_diffusion
from ldm.models.latent_diffusion import LatentDiffusionModule, check_latent_sizes
from ldm.models.optimizer import AdamWSchedule
from ldm.nn.conditioners import Unconditional
from ldm.nn.dit import DiT
from ldm.nn.unet import UNet
from ldm.utils.errors import ConfigError
from ldm.utils.safe_config import safe_instantiate
from shard_fixtures import write_shard

ROOT = Path(__file__).resolve().parents[2]
NET = {"_target_": "ldm.nn.autoencoder.AutoencoderKL", "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1,
       "z_channels": 4, "embed_dim": 4}  # downsampling factor 2
BUCKETS = [[16, 16], [12, 20], [20, 12]]  # square, wide, tall: latents [4, 8, 8], [4, 6, 10], [4, 10, 6]
PRE = Preprocess(16, min_size=8, buckets=BUCKETS)
# (width, height) of each shard's images: square, wide (h/w 0.6, as bucket 1) and tall (as bucket 2), mixed
SIZES = [[(20, 20), (30, 18), (20, 20), (18, 30), (30, 18), (24, 22)],
         [(18, 30), (40, 22), (18, 30), (20, 20), (18, 30), (32, 20)]]
BUCKET_OF_SIZE = {(20, 20): 0, (24, 22): 0, (30, 18): 1, (40, 22): 1, (32, 20): 1, (18, 30): 2}


def jpeg(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


# --- the maths ---------------------------------------------------------------------------------------------------

def test_nearest_bucket_compares_aspect_ratios_in_log_space():
    buckets = check_buckets(BUCKETS)
    assert buckets == ((16, 16), (12, 20), (20, 12))
    assert [nearest_bucket(w, h, buckets) for w, h in [(100, 100), (400, 200), (200, 400), (101, 99)]] == [0, 1, 2, 0]
    # h/w = 0.78 is nearer 0.6 than 1 as a ratio, but nearer 1 in log space: |log 0.78| = 0.248 < log(0.78 / 0.6) = 0.262
    assert nearest_bucket(100, 78, buckets) == 0 and nearest_bucket(100, 77, buckets) == 1
    # 2:1 and 1:2 are equally far from a square: a tie goes to the first listed
    assert nearest_bucket(10, 10, ((2, 1), (1, 2))) == 0 and nearest_bucket(10, 10, ((1, 2), (2, 1))) == 0


def test_bucket_crop_box_is_the_largest_box_of_the_buckets_shape():
    assert bucket_crop_box(400, 200, (192, 320), "center") == (33, 0, 366, 200)  # 200 * 320 / 192 = 333.3 wide
    assert bucket_crop_box(200, 400, (320, 192), "center") == (0, 33, 200, 366)
    assert bucket_crop_box(300, 100, (16, 16), "center") == (100, 0, 200, 100)
    assert bucket_crop_box(30, 18, (12, 20), "center") == (0, 0, 30, 18)  # the same shape: the whole image
    for width, height in [(24, 16), (16, 24), (20, 20), (37, 11)]:  # a square bucket is today's square crop
        assert bucket_crop_box(width, height, (8, 8), "center") == square_crop_box(width, height, "center")
        torch.manual_seed(3)
        random_box = bucket_crop_box(width, height, (8, 8), "random")
        torch.manual_seed(3)
        assert random_box == square_crop_box(width, height, "random")
    torch.manual_seed(0)
    boxes = {bucket_crop_box(400, 200, (192, 320), "random") for _ in range(20)}
    assert len(boxes) > 1 and all(b[2] - b[0] == 333 and b[1] == 0 and 0 <= b[0] <= 67 for b in boxes)


def test_bad_buckets_are_config_errors():
    for bad in ([], [[16]], [[16, 0]], [[16, 16], [16, 16]]):
        with pytest.raises(ConfigError, match="bucket"):
            check_buckets(bad)
    with pytest.raises(ConfigError, match=r"\[\[12, 20\]\].*multiples of the factor \(8\)"):
        check_divisible(((16, 16), (12, 20)), 8, "the factor")


def test_preprocess_records_buckets_and_crops_to_them():
    assert "buckets" not in Preprocess(16).as_dict()  # a square cache's plan is what it was before buckets
    assert PRE.as_dict()["buckets"] == BUCKETS and PRE.buckets == ((16, 16), (12, 20), (20, 12))
    assert Preprocess(16, min_size=8, buckets=OmegaConf.create(BUCKETS)) == PRE  # from a config: the same settings
    prepared = prepare_sample({"__key__": "k", "jpg": jpeg(40, 22, 0), "txt": b"wide"}, PRE)
    assert prepared["pixels"].shape == (12, 20, 3)
    assert prepared["meta"]["bucket"] == 1 and prepared["meta"]["crop_box"] == [1, 0, 38, 22]  # 22 * 20 / 12 = 36.7
    assert "bucket" not in prepare_sample({"__key__": "k", "jpg": jpeg(40, 22, 0), "txt": b"x"}, Preprocess(16))["meta"]


def test_streaming_training_refuses_buckets(tmp_path):
    write_shard(tmp_path / "0.tar", [("a", {"jpg": jpeg(20, 20, 0), "txt": b"x"})])
    dataset = WebImageDataset(str(tmp_path / "0.tar"), resolution=16, buckets=BUCKETS)
    assert dataset.preprocess.buckets == PRE.buckets  # what task=cache_latents reads
    with pytest.raises(ConfigError, match="task=cache_latents"):
        ImageDataModule(dataset, batch_size=1).train_dataloader()


def test_config_passes_buckets_to_the_caches_preprocessing(shards):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["task=cache_latents", "+data=webdataset", f"data.urls={shards}",
                                           "data.resolution=16", "data.buckets=[[16,16],[12,20],[20,12]]"])
    datamodule = safe_instantiate(cfg.data, stored=False, where="data")
    assert datamodule.train.preprocess.buckets == PRE.buckets and datamodule.buckets == BUCKETS
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["task=cache_latents", "+data=webdataset", f"data.urls={shards}"])
    assert safe_instantiate(cfg.data, stored=False, where="data").train.preprocess.buckets is None  # the default


def test_bucket_batches_cut_each_bucket_in_epoch_order():
    bucket_of = np.array([0, 1, 0, 2, 1, 0, 0, 1])
    order = np.array([7, 6, 5, 4, 3, 2, 1, 0])
    grouped, starts, lengths = bucket_batches(order, bucket_of, batch_size=2, drop_last=False)
    batches = [grouped[s : s + n].tolist() for s, n in zip(starts, lengths)]
    assert batches == [[6, 5], [2, 0], [7, 4], [1], [3]]
    grouped, starts, lengths = bucket_batches(order, bucket_of, batch_size=2, drop_last=True)
    assert [grouped[s : s + n].tolist() for s, n in zip(starts, lengths)] == [[6, 5], [2, 0], [7, 4]]


# --- the cache ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("shards")
    for shard, sizes in enumerate(SIZES):
        samples = [(f"{shard}{j:04d}", {"jpg": jpeg(*size, seed=10 * shard + j), "txt": f"c{shard}{j}".encode()})
                   for j, size in enumerate(sizes)]
        samples.insert(2, (f"{shard}tiny", {"jpg": jpeg(4, 6, 0), "txt": b"too small"}))  # skipped, counted
        write_shard(root / f"{shard}.tar", samples)
    return [str(root / f"{s}.tar") for s in range(len(SIZES))]


@pytest.fixture(scope="module")
def first_stage():
    torch.manual_seed(0)
    return safe_instantiate(OmegaConf.create(NET)).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, first_stage, shards):
    out = tmp_path_factory.mktemp("cache") / "train"
    result = cache_stream_latents(first_stage, shards, out, PRE, first_stage_hash="tiny", batch_size=2, progress=False)
    assert (result.encoded, result.skipped) == (12, 2)
    return out


def test_cache_holds_each_buckets_latent_size_and_counts_per_bucket(cache, first_stage, shards):
    manifest = read_json(cache / "manifest.json")
    assert manifest["buckets"] == BUCKETS and manifest["source"]["preprocess"]["buckets"] == BUCKETS
    assert manifest["latent_shapes"] == [[4, 8, 8], [4, 6, 10], [4, 10, 6]]
    expected = [[sum(BUCKET_OF_SIZE[s] == b for s in sizes) for b in range(3)] for sizes in SIZES]
    assert expected == [[3, 2, 1], [1, 2, 3]]
    assert [read_json(cache / f"shard-{s:06d}.json")["bucket_counts"] for s in range(2)] == expected
    assert [s["bucket_counts"] for s in manifest["shards"]] == expected and manifest["bucket_counts"] == [4, 4, 4]
    data = LatentDataset(cache, scale=1.0, flip=False)
    assert data.buckets == [(16, 16), (12, 20), (20, 12)] and len(data) == 12
    for index in range(len(data)):
        item = data[index]
        width, height = item["original_size"].tolist()
        bucket = BUCKET_OF_SIZE[(width, height)]
        assert data.bucket_of[index] == bucket and item["latent"].shape == (4, *np.array(BUCKETS[bucket]) // 2)
    # the stored posterior is the encoding of the image cropped to its bucket (a tall one: bucket 2, 20 x 12 pixels)
    index = int(np.flatnonzero(data.bucket_of == 2)[0])
    key = data[index]["key"]
    shard, position = int(key[0]), int(key[1:])
    prepared = prepare_sample({"__key__": key, "jpg": jpeg(*SIZES[shard][position], seed=10 * shard + position),
                               "txt": b"c"}, PRE)
    assert prepared["meta"]["crop_box"] == data[index]["crop_box"].tolist() == [0, 0, 18, 30]  # the bucket's shape
    direct = encode_moments(first_stage, uint8_to_tensor(prepared["pixels"])[None], flip=True)
    torch.testing.assert_close(data.moments(index)["mean"], direct["mean.npy"][0])
    torch.testing.assert_close(data.moments(index)["flip.std"], direct["flip.std.npy"][0])


def test_other_buckets_or_sizes_are_refused(cache, first_stage, shards, tmp_path):
    with pytest.raises(ConfigError, match="planned differently"):
        cache_stream_latents(first_stage, shards, cache, Preprocess(16, min_size=8, buckets=BUCKETS[:2]),
                             first_stage_hash="tiny", progress=False)
    with pytest.raises(ConfigError, match=r"\[\[15, 16\]\].*downsampling factor \(2\)"):
        cache_stream_latents(first_stage, shards, tmp_path / "odd", Preprocess(16, buckets=[[16, 16], [15, 16]]),
                             first_stage_hash="tiny", progress=False)


def test_reader_never_scans_tars_for_buckets(cache, tmp_path, monkeypatch):
    from ldm.data.latent_cache import reader

    monkeypatch.setattr(reader, "index_shard", lambda *_: pytest.fail("scanned a tar"))
    LatentDataset(cache)
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    sidecar = copy / "shard-000001.json"
    content = json.loads(sidecar.read_text())
    del content["index"]
    sidecar.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="bucketed cache is read through its sidecars"):
        LatentDataset(copy)


# --- the reader --------------------------------------------------------------------------------------------------

def keys_and_shapes(loader, count: int | None = None) -> list[tuple[list[str], tuple[int, ...], torch.Tensor]]:
    out = []
    for batch in loader:
        out.append((batch["key"], tuple(batch["latent"].shape[1:]), batch["latent"]))
        if len(out) == count:
            break
    return out


def test_batches_hold_one_bucket_and_cover_every_latent_once_per_epoch(cache):
    dm = LatentDataModule(str(cache), batch_size=2, seed=1)
    assert dm.latent_shapes == [(4, 8, 8), (4, 6, 10), (4, 10, 6)]
    loader = dm.train_dataloader()
    bucket_of_key = {dm.train[i]["key"]: int(dm.train.bucket_of[i]) for i in range(len(dm.train))}
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        batches = keys_and_shapes(loader)
        assert len(batches) == len(loader) == 6
        for keys, shape, _ in batches:
            assert len({bucket_of_key[k] for k in keys}) == 1 and shape == dm.latent_shapes[bucket_of_key[keys[0]]]
        assert sorted(k for keys, _, _ in batches for k in keys) == sorted(bucket_of_key)
        epochs.append([keys for keys, _, _ in batches])
    assert epochs[0] != epochs[1]  # reshuffled per epoch ...
    again = LatentDataModule(str(cache), batch_size=2, seed=1).train_dataloader()
    assert [keys for keys, _, _ in keys_and_shapes(again)] == epochs[0]  # ... and the same for the same seed
    # 4 latents per bucket in batches of 3: each bucket's partial batch is dropped in training, kept in validation
    dm = LatentDataModule(str(cache), str(cache), batch_size=3, seed=1)
    train = keys_and_shapes(dm.train_dataloader())
    assert [len(keys) for keys, _, _ in train] == [3, 3, 3]
    assert sorted(shape for _, shape, _ in train) == sorted(dm.latent_shapes)
    val = keys_and_shapes(dm.val_dataloader())
    assert [len(keys) for keys, _, _ in val] == [3, 1, 3, 1, 3, 1]  # in bucket order, the same every time
    assert sorted(k for keys, _, _ in val for k in keys) == sorted(bucket_of_key)


def test_ranks_take_whole_batches_of_one_epoch_order(cache):
    data = LatentDataset(cache, seed=2)
    ranks = [BucketBatchSampler(data, data.bucket_of, 2, rank, 4, seed=2) for rank in range(4)]
    per_rank = [list(sampler) for sampler in ranks]
    assert [len(b) for b in per_rank] == [2, 2, 2, 2]  # 6 batches padded to 8 by wrapping around
    single = list(BucketBatchSampler(data, data.bucket_of, 2, seed=2))
    assert [per_rank[step % 4][step // 4] for step in range(8)] == single + single[:2]


def loader(data: LatentDataset, rank: int = 0, world_size: int = 1, batch_size: int = 2, num_workers: int = 0):
    sampler = BucketBatchSampler(data, data.bucket_of, batch_size, rank, world_size, seed=7)
    # batch_size=None: the sampler yields whole batches, collate_kept stacks them (LatentDataModule's loaders do the same)
    return ResumableDataLoader(data, None, sampler=sampler, num_workers=num_workers, collate_fn=collate_kept)


def run(loader, stop: int | None = None) -> list[tuple[list[str], torch.Tensor]]:
    """Batches from the sampler's epoch to the end of epoch 1, as Lightning's fit loop runs them; or the first `stop`."""
    out = []
    for epoch in range(loader.sampler.epoch, 2):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            out.append((batch["key"], batch["latent"]))
            if len(out) == stop:
                return out
    return out


def test_resume_mid_epoch_continues_exactly(cache):
    data = LatentDataset(cache, seed=7)
    reference = run(loader(data))
    assert len(reference) == 12
    # mid-epoch, at the epoch's end, into the next epoch (resumed with worker processes): (epoch, batches) saved
    for stop, workers, saved in ((2, 0, (0, 2)), (6, 0, (0, 6)), (8, 2, (1, 2))):
        first = loader(data)
        done = run(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # a checkpoint stores plain values
        assert (state["epoch"], state["position"]) == saved
        resumed = loader(data, num_workers=workers)
        resumed.load_state_dict(state)
        got = done + run(resumed)
        assert [k for k, _ in got] == [k for k, _ in reference]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, reference))  # same posterior draws too


def test_resume_on_another_world_size_and_refusals(cache):
    data = LatentDataset(cache, seed=7)
    two = [loader(data, rank, 2) for rank in range(2)]
    done = [k for lo in two for keys, _, _ in keys_and_shapes(lo, 2) for k in keys]  # 2 batches on each rank
    state = two[0].state_dict()
    assert state == two[1].state_dict() and state["position"] == 4
    one = loader(data)
    one.load_state_dict(state)
    rest = [k for keys, _, _ in keys_and_shapes(one) for k in keys]
    assert len(rest) == 4 and sorted(done + rest) == sorted(data[i]["key"] for i in range(len(data)))
    with pytest.raises(ValueError, match="same cache and data.batch_size"):
        loader(data, batch_size=3).load_state_dict(state)
    unbucketed = {k: state[k] for k in ("epoch", "position", "seed", "num_samples")}
    with pytest.raises(ValueError, match="saved without aspect-ratio buckets"):
        loader(data).load_state_dict(unbucketed)


def fit_keys(cache, max_steps: int, root, ckpt_path=None) -> list[list[str]]:
    module = KeyRecorder("latent")
    every = ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[every], limit_val_batches=0, default_root_dir=root)
    trainer.fit(module, datamodule=LatentDataModule(str(cache), batch_size=2, seed=3), ckpt_path=ckpt_path)
    return module.keys


def test_lightning_resumes_bucketed_batches_exactly(cache, tmp_path):
    reference = fit_keys(cache, 14, tmp_path / "a")  # 6 batches per epoch: crosses two epoch ends
    first = fit_keys(cache, 4, tmp_path / "b")
    assert first + fit_keys(cache, 14, tmp_path / "c", ckpt_path=tmp_path / "b" / "step=4.ckpt") == reference
    assert reference[:6] + fit_keys(cache, 14, tmp_path / "d", ckpt_path=tmp_path / "a" / "step=6.ckpt") == reference


# --- the model ---------------------------------------------------------------------------------------------------

def test_backbones_take_every_bucket_size_that_fits():
    shapes = [(4, 8, 8), (4, 6, 10), (4, 10, 6)]
    dit = DiT(4, patch_size=2, hidden_size=32, depth=1, num_heads=2)
    for shape in shapes:  # the sin-cos position embedding is built for each grid
        assert dit(torch.randn(1, *shape), torch.zeros(1)).shape == (1, *shape)
    check_latent_sizes(dit, shapes)
    with pytest.raises(ConfigError, match=r"\[\[5, 10\]\].*multiples of 2"):
        check_latent_sizes(dit, [(4, 8, 8), (4, 5, 10)])
    unet = UNet(4, model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[], head_dim=32)
    with pytest.raises(ConfigError, match=r"\[\[6, 10\], \[10, 6\]\].*multiples of 4"):
        check_latent_sizes(unet, shapes)


def test_fit_steps_on_bucketed_latents(cache, monkeypatch):
    torch.manual_seed(0)
    unet = UNet(4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[], head_dim=32)
    module = LatentDiffusionModule(unet, VPFormulation(), Unconditional(), latent_shape=(4, 8, 8),
                                   optimizer=AdamWSchedule(lr=1e-3), ema_decay=None)
    shapes, losses = [], []

    def spy(denoiser, x0, cond, formulation, *, generator=None):
        shapes.append(tuple(x0.shape))
        loss, sigma = denoising_loss(denoiser, x0, cond, formulation, generator=generator)
        losses.append(loss.mean().item())
        return loss, sigma

    monkeypatch.setattr(latent_diffusion, "denoising_loss", spy)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=LatentDataModule(str(cache), batch_size=2, num_workers=0, seed=0))
    assert sorted(shapes) == sorted([(2, 4, 8, 8), (2, 4, 6, 10), (2, 4, 10, 6)] * 2)  # one epoch: each bucket twice
    assert all(np.isfinite(losses))
