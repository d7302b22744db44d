"""The PNG of a checkpoint sweep: a task's headline metric against step and training tokens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_sweep(points: Sequence[dict[str, Any]], *, task: str, metric: str, path: Path,
               title: str | None = None, chance: float | None = None) -> Path:
    """Write a two-panel figure (``metric`` vs optimizer step, and vs tokens seen) to ``path``.

    Args:
        points: ``{"step": int, "tokens": int, "metrics": {metric: float}}`` in step order
            (the rows of ``checkpoint_results.json``); points without the metric are skipped.
        task: task name (axis label and title).
        metric: the key of ``metrics`` to plot (the task's headline).
        chance: draw a dashed line at this value (e.g. 0.25 for HellaSwag).

    Returns:
        ``path`` (parent folders are created). Uses matplotlib's Agg backend (no display).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [p for p in points if p.get("metrics", {}).get(metric) is not None]
    steps = [p["step"] for p in rows]
    tokens = [p.get("tokens") or 0 for p in rows]
    values = [p["metrics"][metric] for p in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for ax, xs, label in ((axes[0], steps, "optimizer step"), (axes[1], tokens, "training tokens")):
        ax.plot(xs, values, marker="o", linewidth=1.5, markersize=4)
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:g})")
            ax.legend(frameon=False)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{task} {metric}")
        ax.grid(alpha=0.3)
    axes[1].ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    fig.suptitle(title or f"{task}: {metric} over checkpoints")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
