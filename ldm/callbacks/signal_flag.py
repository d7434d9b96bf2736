"""Signals acted on between optimizer steps, never inside one.

A handler that saved or exited at once could fire mid-backward or mid-collective: it would store a half-updated
state, or leave the other ranks waiting forever in an all-reduce that this rank never joins. Here the handler only
sets a flag; after each optimizer step the ranks agree on it (one signalled rank is enough) and act together.
"""
import signal

import lightning as L


class SignalFlag(L.Callback):
    """Base: installs handlers for `signals` while fitting; `agreed(trainer)` is True on every rank at the first
    optimizer-step boundary after any rank received one; subclasses act in `on_signal_agreed`."""

    def __init__(self, signals: tuple[int, ...]):
        self.signals = tuple(signals)
        self.received: int | None = None  # the last signal this rank received and has not acted on
        self._previous_handlers: dict[int, object] = {}
        self._step_at_batch_start = 0

    def _on_signal(self, signum: int, frame) -> None:
        self.received = signum  # nothing else: this runs between any two bytecodes of the training step

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Before DataLoader workers fork, so they inherit this harmless handler instead of the default (exit):
        # SLURM and `kill -- -PGID` signal every process of the job.
        if stage == "fit":
            self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in self.signals}

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning installs its own SIGTERM handler after `setup`; it broadcasts from inside the handler (a
        # collective that only the signalled rank joins: the other ranks can hang) and exits with status 0 without
        # a checkpoint. Ours replaces it for the training loop; a SIGTERM that came in between is ours to handle.
        for signum in self.signals:
            signal.signal(signum, self._on_signal)
        if self.received is not None:
            trainer._signal_connector.received_sigterm = False

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # still accumulating gradients: every rank reaches the optimizer step together
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            self.on_signal_agreed(trainer)

    def on_signal_agreed(self, trainer: L.Trainer) -> None:
        raise NotImplementedError
