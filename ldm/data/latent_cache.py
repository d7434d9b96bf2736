"""Latent cache writer: encode a dataset with the frozen first stage into verified webdataset tar shards.

One cache directory per split:

    plan.json              what is cached (first stage, source, shard size, shapes); a re-run must match it
    shard-000000.tar       samples `{index:09d}.{json,mean.npy,std.npy[,flip.mean.npy,flip.std.npy]}`
    shard-000000.json      sidecar: sample count, sha256, bytes, skipped inputs, exact latent sums
    claims/shard-000000.G  the claim (pid, host) of generation G while one process writes that shard
    manifest.json          written once, atomically, after every shard is complete

Dataset index i goes to shard i // samples_per_shard, so every process agrees on the layout. Processes
claim a shard with an O_EXCL file before writing it; a claim whose process died (same host) or whose
heartbeat is older than `stale_after_s` is taken over by creating the next generation, which again only
one process can do. Shards are written to a temp file and renamed, so a kill never leaves a broken shard
under its final name, and the manifest only exists once all shards do.
"""
import hashlib
import io
import json
import math
import os
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from ldm.utils.atomic import AtomicFile, atomic_write_json
from ldm.utils.errors import ConfigError
from ldm.utils.ownership import owner_gone, owner_record

FORMAT = "ldm-latent-cache"
VERSION = 1
PLAN, MANIFEST, CLAIMS = "plan.json", "manifest.json", "claims"
MEMBERS = ("json", "mean.npy", "std.npy")
FLIP_MEMBERS = ("flip.mean.npy", "flip.std.npy")
STORE_DTYPE = "float16"
MAX_SKIP_EXAMPLES = 20


# --- layout ---------------------------------------------------------------------------------------

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


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def member_names(flip: bool) -> tuple[str, ...]:
    """Tar member extensions of one sample, in the order they are written."""
    return MEMBERS + (FLIP_MEMBERS if flip else ())


# --- files ----------------------------------------------------------------------------------------

