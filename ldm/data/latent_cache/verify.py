"""Checks that cached bytes are the ones written: shard size and sha256 against the sidecar or manifest, and a
crc32 per record checked on every read (cheap: a few microseconds per record, no second read of the file)."""
import zlib
from collections.abc import Iterable
from pathlib import Path

from ldm.data.latent_cache.format import CHECKSUM_MEMBER, ShardPlan, read_json, sidecar_path
from ldm.utils.errors import CorruptDataError
from ldm.utils.hashing import sha256_file


def completed_shard(out_dir: Path, plan: ShardPlan, shard: int, check_sha256: bool) -> dict | None:
    """The shard's sidecar if the shard is complete (sidecar valid, tar size and optionally sha256 match)."""
    sidecar = read_json(sidecar_path(out_dir, shard))
    expected = plan.indices(shard)
    if sidecar is None or sidecar.get("indices") != [expected.start, expected.stop]:
        return None
    tar_path = out_dir / sidecar["name"]
    try:
        if tar_path.stat().st_size != sidecar["bytes"]:
            return None
    except FileNotFoundError:
        return None
    if check_sha256 and sha256_file(tar_path) != sidecar["sha256"]:
        return None
    return sidecar


def check_shards(cache_dir: Path, shards: list[dict], check_sha256: bool) -> None:
    """Every shard of a manifest exists with its size (a cheap stat catches truncation), and its sha256 if asked."""
    for shard in shards:
        path = cache_dir / shard["name"]
        if not path.is_file():
            raise FileNotFoundError(f"latent shard {str(path)!r} listed in the manifest is missing")
        if path.stat().st_size != shard["bytes"] or (check_sha256 and sha256_file(path) != shard["sha256"]):
            raise ValueError(
                f"latent shard {str(path)!r} does not match its manifest checksum: modified or truncated. "
                "Delete it and its .json sidecar and re-run task=cache_latents to rewrite it."
            )


def record_checksum(parts: Iterable[bytes]) -> bytes:
    """crc32 of a record's member data in member order, as the 8 hex digits stored in its crc32 member."""
    crc = 0
    for data in parts:
        crc = zlib.crc32(data, crc)
    return f"{crc:08x}".encode()


def check_record(members: dict[str, bytes], shard: Path, key: str) -> None:
    """Raise CorruptDataError, naming the shard, the record and the fix, if the record's crc32 does not match."""
    stored = members[CHECKSUM_MEMBER]
    if record_checksum(data for name, data in members.items() if name != CHECKSUM_MEMBER) != stored:
        raise CorruptDataError(
            f"latent shard {str(shard)!r}, record {key}: crc32 mismatch, its bytes changed on disk after caching. "
            "Re-run task=cache_latents with the same settings (it re-hashes every shard and rewrites damaged ones; "
            "data.verify=true checks them all before training), or set data.on_corrupt=skip to count and skip such "
            "records"
        )
