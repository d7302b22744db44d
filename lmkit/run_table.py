"""The runs of an output folder, one row each, read from their files (``lmkit runs``).

A run is a folder holding ``config.yaml`` (:mod:`lmkit.rundir`); anything else in the folder
is skipped quietly. Each row is read from, in order of trust: ``summary.json`` (written at
the end of every session), ``events.jsonl`` (``run_started`` / ``run_finished``),
``metrics.jsonl`` (the last step, the best val loss of a run still going) and
``eval/*.json`` / ``eval/TASK/step_*.json`` (the newest ``lmkit eval`` result, :func:`last_eval`). Nothing is written, no lock is taken
from a run in progress.

Status:
    ``running``: a live process holds the run's lock (``.lock``: its pid is alive and the
    lock is held); ``completed`` / ``interrupted`` (also a second-Ctrl-C ``aborted``) /
    ``failed``: the last session's end as recorded; ``failed`` too for a run whose process
    died without recording an end (killed, power loss): ``lmkit resume`` continues both.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmkit.errors import ConfigError

STATUSES = ("running", "completed", "interrupted", "failed")


@dataclass
class RunRow:
    """One run. Units: tokens, seconds (``wall_time_s``), nats/token (``best_val_loss``);
    ``started``: ISO 8601 UTC of the first session's start (``None`` if never started)."""

    name: str
    path: str
    preset: str | None
    model_type: str | None
    params: int | None
    status: str
    step: int | None
    max_steps: int | None
    tokens: int | None
    best_val_loss: float | None
    last_eval: dict[str, Any] | None  # task, metric, value, step, created
    wall_time_s: float | None
    started: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a crash
                    continue
                if isinstance(record, dict):
                    out.append(record)
    except OSError:
        pass
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def is_running(run_dir: Path) -> bool:
    """True when a live lmkit process holds ``run_dir/.lock`` (see :meth:`lmkit.rundir.RunDir.lock`).

    The pid in the file is checked first, so a finished run is never touched; only when that
    process is alive is the lock probed (a shared, non-blocking ``flock`` released at once)
    to rule out a reused pid."""
    lock = run_dir / ".lock"
    try:
        text = lock.read_text().strip()
    except OSError:
        return False
    if not text.isdigit() or not _pid_alive(int(text)):
        return False
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: trust the pid
        return True
    with lock.open("r") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def _eval_files(run_dir: Path) -> list[Path]:
    """``eval/*.json`` (one per task) and, per ``--checkpoint all`` sweep folder
    ``eval/TASK/``, its newest ``step_*.json`` by modification time (one read per folder)."""
    eval_dir = run_dir / "eval"
    files = [p for p in eval_dir.glob("*.json") if p.is_file()]
    for folder in (p for p in eval_dir.iterdir() if p.is_dir()) if eval_dir.is_dir() else ():
        steps = []
        for path in folder.glob("step_*.json"):
            try:
                steps.append((path.stat().st_mtime_ns, path.name, path))
            except OSError:
                continue
        if steps:
            files.append(max(steps)[2])
    return files


def last_eval(run_dir: Path) -> dict[str, Any] | None:
    """The newest result of ``lmkit eval`` in ``runs/NAME/eval/`` as ``{task, metric, value, step,
    created}``; ``None`` when none is readable.

    Candidates: ``eval/TASK.json`` and the newest ``eval/TASK/step_*.json`` of each
    ``--checkpoint all`` sweep. Newest = the latest ``created`` (ISO 8601 UTC, whole seconds;
    the file's modification time when missing); ties -- the tasks of one ``lmkit eval`` command
    finish within a second -- go to the file written last (``st_mtime_ns``), then to the
    larger file name, so the choice never depends on the order a folder is listed in.
    """
    best: tuple[str, int, str, dict[str, Any]] | None = None
    for path in _eval_files(run_dir):
        record = _read_json(path)
        if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
            continue
        try:
            mtime_ns = path.stat().st_mtime_ns
        except OSError:
            continue
        created = record.get("created")
        created = created if isinstance(created, str) and created else _iso(mtime_ns / 1e9) or ""
        key = (created, mtime_ns, str(path.relative_to(run_dir)))
        if best is None or key > best[:3]:
            best = (*key, record)
    if best is None:
        return None
    created, _, _, record = best
    metric = record.get("headline")
    return {"task": record.get("task"), "metric": metric, "value": record["metrics"].get(metric),
            "step": record.get("step"), "created": created}


