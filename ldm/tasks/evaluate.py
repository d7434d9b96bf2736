"""task=evaluate: sample with fixed seeds from one or every checkpoint, score with the experiment's suite,
write `eval/metrics.{csv,json}` (one row per checkpoint step and sampling settings) and, for ckpt=all, a plot per
metric; task.sweep=samplers|guidance evaluates a grid of settings and writes its table and plot. Several ranks
(torchrun, srun) split the samples by seed; rank 0 gathers and scores them."""
import csv
import hashlib
import io
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from ldm.eval.sweeps import curves, guidance_table, nfe_table, sweep_grid
from ldm.models.first_stage import round_trip
from ldm.models.generate import Job, render
from ldm.models.sampling import Sampling, conditions
from ldm.utils.atomic import atomic_torch_save, atomic_write_json, atomic_write_text
from ldm.utils.checkpoint import load_module
from ldm.utils.dist_env import DistEnv, dist_env
from ldm.utils.errors import ConfigError
from ldm.utils.hashing import sha256_path
from ldm.utils.images import from_uint8, to_uint8
from ldm.utils.plots import plot_curves, plot_metrics
from ldm.utils.rank_files import (clear_failure, gather_parts, part_path, rank_share, remove_parts, write_failure,
                                  write_part)
from ldm.utils.rundir import resolve_checkpoint
from ldm.utils.safe_config import allow_targets, safe_instantiate

# the sampling settings that decide an evaluation's images (batch size, the grids' seeds and prompts do not)
IMAGE_SETTINGS = ("sampler", "steps", "schedule", "guidance_scale", "guidance_rescale", "eta", "seed_offset", "use_ema")


def settings_tag(s: Sampling, num_samples: int) -> str:
    return f"{s.sampler}-{s.steps}-{s.schedule}-g{s.guidance_scale:g}-{'ema' if s.use_ema else 'raw'}-n{num_samples}"


def samples_key(sampling: Sampling, prompts: list[str] | None, labels: list[int] | None) -> str:
    """A hash of everything that decides the images besides the weights: sampling settings and conditions."""
    settings = {k: v for k, v in asdict(sampling).items() if k in IMAGE_SETTINGS}
    for k in ("guidance_scale", "guidance_rescale"):  # `guidance_scale=3` on the command line draws what 3.0 does
        settings[k] = float(settings[k])
    return hashlib.sha256(json.dumps([settings, prompts, labels], sort_keys=True).encode()).hexdigest()[:16]


class LazyModule:
    """A checkpoint's module, loaded at the first call (never when every sample it would draw is cached)."""

    def __init__(self, path: Path, device: str):
        self.path, self.device, self.module, self.step = path, device, None, None

    def __call__(self):
        if self.module is None:
            self.module, _, ckpt = load_module(self.path)
            self.module.to(self.device)
            self.step = int(ckpt.get("global_step", 0))
        return self.module, self.step


def samples_for(load: LazyModule, sampling: Sampling, jobs: list[Job], out: Path, env: DistEnv, timeout_s: float,
                progress: bool) -> tuple[torch.Tensor | None, int | None]:
    """8-bit images for the jobs (scored as stored, so a rerun from `out` gives the same numbers) and the step.

    With several ranks, rank r draws jobs r, r+W, ... (each job has its own seed, so the split never changes an
    image), writes them as its part of `out`, and rank 0 gathers the parts into `out`; other ranks get None."""
    if out.is_file():
        cached = torch.load(out, weights_only=True)
        return from_uint8(cached["images"]), int(cached["step"])
    rank, world = env.rank, env.world_size
    if world == 1:
        module, step = load()
        images = to_uint8(render(module, jobs, sampling, progress=progress))
        atomic_torch_save({"images": images, "step": step}, out)
        return from_uint8(images), step
    if len(jobs) < world:
        raise ConfigError(f"{len(jobs)} samples cannot be split over {world} ranks: evaluate on fewer processes")
    mine = rank_share(len(jobs), rank, world)
    if not part_path(out, rank, world).is_file():  # a restarted rank keeps the share it already drew
        clear_failure(out, rank, world)
        try:
            module, step = load()
            images = to_uint8(render(module, [jobs[i] for i in mine], sampling, progress=progress))
        except BaseException as error:  # rank 0 stops waiting for this share
            write_failure(out, rank, world, f"{type(error).__name__}: {error}".splitlines()[0])
            raise
        write_part(out, rank, world, {"indices": torch.tensor(mine), "images": images, "step": step})
    if rank != 0:
        return None, None
    parts = gather_parts(out, world, timeout_s)
    images = torch.empty(len(jobs), *parts[0]["images"].shape[1:], dtype=torch.uint8)
    for part in parts:
        images[part["indices"]] = part["images"]
    step = int(parts[0]["step"])
    atomic_torch_save({"images": images, "step": step}, out)
    remove_parts(out, world)
    return from_uint8(images), step


