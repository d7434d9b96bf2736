"""A small evaluation every N training steps: the experiment's suite scores EMA samples for fixed conditions."""
import csv
from dataclasses import replace
from pathlib import Path

import lightning as L

from ldm.models.generate import render
from ldm.models.sampling import Sampling, conditions


class PeriodicEval(L.Callback):
    """Samples the suite's first `num_samples` conditions (seeds seed_offset + i, the same at every step) with the
    shared `sampling` settings, `steps` overriding its steps to keep it cheap, scores them and logs
    `eval/<metric>` to the loggers and to `<out_dir>/during_training.csv`.

    Every rank samples (under FSDP each rank holds a shard, so sampling is collective); rank 0 scores and logs.
    `task=evaluate` is the full-size evaluation of saved checkpoints.
    """

    def __init__(self, suite, out_dir: str, sampling: Sampling, every_n_steps: int = 500, num_samples: int = 64,
                 steps: int | None = None):
        if every_n_steps <= 0 or num_samples <= 0:
            raise ValueError(f"every_n_steps and num_samples must be positive, got {every_n_steps}, {num_samples}")
        self.suite, self.out_dir, self.every_n_steps = suite, Path(out_dir), every_n_steps
        self.sampling = replace(sampling, steps=steps) if steps is not None else sampling
        self.jobs = self.sampling.numbered_jobs(conditions(*suite.conditions())[:num_samples])
        self._scored_step = -1

    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        """Score the current (EMA) weights; returns the metrics, logged under `eval/`."""
        self._scored_step = step = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        images = render(pl_module, self.jobs, self.sampling)
        pl_module.train(was_training)
        if not trainer.is_global_zero:
            return {}
        metrics = self.suite.score(images)
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        self._append_row(dict(step=step, num_samples=len(self.jobs), **metrics))
        pl_module.print(f"eval at step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        return metrics

    def _append_row(self, row: dict) -> None:
        path = self.out_dir / "during_training.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def on_train_start(self, trainer, pl_module):
        self._scored_step = trainer.global_step  # a resumed run was scored at this step before it stopped

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self._scored_step != trainer.global_step:
            self.evaluate(trainer, pl_module)
