"""The run directory: the unit every other command reads.

::

    runs/NAME/
      config.yaml        the fully resolved config (what resume and eval rebuild from)
      metrics.jsonl      one JSON object per logged step or eval
      events.jsonl       every non-metric event: run start/end, data, checkpoints, resumes, notices
      tb/                TensorBoard event files
      checkpoints/       latest.pt, best.pt, step_0002000.pt / epoch_005.pt
      tokenizer/         what is needed to rebuild the tokenizer offline
      eval/              eval results (lmkit eval)
      summary.json       params, steps, tokens, best/final val loss, wall time
      superseded/        log records of abandoned continuations, moved aside on a resume

A new run claims its folder atomically (an exclusive create of ``config.yaml``), so two
runs started at once never share one; a training process holds an exclusive lock on
``.lock`` for as long as it writes the folder, so a second process (another resume, say)
is refused instead of interleaving its writes.

Launched runs (``lmkit train --nproc-per-node N``): the launcher claims the folder and holds
its lock for the whole job, restarts included, and tells its workers through
:data:`RUN_DIR_ENV` / :data:`LOCK_PID_ENV`; a worker's :meth:`RunDir.lock` of that folder
then succeeds without a lock of its own (its parent holds it), and rank 0 takes the folder
over with :meth:`RunDir.claimed`.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmkit.config import RunConfig
from lmkit.errors import ConfigError

#: The file name of a periodic checkpoint: ``step_0002000.pt`` (every
#: ``training.checkpoint_interval`` steps) or ``epoch_005.pt`` (every
#: ``training.checkpoint_every_epochs`` epochs). Groups: the kind, the number.
CHECKPOINT_TAG = re.compile(r"^(step|epoch)_(\d+)\.(pt|dcp)$")  # a file, or a sharded (FSDP) folder

#: Set by lmkit's launcher for its workers: the run folder it claimed (absolute path) ...
RUN_DIR_ENV = "LMKIT_RUN_DIR"
#: ... and the launcher's pid, which holds that folder's lock for its workers.
LOCK_PID_ENV = "LMKIT_RUN_LOCK_PID"


def parse_checkpoint_tag(name: str) -> tuple[str, int] | None:
    """``"step_0002000.pt" -> ("step", 2000)``, ``"epoch_005.pt" -> ("epoch", 5)``; ``None``
    for any other file name (``latest.pt``, ``best.pt``, a temporary file)."""
    match = CHECKPOINT_TAG.match(name)
    return (match.group(1), int(match.group(2))) if match else None


class RunDir:
    """Paths of one run directory."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._claimed = False
        self._lock_file: Any = None

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

    # ------------------------------------------------------------------ new runs

    @classmethod
    def claim(cls, config: RunConfig) -> RunDir:
        """Create ``out_dir/name`` and claim it for a new run (a timestamped name, with
        ``-2``, ``-3`` ... appended on a clash, when none is given).

        Raises:
            ConfigError: the named folder already holds a run, or ``out_dir`` is not a folder.
        """
        out_dir = Path(config.out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise ConfigError(f"--out-dir {out_dir}: is a file, not a folder")
        base = config.name or default_run_name(config)
        for n in range(1, 1000):
            name = base if n == 1 else f"{base}-{n}"
            run = cls(out_dir / name)
            try:
                run.path.mkdir(parents=True, exist_ok=True)
                fd = os.open(run.config_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                if run._never_started():  # a run stopped during set-up: its folder is free again
                    run._claimed = True
                    run.write_config(config.model_copy(update={"name": name}))
                    return run
                if config.name is not None:
                    raise ConfigError(
                        f"--name {name}: {run.path} already holds a run; pick another --name, "
                        f"resume it with `lmkit resume {run.path}`, or delete that folder"
                    ) from None
                continue
            except (NotADirectoryError, PermissionError) as exc:
                raise ConfigError(f"--out-dir {out_dir}: cannot create {run.path} ({exc.strerror})") from None
            os.close(fd)
            run._claimed = True
            run.lock()
            run.write_config(config.model_copy(update={"name": name}))
            return run
        raise ConfigError(f"--out-dir {out_dir}: too many runs named {base}-N")  # pragma: no cover

    @classmethod
    def claimed(cls, path: Path) -> RunDir:
        """Take over a folder claimed for this run before this process started (by lmkit's
        launcher, which holds its lock): the run starts afresh there. When an earlier attempt
        of the same launch wrote records but no checkpoint (it failed before its first save),
        they are moved to ``superseded/`` as on a resume from step 0, TensorBoard files included.

        Raises:
            ConfigError: no claimed run there (no ``config.yaml``), or another process holds it.
        """
        run = cls(path)
        if not run.config_path.is_file():
            raise ConfigError(f"{path}: not a claimed run folder (no config.yaml)")
        run.lock()
        if run.metrics_path.exists() or run.events_path.exists():
            run.supersede_records_after(-1)
            old = sorted(p for p in run.tb_dir.iterdir() if p.is_file()) if run.tb_dir.is_dir() else []
            if old:
                aside = run.superseded_dir / f"tb.{time.strftime('%Y%m%d-%H%M%S')}"
                aside.mkdir(parents=True, exist_ok=True)
                for file in old:
                    os.replace(file, aside / file.name)
        return run

    def held_by_launcher(self) -> bool:
        """Whether this process is a worker of the lmkit launcher that holds this folder's
        lock: :data:`RUN_DIR_ENV` names this folder, :data:`LOCK_PID_ENV` is this process's
        parent, and ``.lock`` records that pid."""
        folder, pid = os.environ.get(RUN_DIR_ENV), os.environ.get(LOCK_PID_ENV)
        if not folder or not pid or not pid.isdigit() or int(pid) != os.getppid():
            return False
        try:
            same = Path(folder).resolve() == self.path.resolve()
            return same and (self.path / ".lock").read_text().strip() == pid
        except OSError:
            return False

    def _never_started(self) -> bool:
        """True (and the folder locked) when it holds a config but no run ever wrote to it."""
        try:
            self.lock()
        except ConfigError:
            return False
        started = (self.metrics_path.exists() or any(self.checkpoints.glob("*.pt"))
                   or any(self.checkpoints.glob("*.dcp")))
        if started:
            self.unlock()
        return not started

    def release(self) -> None:
        """Undo :meth:`claim` when set-up failed before training wrote anything."""
        if self._claimed:
            for path in (self.config_path, self.path / ".lock"):
                path.unlink(missing_ok=True)
            try:
                self.path.rmdir()  # only succeeds when nothing else is there
            except OSError:
                pass
        self.unlock()

    def create(self) -> None:
        for sub in (self.path, self.checkpoints, self.tb_dir):
            sub.mkdir(parents=True, exist_ok=True)
        self._claimed = False

    # ------------------------------------------------------------------ lock

    def lock(self) -> None:
        """Take the run's exclusive lock for this process (released at :meth:`unlock` or exit).

        Raises:
            ConfigError: another process holds it.
        """
        if self._lock_file is not None or self.held_by_launcher():
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks
            return
        handle = (self.path / ".lock").open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            pid = handle.read().strip() or "?"
            handle.close()
            raise ConfigError(f"{self.path} is in use by another lmkit process (pid {pid}); "
                              "wait for it to finish or stop it first") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_file = handle

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # ------------------------------------------------------------------ existing runs

    @classmethod
    def existing(cls, name_or_path: str | Path, out_dir: str | Path = "runs") -> RunDir:
        """A run folder given as a path or as a name under ``out_dir``.

        Raises:
            ConfigError: no such run (listing the runs that exist).
        """
        candidates = [Path(name_or_path), Path(out_dir) / str(name_or_path)]
        for path in candidates:
            if (path / "config.yaml").is_file():
                return cls(path)
        runs = sorted(p.parent.name for p in Path(out_dir).glob("*/config.yaml")) if Path(out_dir).is_dir() else []
        raise ConfigError(f"{name_or_path}: no run there (no config.yaml); runs in {out_dir}/: {', '.join(runs) or 'none'}")

    # ------------------------------------------------------------------ files

    def write_config(self, config: RunConfig) -> None:
        _atomic_write_text(self.config_path, config.to_yaml())

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write_text(self.summary_path, json.dumps(summary, indent=2) + "\n")

    def checkpoint_path(self, tag: str) -> Path:
        return self.checkpoints / f"{tag}.pt"

    @property
    def superseded_dir(self) -> Path:
        """``runs/NAME/superseded/``: log records of abandoned continuations, moved aside by
        :meth:`supersede_records_after` (checkpoints go to ``checkpoints/superseded/``)."""
        return self.path / "superseded"

    def supersede_records_after(self, step: int) -> SupersededRecords:
        """For a resume from ``step``: move the ``metrics.jsonl`` records of later steps (an
        abandoned continuation) and lines cut short by a crash out of ``metrics.jsonl`` into
        ``superseded/metrics.jsonl``, byte for byte, in their order; mark later
        ``events.jsonl`` records ``"superseded": true`` in place (unreadable lines there go to
        ``superseded/events.jsonl``). Nothing is deleted: where the file in ``superseded/``
        exists already (an earlier resume), a new one is named with the time,
        ``metrics.YYYYmmdd-HHMMSS.jsonl``. The moved lines are written and fsynced before the
        log is rewritten, so a crash in between leaves them twice, never nowhere.
        """
        moved_metrics, metrics_aside = self.supersede_log_after(self.metrics_path.name, step)
        marked, events_aside = 0, None
        if self.events_path.exists():
            lines, unreadable = [], []
            for line in self.events_path.read_bytes().splitlines(keepends=True):
                record = _record(line)
                if record is _BLANK:
                    continue
                if not isinstance(record, dict):
                    unreadable.append(line)
                    continue
                if isinstance(record.get("step"), int) and record["step"] > step and not record.get("superseded"):
                    record["superseded"] = True
                    marked += 1
                    line = (json.dumps(record) + "\n").encode()
                lines.append(line if line.endswith(b"\n") else line + b"\n")
            if unreadable:
                events_aside = self._set_aside(self.events_path.name, unreadable)
            if marked or unreadable:
                _atomic_write_bytes(self.events_path, b"".join(lines))
        return SupersededRecords(moved_metrics, marked, metrics_aside, events_aside)

    def supersede_log_after(self, name: str, step: int) -> tuple[int, Path | None]:
        """For a resume from ``step``: move the records of ``runs/NAME/<name>`` (a JSON-lines
        log whose records carry ``step``, e.g. ``metrics.jsonl`` or a feature's ``svd.jsonl``)
        of later steps, and lines cut short by a crash, to ``superseded/<name>`` as
        :meth:`supersede_records_after` does for ``metrics.jsonl``. Returns (lines moved,
        where they went or ``None``)."""
        path = self.path / name
        if not path.exists():
            return 0, None
        kept, later = [], []
        for line in path.read_bytes().splitlines(keepends=True):
            record = _record(line)
            if record is _BLANK:
                continue
            if isinstance(record, dict) and _step_of(record) <= step:
                kept.append(line if line.endswith(b"\n") else line + b"\n")
            else:
                later.append(line)  # a later step, or a line cut short by a crash
        if not later:
            return 0, None
        aside = self._set_aside(name, later)
        _atomic_write_bytes(path, b"".join(kept))
        return len(later), aside

    def drop_records_after(self, step: int) -> tuple[int, int]:
        """Deprecated name of :meth:`supersede_records_after` (the records are moved aside,
        not dropped): returns ``(metrics records moved aside, events records marked)``."""
        result = self.supersede_records_after(step)
        return result.metrics, result.events

    def _set_aside(self, name: str, lines: list[bytes]) -> Path:
        """Write ``lines`` (bytes, as read) to a new file in ``superseded/``, fsynced."""
        self.superseded_dir.mkdir(exist_ok=True)
        stem, suffix = os.path.splitext(name)
        target = self.superseded_dir / name
        stamp = time.strftime("%Y%m%d-%H%M%S")
        n = 1
        while target.exists():
            target = self.superseded_dir / f"{stem}.{stamp}{'' if n == 1 else f'-{n}'}{suffix}"
            n += 1
        with target.open("xb") as f:
            f.write(b"".join(lines))
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.superseded_dir)
        return target


@dataclass(frozen=True)
class SupersededRecords:
    """What :meth:`RunDir.supersede_records_after` did.

    ``metrics``: lines moved out of ``metrics.jsonl`` (records of later steps, and lines cut
    short by a crash) into ``metrics_path`` (``None`` when there were none); ``events``:
    ``events.jsonl`` records of later steps marked ``"superseded": true`` (they stay in
    place); ``events_path``: where unreadable ``events.jsonl`` lines went (``None``: none).
    """

    metrics: int
    events: int
    metrics_path: Path | None
    events_path: Path | None


_BLANK = object()


def _record(line: bytes) -> Any:
    """The JSON value of one log line; ``_BLANK`` for an empty line; ``None`` if unreadable."""
    if not line.strip():
        return _BLANK
    try:
        return json.loads(line)
    except ValueError:
        return None


def _step_of(record: dict[str, Any]) -> float:
    try:
        return int(record.get("step", 0))
    except (TypeError, ValueError):
        return math.inf  # no readable step: not provably before the checkpoint, so moved aside


def default_run_name(config: RunConfig) -> str:
    """``PRESET-YYYYmmdd-HHMMSS`` (``run-...`` without a preset)."""
    stem = config.preset or "run"
    return f"{Path(stem).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - platforms without directory fds
        pass
