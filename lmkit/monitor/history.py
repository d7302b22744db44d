"""What a renderer reads from the run directory at :class:`~lmkit.events.RunStarted`.

The events say what happens from now on; two things a screen needs are only in the run
directory: the run's warmup length (``config.yaml``: the header flags a warmup that takes
half the run or more) and, after ``lmkit resume``, the losses logged before the resume step
(``metrics.jsonl``: the loss chart starts at step 0, not empty at the resume step).
Both are read once, and a missing or unreadable file only means less on the screen.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class RunFacts:
    """``warmup_steps``: ``training.warmup_steps`` (``None`` when unknown);
    ``train``: ``(step, loss)`` of the logged train steps up to the resume step;
    ``val``: the evaluation records (``metrics.jsonl`` dicts with ``split`` other than
    ``train``) up to it, oldest first."""

    warmup_steps: int | None = None
    train: list[tuple[int, float]] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)


def read_warmup_steps(run_dir: str | Path) -> int | None:
    """``training.warmup_steps`` of ``run_dir/config.yaml``; ``None`` when it cannot be read."""
    try:
        data = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))
        value = data["training"]["warmup_steps"]
        return int(value) if value is not None else None
    except Exception:  # noqa: BLE001 - the screen shows less, training goes on
        return None


def read_history(run_dir: str | Path, upto_step: int) -> tuple[list[tuple[int, float]], list[dict]]:
    """The ``metrics.jsonl`` records of steps ``<= upto_step``: train ``(step, loss)`` pairs
    and evaluation records, oldest first (``[]``, ``[]`` when the file is missing). Lines
    that do not parse (a crash cut one short) are skipped."""
    train: list[tuple[int, float]] = []
    val: list[dict] = []
    path = Path(run_dir) / "metrics.jsonl"
    try:
        handle = path.open(encoding="utf-8")
    except OSError:
        return train, val
    with handle:
        for line in handle:
            try:
                record = json.loads(line)
                step, loss = int(record["step"]), float(record["loss"])
            except (ValueError, KeyError, TypeError):
                continue
            if step > upto_step or not math.isfinite(loss):
                continue
            if record.get("split", "train") == "train":
                train.append((step, loss))
            else:
                val.append(record)
    return train, val


def read_run_facts(run_dir: str | Path, start_step: int = 0) -> RunFacts:
    """The warmup and, for a resumed run (``start_step > 0``), the history before it."""
    facts = RunFacts(warmup_steps=read_warmup_steps(run_dir))
    if start_step > 0:
        facts.train, facts.val = read_history(run_dir, start_step)
    return facts


def warmup_warning(warmup_steps: int | None, max_steps: int) -> str | None:
    """The header's warning when the warmup takes half the run or more, else ``None``."""
    if not warmup_steps or max_steps <= 0 or 2 * warmup_steps < max_steps:
        return None
    if warmup_steps > max_steps:
        return f"warmup {warmup_steps:,} steps > the run's {max_steps:,}: the LR never reaches its peak"
    return f"warmup {warmup_steps:,} of the run's {max_steps:,} steps"


__all__ = ["RunFacts", "read_history", "read_run_facts", "read_warmup_steps", "warmup_warning"]
