"""A clean stop on SIGTERM (and SIGUSR1/2 outside SLURM): finish the optimizer step, checkpoint, stop, and let the
task exit with status 128 + signal, so that a scheduler or shell sees an interrupted run, not a finished one.
Re-running the same command resumes from the checkpoint written here."""
import signal

import lightning as L

from ldm.callbacks.signal_flag import SignalFlag

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopOnSignal(SignalFlag):
    """All ranks stop at the first optimizer-step boundary after any rank got one of `signals`; `FinalCheckpoint`
    then writes `step-XXXXXXXX.ckpt` and `last.ckpt` in `on_train_end`. `stopped_by` is the signal, or None."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        super().__init__(signals)
        self.stopped_by: int | None = None

    def on_signal_agreed(self, trainer: L.Trainer) -> None:
        self.stopped_by = self.received or signal.SIGTERM  # a rank that got nothing itself stops with the others
        trainer.should_stop = True
