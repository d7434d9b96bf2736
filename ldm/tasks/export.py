"""task=export: a sharded (trainer=fsdp) checkpoint -> one .ckpt file; any checkpoint -> .safetensors weights
(EMA by default) that carry their config, so `task=sample|evaluate task.ckpt=PATH` rebuilds the model from either;
task.format=diffusers|single_file: the Stable Diffusion formats other tools load (ldm/interop/write_target.py)."""
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ldm.interop.build import IMPORTED_KEY
from ldm.interop.init_from import INIT_KEY
from ldm.interop.write_target import export_diffusers, export_lora, export_single_file

from ldm.utils.checkpoint import (
    CONFIG_KEY, EMA_FOLDED_KEY, FIRST_STAGE_CONFIG_KEY, build_module, checkpoint_config, read_checkpoint,
)
from ldm.utils.atomic import atomic_torch_save
from ldm.utils.consolidate import fold_ema, is_sharded_checkpoint, save_safetensors
from ldm.utils.errors import ConfigError
from ldm.utils.rundir import resolve_checkpoint
from ldm.utils.safe_config import allow_targets

# what a safetensors file keeps besides weights: enough to rebuild the model and label its samples
METADATA_KEYS = (CONFIG_KEY, FIRST_STAGE_CONFIG_KEY, "first_stage_hash", "global_step", "epoch", INIT_KEY, IMPORTED_KEY)


def export_checkpoint(
    path: str | Path, out_dir: str | Path, *, weights: str = "ema", safetensors: bool = True
) -> list[Path]:
    """Write `<out_dir>/step-XXXXXXXX.ckpt` (sharded input only: weights and metadata, no optimizer state) and
    `<out_dir>/step-XXXXXXXX.safetensors` (weights="ema": EMA weights in place of the trained ones; "all": both)."""
    if weights not in ("ema", "all"):
        raise ConfigError(f"task.weights={weights!r}: ema | all")
    ckpt = read_checkpoint(path)
    stem = Path(out_dir) / f"step-{int(ckpt.get('global_step', 0)):08d}"
    written = []
    if is_sharded_checkpoint(path):
        atomic_torch_save(ckpt, stem.with_suffix(".ckpt"))
        written.append(stem.with_suffix(".ckpt"))
    if safetensors:
        state, folded = fold_ema(build_module(ckpt)) if weights == "ema" else (ckpt["state_dict"], [])
        metadata = {k: ckpt[k] for k in METADATA_KEYS if k in ckpt} | {EMA_FOLDED_KEY: folded}
        written.append(save_safetensors(stem.with_suffix(".safetensors"), state, metadata))
    return written


FORMATS = {"diffusers": (export_diffusers, "-diffusers"), "single_file": (export_single_file, "-sd.safetensors"),
           "lora": (export_lora, "-lora.safetensors")}


def export_interop(path: str | Path, out_dir: str | Path, fmt: str, *, weights: str = "ema") -> Path:
    """`<out_dir>/step-XXXXXXXX-diffusers/` (a diffusers folder), `step-XXXXXXXX-sd.safetensors` (original SD
    layout) or `step-XXXXXXXX-lora.safetensors` (a LoRA run's adapters in diffusers' names) from a checkpoint: the EMA
    weights by default, weights="raw" the trained ones."""
    if weights not in ("ema", "raw"):
        raise ConfigError(f"task.weights={weights!r}: ema | raw for task.format={fmt}")
    ckpt = read_checkpoint(path)
    module = build_module(ckpt, str(path))
    if weights == "ema":
        fold_ema(module)
    write, suffix = FORMATS[fmt]
    config = OmegaConf.to_container(checkpoint_config(ckpt, str(path)), resolve=True)
    out = Path(out_dir) / f"step-{int(ckpt.get('global_step', 0)):08d}{suffix}"
    return write(module, config, ckpt.get(FIRST_STAGE_CONFIG_KEY), out)


def run(cfg: DictConfig) -> list[Path]:
    allow_targets(cfg.security.allow)  # the user's own additions to the allow-list of targets
    t = cfg.task
    written = []
    fmt = t.get("format", "ldm")
    if fmt not in ("ldm", *FORMATS):
        raise ConfigError(f"task.format={fmt!r}: ldm | diffusers | single_file | lora")
    for path in resolve_checkpoint(cfg.paths.run_dir, str(t.ckpt)):
        if fmt != "ldm":
            written.append(export_interop(path, t.out_dir, fmt, weights="raw" if t.weights == "all" else t.weights))
            continue
        written += export_checkpoint(path, t.out_dir, weights=t.weights, safetensors=t.safetensors)
    for path in written:
        print(f"wrote {path}")
    return written
