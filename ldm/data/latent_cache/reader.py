"""LatentDataset: a map-style dataset over a cache's shards; every read checks the record's crc32.

A cache made with aspect-ratio buckets (ldm/data/buckets.py) holds latents of several shapes: `bucket_of` names each
record's bucket, from the sidecars' index (never a scan of the tars), and BucketBatchSampler (ldm/data/latents.py)
draws batches from one bucket at a time.

Each access draws a fresh posterior sample z = mean + std * n (and the mirrored copy with probability 0.5)
from a generator seeded by (seed, epoch, index), then applies the chosen scale/shift. LatentSampler
(ldm/data/latents.py) hands the epoch to the dataset with each index, so the draws do not depend on worker
processes or restarts.
"""
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.data.latent_cache.format import read_json, record_key, sidecar_path
from ldm.data.latent_cache.manifest import read_manifest
from ldm.data.latent_cache.tar_index import compact_index, fixed_member_bytes, index_shard, json_offsets, member_spans
from ldm.data.latent_cache.verify import check_record, check_shards
from ldm.data.latent_norm import LatentNorm
from ldm.data.skips import SkipCounter, check_on_corrupt, skipped_item
from ldm.utils.errors import ConfigError, CorruptDataError

NPY_V1 = b"\x93NUMPY\x01\x00"


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator seeded by (seed, epoch, index): a sample's noise is the same whatever the loader layout."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _npy(data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    """A float16 .npy member as a tensor; v1 headers are skipped rather than parsed (the hot path)."""
    if not data.startswith(NPY_V1):
        return torch.from_numpy(np.lib.format.read_array(io.BytesIO(data), allow_pickle=False))
    offset = 10 + int.from_bytes(data[8:10], "little")  # magic (6), version (2), header length (2)
    return torch.from_numpy(np.frombuffer(data, dtype="<f2", count=math.prod(shape), offset=offset).reshape(shape).copy())


def first_stage_scaling_factor(first_stage_config: dict | None) -> float | None:
    """The scaling factor recorded with the cache's first stage (model.net.scaling_factor of imported SD weights)."""
    return ((first_stage_config or {}).get("net") or {}).get("scaling_factor")


