"""Observers that write the run directory: ``metrics.jsonl``, ``events.jsonl``, TensorBoard.

``metrics.jsonl`` holds one object per logged train step (``"split": "train"``) or
evaluation (``"split": "val"``) with ``step``, ``tokens``, ``epoch``, ``loss`` and the
rest of the numbers; ``events.jsonl`` the other events (run start/end, data,
checkpoints, notices). Lines are flushed as written, so ``tail -f`` works.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmkit.events import (
    CheckpointSaved,
    DataReady,
    EvalResult,
    Event,
    Notice,
    Resumed,
    RunFinished,
    RunStarted,
    StepMetrics,
)


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
        self._file.write(json.dumps(_jsonable(record)) + "\n")
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
    """``events.jsonl``: everything that is not a metric."""

    KINDS = (RunStarted, DataReady, CheckpointSaved, Resumed, Notice, RunFinished)

    def __call__(self, event: Event) -> None:
        if isinstance(event, self.KINDS):
            self.write(event.to_dict())
        if isinstance(event, RunFinished):
            self.close()


class TensorBoardWriter:
    """Scalars under ``train/`` and ``val/`` in ``tb/``, x axis = optimizer step."""

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
        elif isinstance(event, RunFinished):
            self.writer.close()
