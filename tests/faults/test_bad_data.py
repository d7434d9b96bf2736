"""Bad data: a corrupt image is a counted skip (or, configured to raise, a one-line error naming it) when caching and
when training, never a substitute; a flipped byte in a cached latent record fails its crc32 on read."""
import io
import shutil
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.datamodule import ImageDataModule
from ldm.data.image_folder import ImageFolderDataset
from ldm.data.latent_cache import CacheResult, LatentDataset, cache_latents
from ldm.data.latent_cache.encode import encode_moments
from ldm.data.latent_cache.format import MANIFEST, read_json
from ldm.data.latent_cache.reader import sample_generator
from ldm.data.latents import LatentDataModule
from ldm.data.shapes import ShapesDataset
from ldm.nn.autoencoder import AutoencoderKL
from ldm.utils.atomic import atomic_write_json
from ldm.utils.errors import ConfigError, CorruptDataError

RESOLUTION = 16
NAMES = ["a", "b", "c", "d", "e", "f"]  # c.png is the corrupt one
CORRUPT = "c.png"


@pytest.fixture(scope="module")
def first_stage() -> AutoencoderKL:
    """A tiny untrained f=2 autoencoder: latents [4, 8, 8] of 16 px images."""
    torch.manual_seed(0)
    return AutoencoderKL(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, embed_dim=4).eval()


