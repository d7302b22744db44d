"""Stop training cleanly on SIGINT (Ctrl-C) and SIGTERM (preemption, ``kill``, SLURM).

The first signal only sets :attr:`StopRequest.signum`; the loop notices it after the
current optimizer step, saves ``latest`` and stops with exit code 128 + signal number
(130 for SIGINT, 143 for SIGTERM). A second Ctrl-C raises ``KeyboardInterrupt`` at once
(abort without saving; atomic saves mean the last good checkpoint is untouched).
The handlers that were installed before are restored on exit.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class _Handlers:
    """Installs ``_handle`` for SIGINT and SIGTERM on entry (main thread only; elsewhere a
    no-op) and restores the previous handlers on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class StopRequest(_Handlers):
    """During training: the first signal is remembered (:attr:`signum`) for the loop to
    act on after the current step; a second Ctrl-C raises ``KeyboardInterrupt`` at once."""

    def __init__(self) -> None:
        super().__init__()
        self.signum: int | None = None
        self.aborted = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            # Second Ctrl-C: abort now. The exception can be replaced on its way up: inside
            # torch.save, the zip writer's __exit__ still finalises the file and raises a
            # RuntimeError ("unexpected pos") instead, so the loop checks ``aborted`` too.
            self.aborted = True
            raise KeyboardInterrupt
        self.signum = signum


class StopNow(_Handlers):
    """During set-up (data preparation, tokenizer training): SIGINT/SIGTERM stop at once
    with :class:`~lmkit.errors.Interrupted` (exit 130/143) -- there is nothing to save yet,
    and the claimed run folder is released by the caller."""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        from lmkit.errors import Interrupted

        name = signal.Signals(signum).name
        raise Interrupted(f"stopped by {name} before training started; nothing was saved", exit_code=128 + signum)