def read_run(run_dir: Path) -> RunRow | None:
    """The row of one run folder, ``None`` when ``run_dir`` is not a run (no ``config.yaml``)."""
    import yaml

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return None
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        config = None
    config = config if isinstance(config, dict) else {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    summary = _read_json(run_dir / "summary.json")
    summary = summary if isinstance(summary, dict) else {}
    events = _jsonl(run_dir / "events.jsonl")
    starts = [e for e in events if e.get("kind") == "run_started"]
    finishes = [e for e in events if e.get("kind") == "run_finished"]
    metrics = _jsonl(run_dir / "metrics.jsonl")
    train = [m for m in metrics if m.get("split") == "train"]
    # the step-0 evaluation of the untrained model is never "best" (the trainer's rule)
    vals = [m["loss"] for m in metrics if m.get("split") == "val" and m.get("step", 0) > 0
            and isinstance(m.get("loss"), (int, float))]

    running = is_running(run_dir)
    # The latest session decides: a run_started after the last run_finished is a session that
    # is going on (or died without recording its end).
    open_session = bool(starts) and (not finishes or starts[-1].get("time", 0) > finishes[-1].get("time", 0))
    if running:
        status = "running"
    elif open_session or not (summary or finishes):
        status = "failed"
    else:
        recorded = summary.get("status") or finishes[-1].get("status")
        status = {"aborted": "interrupted"}.get(recorded, recorded)
        if status not in STATUSES:
            status = "failed"

    use_summary = bool(summary) and not (running or open_session)
    last = train[-1] if train else {}
    step = summary.get("steps") if use_summary else last.get("step", starts[-1].get("start_step") if starts else None)
    tokens = summary.get("tokens") if use_summary else last.get("tokens")
    max_steps = (summary.get("max_steps") if use_summary else None) or (starts[-1].get("max_steps") if starts else None)
    best = summary.get("best_val_loss") if use_summary else None
    if best is None and vals and not use_summary:
        best = min(vals)
    wall = summary.get("wall_time_s") if use_summary else last.get("elapsed_s")
    params = summary.get("params") or (starts[-1].get("n_params") if starts else None)
    started = _iso(starts[0]["time"]) if starts and isinstance(starts[0].get("time"), (int, float)) else None
    return RunRow(
        name=run_dir.name, path=str(run_dir), preset=config.get("preset") or summary.get("preset"),
        model_type=model.get("type") or summary.get("model_type"), params=params, status=status,
        step=step, max_steps=max_steps, tokens=tokens, best_val_loss=best, last_eval=last_eval(run_dir),
        wall_time_s=wall, started=started,
    )


def list_runs(out_dir: str | Path = "runs") -> list[RunRow]:
    """Every run directly under ``out_dir``, newest first (by start; never-started runs last).

    Raises:
        ConfigError: ``out_dir`` does not exist or is not a folder.
    """
    root = Path(out_dir)
    if not root.is_dir():
        raise ConfigError(f"--out-dir {root}: no such folder" if not root.exists()
                          else f"--out-dir {root}: is a file, not a folder")
    rows = [row for child in sorted(root.iterdir()) if child.is_dir() and (row := read_run(child)) is not None]
    rows.sort(key=lambda r: (r.started is not None, r.started or "", r.name), reverse=True)
    return rows


__all__ = ["STATUSES", "RunRow", "is_running", "last_eval", "list_runs", "read_run"]
