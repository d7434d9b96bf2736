"""Streaming latent cache from img2dataset-layout tar shards: input shard i -> latent shard i, bad samples skipped
and counted per reason, records with key/caption/original size/crop box, a killed run resumed to the same bytes,
the sidecar index read by LatentDataset without scanning tars."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.latent_cache import LatentDataset
from ldm.data.latent_cache.encode import encode_moments
from ldm.data.latent_cache.format import STREAM_SHARD_SLOTS, read_json
from ldm.data.latent_cache.stream import cache_stream_latents
from ldm.data.preprocess import Preprocess, prepare_sample
from ldm.data.transforms import uint8_to_tensor
from ldm.utils.safe_config import safe_instantiate
from shard_fixtures import FailingEncoder, write_shard

ROOT = Path(__file__).resolve().parents[2]
RESOLUTION = 16
NET = {"_target_": "ldm.nn.autoencoder.AutoencoderKL", "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1,
       "z_channels": 4, "embed_dim": 4}
PRE = Preprocess(RESOLUTION, min_size=8, max_aspect=3.0)


def image(width: int, height: int, fmt: str = "JPEG", seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def sample(key: str, img: bytes, ext: str = "jpg", caption: str | None = "a caption") -> tuple[str, dict]:
    """img2dataset's members: {key}.jpg, {key}.txt (absent: missing caption), {key}.json."""
    files = {ext: img, **({"txt": f"{caption} {key}".encode()} if caption is not None else {})}
    return key, {**files, "json": json.dumps({"key": key, "url": f"http://x/{key}"}).encode()}


# (shard, key) -> why it is skipped; every other sample is cached
EXPECTED_SKIPS = {
    (0, "000000003"): "undecodable image",  # a JPEG cut in half
    (1, "000010000"): "not an image",
    (1, "000010001"): "missing caption",
    (1, "000010002"): "below min_size",
    (1, "000010004"): "above max_aspect",
    (2, "000020002"): "truncated tar member",
}
SIZES = [(24, 16), (16, 24), (20, 20), (30, 18), (18, 18)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("img2dataset")
    good = [sample(f"00000{j:04d}", image(*SIZES[j], seed=j)) for j in range(5)]
    good[3][1]["jpg"] = good[3][1]["jpg"][: len(good[3][1]["jpg"]) // 2]
    good[4] = sample("000000004", image(18, 18, "PNG", seed=4), ext="png")
    write_shard(root / "00000.tar", good)
    write_shard(root / "00001.tar", [
        sample("000010000", b"these bytes are no image at all"),
        sample("000010001", image(20, 16, seed=5), caption=None),
        sample("000010002", image(4, 4, seed=6)),
        sample("000010003", image(32, 16, "WEBP", seed=7), ext="webp"),
        sample("000010004", image(40, 12, seed=8)),
    ])
    cut = [sample(f"00002{j:04d}", image(20, 28, seed=10 + j)) for j in range(3)]
    write_shard(root / "00002.tar", cut, cut_last=True)
    return [str(root / f"{s:05d}.tar") for s in range(3)]


@pytest.fixture(scope="module")
def first_stage():
    torch.manual_seed(0)
    return safe_instantiate(OmegaConf.create(NET)).eval().requires_grad_(False)


def cache(first_stage, shards, out, **options):
    options = {"first_stage_hash": "tiny", "batch_size": 2, "progress": False, **options}
    return cache_stream_latents(first_stage, shards, out, PRE, **options)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, first_stage, shards) -> Path:
    """The uninterrupted cache, written by one process."""
    out = tmp_path_factory.mktemp("reference") / "train"
    result = cache(first_stage, shards, out)
    assert (result.encoded, result.skipped, result.shards_written) == (7, 6, 3)
    return out


def test_skips_counted_per_reason_in_sidecars_and_manifest(reference):
    for shard in range(3):
        sidecar = read_json(reference / f"shard-{shard:06d}.json")
        expected = sorted(reason for (s, _), reason in EXPECTED_SKIPS.items() if s == shard)
        assert sorted(r for r, n in sidecar["skip_reasons"].items() for _ in range(n)) == expected
        assert {(shard, e["key"]): e["reason"] for e in sidecar["skipped"]} == {
            k: r for k, r in EXPECTED_SKIPS.items() if k[0] == shard}
        assert sidecar["input"].endswith(f"{shard:05d}.tar")
    manifest = read_json(reference / "manifest.json")
    assert manifest["num_samples"] == 7 and manifest["num_inputs"] is None
    assert manifest["skipped"]["total"] == 6
    assert manifest["skipped"]["reasons"] == {reason: 1 for reason in EXPECTED_SKIPS.values()}
    assert manifest["source"]["preprocess"] == {**PRE.as_dict(), "min_size": 8, "max_aspect": 3.0}
    assert [s["count"] for s in manifest["shards"]] == [4, 1, 2]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])


