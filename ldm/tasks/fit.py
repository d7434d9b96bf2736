"""task=fit: train the configured model; re-running the same command resumes from `last.ckpt`.

Every launch path runs this same function in each rank: one process with Lightning's launcher (it starts the
other ranks), torchrun, srun (sbatch or submitit). All ranks address the same run directory; rank 0 alone writes.
"""
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from ldm.callbacks.configured_hyperparameters import ConfiguredHyperparameters
from ldm.callbacks.checkpoints import checkpoint_callbacks
from ldm.callbacks.finite_loss import FiniteLoss
from ldm.callbacks.init_source import InitSource
from ldm.callbacks.run_metrics import RunMetrics
from ldm.callbacks.slurm_requeue import SlurmRequeue, slurm_job_id
from ldm.callbacks.startup_summary import StartupSummary
from ldm.callbacks.step_progress import StepProgress
from ldm.callbacks.stop_on_signal import StopOnSignal
from ldm.callbacks.store_config import StoreConfig
from ldm.callbacks.throughput import Throughput
from ldm.data.latents import LatentDataModule
from ldm.models.first_stage import first_stage_hash
from ldm.interop.build import IMPORTED_MARKER
from ldm.interop.init_from import init_from_checkpoint, init_record
from ldm.models.trainable import apply_trainable
from ldm.utils.checkpoint import read_checkpoint
from ldm.utils.checkpoint_io import AtomicCheckpointIO
from ldm.utils.dist_env import dist_env
from ldm.utils.errors import ConfigError, missing_file
from ldm.utils.known_noise import silence_known_noise
from ldm.utils.rundir import (
    LAST, checkpoint_dir, persistent_run_id, remove_temp_files, resume_checkpoint, save_run_config,
)
from ldm.utils.resume_config import check_resume_config, record_changes
from ldm.utils.run_lock import RunLock
from ldm.utils.precision import resolve_precision
from ldm.utils.safe_config import allow_targets, safe_instantiate


def build_trainer(cfg: DictConfig, extra_callbacks: list[L.Callback] = ()) -> L.Trainer:
    """Trainer from `cfg.trainer` with the run's logger, callbacks, atomic checkpoints and stored config;
    `trainer.precision=auto` measured here (the config keeps "auto", so a resume elsewhere measures again)."""
    run_dir = cfg.paths.run_dir
    checkpoints = checkpoint_callbacks(
        checkpoint_dir(run_dir), cfg.checkpoint_every_n_steps, cfg.checkpoint_every_minutes, cfg.checkpoint_keep_last,
        cfg.checkpoint_monitor, cfg.checkpoint_monitor_mode,
    )
    callbacks = [*checkpoints, StoreConfig(OmegaConf.to_container(cfg, resolve=True)), ConfiguredHyperparameters(),
                 StartupSummary(),
                 *extra_callbacks]
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # tasks started by srun (sbatch, submitit): SlurmRequeue replaces Lightning's
        plugins.append(SLURMEnvironment(auto_requeue=False))
        callbacks += [SlurmRequeue(checkpoint_dir(run_dir) / LAST, slurm_job_id()), StopOnSignal((signal.SIGTERM,))]
    else:
        callbacks.append(StopOnSignal())
    callbacks.append(FiniteLoss(cfg.get("finite_check_every_n_steps", 1)))
    # before RunMetrics, which records what Throughput logs at the same step
    callbacks.append(Throughput(cfg.trainer.log_every_n_steps, cfg.get("flops_per_batch")))
    callbacks.append(RunMetrics(run_dir, every_n_steps=cfg.trainer.log_every_n_steps))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgress(every_n_steps=cfg.trainer.log_every_n_steps))
    callbacks += [safe_instantiate(c, stored=False, where=f"callbacks.{name}")
                  for name, c in (cfg.get("callbacks") or {}).items() if c is not None]
    env = dist_env()
    precision, why = resolve_precision(cfg.trainer.get("precision", "32-true"), str(cfg.trainer.accelerator),
                                       env.world_size)
    if why != "as configured" and env.rank == 0:
        print(f"[fit] precision     {precision} (trainer.precision=auto: {why})")
    loggers = [safe_instantiate(lg, stored=False, where=f"logger.{name}")
               for name, lg in (cfg.get("logger") or {}).items() if lg is not None]
    return safe_instantiate(
        cfg.trainer, stored=False, where="trainer", callbacks=callbacks, logger=loggers or False, plugins=plugins,
        default_root_dir=run_dir, precision=precision,
        _convert_="all",  # plain lists: Lightning 2.4 takes a ListConfig for one plugin
    )


