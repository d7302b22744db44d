"""Opt-in: follow the CPU's load during a run (``training.adapt_threads: true``).

The thread policy (:mod:`lmkit.threads`) picks torch's thread count once, at start. A process
that starts competing later (a test suite, a browser, another job on a shared node) then makes
those threads spin-wait for the cores it holds -- steps several times slower (issue 17). With
``adapt_threads`` the trainer looks at the usable cores every :data:`CHECK_EVERY_S` seconds of
training (two :func:`lmkit.threads.cpu_snapshot` calls: no sleep, tens of microseconds) and,
when :data:`CONFIRM` windows in a row agree, sets

    threads = usable cores - cores other processes kept busy in the window (1 .. start count)

and says so in a :class:`~lmkit.events.Notice`. The count never rises above the one the run
started with (``training.threads``, which a resume uses again).

Off by default, because it breaks bitwise reproducibility: reductions split over another
number of threads round differently (1 vs 2 threads: gradients differ by ~1e-8), so a run that
changed its count is no longer the run a resume or a rerun reproduces; the first change says
that too. The CPU only (a GPU run's host threads hardly touch the math).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmkit.events import Notice
from lmkit.threads import CpuSnapshot, busy_between, cpu_snapshot, usable_cores
from lmkit.training.hooks import StepOutput, TrainingHook

if TYPE_CHECKING:  # pragma: no cover
    from lmkit.training.loop import Trainer

#: Seconds of training between two looks at the load.
CHECK_EVERY_S = 5.0
#: Windows in a row that must ask for the same new count before it is applied.
CONFIRM = 2

__all__ = ["CHECK_EVERY_S", "CONFIRM", "ThreadAdapter", "wanted_threads"]


def wanted_threads(usable: int, other_busy: float, ceiling: int) -> int:
    """The count for ``usable`` cores when others keep ``other_busy`` of them busy:
    ``round(usable - other_busy)``, within ``[1, ceiling]``."""
    return max(1, min(ceiling, int(usable - other_busy + 0.5)))


class ThreadAdapter(TrainingHook):
    """Adjusts ``torch.set_num_threads`` to the CPU's load between steps (module docstring).

    Attributes:
        ceiling: the run's starting thread count (never exceeded).
        changes: ``(step, old, new, other_busy)`` of every change made.
    """

    name = "thread_adapt"

    def __init__(self, check_every_s: float | None = None, confirm: int | None = None):
        self.check_every_s = CHECK_EVERY_S if check_every_s is None else check_every_s
        self.confirm = CONFIRM if confirm is None else confirm
        self.ceiling = torch.get_num_threads()
        self.changes: list[tuple[int, int, int, float]] = []
        self._last: CpuSnapshot | None = None
        self._pending: tuple[int, int] | None = None  # (wanted count, windows in a row)

    def on_start(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.ceiling = torch.get_num_threads()
        self._last = cpu_snapshot()

    def after_step(self, trainer: Trainer, step: StepOutput) -> None:
        now = cpu_snapshot()
        if self._last is None or now.wall - self._last.wall < self.check_every_s:
            if self._last is None:
                self._last = now
            return
        window, self._last = busy_between(self._last, now), now
        current = torch.get_num_threads()
        want = wanted_threads(usable_cores(), window.other, self.ceiling)
        if want == current:
            self._pending = None
            return
        count = self._pending[1] + 1 if self._pending and self._pending[0] == want else 1
        self._pending = (want, count)
        if count < self.confirm:
            return
        self._pending = None
        torch.set_num_threads(want)
        self.changes.append((step.step, current, want, window.other))
        first = len(self.changes) == 1
        trainer.emit(Notice(level="warning" if first else "info", message=(
            f"threads: {current} -> {want} after step {step.step}: other processes kept ~{window.other:.1f} of "
            f"{usable_cores()} usable cores busy (training.adapt_threads)"
            + ("; from here on the run is not bitwise reproducible (another thread count rounds differently)"
               if first else ""))))
