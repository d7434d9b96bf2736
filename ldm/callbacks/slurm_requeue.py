"""SLURM requeue on the warning signal: checkpoint at the next optimizer step, then `scontrol requeue` the job.

SLURM sends the signal shortly before the time limit (`sbatch --signal=USR1@90`; submitit uses USR2). The
requeue stops the job and queues it again with the same command, which resumes from the checkpoint written here.
Until SLURM stops it (or the time limit, if the requeue failed) training goes on: later checkpoints are only newer.

Lightning's own auto-requeue (`SLURMEnvironment(auto_requeue=True)`) saves inside the signal handler, that is at
any point of a step (mid backward, mid collective), which can hang or store a half-updated state
(Lightning-AI/pytorch-lightning#21406). Here the ranks act together at a step boundary (signal_flag.py).
"""
import logging
import os
import signal
import subprocess
from pathlib import Path

import lightning as L

from ldm.callbacks.signal_flag import SignalFlag

log = logging.getLogger(__name__)

# scripts/slurm/train.sbatch sends USR1; submitit (hydra/launcher=slurm_*) sends USR2
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: ARRAY_TASK for array jobs (submitit submits arrays), else SLURM_JOB_ID."""
    if "SLURM_ARRAY_JOB_ID" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class SlurmRequeue(SignalFlag):
    """On a requeue signal: all ranks save `checkpoint_path` after the next optimizer step; rank 0 requeues `job_id`."""

    def __init__(self, checkpoint_path: str | Path, job_id: str | None, signals: tuple[int, ...] = REQUEUE_SIGNALS):
        super().__init__(signals)
        self.checkpoint_path, self.job_id = Path(checkpoint_path), job_id

    def on_signal_agreed(self, trainer: L.Trainer) -> None:
        self.received = None
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
