"""task=sample: images, `samples.jsonl` and labelled grids from a checkpoint alone (EMA weights by default)."""
import json
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.models.generate import Job
from ldm.models.pipeline import image_batch, load
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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(spec, key: str) -> list[Path]:
    """A folder (its images, sorted by name) or a list of files, for task.images / task.masks."""
    paths = [Path(spec)] if isinstance(spec, str) else [Path(p) for p in spec]
    if len(paths) == 1 and paths[0].is_dir():
        paths = sorted(p for p in paths[0].iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ConfigError(f"`{key}`: no images ({', '.join(IMAGE_SUFFIXES)}) in {spec}")
    for path in paths:
        if not path.is_file():
            raise missing_file(str(path), key, "conditioning image")
    return paths


def input_view(task: str | None, images: torch.Tensor, masks: torch.Tensor | None, size: int) -> torch.Tensor:
    """What the model is given, as pictures [N, 3, size, size]: the masked image (hole mid-grey), the low-res image
    (nearest-upscaled), the semantic map."""
    if masks is not None:
        images = torch.where(masks > 0.5, torch.zeros_like(images), images)
    return torch.nn.functional.interpolate(images, (size, size), mode="nearest")


def run_with_images(cfg: DictConfig, model, sampling: Sampling, ckpt_path: Path) -> Path:
    """task.images: image-conditioned sampling (inpainting with task.masks, super-resolution, layout-to-image; a
    text-to-image model inpaints training-free), grid rows = images, columns = input | one output per seed."""
    t = cfg.task
    files = image_files(t.images, "task.images")
    task = model.image_task
    masks = None
    if t.masks is not None:
        mask_files = image_files(t.masks, "task.masks")
        if len(mask_files) != len(files):
            raise ConfigError(f"{len(files)} task.images but {len(mask_files)} task.masks: give one mask per image")
        masks = (image_batch(mask_files, model.resolution).mean(1, keepdim=True) > 0).float()  # white = to fill
    elif task == "inpaint" or t.training_free:
        raise ConfigError("inpainting needs `task.masks` (a folder or list of mask images, white = to fill)")
    prompts = list(t.get("prompts") or [])
    if len(prompts) not in (0, 1, len(files)):
        raise ConfigError(f"{len(files)} images and {len(prompts)} prompts: give one prompt per image, one, or none")
    prompts = prompts * len(files) if len(prompts) == 1 else prompts or None
    size = model.resolution // model.sr_factor() if task == "sr" else model.resolution
    pixels = image_batch(files, model.resolution if masks is not None else size)
    columns = []
    for seed in sampling.seeds:
        opts = dict(seeds=[seed] * len(files), output="tensor", sampler=sampling.sampler, steps=sampling.steps,
                    guidance_scale=sampling.guidance_scale, use_ema=sampling.use_ema)
        if masks is not None:
            columns.append(model.inpaint(pixels, masks, prompts, training_free=t.training_free, **opts))
        else:
            columns.append(model.condition_images(pixels, prompts, **opts))
    out_dir = Path(cfg.paths.run_dir) / "samples" / (t.tag or f"step{model.step:08d}-images")
    lines = []
    for j, seed in enumerate(sampling.seeds):
        for i, file in enumerate(files):
            name = f"{i:05d}-{file.stem}-seed{seed}.png"
            save_png(to_uint8(columns[j][i]).permute(1, 2, 0), out_dir / name)
            lines.append(json.dumps(dict(file=name, input=str(file), mask=None if masks is None else str(mask_files[i]),
                                         prompt=None if prompts is None else prompts[i], seed=seed,
                                         sampler=sampling.sampler, steps=sampling.steps, ckpt=str(ckpt_path),
                                         ckpt_step=model.step, training_free=bool(t.training_free))) + "\n")
    atomic_write_text(out_dir / "samples.jsonl", "".join(lines))
    tiles = torch.stack([input_view(task, pixels, masks, model.resolution), *columns], dim=1)  # [N, 1 + seeds, ...]
    written = save_grid(labeled_grid(tiles, [f.stem for f in files], ["input"] + [f"seed {s}" for s in sampling.seeds],
                                     scale=t.grid_scale), out_dir / "grid.png", t.pdf)
    print(f"grid: {written[0]}")
    print(f"{len(files) * len(sampling.seeds)} images in {out_dir}")
    return out_dir


def run(cfg: DictConfig) -> Path:
    allow_targets(cfg.security.allow)  # the user's own additions to the allow-list of targets
    t = cfg.task
    sampling = safe_instantiate(cfg.sampling, stored=False)  # unknown sampler or schedule: fails before loading
    if t.get("images") is not None:  # image-conditioned: prompts are optional (hybrid or training-free models)
        [ckpt_path] = resolve_checkpoint(cfg.paths.run_dir, t.ckpt)
        return run_with_images(cfg, load(ckpt_path), sampling, ckpt_path)
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
