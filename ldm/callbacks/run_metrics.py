"""A run's curves in its own directory, whatever the loggers: `<run_dir>/metrics.csv` (step, train loss, learning
rate, validation metrics) and `<run_dir>/curves.png`, plus the eval-during-training metrics when there are any.
A run can be judged from its directory alone, without a logger account."""
import csv
import io
from pathlib import Path

import lightning as L

from ldm.utils.atomic import atomic_write_text
from ldm.utils.plots import plot_metrics


def read_rows(path: Path) -> list[dict]:
    """Rows of a metrics CSV with numbers as floats (steps as ints); empty cells dropped."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: int(v) if k == "step" else float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)]


def write_rows(path: Path, rows: list[dict]) -> None:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, table.getvalue())


class RunMetrics(L.Callback):
    """Every `every_n_steps` (and after each validation) records the logged scalars and the lr; rewrites the CSV
    and the PNG at validation and at the end. A resumed run drops rows past its checkpoint's step first."""

    def __init__(self, run_dir: str, every_n_steps: int = 50):
        self.run_dir, self.every_n_steps = Path(run_dir), every_n_steps
        self.rows: list[dict] = []

    @property
    def csv_path(self) -> Path:
        return self.run_dir / "metrics.csv"

    def on_train_start(self, trainer, pl_module) -> None:
        self.rows = [r for r in read_rows(self.csv_path) if r["step"] <= trainer.global_step]

    def _record(self, trainer, prefix: str) -> None:
        row = {"step": trainer.global_step}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix) and v.numel() == 1})
        if trainer.optimizers:
            row["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        self.rows.append(row)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero and trainer.global_step % self.every_n_steps == 0:
            self._record(trainer, "train/")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self._record(trainer, "val/")
            self.write()

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.write()

    def write(self) -> None:
        if not self.rows:
            return
        write_rows(self.csv_path, self.rows)
        during = read_rows(self.run_dir / "eval" / "during_training.csv")  # PeriodicEval's, when it runs
        plot_metrics(self.rows + [{f"eval/{k}" if k != "step" else k: v for k, v in r.items() if k != "num_samples"}
                                  for r in during], self.run_dir / "curves.png")
