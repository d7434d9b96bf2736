"""task=sample: images, `samples.jsonl` and labelled grids from a checkpoint alone (EMA weights by default)."""
import json
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ldm.models.generate import Job
from ldm.models.pipeline import load
from ldm.models.sampling import Sampling, conditions
from ldm.utils.atomic import atomic_write_json, atomic_write_text
from ldm.utils.dist_env import dist_env
from ldm.utils.errors import ConfigError, missing_file
from ldm.utils.images import save_png, to_uint8
from ldm.utils.labeled_grid import labeled_grid, save_grid
from ldm.utils.rundir import resolve_checkpoint
from ldm.utils.safe_config import allow_targets, safe_instantiate


def read_conditions(t: DictConfig) -> tuple[list[str], list[int]]:
    """Prompts (from `task.prompts` or `task.prompts_file`, one per line) or class `task.labels`; one list is filled."""
    if t.get("prompts_file"):
        path = Path(t.prompts_file)
        if not path.is_file():
            raise missing_file(str(path), "task.prompts_file", "prompts file")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = list(t.get("prompts") or [])
    labels = [int(y) for y in (t.get("labels") or [])]
    if prompts and labels:
        raise ConfigError("give `task.prompts`/`task.prompts_file` or `task.labels`, not both")
    if not prompts and not labels:
        raise ConfigError("nothing to sample: set `task.prompts=[...]`, `task.prompts_file=PATH` or `task.labels=[...]`")
    return prompts, labels


def grid_jobs(t: DictConfig, sampling: Sampling, prompts: list[str], labels: list[int]
              ) -> tuple[list[list[Job]], list[str], list[str]]:
    """Rows x columns of jobs for the chosen grid, with their labels."""
    conds = conditions(prompts, labels)
    names = prompts or [f"class {y}" for y in labels]
    seed = sampling.seeds[0]
    if t.grid == "prompts_x_seeds":
        return sampling.grid_jobs(conds), names, [f"seed {s}" for s in sampling.seeds]
    if t.grid == "prompt_x_guidance":
        rows = [[Job(p, y, seed, sampling.sampler, sampling.steps, float(g)) for g in t.grid_guidance] for p, y in conds]
        return rows, names, [f"guidance {g:g}" for g in t.grid_guidance]
    if t.grid == "sampler_x_steps":
        p, y = conds[0]
        rows = [[Job(p, y, seed, s, n, sampling.guidance_scale) for n in t.grid_steps] for s in t.grid_samplers]
        return rows, list(t.grid_samplers), [f"{n} steps" for n in t.grid_steps]
    raise ConfigError(f"unknown task.grid {t.grid!r}: none | prompts_x_seeds | prompt_x_guidance | sampler_x_steps")


def run(cfg: DictConfig) -> Path:
    allow_targets(cfg.security.allow)  # the user's own additions to the allow-list of targets
    t = cfg.task
    sampling = safe_instantiate(cfg.sampling, stored=False)  # unknown sampler or schedule: fails before loading
    prompts, labels = read_conditions(t)
    [ckpt_path] = resolve_checkpoint(cfg.paths.run_dir, t.ckpt)
    model = load(ckpt_path)  # the Python API's object: a script and this task draw the same images
    step = model.step
    tag = t.tag or f"step{step:08d}-{t.grid}"
    out_dir = Path(cfg.paths.run_dir) / "samples" / tag
    init = None
    if t.init_image:  # img2img: prepared like training data (centred square, resized), its posterior mean
        if not Path(t.init_image).is_file():
            raise missing_file(t.init_image, "task.init_image", "init image")
        init = model.encode([t.init_image])

    rows, row_labels, col_labels = (
        grid_jobs(t, sampling, prompts, labels) if t.grid != "none"
        else (sampling.grid_jobs(conditions(prompts, labels)), [], [])
    )
    jobs = [job for row in rows for job in row]
    env = dist_env()
    rank, world = env.rank, env.world_size
    mine = list(range(rank, len(jobs), world))  # several GPUs: rank r renders jobs r, r+W, ...
    images = model.render([jobs[i] for i in mine], sampling, init, strength=t.strength, progress=t.progress)

    lines = []
    for i, image in zip(mine, images):
        name = jobs[i].file_name(i)
        save_png(to_uint8(image).permute(1, 2, 0), out_dir / name)
        record = dict(file=name, **asdict(jobs[i]), schedule=sampling.schedule, ckpt=str(ckpt_path), ckpt_step=step,
                      ema=sampling.use_ema, strength=t.strength if init is not None else None)
        lines.append(json.dumps(record) + "\n")
    atomic_write_text(out_dir / (f"samples.rank{rank}.jsonl" if world > 1 else "samples.jsonl"), "".join(lines))
    if t.grid != "none" and world == 1:
        tiles = images.reshape(len(rows), len(rows[0]), *images.shape[1:])
        written = save_grid(labeled_grid(tiles, row_labels, col_labels, scale=t.grid_scale), out_dir / "grid.png", t.pdf)
        settings = {**asdict(sampling), **OmegaConf.to_container(t, resolve=True), "prompts": prompts,
                    "labels": labels, "ckpt": str(ckpt_path), "ckpt_step": step}
        atomic_write_json(out_dir / "grid.json", settings)
        print(f"grid: {written[0]}")
    print(f"{len(mine)} images in {out_dir}")
    return out_dir
