"""Weights & Biases as one more observer of the training events (``training.loggers: [wandb]``).

:class:`WandbWriter` logs what :class:`~lmkit.monitor.writers.TensorBoardWriter` writes --
``train/loss``, ``train/lr``, ``train/tok_per_s``, ``train/grad_norm``, ``train/mfu``,
``train/gpu_mem_gb``; ``val/loss`` and every eval metric under its split; per adaptive-SVD
analysis ``svd/<layer>/<metric>``, ``svd/<layer>/mode`` (1 = low-rank) and ``svd/<layer>/r``
(the seed's W&B keys, SEEDS_SPEC 2.5) -- plus the resolved config (at start), the run's facts
from :class:`~lmkit.events.RunStarted` (parameters, device, precision: in the run's config)
and ``summary.json`` (at :class:`~lmkit.events.RunFinished`, in the W&B run summary), then
calls ``finish()``.

The x axis is lmkit's optimizer step, logged as the metric ``step`` that every other key
is plotted against (``define_metric``): W&B's own ``_step`` only grows, so after
``lmkit resume`` from a checkpoint older than the last logged step the continuation's
points still land at their real steps. The W&B run id is kept in ``runs/NAME/wandb.json``;
``lmkit resume`` continues that same W&B run (``resume="allow"``).

Project, entity and run name: ``training.wandb_project`` (default ``lmkit``),
``training.wandb_entity`` (default: W&B's default entity), ``training.wandb_run_name``
(default: the run's name). ``WANDB_MODE=offline`` (or ``disabled``) and ``WANDB_DIR``
work as W&B documents them; the files go to ``runs/NAME/`` unless ``WANDB_DIR`` is set.

Raises (at construction):
    ConfigError: the ``wandb`` package is not installed (``pip install 'lmkit[wandb]'``).
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmkit.errors import ConfigError, first_line
from lmkit.events import EvalResult, Event, RunFinished, RunStarted, StepMetrics, SVDAnalysis

if TYPE_CHECKING:
    from lmkit.config import RunConfig

#: Where the W&B run id of a run is kept (relative to the run folder).
WANDB_ID_FILE = "wandb.json"

#: The metric every logged key is plotted against: lmkit's optimizer step.
STEP_KEY = "step"


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise ConfigError("training.loggers: wandb is not installed; pip install 'lmkit[wandb]' "
                          "(or drop wandb from training.loggers)") from None
    return wandb


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def step_record(event: Event) -> dict[str, float] | None:
    """The W&B keys of one event (the TensorBoard scalars' names and values), ``step``
    included; ``None`` for an event that logs no scalars."""
    out: dict[str, float] = {}
    if isinstance(event, StepMetrics):
        for name in ("loss", "lr", "tok_per_s", "grad_norm", "mfu", "gpu_mem_gb"):
            value = getattr(event, name)
            if value is not None:
                out[f"train/{name}"] = value
    elif isinstance(event, EvalResult):
        out[f"{event.split}/loss"] = event.loss
        for name, value in event.metrics.items():
            out[f"{event.split}/{name}"] = value
    elif isinstance(event, SVDAnalysis):
        prefix = f"svd/{event.layer}"
        for name, value in event.metrics.items():
            if _finite(value):
                out[f"{prefix}/{name}"] = value
        out[f"{prefix}/mode"] = 1.0 if event.mode_after == "lowrank" else 0.0
        if event.r_after is not None:
            out[f"{prefix}/r"] = event.r_after
    else:
        return None
    out[STEP_KEY] = event.step
    return out


class WandbWriter:
    """An events observer that mirrors the run to Weights & Biases (see the module doc).

    Args:
        cfg: the run's resolved config (logged as the W&B run config).
        run: the run folder (:class:`lmkit.rundir.RunDir`; anything with ``path`` and ``name``).
        resumed: ``True`` on ``lmkit resume``: continue the W&B run whose id is in
            ``runs/NAME/wandb.json`` (a new W&B run when that file is missing).

    Raises:
        ConfigError: the ``wandb`` package is missing, or ``wandb.init`` fails with one of
            wandb's errors (``wandb.errors.Error``: no API key online, no network, no access
            to the project), in one line that suggests ``wandb login`` or ``WANDB_MODE=offline``.
    """

    def __init__(self, cfg: RunConfig, run: Any, resumed: bool):
        wandb = _import_wandb()
        self._wandb = wandb
        self.run_path = Path(run.path)
        tcfg = cfg.training
        id_file = self.run_path / WANDB_ID_FILE
        run_id = None
        if resumed and id_file.is_file():
            try:
                run_id = json.loads(id_file.read_text(encoding="utf-8")).get("id")
            except (OSError, ValueError):
                run_id = None
        if run_id is None:
            run_id = secrets.token_hex(4)  # W&B ids: lower-case letters and digits
        kwargs: dict[str, Any] = {
            "project": tcfg.wandb_project or "lmkit",
            "entity": tcfg.wandb_entity,
            "name": tcfg.wandb_run_name or run.name,
            "id": run_id,
            "resume": "allow",
            "allow_val_change": True,  # a resume may change allowed keys (training.max_steps ...)
            "config": cfg.model_dump(mode="json"),
        }
        # read now and passed explicitly: wandb keeps the settings of its first init in a process
        kwargs["dir"] = os.environ.get("WANDB_DIR") or str(self.run_path)
        wandb_error = getattr(getattr(wandb, "errors", None), "Error", Exception)
        try:
            self.wandb_run = wandb.init(**kwargs)
        except wandb_error as exc:  # no API key online, network, permissions: wandb's own errors
            raise ConfigError(f"training.loggers: wandb.init failed ({first_line(exc)}); run `wandb login`, or set "
                              "WANDB_MODE=offline to log locally (or drop wandb from training.loggers)") from None
        id_file.write_text(json.dumps({"id": run_id, "project": kwargs["project"], "entity": tcfg.wandb_entity,
                                       "name": kwargs["name"]}) + "\n", encoding="utf-8")
        self.wandb_run.define_metric(STEP_KEY)
        self._prefixes = {"train", "val", "test", "svd"}
        for prefix in sorted(self._prefixes):
            self.wandb_run.define_metric(f"{prefix}/*", step_metric=STEP_KEY)
        self.finished = False

    def __call__(self, event: Event) -> None:
        if self.finished:
            return
        record = step_record(event)
        if record is not None:
            if isinstance(event, EvalResult) and event.split not in self._prefixes:
                self._prefixes.add(event.split)
                self.wandb_run.define_metric(f"{event.split}/*", step_metric=STEP_KEY)
            self.wandb_run.log(record)
        elif isinstance(event, RunStarted):
            self.wandb_run.config.update(
                {"n_params": event.n_params, "device": event.device, "device_name": event.device_name,
                 "precision": event.precision, "max_steps": event.max_steps,
                 "tokens_per_step": event.tokens_per_step}, allow_val_change=True)
        elif isinstance(event, RunFinished):
            # JSON-safe: no None, no NaN/inf (summary.json keeps those)
            summary = {k: v for k, v in event.summary.items()
                       if v is not None and (_finite(v) or not isinstance(v, float))}
            self.wandb_run.summary.update({**summary, "status": event.status})
            self.finished = True
            self.wandb_run.finish(exit_code=0 if event.status == "completed" else 1)


__all__ = ["STEP_KEY", "WANDB_ID_FILE", "WandbWriter", "step_record"]