def check_latent_cache(model: L.LightningModule, datamodule: L.LightningDataModule) -> None:
    """A latent cache must be encoded by the first stage the model decodes with: compare their weight hashes
    (the manifest's against the model's loaded first stage, so its checkpoint is read once)."""
    first_stage = getattr(model, "first_stage", None)
    if first_stage is not None and isinstance(datamodule, LatentDataModule):
        datamodule.check_first_stage(first_stage_hash(first_stage))


def prepare_finetune(cfg: DictConfig, model: L.LightningModule, resuming: bool) -> dict[str, str] | None:
    """`init_from` (a new run only: a resume continues from its own checkpoint) and `trainable` (every start, so a
    resume freezes the same); returns the record of the init source, None if there is none."""
    record, say = None, dist_env().rank == 0
    if cfg.get("init_from") and not resuming:
        path = str(cfg.init_from)
        if not Path(path).exists():
            raise missing_file(path, "init_from", "checkpoint to start from")
        used = init_from_checkpoint(model, read_checkpoint(path), cfg.get("init_from_weights", "ema"), path)
        norm = getattr(model, "latent_norm", None)
        if norm is not None:  # the source's network learned its latents' scale: the new cache's stats do not apply
            model.keep_latent_norm = True
        if say:  # rank 0 writes the checkpoints: it alone hashes the source
            record = init_record(path, used)
            print(f"[fit] init_from     {path} ({used} weights, sha256 {record['sha256'][:12]}): step 0, fresh "
                  f"optimizer", flush=True)
            if norm is not None:
                print(f"[fit] latent norm   the source's (scale {norm.scale.flatten().tolist()}, shift "
                      f"{norm.shift.flatten().tolist()}), not the data's", flush=True)
    if cfg.get("trainable") is not None:
        trained, total = apply_trainable(model, cfg.trainable)
        if say:
            print(f"[fit] trainable     {trained:,} of {total:,} parameters ({', '.join(cfg.trainable)})", flush=True)
    return record


def run(cfg: DictConfig) -> L.Trainer:
    allow_targets(cfg.security.allow)  # the user's own additions to the allow-list of targets
    silence_known_noise()
    cfg.run_id = persistent_run_id(cfg.paths.run_dir)
    # one process group per run directory: rank 0 holds the lock for the job (the other ranks are its own)
    if dist_env().rank != 0:
        return _fit(cfg)
    with RunLock(cfg.paths.run_dir, cfg.lock_stale_s):
        if left := remove_temp_files(cfg.paths.run_dir):
            print(f"[fit] removed {len(left)} temp file(s) of an interrupted write: {', '.join(p.name for p in left)}")
        return _fit(cfg)


def _fit(cfg: DictConfig) -> L.Trainer:
    if (Path(cfg.paths.run_dir) / IMPORTED_MARKER).is_file():
        raise ConfigError(
            f"{cfg.paths.run_dir} holds imported weights (task=import), not a training run to resume: fine-tune them "
            f"in a new run, e.g. name={cfg.name}_ft first_stage_name={cfg.first_stage_name} "
            f"init_from={Path(cfg.paths.run_dir) / 'checkpoints' / LAST}"
        )
    ckpt_path = resume_checkpoint(cfg.paths.run_dir, cfg.resume)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    changes = check_resume_config(cfg.paths.run_dir, resolved, ckpt_path, cfg.resume_force) if ckpt_path else {}
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls/convs on Ampere+ in TF32: ~same loss, much faster
    torch.backends.cudnn.allow_tf32 = True
    L.seed_everything(cfg.seed, workers=True)
    datamodule = safe_instantiate(cfg.data, stored=False, where="data")
    model = safe_instantiate(cfg.model, stored=False, where="model")
    init = prepare_finetune(cfg, model, resuming=ckpt_path is not None)  # before the cache check: its first stage
    check_latent_cache(model, datamodule)
    trainer = build_trainer(cfg, [InitSource(init)])
    if trainer.is_global_zero:  # once the Trainer exists its rank is right under every launcher
        record_changes(cfg.paths.run_dir, changes, ckpt_path)
        save_run_config(cfg, cfg.paths.run_dir)
        for logger in trainer.loggers:  # the whole resolved config, as every logger shows hyperparameters
            logger.log_hyperparams(resolved)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)  # a resume runs no code
    [stop] = [c for c in trainer.callbacks if isinstance(c, StopOnSignal)]
    if stop.stopped_by is not None:
        name = signal.Signals(stop.stopped_by).name
        print(f"[fit] stopped by {name} at step {trainer.global_step}, checkpoint saved: re-run the same command to "
              f"resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + stop.stopped_by)
    return trainer
