"""The PNGs of ``lmkit svd-analyze`` (matplotlib, Agg backend: no display needed).

:func:`plot_report` writes, into one folder:

* ``spectra.png`` -- singular values (log scale) against their index, one panel per layer, one
  line per checkpoint coloured from early (dark) to late (yellow);
* ``ranks.png`` -- effective rank (solid) and stable rank (dashed) over checkpoint steps, one
  panel per layer;
* ``changes.png`` -- over checkpoint steps, one line per layer: power-law ``alpha``, the largest
  principal angle of the top-k left subspace vs the previous checkpoint, and the share of
  ``ΔW`` in the previous top-k subspace;
* with ``svd.jsonl``: ``svd_timeline.png`` -- per adaptive-SVD layer, ``r`` over steps with the
  low-rank stretches shaded and a marker at every switch (▼ to low-rank, ▲ to full, annotated
  with the reason), and ``svd_alignments.png`` -- principal / minor alignment, subspace angle
  and reconstruction error over steps with the decision thresholds dashed.

More than :data:`PER_PAGE` layers split a grid figure into ``name_1.png``, ``name_2.png``, ….
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmkit.analysis.svd_analyze import SVDReport

#: Panels per grid figure.
PER_PAGE = 24
NCOLS = 4
DPI = 110


def plot_report(report: SVDReport, out: Path) -> list[Path]:
    """Draw every figure of the module docstring into ``out``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if report.layers:
        paths += _grid(out, "spectra", list(report.layers), lambda ax, name: _spectrum(ax, report, name))
        paths += _grid(out, "ranks", list(report.layers), lambda ax, name: _ranks(ax, report, name))
        paths.append(_changes(out / "changes.png", report))
    log = report.svd_log
    if log and log.get("layers"):
        names = list(log["layers"])
        paths += _grid(out, "svd_timeline", names, lambda ax, name: _timeline(ax, log, name), ncols=1,
                       size=(11.0, 2.6))
        paths += _grid(out, "svd_alignments", names, lambda ax, name: _alignments(ax, log, name), ncols=2,
                       size=(6.5, 3.4))
    return paths


def _grid(out: Path, stem: str, names: list[str], draw, *, ncols: int = NCOLS,
          size: tuple[float, float] = (4.4, 3.2)) -> list[Path]:
    import matplotlib.pyplot as plt

    pages = [names[i:i + PER_PAGE] for i in range(0, len(names), PER_PAGE)]
    paths = []
    for number, page in enumerate(pages, start=1):
        cols = min(ncols, len(page))
        rows = math.ceil(len(page) / cols)
        width, height = size[0] * cols, size[1] * rows
        # fixed margins in inches (tight_layout would cost ~1 s a figure): labels left, titles on top
        fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False,
                                 gridspec_kw={"left": 0.75 / width, "right": 1 - 0.15 / width,
                                              "bottom": 0.5 / height, "top": 1 - 0.35 / height,
                                              "wspace": 0.95 / (size[0] - 0.95), "hspace": 0.85 / (size[1] - 0.85)})
        for ax, name in zip(axes.flat, page, strict=False):
            draw(ax, name)
        for ax in list(axes.flat)[len(page):]:
            ax.set_visible(False)
        path = out / (f"{stem}.png" if len(pages) == 1 else f"{stem}_{number}.png")
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        paths.append(path)
    return paths


def _title(ax, name: str, layer: dict[str, Any] | None = None) -> None:
    shape = f" {layer['shape'][0]}×{layer['shape'][1]}" if layer else ""
    ax.set_title(f"{name}{shape}", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)


def _spectrum(ax, report: SVDReport, name: str) -> None:
    import matplotlib.pyplot as plt

    layer = report.layers[name]
    records = layer["checkpoints"]
    cmap = plt.get_cmap("viridis")
    for i, rec in enumerate(records):
        s = [v for v in rec.get("singular_values", []) if v > 0]
        if s:
            color = cmap(i / max(1, len(records) - 1))
            ax.plot(range(1, len(s) + 1), s, color=color, linewidth=1.0, label=f"step {rec['step']}")
    ax.set_yscale("log")
    ax.set_xlabel("index", fontsize=8)
    ax.set_ylabel("singular value", fontsize=8)
    if len(records) <= 8:
        ax.legend(fontsize=6)
    _title(ax, name, layer)


