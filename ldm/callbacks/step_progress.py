"""Training progress in steps (a step-based run has no meaningful epoch count): step of max_steps, steps/s,
images/s, ETA and the loss. On a terminal a bar redrawn in place; otherwise (SLURM logs, files) one line every
`every_n_steps`, so logs stay readable."""
import sys
import time

from lightning.pytorch.callbacks import ProgressBar
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def progress_line(step: int, max_steps: int, steps_per_s: float, images_per_s: float, loss: float | None) -> str:
    """`step 120/750  1.93 steps/s  123.5 images/s  ETA 5:26  loss 0.1234`."""
    eta_s = (max_steps - step) / steps_per_s if steps_per_s > 0 else float("inf")
    eta = f"{int(eta_s // 60)}:{int(eta_s % 60):02d}" if eta_s < float("inf") else "?"
    loss_text = f"  loss {loss:.4f}" if loss is not None else ""
    return f"step {step}/{max_steps}  {steps_per_s:.2f} steps/s  {images_per_s:.1f} images/s  ETA {eta}{loss_text}"


class StepProgress(ProgressBar):
    def __init__(self, every_n_steps: int = 50, terminal: bool | None = None):
        super().__init__()
        self.every_n_steps = every_n_steps
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self._enabled = True
        self._bar: Progress | None = None
        self._start = (0.0, 0)  # (time, step) at the start of this process's training

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def print(self, *args, **kwargs) -> None:
        """LightningModule.print goes here while training: above the bar on a terminal, a plain line elsewhere."""
        if self._bar is not None:
            self._bar.console.print(*args, **kwargs)
        else:
            print(*args, **kwargs, flush=True)

    def enable(self) -> None:
        self._enabled = True

    def _images_per_step(self, trainer) -> int:
        per_device = getattr(trainer.datamodule, "batch_size", 0) or 0
        return per_device * trainer.world_size * trainer.accumulate_grad_batches

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = (time.perf_counter(), trainer.global_step)
        if self._enabled and self.terminal and trainer.is_global_zero:
            self._bar = Progress(TextColumn("[fit]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                                 TimeRemainingColumn())
            self._bar.start()
            self._task = self._bar.add_task("fit", total=trainer.max_steps, completed=trainer.global_step, rate="")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        step = trainer.global_step
        seconds, first = time.perf_counter() - self._start[0], self._start[1]
        steps_per_s = (step - first) / seconds if seconds > 0 else 0.0
        images_per_s = steps_per_s * self._images_per_step(trainer)
        loss = trainer.callback_metrics.get("train/loss")
        loss = float(loss) if loss is not None else None
        if self._bar is not None:
            self._bar.update(self._task, completed=step, rate=f"{steps_per_s:.2f} steps/s {images_per_s:.0f} img/s")
        elif step % self.every_n_steps == 0 or step == trainer.max_steps:
            print(progress_line(step, trainer.max_steps, steps_per_s, images_per_s, loss), flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
