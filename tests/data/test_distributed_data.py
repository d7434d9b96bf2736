"""Per-rank data: rank under torchrun/srun/Lightning, webdataset on 2 gloo ranks x 2 workers, latent resume."""

import io
import json
import multiprocessing
import os
import tarfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.data.webdataset_images import WebImageDataset
from ldm.utils.dist_env import dist_env

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE",
                 "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
SHARD_SIZES = (7, 1, 4, 2, 9)  # uneven: a finite pass gives rank 0 shards 0, 2, 4 (20) and rank 1 shards 1, 3 (3)


def clear_launcher_env() -> None:
    for name in LAUNCHER_VARS:
        os.environ.pop(name, None)


@pytest.fixture
def env(monkeypatch):
    """Set launcher variables on a clean slate (the CI machine may run under a launcher itself)."""
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))

    return set_env


# --- rank detection -----------------------------------------------------------------------------------

def where() -> tuple:
    e = dist_env()
    return e.rank, e.world_size, e.local_rank, e.source


def test_rank_under_torchrun(env):
    assert where() == (0, 1, 0, "single")
    env(RANK=5, WORLD_SIZE=8, LOCAL_RANK=1, LOCAL_WORLD_SIZE=4, NODE_RANK=1)  # torchrun, node 1 of 2
    assert where() == (5, 8, 1, "torchrun")
    env(SLURM_PROCID=3, SLURM_NTASKS=16, SLURM_LOCALID=0)  # `srun torchrun`: torchrun's RANK wins
    assert where() == (5, 8, 1, "torchrun")


def test_rank_under_srun(env):
    env(SLURM_PROCID=11, SLURM_NTASKS=16, SLURM_LOCALID=3)
    assert where() == (11, 16, 3, "slurm")


def test_rank_under_lightnings_launcher(env):
    # children of `python main.py trainer.devices=4`: LOCAL_RANK, NODE_RANK, WORLD_SIZE, no RANK; an sbatch
    # step's SLURM_* describe the batch script, not them
    env(LOCAL_RANK=2, NODE_RANK=0, WORLD_SIZE=4, SLURM_PROCID=0, SLURM_NTASKS=1)
    assert where() == (2, 4, 2, "lightning")
    env(NODE_RANK=1, WORLD_SIZE=8, LOCAL_WORLD_SIZE=4)
    assert where() == (6, 8, 2, "lightning")


def test_rank_errors(env):
    env(LOCAL_RANK=1, NODE_RANK=1, WORLD_SIZE=8)
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
        dist_env()
    env(RANK=2, WORLD_SIZE=2)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        dist_env()
    env(RANK="two")
    with pytest.raises(ValueError, match="RANK='two'"):
        dist_env()


class Where(IterableDataset):
    def __iter__(self):
        e = dist_env()
        yield e.rank, e.world_size, e.worker, e.num_workers


def test_rank_inside_dataloader_workers(env, tmp_path):
    """Workers read their parent's rank from the launcher's env; the dataset splits shards by it."""
    env(SLURM_PROCID=1, SLURM_NTASKS=2)
    seen = set(map(tuple, DataLoader(Where(), batch_size=None, num_workers=2)))
    assert seen == {(1, 2, 0, 2), (1, 2, 1, 2)}
    urls = write_shards(tmp_path)
    loader = DataLoader(WebImageDataset(urls, resolution=8), batch_size=None, num_workers=2)
    assert sorted(item["key"] for item in loader) == sorted(keys_of_shards(1, 3))  # rank 1's shards


# --- webdataset over 2 gloo ranks x 2 workers ------------------------------------------------------------

def write_shards(root: Path) -> str:
    image = io.BytesIO()
    Image.fromarray(np.full((12, 20, 3), 99, np.uint8)).save(image, "PNG")
    for shard, size in enumerate(SHARD_SIZES):
        with tarfile.open(root / f"shard-{shard}.tar", "w") as tar:
            for i in range(size):
                for ext, data in (("txt", f"caption {shard}{i:03d}".encode()), ("png", image.getvalue())):
                    info = tarfile.TarInfo(f"{shard}{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / f"shard-{{0..{len(SHARD_SIZES) - 1}}}.tar")


def keys_of_shards(*shards: int) -> list[str]:
    return [f"{shard}{i:03d}" for shard in shards for i in range(SHARD_SIZES[shard])]


def lockstep(loader: DataLoader) -> tuple[list[str], bool]:
    """Keys of a pass with one all_reduce per batch, as DDP's gradient sync, and whether every rank had every batch.

    Each batch reduces (1, 0) and the end (0, 1): a rank with an extra batch meets the others' end and sees (1, 1)
    (or, in real DDP, blocks until the timeout).
    """
    keys, together = [], True
    for batch in loader:
        step = torch.tensor([1.0, 0.0])
        dist.all_reduce(step)
        together &= step.tolist() == [2.0, 0.0]
        keys += batch["key"]
    end = torch.tensor([0.0, 1.0])
    dist.all_reduce(end)
    return keys, together and end.tolist() == [0.0, 2.0]


def rank_main(rank: int, store: str, urls: str, out: str) -> None:
    """One training process: a finite pass, two resampled epochs and an equalized pass, each over 2 workers."""
    os.environ["OMP_NUM_THREADS"] = "1"
    clear_launcher_env()
    multiprocessing.set_start_method("fork", force=True)  # as a launcher's fresh process has (spawn's child: spawn)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=20))  # a hang fails the test instead of blocking it
    options = dict(batch_size=2, num_workers=2)
    # ranks unpinned: forked workers find the process group
    finite = [k for batch in DataLoader(WebImageDataset(urls, resolution=8), **options) for k in batch["key"]]
    resampled = WebImageDataset(urls, resolution=8, resampled=True, epoch_samples=12, shuffle_buffer=4)
    loader = DataLoader(resampled, drop_last=True, persistent_workers=True, **options)
    epochs = []
    for epoch in range(2):
        resampled.set_epoch(epoch)
        epochs.append(lockstep(loader))
    equalized = lockstep(DataLoader(WebImageDataset(urls, resolution=8, epoch_samples=11), drop_last=True, **options))
    dist.barrier()
    dist.destroy_process_group()
    # Lightning's launcher sets LOCAL_RANK/NODE_RANK/WORLD_SIZE only, and workers have no process group
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE="2")
    from_env = [k for batch in DataLoader(WebImageDataset(urls, resolution=8), **options) for k in batch["key"]]
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"finite": finite, "epochs": epochs, "equalized": equalized, "from_env": from_env}))