def test_records_keep_key_caption_size_and_crop(reference, first_stage, shards):
    data = LatentDataset(reference, scale=1.0, flip=False)
    assert len(data) == 7 and data.latent_shape == (4, RESOLUTION // 2, RESOLUTION // 2)
    items = [data[i] for i in range(len(data))]
    assert [item["key"] for item in items] == [
        "000000000", "000000001", "000000002", "000000004", "000010003", "000020000", "000020001"]
    assert all(item["caption"] == f"a caption {item['key']}" for item in items)
    assert items[0]["original_size"].tolist() == [24, 16] and items[0]["crop_box"].tolist() == [4, 0, 20, 16]
    assert items[1]["original_size"].tolist() == [16, 24] and items[1]["crop_box"].tolist() == [0, 4, 16, 20]
    assert items[4]["original_size"].tolist() == [32, 16] and items[4]["crop_box"].tolist() == [8, 0, 24, 16]
    # record index: input shard s, position j in the tar (skips included) -> s * STREAM_SHARD_SLOTS + j
    slots = STREAM_SHARD_SLOTS
    assert data.record_of.tolist() == [0, 1, 2, 4, slots + 3, 2 * slots, 2 * slots + 1]
    # the stored posterior is the encoding of the preprocessed image
    with tarfile.open(shards[0]) as tar:
        members = {m.name.partition(".")[2]: tar.extractfile(m).read() for m in tar if m.name.startswith("000000001")}
    prepared = prepare_sample({"__key__": "000000001", **members}, PRE)
    direct = encode_moments(first_stage, uint8_to_tensor(prepared["pixels"])[None], flip=True)
    torch.testing.assert_close(data.moments(1)["mean"], direct["mean.npy"][0])
    torch.testing.assert_close(data.moments(1)["flip.mean"], direct["flip.mean.npy"][0])


def test_reader_index_from_sidecar_equals_tar_scan(reference, tmp_path):
    """A cache whose sidecars lack the index (written before it) is indexed from its tar headers, identically."""
    old = tmp_path / "old"
    shutil.copytree(reference, old)
    for sidecar in old.glob("shard-*.json"):
        content = json.loads(sidecar.read_text())
        del content["index"]
        sidecar.write_text(json.dumps(content))
    new, scanned = LatentDataset(reference), LatentDataset(old)
    for name in ("shard_of", "record_of", "offsets", "json_bytes"):
        np.testing.assert_array_equal(getattr(new, name), getattr(scanned, name))
    assert new.fixed_bytes == scanned.fixed_bytes
    assert [new[(1, i)]["key"] for i in range(7)] == [scanned[(1, i)]["key"] for i in range(7)]


def test_crash_then_rerun_with_workers_is_byte_identical(reference, first_stage, shards, tmp_path):
    out = tmp_path / "train"
    with pytest.raises(RuntimeError, match="simulated crash"):  # call 1 probes; shard 0 takes 2, shard 1 one more
        cache(FailingEncoder(first_stage, fail_on_call=4), shards, out)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar"]
    assert not (out / "manifest.json").exists()
    assert not list((out / "claims").iterdir()) and not list(out.glob(".*tmp*"))
    result = cache(first_stage, shards, out, num_workers=2)  # decoding in worker processes changes nothing
    assert (result.shards_found_complete, result.shards_written) == (1, 2)
    assert read_json(out / "manifest.json") == read_json(reference / "manifest.json")
    again = cache(first_stage, shards, out)
    assert (again.shards_written, again.shards_found_complete, again.encoded) == (0, 3, 0)


# A separate process (torch-level imports only) that caches slowly, to be killed with SIGKILL mid-way.
KILLED_CACHER = textwrap.dedent("""
    import sys, time
    import torch
    from ldm.data.latent_cache.stream import cache_stream_latents
    from ldm.data.preprocess import Preprocess
    from ldm.nn.autoencoder import AutoencoderKL

    net_file, out, *shards = sys.argv[1:]
    saved = torch.load(net_file, weights_only=True)
    net = AutoencoderKL(**saved["config"])
    net.load_state_dict(saved["state_dict"])
    encode = net.encode
    def slow_encode(x):
        time.sleep(0.3)
        return encode(x)
    net.encode = slow_encode
    cache_stream_latents(net, shards, out, Preprocess(%d, min_size=8, max_aspect=3.0), first_stage_hash="tiny",
                         batch_size=2, progress=False)
""" % RESOLUTION)


@pytest.mark.slow
def test_killed_process_resumes_to_identical_checksums(reference, first_stage, shards, tmp_path):
    script, net_file, out = tmp_path / "cacher.py", tmp_path / "net.pt", tmp_path / "train"
    script.write_text(KILLED_CACHER)
    config = {k: v for k, v in NET.items() if k != "_target_"}
    torch.save({"state_dict": first_stage.state_dict(), "config": config}, net_file)
    # the same torch thread count as this process: CPU convolutions may round differently with another one
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, str(script), str(net_file), str(out), *shards], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "shard-000000.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # inside shard 1: its claim and temp file stay behind
    proc.wait()
    assert not (out / "manifest.json").exists()
    result = cache(first_stage, shards, out)  # takes the dead process's claim over
    assert result.shards_found_complete >= 1 and not list(out.glob(".*tmp*"))
    manifest, expected = read_json(out / "manifest.json"), read_json(reference / "manifest.json")
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in expected["shards"]]
    assert manifest == expected
    LatentDataset(out, verify=True)


