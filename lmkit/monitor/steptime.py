"""Step-time jumps, seen from the observer side: one warning when training suddenly slows down.

A process that starts sharing the machine mid-run (a test suite, a browser, another job on a
shared node) can make torch's threads spin-wait for cores it holds: on a 2-core machine single
steps swung from 92 to 2,918 ms and nothing said why (issue 17). :class:`StepTimeWatch` follows
the :class:`~lmkit.events.StepMetrics` stream and, when a log window's mean step time exceeds
:data:`JUMP_RATIO` times the median of the run's earlier windows, returns a
:class:`~lmkit.events.StepTimeJump` for the renderer to show.

Rules:

* no verdict before :data:`MIN_WINDOWS` earlier log windows (the first includes warm-up);
* the median is over every earlier log window of this session (a :class:`RunStarted` starts
  afresh, e.g. on resume), each window counting once; ``step_time_s`` excludes evaluation and
  checkpoint saves, so those never look like a jump;
* a jump must also be :data:`MIN_EXCESS_S` seconds slower than the median (timer jitter of
  millisecond steps is no news);
* once per slowdown: after a warning the watch stays quiet until :data:`REARM_WINDOWS` windows
  in a row are back under :data:`NORMAL_RATIO` times the median, then a new jump warns again.

The trainer does not emit :class:`StepTimeJump`; should an emitter send one, :meth:`expand`
passes it through (unless this watch already flagged that step) and the watch stands down.

Cost: O(log n) per log line (two heaps keep the running median); nothing per training step.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from lmkit.events import Event, RunStarted, StepMetrics, StepTimeJump

#: A window this many times slower than the run's median is a jump.
JUMP_RATIO = 3.0
#: Earlier log windows needed before any verdict.
MIN_WINDOWS = 5
#: ... and at least this many seconds slower than the median.
MIN_EXCESS_S = 0.01
#: A window under this many times the median counts as back to normal.
NORMAL_RATIO = 1.5
#: Normal windows in a row before a new jump may warn again.
REARM_WINDOWS = 5


class RunningMedian:
    """Median of the values added so far (two heaps: O(log n) per :meth:`add`, O(1) median)."""

    def __init__(self) -> None:
        self._low: list[float] = []  # max-heap of the lower half (negated)
        self._high: list[float] = []  # min-heap of the upper half

    def __len__(self) -> int:
        return len(self._low) + len(self._high)

    def add(self, value: float) -> None:
        if self._low and value > -self._low[0]:
            heapq.heappush(self._high, value)
        else:
            heapq.heappush(self._low, -value)
        if len(self._low) > len(self._high) + 1:
            heapq.heappush(self._high, -heapq.heappop(self._low))
        elif len(self._high) > len(self._low):
            heapq.heappush(self._low, -heapq.heappop(self._high))

    def median(self) -> float:
        """The median (mean of the middle two for an even count). Raises IndexError when empty."""
        if len(self._low) > len(self._high):
            return -self._low[0]
        return (-self._low[0] + self._high[0]) / 2


class StepTimeWatch:
    """Watches :class:`StepMetrics` for step-time jumps; renderers call it with every event.

    ``watch(event)`` returns the :class:`StepTimeJump` to show after ``event``, or ``None``;
    :meth:`expand` yields the event itself and then any jump, for a renderer's dispatch loop.
    """

    def __init__(self, *, ratio: float = JUMP_RATIO, min_windows: int = MIN_WINDOWS,
                 min_excess_s: float = MIN_EXCESS_S) -> None:
        self.ratio = ratio
        self.min_windows = min_windows
        self.min_excess_s = min_excess_s
        self.upstream = False  # an emitter sends StepTimeJump itself
        self._flagged: int | None = None  # the step of the last jump this watch returned
        self._reset("cpu")

    def _reset(self, device_type: str) -> None:
        self.device_type = device_type
        self._median = RunningMedian()
        self._armed = True
        self._normal_run = 0

    def __call__(self, event: Event) -> StepTimeJump | None:
        if isinstance(event, RunStarted):
            self._reset(event.device.split(":")[0])
        elif isinstance(event, StepTimeJump):
            self.upstream = True
        elif isinstance(event, StepMetrics) and not self.upstream:
            return self._step(event)
        return None

    def expand(self, event: Event) -> Iterator[Event]:
        """``event``, then the jump it reveals (if any); an emitted jump this watch already showed is
        dropped."""
        if isinstance(event, StepTimeJump) and event.step == self._flagged:
            self.upstream = True
            return
        jump = self(event)
        yield event
        if jump is not None:
            yield jump

    def _step(self, e: StepMetrics) -> StepTimeJump | None:
        now = e.step_time_s
        if not now > 0:  # NaN, zero: nothing to judge, nothing to learn
            return None
        jump = None
        if len(self._median) >= self.min_windows:
            median = self._median.median()
            ratio = now / median if median > 0 else float("inf")
            if ratio > self.ratio and now - median >= self.min_excess_s:
                self._normal_run = 0
                if self._armed:
                    self._armed, self._flagged = False, e.step
                    jump = StepTimeJump(step=e.step, ratio=ratio, median_s=median, now_s=now,
                                        device_type=self.device_type)
            elif ratio < NORMAL_RATIO:
                self._normal_run += 1
                if self._normal_run >= REARM_WINDOWS:
                    self._armed = True
            else:
                self._normal_run = 0
        self._median.add(now)
        return jump


__all__ = ["JUMP_RATIO", "MIN_WINDOWS", "RunningMedian", "StepTimeWatch"]
