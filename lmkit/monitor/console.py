"""Terminal renderers of training events.

:class:`RichProgress` -- on a terminal: a Rich progress line (step, loss, lr, tok/s,
ETA) with evaluations, checkpoints, notices and SVD mode switches printed above it.
:class:`PlainLog` -- off a terminal (CI, SLURM logs, ``| tee``) or with ``--no-tui``:
one plain line per log interval, evaluation and checkpoint (and per adaptive-SVD analysis
of a layer, and switch).
:class:`WarningsOnly` -- ranks other than 0 under torchrun: warnings only, on stderr.
The full-screen live dashboard is :class:`lmkit.monitor.dashboard.Dashboard`.

Both only read events; the training loop never prints. Both (and the dashboard) flag a sudden
step-time jump once, through :class:`lmkit.monitor.steptime.StepTimeWatch`.
"""

from __future__ import annotations

import math
import sys
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table

from lmkit.events import (
    MESSAGE_EVENTS,
    CheckpointSaved,
    DataProgress,
    DataReady,
    EvalResult,
    Event,
    RunFinished,
    RunStarted,
    StepMetrics,
    SVDAnalysis,
    SVDModeSwitch,
)
from lmkit.monitor.steptime import StepTimeWatch


def fmt_count(n: float) -> str:
    """``1234567 -> '1.23M'``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 9.95:
        return f"{seconds:.1f}s"  # short runs: "0.4s", not "0s"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def fmt_metric(name: str, value: float) -> str:
    if name.startswith("acc"):
        return f"{name} {100 * value:.1f}%"
    if name.endswith("_gap"):
        return f"{name} {100 * value:+.1f}pp"
    if name == "ppl":
        return f"ppl {value:.2f}"
    return f"{name} {value:.4g}"


def step_line(e: StepMetrics) -> str:
    parts = [
        f"step {e.step}/{e.max_steps}",
        f"ep {e.epoch:.2f}",
        f"loss {e.loss:.4f}",
        f"lr {e.lr:.2e}",
        f"{fmt_count(e.tok_per_s)} tok/s",
        f"{1000 * e.step_time_s:.0f} ms/step",
    ]
    if e.mfu is not None:
        parts.append(f"mfu {100 * e.mfu:.1f}%")
    if e.gpu_mem_gb is not None:
        parts.append(f"mem {e.gpu_mem_gb:.2f} GiB")
    remaining = (e.max_steps - e.step) * e.step_time_s
    parts.append(f"eta {fmt_duration(remaining)}")
    return " | ".join(parts)


def eval_line(e: EvalResult) -> str:
    best = " (best)" if e.is_best else ""
    metrics = " ".join(fmt_metric(k, v) for k, v in e.metrics.items())
    return f"eval step {e.step} | {e.split} loss {e.loss:.4f}{best} | {metrics}".rstrip(" |")


#: The metrics of an SVD analysis line, and their formats (the seed's console: 4 decimals,
#: 6 for the reconstruction error).
SVD_LINE_METRICS = (("principal_alignment", ".4f"), ("minor_alignment", ".4f"), ("subspace_angle", ".4f"),
                    ("reconstruction_error", ".6f"))


def svd_lines(e: SVDAnalysis) -> list[str]:
    """The plain lines of one adaptive-SVD analysis (SEEDS_SPEC 2.5): the layer's mode (and r)
    before the action, the four metrics present (``subspace_angle`` in radians) and the
    decision's reason; then ``Updated r: a -> b`` when r changed in low-rank mode
    (``refactor``). The switch lines come from :class:`~lmkit.events.SVDModeSwitch`."""
    head = f"svd step {e.step} | {e.layer}"
    parts = [head, e.mode + (f" r={e.r}" if e.r is not None else "")]
    for name, spec in SVD_LINE_METRICS:
        value = e.metrics.get(name)
        if isinstance(value, (int, float)):
            parts.append(f"{name} {format(value, spec)}")
    parts.append(f"decision {e.reason}")
    lines = [" | ".join(parts)]
    if e.action == "refactor":
        lines.append(f"{head} | Updated r: {e.r} -> {e.r_after}")
    return lines


def started_lines(e: RunStarted) -> list[str]:
    return [
        f"run {e.name} -> {e.run_dir}",
        f"model {e.model_type} ({e.preset or 'custom'}): {e.n_params:,} params | device {e.device_name} "
        f"[{e.device}] | {e.precision}{' | compiled' if e.compile else ''}",
        f"{e.max_steps} optimizer steps ({e.steps_per_epoch}/epoch), {fmt_count(e.tokens_per_step)} tokens/step"
        + (f", resuming at step {e.start_step}" if e.start_step else ""),
    ]


def data_line(e: DataReady) -> str:
    sizes = ", ".join(f"{k} {v:,}" for k, v in e.split_sizes.items())
    cache = " (token cache reused)" if e.reused else ""
    return f"data {e.description}: {sizes} {e.unit} | tokenizer {e.tokenizer} ({e.vocab_size:,} ids){cache}"


def finished_lines(e: RunFinished) -> list[str]:
    s = e.summary
    lines = [
        f"{e.status}: {s.get('steps', 0)} steps, {fmt_count(s.get('tokens', 0))} tokens in "
        f"{fmt_duration(s.get('wall_time_s', float('nan')))} -> {s.get('run_dir', '')}"
    ]
    if s.get("final_val_loss") is not None:
        best = (f" (best {s['best_val_loss']:.4f} at step {s['best_step']})"
                if s.get("best_val_loss") is not None else "")
        lines.append(f"val loss {s['final_val_loss']:.4f} at step {val_step(s)}{best}")
    metrics = s.get("final_metrics") or {}
    if metrics:
        lines.append(" | ".join(fmt_metric(k, v) for k, v in metrics.items()))
    return lines


def val_step(summary: dict) -> str:
    return str(summary.get("final_val_step", "?"))


class PlainLog:
    """One line per event worth a line, written to ``stream`` (stdout by default)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self._stage: str | None = None
        self.closed = False
        self._steps = StepTimeWatch()

    def _line(self, text: str) -> None:
        # A reader that went away (`| head`, a dropped pipe) must not kill a training run:
        # stop writing and carry on; the run directory records everything anyway.
        if self.closed:
            return
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            self.closed = True

    def __call__(self, event: Event) -> None:
        for e in self._steps.expand(event):
            self._render(e)

    def _render(self, event: Event) -> None:
        if isinstance(event, DataProgress):
            done = event.total is not None and event.completed >= event.total
            if done:
                count = f" ({event.completed:,} {event.unit})" if event.unit else ""
                self._line(f"data: {event.stage} done{count}")
            elif event.stage != self._stage:
                self._line(f"data: {event.stage} ...")
            self._stage = event.stage
        elif isinstance(event, DataReady):
            self._line(data_line(event))
        elif isinstance(event, RunStarted):
            for line in started_lines(event):
                self._line(line)
        elif isinstance(event, StepMetrics):
            self._line(step_line(event))
        elif isinstance(event, EvalResult):
            self._line(eval_line(event))
        elif isinstance(event, CheckpointSaved):
            self._line(f"saved {', '.join(event.tags)} -> {event.path} ({event.seconds:.2f}s)")
        elif isinstance(event, SVDAnalysis):
            for line in svd_lines(event):
                self._line(line)
        elif isinstance(event, MESSAGE_EVENTS):  # Notice, NaNSkipped, StepTimeJump, SVDModeSwitch
            self._line(f"{event.level}: {event.message}")
        elif isinstance(event, RunFinished):
            for line in finished_lines(event):
                self._line(line)


