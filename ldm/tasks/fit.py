"""task=fit: train the configured model; re-running the same command resumes from `last.ckpt`.

Every launch path runs this same function in each rank: one process with Lightning's launcher (it starts the
other ranks), torchrun, srun (sbatch or submitit). All ranks address the same run directory; rank 0 alone writes.
"""
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from ldm.callbacks.final_checkpoint import FinalCheckpoint
from ldm.callbacks.slurm_requeue import SlurmRequeue, slurm_job_id
from ldm.callbacks.startup_summary import StartupSummary
from ldm.callbacks.store_config import StoreConfig
from ldm.utils.checkpoint_io import AtomicCheckpointIO
from ldm.utils.rundir import LAST, checkpoint_dir, resume_checkpoint, save_run_config


def build_trainer(cfg: DictConfig, extra_callbacks: list[L.Callback] = ()) -> L.Trainer:
    """Trainer from `cfg.trainer` with the run's logger, callbacks, atomic checkpoints and stored config."""
    run_dir = cfg.paths.run_dir
    checkpoints = ModelCheckpoint(
        dirpath=checkpoint_dir(run_dir),
        filename="step-{step:08d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint_every_n_steps,
        save_top_k=-1,
        save_last=True,
        enable_version_counter=False,  # last.ckpt is overwritten (atomically), never last-v1.ckpt
    )
    if cfg.checkpoint_monitor:
        best = ModelCheckpoint(
            dirpath=checkpoint_dir(run_dir), filename="best", monitor=cfg.checkpoint_monitor,
            mode=cfg.checkpoint_monitor_mode, save_top_k=1, auto_insert_metric_name=False,
            enable_version_counter=False,
        )
        checkpoints = [checkpoints, best]
    else:
        checkpoints = [checkpoints]
    checkpoints.append(FinalCheckpoint(checkpoint_dir(run_dir), checkpoints[0]))
    callbacks = [*checkpoints, StoreConfig(OmegaConf.to_container(cfg, resolve=True)), StartupSummary(),
                 *extra_callbacks]
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # tasks started by srun (sbatch, submitit): SlurmRequeue replaces Lightning's
        plugins.append(SLURMEnvironment(auto_requeue=False))
        callbacks.append(SlurmRequeue(checkpoint_dir(run_dir) / LAST, slurm_job_id()))
    callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None]
    return instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins, default_root_dir=run_dir,
    )


def run(cfg: DictConfig) -> L.Trainer:
    ckpt_path = resume_checkpoint(cfg.paths.run_dir, cfg.resume)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls/convs on Ampere+ in TF32: ~same loss, much faster
    torch.backends.cudnn.allow_tf32 = True
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    trainer = build_trainer(cfg)
    if trainer.is_global_zero:  # once the Trainer exists its rank is right under every launcher
        save_run_config(cfg, cfg.paths.run_dir)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer
