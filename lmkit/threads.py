"""The CPU thread policy: how many threads torch's intra-op pool gets.

torch's default is one OpenMP thread per core. When another process keeps a core busy,
those threads spin-wait for it: on a 2-core machine with one busy process, 100 steps of the
``pilot`` preset took 18.2 s with the default 2 threads and 11.0 s with 1 (medians of 3;
idle: 8.1 s with 2, 10.5 s with 1). No OpenMP setting fixes both cases (measured:
``GOMP_SPINCOUNT=1000`` costs 6% idle and still loses 30% when contended;
``OMP_WAIT_POLICY=PASSIVE`` loses 30% idle), so the policy picks the *count*:

    threads = usable cores - cores other processes keep busy right now (at least 1)

"usable" is ``os.sched_getaffinity`` (what SLURM, ``taskset`` or a container allow);
"busy" is sampled over :data:`SAMPLE_S` seconds from the system's CPU times, less this
process's own. The user always wins: ``--threads N``, then ``LMKIT_THREADS``, then
``OMP_NUM_THREADS`` (left to torch untouched) come before the automatic choice.

The thread count changes the last bits of results (reductions are split differently), so
a run records it (``training.threads`` in ``config.yaml``) and a resume uses the same count.

The ``lmkit`` CLI applies the policy; library code calls :func:`choose_threads` /
:func:`apply_threads` itself. Importing this module does nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from lmkit.errors import ConfigError

#: Seconds over which other processes' CPU use is sampled.
SAMPLE_S = 0.15


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count and why it was chosen.

    Attributes:
        threads: intra-op threads for torch (``torch.set_num_threads``).
        source: ``--threads``, ``LMKIT_THREADS``, ``OMP_NUM_THREADS``, ``config`` or ``auto``.
        reason: one line for the run header, e.g. ``"1 of 2 usable cores: other processes keep
            1.0 busy (choose with --threads N)"``.
    """

    threads: int
    source: str
    reason: str


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; ``os.cpu_count()`` where unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def busy_cores(interval: float = SAMPLE_S) -> float:
    """Cores kept busy by *other* processes, averaged over ``interval`` seconds.

    The system's busy CPU time (user + system + nice + irq + softirq + steal) over the
    interval, less this process's own CPU time in it, divided by the interval. Needs psutil;
    returns 0.0 where it is missing.
    """
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return 0.0

    def system_busy() -> float:
        t = psutil.cpu_times()
        return sum(getattr(t, f, 0.0) for f in ("user", "system", "nice", "irq", "softirq", "steal"))

    me = psutil.Process()
    own0, sys0, t0 = sum(me.cpu_times()[:2]), system_busy(), time.perf_counter()
    time.sleep(interval)
    own1, sys1, t1 = sum(me.cpu_times()[:2]), system_busy(), time.perf_counter()
    return max(0.0, ((sys1 - sys0) - (own1 - own0)) / max(1e-6, t1 - t0))


def _positive_int(text: str, source: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{source}={text!r}: expected a positive number of threads, e.g. {source}=1")
    return value


def choose_threads(requested: int | None = None, *, recorded: int | None = None,
                   interval: float = SAMPLE_S) -> ThreadChoice:
    """The thread count for this process (see the module docstring for the order).

    Args:
        requested: ``--threads N`` (wins over everything).
        recorded: the count a resumed run was trained with (``training.threads``): used
            unless the user asks for another, so the continuation stays bitwise.
        interval: seconds to sample other processes' CPU use (``auto`` only).

    Raises:
        ConfigError: ``LMKIT_THREADS`` / ``OMP_NUM_THREADS`` is not a positive integer.
    """
    usable = usable_cores()
    if requested is not None:
        return ThreadChoice(requested, "--threads", f"{requested} (--threads) of {usable} usable cores")
    env = os.environ.get("LMKIT_THREADS")
    if env:
        n = _positive_int(env, "LMKIT_THREADS")
        return ThreadChoice(n, "LMKIT_THREADS", f"{n} (LMKIT_THREADS) of {usable} usable cores")
    omp = os.environ.get("OMP_NUM_THREADS")
    if omp:
        n = _positive_int(omp.split(",")[0], "OMP_NUM_THREADS")
        return ThreadChoice(n, "OMP_NUM_THREADS", f"{n} (OMP_NUM_THREADS) of {usable} usable cores")
    if recorded is not None:
        return ThreadChoice(recorded, "config", f"{recorded}, as the run was started with (training.threads)")
    busy = busy_cores(interval)
    n = max(1, min(usable, usable - round(busy)))
    if n < usable:
        why = (f"{n} of {usable} usable cores: other processes keep {busy:.1f} busy, and threads waiting for a "
               "busy core slow every step (choose with --threads N)")
    else:
        why = f"{n} of {usable} usable cores (choose with --threads N)"
    return ThreadChoice(n, "auto", why)


def apply_threads(choice: ThreadChoice) -> None:
    """Give torch's intra-op pool ``choice.threads`` threads (imports torch)."""
    import torch

    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)


__all__ = ["SAMPLE_S", "ThreadChoice", "apply_threads", "busy_cores", "choose_threads", "usable_cores"]
