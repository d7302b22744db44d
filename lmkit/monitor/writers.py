"""Observers that write the run directory: ``metrics.jsonl``, ``events.jsonl``, TensorBoard.

``metrics.jsonl`` holds one object per logged train step (``"split": "train"``) or
evaluation (``"split": "val"``) with ``step``, ``tokens``, ``epoch``, ``loss`` and the
rest of the numbers; ``events.jsonl`` every other event, whatever its type (run start/end,
data, checkpoints, resumes, notices, NaN skips, and any event type added later: there is no
list to extend), except :class:`~lmkit.events.DataProgress`, which is transient progress
(many per second while data is prepared) whose outcome :class:`~lmkit.events.DataReady`
records. Lines are flushed as written, so ``tail -f`` works.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmkit.events import DataProgress, EvalResult, Event, RunFinished, StepMetrics, SVDAnalysis


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class _JsonlWriter:
    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        # default=str: a field of a type JSON lacks (a Path, an enum) is written as its text
        # instead of stopping the run.
        line = json.dumps(_jsonable(record), default=str) + "\n"
        if self._file.closed:  # a record after RunFinished: appended, not lost
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)
            return
        self._file.write(line)
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class MetricsWriter(_JsonlWriter):
    """``metrics.jsonl``: train steps and evaluations."""

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepMetrics):
            record = event.to_dict()
            record.pop("kind")
            record.pop("max_steps")
            self.write({"split": "train", **record})
        elif isinstance(event, EvalResult):
            record = {"split": event.split, "step": event.step, "tokens": event.tokens, "epoch": event.epoch,
                      "loss": event.loss, **event.metrics, "is_best": event.is_best,
                      "elapsed_s": event.elapsed_s, "time": event.time}
            self.write(record)
        elif isinstance(event, RunFinished):
            self.close()


class EventsWriter(_JsonlWriter):
    """``events.jsonl``: every event that is not a metric (no list of kinds: a new event
    type is recorded as it is, one ``Event.to_dict()`` object a line).

    Not written: :data:`NOT_RECORDED` -- the metrics (``metrics.jsonl`` has them) and
    ``DataProgress`` (transient progress; ``DataReady`` records the outcome).
    """

    NOT_RECORDED: tuple[type[Event], ...] = (StepMetrics, EvalResult, DataProgress)

    def __call__(self, event: Event) -> None:
        if not isinstance(event, self.NOT_RECORDED):
            self.write(event.to_dict())
        if isinstance(event, RunFinished):
            self.close()


class TensorBoardWriter:
    """Scalars under ``train/`` and ``val/`` in ``tb/``, x axis = optimizer step; and per
    adaptive-SVD analysis (:class:`~lmkit.events.SVDAnalysis`) ``svd/<layer>/<metric>`` for
    each finite metric it has, ``svd/<layer>/mode`` (1 = low-rank, 0 = full) and
    ``svd/<layer>/r`` after the action (the seed's wandb keys, SEEDS_SPEC 2.5)."""

    def __init__(self, directory: Path, purge_step: int | None = None):
        """``purge_step``: on resume, TensorBoard hides what earlier sessions wrote at this
        step and after (the interrupted session's records past the checkpoint)."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory), purge_step=purge_step)

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepMetrics):
            scalars = {"loss": event.loss, "lr": event.lr, "tok_per_s": event.tok_per_s, "grad_norm": event.grad_norm,
                       "mfu": event.mfu, "gpu_mem_gb": event.gpu_mem_gb}
            for name, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(f"train/{name}", value, event.step)
        elif isinstance(event, EvalResult):
            self.writer.add_scalar(f"{event.split}/loss", event.loss, event.step)
            for name, value in event.metrics.items():
                self.writer.add_scalar(f"{event.split}/{name}", value, event.step)
            self.writer.flush()
        elif isinstance(event, SVDAnalysis):
            prefix = f"svd/{event.layer}"
            for name, value in event.metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}/{name}", value, event.step)
            self.writer.add_scalar(f"{prefix}/mode", 1.0 if event.mode_after == "lowrank" else 0.0, event.step)
            if event.r_after is not None:
                self.writer.add_scalar(f"{prefix}/r", event.r_after, event.step)
            self.writer.flush()  # a few layers every `svd.interval` steps: cheap, and live in TensorBoard
        elif isinstance(event, RunFinished):
            self.writer.close()
