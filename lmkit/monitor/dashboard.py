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
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.layout import Layout
from rich.markup import escape
from rich.panel import Panel
from rich.progress_bar import ProgressBar
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
from lmkit.monitor.chart import BrailleCanvas, BucketSeries, LossChart
from lmkit.monitor.console import (
    DataRate,
    data_line,
    data_tokens_text,
    fmt_count,
    fmt_duration,
    fmt_metric,
    message_warnings,
    per_device_label,
    processes_text,
    summary_table,
)
from lmkit.monitor.history import RunFacts, read_run_facts, warmup_warning
from lmkit.monitor.nvml import GpuStat
from lmkit.monitor.sampler import HostStat, Sampler, SystemSample
from lmkit.monitor.steptime import StepTimeWatch
from lmkit.monitor.svd_panel import SVDState, shorten_layers

GiB = 2**30

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
        self.facts = RunFacts()  # read from the run directory at RunStarted (warmup, earlier losses)
        self.warnings: dict[str, int] = {}  # every warning of the run, repeated in the summary
        self.data_rate = DataRate()
        self.t_start = time.time()
        self.t_last_step = time.time()
        self.renders = 0  # frames drawn
        self.render_seconds = 0.0  # wall time the refresh thread spent drawing them
        self.render_cpu_seconds = 0.0  # CPU time it spent (time.thread_time)
        self._dirty = True
        self._chart_cache: dict = {}
        self._live = None
        self._tty: tuple[int, list] | None = None  # (fd, termios attributes) while the echo is off
        self._sampler: Sampler | None = None
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self._steps = StepTimeWatch()  # one warning when steps suddenly slow down

    # ------------------------------------------------------------------ events

    def __call__(self, event: Event) -> None:
        # files are read before the lock is taken: the refresh thread keeps drawing meanwhile
        facts = read_run_facts(event.run_dir, event.start_step) if isinstance(event, RunStarted) else None
        with self._lock:
            if facts is not None:
                self._load_facts(facts)
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

    def _load_facts(self, facts: RunFacts) -> None:
        """A resumed run's history (losses logged before the resume step) into the chart, and
        its last and best evaluation into the stats."""
        self.facts = facts
        for step, loss in facts.train:
            self.train.add(step, loss)
        for record in facts.val:
            try:
                e = EvalResult(step=int(record["step"]), epoch=float(record.get("epoch", 0.0)),
                               tokens=int(record.get("tokens", 0)), split=str(record.get("split", "val")),
                               loss=float(record["loss"]), metrics={}, is_best=bool(record.get("is_best")),
                               elapsed_s=float(record.get("elapsed_s", 0.0)), time=float(record.get("time", 0.0)))
            except (KeyError, TypeError, ValueError):
                continue
            self.val.add(e.step, e.loss)
            self.last_val = e
            if e.is_best or (self.best_val is not None and e.loss < self.best_val.loss and e.step > 0):
                self.best_val = e

    def _handle(self, e: Event) -> None:
        warning = message_warnings(e)
        if warning is not None:
            self.warnings[warning] = self.warnings.get(warning, 0) + 1
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
            self.data_rate.update(e)
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
            self._note(e.step, "bold magenta", e.message.removeprefix(f"step {e.step}: "))
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

        self._echo_off()
        self._live = Live(self, console=self.console, auto_refresh=False, transient=False,
                          redirect_stdout=True, redirect_stderr=True)
        self._live.start(refresh=True)
        self._ticker = threading.Thread(target=self._tick, name="lmkit-dashboard", daemon=True)
        self._ticker.start()

    def _echo_off(self) -> None:
        """Keep Ctrl-C from breaking the frame while the dashboard is live. By default the
        terminal (1) discards the output not yet shown when Ctrl-C arrives (the rest of a
        frame, with its cursor moves), and (2) echoes ``^C`` after the frame's last,
        full-width row, which wraps and scrolls the screen: either way the next frame is drawn
        off by some rows and an old frame's top border (``╭── training ─╮``) stays above the
        ``interrupted`` one. So: ``NOFLSH`` on (keep the output), ``ECHO`` off (no ``^C``,
        no typed keys in the frame). Ctrl-C still interrupts; :meth:`close` restores the
        terminal's settings."""
        try:
            import termios

            fd = self.console.file.fileno()
            if not os.isatty(fd):
                return
            attrs = termios.tcgetattr(fd)
            quiet = list(attrs)
            quiet[3] = (quiet[3] & ~termios.ECHO) | termios.NOFLSH
            termios.tcsetattr(fd, termios.TCSADRAIN, quiet)
            self._tty = (fd, attrs)
        except Exception:  # noqa: BLE001 - no termios (Windows), no file descriptor, not a terminal
            self._tty = None

    def _echo_restore(self) -> None:
        tty, self._tty = self._tty, None
        if tty is not None:
            try:
                import termios

                termios.tcsetattr(tty[0], termios.TCSADRAIN, tty[1])
            except Exception:  # noqa: BLE001 - the terminal went away
                pass

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
                self._echo_restore()
            if self.finished is not None:
                self.console.print(self.summary_table())

    def summary_table(self) -> Table:
        """The end-of-run table, with every warning of the run repeated below the results."""
        assert self.finished is not None
        return summary_table(self.finished, self.warnings)

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
        """One line while the data is prepared: stage, a bar (pulsing when the total is
        unknown), documents done, tokens written and tokens/s."""
        d = self.data
        if d is None:
            return Text("preparing…", style="dim")
        done = f"{d.completed:,}" + (f"/{d.total:,}" if d.total else "") + (f" {d.unit}" if d.unit else "")
        tokens = data_tokens_text(d, self.data_rate.rate)
        grid = Table.grid(padding=(0, 1))
        grid.add_row(Text("data", style="bold"), Text(d.stage),
                     ProgressBar(total=d.total or None, completed=d.completed, width=30), Text(done, style="dim"),
                     Text(tokens, style="cyan"))
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
        if processes_text(s):
            text.append(f" · {processes_text(s)}", style="bold green")
        text.append(f" · {s.precision}")
        text.append(f" · compile {'on' if s.compile else 'off'}")
        if s.start_step:
            text.append(f" · resumed at step {s.start_step:,}", style="magenta")
        status, style = ("training", "bold green")
        if self.finished is not None:
            status = self.finished.status
            style = "bold green" if status == "completed" else "bold red"
        # a warmup of half the run or more, on the border: seen whatever the width
        max_steps = self.last_step.max_steps if self.last_step is not None else s.max_steps
        warmup = warmup_warning(self.facts.warmup_steps, max_steps)
        subtitle = Text(f"⚠ {warmup}", style="bold yellow") if warmup else None
        return Panel(text, title=Text(status, style=style), title_align="right", border_style="magenta",
                     subtitle=subtitle, subtitle_align="left")

    def chart_panel(self) -> Panel:
        s = self.started
        chart = LossChart(self.train.copy(), self.val.copy(), max_steps=s.max_steps if s else None,
                          start_step=s.start_step if s else 0, cache=self._chart_cache)
        title = LossChart.legend()
        width = self.train.width
        subtitle = f"{self.train.count:,} logged steps · {width} per bucket" if self.train.count else None
        if self.train.non_finite:
            subtitle = f"{subtitle} · {self.train.non_finite} non-finite"
        if subtitle and self.facts.train:
            subtitle = f"steps ≤ {s.start_step:,} from metrics.jsonl · {subtitle}"
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
        bar = ProgressBar(total=max(1, max_steps), completed=step, width=24)
        if m is None:
            grid.add_row("", bar)
            grid.add_row("", Text("waiting for the first logged step…", style="dim"))
            return Panel(grid, title="[bold]stats", title_align="left", border_style="green")
        bar_row = Table.grid(padding=(0, 1))
        bar_row.add_row(bar, Text(f"epoch {m.epoch:.2f}", style="dim"))
        grid.add_row("", bar_row)
        # tokens seen count loss targets; a batch holds tokens_per_step positions (padding included)
        grid.add_row("tokens", Text.assemble(fmt_count(m.tokens), (" targets", "dim")))
        positions = s.tokens_per_step if s else 0
        per_step = m.tokens / m.step if m.step else 0.0
        if positions and per_step and abs(per_step - positions) > 0.01 * positions:
            grid.add_row("per step", Text.assemble(f"~{fmt_count(per_step)}", (" targets of ", "dim"),
                                                   fmt_count(positions), (" positions", "dim"), overflow="ellipsis"))
        else:
            grid.add_row("per step", Text.assemble(fmt_count(positions or per_step), (" targets", "dim")))
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
        if s is not None and s.world_size > 1:  # tok_per_s is global: every rank's targets
            grid.add_row("tok/s", Text.assemble(fmt_count(m.tok_per_s), (" all · ", "dim"),
                                                fmt_count(m.tok_per_s / s.world_size),
                                                (f" per {per_device_label(s)}", "dim"), overflow="ellipsis"))
        else:
            grid.add_row("tok/s", fmt_count(m.tok_per_s))
        grid.add_row("MFU", f"{100 * m.mfu:.1f}%" if m.mfu is not None else Text("n/a (peak unknown)", style="dim"))
        grid.add_row("step time", f"{1000 * m.step_time_s:.1f} ms")
        elapsed = m.elapsed_s + (0.0 if self.finished else time.time() - self.t_last_step)
        eta = (m.max_steps - m.step) * m.step_time_s
        if s is not None and s.start_step:  # the run's training time in all sessions, and this one's
            session = (self.t_last_step if self.finished else time.time()) - self.t_start
            grid.add_row("elapsed", Text.assemble(fmt_duration(elapsed), (" in all · ", "dim"), fmt_duration(session),
                                                  (" since resume", "dim")))
        else:
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
        mine = self.run_gpu_uuids()
        compact = len(gpus) > 4
        for g in gpus:
            is_mine = g.uuid is not None and g.uuid in mine
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
        where = escape(s.device) if s else ""
        if s is not None and s.world_size > 1:
            used = sum(1 for g in gpus if g.uuid is not None and g.uuid in mine)
            where = f"{used} used here · {processes_text(s)}" if gpus else processes_text(s)
        title = f"[bold]GPU[/] [dim]({where})"
        return Panel(grid, title=title, title_align="left", border_style="blue"), grid.row_count

    def run_gpu_uuids(self) -> frozenset[str]:
        """The UUIDs of the GPUs this run uses on this node (marked ``▶`` in the GPU panel):
        :attr:`RunStarted.local_device_uuids <lmkit.events.RunStarted>` (every local rank's
        GPU under torchrun), else the one ``device_uuid``; empty before the run starts."""
        s = self.started
        if s is None:
            return frozenset()
        if s.local_device_uuids:
            return frozenset(s.local_device_uuids)
        return frozenset({s.device_uuid}) if s.device_uuid else frozenset()

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
        title = f"[bold]host[/] [dim]({escape(s.device_name) if s else ''})"
        return Panel(grid, title=title, title_align="left", border_style="blue"), max(4, grid.row_count)

    def events_panel(self) -> Panel:
        lines = []
        for t, step, style, text in self.events:
            prefix = Text.assemble((time.strftime("%H:%M:%S ", time.localtime(t)), "dim"),
                                   (f"{step:>7,} " if step is not None else " " * 8, "dim"))
            lines.append((prefix, Text(text, style=style)))
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
            table.add_row(Text(row.kind), Text(short.get(row.key, row.key)), str(row.count),
                          f"{row.step:,}" if row.step is not None else "", Text(row.summary))
        return Panel(table, title="[bold]events by kind", title_align="left", border_style="yellow",
                     subtitle="[dim]latest per kind", subtitle_align="right")


