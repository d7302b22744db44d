"""Errors lmkit raises on purpose, each with the process exit code DESIGN.md gives.

The CLI turns any :class:`LmkitError` into one line on stderr (no traceback unless
``--debug``) and exits with ``exit_code``:

* 1 -- failed while running (:class:`TrainingError`)
* 2 -- bad input: arguments, config, data, checkpoint (:class:`ConfigError`,
  :class:`DataError`, :class:`CheckpointError`)
* 3 -- the machine cannot do what was required (:class:`DeviceError`, e.g.
  ``--gpu-only`` without CUDA, or CUDA out of memory)
* 130 -- interrupted, after saving a checkpoint (:class:`Interrupted`)
"""

from __future__ import annotations


class LmkitError(Exception):
    """Base class. ``str(err)`` is the whole one-line message shown to the user."""

    exit_code: int = 1


class TrainingError(LmkitError):
    """Training failed while running (non-finite loss, ...). Exit code 1."""

    exit_code = 1


class ConfigError(LmkitError):
    """A config value, preset, override or CLI flag is wrong. Exit code 2."""

    exit_code = 2


class DataError(LmkitError):
    """A data set, tokenizer or token shard is unusable. Exit code 2."""

    exit_code = 2


class CheckpointError(LmkitError):
    """A checkpoint is missing, corrupt or does not match the run. Exit code 2."""

    exit_code = 2


class DeviceError(LmkitError):
    """The machine cannot do what was asked (no CUDA for ``--gpu-only``, OOM). Exit code 3."""

    exit_code = 3


class Interrupted(LmkitError):
    """Training stopped on a signal after ``latest`` was saved: exit code 128 + the
    signal number (130 for SIGINT / Ctrl-C, 143 for SIGTERM)."""

    exit_code = 130

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its class name if empty), for one-line errors."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]
