"""task=evaluate: sample with fixed seeds from one or every checkpoint, score with the experiment's suite,
write `eval/metrics.{csv,json}` (one row per checkpoint step) and, for ckpt=all, a plot per metric."""
import csv
import hashlib
import io
import json
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from ldm.models.generate import render
from ldm.models.sampling import Sampling, conditions
from ldm.utils.atomic import atomic_torch_save, atomic_write_json, atomic_write_text
from ldm.utils.checkpoint import load_module
from ldm.utils.errors import ConfigError
from ldm.utils.hashing import sha256_path
from ldm.utils.images import from_uint8, to_uint8
from ldm.utils.plots import plot_metrics
from ldm.utils.rundir import resolve_checkpoint
from ldm.utils.safe_config import allow_targets, safe_instantiate

# the sampling settings that decide an evaluation's images (batch size, the grids' seeds and prompts do not)
IMAGE_SETTINGS = ("sampler", "steps", "schedule", "guidance_scale", "guidance_rescale", "eta", "seed_offset", "use_ema")


def settings_tag(s: Sampling, num_samples: int) -> str:
    return f"{s.sampler}-{s.steps}-{s.schedule}-g{s.guidance_scale:g}-{'ema' if s.use_ema else 'raw'}-n{num_samples}"


def samples_key(sampling: Sampling, prompts: list[str] | None, labels: list[int] | None) -> str:
    """A hash of everything that decides the images besides the weights: sampling settings and conditions."""
    settings = {k: v for k, v in asdict(sampling).items() if k in IMAGE_SETTINGS}
    return hashlib.sha256(json.dumps([settings, prompts, labels], sort_keys=True).encode()).hexdigest()[:16]


def samples_for(path: Path, sampling: Sampling, suite, out: Path, progress: bool) -> tuple[torch.Tensor, int]:
    """Generated images for one checkpoint, reused from `out` when this checkpoint was already sampled."""
    if out.is_file():
        cached = torch.load(out, weights_only=True)
        return from_uint8(cached["images"]), int(cached["step"])
    module, _, ckpt = load_module(path)
    module.to("cuda" if torch.cuda.is_available() else "cpu")
    images = render(module, sampling.numbered_jobs(conditions(*suite.conditions())), sampling, progress=progress)
    step = int(ckpt.get("global_step", 0))
    atomic_torch_save({"images": to_uint8(images), "step": step}, out)
    return images, step


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
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(eval_dir / "metrics.csv", table.getvalue())


def print_table(rows: list[dict], floor: dict[str, float]) -> None:
    """Metrics down, checkpoints across; the last column is real images (the floor a model can reach)."""
    table = Table(title="evaluation")
    table.add_column("metric")
    for r in rows:
        table.add_column(f"step {r['step']}", justify="right")
    table.add_column("real images", justify="right", style="dim")
    for name in floor:
        table.add_row(name, *(f"{r[name]:.4f}" for r in rows), f"{floor[name]:.4f}")
    Console(width=200).print(table)


def run(cfg: DictConfig) -> list[dict]:
    allow_targets(cfg.security.allow)  # the user's own additions to the allow-list of targets
    t = cfg.task
    sampling = safe_instantiate(cfg.sampling, stored=False)  # unknown sampler or schedule: fails before any work
    if OmegaConf.select(cfg, "eval") is None:
        raise ConfigError("this experiment has no `eval` suite (e.g. eval._target_=ldm.eval.suites.ShapesSuite)")
    suite = safe_instantiate(cfg.eval, stored=False, where="eval")
    eval_dir = Path(cfg.paths.run_dir) / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    prompts, labels = suite.conditions()
    num_samples = len(prompts or labels)
    tag = settings_tag(sampling, num_samples)

    # the floor depends on the suite's protocol (a reference set, a feature network): one file per protocol
    suite_key = hashlib.sha256(json.dumps(suite.protocol(), sort_keys=True).encode()).hexdigest()[:8]
    floor_path = eval_dir / f"floor-{suite.name}-{suite_key}.json"
    floor = json.loads(floor_path.read_text()) if floor_path.is_file() else suite.floor()
    atomic_write_json(floor_path, floor)

    old = json.loads((eval_dir / "metrics.json").read_text()) if (eval_dir / "metrics.json").is_file() else []
    rows, scores = [], []
    for path in resolve_checkpoint(cfg.paths.run_dir, str(t.ckpt)):
        # samples are reused for the same checkpoint content (last.ckpt is overwritten as training goes on, a
        # copied file keeps its samples) and the same sampling settings and conditions
        ckpt_sha256 = sha256_path(path)
        out = eval_dir / "samples" / f"{ckpt_sha256[:16]}-{samples_key(sampling, prompts, labels)}.pt"
        images, step = samples_for(path, sampling, suite, out, t.progress)
        score = suite.score(images)
        scores.append(dict(step=step, **score))
        rows.append(dict(step=step, ckpt=str(path), tag=tag, suite=suite.name,
                         **protocol(sampling, len(images), ckpt_sha256, suite), **score))
    new_keys = {row_key(r) for r in rows}
    write_tables([r for r in old if row_key(r) not in new_keys] + rows, eval_dir)
    if t.ckpt == "all" and len(rows) > 1:
        plot_metrics(scores, eval_dir / f"metrics-{tag}.png")  # the metrics, not the protocol's numbers
    print_table(rows, floor)
    return rows
