"""task=import: Stable Diffusion / diffusers weights become a run directory with checkpoints/last.ckpt (step 0)."""
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ldm.interop.build import IMPORTED_KEY, IMPORTED_MARKER, import_checkpoint
from ldm.interop.read_source import read_source
from ldm.utils.atomic import atomic_torch_save, atomic_write_json
from ldm.utils.errors import ConfigError
from ldm.utils.rundir import LAST, checkpoint_dir, save_run_config
from ldm.utils.run_lock import RunLock
from ldm.utils.safe_config import allow_targets

def run(cfg: DictConfig) -> Path:
    allow_targets(cfg.security.allow)  # the user's own additions to the allow-list of targets
    t, run_dir = cfg.task, Path(cfg.paths.run_dir)
    ckdir = checkpoint_dir(run_dir)
    with RunLock(run_dir, cfg.lock_stale_s):
        if ckdir.is_dir() and any(ckdir.iterdir()):
            raise ConfigError(f"{ckdir} already holds checkpoints: import into a new run directory (`name=`); "
                              f"nothing is overwritten")
        model = cfg.model
        imported = read_source(t.src, variant=t.variant, weights=t.weights, prediction=t.prediction,
                               formulation=OmegaConf.to_container(model.formulation, resolve=True)
                               if "formulation" in model else None,
                               text_encoder={**OmegaConf.to_container(model.conditioner, resolve=True),
                                             "pretrained": None} if "conditioner" in model else None)
        ckpt = import_checkpoint(imported, cfg, str(t.src))
        atomic_torch_save(ckpt, ckdir / LAST)
        atomic_write_json(run_dir / IMPORTED_MARKER, ckpt[IMPORTED_KEY])
        save_run_config(OmegaConf.create(ckpt["ldm_config"]), run_dir)
    print(f"imported {t.src} as a {imported.kind.replace('_', ' ')} -> {ckdir / LAST}")
    for note in imported.notes:
        print(f"  {note}")
    if imported.sampling:
        print(f"  the source's scheduler samples with: {', '.join(f'sampling.{k}={v}' for k, v in imported.sampling.items())}")
    return ckdir / LAST
