"""Run directories: one stable directory per experiment name, resumed by re-running the same command."""
import uuid
from pathlib import Path

from omegaconf import DictConfig

from ldm.utils.atomic import atomic_write_bytes, atomic_write_yaml
from ldm.utils.errors import ConfigError

LAST = "last.ckpt"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """All `step-XXXXXXXX.ckpt` checkpoints of a run (files, or trainer=fsdp's sharded directories), oldest first."""
    return sorted(checkpoint_dir(run_dir).glob("step-*.ckpt"))


def resume_checkpoint(run_dir: str | Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start; refuse to start over existing checkpoints.

    `last.ckpt` is the newest by construction: periodic, final and requeue-signal saves all (re)write it.
    """
    ckdir = checkpoint_dir(run_dir)
    last = ckdir / LAST
    existing = sorted(p for p in ckdir.glob("*.ckpt") if not p.name.startswith("diverged-")) if ckdir.is_dir() else []
    if not resume:
        if existing:
            raise ConfigError(
                f"resume=false but {ckdir} already holds {len(existing)} checkpoint(s). Nothing is deleted "
                f"silently: pick another `name=`, or move/delete {ckdir} yourself, or drop resume=false to continue."
            )
        return None
    if last.exists():
        return last
    if step_checkpoints(run_dir):  # last.ckpt missing: the highest step (names are zero-padded)
        return step_checkpoints(run_dir)[-1]
    if existing:  # only e.g. best.ckpt
        return max(existing, key=lambda p: p.stat().st_mtime)
    return None


def resolve_checkpoint(run_dir: str | Path, ckpt: str) -> list[Path]:
    """`task.ckpt` = last | best | all | a path: the checkpoint file(s) that sampling and evaluation load."""
    ckdir = checkpoint_dir(run_dir)
    if ckpt in ("last", "best"):
        paths = [ckdir / f"{ckpt}.ckpt"]
    elif ckpt == "all":
        paths = step_checkpoints(run_dir) or [ckdir / LAST]
    else:
        paths = [Path(ckpt)]
    for p in paths:
        if not p.exists():  # a file, or a sharded (trainer=fsdp) directory
            raise ConfigError(f"checkpoint not found: {p} (config key `task.ckpt`; train first or pass task.ckpt=PATH)")
    return paths


def save_run_config(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Write the resolved config to `<run_dir>/config.yaml` (overwritten on resume with the new overrides)."""
    path = Path(run_dir) / "config.yaml"
    atomic_write_yaml(path, cfg)
    return path


def remove_temp_files(run_dir: str | Path) -> list[Path]:
    """Delete temp files that a kill during an atomic write left in the run directory (`.NAME.tmp-UUID`, see
    ldm/utils/atomic.py). Call only while holding the run lock: a live writer's temp file would go too."""
    run_dir = Path(run_dir)
    left = [p for d in (run_dir, checkpoint_dir(run_dir), run_dir / "eval") if d.is_dir()
            for p in d.glob(".*.tmp-*") if p.is_file()]
    for path in left:
        path.unlink(missing_ok=True)
    return left


def persistent_run_id(run_dir: str | Path) -> str:
    """A unique id made at the run's first start and kept in `<run_dir>/run_id` (W&B's run id: a resumed run
    continues the same W&B run, and two projects' runs of the same name never collide). Safe for concurrent ranks:
    the first exclusive write wins and everyone reads it."""
    path = Path(run_dir) / "run_id"
    if not path.is_file():
        atomic_write_bytes(path, uuid.uuid4().hex[:16].encode(), exclusive=True)
    return path.read_text().strip()
