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
from rich.text import Text

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
from lmkit.monitor.history import read_warmup_steps, warmup_warning
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


def processes_text(e: RunStarted) -> str:
    """``4 processes (DDP)`` for a data-parallel run (``world_size > 1``; ``1 process (FSDP)`` for
    a launched process group of one), else ``""``."""
    if e.world_size <= 1:
        return f"1 process ({e.parallelism.upper()})" if e.parallelism else ""
    return f"{e.world_size} processes ({(e.parallelism or 'ddp').upper()})"


def per_device_label(e: RunStarted | None) -> str:
    """What one rank runs on: ``GPU`` (CUDA) or ``process``."""
    return "GPU" if e is not None and e.device.startswith("cuda") else "process"


def tok_per_s_text(tok_per_s: float, world_size: int = 1, unit: str = "GPU") -> str:
    """``17.3k tok/s``; with ``world_size > 1`` also the per-rank share, ``17.3k tok/s (4.33k/GPU)``.

    ``tok_per_s`` is global under data parallelism (:class:`~lmkit.events.StepMetrics`: every
    rank's targets), so the per-``unit`` figure is ``tok_per_s / world_size``.
    """
    text = f"{fmt_count(tok_per_s)} tok/s"
    if world_size > 1:
        text += f" ({fmt_count(tok_per_s / world_size)}/{unit})"
    return text