def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: Path) -> dict | None:
    """The JSON object at `path`, or None when it is missing or not (yet) valid JSON."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


# --- claims ---------------------------------------------------------------------------------------

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


# --- shards ---------------------------------------------------------------------------------------

def sidecar_path(out_dir: Path, shard: int) -> Path:
    return out_dir / f"{shard_name(shard)}.json"


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


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ShardWriter:
    """Streams one shard into its claim's temp tar; commit() renames it into place, then writes the sidecar."""

    def __init__(self, out_dir: Path, plan: ShardPlan, claim: Claim, flip: bool):
        self.out_dir, self.plan, self.claim, self.flip = out_dir, plan, claim, flip
        self.indices = plan.indices(claim.shard)
        self.out = AtomicFile(out_dir / f"{shard_name(claim.shard)}.tar", tmp_name=claim.tmp_name)
        # USTAR headers with fixed mtime/owner: the same inputs give byte-identical shards
        self.tar = tarfile.open(fileobj=self.out.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = self.seen = 0
        self.skipped: list[dict] = []
        self.latent_shape: list[int] | None = None
        self.sum = self.sum_sq = None  # float64 [C]: sum of mean, sum of mean^2 + std^2
        self.elements = 0  # per channel

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, index: int, meta: dict, moments: dict[str, np.ndarray]) -> None:
        """One sample: its json metadata and float16 posterior moments (keys of member_names(flip) but json)."""
        key = f"{index:09d}"
        self._add_member(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        for ext in member_names(self.flip)[1:]:
            self._add_member(f"{key}.{ext}", _npy_bytes(moments[ext]))
        self.count += 1
        self.seen += 1

    def add_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Accumulate exact per-channel sums of the stored (float16) posteriors [B, C, h, w] in float64."""
        mean, std = mean.double(), std.double()
        batch_sum, batch_sum_sq = mean.sum((0, 2, 3)), (mean.square() + std.square()).sum((0, 2, 3))
        self.sum = batch_sum if self.sum is None else self.sum + batch_sum
        self.sum_sq = batch_sum_sq if self.sum_sq is None else self.sum_sq + batch_sum_sq
        self.elements += mean.shape[0] * mean.shape[2] * mean.shape[3]
        self.latent_shape = list(mean.shape[1:])

    def skip(self, index: int, key: str | None, reason: str, message: str) -> None:
        self.skipped.append({"index": index, "key": key, "reason": reason, "message": message})
        self.seen += 1

    def add_batch(self, batch: dict, moments: dict[str, torch.Tensor] | None) -> None:
        """A collated batch (see collate_checked): its encoded samples with their moments, and its skipped inputs."""
        if moments is not None:
            self.add_stats(moments["mean.npy"], moments["std.npy"])
            arrays = {ext: m.numpy() for ext, m in moments.items()}
            for row, (index, meta) in enumerate(zip(batch["indices"], batch["meta"])):
                self.add(index, meta, {ext: a[row] for ext, a in arrays.items()})
        for item in batch["skipped"]:
            self.skip(item["index"], item["key"], item["skip"], item["message"])

    @property
    def done(self) -> bool:
        return self.seen == len(self.indices)

    def commit(self) -> dict | None:
        """Close, fsync, rename into place, write the sidecar; None if another process took the shard over."""
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
            "latent_shape": self.latent_shape,
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

    def abort(self) -> None:
        self.tar.close()
        self.out.abort()


# --- inputs ---------------------------------------------------------------------------------------

def check_image(image: Any, shape: tuple[int, ...] | None) -> str | None:
    """Why `image` cannot be encoded (None if it can): a finite float [3,H,W] tensor in [-1, 1] of the cache's shape."""
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        return "bad image: not a float tensor"
    if image.ndim != 3 or image.shape[0] != 3 or (shape is not None and tuple(image.shape) != tuple(shape)):
        return f"bad image: shape {tuple(image.shape)}, expected {tuple(shape) if shape else '[3, H, W]'}"
    if not torch.isfinite(image).all():
        return "bad image: non-finite values"
    if image.min() < -1.001 or image.max() > 1.001:
        return "bad image: values outside [-1, 1]"
    return None


def _metadata(item: dict) -> dict:
    """The sample's json member: source key, caption, label and attribute lists."""
    meta = {"key": str(item.get("key", "")), "caption": str(item.get("caption", "")), "label": int(item.get("label", -1))}
    if "attrs" in item:
        meta["attrs"] = {name: torch.as_tensor(value).tolist() for name, value in item["attrs"].items()}
    return meta


class CheckedItems(Dataset):
    """Wraps a dataset so that a raising or malformed item becomes a counted skip instead of a crash."""

    def __init__(self, dataset: Dataset, image_shape: tuple[int, ...]):
        self.dataset, self.image_shape = dataset, image_shape

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            item = self.dataset[index]
            reason = check_image(item.get("image"), self.image_shape) if isinstance(item, dict) else "bad item: not a dict"
            if reason is None:
                return {"index": index, "image": item["image"], "meta": _metadata(item)}
            key = str(item.get("key")) if isinstance(item, dict) else None
            return {"index": index, "skip": reason, "key": key, "message": reason}
        except Exception as err:  # a corrupt input must cost one sample, not the run
            return {"index": index, "skip": f"error: {type(err).__name__}", "key": None, "message": str(err)[:500]}


def collate_checked(items: list[dict]) -> dict:
    """Stack the good images of a batch; keep the skipped items' indices and reasons."""
    good = [item for item in items if "skip" not in item]
    return {
        "indices": [item["index"] for item in good],
        "images": torch.stack([item["image"] for item in good]) if good else None,
        "meta": [item["meta"] for item in good],
        "skipped": [item for item in items if "skip" in item],
    }


def probe_image_shape(dataset: Dataset, max_tries: int = 100) -> tuple[int, ...]:
    """The image shape of the first readable item (every cached image must share it)."""
    for index in range(min(len(dataset), max_tries)):
        item = CheckedItems(dataset, None)[index]
        if "skip" not in item:
            return tuple(item["image"].shape)
    raise ValueError(f"none of the first {max_tries} items of {type(dataset).__name__} is a valid image")


class ClaimedShardBatches(Sampler[list[int]]):
    """Batches of dataset indices, shard after shard; `claim(shard)` runs just before a shard's first batch."""

    def __init__(self, plan: ShardPlan, shards: range, batch_size: int, claim: Callable[[int], bool]):
        self.plan, self.shards, self.batch_size, self.claim = plan, shards, batch_size, claim

    def __iter__(self) -> Iterator[list[int]]:
        for shard in self.shards:
            if not self.claim(shard):
                continue
            indices = self.plan.indices(shard)
            for start in range(indices.start, indices.stop, self.batch_size):
                yield list(range(start, min(start + self.batch_size, indices.stop)))


# --- plan and manifest ----------------------------------------------------------------------------

def ensure_plan(out_dir: Path, plan: dict) -> dict:
    """Write plan.json, or check that the existing one (from an earlier or parallel run) is the same plan."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CLAIMS).mkdir(exist_ok=True)
    plan = json.loads(json.dumps(plan, sort_keys=True))  # normalise (tuples -> lists) before comparing
    if atomic_write_json(out_dir / PLAN, plan, indent=1, sort_keys=True, exclusive=True):
        return plan
    existing = read_json(out_dir / PLAN)
    if existing != plan:
        differ = sorted(k for k in plan.keys() | (existing or {}).keys() if (existing or {}).get(k) != plan.get(k))
        raise ConfigError(
            f"{out_dir} already holds a latent cache planned differently ({', '.join(differ)} differ). Nothing is "
            f"deleted silently: set `task.out_dir` to another folder, or delete {out_dir} yourself."
        )
    return existing


def combine_stats(sidecars: list[dict], channels: int) -> dict:
    """Per-channel mean and std of sampled latents z = mean + std * n over the dataset, from exact shard sums.

    E[z] = E[mean] and E[z^2] = E[mean^2] + E[std^2] (n ~ N(0, 1) independent of the posterior), so
    Var[z] = E[mean^2 + std^2] - E[mean]^2: no sampling noise in the statistics.
    """
    total = sum(s["stats"]["elements"] for s in sidecars)
    sums = np.sum([s["stats"]["sum"] for s in sidecars if s["count"]], axis=0, dtype=np.float64)
    sums_sq = np.sum([s["stats"]["sum_sq"] for s in sidecars if s["count"]], axis=0, dtype=np.float64)
    mean, second = sums / total, sums_sq / total
    mean_all, second_all = sums.sum() / (total * channels), sums_sq.sum() / (total * channels)
    return {
        "mean": mean.tolist(),
        "std": np.sqrt(np.maximum(second - mean**2, 0.0)).tolist(),
        "mean_all": float(mean_all),
        "std_all": float(np.sqrt(max(second_all - mean_all**2, 0.0))),
    }


def build_manifest(plan: dict, sidecars: list[dict]) -> dict:
    """The manifest of a complete cache: plan, shards with counts and checksums, skipped inputs, latent stats."""
    skipped = [entry for s in sidecars for entry in s["skipped"]]
    num_samples = sum(s["count"] for s in sidecars)
    if num_samples == 0:
        reasons = Counter(e["reason"] for e in skipped)
        raise ValueError(f"every one of the {plan['num_inputs']} inputs was skipped: {dict(reasons)}")
    shapes = {tuple(s["latent_shape"]) for s in sidecars if s["count"]}
    if shapes != {tuple(plan["latent_shape"])}:
        raise ValueError(f"shards disagree on the latent shape: {shapes}, plan says {plan['latent_shape']}")
    return {
        **plan,
        "num_samples": num_samples,
        "shards": [{k: s[k] for k in ("name", "indices", "count", "bytes", "sha256")} for s in sidecars],
        "skipped": {
            "total": len(skipped),
            "reasons": dict(sorted(Counter(e["reason"] for e in skipped).items())),
            "examples": skipped[:MAX_SKIP_EXAMPLES],
        },
        "stats": combine_stats(sidecars, plan["latent_shape"][0]),
    }


def write_manifest_if_complete(out_dir: Path) -> Path | None:
    """Write manifest.json once every shard is complete (unchanged if an identical one exists); else None."""
    out_dir = Path(out_dir)
    plan = read_json(out_dir / PLAN)
    if plan is None:
        return None
    layout = ShardPlan(plan["num_inputs"], plan["samples_per_shard"])
    sidecars = [completed_shard(out_dir, layout, shard, check_sha256=False) for shard in range(layout.num_shards)]
    if any(s is None for s in sidecars):
        return None
    path, manifest = out_dir / MANIFEST, build_manifest(plan, sidecars)
    if read_json(path) != manifest:  # parallel finishers build the same manifest; only a changed one is rewritten
        atomic_write_json(path, manifest, indent=1, sort_keys=True)
    for leftover in (out_dir / CLAIMS).iterdir():  # claims left by processes killed between commit and release
        leftover.unlink(missing_ok=True)
    return path


# --- the loop -------------------------------------------------------------------------------------

@dataclass
class CacheResult:
    """What one process did: images it encoded and skipped, shards it wrote or found done, the manifest."""

    encoded: int
    skipped: int
    shards_written: int
    shards_found_complete: int
    shards_left_to_others: int
    seconds: float
    manifest: Path | None

    @property
    def images_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def _progress(enabled: bool) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, disable=not enabled)


@torch.inference_mode()
def encode_moments(first_stage: torch.nn.Module, images: torch.Tensor, flip: bool) -> dict[str, torch.Tensor]:
    """Posterior mean and std [B, C, h, w] of the images (and of their mirror images), cast to float16 on CPU."""
    x = torch.cat([images, images.flip(-1)]) if flip else images
    posterior = first_stage.encode(x)
    mean, std = posterior.mean.float(), posterior.std.float()
    if not (torch.isfinite(mean).all() and mean.abs().max() < 6e4 and std.max() < 6e4):
        raise ValueError("posterior moments overflow float16 (|mean| or std >= 6e4): is this a trained first stage?")
    mean, std = mean.to("cpu", torch.float16), std.to("cpu", torch.float16)
    batch = images.shape[0]
    moments = {"mean.npy": mean[:batch], "std.npy": std[:batch]}
    if flip:
        moments.update({"flip.mean.npy": mean[batch:], "flip.std.npy": std[batch:]})
    return moments


def cache_latents(
    first_stage: torch.nn.Module,
    dataset: Dataset,
    out_dir: str | Path,
    *,
    first_stage_hash: str,
    first_stage_config: dict | None = None,
    source: dict | None = None,
    samples_per_shard: int = 1000,
    batch_size: int = 64,
    num_workers: int = 0,
    flip: bool = True,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    stale_after_s: float = 600.0,
    progress: bool = True,
) -> CacheResult:
    """Encode every item of `dataset` with the frozen `first_stage` (anything with encode(x) -> .mean, .std).

    Safe to run as several ranks, as independent processes on the same `out_dir`, and again after a kill:
    complete shards are kept, claimed ones left to their live writer, the rest (re)written.
    """
    if isinstance(dataset, IterableDataset):
        raise ConfigError("latent caching needs a map-style dataset (indexable, with a length), not a stream")
    if batch_size <= 0 or num_workers < 0:
        raise ValueError(f"need batch_size > 0 and num_workers >= 0, got {batch_size=}, {num_workers=}")
    out_dir, device = Path(out_dir), torch.device(device)
    first_stage = first_stage.to(device).eval()
    layout = ShardPlan(len(dataset), samples_per_shard)
    image_shape = probe_image_shape(dataset)
    latent_shape = encode_moments(first_stage, torch.zeros(1, *image_shape, device=device), flip=False)["mean.npy"].shape[1:]
    plan = ensure_plan(out_dir, {
        "format": FORMAT,
        "version": VERSION,
        "first_stage": {"hash": first_stage_hash, "config": first_stage_config},
        "source": source,
        "num_inputs": layout.num_inputs,
        "samples_per_shard": samples_per_shard,
        "num_shards": layout.num_shards,
        "image_shape": list(image_shape),
        "resolution": image_shape[-1],
        "latent_shape": list(latent_shape),
        "dtype": STORE_DTYPE,
        "flip": flip,
        "members": list(member_names(flip)),
    })

    my_shards = layout.shards_for_rank(rank, world_size)
    claims: dict[int, Claim] = {}
    counts = Counter()
    bar = _progress(progress)
    total = sum(len(layout.indices(s)) for s in my_shards)
    bar_task = bar.add_task(f"caching {out_dir.name} (rank {rank} of {world_size})", total=total)

    def claim(shard: int) -> bool:
        # complete already (verified by sha256), or being written by a live process: skip it
        if completed_shard(out_dir, layout, shard, check_sha256=True) is not None:
            counts["found_complete"] += 1
        elif (held := try_claim(out_dir, shard, stale_after_s)) is None:
            counts["left_to_others"] += 1
        elif completed_shard(out_dir, layout, shard, check_sha256=True) is not None:  # finished while we claimed
            held.release(shard_complete=True)
            counts["found_complete"] += 1
        else:
            claims[shard] = held
            return True
        bar.advance(bar_task, len(layout.indices(shard)))
        return False

    loader = DataLoader(
        CheckedItems(dataset, image_shape),
        batch_sampler=ClaimedShardBatches(layout, my_shards, batch_size, claim),
        num_workers=num_workers,
        collate_fn=collate_checked,
        pin_memory=device.type == "cuda",
    )
    writers: dict[int, ShardWriter] = {}
    start = time.perf_counter()
    try:
        with bar:
            for batch in loader:
                shard = layout.shard_of((batch["indices"] or [s["index"] for s in batch["skipped"]])[0])
                if shard not in writers:
                    writers[shard] = ShardWriter(out_dir, layout, claims[shard], flip)
                writer = writers[shard]
                images = batch["images"]
                moments = None if images is None else encode_moments(first_stage, images.to(device, non_blocking=True), flip)
                writer.add_batch(batch, moments)
                counts["encoded"] += len(batch["indices"])
                counts["skipped"] += len(batch["skipped"])
                claims[shard].heartbeat()
                bar.advance(bar_task, len(batch["indices"]) + len(batch["skipped"]))
                if writer.done:
                    committed = writer.commit() is not None
                    del writers[shard]
                    claims.pop(shard).release(shard_complete=committed)
                    counts["written"] += committed
    finally:  # an exception or interrupt: drop half-written shards and our claims so a re-run redoes them
        for writer in writers.values():
            writer.abort()
        for held in claims.values():
            held.release(shard_complete=False)
    seconds = time.perf_counter() - start

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank's shards are done; any process may now write the manifest
    return CacheResult(
        encoded=counts["encoded"],
        skipped=counts["skipped"],
        shards_written=counts["written"],
        shards_found_complete=counts["found_complete"],
        shards_left_to_others=counts["left_to_others"],
        seconds=seconds,
        manifest=write_manifest_if_complete(out_dir),
    )