class _Tail:
    """The newest events that fit the height Rich gives (newest at the bottom). Each event is
    its prefix (time, step) and its text, wrapped at the width with the continuation lines
    indented under the text, so no advice at the end of a long warning is cut off; only the
    oldest event shown may lose its first lines when the panel is full."""

    def __init__(self, lines: list[tuple[Text, Text]]):
        self.lines = lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        height = options.height or len(self.lines)
        width = options.max_width
        out: list[Text] = []
        for prefix, text in reversed(self.lines):  # newest first, until the panel is full
            indent = prefix.cell_len if width - prefix.cell_len >= 20 else 0
            body = text.wrap(console, max(1, width - indent), overflow="fold")
            rows = []
            for i, line in enumerate(body):
                row = prefix.copy() if i == 0 and indent else Text(" " * indent)
                if i == 0 and not indent:
                    rows.append(prefix.copy())
                row.append_text(line)
                rows.append(row)
            out[:0] = rows
            if len(out) >= height:
                break
        yield from out[-height:] if height else []


def _tail(lines: list[tuple[Text, Text]]) -> RenderableType:
    return _Tail(lines) if lines else Text("no events yet", style="dim")


__all__ = ["BrailleCanvas", "BucketSeries", "Dashboard", "LossChart", "meter", "summarise_event"]