def step_line(e: StepMetrics, world_size: int = 1, unit: str = "GPU") -> str:
    """One plain log line; ``world_size > 1`` adds the per-``unit`` tokens/s (:func:`tok_per_s_text`)."""
    parts = [
        f"step {e.step}/{e.max_steps}",
        f"ep {e.epoch:.2f}",
        f"loss {e.loss:.4f}",
        f"lr {e.lr:.2e}",
        tok_per_s_text(e.tok_per_s, world_size, unit),
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


def started_lines(e: RunStarted, warmup_steps: int | None = None) -> list[str]:
    """The lines printed when a run starts; with ``warmup_steps``, a warning line when the
    warmup takes half the run or more (but not more than the run: the trainer warns of that). ``tokens/step`` is what a batch holds (batch x
    block_size x grad_accum_steps, padding included); the token counts of the step lines
    count loss targets (padding and masked prompts excluded)."""
    lines = [
        f"run {e.name} -> {e.run_dir}",
        f"model {e.model_type} ({e.preset or 'custom'}): {e.n_params:,} params | device {e.device_name} "
        f"[{e.device}]{' | ' + processes_text(e) if processes_text(e) else ''} | {e.precision}"
        f"{' | compiled' if e.compile else ''}",
        f"{e.max_steps} optimizer steps ({e.steps_per_epoch}/epoch), {fmt_count(e.tokens_per_step)} tokens/step "
        "(batch x block, padding included; tokens seen count loss targets)"
        + (f", resuming at step {e.start_step}" if e.start_step else ""),
    ]
    # a warmup longer than the run gets the trainer's own warning (with its advice) right after
    warning = warmup_warning(warmup_steps, e.max_steps) if (warmup_steps or 0) <= e.max_steps else None
    if warning:
        lines.append(f"warning: {warning}")
    return lines


def data_tokens_text(e: DataProgress, tokens_per_s: float | None = None) -> str:
    """``34.5k tokens · 81.2k tokens/s`` (``""`` when the event carries no token count)."""
    if e.tokens is None:
        return ""
    text = f"{fmt_count(e.tokens)} tokens"
    if tokens_per_s is not None and math.isfinite(tokens_per_s) and tokens_per_s > 0:
        text += f" · {fmt_count(tokens_per_s)} tokens/s"
    return text


def data_progress_line(e: DataProgress, tokens_per_s: float | None = None) -> str:
    """``tokenize train 1,200/2,000 rows · 34.5k tokens · 81.2k tokens/s``."""
    done = f"{e.completed:,}" + (f"/{e.total:,}" if e.total else "") + (f" {e.unit}" if e.unit else "")
    tokens = data_tokens_text(e, tokens_per_s)
    return f"{e.stage} {done}" + (f" · {tokens}" if tokens else "")


class DataRate:
    """Tokens per second of a data-preparation stage, from successive :class:`DataProgress`
    events (the rate over the stage so far; ``None`` until two events of a stage with
    ``tokens`` arrived)."""

    def __init__(self):
        self._stage: str | None = None
        self._first: tuple[float, int] | None = None
        self.rate: float | None = None

    def update(self, e: DataProgress) -> float | None:
        if e.stage != self._stage or e.tokens is None:
            self._stage, self.rate = e.stage, None
            self._first = (e.time, e.tokens) if e.tokens is not None else None
            return None
        if self._first is None:
            self._first = (e.time, e.tokens)
        elif e.time > self._first[0]:
            self.rate = (e.tokens - self._first[1]) / (e.time - self._first[0])
        return self.rate


def message_warnings(event: Event) -> str | None:
    """``level: message`` of a warning or error among :data:`~lmkit.events.MESSAGE_EVENTS`."""
    if isinstance(event, MESSAGE_EVENTS) and event.level in ("warning", "error"):
        return f"{event.level}: {event.message}"
    return None


def summary_table(e: RunFinished, warnings: dict[str, int] | None = None) -> Table:
    """The end-of-run table: :func:`finished_lines`, then every warning of the run once
    (with its count when repeated), so none scrolled away unseen. Plain text, no markup."""
    table = Table(title=Text(f"run {e.summary.get('name', '')}: {e.status}"), show_header=False,
                  title_justify="left")
    for line in finished_lines(e):
        table.add_row(Text(line))
    for message, count in (warnings or {}).items():
        table.add_row(Text(message + (f" (x{count})" if count > 1 else ""), style="yellow"))
    return table


def data_line(e: DataReady) -> str:
    sizes = ", ".join(f"{k} {v:,}" for k, v in e.split_sizes.items())
    cache = " (token cache reused)" if e.reused else ""
    line = f"data {e.description}: {sizes} {e.unit} | tokenizer {e.tokenizer} ({e.vocab_size:,} ids){cache}"
    stats = stats_text(e.stats)
    return f"{line} | {stats}" if stats else line


def stats_text(stats: dict | None) -> str:
    """The data statistics worth a glance (the multiplication-tokens condition's counts and
    compression, chat data's labelled tokens), or ``""``."""
    if not stats:
        return ""
    parts = []
    if stats.get("condition"):
        parts.append(f"condition {stats['condition']}")
    if stats.get("mul_tokens") is not None and stats.get("condition") == "mul_tokens" and "format" not in stats:
        ratio = stats.get("mul_token_ratio")
        parts.append(f"{stats['mul_tokens']:,} mul tokens" + (f" ({ratio:.2%} of all)" if ratio is not None else ""))
        if stats.get("tokens_saved") is not None and stats.get("token_reduction") is not None:
            parts.append(f"{stats['tokens_saved']:,} tokens saved vs baseline ({stats['token_reduction']:.2%})")
    if stats.get("synthetic_tokens"):
        parts.append(f"synthetic drills {stats['synthetic_tokens']:,} tokens")
    labels = stats.get("label_tokens")
    if isinstance(labels, dict):
        labels = labels.get("train", sum(v for v in labels.values() if isinstance(v, int)))
    if isinstance(labels, int):
        parts.append(f"{labels:,} labelled train tokens (loss on {stats.get('loss_on', 'assistant')})")
    if stats.get("format") == "chat" and stats.get("mul_tokens") is not None:
        parts.append(f"{stats['mul_tokens']:,} mul tokens injected")
    if stats.get("truncated"):
        parts.append(f"{stats['truncated']:,} conversations cut to the context")
    return ", ".join(parts)


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
        self._rate = DataRate()
        self._started: RunStarted | None = None

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
            rate = self._rate.update(event)
            done = event.total is not None and event.completed >= event.total
            if done:
                count = [f"{event.completed:,} {event.unit}"] if event.unit else []
                if event.tokens is not None:
                    count.append(f"{event.tokens:,} tokens" + (f", {fmt_count(rate)} tokens/s" if rate else ""))
                self._line(f"data: {event.stage} done" + (f" ({', '.join(count)})" if count else ""))
            elif event.stage != self._stage:
                self._line(f"data: {event.stage} ...")
            self._stage = event.stage
        elif isinstance(event, DataReady):
            self._line(data_line(event))
        elif isinstance(event, RunStarted):
            self._started = event
            for line in started_lines(event, read_warmup_steps(event.run_dir)):
                self._line(line)
        elif isinstance(event, StepMetrics):
            s = self._started
            self._line(step_line(event, s.world_size if s else 1, per_device_label(s)))
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
        # markup=False: stage names, messages and paths are shown as written ("[cpu]" stays)
        self.progress = Progress(
            TextColumn("{task.description}", style="bold", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}", markup=False),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._data_task: TaskID | None = None
        self._train_task: TaskID | None = None
        self._started = False
        self._steps = StepTimeWatch()
        self._rate = DataRate()
        self.warnings: dict[str, int] = {}
        self._started_event: RunStarted | None = None

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
        def print_(text: str, **kw) -> None:  # user and event text, never read as markup
            self.progress.console.print(text, markup=False, **kw)

        warning = message_warnings(event)
        if warning is not None:
            self.warnings[warning] = self.warnings.get(warning, 0) + 1
        if isinstance(event, DataProgress):
            self._start()
            rate = self._rate.update(event)
            stats = data_tokens_text(event, rate)
            if self._data_task is None:
                self._data_task = self.progress.add_task(event.stage, total=event.total, stats=stats)
            self.progress.update(self._data_task, description=event.stage, completed=event.completed,
                                 total=event.total, stats=stats)
        elif isinstance(event, DataReady):
            if self._data_task is not None:
                self.progress.remove_task(self._data_task)
                self._data_task = None
            print_(data_line(event), highlight=False)
        elif isinstance(event, RunStarted):
            self._started_event = event
            for line in started_lines(event, read_warmup_steps(event.run_dir)):
                print_(line, highlight=False, style="yellow" if line.startswith("warning:") else None)
            self._start()
            self._train_task = self.progress.add_task("train", total=event.max_steps, completed=event.start_step,
                                                      stats="")
        elif isinstance(event, StepMetrics):
            if self._train_task is not None:
                s = self._started_event
                tok = tok_per_s_text(event.tok_per_s, s.world_size if s else 1, per_device_label(s))
                stats = (f"loss {event.loss:.4f} | lr {event.lr:.2e} | {tok}"
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
            self.console.print(summary_table(event, self.warnings))

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