def test_task_caches_webdataset_shards(shards, tmp_path, first_stage, capsys):
    """task=cache_latents data=webdataset: the stream path, its preprocessing from data.*, the closing count."""
    from ldm.tasks import cache_latents as task  # imports Lightning: not at the top

    run_dir = tmp_path / "run"
    module = safe_instantiate(OmegaConf.create({"_target_": "ldm.models.autoencoder.AutoencoderModule", "net": NET}))
    # saved as the fit task saves it: the state dict and the config that rebuilds it
    (run_dir / "checkpoints").mkdir(parents=True)
    config = {"model": {"_target_": "ldm.models.autoencoder.AutoencoderModule", "net": NET}}
    torch.save({"state_dict": module.state_dict(), "ldm_config": config}, run_dir / "checkpoints" / "last.ckpt")
    urls = str(Path(shards[0]).parent / "{00000..00002}.tar")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        overrides = [f"data.urls='{urls}'", f"data.resolution={RESOLUTION}", "data.min_size=8", "data.max_aspect=3.0"]
        cfg = compose("config", overrides=["task=cache_latents", "+data=webdataset", "name=wds_ae", *overrides])
    cfg.paths.run_dir, cfg.paths.data_dir = str(run_dir), str(tmp_path / "data")
    cfg.task.num_workers, cfg.task.progress, cfg.task.batch_size = 0, False, 2
    results = task.run(cfg)
    assert results["train"].encoded == 7 and results["train"].skipped == 6
    printed = capsys.readouterr().out
    assert "[train] 7 written, 6 skipped (1 above max_aspect, 1 below min_size, 1 missing caption, 1 not an image, " \
           "1 truncated tar member, 1 undecodable image)" in printed
    manifest = read_json(tmp_path / "data" / "latents" / "wds_ae" / "train" / "manifest.json")
    assert manifest["source"]["preprocess"]["empty_caption"] == "skip" and len(manifest["source"]["urls"]) == 3


