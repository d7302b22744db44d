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
    from lmkit.compare_groups import GroupComparison, Verdict

MISSING = "—"
BEST_STYLE = "bold green"


@handle_errors
def compare_command(
    runs: list[str] = typer.Argument(None, metavar="RUN RUN [RUN ...]",
                                     help="Two or more runs: names under --out-dir, or run folders. "
                                          "The first is the base of every delta."),
    groups: list[str] = typer.Option([], "--group", metavar="NAME=RUN,RUN,...",
                                     help="A group of runs (seeds), repeatable, instead of RUN arguments: per "
                                          "group n, mean ± std and a 95% t-interval; better only when Welch's "
                                          "test gives p < 0.05."),
    out: Path = typer.Option(None, "--out", help="Where to write the PNG (default compare/RUN1_vs_RUN2.png)."),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON report on stdout instead of the table."),
    json_file: Path = typer.Option(None, "--json-out", metavar="PATH", help="Also write the JSON report to PATH."),
    out_dir: Path = typer.Option(Path("runs"), "--out-dir", help="Folder of run directories (default: runs)."),
    no_plot: bool = typer.Option(False, "--no-plot", help="Do not draw the PNG."),
) -> None:
    """Compare runs: params, steps, tokens, wall time, tokens/s, final and best losses, perplexity and
    bpb, and the headline metric of every eval task; deltas against the first run; writes a PNG of
    the loss curves (and eval sweeps). A value is called better only with a noise estimate:
    --group runs (seeds, Welch's test) or an eval's own stderr."""
    from lmkit.compare import compare_runs, default_plot_path, plot_comparison
    from lmkit.compare_groups import honest_report, single_run_verdicts

    if groups:
        if runs:
            from lmkit.errors import ConfigError

            raise ConfigError("compare: give runs either as arguments or in --group groups, not both")
        return _compare_groups(groups, out, json_out, json_file, out_dir, no_plot)
    comparison = compare_runs(runs or [], out_dir)
    png = None
    if not no_plot:
        png = plot_comparison(comparison, out if out is not None else default_plot_path(comparison.names))
    verdicts = single_run_verdicts(comparison)
    report = honest_report(comparison.to_report(png), comparison, verdicts)
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
    console.print(build_table(comparison, verdicts))
    for note in comparison.notes:
        console.print(note, highlight=False, soft_wrap=True)
    console.print("Δ = run − base, % relative to the base. No value is called better: one run per side gives no "
                  "noise estimate (seeds alone move these numbers); compare seeds with --group NAME=RUN,RUN,...",
                  highlight=False, soft_wrap=True)
    if any(v.better is not None or v.p_value is not None for v in verdicts.values()):
        console.print(f"[{BEST_STYLE}]*[/] except eval metrics that report their own stderr: better when a two-sided "
                      "z-test on Δ / sqrt(se_base² + se_run²) gives p < 0.05 (item-sampling noise, not seed noise)",
                      highlight=False, soft_wrap=True)
    if (study := comparison.mul_report()) is not None:  # two runs of the multiplication-tokens study
        from lmkit.compare_mul import render_mul_report

        console.print("")
        for line in render_mul_report(study):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    if png is not None:
        console.print(f"plot: {png}", highlight=False, soft_wrap=True)
    if json_file is not None:
        console.print(f"report: {json_file}", highlight=False, soft_wrap=True)


def build_table(comparison: Comparison, verdicts: dict[str, Verdict] | None = None) -> Table:
    """The Rich table: one row per quantity, a column per run and a Δ column per run after
    the first. A value is bold green with a ``*`` (and a delta green or red) only where
    ``verdicts`` (default :func:`lmkit.compare_groups.single_run_verdicts`) call it better."""
    if verdicts is None:
        from lmkit.compare_groups import single_run_verdicts

        verdicts = single_run_verdicts(comparison)
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
        verdict = verdicts.get(row.key)
        best = verdict.better if verdict is not None else None
        cells = [label]
        for i in range(len(names)):
            value = row.texts[i] if row.kind == "text" and row.texts else row.values[i]
            shown = format_value(value, row.kind)
            cells.append(Text(shown + (" *" if i == best else "  "), style=BEST_STYLE if i == best else ""))
            if i > 0:
                cells.append(_delta_cell(row, i, significant=best is not None))
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


def _delta_cell(row: Row, i: int, significant: bool = True):
    """``+0.0123 (+1.2%)``; green/red (an improvement/a regression) only when ``significant``."""
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
    if significant and imp is not None and imp != 0 and not row.tokenizer_dependent:
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