def write_cache(first_stage, dataset, out_dir: Path, **options) -> CacheResult:
    options = {"first_stage_hash": "tiny", "samples_per_shard": 8, "batch_size": 4, "flip": False, "progress": False,
               **options}
    return cache_latents(first_stage, dataset, out_dir, **options)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Six 16 px PNGs of distinct colours; c.png holds bytes that are no image."""
    root = tmp_path / "images"
    root.mkdir()
    for i, name in enumerate(NAMES):
        Image.fromarray(np.full((RESOLUTION, RESOLUTION, 3), 40 * i, np.uint8)).save(root / f"{name}.png")
    (root / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not a png")
    return root


# --- a corrupt image in a folder ---

def test_caching_skips_and_counts_a_corrupt_image(first_stage, folder, tmp_path, capsys):
    from ldm.tasks.cache_latents import _report  # the task's printout (imports Lightning: not at the top)

    dataset = ImageFolderDataset(str(folder), resolution=RESOLUTION)
    out = tmp_path / "cache"
    result = write_cache(first_stage, dataset, out)
    manifest = read_json(out / MANIFEST)
    assert result.skipped == 1 and result.encoded == 5 and manifest["num_samples"] == 5
    assert manifest["skipped"]["total"] == 1
    assert manifest["skipped"]["reasons"] == {"unreadable image: UnidentifiedImageError": 1}
    [example] = manifest["skipped"]["examples"]
    assert example["index"] == 2 and example["key"] == CORRUPT and example["message"]
    # nothing substituted: each readable image cached once, under its own key, as its own encoding
    cached = LatentDataset(out, scale=1.0, flip=False)
    assert [cached[i]["key"] for i in range(len(cached))] == ["a", "b", "d", "e", "f"]
    good = torch.stack([dataset[i]["image"] for i in (0, 1, 3, 4, 5)])
    direct = encode_moments(first_stage, good, flip=False)["mean.npy"]
    assert torch.equal(torch.stack([cached.moments(i)["mean"] for i in range(5)]), direct)

    _report("train", out, result)
    printed = capsys.readouterr().out
    assert "skipped 1;" in printed
    assert "1 inputs skipped {'unreadable image: UnidentifiedImageError': 1} (e.g. c.png" in printed


def test_caching_raises_on_a_corrupt_image_when_configured(first_stage, folder, tmp_path):
    dataset = ImageFolderDataset(str(folder), resolution=RESOLUTION, on_corrupt="raise")
    out = tmp_path / "cache"
    with pytest.raises(CorruptDataError) as raised:  # raised in the main process, not wrapped by a worker
        write_cache(first_stage, dataset, out, num_workers=2)
    message = str(raised.value)
    assert "\n" not in message and f"{folder / CORRUPT}" in message and "on_corrupt=skip" in message
    assert not (out / MANIFEST).exists() and not list(out.glob("shard-*")) and not list((out / "claims").iterdir())


def test_training_from_a_folder_skips_a_corrupt_image(folder):
    skip = ImageDataModule(ImageFolderDataset(str(folder), resolution=RESOLUTION), batch_size=2, pin_memory=False)
    keys = [key for batch in skip.train_dataloader() for key in batch["key"]]
    assert sorted(keys) == ["a", "b", "d", "e", "f"]  # 3 batches of 2, one with c.png left out: not replaced
    assert skip.train.num_skipped == 1

    strict = ImageFolderDataset(str(folder), resolution=RESOLUTION, on_corrupt="raise")
    with pytest.raises(CorruptDataError, match=f"corrupt image .*{CORRUPT}") as raised:
        list(ImageDataModule(strict, batch_size=2, pin_memory=False).train_dataloader())
    assert "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match="on_corrupt"):
        ImageFolderDataset(str(folder), on_corrupt="ignore")


# --- a flipped byte in a cached latent record ---

@pytest.fixture(scope="module")
def cache(first_stage, tmp_path_factory) -> Path:
    """12 shapes in shards of 8 and 4, mirrored posteriors stored."""
    out = tmp_path_factory.mktemp("latents") / "train"
    write_cache(first_stage, ShapesDataset(size=12, resolution=RESOLUTION, seed=5), out, flip=True)
    return out


def member_offset(shard: Path, name: str) -> int:
    with tarfile.open(shard) as tar:
        return tar.getmember(name).offset_data


def flipped_copy(cache: Path, tmp_path: Path, member: str) -> Path:
    """The cache with one byte inverted inside `member` of shard 0 (same size: only a checksum can tell)."""
    out = tmp_path / "flipped"
    shutil.copytree(cache, out)
    shard = out / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[member_offset(shard, member) + 140] ^= 0xFF  # past the 128-byte npy header: a latent value
    shard.write_bytes(bytes(data))
    return out


def test_every_record_carries_a_crc32_of_its_members(cache):
    with tarfile.open(cache / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    order = ["json", "mean.npy", "std.npy", "flip.mean.npy", "flip.std.npy"]
    assert read_json(cache / MANIFEST)["members"] == [*order, "crc32"]
    for key in (f"{i:09d}" for i in range(8)):
        expected = zlib.crc32(b"".join(members[f"{key}.{ext}"] for ext in order))
        assert members[f"{key}.crc32"] == f"{expected:08x}".encode()


def test_a_flipped_byte_raises_naming_shard_and_record(cache, tmp_path):
    out = flipped_copy(cache, tmp_path, "000000003.mean.npy")
    data = LatentDataset(out)  # sizes match: construction cannot tell
    with pytest.raises(CorruptDataError) as raised:
        data[3]
    message = str(raised.value)
    assert "\n" not in message and "shard-000000.tar" in message and "record 000000003" in message
    assert "re-run task=cache_latents" in message.lower() and "data.verify=true" in message
    assert data[2]["key"] and data[4]["key"]  # its neighbours read fine
    # training reads through the DataModule's loader: the same error, not a silent step
    with pytest.raises(CorruptDataError, match="record 000000003"):
        list(LatentDataModule(str(out), batch_size=4, num_workers=0, pin_memory=False).train_dataloader())


def test_skip_mode_counts_the_damaged_record(cache, tmp_path):
    out = flipped_copy(cache, tmp_path, "000000003.flip.std.npy")
    dm = LatentDataModule(str(out), str(out), batch_size=4, num_workers=0, pin_memory=False, on_corrupt="skip")
    keys = [key for batch in dm.train_dataloader() for key in batch["key"]]
    intact = LatentDataset(cache)
    assert sorted(keys) == sorted(intact[i]["key"] for i in range(12) if i != 3)
    assert dm.train.num_skipped == 1
    val_keys = [key for batch in dm.val_dataloader() for key in batch["key"]]
    assert len(val_keys) == 11 and dm.val.num_skipped == 1


def test_an_intact_cache_reads_as_before(cache):
    """Every item is the stored posterior sampled with the (seed, epoch, index) noise, scaled: the checksum changes
    no value, and skip mode reads the same items."""
    strict, lenient = LatentDataset(cache, seed=2), LatentDataset(cache, seed=2, on_corrupt="skip")
    with tarfile.open(cache / "shard-000001.tar") as tar:
        stored = {m.name: np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar if m.name.endswith(".npy")}
    for i in range(8, 12):
        generator = sample_generator(2, 1, i)
        prefix = "flip." if bool(torch.rand((), generator=generator) < 0.5) else ""
        mean = torch.from_numpy(stored[f"{i:09d}.{prefix}mean.npy"]).float()
        std = torch.from_numpy(stored[f"{i:09d}.{prefix}std.npy"]).float()
        z = mean + std * torch.randn(mean.shape, generator=generator)
        assert torch.equal(strict[(1, i)]["latent"], (z - strict.norm.shift) * strict.norm.scale)
    for i in range(12):
        a, b = strict[(0, i)], lenient[(0, i)]
        assert a["key"] == b["key"] and torch.equal(a["latent"], b["latent"])
    assert lenient.num_skipped == 0


def test_a_cache_of_an_older_format_is_refused(cache, tmp_path):
    old = tmp_path / "v1"
    shutil.copytree(cache, old)
    manifest = read_json(old / MANIFEST)
    atomic_write_json(old / MANIFEST, {**manifest, "version": 1})
    with pytest.raises(ConfigError, match="format v1.*re-run task=cache_latents"):
        LatentDataset(old)