def _ranks(ax, report: SVDReport, name: str) -> None:
    layer = report.layers[name]
    records = [rec for rec in layer["checkpoints"] if "effective_rank" in rec]
    steps = [rec["step"] for rec in records]
    ax.plot(steps, [rec["effective_rank"] for rec in records], marker="o", markersize=3, label="effective rank")
    ax.plot(steps, [rec["stable_rank"] for rec in records], marker="s", markersize=3, linestyle="--",
            label="stable rank")
    ax.set_yscale("log")
    ax.set_xlabel("step", fontsize=8)
    ax.legend(fontsize=6)
    _title(ax, name, layer)


def _changes(path: Path, report: SVDReport) -> Path:
    import matplotlib.pyplot as plt

    panels = (("alpha", "power-law α of λ = s²"), ("subspace_angle", "largest principal angle vs previous (rad)"),
              ("delta_in_topk", "‖P_prev ΔW‖ / ‖ΔW‖ (top-k)"))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        drawn = False
        for name, layer in report.layers.items():
            points = [(rec["step"], rec[key]) for rec in layer["checkpoints"] if rec.get(key) is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, linewidth=1,
                        label=name)
                drawn = True
        if not drawn:
            why = "needs two checkpoints"
            if key == "alpha":
                why = "no power-law fit succeeded" if report.heavy_tail else "not computed (--no-heavy-tail)"
            ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0][1].get_legend_handles_labels()
    fig.subplots_adjust(left=0.04, right=0.84 if handles else 0.98, bottom=0.12, top=0.92, wspace=0.22)
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.85, 0.5), fontsize=6,
                   ncol=1 + len(labels) // 30)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _timeline(ax, log: dict[str, Any], name: str) -> None:
    entry = log["layers"][name]
    steps = entry["step"]
    r_after = [v if isinstance(v, (int, float)) else math.nan for v in entry["r_after"]]
    ax.step(steps, r_after, where="post", color="tab:blue", label="r (after the analysis)")
    ax.set_ylabel("r (minor components)", fontsize=8)
    ax.set_xlabel("step", fontsize=8)
    pad = max(1.0, (steps[-1] - steps[0]) * 0.02) if steps else 1.0
    if steps:
        ax.set_xlim(steps[0] - pad, steps[-1] + pad)
    # shade the stretches spent in low-rank mode: from a record whose mode_after is lowrank to the next record
    for i, (step, mode) in enumerate(zip(steps, entry["mode_after"], strict=True)):
        if mode == "lowrank":
            end = steps[i + 1] if i + 1 < len(steps) else step + pad
            ax.axvspan(step, end, color="tab:orange", alpha=0.18, linewidth=0)
    for switch in (s for s in log.get("switches", []) if s["layer"] == name):
        down = switch["to_mode"] == "lowrank"
        ax.axvline(switch["step"], color="tab:red" if down else "tab:green", linewidth=0.8, alpha=0.7)
        ax.annotate(f"{'▼' if down else '▲'} {switch['reason']}", (switch["step"], 1.0),
                    xycoords=("data", "axes fraction"), fontsize=6, rotation=90, va="top", ha="right",
                    color="tab:red" if down else "tab:green")
    ax.plot([], [], color="tab:orange", alpha=0.4, linewidth=6, label="low-rank mode")
    ax.legend(fontsize=6, loc="lower left")
    _title(ax, name)


def _alignments(ax, log: dict[str, Any], name: str) -> None:
    entry = log["layers"][name]
    steps = entry["step"]
    styles = {"principal_alignment": ("tab:red", "principal_danger"), "minor_alignment": ("tab:green", "minor_safe"),
              "subspace_angle": ("tab:purple", "angle_stable"),
              "reconstruction_error": ("tab:gray", "recon_safe")}
    thresholds = log.get("thresholds") or {}
    for metric, (color, threshold) in styles.items():
        values = entry["metrics"].get(metric)
        if not values or all(v is None for v in values):
            continue
        points = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], color=color, marker=".", linewidth=1, label=metric)
        if threshold in thresholds:
            ax.axhline(thresholds[threshold], color=color, linestyle="--", linewidth=0.8, alpha=0.7)
    for switch in (s for s in log.get("switches", []) if s["layer"] == name):
        ax.axvline(switch["step"], color="black", linewidth=0.6, alpha=0.5, linestyle=":")
    ax.set_xlabel("step", fontsize=8)
    ax.legend(fontsize=6)
    _title(ax, name)
