"""``lmkit compare``: one Rich table of runs side by side, a PNG of the curves, a JSON report."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from lmkit.cli._common import handle_errors

if TYPE_CHECKING:
    from rich.table import Table

    from lmkit.compare import Comparison, Row

MISSING = "—"
BEST_STYLE = "bold green"


@handle_errors
def compare_command(
    runs: list[str] = typer.Argument(..., metavar="RUN RUN [RUN ...]",
                                     help="Two or more runs: names under --out-dir, or run folders. "
                                          "The first is the base of every delta."),
    out: Path = typer.Option(None, "--out", help="Where to write the PNG (default compare/RUN1_vs_RUN2.png)."),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON report on stdout instead of the table."),
    json_file: Path = typer.Option(None, "--json-out", metavar="PATH", help="Also write the JSON report to PATH."),
    out_dir: Path = typer.Option(Path("runs"), "--out-dir", help="Folder of run directories (default: runs)."),
    no_plot: bool = typer.Option(False, "--no-plot", help="Do not draw the PNG."),
) -> None:
    """Compare runs: params, steps, tokens, wall time, tokens/s, final and best losses, perplexity and
    bpb, and the headline metric of every eval task; deltas against the first run, the better value
    highlighted; writes a PNG of the loss curves (and eval sweeps)."""
    from lmkit.compare import compare_runs, default_plot_path, plot_comparison

    comparison = compare_runs(runs, out_dir)
    png = None
    if not no_plot:
        png = plot_comparison(comparison, out if out is not None else default_plot_path(comparison.names))
    report = comparison.to_report(png)
    text = json.dumps(report, indent=2, allow_nan=False, default=str) if (json_out or json_file) else None
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(text + "\n", encoding="utf-8")
    if json_out:
        sys.stdout.write(text + "\n")
        if png is not None:
            sys.stderr.write(f"plot: {png}\n")
        return
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=max(100, _natural_width(comparison)))
    console.print(build_table(comparison))
    for note in comparison.notes:
        console.print(note, highlight=False, soft_wrap=True)
    console.print(f"[{BEST_STYLE}]*[/] better value of a row (lower loss / perplexity / bpb / time, higher "
                  "accuracy / tokens/s); Δ = run − base, % relative to the base", highlight=False, soft_wrap=True)
    if png is not None:
        console.print(f"plot: {png}", highlight=False, soft_wrap=True)
    if json_file is not None:
        console.print(f"report: {json_file}", highlight=False, soft_wrap=True)


def build_table(comparison: Comparison) -> Table:
    """The Rich table: one row per quantity, a column per run and a Δ column per run after
    the first; the better value of a row is bold green with a ``*``."""
    from rich.table import Table
    from rich.text import Text

    names = comparison.names
    table = Table(title=f"lmkit compare (base: {names[0]})", title_justify="left", header_style="bold")
    table.add_column("metric", no_wrap=True)
    table.add_column(names[0], justify="right", no_wrap=True)
    for name in names[1:]:
        table.add_column(name, justify="right", no_wrap=True)
        table.add_column(f"Δ {name}", justify="right", no_wrap=True)
    section = None
    for row in comparison.rows:
        if not row.table:
            continue
        if row.section != section:
            if section is not None:
                table.add_section()
            section = row.section
            table.add_row(Text(section, style="bold cyan"), *[""] * (2 * len(names) - 1))
        label = Text(row.label + (" ⚠" if row.tokenizer_dependent else ""),
                     style="yellow" if row.tokenizer_dependent else "")
        best = row.best_index
        cells = [label]
        for i in range(len(names)):
            value = row.texts[i] if row.kind == "text" and row.texts else row.values[i]
            shown = format_value(value, row.kind)
            cells.append(Text(shown + (" *" if i == best else "  "), style=BEST_STYLE if i == best else ""))
            if i > 0:
                cells.append(_delta_cell(row, i))
        table.add_row(*cells)
    return table


def format_value(value: float | str | None, kind: str) -> str:
    """A cell: ints with thousands separators, token counts as 1.23M, seconds as 4m 05s,
    other numbers with 4 decimals (3 significant digits below 0.001); ``—`` when missing."""
    if value is None:
        return MISSING
    if isinstance(value, str):
        return value
    if not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if kind in ("int", "step"):
        return f"{value:,.0f}"
    if kind == "tokens":
        return _si(value)
    if kind == "seconds":
        return _duration(value)
    if kind == "rate":
        return _si(value)
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.3g}"
    return f"{value:.4f}"


def _delta_cell(row: Row, i: int):
    from rich.text import Text

    delta, rel, imp = row.deltas[i], row.relative[i], row.relative_improvement[i]
    if delta is None:
        return Text(MISSING, style="dim")
    if row.kind in ("int", "tokens", "rate"):
        shown = ("+" if delta >= 0 else "-") + format_value(abs(delta), row.kind)
    elif row.kind == "seconds":
        shown = ("+" if delta >= 0 else "-") + _duration(abs(delta))
    else:
        shown = f"{delta:+.4f}" if delta == 0 or abs(delta) >= 1e-3 else f"{delta:+.3g}"
    if rel is not None and math.isfinite(rel):
        shown += f" ({rel * 100:+.1f}%)"
    style = "dim"
    if imp is not None and imp != 0 and not row.tokenizer_dependent:
        style = "green" if imp > 0 else "red"
    return Text(shown, style=style)


def _si(value: float) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{suffix}"
    return f"{value:,.0f}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _natural_width(comparison: Comparison) -> int:
    """A width that fits the table without wrapping when stdout is not a terminal."""
    label = max((len(r.label) + 2 for r in comparison.rows), default=10)
    label = max(label, max((len(r.section) for r in comparison.rows), default=0))
    per_run = max(14, *(len(n) + 4 for n in comparison.names))
    return label + 4 + (2 * len(comparison.names) - 1) * (per_run + 8)
