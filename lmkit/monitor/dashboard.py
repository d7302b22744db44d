"""The live training dashboard: a Rich ``Live`` layout driven only by training events.

:class:`Dashboard` is an observer (``emit`` target) like :class:`~lmkit.monitor.console.PlainLog`:
the training loop never prints, it emits :mod:`lmkit.events`; the dashboard turns them
into panels::

    ┌ header: run, preset, model params, device, precision, compile ──── status ┐
    ┌ loss (train + val) ───────────────────┐┌ stats: step/total, epoch, tokens, ┐
    │ braille chart, bucketed: 100k steps   ││ lr, loss, val + best, tok/s, MFU,  │
    │ stay readable                         ││ step time, elapsed, ETA            │
    │                                       │┌ GPU: NVML per device + torch       ┐
    │                                       ││ allocated/reserved/peak; or host:  │
    │                                       ││ RSS, CPU % (CPU/MPS runs)          │
    ┌ adaptive SVD (once analysed): per layer mode, r, alignments, angle, switches ┐
    ┌ events: evals, checkpoints, notices, ┐┌ events by kind: latest per kind    ┐
    │ NaN/overflow skips, step-time jumps, ││ (and per group key, e.g. layer)    │
    │ newest at bottom                     ││                                    │

Cost to the training loop: handling an event takes the state lock for a few
microseconds (the loss series is bucketed in O(1) amortised per point). Rendering runs
on a refresh thread at ``refresh_per_second`` (default 2 Hz, and only when something
changed, or once a second for the clocks); system numbers come from
:class:`~lmkit.monitor.sampler.Sampler` (~1 Hz, NVML + psutil, never a CUDA sync).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.layout import Layout
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.style import Style
from rich.table import Table
from rich.text import Text

from lmkit.events import (
    MESSAGE_EVENTS,
    CheckpointSaved,
    DataProgress,
    DataReady,
    EvalResult,
    Event,
    NaNSkipped,
    Notice,
    Resumed,
    RunFinished,
    RunStarted,
    StepMetrics,
    StepTimeJump,
    SVDAnalysis,
    SVDModeSwitch,
)
from lmkit.monitor.console import data_line, finished_lines, fmt_count, fmt_duration, fmt_metric
from lmkit.monitor.nvml import GpuStat
from lmkit.monitor.sampler import HostStat, Sampler, SystemSample
from lmkit.monitor.steptime import StepTimeWatch
from lmkit.monitor.svd_panel import SVDState, shorten_layers

GiB = 2**30

# --------------------------------------------------------------------------------------
# A bounded, bucketed series
# --------------------------------------------------------------------------------------


class BucketSeries:
    """Values over steps, kept in at most ``capacity`` buckets of equal step width.

    Each bucket holds min, max, sum and count of the values whose step falls in it. When
    a step lands past the last bucket, neighbouring buckets are merged pairwise and the
    width doubles, so memory is O(capacity) and :meth:`add` is O(1) amortised, however
    long the run (100k logged steps fit in 512 buckets of 256 steps).
    Non-finite values are counted in ``non_finite`` and not bucketed.
    """

    def __init__(self, capacity: int = 512):
        if capacity < 2:
            raise ValueError("capacity must be >= 2")
        self.capacity = capacity
        self.width = 1
        self.origin: int | None = None
        self.buckets: list[list[float] | None] = []  # [min, max, sum, count]
        self.count = 0
        self.non_finite = 0
        self.last: tuple[int, float] | None = None
        self.first_step: int | None = None
        self.last_step: int | None = None

    def add(self, step: int, value: float) -> None:
        if not math.isfinite(value):
            self.non_finite += 1
            return
        if self.origin is None:
            self.origin = step
        index = max(0, step - self.origin) // self.width
        while index >= self.capacity:
            self._merge()
            index = max(0, step - self.origin) // self.width
        if index >= len(self.buckets):
            self.buckets.extend([None] * (index + 1 - len(self.buckets)))
        bucket = self.buckets[index]
        if bucket is None:
            self.buckets[index] = [value, value, value, 1.0]
        else:
            bucket[0] = min(bucket[0], value)
            bucket[1] = max(bucket[1], value)
            bucket[2] += value
            bucket[3] += 1
        self.count += 1
        self.last = (step, value)
        self.first_step = step if self.first_step is None else min(self.first_step, step)
        self.last_step = step if self.last_step is None else max(self.last_step, step)

    def _merge(self) -> None:
        merged: list[list[float] | None] = []
        for i in range(0, len(self.buckets), 2):
            pair = [b for b in self.buckets[i:i + 2] if b is not None]
            if not pair:
                merged.append(None)
            else:
                merged.append([min(b[0] for b in pair), max(b[1] for b in pair), sum(b[2] for b in pair),
                               sum(b[3] for b in pair)])
        self.buckets = merged
        self.width *= 2

    def points(self) -> list[tuple[float, float, float, float]]:
        """``(step, min, mean, max)`` per non-empty bucket, the step being the bucket's centre
        (clipped to the steps actually seen)."""
        out = []
        if self.origin is None:
            return out
        for i, b in enumerate(self.buckets):
            if b is None:
                continue
            lo = self.origin + i * self.width
            centre = min(max(lo + (self.width - 1) / 2, self.first_step or lo), self.last_step or lo)
            out.append((float(centre), b[0], b[2] / b[3], b[1]))
        return out

    def copy(self) -> BucketSeries:
        other = BucketSeries(self.capacity)
        other.width, other.origin, other.count, other.non_finite = self.width, self.origin, self.count, self.non_finite
        other.buckets = [None if b is None else list(b) for b in self.buckets]
        other.last, other.first_step, other.last_step = self.last, self.first_step, self.last_step
        return other


# --------------------------------------------------------------------------------------
# Braille chart
# --------------------------------------------------------------------------------------

# Dot (x, y) of a 2x4 braille cell -> bit (Unicode 3.0, block U+2800).
_BRAILLE_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))


class BrailleCanvas:
    """A ``cols`` x ``rows`` character canvas of 2x4 braille dots per character, with
    layers: each character shows the dots of its highest-priority layer."""

    def __init__(self, cols: int, rows: int):
        self.cols, self.rows = cols, rows
        self.layers: list[tuple[Style, dict[tuple[int, int], int]]] = []

    @property
    def width(self) -> int:
        return 2 * self.cols

    @property
    def height(self) -> int:
        return 4 * self.rows

    def layer(self, style: Style | str) -> dict[tuple[int, int], int]:
        """A new layer on top of the previous ones; returns its cell -> bits map."""
        cells: dict[tuple[int, int], int] = {}
        self.layers.append((Style.parse(style) if isinstance(style, str) else style, cells))
        return cells

    def dot(self, cells: dict[tuple[int, int], int], x: int, y: int) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            key = (y // 4, x // 2)
            cells[key] = cells.get(key, 0) | _BRAILLE_BITS[y % 4][x % 2]

    def vline(self, cells: dict[tuple[int, int], int], x: int, y0: int, y1: int) -> None:
        for y in range(min(y0, y1), max(y0, y1) + 1):
            self.dot(cells, x, y)

    def segment(self, cells: dict[tuple[int, int], int], x0: int, y0: int, x1: int, y1: int) -> None:
        """A connected line from (x0, y0) to (x1, y1), ``x0 <= x1``: each column gets the
        vertical run the line crosses in it, so steep falls have no gaps."""
        if x1 <= x0:
            self.vline(cells, x0, y0, y1)
            return
        slope = (y1 - y0) / (x1 - x0)
        for x in range(x0, x1 + 1):
            ya = y0 + slope * (max(x - 0.5, x0) - x0)
            yb = y0 + slope * (min(x + 0.5, x1) - x0)
            self.vline(cells, x, int(round(ya)), int(round(yb)))

    def lines(self) -> list[Text]:
        """One :class:`~rich.text.Text` per row; runs of one style are appended together
        (a row costs O(cols), not one Rich span per character)."""
        grid: list[list[tuple[str, Style | None]]] = [[(" ", None)] * self.cols for _ in range(self.rows)]
        for style, cells in self.layers:  # later layers overwrite earlier ones
            for (row, col), bits in cells.items():
                if bits and 0 <= row < self.rows and 0 <= col < self.cols:
                    grid[row][col] = (chr(0x2800 + bits), style)
        out = []
        for cells in grid:
            text = Text()
            run, run_style = [], None
            for char, style in cells:
                if style is not run_style and run:
                    text.append("".join(run), run_style)
                    run = []
                run.append(char)
                run_style = style
            if run:
                text.append("".join(run), run_style)
            out.append(text)
        return out


def _fmt_axis(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else fmt_count(value)


class LossChart:
    """Train loss (a line through the mean of each bucket, and dots at each bucket's
    minimum) and val loss (marked at each evaluation) over steps, drawn with braille dots
    to fit the space Rich gives it (``options.height`` rows, ``options.max_width`` columns).
    Several buckets that fall on one pixel column are merged again (min of mins, mean of
    means), so drawing costs O(buckets + width x height) whatever the run's length.

    Args:
        train / val: the series (copies: the chart is rendered on another thread).
        max_steps: the run's length (for the caption); the x axis spans the steps seen
            so far, from ``start_step``, so an early curve is not squeezed to the left.
    """

    TRAIN = Style(color="cyan", bold=True)
    BAND = Style(color="blue")
    VAL = Style(color="yellow", bold=True)

    def __init__(self, train: BucketSeries, val: BucketSeries, *, max_steps: int | None = None,
                 start_step: int = 0, cache: dict | None = None):
        self.train, self.val = train, val
        self.max_steps = max_steps
        self.start_step = start_step
        self.cache = cache  # reuse the last drawing while the data and the size are the same

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        key = (options.max_width, options.height, self.train.count, self.train.last, self.val.count,
               self.train.width, self.start_step)
        if self.cache is not None and self.cache.get("key") == key:
            yield from self.cache["lines"]
            return
        lines = list(self._draw(options))
        if self.cache is not None:
            self.cache.update(key=key, lines=lines)
        yield from lines

    def _draw(self, options: ConsoleOptions) -> Iterable[Text]:
        width = options.max_width
        height = options.height or 10
        train, val = self.train.points(), self.val.points()
        if not train and not val:
            yield Text("waiting for the first logged step…", style="dim")
            return
        rows = max(2, height - 1)  # the last line is the x axis
        steps = [p[0] for p in train] + [p[0] for p in val]
        x0 = min(min(steps), self.start_step)
        last = [series.last_step for series in (self.train, self.val) if series.last_step is not None]
        x1 = max(max(steps), *last, x0 + 1)  # the axis grows with the run (the stats panel shows progress)
        # The y range: lowest min to highest mean. The first 5% of the x axis (the fall
        # from the initial loss) does not stretch the scale; it is clipped at the top (↑).
        settled = [p[2] for p in train + val if p[0] - x0 >= 0.05 * (x1 - x0)]
        all_means = [p[2] for p in train + val]
        lo = min(p[1] for p in train + val)
        hi = max(settled) if len(settled) >= 2 else max(all_means)
        clipped = max(all_means) > hi
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        labels = [_fmt_axis(hi) + ("↑" if clipped else ""), _fmt_axis((hi + lo) / 2), _fmt_axis(lo)]
        gutter = max(len(s) for s in labels) + 2
        cols = max(4, width - gutter)
        canvas = BrailleCanvas(cols, rows)

        def px(step: float) -> int:
            return min(canvas.width - 1, int((step - x0) / (x1 - x0) * (canvas.width - 1) + 0.5))

        def py(value: float) -> int:
            value = min(max(value, lo), hi)
            return int((hi - value) / (hi - lo) * (canvas.height - 1) + 0.5)

        def columns(points: list[tuple[float, float, float, float]]) -> dict[int, tuple[float, float, float]]:
            # re-bucket onto pixel columns: min, mean (weighted equally per bucket), max
            acc: dict[int, list[float]] = {}
            for step, vmin, vmean, vmax in points:
                a = acc.setdefault(px(step), [math.inf, 0.0, 0.0, -math.inf])
                a[0], a[1], a[2], a[3] = min(a[0], vmin), a[1] + vmean, a[2] + 1, max(a[3], vmax)
            return {x: (a[0], a[1] / a[2], a[3]) for x, a in acc.items()}

        band, line = canvas.layer(self.BAND), canvas.layer(self.TRAIN)
        cols_train = columns(train)
        prev: tuple[int, int] | None = None
        for x in sorted(cols_train):
            vmin, vmean, _ = cols_train[x]
            canvas.dot(band, x, py(vmin))
            y = py(vmean)
            canvas.segment(line, *(prev or (x, y)), x, y)
            prev = (x, y)
        vlayer = canvas.layer(self.VAL)
        cols_val = columns(val)
        prev = None
        for x in sorted(cols_val):
            y = py(cols_val[x][1])
            canvas.segment(vlayer, *(prev or (x, y)), x, y)
            for dx in (-1, 0, 1):  # a visible marker at each evaluation
                canvas.dot(vlayer, x + dx, y)
            canvas.vline(vlayer, x, y - 1, y + 1)
            prev = (x, y)

        label_rows = {0: labels[0], (rows - 1) // 2: labels[1], rows - 1: labels[2]}
        for i, text in enumerate(canvas.lines()):
            label = label_rows.get(i, "")
            row = Text(no_wrap=True)
            row.append(label.rjust(gutter - 2) + " ┤", style="dim")
            row.append_text(text)
            yield row
        left, right = f"{x0:,.0f}", f"step {x1:,.0f}"
        axis = " " * gutter + left + " " * max(1, cols - len(left) - len(right)) + right
        yield Text(axis[:width], style="dim", no_wrap=True)


# --------------------------------------------------------------------------------------
# Small formatting helpers
# --------------------------------------------------------------------------------------


def fmt_gib(n_bytes: float | None) -> str:
    return "–" if n_bytes is None else f"{n_bytes / GiB:.1f}"


def meter(fraction: float | None, width: int = 12) -> Text:
    """``███████░░░░░`` coloured green / yellow (>= 75%) / red (>= 90%)."""
    if fraction is None or not math.isfinite(fraction):
        return Text.assemble(("░" * width, "dim"))
    fraction = min(max(fraction, 0.0), 1.0)
    full = int(round(fraction * width))
    style = "red" if fraction >= 0.9 else "yellow" if fraction >= 0.75 else "green"
    return Text.assemble(("█" * full, style), ("░" * (width - full), "dim"))


def _summarise_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_summarise_value(v) for v in value[:4]) + ("…" if len(value) > 4 else "")
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_summarise_value(v)}" for k, v in list(value.items())[:3]) + (
            "…}" if len(value) > 3 else "}")
    return str(value)


def summarise_event(event: Event, skip: Iterable[str] = ()) -> str:
    """``key=value`` pairs of an event's fields (``message`` alone for notices and other
    :data:`~lmkit.events.MESSAGE_EVENTS`), short."""
    if isinstance(event, MESSAGE_EVENTS):
        return event.message
    skipped = {"time", "step", "epoch", "tokens", "elapsed_s", *skip}
    short, long = [], []
    for f in fields(event):
        if f.name in skipped:
            continue
        value = getattr(event, f.name)
        if value is None or value == [] or value == {}:
            continue
        part = f"{f.name}={_summarise_value(value)}"
        (long if len(part) > 32 else short).append(part)  # paths and dicts last
    return " ".join(short + long)


# --------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------


@dataclass
class KindRow:
    kind: str
    key: str
    count: int
    step: int | None
    summary: str
    time: float


# the stream itself, shown elsewhere (SVD analyses: one row per layer in the SVD panel)
NOT_BY_KIND = ("step", "data_progress", "run_started", "svd_analysis")


class Dashboard:
    """The live dashboard; call it with each event (an observer).

    Args:
        console: where to draw (a terminal). Tests pass ``Console(record=True, width=…,
            height=…)`` with ``live=False`` and print the dashboard itself.
        refresh_per_second: the most redraws per second (redraws happen only when an
            event or a system sample changed something, and once a second for the clocks).
        sample_interval: seconds between NVML/host samples; ``sampler=False`` starts no
            sampler thread (feed :meth:`update_system` yourself).
        live: start a Rich ``Live`` display at the first event.
        max_events: lines kept for the events panel.

    Thread safety: events arrive on the training thread, samples on the sampler thread,
    renders on the refresh thread; all state is behind one lock, held briefly.
    """

    def __init__(self, console: Console | None = None, *, refresh_per_second: float = 2.0,
                 sample_interval: float = 1.0, sampler: bool = True, live: bool = True, max_events: int = 200,
                 chart_buckets: int = 512):
        self.console = console or Console()
        self.refresh_per_second = refresh_per_second
        self.sample_interval = sample_interval
        self.use_sampler = sampler
        self.use_live = live
        self._lock = threading.RLock()
        self.started: RunStarted | None = None
        self.data: DataProgress | None = None
        self.last_step: StepMetrics | None = None
        self.last_val: EvalResult | None = None
        self.best_val: EvalResult | None = None
        self.finished: RunFinished | None = None
        self.train = BucketSeries(chart_buckets)
        self.val = BucketSeries(chart_buckets)
        self.events: deque[tuple[float, int | None, str, str]] = deque(maxlen=max_events)
        self.kinds: dict[tuple[str, str], KindRow] = {}
        self.system: SystemSample | None = None
        self.svd = SVDState()  # the SVD panel's rows; the panel shows once an analysis arrived
        self.t_start = time.time()
        self.t_last_step = time.time()
        self.renders = 0  # frames drawn
        self.render_seconds = 0.0  # wall time the refresh thread spent drawing them
        self.render_cpu_seconds = 0.0  # CPU time it spent (time.thread_time)
        self._dirty = True
        self._chart_cache: dict = {}
        self._live = None
        self._sampler: Sampler | None = None
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self._steps = StepTimeWatch()  # one warning when steps suddenly slow down

    # ------------------------------------------------------------------ events

    def __call__(self, event: Event) -> None:
        with self._lock:
            for e in self._steps.expand(event):
                self._handle(e)
            self._dirty = True
        if isinstance(event, RunStarted) and self._sampler is None and self.use_sampler and not self._closed:
            self._start_sampler(event.device.startswith("cuda"))
        if self.use_live and not self._closed:
            if self._live is None:
                self._start_live()
            if isinstance(event, DataReady):
                self.console.print(data_line(event), highlight=False, style="dim")
        if isinstance(event, RunFinished):
            self.close()

    def _note(self, step: int | None, style: str, text: str) -> None:
        self.events.append((time.time(), step, style, text))

    def _handle(self, e: Event) -> None:
        if e.kind not in NOT_BY_KIND:
            group = type(e).group_by
            key = str(getattr(e, group, "")) if group else ""
            row = self.kinds.get((e.kind, key))
            step = getattr(e, "step", None)
            summary = (f"→ {e.to_mode}{f' r={e.r}' if e.to_mode == 'lowrank' else ''} {e.reason}"
                       if isinstance(e, SVDModeSwitch) else summarise_event(e, skip=(group,) if group else ()))
            if row is None:
                self.kinds[(e.kind, key)] = KindRow(e.kind, key, 1, step, summary, e.time)
            else:
                row.count, row.step, row.summary, row.time = row.count + 1, step, summary, e.time
        if isinstance(e, DataProgress):
            self.data = e
        elif isinstance(e, DataReady):
            self.data = None
            self._note(None, "dim", data_line(e))
        elif isinstance(e, RunStarted):
            self.started = e
            self.t_start = time.time()
            self.t_last_step = self.t_start
        elif isinstance(e, StepMetrics):
            prev = self.last_step
            self.last_step = e
            self.t_last_step = time.time()
            self.train.add(e.step, e.loss)
            if (prev is not None and e.grad_scale is not None and prev.grad_scale is not None
                    and e.grad_scale < prev.grad_scale):
                self._note(e.step, "red", f"fp16 overflow: loss scale {prev.grad_scale:g} → {e.grad_scale:g} "
                                          f"(overflowing steps skipped since step {prev.step})")
        elif isinstance(e, EvalResult):
            self.last_val = e
            self.val.add(e.step, e.loss)
            if e.is_best or (self.best_val is not None and e.loss < self.best_val.loss and e.step > 0):
                self.best_val = e
            metrics = " ".join(fmt_metric(k, v) for k, v in e.metrics.items())
            self._note(e.step, "cyan", f"eval {e.split} {e.loss:.4f}{' (best)' if e.is_best else ''} {metrics}")
        elif isinstance(e, CheckpointSaved):
            self._note(e.step, "green", f"saved {', '.join(e.tags)} ({e.seconds:.2f}s)")
        elif isinstance(e, NaNSkipped):
            self._note(e.step, "bold red", f"{e.level}: {e.message}")
        elif isinstance(e, StepTimeJump):
            self._note(e.step, "yellow", f"{e.level}: {e.message}")
        elif isinstance(e, Notice):
            style = {"warning": "yellow", "error": "bold red"}.get(e.level, "dim")
            self._note(None, style, f"{e.level}: {e.message}")
        elif isinstance(e, SVDAnalysis):
            self.svd.analysis(e)  # the SVD panel shows it; the switches reach the events panel
        elif isinstance(e, SVDModeSwitch):
            self.svd.switch(e)
            self._note(e.step, "bold magenta", _Wrap(e.message.removeprefix(f"step {e.step}: ")))
        elif isinstance(e, Resumed):
            moved = (f"; {e.dropped_metrics} later log record(s) moved to {e.superseded_metrics}"
                     if e.superseded_metrics else "")
            self._note(e.step, "magenta", f"resumed from {e.checkpoint}{moved}")
        elif isinstance(e, RunFinished):
            self.finished = e
            style = "bold green" if e.status == "completed" else "bold red"
            self._note(e.summary.get("steps"), style, f"run {e.status}")
        else:
            self._note(getattr(e, "step", None), "", f"{e.kind}: {summarise_event(e)}")

    def update_system(self, sample: SystemSample) -> None:
        """Take a system sample (called by the sampler thread, or by tests)."""
        with self._lock:
            self.system = sample
            self._dirty = True

    # ------------------------------------------------------------------ live display

    def _start_live(self) -> None:
        from rich.live import Live

        self._live = Live(self, console=self.console, auto_refresh=False, transient=False,
                          redirect_stdout=True, redirect_stderr=True)
        self._live.start(refresh=True)
        self._ticker = threading.Thread(target=self._tick, name="lmkit-dashboard", daemon=True)
        self._ticker.start()

    def _start_sampler(self, gpus: bool) -> None:
        self._sampler = Sampler(self.update_system, interval=self.sample_interval, gpus=gpus).start()

    def _tick(self) -> None:
        period = 1.0 / max(0.1, self.refresh_per_second)
        last = 0.0
        while not self._stop.wait(period):
            now = time.monotonic()
            if self._dirty or now - last >= 1.0:
                try:
                    live = self._live
                    if live is not None:
                        cpu = time.thread_time()
                        live.refresh()
                        self.render_seconds += time.monotonic() - now
                        self.render_cpu_seconds += time.thread_time() - cpu
                    last = now
                except Exception:  # noqa: BLE001 - a drawing problem must not stop training
                    pass

    def close(self) -> None:
        """Stop the sampler, the refresh thread and the Live display (one last frame), show
        the cursor again and print the summary below. Safe to call twice, and from
        ``finally`` after an error."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2.0)
        if self._sampler is not None:
            self._sampler.stop()
        live, self._live = self._live, None
        if live is not None:
            try:
                live.stop()
            finally:
                self.console.show_cursor(True)
            if self.finished is not None:
                self.console.print(self.summary_table())

    def summary_table(self) -> Table:
        e = self.finished
        assert e is not None
        table = Table(title=f"run {e.summary.get('name', '')}: {e.status}", show_header=False, title_justify="left")
        for line in finished_lines(e):
            table.add_row(line)
        return table

    # ------------------------------------------------------------------ rendering

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        height = options.height or max(10, (options.max_height or console.height) - 1)
        width = options.max_width or console.width
        with self._lock:
            self._dirty = False
            self.renders += 1
            if self.started is None:
                view: RenderableType = self._preparing()
                height = None  # one line, not the whole screen
            else:
                view = self.layout(height)
        if height is None:
            yield view
        else:
            yield from console.render(view, options.update(width=width, height=height))

    def _preparing(self) -> RenderableType:
        d = self.data
        if d is None:
            return Text("preparing…", style="dim")
        done = f"{d.completed:,}" + (f"/{d.total:,}" if d.total else "") + f" {d.unit}"
        grid = Table.grid(padding=(0, 1))
        grid.add_row(Text("data", style="bold"), Text(d.stage),
                     ProgressBar(total=d.total or None, completed=d.completed, width=30), Text(done, style="dim"))
        return grid

    def layout(self, height: int | None = None) -> Layout:
        """The whole dashboard for a screen of ``height`` rows (call with the lock held, or
        on a quiescent dashboard): header; loss chart beside stats + system; the SVD panel
        (:mod:`lmkit.monitor.svd_panel`) once an SVD analysis arrived; events beside events
        by kind."""
        system, system_rows = self.system_panel()
        top = 14 + system_rows + 2
        svd = self.svd.height_wanted()  # 0 until the first SVD analysis
        if height is not None:
            # the SVD panel gets up to 5 rows first, then the top its rows (the bottom keeps 6),
            # then the SVD panel the rest it wants (bottom 6 again), the bottom what is left
            least = min(svd, 5)
            top = max(8, min(top, height - 3 - 6 - least))  # leave the bottom row at least 6 lines
            svd = min(max(least, min(svd, height - 3 - top - 6)), max(0, height - 3 - top - 4))
        root = Layout(name="root")
        rows = [Layout(self.header(), name="header", size=3), Layout(name="top", size=top)]
        if svd >= 4:
            rows.append(Layout(self.svd.panel(), name="svd", size=svd))
        root.split_column(*rows, Layout(name="bottom", minimum_size=4))
        root["top"].split_row(Layout(self.chart_panel(), name="chart", ratio=3),
                              Layout(name="right", ratio=2, minimum_size=40))
        # a short top row crops the stats panel and drops the system one (a fixed size past the
        # row, or a region of no rows, would draw over the rows below)
        right = [Layout(self.stats_panel(), name="stats", size=min(14, top))]
        if top - 14 >= 3:
            right.append(Layout(system, name="system"))
        root["top"]["right"].split_column(*right)
        root["bottom"].split_row(Layout(self.events_panel(), name="events", ratio=1),
                                 Layout(self.kinds_panel(), name="kinds", ratio=1))
        return root

    # ---------------------------------------------------------------- panels

    def header(self) -> Panel:
        s = self.started
        assert s is not None
        text = Text()
        text.append("lmkit ", style="bold magenta")
        text.append(s.name, style="bold")
        text.append(f"  {s.preset or 'custom'}", style="cyan")
        text.append(f" · {s.model_type} {s.n_params:,} params", style="")
        text.append(f" · {s.device_name}", style="green")
        text.append(f" · {s.precision}")
        text.append(f" · compile {'on' if s.compile else 'off'}")
        if s.start_step:
            text.append(f" · resumed at step {s.start_step:,}", style="magenta")
        status, style = ("training", "bold green")
        if self.finished is not None:
            status = self.finished.status
            style = "bold green" if status == "completed" else "bold red"
        return Panel(text, title=Text(status, style=style), title_align="right", border_style="magenta")

    def chart_panel(self) -> Panel:
        s = self.started
        chart = LossChart(self.train.copy(), self.val.copy(), max_steps=s.max_steps if s else None,
                          start_step=s.start_step if s else 0, cache=self._chart_cache)
        title = Text.assemble(("loss  ", "bold"), ("━ train", LossChart.TRAIN), (" (mean, ", "dim"),
                              ("⠄ min", LossChart.BAND), (" per bucket)  ", "dim"), ("◆ val", LossChart.VAL))
        width = self.train.width
        subtitle = f"{self.train.count:,} logged steps · {width} per bucket" if self.train.count else None
        if self.train.non_finite:
            subtitle = f"{subtitle} · {self.train.non_finite} non-finite"
        return Panel(chart, title=title, title_align="left", subtitle=subtitle, subtitle_align="right",
                     border_style="cyan")

    def stats_panel(self) -> Panel:
        s, m = self.started, self.last_step
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column(no_wrap=True)
        max_steps = (m.max_steps if m else s.max_steps) if s else 0
        step = m.step if m else (s.start_step if s else 0)
        frac = step / max_steps if max_steps else 0.0
        grid.add_row("step", Text.assemble((f"{step:,}", "bold"), f" / {max_steps:,}  ", (f"{100 * frac:.1f}%", "dim")))
        grid.add_row("", ProgressBar(total=max(1, max_steps), completed=step, width=24))
        if m is None:
            grid.add_row("", Text("waiting for the first logged step…", style="dim"))
            return Panel(grid, title="[bold]stats", title_align="left", border_style="green")
        grid.add_row("epoch", f"{m.epoch:.2f}")
        grid.add_row("tokens", fmt_count(m.tokens))
        grid.add_row("lr", f"{m.lr:.3e}")
        loss = Text(f"{m.loss:.4f}", style="bold cyan")
        if m.grad_norm is not None:
            loss.append(f"  ‖g‖ {m.grad_norm:.3g}", style="dim")
        if m.nan_skips:
            loss.append(f"  {m.nan_skips} NaN skip{'s' if m.nan_skips > 1 else ''}", style="bold red")
        grid.add_row("loss", loss)
        if self.last_val is not None:
            v = self.last_val
            val = Text(f"{v.loss:.4f}", style="bold yellow")
            val.append(f" @{v.step:,}", style="dim")
            if self.best_val is not None:
                val.append(f"  best {self.best_val.loss:.4f} @{self.best_val.step:,}", style="green")
            grid.add_row("val loss", val)
        else:
            grid.add_row("val loss", Text("–", style="dim"))
        grid.add_row("tok/s", fmt_count(m.tok_per_s))
        grid.add_row("MFU", f"{100 * m.mfu:.1f}%" if m.mfu is not None else Text("n/a (peak unknown)", style="dim"))
        grid.add_row("step time", f"{1000 * m.step_time_s:.1f} ms")
        elapsed = m.elapsed_s + (0.0 if self.finished else time.time() - self.t_last_step)
        eta = (m.max_steps - m.step) * m.step_time_s
        grid.add_row("elapsed", fmt_duration(elapsed))
        grid.add_row("ETA", "done" if m.step >= m.max_steps else fmt_duration(eta))
        return Panel(grid, title="[bold]stats", title_align="left", border_style="green")

    def system_panel(self) -> tuple[Panel, int]:
        """The GPU panel on CUDA (or wherever NVML sees GPUs), else the host panel; and its
        number of content rows."""
        s = self.started
        on_cuda = s is not None and s.device.startswith("cuda")
        sample = self.system
        if on_cuda or (sample is not None and sample.gpus):
            return self.gpu_panel()
        return self.host_panel()

    def gpu_panel(self) -> tuple[Panel, int]:
        sample, s, m = self.system, self.started, self.last_step
        grid = Table.grid(padding=(0, 1), expand=True)
        grid.add_column(no_wrap=True, style="dim")
        grid.add_column(no_wrap=True, overflow="ellipsis", ratio=1)
        gpus: list[GpuStat] = sample.gpus if sample is not None else []
        mine = s.device_uuid if s is not None else None
        compact = len(gpus) > 4
        for g in gpus:
            is_mine = mine is not None and g.uuid == mine
            util = (g.util_percent / 100) if g.util_percent is not None else None
            mem = g.mem_used_bytes / g.mem_total_bytes if g.mem_total_bytes else None
            facts = Text(f"{g.temperature_c:.0f}°C" if g.temperature_c is not None else "–°C")
            if g.power_w is not None:
                facts.append(f" {g.power_w:.0f}" + (f"/{g.power_limit_w:.0f}" if g.power_limit_w else "") + " W")
            label = Text(f"{'▶' if is_mine else ' '}GPU{g.index}", style="bold" if is_mine else "dim")
            util_t = meter(util, 10) + Text(f" {g.util_percent:>3.0f}%" if g.util_percent is not None else "  –")
            mem_t = meter(mem, 10) + Text(f" {fmt_gib(g.mem_used_bytes)}/{fmt_gib(g.mem_total_bytes)} GiB")
            if compact:
                grid.add_row(label, util_t + Text("  mem ") + mem_t)
            else:
                grid.add_row(label, Text.assemble((g.name.replace("NVIDIA ", ""), "bold" if is_mine else ""), "  ",
                                                  facts))
                grid.add_row("  util", util_t)
                grid.add_row("  mem", mem_t)
        if not gpus:
            why = sample.nvml_error if sample is not None else None
            grid.add_row("NVML", Text(f"no GPU data{f' ({why})' if why else ''}", style="dim"))
        if m is not None and m.gpu_mem_gb is not None:
            alloc = f"{m.gpu_alloc_gb:.2f}" if m.gpu_alloc_gb is not None else "–"
            reserved = f"{m.gpu_reserved_gb:.2f}" if m.gpu_reserved_gb is not None else "–"
            grid.add_row("torch", f"alloc {alloc} · reserved {reserved} · peak {m.gpu_mem_gb:.2f} GiB")
        if m is not None and m.grad_scale is not None:
            grid.add_row("fp16", f"loss scale {m.grad_scale:g}")
        host = sample.host if sample is not None else None
        if host is not None:
            grid.add_row("host", f"RSS {fmt_gib(host.rss_bytes)} GiB · CPU {host.cpu_percent:.0f}% · "
                                 f"RAM {fmt_gib(host.mem_used_bytes)}/{fmt_gib(host.mem_total_bytes)} GiB")
        title = f"[bold]GPU[/] [dim]({s.device if s else ''})"
        return Panel(grid, title=title, title_align="left", border_style="blue"), grid.row_count

    def host_panel(self) -> tuple[Panel, int]:
        sample, s = self.system, self.started
        host: HostStat | None = sample.host if sample is not None else None
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column(no_wrap=True)
        if host is None:
            grid.add_row("", Text("sampling…", style="dim"))
        else:
            grid.add_row("process RSS", f"{fmt_gib(host.rss_bytes)} GiB")
            cpu = host.cpu_percent / (100 * host.n_cpus)
            grid.add_row("CPU", meter(cpu) + Text(f" {host.cpu_percent:.0f}% of {host.n_cpus} cores"))
            mem = host.mem_used_bytes / host.mem_total_bytes if host.mem_total_bytes else None
            grid.add_row("RAM", meter(mem) + Text(f" {fmt_gib(host.mem_used_bytes)}/{fmt_gib(host.mem_total_bytes)} GiB"))
            grid.add_row("threads", str(host.threads))
        title = f"[bold]host[/] [dim]({s.device_name if s else ''})"
        return Panel(grid, title=title, title_align="left", border_style="blue"), max(4, grid.row_count)

    def events_panel(self) -> Panel:
        lines = []
        for t, step, style, text in self.events:
            lines.append((Text.assemble((time.strftime("%H:%M:%S ", time.localtime(t)), "dim"),
                                        (f"{step:>7,} " if step is not None else " " * 8, "dim"), (text, style)),
                          isinstance(text, _Wrap)))
        body = _tail(lines)
        return Panel(body, title="[bold]events", title_align="left", border_style="yellow")

    def kinds_panel(self) -> Panel:
        table = Table(box=None, padding=(0, 1), show_edge=False, expand=True)
        table.add_column("kind", no_wrap=True, style="bold", min_width=6)
        table.add_column("key", no_wrap=True, max_width=24, overflow="ellipsis")
        table.add_column("n", justify="right", no_wrap=True, min_width=3)
        table.add_column("step", justify="right", no_wrap=True, style="dim", min_width=5)
        table.add_column("last", no_wrap=True, overflow="ellipsis", ratio=1)
        # dotted keys (layers) lose their common leading components: room for "last"
        short = shorten_layers([r.key for r in self.kinds.values() if "." in r.key], 14)
        for row in sorted(self.kinds.values(), key=lambda r: -r.time):
            table.add_row(row.kind, short.get(row.key, row.key), str(row.count), f"{row.step:,}" if row.step is not None else "",
                          row.summary)
        return Panel(table, title="[bold]events by kind", title_align="left", border_style="yellow",
                     subtitle="[dim]latest per kind", subtitle_align="right")


class _Wrap(str):
    """Events-panel text that wraps onto more lines instead of being cut (an SVD mode
    switch: its layer, direction and reason all matter). Equal to the plain string."""


class _Tail:
    """The last lines that fit the height Rich gives (newest at the bottom); a line is cut
    at the width, or wrapped where its flag says so."""

    def __init__(self, lines: list[tuple[Text, bool]]):
        self.lines = lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        height = options.height or len(self.lines)
        out: list[Text] = []
        for text, wrap in self.lines[-height:] if height else []:
            if wrap:
                out.extend(text.wrap(console, options.max_width, overflow="ellipsis"))
                continue
            text = text.copy()
            text.no_wrap = True
            text.overflow = "ellipsis"
            text.truncate(options.max_width, overflow="ellipsis")
            out.append(text)
        yield from out[-height:] if height else []


def _tail(lines: list[tuple[Text, bool]]) -> RenderableType:
    return _Tail(lines) if lines else Text("no events yet", style="dim")


__all__ = ["BrailleCanvas", "BucketSeries", "Dashboard", "LossChart", "meter", "summarise_event"]