def protocol(sampling: Sampling, num_samples: int, ckpt_sha256: str, suite) -> dict:
    """What decides a row's numbers besides the model's skill, written with it: the checkpoint's content, EMA or raw
    weights, the sampling settings, the seeds (sample i: seed_offset + i), n, and the suite's own (feature
    extractor, resize, reference set)."""
    return dict(
        ckpt_sha256=ckpt_sha256, weights="ema" if sampling.use_ema else "raw", sampler=sampling.sampler,
        steps=sampling.steps, schedule=sampling.schedule, guidance_scale=sampling.guidance_scale,
        guidance_rescale=sampling.guidance_rescale, eta=sampling.eta,
        seeds=f"{sampling.seed_offset}..{sampling.seed_offset + num_samples - 1}", n=num_samples, **suite.protocol(),
    )


def row_key(row: dict) -> tuple:
    return row["step"], row["tag"], row.get("suite")


def write_tables(rows: list[dict], eval_dir: Path) -> None:
    """metrics.json and metrics.csv, one row per (checkpoint step, sampling settings, suite), sorted by step."""
    rows = sorted(rows, key=lambda r: (r["tag"], r["step"]))
    atomic_write_json(eval_dir / "metrics.json", rows)
    write_csv(rows, eval_dir / "metrics.csv")


def write_csv(rows: list[dict], path: Path) -> None:
    """Rows as CSV (the union of their keys as columns), written atomically."""
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, table.getvalue())


def print_table(rows: list[dict], floor: dict[str, float], first_stage: dict[str, float]) -> None:
    """Metrics down, checkpoints (or a sweep's settings) across; the last columns are real images after the first
    stage's round trip (the most a latent model can score), when there is one, and real images (the floor)."""
    table = Table(title="evaluation")
    table.add_column("metric")
    by_settings = len({r["tag"] for r in rows}) > 1  # a sweep: one column per sampling setting
    for r in rows:
        table.add_column(r["tag"] if by_settings else f"step {r['step']}", justify="right")
    floors = {"real images": floor} if not first_stage else {"first stage": first_stage, "real images": floor}
    for title in floors:
        table.add_column(title, justify="right", style="dim")
    for name in floor:
        table.add_row(name, *(f"{r[name]:.4f}" for r in rows),
                      *(f"{f[name]:.4f}" if name in f else "-" for f in floors.values()))
    Console(width=200).print(table)


def first_stage_floor(suite, load: "LazyModule", path: Path) -> dict[str, float]:
    """The suite's floor after the checkpoint's first stage (encode to the posterior mean, decode, 8 bits): no latent
    model with that first stage scores better, so a metric stuck here is the autoencoder's. {} without a first
    stage. Kept in `path` (named by the checkpoint)."""
    if path.is_file():
        return json.loads(path.read_text())
    module, _ = load()
    if module.first_stage is None:
        return {}
    floor = suite.floor(round_trip(module.first_stage))
    atomic_write_json(path, floor)
    return floor


def write_sweep(rows: list[dict], sweep: str, suite, eval_dir: Path) -> None:
    """The sweep's table (CSV) and plot (PNG): FID vs NFE per sampler, or FID vs prompt alignment over guidance."""
    title = f"{suite.name}, step {rows[0]['step']}, n={rows[0]['n']}"
    if sweep == "samplers":
        points = nfe_table(rows, suite.fid_metric)
        lines, labels = curves(points, "sampler", "nfe", suite.fid_metric), None
        xlabel, title = "denoiser evaluations per image (NFE)", f"{title}, guidance {rows[0]['guidance_scale']:g}"
    else:
        points = guidance_table(rows, suite.fid_metric, suite.alignment_metric)
        lines = curves(points, "sampler", suite.alignment_metric, suite.fid_metric)
        labels, xlabel = [f"g={p['guidance_scale']:g}" for p in points], suite.alignment_metric
        title = f"{title}, {rows[0]['sampler']} {rows[0]['steps']} steps"
    stem = eval_dir / f"sweep-{sweep}-{suite.name}"
    write_csv(points, stem.with_suffix(".csv"))
    plot_curves(lines, stem.with_suffix(".png"), xlabel=xlabel, ylabel=suite.fid_metric, point_labels=labels,
                title=title)
    print(f"sweep: {stem}.csv, {stem}.png")