def test_preprocess_caption_policy_and_errors():
    img = image(20, 20)
    from_json = prepare_sample({"__key__": "k", "jpg": img, "json": b'{"caption": "from json"}'}, PRE)
    assert from_json["meta"]["caption"] == "from json"
    assert prepare_sample({"__key__": "k", "jpg": img, "txt": b"  "}, PRE)["skip"] == "empty caption"
    kept = prepare_sample({"__key__": "k", "jpg": img}, Preprocess(RESOLUTION, empty_caption="keep"))
    assert kept["meta"]["caption"] == "" and kept["pixels"].shape == (RESOLUTION, RESOLUTION, 3)
    assert prepare_sample({"__key__": "k", "txt": b"x"}, PRE)["skip"] == "no image"
    with pytest.raises(ValueError, match="empty_caption"):
        Preprocess(RESOLUTION, empty_caption="drop")
    with pytest.raises(ValueError, match="max_aspect"):
        Preprocess(RESOLUTION, max_aspect=0.5)


def test_training_stream_applies_the_same_filters(shards, reference):
    """data=webdataset without a cache (WebImageDataset) keeps exactly the samples the cache keeps."""
    from ldm.data.webdataset_images import WebImageDataset

    stream = WebImageDataset(shards, resolution=RESOLUTION, min_size=8, max_aspect=3.0, empty_caption="skip")
    assert stream.preprocess == PRE
    keys = [item["key"] for item in stream]
    assert keys == [item["key"] for item in LatentDataset(reference)]


def test_pipe_urls_give_the_same_shards_and_a_failing_pipe_stops(reference, first_stage, shards, tmp_path):
    """`pipe:` commands (s3/gs on a cluster) stream the same bytes; an unreadable shard is an error, not an empty shard."""
    result = cache(first_stage, [f"pipe:cat {s}" for s in shards], tmp_path / "piped")
    expected = read_json(reference / "manifest.json")["shards"]
    assert [s["sha256"] for s in read_json(result.manifest)["shards"]] == [s["sha256"] for s in expected]
    with pytest.raises(OSError, match="exit 1"):
        cache(first_stage, [f"pipe:cat {tmp_path / 'absent.tar'}"], tmp_path / "failed")
    assert not list((tmp_path / "failed").glob("shard-*")) and not list((tmp_path / "failed" / "claims").iterdir())


def _epoch_keys(loader, epoch: int, stop: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """(key, latent) of the loader's batches of `epoch` (batch size 1), the first `stop` of them when given."""
    loader.sampler.set_epoch(epoch)
    got = []
    for batch in loader:
        got.append((batch["key"][0], batch["latent"][0]))
        if len(got) == stop:
            break
    return got


def test_stream_cache_reader_balances_ranks_and_resumes_across_worker_counts(reference):
    """Issue 14 item 6 on a cache of tar shards: equal counts per rank, a seeded order per epoch, and a position that
    resumes exactly after a kill even with another number of DataLoader workers (the position counts batches
    consumed, not what workers prefetched)."""
    from ldm.data.latents import LatentSampler, ResumableDataLoader
    from ldm.data.skips import collate_kept

    data = LatentDataset(reference, seed=1)

    def loader(rank: int, workers: int) -> ResumableDataLoader:
        return ResumableDataLoader(data, 1, sampler=LatentSampler(data, rank, 2, seed=1), drop_last=True,
                                   num_workers=workers, collate_fn=collate_kept)

    epochs = [[_epoch_keys(loader(rank, 0), epoch) for rank in range(2)] for epoch in range(2)]
    for ranks in epochs:  # 7 records, padded to 8 by wrapping around: 4 per rank, every record in the epoch
        assert [len(r) for r in ranks] == [4, 4]
        assert len({k for r in ranks for k, _ in r}) == 7
    assert [k for k, _ in epochs[0][0]] != [k for k, _ in epochs[1][0]] or [k for k, _ in epochs[0][1]] != [
        k for k, _ in epochs[1][1]]  # a new order each epoch
    assert [k for k, _ in _epoch_keys(loader(0, 0), 1)] == [k for k, _ in epochs[1][0]]  # from the seed alone

    for rank in range(2):  # killed after 2 batches read by 2 workers, resumed on the main process
        first = loader(rank, 2)
        done = _epoch_keys(first, 1, stop=2)
        state = json.loads(json.dumps(first.state_dict()))  # what the checkpoint stores
        assert state["position"] == 2 * 2 and state["epoch"] == 1
        resumed = loader(rank, 0)
        resumed.load_state_dict(state)
        rest = _epoch_keys(resumed, 1)
        assert [k for k, _ in done + rest] == [k for k, _ in epochs[1][rank]]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(done + rest, epochs[1][rank]))  # same posterior draws