class RichProgress:
    """A live progress line on a terminal, with events printed above it."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._data_task: TaskID | None = None
        self._train_task: TaskID | None = None
        self._started = False
        self._steps = StepTimeWatch()

    def _start(self) -> None:
        if not self._started:
            self.progress.start()
            self._started = True

    def _stop(self) -> None:
        if self._started:
            self.progress.stop()
            self._started = False

    def __call__(self, event: Event) -> None:
        for e in self._steps.expand(event):
            self._render(e)

    def _render(self, event: Event) -> None:
        print_ = self.progress.console.print
        if isinstance(event, DataProgress):
            self._start()
            if self._data_task is None:
                self._data_task = self.progress.add_task(event.stage, total=event.total, stats="")
            self.progress.update(self._data_task, description=event.stage, completed=event.completed,
                                 total=event.total)
        elif isinstance(event, DataReady):
            if self._data_task is not None:
                self.progress.remove_task(self._data_task)
                self._data_task = None
            print_(data_line(event), highlight=False)
        elif isinstance(event, RunStarted):
            for line in started_lines(event):
                print_(line, highlight=False)
            self._start()
            self._train_task = self.progress.add_task("train", total=event.max_steps, completed=event.start_step,
                                                      stats="")
        elif isinstance(event, StepMetrics):
            if self._train_task is not None:
                stats = (f"loss {event.loss:.4f} | lr {event.lr:.2e} | {fmt_count(event.tok_per_s)} tok/s"
                         + (f" | mfu {100 * event.mfu:.0f}%" if event.mfu is not None else ""))
                self.progress.update(self._train_task, completed=event.step, stats=stats)
        elif isinstance(event, EvalResult):
            print_(eval_line(event), style="cyan", highlight=False)
        elif isinstance(event, CheckpointSaved):
            print_(f"saved {', '.join(event.tags)} -> {event.path} ({event.seconds:.2f}s)", style="dim",
                   highlight=False)
        elif isinstance(event, MESSAGE_EVENTS):  # Notice, NaNSkipped, StepTimeJump, SVDModeSwitch
            # SVD switches are shown, each SVDAnalysis is not (the dashboard and svd.jsonl have them)
            style = "bold magenta" if isinstance(event, SVDModeSwitch) else "yellow"
            print_(f"{event.level}: {event.message}", style=style, highlight=False)
        elif isinstance(event, RunFinished):
            self._stop()
            table = Table(title=f"run {event.summary.get('name', '')}: {event.status}", show_header=False,
                          title_justify="left")
            for line in finished_lines(event):
                table.add_row(line)
            self.console.print(table)

    def close(self) -> None:
        """Stop the live display (also on errors), restoring the terminal."""
        self._stop()


class WarningsOnly:
    """For the ranks other than 0 under torchrun: only warning and error notices, as
    ``[rank N] warning: ...`` lines on ``stream`` (stderr by default); rank 0 renders the rest."""

    def __init__(self, stream: TextIO | None = None, rank: int = 0):
        self.stream = stream or sys.stderr
        self.rank = rank

    def __call__(self, event: Event) -> None:
        if isinstance(event, MESSAGE_EVENTS) and event.level in ("warning", "error"):
            try:
                self.stream.write(f"[rank {self.rank}] {event.level}: {event.message}\n")
                self.stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass
