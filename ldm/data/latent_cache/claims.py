"""Work split between processes: one claim file per shard writer, taken over only when its owner is gone.

Processes claim a shard with an O_EXCL file `claims/shard-000000.G` (generation G) holding an owner record
(ldm/utils/ownership.py) before writing it. A claim whose owner is gone (same host: dead pid, reused pid or another
boot) or whose heartbeat is older than `stale_after_s` (another host) is taken over by creating the next
generation, which again only one process can do.
"""
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ldm.data.latent_cache.format import CLAIMS, read_json, shard_name
from ldm.utils.ownership import owner_gone, owner_record


@dataclass
class Claim:
    """This process's exclusive right to write one shard (a file in claims/, touched as a heartbeat)."""

    shard: int
    generation: int
    path: Path
    tmp_name: str  # the temp tar this claim writes, so a taker-over can remove it

    def heartbeat(self) -> None:
        try:
            os.utime(self.path)
        except FileNotFoundError:  # released by a process that finished the shard: commit will notice
            pass

    def superseded(self) -> bool:
        """Whether another process took this shard over (it thought we were dead)."""
        return _latest_generation(self.path.parent, self.shard) != self.generation

    def release(self, shard_complete: bool) -> None:
        """Drop the claim; once the shard is complete, also the stale claims it superseded."""
        for generation in range(self.generation, -1, -1) if shard_complete else [self.generation]:
            (self.path.parent / f"{shard_name(self.shard)}.{generation}").unlink(missing_ok=True)


def _claim_generations(claims_dir: Path, shard: int) -> list[int]:
    prefix = f"{shard_name(shard)}."
    return sorted(int(n[len(prefix):]) for n in os.listdir(claims_dir) if n.startswith(prefix) and n[len(prefix):].isdigit())


def _latest_generation(claims_dir: Path, shard: int) -> int | None:
    generations = _claim_generations(claims_dir, shard)
    return generations[-1] if generations else None


def _claim_abandoned(path: Path, stale_after_s: float) -> bool:
    """A claim is abandoned when its process is gone (same host: pid, pid start and boot id) or its heartbeat is
    older than stale_after_s (another host)."""
    try:
        age_s = time.time() - path.stat().st_mtime
    except FileNotFoundError:  # released meanwhile: the next generation is free
        return True
    return owner_gone(read_json(path), age_s, stale_after_s)  # None while its writer is still filling it in


def try_claim(out_dir: Path, shard: int, stale_after_s: float) -> Claim | None:
    """Claim `shard` with an O_EXCL file; take over an abandoned claim by creating the next generation."""
    claims_dir = out_dir / CLAIMS
    latest = _latest_generation(claims_dir, shard)
    stale = None
    if latest is not None:
        stale = claims_dir / f"{shard_name(shard)}.{latest}"
        if not _claim_abandoned(stale, stale_after_s):
            return None
    generation = 0 if latest is None else latest + 1
    path = claims_dir / f"{shard_name(shard)}.{generation}"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:  # another process claimed (or took over) first
        return None
    tmp_name = f".{shard_name(shard)}.tar.tmp-{uuid.uuid4().hex}"
    with os.fdopen(fd, "w") as f:
        json.dump({**owner_record(), "tmp": tmp_name}, f)
    if stale is not None:  # the abandoned writer's half-written temp shard is garbage now
        previous = read_json(stale) or {}
        if previous.get("tmp"):
            (out_dir / previous["tmp"]).unlink(missing_ok=True)
    return Claim(shard, generation, path, tmp_name)