@pytest.mark.slow
def test_webdataset_two_ranks_two_workers(tmp_path):
    urls = write_shards(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(rank, str(tmp_path / "store"), urls, str(tmp_path)))
             for rank in (0, 1)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120
    for p in procs:
        p.join(timeout=max(deadline - time.monotonic(), 0))
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0], "a rank failed or hung (see its stderr)"
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    every = keys_of_shards(*range(len(SHARD_SIZES)))

    # finite pass: every sample exactly once over 2 ranks x 2 workers, split by shard; 20 vs 3 samples, so
    # training on it would leave rank 0 waiting for rank 1 at the epoch end
    finite = [r["finite"] for r in results]
    assert sorted(finite[0] + finite[1]) == sorted(every)
    assert sorted(finite[0]) == sorted(keys_of_shards(0, 2, 4)) and sorted(finite[1]) == sorted(keys_of_shards(1, 3))
    # the same split with the rank read from Lightning's env in workers without a process group
    assert [sorted(r["from_env"]) for r in results] == [sorted(f) for f in finite]

    # resampled: 12 samples per rank = 6 per worker = 3 batches each, in lockstep (no hang); fresh draws per epoch
    for r in results:
        for keys, together in r["epochs"]:
            assert together and len(keys) == 12 and set(keys) <= set(every)
        assert r["epochs"][0][0] != r["epochs"][1][0]
    assert results[0]["epochs"][0][0] != results[1]["epochs"][0][0]  # ranks draw different streams

    # equalized: 11 per rank = 6 + 5 per worker, drop_last leaves 3 + 2 batches = 10 samples on both ranks,
    # each from its own shards (rank 1 cycles its 3 samples)
    for rank, r in enumerate(results):
        keys, together = r["equalized"]
        assert together and len(keys) == 10 and set(keys) <= set(finite[rank])
    assert set(results[1]["equalized"][0]) == set(finite[1])


# --- cached latents: distributed sampling resumes mid-epoch exactly ---------------------------------------

class Indices(Dataset):
    """Item (epoch, i) -> i: what LatentSampler hands out, without a latent cache."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, item: tuple[int, int]) -> int:
        return item[1]


EPOCHS = 3


def loaders(data: Dataset, world_size: int, num_workers: int = 0) -> list:
    from ldm.data.latents import LatentSampler, ResumableDataLoader  # not at the top: spawned ranks skip Lightning

    return [ResumableDataLoader(data, 3, sampler=LatentSampler(data, rank, world_size, seed=5), drop_last=True,
                                num_workers=num_workers) for rank in range(world_size)]


def run(loader: DataLoader, stop: int | None = None) -> list[list[int]]:
    """Batches from the sampler's epoch on, as Lightning's fit loop runs them (set_epoch, then iterate)."""
    batches = []
    for epoch in range(loader.sampler.epoch, EPOCHS):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            batches.append(batch.tolist())
            if len(batches) == stop:
                return batches
    return batches


def test_latent_sampler_resumes_mid_epoch_on_every_rank():
    data = Indices(23)  # 24 with padding: 12 per rank, 4 batches of 3 per epoch
    reference = [run(loader) for loader in loaders(data, 2)]
    assert [len(r) for r in reference] == [4 * EPOCHS] * 2
    for stop in (1, 3, 4, 6, 11):  # mid-epoch, at an epoch end, into the next epoch
        first = loaders(data, 2)
        done = [run(loader, stop) for loader in first]
        states = [loader.state_dict() for loader in first]
        assert states[0] == states[1]  # the position is global: rank 0's checkpoint serves every rank
        state = json.loads(json.dumps(states[0]))
        resumed = loaders(data, 2, num_workers=2 if stop == 6 else 0)
        for rank, loader in enumerate(resumed):
            loader.load_state_dict(state)
            assert done[rank] + run(loader) == reference[rank]


def test_latent_sampler_resumes_on_another_world_size():
    """A checkpoint from 2 ranks resumed on 4: the rest of the epoch is split among them, nothing seen repeats."""
    data = Indices(24)
    first = loaders(data, 2)
    done = sum((sum(run(loader, 2), []) for loader in first), [])  # 2 batches of 3 on each rank
    state = first[0].state_dict()
    assert state["position"] == 12
    rest = []
    for loader in loaders(data, 4):
        loader.load_state_dict(state)
        loader.sampler.set_epoch(0)
        rest += [i for batch in loader for i in batch.tolist()]
    assert len(rest) == 12 and sorted(done + rest) == list(range(24))
