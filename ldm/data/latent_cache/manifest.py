"""plan.json (what is cached; every writer must agree on it) and manifest.json (the complete cache: shards with
counts and checksums, skipped inputs, exact latent statistics), built from the shards' sidecars."""
import json
from collections import Counter
from pathlib import Path

import numpy as np

from ldm.data.latent_cache.format import (
    CLAIMS, FORMAT, MANIFEST, PLAN, STORE_DTYPE, VERSION, ShardPlan, member_names, plan_layout, read_json,
    shard_name,
)
from ldm.data.latent_cache.verify import completed_shard
from ldm.utils.atomic import atomic_write_json
from ldm.utils.errors import ConfigError

MAX_SKIP_EXAMPLES = 20


def new_plan(
    layout: ShardPlan,
    image_shape: tuple[int, ...],
    latent_shape: tuple[int, ...],
    *,
    first_stage_hash: str,
    first_stage_config: dict | None,
    source: dict | None,
    flip: bool,
) -> dict:
    """The plan.json of a cache: first stage, source, shard layout, shapes and record members."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "first_stage": {"hash": first_stage_hash, "config": first_stage_config},
        "source": source,
        "num_inputs": layout.num_inputs,
        "samples_per_shard": layout.samples_per_shard,
        "num_shards": layout.num_shards,
        "image_shape": list(image_shape),
        "resolution": image_shape[-1],
        "latent_shape": list(latent_shape),
        "dtype": STORE_DTYPE,
        "flip": flip,
        "members": list(member_names(flip)),
    }


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


def check_latent_shapes(plan: dict, sidecars: list[dict]) -> None:
    """Every shard's latents have the plan's shape (with buckets: each bucket's shape, where the shard has any)."""
    if "buckets" not in plan:
        shapes = {tuple(s["latent_shape"]) for s in sidecars if s["count"]}
        if shapes != {tuple(plan["latent_shape"])}:
            raise ValueError(f"shards disagree on the latent shape: {shapes}, plan says {plan['latent_shape']}")
        return
    for s in sidecars:
        for bucket, (count, shape) in enumerate(zip(s["bucket_counts"], s["latent_shapes"])):
            if count and shape != plan["latent_shapes"][bucket]:
                expected = plan["latent_shapes"][bucket]
                raise ValueError(f"{s['name']}: bucket {bucket} latents {shape}, plan says {expected}")


def build_manifest(plan: dict, sidecars: list[dict]) -> dict:
    """The manifest of a complete cache: plan, shards with counts and checksums, skipped inputs, latent stats."""
    skipped = [entry for s in sidecars for entry in s["skipped"]]
    num_samples = sum(s["count"] for s in sidecars)
    if num_samples == 0:
        reasons = Counter(e["reason"] for e in skipped)
        raise ValueError(f"every one of the {len(skipped)} inputs was skipped: {dict(reasons)}")
    check_latent_shapes(plan, sidecars)
    shard_keys, per_bucket = ("name", "indices", "count", "bytes", "sha256"), {}
    if "buckets" in plan:  # the reader's sampler groups batches by bucket: counts per shard and in all
        shard_keys += ("bucket_counts",)
        per_bucket = {"bucket_counts": np.sum([s["bucket_counts"] for s in sidecars], axis=0).tolist()}
    return {
        **plan,
        "num_samples": num_samples,
        **per_bucket,
        "shards": [{k: s[k] for k in shard_keys} for s in sidecars],
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
    layout = plan_layout(plan)
    sidecars = [completed_shard(out_dir, layout, shard, check_sha256=False) for shard in range(layout.num_shards)]
    if any(s is None for s in sidecars):
        return None
    path, manifest = out_dir / MANIFEST, build_manifest(plan, sidecars)
    if read_json(path) != manifest:  # parallel finishers build the same manifest; only a changed one is rewritten
        atomic_write_json(path, manifest, indent=1, sort_keys=True)
    for leftover in (out_dir / CLAIMS).iterdir():  # claims left by processes killed between commit and release
        leftover.unlink(missing_ok=True)
    return path


def read_manifest(path: str | Path) -> dict:
    """The manifest of a complete latent cache, with a clear error for a missing, foreign or older one."""
    manifest = read_json(Path(path) / MANIFEST)
    if manifest is None:
        raise FileNotFoundError(
            f"no {MANIFEST} in {str(path)!r}: not a latent cache, or its caching has not finished "
            "(re-run `task=cache_latents`; it resumes)"
        )
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: expected a {FORMAT} v{VERSION} manifest, got {manifest.get('format')}")
    if manifest.get("version") != VERSION:
        raise ConfigError(
            f"latent cache {str(path)!r} has format v{manifest.get('version')}, this ldm reads v{VERSION} (records "
            f"carry a crc32 since v2): re-run task=cache_latents with task.out_dir set to a new folder (or delete "
            f"{str(path)!r} first)"
        )
    for i, shard in enumerate(manifest["shards"]):  # a manifest is data: it names only the cache's own shard files
        if shard.get("name") != f"{shard_name(i)}.tar":
            raise PermissionError(f"refusing latent cache {str(path)!r}: its {MANIFEST} names shard {i} "
                                  f"{str(shard.get('name'))[:40]!r}, not {shard_name(i)}.tar")
    return manifest
