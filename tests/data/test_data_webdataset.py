"""webdataset shards: every good sample exactly once across workers and ranks; bad ones skipped and counted."""

import io
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from key_recorder import KeyRecorder
from ldm.data.datamodule import ImageDataModule
from ldm.data.stream_loader import StreamLoader
from ldm.data.webdataset_images import WebImageDataset
from shard_fixtures import write_shard

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def encode(fmt: str, value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((12, 20, 3), value, np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def sample(key: str, image_ext: str | None = "jpg", image: bytes | None = None) -> tuple[str, dict]:
    files = {"txt": f"caption {key}".encode(), "json": json.dumps({"key": key}).encode()}
    if image_ext is not None:
        files[image_ext] = image if image is not None else encode({"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[image_ext], 99)
    return key, files


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, set[str]]:
    """4 shards: 19 good samples; 1 undecodable image, 1 without image, 1 cut off by a truncated shard."""
    root = tmp_path_factory.mktemp("shards")
    good = set()
    write_shard(root / "shard-000.tar", [sample(f"000{i:03d}") for i in range(6)])
    good |= {f"000{i:03d}" for i in range(6)}
    write_shard(root / "shard-001.tar", [sample(f"001{i:03d}", "png") for i in range(5)] + [sample("001005", image=b"garbage")])
    good |= {f"001{i:03d}" for i in range(5)}
    json_caption = ("002005", {"json": json.dumps({"caption": "from json"}).encode(), "webp": encode("WEBP", 7)})
    labelled = ("002004", {"cls": b"3", "txt": b"caption 002004", "jpg": encode("JPEG", 1)})
    write_shard(root / "shard-002.tar", [sample(f"002{i:03d}", "webp") for i in range(3)] + [sample("002003", None), labelled, json_caption])
    good |= {"002000", "002001", "002002", "002004", "002005"}
    write_shard(root / "shard-003.tar", [sample(f"003{i:03d}") for i in range(6)])
    data = (root / "shard-003.tar").read_bytes()
    cut = data.index(b"003003.jpg") + 512 + 100  # inside the image data of the 4th sample
    (root / "shard-003.tar").write_bytes(data[:cut])
    good |= {"003000", "003001", "003002"}
    return str(root / "shard-{000..003}.tar"), good


def read(dataset, num_workers: int = 2) -> list[dict]:
    loader = DataLoader(dataset, batch_size=3, num_workers=num_workers)
    return [
        {"key": k, "caption": c, "label": int(l), "shape": tuple(im.shape)}
        for batch in loader
        for k, c, l, im in zip(batch["key"], batch["caption"], batch["label"], batch["image"])
    ]


def test_finite_pass_reads_each_good_sample_once_and_counts_bad_ones(shards):
    urls, good = shards
    ds = WebImageDataset(urls, resolution=8)
    items = read(ds, num_workers=2)
    counts = Counter(item["key"] for item in items)
    assert set(counts) == good and set(counts.values()) == {1}
    assert ds.num_skipped == 3  # undecodable image, missing image, partial sample of the truncated shard
    assert ds.read_errors.count >= 1  # the truncated shard itself
    by_key = {item["key"]: item for item in items}
    assert by_key["000001"]["caption"] == "caption 000001" and by_key["002005"]["caption"] == "from json"
    assert by_key["002004"]["label"] == 3 and by_key["000001"]["label"] == -1
    assert by_key["001002"]["shape"] == (3, 8, 8)
    # a second pass (same workers or not) reads the same samples again
    assert Counter(item["key"] for item in read(ds, num_workers=0)) == counts


def test_two_ranks_split_disjoint_and_complete(shards):
    urls, good = shards
    per_rank = [[item["key"] for item in read(WebImageDataset(urls, resolution=8, rank=r, world_size=2))] for r in (0, 1)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(good)


def test_datamodule_pins_the_trainer_rank_before_workers_start(shards):
    urls, good = shards
    dm = ImageDataModule(WebImageDataset(urls, resolution=8), batch_size=2, num_workers=0)
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)
    dm.setup("fit")
    assert (dm.train.rank, dm.train.world_size) == (1, 2)
    keys = {k for batch in dm.train_dataloader() for k in batch["key"]}
    assert keys == {k for k in good if k[:3] in ("001", "003")}  # shards 1 and 3 belong to rank 1


def test_resampled_epochs_have_fixed_length_and_are_reproducible(shards):
    urls, good = shards
    ds = WebImageDataset(urls, resolution=8, resampled=True, epoch_samples=10, shuffle_buffer=4)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    first, second = [item["key"] for item in loader], [item["key"] for item in loader]
    assert len(first) == len(second) == 10 and set(first + second) <= good
    assert first != second  # persistent workers count their passes: a new epoch draws anew

    def stream(seed: int, epoch: int | None = None) -> list[str]:
        ds = WebImageDataset(urls, resolution=8, resampled=True, epoch_samples=12, shuffle_buffer=4, seed=seed)
        if epoch is not None:
            ds.set_epoch(epoch)
        return [item["key"] for item in ds]

    # seeded by (seed, epoch, rank, worker) only: not by torch's global state
    torch.manual_seed(1)
    assert stream(0) == stream(0, epoch=0) and stream(0) != stream(1) and stream(0) != stream(0, epoch=1)
    # set_epoch reaches workers made before it (persistent ones) and a fresh copy alike
    ds.set_epoch(7)
    again = DataLoader(WebImageDataset(urls, resolution=8, resampled=True, epoch_samples=10, shuffle_buffer=4),
                       batch_size=None, num_workers=2)
    again.dataset.set_epoch(7)
    assert [item["key"] for item in loader] == [item["key"] for item in again]


def test_equalized_finite_pass_gives_every_rank_the_same_count(tmp_path):
    """Uneven shards: a plain finite pass gives ranks different counts (DDP would hang); epoch_samples evens them."""
    for index, size in enumerate((7, 1, 4, 2, 9)):
        write_shard(tmp_path / f"u-{index}.tar", [sample(f"{index}{i:03d}") for i in range(size)])
    urls = str(tmp_path / "u-{0..4}.tar")
    finite = [[item["key"] for item in read(WebImageDataset(urls, resolution=8, rank=r, world_size=2))] for r in (0, 1)]
    assert [len(keys) for keys in finite] == [20, 3]  # shards 0, 2, 4 vs 1, 3
    for r, keys in enumerate(finite):
        ds = WebImageDataset(urls, resolution=8, rank=r, world_size=2, epoch_samples=12, shuffle_buffer=3)
        got = [item["key"] for item in read(ds)]
        assert len(got) == 12 and set(got) <= set(keys)  # its own shards only, cycled when they run short
        assert r == 0 or set(got) == set(keys)
    with pytest.raises(ValueError, match="no shards"):  # 5 shards cannot give each of 6 ranks a share
        next(iter(WebImageDataset(urls, resolution=8, rank=5, world_size=6, epoch_samples=12)))


def test_stream_loader_resumes_with_the_next_pass_not_a_replay(shards, tmp_path):
    urls, _ = shards

    def fit(max_steps: int, root: Path, ckpt_path: Path | None = None) -> list[list[str]]:
        data = WebImageDataset(urls, resolution=8, resampled=True, epoch_samples=8, shuffle_buffer=4)
        module = KeyRecorder("image")
        every_step = ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1, filename="{step}")
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=root, callbacks=[every_step])
        trainer.fit(module, StreamLoader(data, batch_size=2, drop_last=True), ckpt_path=ckpt_path)
        return module.keys

    reference = fit(8, tmp_path / "a")  # passes 0 and 1, 4 batches each
    assert reference[:4] != reference[4:]
    saved = torch.load(tmp_path / "a" / "step=2.ckpt", weights_only=False)["loops"]["fit_loop"]["state_dict"]
    assert saved["combined_loader"] == [{"passes": 1}]  # the pass in progress counted
    # preempted after step 2: the rest of that epoch comes from pass 1, not a replay of pass 0
    assert fit(6, tmp_path / "b", ckpt_path=tmp_path / "a" / "step=2.ckpt") == reference[4:8]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.urls"):
        WebImageDataset(str(tmp_path / "missing-{0..3}.tar"))
    write_shard(tmp_path / "a.tar", [sample("a")])
    with pytest.raises(ValueError, match="epoch_samples"):
        WebImageDataset(str(tmp_path / "a.tar"), resampled=True)
    with pytest.raises(ValueError, match="epoch_samples"):
        WebImageDataset(str(tmp_path / "a.tar"), epoch_samples=0)
    with pytest.raises(ValueError, match="rank"):
        WebImageDataset(str(tmp_path / "a.tar"), rank=2, world_size=2)
    (tmp_path / "b.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(RuntimeError, match="no usable sample"):  # an error, not an endless loop
        next(iter(WebImageDataset(str(tmp_path / "b.tar"), resampled=True, epoch_samples=10)))
    with pytest.raises(RuntimeError, match="no usable sample"):  # cycling shards without a sample: the same
        next(iter(WebImageDataset(str(tmp_path / "b.tar"), epoch_samples=10)))


def test_config_requires_urls_and_builds(shards):
    urls, _ = shards
    cfg = OmegaConf.create({"data": OmegaConf.load(CONFIGS / "data" / "webdataset.yaml")})
    assert OmegaConf.is_missing(cfg.data, "urls")
    cfg.data.urls, cfg.data.resolution = urls, 8
    dm = instantiate(cfg.data)
    assert isinstance(dm.train, WebImageDataset) and dm.train.resampled and len(dm.train.shards) == 4
