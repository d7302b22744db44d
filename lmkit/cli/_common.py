"""Error handling shared by every command.

A :class:`~lmkit.errors.LmkitError` becomes one line on stderr -- ``error: ...`` -- and
its exit code; Ctrl-C exits 130; anything unexpected says so in one line and exits 1.
``--debug`` (or ``LMKIT_DEBUG=1``) re-raises instead, showing the traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from lmkit.errors import Interrupted, LmkitError

DEBUG = False
F = TypeVar("F", bound=Callable[..., Any])


def error_line(message: str) -> None:
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()


def render_run(job: Callable[[Callable], dict], *, no_tui: bool, json_out: bool) -> dict:
    """Run ``job(emit)`` with the right renderer: a Rich progress line on a terminal,
    plain lines otherwise (to stderr when ``--json`` owns stdout)."""
    from lmkit.monitor.console import PlainLog, RichProgress

    stream = sys.stderr if json_out else sys.stdout
    if stream.isatty() and not no_tui:
        from rich.console import Console

        renderer = RichProgress(Console(file=stream))
        try:
            return job(renderer)
        finally:
            renderer.close()
    return job(PlainLog(stream))


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
            if DEBUG:
                raise
            error_line(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if DEBUG:
                raise
            error_line("interrupted; nothing was saved")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - last line of defence, one line instead of a traceback
            if DEBUG:
                raise
            error_line(f"unexpected {type(exc).__name__}: {exc} (run `lmkit --debug ...` for the traceback)")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
