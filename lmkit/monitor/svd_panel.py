"""The dashboard's adaptive-SVD panel: one row per target layer, from
:class:`~lmkit.events.SVDAnalysis` and :class:`~lmkit.events.SVDModeSwitch` events.

Columns (SEEDS_SPEC 2.2-2.4): the layer's mode and r (minor, trainable components) after
the last analysis; that analysis's principal and minor alignment (norm ratios of the
projected gradient), subspace angle (largest principal angle, radians) and reconstruction
error; the layer's switch count; its last switch (step and reason); the last decision's
reason. The panel fits the width Rich gives it: it shortens reasons (``gradient_clobbering_risk``
-> ``clobbering risk``), narrows the gaps, drops columns (last reason, reconstruction
error, angle, last switch, minor alignment) and shortens layer names from the left
(``…h.0.attn.c_q``) until a row fits; when the height holds fewer rows than layers, it
shows the layers that switched most recently and says how many are left out.

:class:`SVDState` is kept by the dashboard under its lock; :meth:`SVDState.panel` takes a
snapshot, so rendering on the refresh thread never reads state that is being updated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console, ConsoleOptions, RenderResult
from rich.panel import Panel
from rich.text import Text

from lmkit.events import SVDAnalysis, SVDModeSwitch

#: Reasons as the panel shows them when the full names do not fit.
SHORT_REASONS = {
    "gradient_clobbering_risk": "clobbering risk",
    "optimal_lowrank_conditions": "optimal low-rank",
    "reconstruction_unsafe": "recon unsafe",
    "continue_current_mode": "continue",
    "initial_svd_computation": "initial SVD",
    "warmup_period": "warmup",
    "no_gradient_yet": "no gradient yet",
    "invalid_gradient": "invalid gradient",
}

REASON_STYLES = {
    "gradient_clobbering_risk": "bold red",
    "optimal_lowrank_conditions": "bold magenta",
    "reconstruction_unsafe": "yellow",
    "invalid_gradient": "bold red",
}


@dataclass
class SVDLayerRow:
    """What the panel knows about one layer (the latest analysis, and its switches)."""

    layer: str
    order: int  # first-seen order: the trainer analyses layers in model order
    step: int
    mode: str
    r: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    action: str = ""
    analyses: int = 0
    switches: int = 0
    switch_step: int | None = None
    switch_reason: str | None = None


class SVDState:
    """Per-layer state from SVD events; empty until the first :class:`SVDAnalysis`."""

    def __init__(self) -> None:
        self.rows: dict[str, SVDLayerRow] = {}

    def __bool__(self) -> bool:
        return bool(self.rows)

    def _row(self, layer: str, step: int, mode: str, r: int | None) -> SVDLayerRow:
        row = self.rows.get(layer)
        if row is None:
            row = self.rows[layer] = SVDLayerRow(layer, len(self.rows), step, mode, r)
        return row

    def analysis(self, e: SVDAnalysis) -> None:
        row = self._row(e.layer, e.step, e.mode_after, e.r_after)
        row.step, row.mode, row.r = e.step, e.mode_after, e.r_after
        row.metrics, row.reason, row.action = dict(e.metrics), e.reason, e.action
        row.analyses += 1
        if e.action in ("to_lowrank", "to_full") and row.switch_step != e.step:
            row.switches += 1  # counted here too, in case no SVDModeSwitch follows
            row.switch_step, row.switch_reason = e.step, e.reason

    def switch(self, e: SVDModeSwitch) -> None:
        row = self._row(e.layer, e.step, e.to_mode, e.r)
        row.mode, row.r = e.to_mode, e.r
        row.switches = e.switches  # the trainer's count, which survives a resume
        row.switch_step, row.switch_reason = e.step, e.reason

    def height_wanted(self) -> int:
        """Rows the panel would like: borders, the header and one per layer (0 when empty)."""
        return len(self.rows) + 3 if self.rows else 0

    def panel(self) -> Panel:
        rows = [dataclasses.replace(r, metrics=dict(r.metrics)) for r in self.rows.values()]
        lowrank = sum(r.mode == "lowrank" for r in rows)
        switches = sum(r.switches for r in rows)
        step = max(r.step for r in rows) if rows else 0
        subtitle = (f"[dim]{len(rows)} layer{'s' if len(rows) != 1 else ''} · {lowrank} low-rank · "
                    f"{switches} switch{'es' if switches != 1 else ''} · analysed at step {step:,}")
        return Panel(SVDTable(rows), title="[bold]adaptive SVD[/] [dim](angle in rad)", title_align="left",
                     subtitle=subtitle, subtitle_align="right", border_style="magenta")


def _num(value: float | None, spec: str) -> str:
    if value is None or not isinstance(value, (int, float)):
        return "–"
    if not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _dropped(name: str, n: int) -> str:
    parts = name.split(".")
    return name if n == 0 else "…" + ".".join(parts[min(n, len(parts) - 1):])


def shorten_layer(name: str, width: int) -> str:
    """``name`` in at most ``width`` characters: leading dotted components dropped first
    (``transformer.h.0.attn.c_q`` -> ``…h.0.attn.c_q``), then cut on the right."""
    return shorten_layers([name], width)[name]


def shorten_layers(names: list[str], width: int) -> dict[str, str]:
    """Each name in at most ``width`` characters, told apart: the fewest leading components
    dropped (the same number for all) that fits and keeps the names distinct; where none
    does, the most that keeps them distinct, cut on the right."""
    names = list(dict.fromkeys(names))
    depth = max((n.count(".") for n in names), default=0)
    distinct = [k for k in range(depth + 1) if len({_dropped(n, k) for n in names}) == len(names)]
    for k in distinct:
        if all(len(_dropped(n, k)) <= width for n in names):
            return {n: _dropped(n, k) for n in names}
    k = distinct[-1] if distinct else 0
    cut = {n: _dropped(n, k) for n in names}
    return {n: s if len(s) <= width else (s[:max(0, width - 1)] + "…" if width > 0 else "") for n, s in cut.items()}


def layers_need(names: list[str]) -> int:
    """The width the layer column needs to show ``names`` apart (leading components dropped)."""
    depth = max((n.count(".") for n in names), default=0)
    fits = [max(len(_dropped(n, k)) for n in names) for k in range(depth + 1)
            if len({_dropped(n, k) for n in names}) == len(names)]
    return min(fits) if fits else max(len(n) for n in names)


@dataclass
class _Column:
    header: str
    cell: Callable[[SVDLayerRow, bool], tuple[str, str]]  # (row, short reasons) -> (text, style)
    right: bool = False


def _mode(row: SVDLayerRow, short: bool) -> tuple[str, str]:
    return row.mode, "bold magenta" if row.mode == "lowrank" else "green"


def _metric(name: str, spec: str) -> Callable[[SVDLayerRow, bool], tuple[str, str]]:
    return lambda row, short: (_num(row.metrics.get(name), spec), "")


def _reason(reason: str | None, short: bool) -> str:
    if not reason:
        return "–"
    return SHORT_REASONS.get(reason, reason) if short else reason


def _last_switch(row: SVDLayerRow, short: bool) -> tuple[str, str]:
    if row.switch_step is None:
        return "–", "dim"
    return f"{row.switch_step:,} {_reason(row.switch_reason, short)}", REASON_STYLES.get(row.switch_reason or "", "")


COLUMNS = {
    "mode": _Column("mode", _mode),
    "r": _Column("r", lambda row, short: ("–" if row.r is None else str(row.r), ""), right=True),
    "principal": _Column("princ", _metric("principal_alignment", ".3f"), right=True),
    "minor": _Column("minor", _metric("minor_alignment", ".3f"), right=True),
    "angle": _Column("angle", _metric("subspace_angle", ".3f"), right=True),
    "recon": _Column("recon", _metric("reconstruction_error", ".1e"), right=True),
    "switches": _Column("sw", lambda row, short: (str(row.switches), "bold" if row.switches else "dim"), right=True),
    "last_switch": _Column("last switch", _last_switch),
    "reason": _Column("reason", lambda row, short: (_reason(row.reason, short),
                                                     REASON_STYLES.get(row.reason, "dim"))),
}
#: Dropped in this order when a row does not fit.
DROP_ORDER = ("reason", "recon", "angle", "last_switch", "minor", "principal")
LAYER_MIN = 12  # the layer column is not shortened below this (or below telling the layers apart)
# while a column can go instead


class SVDTable:
    """The panel's body: picks the columns and the reason form that fit ``options.max_width``
    and the layers that fit ``options.height``."""

    def __init__(self, rows: list[SVDLayerRow]):
        self.rows = rows

    def _plan(self, rows: list[SVDLayerRow], width: int) -> tuple[list[str], bool, int, int]:
        """``(column keys, short reasons, gap, layer width)`` for the widest layout that fits."""
        longest = max(len(r.layer) for r in rows)
        layer_need = min(longest, max(LAYER_MIN, layers_need([r.layer for r in rows])))
        keys = list(COLUMNS)
        attempts: list[tuple[list[str], bool, int]] = [(keys, False, 2), (keys, True, 2), (keys, True, 1)]
        for drop in DROP_ORDER:
            keys = [k for k in keys if k != drop]
            attempts.append((keys, True, 1))
        for keys, short, gap in attempts:
            used = sum(self._width(k, rows, short) for k in keys) + gap * len(keys)
            if width - used >= layer_need:
                return keys, short, gap, min(longest, width - used)
        keys, short, gap = attempts[-1]
        used = sum(self._width(k, rows, short) for k in keys) + gap * len(keys)
        return keys, short, gap, max(1, width - used)

    @staticmethod
    def _width(key: str, rows: list[SVDLayerRow], short: bool) -> int:
        column = COLUMNS[key]
        return max([len(column.header)] + [len(column.cell(r, short)[0]) for r in rows])

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.rows:
            yield Text("waiting for the first analysis…", style="dim")
            return
        width = options.max_width
        fit = max(1, (options.height or len(self.rows) + 1) - 1)  # the header takes a line
        rows, hidden = self.rows, 0
        if len(rows) > fit:
            # keep the layers that switched most recently (then low-rank ones), in model order
            keep = fit - 1 if fit >= 2 else 1  # one line says how many are left out, where there is room
            ranked = sorted(rows, key=lambda r: (-(r.switch_step if r.switch_step is not None else -1),
                                                 r.mode != "lowrank", r.order))
            rows = sorted(ranked[:keep], key=lambda r: r.order)
            hidden = len(self.rows) - len(rows)
        keys, short, gap, layer_width = self._plan(self.rows, width)
        names = shorten_layers([r.layer for r in self.rows], layer_width)
        layer_width = max(len("layer"), *(len(n) for n in names.values()))
        widths = {k: self._width(k, self.rows, short) for k in keys}
        header = Text(no_wrap=True, overflow="ellipsis", style="bold")
        header.append("layer".ljust(layer_width))
        for k in keys:
            c = COLUMNS[k]
            header.append(" " * gap + (c.header.rjust(widths[k]) if c.right else c.header.ljust(widths[k])))
        header.truncate(width)
        yield header
        for row in rows:
            line = Text(no_wrap=True, overflow="ellipsis")
            line.append(names[row.layer].ljust(layer_width), style="bold")
            for k in keys:
                c = COLUMNS[k]
                text, style = c.cell(row, short)
                cell = text.rjust(widths[k]) if c.right else text.ljust(widths[k])
                line.append(" " * gap)
                line.append(cell, style=style)
            line.truncate(width)
            yield line
        if hidden:
            yield Text(f"… {hidden} more layer{'s' if hidden > 1 else ''} (every analysis is in svd.jsonl)",
                       style="dim", no_wrap=True, overflow="ellipsis")


__all__ = ["SHORT_REASONS", "SVDLayerRow", "SVDState", "SVDTable", "layers_need", "shorten_layer", "shorten_layers"]
