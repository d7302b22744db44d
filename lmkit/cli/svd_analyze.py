"""``lmkit svd-analyze``: a Rich table per checkpoint, ``analysis.json`` and PNGs of a run's spectra."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from lmkit.cli._common import handle_errors

if TYPE_CHECKING:
    from rich.table import Table

    from lmkit.analysis.svd_analyze import SVDReport

MISSING = "—"


@handle_errors
def svd_analyze_command(
    run: str = typer.Argument(..., help="Run directory (runs/NAME) or a run name under --out-dir."),
    checkpoints: list[str] = typer.Option(["all"], "--checkpoint", "-c",
                                          help="all (default: every distinct checkpoint, in step order), best, "
                                               "latest, step_…, epoch_…, a .pt file or a .dcp folder; repeatable."),
    layers: list[str] = typer.Option([], "--layers", "-l", metavar="GLOB",
                                     help="Weight names to analyse (fnmatch, repeatable), e.g. "
                                          "'transformer.h.*.attn.*' or '*wte*'. Default: the input embedding "
                                          "and every 2-D weight of the blocks and the head."),
    k: int = typer.Option(10, "--k", min=1, help="Top-k left singular subspace compared between checkpoints "
                                                 "(adaptive-SVD layers use g - r once r is set)."),
    out: Path = typer.Option(None, "--out", help="Folder for analysis.json and the PNGs (default runs/NAME/svd/)."),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON report on stdout instead of the tables."),
    no_heavy_tail: bool = typer.Option(False, "--no-heavy-tail", help="Skip the power-law and MP fits (alpha, "
                                                                    "MP soft rank): faster on many small layers."),
    out_dir: Path = typer.Option(Path("runs"), "--out-dir", help="Folder of run directories (default: runs)."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: the cores other "
                                                                "processes leave free)."),
) -> None:
    """Spectral analysis of a run's weight matrices across its checkpoints: singular values, effective
    and stable rank, energy ranks, condition number, WeightWatcher's power-law alpha (alpha-weighted,
    log spectral norm, MP soft rank); between checkpoints the largest principal angle of the top-k left
    singular subspace and the share of the change in it; with svd.jsonl the adaptive-SVD timeline
    (modes, r, metrics, switches). Reads checkpoints only. Writes analysis.json and PNGs."""
    from lmkit.threads import apply_threads, choose_threads

    apply_threads(choose_threads(threads))
    from lmkit.analysis.svd_analyze import analyze_run, write_outputs

    stream = sys.stderr if json_out else sys.stdout
    with _Bar(stream, enabled=stream.isatty()) as bar:
        report = analyze_run(run, checkpoints=checkpoints, layers=layers, k=k, out_dir=out_dir,
                             heavy_tail=not no_heavy_tail, emit=bar)
    folder = out if out is not None else report.run / "svd"
    written = write_outputs(report, folder)
    if json_out:
        sys.stdout.write(json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n")
        sys.stderr.write(f"wrote {written[0]} and {len(written) - 1} PNGs in {folder}\n")
        return
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=140)
    for checkpoint in report.checkpoints:
        console.print(build_table(report, checkpoint))
    log = report.svd_log
    if log is not None:
        console.print(f"svd.jsonl: {log['records']} analyses of {len(log['layers'])} layers, "
                      f"{len(log['switches'])} switches, {len(log['refactors'])} re-factorisations"
                      + (f"; {log['skipped_lines']} unreadable lines skipped" if log["skipped_lines"] else ""),
                      highlight=False, soft_wrap=True)
        for switch in log["switches"]:
            where = "LOW-RANK (r={})".format(switch["r"]) if switch["to_mode"] == "lowrank" else "FULL MATRIX"
            console.print(f"  step {switch['step']}: {switch['layer']} switched to {where} - Reason: "
                          f"{switch['reason']}", highlight=False, soft_wrap=True)
    console.print("erank: effective rank (Roy & Vetterli 2007); srank: stable rank ‖W‖F²/‖W‖₂²; α: power-law "
                  "exponent of the eigenvalues of WᵀW (WeightWatcher); mode: adaptive-SVD layers (low = low-rank, "
                  "r minor components); angle: largest principal angle (rad) between the top-k left singular "
                  "subspaces of this and the previous checkpoint; ΔW∥k: ‖P_prev ΔW‖F/‖ΔW‖F, the share of the "
                  "change in the previous top-k subspace", highlight=False, soft_wrap=True)
    console.print(f"wrote {written[0]}", highlight=False, soft_wrap=True)
    for path in written[1:]:
        console.print(f"plot: {path}", highlight=False, soft_wrap=True)


def build_table(report: SVDReport, checkpoint: dict[str, Any]) -> Table:
    """The Rich table of one checkpoint: a row per weight matrix."""
    from rich import box
    from rich.table import Table

    step = checkpoint["step"]
    table = Table(title=f"{report.name} @ step {step:,} ({Path(checkpoint['file']).name})", title_justify="left",
                  header_style="bold", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    table.add_column("layer", overflow="fold", min_width=20)  # long names wrap on a narrow terminal; numbers do not
    for column in ("shape", "mode", "erank", "srank", "σ_max", "α", "k", "angle", "ΔW∥k"):
        table.add_column(column, justify="left" if column == "mode" else "right", no_wrap=True)
    for row in report.rows(step):
        mode = MISSING
        if row["kind"] == "adaptive_svd":
            mode = {"lowrank": "low"}.get(row["mode"], str(row["mode"])) + (f" r={row['r']}" if row["r"] is not None else "")
        name = row["layer"] + "".join(f" (= {alias})" for alias in report.layers[row["layer"]]["aliases"])
        if row.get("error"):
            mode = f"{mode} ({row['error']})"
        table.add_row(name, f"{row['shape'][0]}×{row['shape'][1]}", mode, _num(row.get("effective_rank"), 1),
                      _num(row.get("stable_rank"), 2), _num(row.get("spectral_norm"), 4, g=True),
                      _num(row.get("alpha"), 2), MISSING if row.get("k") is None else str(row["k"]),
                      _num(row.get("subspace_angle"), 4), _num(row.get("delta_in_topk"), 3))
    return table


def _num(value: float | None, digits: int, g: bool = False) -> str:
    if value is None:
        return MISSING
    return f"{value:.{digits}g}" if g else f"{value:.{digits}f}"


class _Bar:
    """A Rich progress bar over checkpoints x layers on a terminal; nothing off one. Called with
    each :class:`~lmkit.analysis.svd_analyze.SVDAnalyzeProgress` event."""

    def __init__(self, stream, enabled: bool):
        self.progress = None
        self.task = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("[bold]svd-analyze"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.description}"), TimeElapsedColumn(),
                                     console=Console(file=stream), transient=True)

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task("", total=None)
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, event) -> None:
        if self.progress is not None and getattr(event, "kind", "") == "svd_analyze_progress":
            self.progress.update(self.task, completed=event.completed, total=event.total,
                                 description=f"step {event.step} {event.layer}")
