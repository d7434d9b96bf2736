"""Metric curves against training step, one panel per metric, written atomically as a PNG."""
from pathlib import Path

from ldm.utils.atomic import atomic_write


def plot_metrics(rows: list[dict], path: str | Path, columns: int = 4) -> None:
    """One panel per numeric key of `rows` (dicts with a `step`), each against step; a metric missing from a row
    (logged less often) is skipped there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(k for r in rows for k, v in r.items() if k != "step" and isinstance(v, float)))
    if not metrics:
        return
    cols = min(columns, len(metrics))
    rows_of_panels = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows_of_panels, cols, figsize=(3.2 * cols, 2.8 * rows_of_panels), squeeze=False)
    for ax, name in zip(axes.flat, metrics):
        points = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), float)]
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
