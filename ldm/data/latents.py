"""Latent cache reader: a map-style dataset over the shards of task=cache_latents, its sampler and DataModule.

Each access draws a fresh posterior sample z = mean + std * n (and the mirrored copy with probability 0.5)
from a generator seeded by (seed, epoch, index), then applies the chosen scale/shift. The sampler hands
the epoch to the dataset with each index, so the draws do not depend on worker processes or restarts.
"""
import io
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ldm.data.latent_cache import FORMAT, MANIFEST, VERSION, read_json, sha256_file
from ldm.utils.dist_env import dist_env
from ldm.utils.errors import ConfigError

SCALES = ("per_channel", "global_std")


def read_manifest(path: str | Path) -> dict:
    """The manifest of a complete latent cache, with a clear error for a missing or foreign one."""
    manifest = read_json(Path(path) / MANIFEST)
    if manifest is None:
        raise FileNotFoundError(
            f"no {MANIFEST} in {str(path)!r}: not a latent cache, or its caching has not finished "
            "(re-run `task=cache_latents`; it resumes)"
        )
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        found = f"{manifest.get('format')} v{manifest.get('version')}"
        raise ValueError(f"{path}: expected a {FORMAT} v{VERSION} manifest, got {found}")
    return manifest


def latent_scaling(stats: dict, scale: str | float, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each [C, 1, 1], so that (z - shift) * scale has about unit variance (Rombach et al. 2022, sec. 4.3.2).

    per_channel: shift = E[z_c], scale = 1 / std(z_c); global_std: shift = 0, scale = 1 / std(z) over all
    channels; a number: shift = 0 and that scale (e.g. SD's 0.18215).
    """
    if isinstance(scale, str):
        if scale == "per_channel":
            shift, factor = torch.tensor(stats["mean"]), 1.0 / torch.tensor(stats["std"])
        elif scale == "global_std":
            shift, factor = torch.zeros(channels), torch.full((channels,), 1.0 / stats["std_all"])
        else:
            raise ValueError(f"scale must be one of {SCALES} or a positive number, got {scale!r}")
    else:
        if not scale > 0:
            raise ValueError(f"a fixed latent scale must be positive, got {scale}")
        shift, factor = torch.zeros(channels), torch.full((channels,), float(scale))
    if not torch.isfinite(factor).all():
        raise ValueError(f"latent scale {scale!r} is not finite: the cache has a channel with zero variance")
    return factor.float().view(channels, 1, 1), shift.float().view(channels, 1, 1)


TAR_BLOCK = 512


def read_tar_headers(path: Path) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each member of a USTAR tar, reading only its 512-byte headers.

    tarfile builds an object per member and is ~10x slower; with millions of members that is minutes per rank.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        end, position = os.fstat(fd).st_size, 0
        while position + TAR_BLOCK <= end:
            header = os.pread(fd, TAR_BLOCK, position)
            if header.count(0) == TAR_BLOCK:  # end-of-archive marker
                return
            if header[156:157] not in (b"0", b"\0"):
                raise ValueError(f"{path}: member at byte {position} is not a regular file (type {header[156:157]!r})")
            name = header[:100].rstrip(b"\0").decode()
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
            if position + TAR_BLOCK + size > end:
                raise ValueError(f"{path}: member {name!r} runs past the end of the file (truncated shard)")
            yield name, position + TAR_BLOCK, size
            position += TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK  # data padded to whole blocks
        raise ValueError(f"{path}: no end-of-archive marker (truncated shard)")
    finally:
        os.close(fd)


def index_shard(path: Path, members: list[str]) -> tuple[list[int], np.ndarray]:
    """Sample indices and member (data offset, size) [n, M, 2] of one shard, from its tar headers (no extraction)."""
    rows: dict[int, dict[str, tuple[int, int]]] = {}
    for name, offset, size in read_tar_headers(path):
        stem, _, ext = name.partition(".")
        rows.setdefault(int(stem), {})[ext] = (offset, size)
    missing = [index for index, found in rows.items() if not set(members) <= found.keys()]
    if missing:
        raise ValueError(f"{path}: samples {missing[:5]} lack members of {members} (truncated or foreign shard)")
    indices = sorted(rows)
    spans = np.array([[rows[i][m] for m in members] for i in indices], dtype=np.int64).reshape(len(indices), len(members), 2)
    return indices, spans


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator seeded by (seed, epoch, index): a sample's noise is the same whatever the loader layout."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


NPY_V1 = b"\x93NUMPY\x01\x00"


def _npy(data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    """A float16 .npy member as a tensor; v1 headers are skipped rather than parsed (the hot path)."""
    if not data.startswith(NPY_V1):
        return torch.from_numpy(np.lib.format.read_array(io.BytesIO(data), allow_pickle=False))
    offset = 10 + int.from_bytes(data[8:10], "little")  # magic (6), version (2), header length (2)
    return torch.from_numpy(np.frombuffer(data, dtype="<f2", count=math.prod(shape), offset=offset).reshape(shape).copy())


class LatentDataset(Dataset):
    """Cached posteriors: item i gives a fresh, scaled latent sample z with its caption, label and key."""

    def __init__(
        self,
        path: str | Path,
        scale: str | float = "per_channel",
        flip: bool = True,
        verify: bool = False,
        expected_first_stage_hash: str | None = None,
        seed: int = 0,
    ):
        self.path = Path(path).expanduser()
        self.manifest = read_manifest(self.path)
        self.first_stage_hash = self.manifest["first_stage"]["hash"]
        if expected_first_stage_hash is not None:
            self.check_first_stage(expected_first_stage_hash)
        self.flip, self.seed = flip and self.manifest["flip"], seed
        self.members = self.manifest["members"]
        self.latent_shape = tuple(self.manifest["latent_shape"])
        self.scale, self.shift = latent_scaling(self.manifest["stats"], scale, self.latent_shape[0])
        self.shard_paths = [self.path / s["name"] for s in self.manifest["shards"]]
        self._check_shards(verify)
        self._build_index()

    def check_first_stage(self, first_stage_hash: str) -> None:
        """Refuse a cache encoded by another first stage than the one (by weight hash) the model decodes with."""
        if first_stage_hash != self.first_stage_hash:
            raise ConfigError(
                f"latent cache {str(self.path)!r} was encoded by first stage {self.first_stage_hash[:16]}..., but this "
                f"model decodes with {first_stage_hash[:16]}...: its latents mean nothing to that decoder. "
                "Re-run task=cache_latents with this autoencoder, or point the data at its cache."
            )

    def _check_shards(self, verify: bool) -> None:
        """Sizes always (a cheap stat catches truncation), sha256 with `verify`."""
        for path, shard in zip(self.shard_paths, self.manifest["shards"]):
            if not path.is_file():
                raise FileNotFoundError(f"latent shard {str(path)!r} listed in the manifest is missing")
            if path.stat().st_size != shard["bytes"] or (verify and sha256_file(path) != shard["sha256"]):
                raise ValueError(
                    f"latent shard {str(path)!r} does not match its manifest checksum: modified or truncated. "
                    "Delete it and its .json sidecar and re-run task=cache_latents to rewrite it."
                )

    def _build_index(self) -> None:
        """Flat arrays (not per-sample dicts) so worker processes share them instead of copying on access."""
        shard_ids, spans = [], []
        for shard, (path, entry) in enumerate(zip(self.shard_paths, self.manifest["shards"])):
            indices, shard_spans = index_shard(path, self.members)
            if len(indices) != entry["count"]:
                raise ValueError(f"{path}: {len(indices)} samples, manifest says {entry['count']}")
            shard_ids.append(np.full(len(indices), shard, dtype=np.int32))
            spans.append(shard_spans)
        self.shard_of = np.concatenate(shard_ids)
        self.spans = np.concatenate(spans)  # [N, M, 2]: (offset, size) of each member
        if len(self.shard_of) != self.manifest["num_samples"]:
            expected = self.manifest["num_samples"]
            raise ValueError(f"{self.path}: {len(self.shard_of)} samples indexed, manifest says {expected}")

    def __len__(self) -> int:
        return len(self.shard_of)

    def read_members(self, index: int) -> dict[str, bytes]:
        """The raw bytes of sample `index`'s members: one positioned read of their contiguous span."""
        spans = self.spans[index].tolist()
        start, stop = min(o for o, _ in spans), max(o + n for o, n in spans)
        fd = os.open(self.shard_paths[self.shard_of[index]], os.O_RDONLY)
        try:
            data = os.pread(fd, stop - start, start)
        finally:
            os.close(fd)
        return {m: data[o - start : o - start + n] for m, (o, n) in zip(self.members, spans)}

    def moments(self, index: int) -> dict[str, torch.Tensor]:
        """The stored float16 posterior moments of sample `index` (keys mean, std[, flip.mean, flip.std])."""
        members = self.read_members(index)
        return {m.removesuffix(".npy"): _npy(b, self.latent_shape) for m, b in members.items() if m.endswith(".npy")}

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        """`item` is an index (epoch 0) or (epoch, index) as LatentSampler yields it."""
        epoch, index = item if isinstance(item, tuple) else (0, item)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cached latents")
        members = self.read_members(index)
        generator = sample_generator(self.seed, epoch, index)
        mirrored = self.flip and bool(torch.rand((), generator=generator) < 0.5)
        prefix = "flip." if mirrored else ""
        mean = _npy(members[f"{prefix}mean.npy"], self.latent_shape).float()
        std = _npy(members[f"{prefix}std.npy"], self.latent_shape).float()
        z = mean + std * torch.randn(mean.shape, generator=generator)  # reparameterised posterior sample
        meta = json.loads(members["json"])
        sample = {"latent": (z - self.shift) * self.scale, **{k: meta[k] for k in ("caption", "label", "key")}}
        if "attrs" in meta:
            sample["attrs"] = {name: torch.tensor(values, dtype=torch.long) for name, values in meta["attrs"].items()}
        return sample

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents [..., C, h, w] back to the first stage's latent space, for decoding."""
        return z / self.scale.to(z) + self.shift.to(z)


class LatentSampler(DistributedSampler):
    """A permutation per (seed, epoch) split across ranks, yielding (epoch, index); restartable mid-epoch.

    Rank r of W takes positions r, r + W, ... of the epoch's order; with `even`, the order is padded by
    wrapping around so every rank gets the same count (DDP steps stay in lockstep), else ranks are
    disjoint and complete but may differ by one. Without `shuffle` the epoch is ignored: validation sees
    the same order and the same posterior draws every time. A DistributedSampler subclass, so Lightning keeps it.
    """

    def __init__(
        self, dataset: Dataset, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0, even: bool = True
    ):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.size, self.even = len(dataset), even
        self._resume: tuple[int, int] | None = None  # (epoch, global position) to start the next pass at
        self.pass_epoch, self.pass_start = 0, 0  # of the pass in progress

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch if self.shuffle else 0

    def resume(self, epoch: int, position: int) -> None:
        """Start the next pass of `epoch` after `position` items of its global order (all ranks together)."""
        if position >= self.global_length():
            epoch, position = epoch + 1, 0
        self.epoch, self._resume = epoch, (epoch, position)

    def global_length(self) -> int:
        """Items in one epoch over all ranks (padded to a multiple of the world size with `even`)."""
        return math.ceil(self.size / self.num_replicas) * self.num_replicas if self.even else self.size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All indices in this epoch's order (a numpy array: Python lists of 100M ints would not fit)."""
        if not self.shuffle:
            return np.arange(self.size)
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(1, dtype=np.uint64)[0]
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(int(state))).numpy()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        start = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self._resume, self.pass_epoch, self.pass_start = None, epoch, start
        order = self.epoch_order(epoch)
        remaining = order[start:]
        if self.even:  # pad the remainder to a multiple of the world size, wrapping around the order
            remaining = np.concatenate([remaining, np.resize(order, -len(remaining) % self.num_replicas)])
        mine = remaining[self.rank :: self.num_replicas]
        return ((epoch, int(index)) for index in mine)

    def __len__(self) -> int:
        """Items of a full epoch on this rank (Lightning sizes the epoch with it)."""
        if self.even:
            return self.global_length() // self.num_replicas
        return len(range(self.rank, self.size, self.num_replicas))


class ResumableDataLoader(DataLoader):
    """A DataLoader over a LatentSampler whose position in the epoch goes into Lightning checkpoints.

    Lightning stores `state_dict()` with the fit loop and calls `load_state_dict()` before the first
    batch after a restart; the next pass then starts exactly after the last batch trained on.
    """

    _batches = 0

    def __iter__(self):
        self._batches = 0
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict:
        sampler: LatentSampler = self.sampler
        position = sampler.pass_start + self._batches * self.batch_size * sampler.num_replicas
        if self.drop_last and (sampler.global_length() - position) // sampler.num_replicas < self.batch_size:
            position = sampler.global_length()  # only the dropped partial batch is left: the epoch is done
        position = min(position, sampler.global_length())
        return {"epoch": sampler.pass_epoch, "position": position, "seed": sampler.seed, "num_samples": sampler.size}

    def load_state_dict(self, state: dict) -> None:
        sampler: LatentSampler = self.sampler
        if (state["seed"], state["num_samples"]) != (sampler.seed, sampler.size):
            raise ValueError(
                f"the checkpoint's data position is for {state['num_samples']} latents with seed {state['seed']}, "
                f"this loader has {sampler.size} with seed {sampler.seed}: same cache and data.seed needed to resume"
            )
        sampler.resume(state["epoch"], state["position"])


class LatentDataModule(L.LightningDataModule):
    """Train/val loaders over latent caches; exposes the latent `scale`/`shift` the diffusion model stores."""

    def __init__(
        self,
        train_path: str,
        val_path: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        scale: str | float = "per_channel",
        flip: bool = True,
        verify: bool = False,
        expected_first_stage_hash: str | None = None,
        seed: int = 0,
        val_batch_size: int | None = None,
        pin_memory: bool = True,
    ):
        super().__init__()
        if batch_size <= 0 or num_workers < 0:
            raise ValueError(f"need batch_size > 0 and num_workers >= 0, got {batch_size=}, {num_workers=}")
        for key, path in (("data.train_path", train_path), ("data.val_path", val_path)):
            if path is not None and not Path(path).expanduser().is_dir():
                raise FileNotFoundError(f"latent cache {path!r} not found; set `{key}` (written by task=cache_latents)")
        options = dict(scale=scale, verify=verify, expected_first_stage_hash=expected_first_stage_hash, seed=seed)
        self.train = LatentDataset(train_path, flip=flip, **options)
        # validation reads the unmirrored posteriors, scaled like training (the train cache's statistics)
        self.val = LatentDataset(val_path, flip=False, **options) if val_path is not None else None
        if self.val is not None:
            self.val.scale, self.val.shift = self.train.scale, self.train.shift
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed

    def check_first_stage(self, first_stage_hash: str) -> None:
        """Refuse caches encoded by another first stage than the one (by weight hash) the model decodes with."""
        for dataset in (self.train, self.val):
            if dataset is not None:
                dataset.check_first_stage(first_stage_hash)

    @property
    def scale(self) -> torch.Tensor:
        return self.train.scale

    @property
    def shift(self) -> torch.Tensor:
        return self.train.shift

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.train.latent_shape

    def _rank_and_world_size(self) -> tuple[int, int]:
        """From the trainer when there is one, else torch.distributed or the launcher's env (see dist_env)."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        env = dist_env()
        return env.rank, env.world_size

    def _loader_options(self) -> dict:
        return dict(
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )

    def train_dataloader(self) -> ResumableDataLoader:
        rank, world_size = self._rank_and_world_size()
        sampler = LatentSampler(self.train, rank, world_size, shuffle=True, seed=self.seed, even=True)
        return ResumableDataLoader(self.train, self.batch_size, sampler=sampler, drop_last=True, **self._loader_options())

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None:
            return []
        rank, world_size = self._rank_and_world_size()
        sampler = LatentSampler(self.val, rank, world_size, shuffle=False, seed=self.seed, even=False)
        return DataLoader(self.val, self.val_batch_size, sampler=sampler, **self._loader_options())