def _compare_groups(specs: list[str], out: Path | None, json_out: bool, json_file: Path | None, out_dir: Path,
                    no_plot: bool) -> None:
    """``lmkit compare --group A=r1,r2 --group B=r3,r4``: the grouped table, PNG with bands, JSON."""
    from lmkit.compare import default_plot_path
    from lmkit.compare_groups import compare_groups, honest_report, plot_groups, single_run_verdicts

    result = compare_groups(specs, out_dir)
    png = None
    if not no_plot:
        png = plot_groups(result, out if out is not None else default_plot_path(result.names))
    report = honest_report(result.flat.to_report(png), result.flat, single_run_verdicts(result.flat))
    report["groups"] = result.to_report()
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

    table = build_group_table(result)
    console = Console() if sys.stdout.isatty() else Console(width=max(100, Console(width=1000).measure(table).maximum))
    console.print(table)
    for note in result.notes:
        console.print(note, highlight=False, soft_wrap=True)
    console.print(f"mean ± std (sample std, n − 1) across a group's runs; 95% CI: t-interval of the mean (n − 1 "
                  f"degrees of freedom); p: two-sided Welch t-test against {result.names[0]}; [{BEST_STYLE}]*[/] "
                  "better than every other group with p < 0.05", highlight=False, soft_wrap=True)
    if png is not None:
        console.print(f"plot: {png}", highlight=False, soft_wrap=True)
    if json_file is not None:
        console.print(f"report: {json_file}", highlight=False, soft_wrap=True)


def format_stats(mean: float | None, std: float | None, kind: str) -> str:
    """``3.2104 ± 0.0042``; the mean alone without a std (one run); ``—`` without values."""
    if mean is None:
        return MISSING
    if kind in ("text", "step") or std is None:
        return format_value(mean, kind)
    return f"{format_value(mean, kind)} ± {format_value(std, kind) if std is not None else MISSING}"


def build_group_table(result: GroupComparison) -> Table:
    """The grouped Rich table: per group ``mean ± std`` and the 95% t-interval (with n in the
    header), per group after the first the Welch p-value against the base; the better group
    (Welch p < 0.05 against every other group) bold green with a ``*``; the last column says
    what the verdict rests on (e.g. ``no noise estimate (one run per side)``)."""
    from rich.table import Table
    from rich.text import Text

    names = result.names
    table = Table(title=f"lmkit compare --group (base: {names[0]})", title_justify="left", header_style="bold")
    table.add_column("metric", no_wrap=True)
    for g, (name, runs) in enumerate(result.groups):
        table.add_column(f"{name} (n={len(runs)})", justify="right", no_wrap=True)
        table.add_column("95% CI", justify="right", no_wrap=True)
        if g > 0:
            table.add_column(f"p {name} vs {names[0]}", justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    n_cols = len(table.columns)
    section = None
    for grow in result.rows:
        row = grow.row
        if not row.table:
            continue
        if row.section != section:
            if section is not None:
                table.add_section()
            section = row.section
            table.add_row(Text(section, style="bold cyan"), *[""] * (n_cols - 1))
        cells: list = [Text(row.label + (" ⚠" if row.tokenizer_dependent else ""),
                            style="yellow" if row.tokenizer_dependent else "")]
        best = grow.verdict.better
        for g, stats in enumerate(grow.stats):
            if row.kind == "text":
                texts = sorted({t for t, m in zip(row.texts or [], _members(result, g), strict=False) if m and t})
                cells.append(Text(", ".join(texts) or MISSING))
                cells.append(Text(""))
            else:
                shown = format_stats(stats.mean, stats.std, row.kind)
                if 0 < stats.n < len(result.groups[g][1]):  # some runs lack this row
                    shown += f" (n={stats.n})"
                cells.append(Text(shown + (" *" if g == best else "  "), style=BEST_STYLE if g == best else ""))
                ci = stats.ci
                cells.append(Text(f"[{format_value(ci[0], row.kind)}, {format_value(ci[1], row.kind)}]"
                                  if ci is not None and row.kind != "step" else MISSING, style="dim"))
            if g > 0:
                p = grow.p_values[g]
                cells.append(Text(MISSING if p is None else f"{p:.3g}", style="dim"))
        cells.append(_verdict_cell(grow, names))
        table.add_row(*cells)
    return table


def _verdict_cell(grow, names: list[str]):
    """``mul better`` (bold green), ``not significant``, ``no noise estimate (n=1)`` ...; empty
    for rows without a direction."""
    from rich.text import Text

    from lmkit.compare_groups import NO_NOISE

    v, row = grow.verdict, grow.row
    if row.kind in ("text", "step") or row.lower_is_better is None:
        return Text("")
    if v.better is not None:
        return Text(f"{names[v.better]} better", style=BEST_STYLE)
    if v.basis == NO_NOISE:
        return Text("no noise estimate (n=1)", style="yellow")
    if v.p_value is not None:
        return Text("not significant", style="dim")
    return Text(v.basis, style="dim")


def _members(result: GroupComparison, g: int) -> list[bool]:
    """Per flat run: whether it belongs to group ``g``."""
    group = set(result.groups[g][1])
    return [run.name in group for run in result.flat.runs]
