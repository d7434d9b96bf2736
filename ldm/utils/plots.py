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


def plot_curves(curves: dict[str, list[tuple[float, float]]], path: str | Path, *, xlabel: str, ylabel: str,
                title: str = "", point_labels: list[str] | None = None) -> None:
    """One line per named curve of (x, y) points on one panel, written atomically as a PNG; `point_labels` annotate
    the points of a single curve (e.g. the guidance scale of each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for name, points in curves.items():
        ax.plot(*zip(*points), marker="o", label=name)
    if point_labels is not None:
        [points] = curves.values()
        for (x, y), text in zip(points, point_labels):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(curves) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
