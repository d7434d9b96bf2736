"""SLURM requeue on the warning signal: checkpoint at the next optimizer step, then `scontrol requeue` the job.

SLURM sends the signal shortly before the time limit (`sbatch --signal=USR1@90`; submitit uses USR2). The
requeue stops the job and queues it again with the same command, which resumes from the checkpoint written here.
Until SLURM stops it (or the time limit, if the requeue failed) training goes on: later checkpoints are only newer.

Lightning's own auto-requeue (`SLURMEnvironment(auto_requeue=True)`) saves inside the signal handler, that is at
any point of a step (mid backward, mid collective), which can hang or store a half-updated state
(Lightning-AI/pytorch-lightning#21406). Here the handler only sets a flag; after each optimizer step the ranks
agree on it (one signalled rank is enough) and checkpoint together where periodic checkpoints are taken.
"""
import logging
import os
import signal
import subprocess
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)

# scripts/slurm/train.sbatch sends USR1; submitit (hydra/launcher=slurm_*) sends USR2
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: ARRAY_TASK for array jobs (submitit submits arrays), else SLURM_JOB_ID."""
    if "SLURM_ARRAY_JOB_ID" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class SlurmRequeue(L.Callback):
    """On a requeue signal: all ranks save `checkpoint_path` after the next optimizer step; rank 0 requeues `job_id`."""

    def __init__(self, checkpoint_path: str | Path, job_id: str | None, signals: tuple[int, ...] = REQUEUE_SIGNALS):
        self.checkpoint_path, self.job_id, self.signals = Path(checkpoint_path), job_id, tuple(signals)
        self.signalled = False
        self._previous_handlers: dict[int, object] = {}
        self._step_at_batch_start = 0

    def _on_signal(self, signum: int, frame) -> None:
        self.signalled = True  # nothing else: this runs between any two bytecodes of the training step

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Before DataLoader workers fork, so they inherit this harmless handler instead of the default (exit):
        # SLURM signals every process of the job step.
        if stage == "fit":
            self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in self.signals}

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # still accumulating gradients: every rank reaches the optimizer step together
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        self.signalled = False
        trainer.save_checkpoint(self.checkpoint_path)  # every rank joins; the strategy writes (rank 0, atomically)
        if trainer.is_global_zero:
            log.info(f"requeue signal: saved {self.checkpoint_path} at step {trainer.global_step}")
            self.requeue()

    def requeue(self) -> None:
        """`scontrol requeue JOB`; a failure is reported, not raised: the checkpoint is safe and training goes on."""
        if self.job_id is None:
            log.warning("requeue signal without SLURM_JOB_ID: not requeued; run the same command again to resume")
            return
        try:
            result = subprocess.run(["scontrol", "requeue", self.job_id], capture_output=True, text=True, timeout=60)
            error = (result.stderr.strip() or f"exit code {result.returncode}") if result.returncode else None
        except (OSError, subprocess.TimeoutExpired) as exc:  # no scontrol here (e.g. inside a container), or hung
            error = str(exc)
        if error is None:
            log.info(f"requeued SLURM job {self.job_id}: it restarts from {self.checkpoint_path}")
        else:
            log.warning(f"could not requeue SLURM job {self.job_id} ({error}); submit the same command again to "
                        f"resume from {self.checkpoint_path}")
