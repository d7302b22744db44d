"""``lmkit runs``: one table of the runs in a folder (reads :mod:`lmkit.run_table`; writes nothing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from lmkit.cli._common import handle_errors


def _si(n: float | None) -> str:
    if n is None:
        return "-"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}" if abs(n) < 10 * div else f"{n / div:.1f}{unit}"
    return f"{n:g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def _eval(last: dict | None) -> str:
    if not last:
        return "-"
    value = last.get("value")
    shown = f"{value:.4g}" if isinstance(value, (int, float)) else str(value)
    at = f" @ {last['step']}" if last.get("step") is not None else ""
    return f"{last.get('task')}: {last.get('metric')} {shown}{at}"


@handle_errors
def runs_command(
    out_dir: Path = typer.Option(Path("runs"), "--out-dir", help="Folder of run directories."),
    json_out: bool = typer.Option(False, "--json", help="Print the rows as a JSON list instead of a table."),
) -> None:
    """List the runs in a folder: preset, model, status, step, tokens, best val loss, last eval,
    wall time, start; newest first. Writes nothing."""
    from lmkit.run_table import list_runs

    rows = list_runs(out_dir)
    if json_out:
        sys.stdout.write(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if not rows:
        Console().print(f"no runs in {escape(str(out_dir))}/", highlight=False)
        return
    colour = {"completed": "green", "running": "cyan", "interrupted": "yellow", "failed": "red"}
    table = Table(title=f"runs in {escape(str(out_dir))}/ (newest first)", title_justify="left")
    for col, justify in (("name", "left"), ("preset", "left"), ("model", "left"), ("status", "left"),
                         ("step", "right"), ("tokens", "right"), ("best val", "right"), ("last eval", "left"),
                         ("wall", "right"), ("started UTC", "left")):
        # status and step stay on one line; names, models and evals wrap on a narrow terminal
        table.add_column(col, justify=justify, no_wrap=col in ("status", "step"),  # type: ignore[arg-type]
                         overflow="fold")
    for r in rows:
        model = f"{r.model_type or '?'} {_si(r.params)}" if r.params else (r.model_type or "-")
        step = f"{r.step if r.step is not None else '-'}/{r.max_steps if r.max_steps is not None else '?'}"
        table.add_row(
            escape(r.name), escape(r.preset or "-"), escape(model), f"[{colour[r.status]}]{r.status}[/]", step,
            _si(r.tokens), f"{r.best_val_loss:.4f}" if r.best_val_loss is not None else "-",
            escape(_eval(r.last_eval)), _duration(r.wall_time_s),
            (r.started or "-").replace("T", " ").replace("+00:00", "")[5:16] if r.started else "-",
        )
    # piped or redirected: as wide as the table needs (no folded names, one line per run)
    console = Console() if sys.stdout.isatty() else Console(width=max(100, Console(width=1000).measure(table).maximum))
    console.print(table)
