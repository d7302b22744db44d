"""The run directory: the unit every other command reads.

::

    runs/NAME/
      config.yaml        the fully resolved config (what resume and eval rebuild from)
      metrics.jsonl      one JSON object per logged step or eval
      events.jsonl       run start/end, data, checkpoints, notices
      tb/                TensorBoard event files
      checkpoints/       latest.pt, best.pt, step_0002000.pt / epoch_005.pt
      tokenizer/         what is needed to rebuild the tokenizer offline
      eval/              eval results (lmkit eval)
      summary.json       params, steps, tokens, best/final val loss, wall time
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from lmkit.config import RunConfig
from lmkit.errors import ConfigError


class RunDir:
    """Paths of one run directory (nothing is created until :meth:`create`)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.yaml")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    events_path = property(lambda self: self.path / "events.jsonl")
    summary_path = property(lambda self: self.path / "summary.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    tokenizer_dir = property(lambda self: self.path / "tokenizer")
    tb_dir = property(lambda self: self.path / "tb")
    eval_dir = property(lambda self: self.path / "eval")

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def for_new_run(cls, config: RunConfig) -> RunDir:
        """``out_dir/name`` (a timestamped name when none is given), checked to be unused.

        Raises:
            ConfigError: the folder already holds a run.
        """
        name = config.name or default_run_name(config)
        run = cls(Path(config.out_dir) / name)
        if config.name is None:  # a generated name never collides: add -2, -3, ...
            n = 2
            while run.path.exists():
                run = cls(Path(config.out_dir) / f"{name}-{n}")
                n += 1
        if run.config_path.exists() or run.checkpoints.exists():
            raise ConfigError(
                f"--name {name}: {run.path} already holds a run; pick another --name "
                "(or delete that folder to start it again)"
            )
        return run

    def create(self) -> None:
        for sub in (self.path, self.checkpoints, self.tb_dir):
            sub.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: RunConfig) -> None:
        _atomic_write_text(self.config_path, config.to_yaml())

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write_text(self.summary_path, json.dumps(summary, indent=2) + "\n")

    def checkpoint_path(self, tag: str) -> Path:
        return self.checkpoints / f"{tag}.pt"


def default_run_name(config: RunConfig) -> str:
    """``PRESET-YYYYmmdd-HHMMSS`` (``run-...`` without a preset)."""
    stem = config.preset or "run"
    return f"{Path(stem).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
