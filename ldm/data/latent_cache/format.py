"""The cache's on-disk layout: file names, the members of one record, and which dataset indices go to which shard."""
import json
import math
from dataclasses import dataclass
from pathlib import Path

FORMAT = "ldm-latent-cache"
VERSION = 2  # v2: every record carries a crc32 member (v1 had none; the reader refuses v1, see __init__.py)
PLAN, MANIFEST, CLAIMS = "plan.json", "manifest.json", "claims"
MEMBERS = ("json", "mean.npy", "std.npy")
FLIP_MEMBERS = ("flip.mean.npy", "flip.std.npy")
CHECKSUM_MEMBER = "crc32"  # last, so it covers every member written before it
STORE_DTYPE = "float16"
STREAM_SHARD_SLOTS = 10**6  # record indices per input shard of a stream: input shard s holds [s * slots, (s+1) * slots)


@dataclass(frozen=True)
class ShardPlan:
    """Dataset indices [s * samples_per_shard, (s + 1) * samples_per_shard) go to shard s."""

    num_inputs: int
    samples_per_shard: int

    def __post_init__(self) -> None:
        if self.num_inputs <= 0 or self.samples_per_shard <= 0:
            raise ValueError(f"need num_inputs > 0 and samples_per_shard > 0, got {self}")

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_inputs / self.samples_per_shard)

    def indices(self, shard: int) -> range:
        start = shard * self.samples_per_shard
        return range(start, min(start + self.samples_per_shard, self.num_inputs))

    def shard_of(self, index: int) -> int:
        return index // self.samples_per_shard

    def shards_for_rank(self, rank: int, world_size: int) -> range:
        """Rank r of W owns shards r, r + W, r + 2W, ...: disjoint, and balanced to within one shard."""
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank=}, {world_size=}")
        return range(rank, self.num_shards, world_size)


def stream_layout(num_shards: int) -> ShardPlan:
    """One latent shard per input tar shard: the j-th sample of input shard s gets index s * STREAM_SHARD_SLOTS + j.

    A tar's sample count is unknown until it is read, so indices are slots: a skipped sample leaves its slot empty,
    and a resumed run gives every sample the index the first run gave it.
    """
    return ShardPlan(num_shards * STREAM_SHARD_SLOTS, STREAM_SHARD_SLOTS)


def plan_layout(plan: dict) -> ShardPlan:
    """The shard layout a plan.json describes: a dataset in fixed-size shards, or a stream (num_inputs null)."""
    if plan["num_inputs"] is None:
        return stream_layout(plan["num_shards"])
    return ShardPlan(plan["num_inputs"], plan["samples_per_shard"])


def shard_name(shard: int) -> str:
    """`shard-000042`: the stem of shard 42's tar and sidecar."""
    return f"shard-{shard:06d}"


def record_key(index: int) -> str:
    """The tar key of dataset index `index`: its members are `{key}.{member}`."""
    return f"{index:09d}"


def sidecar_path(out_dir: Path, shard: int) -> Path:
    """The shard's sidecar: count, sha256, bytes, skipped inputs, exact latent sums."""
    return out_dir / f"{shard_name(shard)}.json"


def member_names(flip: bool) -> tuple[str, ...]:
    """Tar member extensions of one record, in the order they are written."""
    return MEMBERS + (FLIP_MEMBERS if flip else ()) + (CHECKSUM_MEMBER,)


def read_json(path: Path) -> dict | None:
    """The JSON object at `path`, or None when it is missing or not (yet) valid JSON."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