def run(cfg: DictConfig) -> list[dict]:
    allow_targets(cfg.security.allow)  # the user's own additions to the allow-list of targets
    t = cfg.task
    base = safe_instantiate(cfg.sampling, stored=False)  # unknown sampler or schedule: fails before any work
    sweep = t.sweep
    grid = [replace(base, **o) for o in sweep_grid(sweep, list(t.sweep_samplers), list(t.sweep_steps),
                                                   list(t.sweep_guidance))]  # every setting checked up front
    if OmegaConf.select(cfg, "eval") is None:
        raise ConfigError("this experiment has no `eval` suite (e.g. eval._target_=ldm.eval.suites.ShapesSuite)")
    suite = safe_instantiate(cfg.eval, stored=False, where="eval")
    checkpoints = resolve_checkpoint(cfg.paths.run_dir, str(t.ckpt))
    if sweep != "none" and len(checkpoints) > 1:
        raise ConfigError(f"task.sweep={sweep} runs on one checkpoint: set task.ckpt=last|best|PATH, not all")
    env = dist_env()
    device = f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu"  # one GPU per rank
    if torch.cuda.is_available():
        torch.cuda.set_device(device)
    eval_dir = Path(cfg.paths.run_dir) / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    prompts, labels = suite.conditions()

    rows, scores = [], []
    for path in checkpoints:
        # samples are reused for the same checkpoint content (last.ckpt is overwritten as training goes on, a
        # copied file keeps its samples) and the same sampling settings and conditions
        ckpt_sha256, load = sha256_path(path), LazyModule(path, device)
        for sampling in grid:
            out = eval_dir / "samples" / f"{ckpt_sha256[:16]}-{samples_key(sampling, prompts, labels)}.pt"
            jobs = sampling.numbered_jobs(conditions(prompts, labels))
            images, step = samples_for(load, sampling, jobs, out, env, t.gather_timeout_s, t.progress)
            if images is None:  # another rank scores
                continue
            score = suite.score(images)
            scores.append(dict(step=step, **score))
            rows.append(dict(step=step, ckpt=str(path), tag=settings_tag(sampling, len(images)), suite=suite.name,
                             **protocol(sampling, len(images), ckpt_sha256, suite), **score))
    if env.rank != 0:
        print(f"rank {env.rank}: samples written; rank 0 scores them")
        return []

    # the floor depends on the suite's protocol (a reference set, a feature network): one file per protocol
    suite_key = hashlib.sha256(json.dumps(suite.protocol(), sort_keys=True).encode()).hexdigest()[:8]
    floor_path = eval_dir / f"floor-{suite.name}-{suite_key}.json"
    floor = json.loads(floor_path.read_text()) if floor_path.is_file() else suite.floor()
    atomic_write_json(floor_path, floor)
    # `load` and `ckpt_sha256` are the last checkpoint's, from the loop
    first_stage = first_stage_floor(suite, load, eval_dir / f"floor-first-stage-{suite.name}-{suite_key}-"
                                                            f"{ckpt_sha256[:16]}.json")

    old = json.loads((eval_dir / "metrics.json").read_text()) if (eval_dir / "metrics.json").is_file() else []
    new_keys = {row_key(r) for r in rows}
    write_tables([r for r in old if row_key(r) not in new_keys] + rows, eval_dir)
    if t.ckpt == "all" and len(rows) > 1:
        plot_metrics(scores, eval_dir / f"metrics-{rows[0]['tag']}.png")  # the metrics, not the protocol's numbers
    if sweep != "none":
        write_sweep(rows, sweep, suite, eval_dir)
    print_table(rows, floor, first_stage)
    return rows
