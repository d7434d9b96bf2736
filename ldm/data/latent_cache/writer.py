"""ShardWriter: streams one shard's records into its claim's temp tar, then commits it (rename, then sidecar)."""
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ldm.data.latent_cache.claims import Claim
from ldm.data.latent_cache.format import CHECKSUM_MEMBER, ShardPlan, member_names, record_key, shard_name, sidecar_path
from ldm.data.latent_cache.verify import record_checksum
from ldm.utils.atomic import AtomicFile, atomic_write_json
from ldm.utils.hashing import sha256_file


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ShardWriter:
    """Streams one shard into its claim's temp tar; commit() renames it into place, then writes the sidecar."""

    def __init__(self, out_dir: Path, plan: ShardPlan, claim: Claim, flip: bool, num_buckets: int | None = None):
        self.out_dir, self.plan, self.claim, self.flip = out_dir, plan, claim, flip
        self.num_buckets = num_buckets  # aspect-ratio buckets: each record's meta names its bucket
        self.indices = plan.indices(claim.shard)
        self.out = AtomicFile(out_dir / f"{shard_name(claim.shard)}.tar", tmp_name=claim.tmp_name)
        # USTAR headers with fixed mtime/owner: the same inputs give byte-identical shards
        self.tar = tarfile.open(fileobj=self.out.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = self.seen = 0
        self.skipped: list[dict] = []
        self.latent_shapes: dict[int, list[int]] = {}  # per bucket (0 without buckets)
        self.sum = self.sum_sq = None  # float64 [C]: sum of mean, sum of mean^2 + std^2
        self.elements = 0  # per channel
        # the sidecar's index (tar_index.py): each record's position in the shard and json size; other sizes are fixed
        # per bucket (the latent shape fixes them), so with buckets each record's bucket too
        self.positions: list[int] = []
        self.json_bytes: list[int] = []
        self.buckets: list[int] = []
        self.fixed_bytes: dict[int, list[int]] = {}

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        self.tar.addfile(info, io.BytesIO(data))

    def _bucket(self, meta: dict) -> int:
        return meta["bucket"] if self.num_buckets is not None else 0

    def add(self, index: int, meta: dict, moments: dict[str, np.ndarray]) -> None:
        """One record: its json metadata, float16 posterior moments (member_names(flip) but json and crc32), crc32."""
        key = record_key(index)
        data = {"json": json.dumps(meta, sort_keys=True).encode()}
        data.update({ext: _npy_bytes(moments[ext]) for ext in member_names(self.flip) if ext.endswith(".npy")})
        data[CHECKSUM_MEMBER] = record_checksum(data.values())
        sizes, bucket = [len(member) for member in data.values()], self._bucket(meta)
        fixed = self.fixed_bytes.setdefault(bucket, sizes[1:])
        if sizes[1:] != fixed:  # the index relies on it; equal latent shapes guarantee it
            raise ValueError(f"record {key}: member sizes {sizes[1:]} differ from its bucket's {fixed} in this shard")
        for ext, member in data.items():
            self._add_member(f"{key}.{ext}", member)
        self.positions.append(index - self.indices.start)
        self.json_bytes.append(sizes[0])
        self.buckets.append(bucket)
        self.count += 1
        self.seen += 1

    def add_stats(self, mean: torch.Tensor, std: torch.Tensor, bucket: int = 0) -> None:
        """Accumulate exact per-channel sums of the stored (float16) posteriors [B, C, h, w] in float64 (one bucket's
        batch: every bucket's latents count, element by element)."""
        mean, std = mean.double(), std.double()
        batch_sum, batch_sum_sq = mean.sum((0, 2, 3)), (mean.square() + std.square()).sum((0, 2, 3))
        self.sum = batch_sum if self.sum is None else self.sum + batch_sum
        self.sum_sq = batch_sum_sq if self.sum_sq is None else self.sum_sq + batch_sum_sq
        self.elements += mean.shape[0] * mean.shape[2] * mean.shape[3]
        self.latent_shapes[bucket] = list(mean.shape[1:])

    def skip(self, index: int, key: str | None, reason: str, message: str) -> None:
        self.skipped.append({"index": index, "key": key, "reason": reason, "message": message})
        self.seen += 1

    def add_batch(self, batch: dict, moments: dict[str, torch.Tensor] | None) -> None:
        """A collated batch (see collate_checked): its encoded samples with their moments, and its skipped inputs."""
        if moments is not None:
            self.add_stats(moments["mean.npy"], moments["std.npy"], self._bucket(batch["meta"][0]))
            arrays = {ext: m.numpy() for ext, m in moments.items()}
            for row, (index, meta) in enumerate(zip(batch["indices"], batch["meta"])):
                self.add(index, meta, {ext: a[row] for ext, a in arrays.items()})
        for item in batch["skipped"]:
            self.skip(item["index"], item["key"], item["skip"], item["message"])

    @property
    def done(self) -> bool:
        return self.seen == len(self.indices)

    def commit(self, **extra) -> dict | None:
        """Close, fsync, rename into place, write the sidecar (plus `extra`); None if another process took over."""
        self.tar.close()
        self.out.sync()
        if self.claim.superseded():
            self.out.abort()
            return None
        sidecar = {
            "name": self.out.path.name,
            "indices": [self.indices.start, self.indices.stop],
            "count": self.count,
            "bytes": self.out.tmp.stat().st_size,
            "sha256": sha256_file(self.out.tmp),
            "skipped": self.skipped,
            "skip_reasons": dict(sorted(Counter(entry["reason"] for entry in self.skipped).items())),
            **self._index(),
            **extra,
            "stats": {
                "elements": self.elements,
                "sum": [] if self.sum is None else self.sum.tolist(),
                "sum_sq": [] if self.sum_sq is None else self.sum_sq.tolist(),
            },
        }
        self.out.commit()
        # the shard counts as done now
        atomic_write_json(sidecar_path(self.out_dir, self.claim.shard), sidecar, indent=1, sort_keys=True)
        return sidecar

    def _index(self) -> dict:
        """The sidecar's index and latent shape(s); with buckets also each record's bucket, the member sizes and latent
        shape of each bucket ([] and null where the shard has none) and the count per bucket."""
        if self.num_buckets is None:
            return {"index": {"positions": self.positions, "json_bytes": self.json_bytes,
                              "fixed_bytes": self.fixed_bytes.get(0, [])},
                    "latent_shape": self.latent_shapes.get(0)}
        buckets = range(self.num_buckets)
        return {"index": {"positions": self.positions, "json_bytes": self.json_bytes, "buckets": self.buckets,
                          "fixed_bytes": [self.fixed_bytes.get(b, []) for b in buckets]},
                "latent_shapes": [self.latent_shapes.get(b) for b in buckets],
                "bucket_counts": [self.buckets.count(b) for b in buckets]}

    def abort(self) -> None:
        self.tar.close()
        self.out.abort()
