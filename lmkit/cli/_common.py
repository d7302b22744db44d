"""Error handling shared by every command.

A :class:`~lmkit.errors.LmkitError` becomes one line on stderr -- ``error: ...`` -- and
its exit code; Ctrl-C exits 130; anything unexpected says so in one line and exits 1.
``--debug`` (or ``LMKIT_DEBUG=1``) also prints the traceback; the exit code stays the same
(scripts and schedulers read it).
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from lmkit.errors import Interrupted, LmkitError

DEBUG = False
F = TypeVar("F", bound=Callable[..., Any])


def error_line(message: str) -> None:
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()


def distributed_rank() -> int:
    """This process's rank under torchrun (``RANK``, else ``LOCAL_RANK``); 0 when not
    launched by torchrun or when the variable is not a number."""
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


#: The smallest terminal the dashboard is drawn on; smaller ones get the progress line.
DASHBOARD_MIN_SIZE = (80, 20)


def render_run(job: Callable[[Callable], dict], *, no_tui: bool, json_out: bool) -> dict:
    """Run ``job(emit)`` with the right renderer.

    * rank != 0 under torchrun: only warnings, on stderr, prefixed ``[rank N]``;
    * on a terminal (and not ``--no-tui``): the live dashboard
      (:class:`lmkit.monitor.dashboard.Dashboard`), or a one-line progress bar when the
      terminal is smaller than 80x20;
    * otherwise (a pipe, a file, CI, SLURM logs): plain lines, one per log interval.

    Plain output goes to stdout, or to stderr when ``--json`` owns stdout. The live
    display is stopped and the cursor shown again however ``job`` ends (error, Ctrl-C)."""
    from lmkit.monitor.console import PlainLog, RichProgress, WarningsOnly

    rank = distributed_rank()
    if rank != 0:
        return job(WarningsOnly(sys.stderr, rank))
    stream = sys.stderr if json_out else sys.stdout
    if stream.isatty() and not no_tui:
        from rich.console import Console

        console = Console(file=stream)
        if console.width >= DASHBOARD_MIN_SIZE[0] and console.height >= DASHBOARD_MIN_SIZE[1]:
            from lmkit.monitor.dashboard import Dashboard

            renderer: Any = Dashboard(console)
        else:
            renderer = RichProgress(console)
        try:
            return job(renderer)
        finally:
            renderer.close()
    return job(PlainLog(stream))


def _traceback() -> None:
    """With ``--debug``: the traceback of the exception being handled, on stderr."""
    if DEBUG:
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()


def handle_errors(func: F) -> F:
    """Decorator for command bodies: turn lmkit's errors into one line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except Interrupted as exc:  # a requested stop, not an error
            sys.stderr.write(f"{exc}\n")
            raise typer.Exit(exc.exit_code) from None
        except LmkitError as exc:
            _traceback()
            error_line(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _traceback()
            error_line("interrupted; nothing was saved")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - last line of defence, one line instead of a traceback
            _traceback()
            error_line(f"unexpected {type(exc).__name__}: {exc}"
                       + ("" if DEBUG else " (run `lmkit --debug ...` for the traceback)"))
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
