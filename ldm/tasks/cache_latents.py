"""task=cache_latents: encode the data's splits with this run's frozen autoencoder into verified latent shards."""
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.data.latent_cache import CacheResult, cache_latents
from ldm.data.latent_cache.format import read_json
from ldm.data.latent_cache.stream import cache_stream_latents
from ldm.data.webdataset_images import WebImageDataset
from ldm.models.first_stage import first_stage_hash, load_first_stage_with_config
from ldm.utils.dist_env import dist_env
from ldm.utils.errors import ConfigError
from ldm.utils.rundir import resolve_checkpoint
from ldm.utils.safe_config import allow_targets, safe_instantiate


def _device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    # one GPU per rank under torchrun/srun/Lightning (the local rank), else the CPU
    return torch.device("cuda", dist_env().local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _check_deterministic(dataset, split: str) -> None:
    """A random crop or flip would be baked into the cache once; the cache stores both orientations instead."""
    if getattr(dataset, "flip", False) is True or getattr(dataset, "crop", "center") == "random":
        raise ConfigError(
            f"data.{split} applies a random crop or flip, which caching would freeze into one draw: set "
            f"data.{split}.crop=center data.{split}.flip=false (task.flip=true stores the mirrored posterior too)"
        )


def _report(split: str, out_dir: Path, result: CacheResult) -> None:
    print(
        f"[{split}] encoded {result.encoded} images ({result.images_per_s:.1f} images/s), skipped {result.skipped}; "
        f"shards: {result.shards_written} written, {result.shards_found_complete} already complete, "
        f"{result.shards_left_to_others} being written by other processes"
    )
    if result.manifest is None:
        print(f"[{split}] {out_dir}: not complete yet; the last process to finish writes manifest.json (re-run to resume)")
        return
    manifest = read_json(result.manifest)
    skipped = manifest["skipped"]
    keys = ", ".join(str(e["key"]) for e in skipped["examples"][:3])
    reasons = f" {skipped['reasons']} (e.g. {keys}; all in manifest.json)" if skipped["total"] else ""
    print(f"[{split}] {result.manifest}: {manifest['num_samples']} latents {manifest['latent_shape']}, "
          f"{skipped['total']} inputs skipped{reasons}")
    counts = ", ".join(f"{n} {reason}" for reason, n in skipped["reasons"].items())
    print(f"[{split}] {manifest['num_samples']} written, {skipped['total']} skipped ({counts or 'none'})")


def run(cfg: DictConfig) -> dict[str, CacheResult]:
    allow_targets(cfg.security.allow)  # the user's own additions to the allow-list of targets
    task = cfg.task
    checkpoints = resolve_checkpoint(cfg.paths.run_dir, str(task.ckpt))
    if len(checkpoints) != 1:
        raise ConfigError(f"`task.ckpt` must name one checkpoint (last, best or a path), got {task.ckpt!r}")
    first_stage, model_config = load_first_stage_with_config(checkpoints[0])
    identity = first_stage_hash(first_stage)
    print(f"first stage {checkpoints[0]} (sha256 {identity[:16]}...)")
    datamodule = safe_instantiate(cfg.data, stored=False, where="data")
    env = dist_env()
    rank, world_size = env.rank, env.world_size
    results = {}
    for split in task.splits:
        dataset = getattr(datamodule, split, None)
        if dataset is None:
            print(f"[{split}] the data config has no {split} dataset: nothing to cache")
            continue
        _check_deterministic(dataset, split)
        out_dir = Path(task.out_dir) / split
        common = dict(first_stage_hash=identity, first_stage_config=model_config, batch_size=task.batch_size,
                      num_workers=task.num_workers, flip=task.flip, rank=rank, world_size=world_size,
                      device=_device(task.device), stale_after_s=task.stale_claim_s, progress=task.progress)
        if isinstance(dataset, WebImageDataset):  # input tar shard i -> latent shard i
            results[split] = cache_stream_latents(first_stage, dataset.shards, out_dir, dataset.preprocess, **common)
        else:
            source = OmegaConf.to_container(cfg.data[split], resolve=True) if cfg.data.get(split) else None
            results[split] = cache_latents(first_stage, dataset, out_dir, source=source,
                                           samples_per_shard=task.samples_per_shard, **common)
        _report(split, out_dir, results[split])
    return results