class LatentDataset(Dataset):
    """Cached posteriors: item i gives a fresh, scaled latent sample z with its caption, label and key.

    A record whose crc32 does not match raises CorruptDataError naming the shard and record, or with
    on_corrupt="skip" is counted and returned as a skip marker (ldm/data/skips.py).
    """

    def __init__(
        self,
        path: str | Path,
        scale: str | float = "auto",
        flip: bool = True,
        verify: bool = False,
        expected_first_stage_hash: str | None = None,
        seed: int = 0,
        on_corrupt: str = "raise",
    ):
        self.path = Path(path).expanduser()
        self.manifest = read_manifest(self.path)
        self.first_stage_hash = self.manifest["first_stage"]["hash"]
        if expected_first_stage_hash is not None:
            self.check_first_stage(expected_first_stage_hash)
        self.flip, self.seed = flip and self.manifest["flip"], seed
        self.on_corrupt = check_on_corrupt(on_corrupt, "data.on_corrupt")
        self.skipped = SkipCounter("latent record")
        self.members = self.manifest["members"]
        self.latent_shape = tuple(self.manifest["latent_shape"])  # with buckets: the first bucket's
        self.buckets = [tuple(b) for b in self.manifest["buckets"]] if "buckets" in self.manifest else None
        self.latent_shapes = [tuple(s) for s in self.manifest.get("latent_shapes", [self.latent_shape])]
        self.norm = LatentNorm.from_stats(self.manifest["stats"], scale, self.latent_shape[0],
                                          first_stage_scaling_factor(self.manifest["first_stage"]["config"]))
        self.shard_paths = [self.path / s["name"] for s in self.manifest["shards"]]
        check_shards(self.path, self.manifest["shards"], check_sha256=verify)
        self._build_index()

    def check_first_stage(self, first_stage_hash: str) -> None:
        """Refuse a cache encoded by another first stage than the one (by weight hash) the model decodes with."""
        if first_stage_hash != self.first_stage_hash:
            raise ConfigError(
                f"latent cache {str(self.path)!r} was encoded by first stage {self.first_stage_hash[:16]}..., but this "
                f"model decodes with {first_stage_hash[:16]}...: its latents mean nothing to that decoder. "
                "Re-run task=cache_latents with this autoencoder, or point the data at its cache."
            )

    def _shard_index(self, shard: int, path: Path, entry: dict
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[int]]]:
        """(record indices, json sizes, buckets, each bucket's other members' sizes) of one shard: from its sidecar's
        index, without touching the tar (start-up O(shards)), or by scanning its tar headers for a cache written before
        that index (never bucketed: buckets came later)."""
        sidecar = read_json(sidecar_path(self.path, shard)) or {}
        if "index" in sidecar and (sidecar.get("sha256"), sidecar.get("bytes")) == (entry["sha256"], entry["bytes"]):
            index = sidecar["index"]
            records = entry["indices"][0] + np.asarray(index["positions"], dtype=np.int64)
            buckets = np.asarray(index.get("buckets", np.zeros(len(records))), dtype=np.int16)
            fixed_bytes = index["fixed_bytes"] if self.buckets is not None else [index["fixed_bytes"]]
            return records, np.asarray(index["json_bytes"], dtype=np.int64), buckets, fixed_bytes
        if self.buckets is not None:
            raise ValueError(f"{sidecar_path(self.path, shard)}: missing, or not for this shard's bytes; a bucketed "
                             "cache is read through its sidecars: re-run task=cache_latents to rewrite the shard")
        indices, spans = index_shard(path, self.members)
        json_bytes, fixed_bytes = compact_index(indices, spans)
        return np.asarray(indices, dtype=np.int64), json_bytes, np.zeros(len(indices), dtype=np.int16), [fixed_bytes]

    def _build_index(self) -> None:
        """Flat arrays (not per-sample dicts) so worker processes share them instead of copying on access."""
        shard_ids, records, offsets, json_sizes, buckets = [], [], [], [], []
        self.fixed_bytes: list[list[int]] = [[] for _ in self.latent_shapes]  # per bucket: the same in every shard
        for shard, (path, entry) in enumerate(zip(self.shard_paths, self.manifest["shards"])):
            indices, json_bytes, shard_buckets, fixed_bytes = self._shard_index(shard, path, entry)
            if len(indices) != entry["count"]:
                raise ValueError(f"{path}: {len(indices)} samples, manifest says {entry['count']}")
            counts = np.bincount(shard_buckets, minlength=len(self.latent_shapes)).tolist()
            if counts != entry.get("bucket_counts", counts) or len(fixed_bytes) != len(self.latent_shapes):
                raise ValueError(f"{path}: {counts} samples per bucket, manifest says {entry.get('bucket_counts')}")
            if not len(indices):  # every input of the shard was skipped
                continue
            for bucket, sizes in enumerate(fixed_bytes):
                if sizes and self.fixed_bytes[bucket] not in ([], sizes):
                    raise ValueError(f"{path}: bucket {bucket} member sizes {sizes} differ from other shards' "
                                     f"{self.fixed_bytes[bucket]}")
                self.fixed_bytes[bucket] = self.fixed_bytes[bucket] or sizes
            record_fixed = np.array([fixed_member_bytes(sizes) for sizes in fixed_bytes], dtype=np.int64)[shard_buckets]
            shard_offsets = json_offsets(json_bytes, record_fixed)
            last = int(np.argmax(shard_offsets))
            end = member_spans(int(shard_offsets[last]), int(json_bytes[last]), fixed_bytes[shard_buckets[last]])[-1]
            if sum(end) > entry["bytes"]:
                raise ValueError(f"{path}: its index reaches byte {sum(end)} of a {entry['bytes']}-byte shard")
            shard_ids.append(np.full(len(indices), shard, dtype=np.int32))
            records.append(indices)
            offsets.append(shard_offsets)
            json_sizes.append(json_bytes.astype(np.int32))
            buckets.append(shard_buckets)
        self.shard_of = np.concatenate(shard_ids)
        self.record_of = np.concatenate(records)  # the index each record was cached from (its tar key)
        self.offsets = np.concatenate(offsets)  # [N]: where each record's json member's data starts
        self.json_bytes = np.concatenate(json_sizes)  # [N]: its size; the other members follow (tar_index.py)
        self.bucket_of = np.concatenate(buckets)  # [N]: its bucket (all 0 without buckets), which fixes its shape
        if len(self.shard_of) != self.manifest["num_samples"]:
            expected = self.manifest["num_samples"]
            raise ValueError(f"{self.path}: {len(self.shard_of)} samples indexed, manifest says {expected}")

    def __len__(self) -> int:
        return len(self.shard_of)

    def read_members(self, index: int) -> dict[str, bytes]:
        """The checked raw bytes of sample `index`'s members: one positioned read of their contiguous span."""
        fixed_bytes = self.fixed_bytes[self.bucket_of[index]]
        spans = member_spans(int(self.offsets[index]), int(self.json_bytes[index]), fixed_bytes)
        start, stop = min(o for o, _ in spans), max(o + n for o, n in spans)
        shard = self.shard_paths[self.shard_of[index]]
        fd = os.open(shard, os.O_RDONLY)
        try:
            data = os.pread(fd, stop - start, start)
        finally:
            os.close(fd)
        members = {m: data[o - start : o - start + n] for m, (o, n) in zip(self.members, spans)}
        check_record(members, shard, record_key(int(self.record_of[index])))
        return members

    def moments(self, index: int) -> dict[str, torch.Tensor]:
        """The stored float16 posterior moments of sample `index` (keys mean, std[, flip.mean, flip.std])."""
        members, shape = self.read_members(index), self.latent_shapes[self.bucket_of[index]]
        return {m.removesuffix(".npy"): _npy(b, shape) for m, b in members.items() if m.endswith(".npy")}

    def __getitem__(self, item: int | tuple[int, int] | list[tuple[int, int]]) -> dict | list[dict]:
        """`item` is an index (epoch 0) or (epoch, index) as LatentSampler yields it; or a list of those, one bucket's
        batch as BucketBatchSampler yields it, giving a list of samples (the DataLoader then collates them)."""
        if isinstance(item, list):
            return [self[one] for one in item]
        epoch, index = item if isinstance(item, tuple) else (0, item)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cached latents")
        try:
            members = self.read_members(index)
        except CorruptDataError as err:
            if self.on_corrupt == "raise":
                raise
            key = f"{self.shard_paths[self.shard_of[index]].name}:{record_key(int(self.record_of[index]))}"
            self.skipped.add(key, "crc32 mismatch")
            return skipped_item(key, "crc32 mismatch", str(err))
        generator = sample_generator(self.seed, epoch, index)
        mirrored = self.flip and bool(torch.rand((), generator=generator) < 0.5)
        prefix = "flip." if mirrored else ""
        shape = self.latent_shapes[self.bucket_of[index]]
        mean = _npy(members[f"{prefix}mean.npy"], shape).float()
        std = _npy(members[f"{prefix}std.npy"], shape).float()
        z = mean + std * torch.randn(mean.shape, generator=generator)  # reparameterised posterior sample
        meta = json.loads(members["json"])
        sample = {"latent": self.norm.normalize(z), **{k: meta[k] for k in ("caption", "label", "key")}}
        for name in ("original_size", "crop_box"):  # streamed images: (w, h) and (left, top, right, bottom) in pixels
            if name in meta:
                sample[name] = torch.tensor(meta[name], dtype=torch.long)
        if "attrs" in meta:
            sample["attrs"] = {name: torch.tensor(values, dtype=torch.long) for name, values in meta["attrs"].items()}
        return sample

    @property
    def num_skipped(self) -> int:
        """Records skipped for a crc32 mismatch so far, summed over DataLoader workers."""
        return self.skipped.count
