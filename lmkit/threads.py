"""The CPU thread policy: how many threads torch's intra-op pool gets.

torch's default is one OpenMP thread per core. When another process keeps a core busy,
those threads spin-wait for it: on a 2-core machine with one busy process, 100 steps of the
``pilot`` preset took 18.2 s with the default 2 threads and 11.0 s with 1 (medians of 3;
idle: 8.1 s with 2, 10.5 s with 1). No OpenMP setting fixes both cases (measured:
``GOMP_SPINCOUNT=1000`` costs 6% idle and still loses 30% when contended;
``OMP_WAIT_POLICY=PASSIVE`` loses 30% idle), so the policy picks the *count*:

    threads = usable cores - cores other processes keep busy right now (at least 1)

"usable" is ``os.sched_getaffinity`` (what SLURM, ``taskset`` or a container allow);
"busy" is sampled over :data:`SAMPLE_S` seconds from the per-CPU times of those usable
cores, less this process's own (:func:`sample_busy`; ``lmkit doctor`` reports the same sample). The user always wins: ``--threads N``, then ``LMKIT_THREADS``, then
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


def usable_cpus() -> list[int] | None:
    """The CPU numbers this process may run on (``os.sched_getaffinity``), ``None`` where unknown."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _busy_and_total(times) -> tuple[float, float]:
    """(busy, total) seconds of one CPU's times, as psutil's ``cpu_percent`` counts them: guest
    time is already inside user/nice on Linux; idle and iowait are not busy."""
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    return total - times.idle - getattr(times, "iowait", 0.0), total


@dataclass(frozen=True)
class CpuBusy:
    """One sample of the usable CPUs (:func:`sample_busy`).

    Attributes:
        busy: cores busy over the interval, every process included (0 .. usable).
        other: ``busy`` less this process's own CPU time: cores *other* processes keep busy.
        wall_s: the interval's length in seconds.
    """

    busy: float
    other: float
    wall_s: float


@dataclass(frozen=True)
class CpuSnapshot:
    """The CPU times :func:`busy_between` compares: per usable CPU ``(busy, total)`` seconds,
    this process's own CPU seconds, and ``time.perf_counter()``. Taking one costs tens of
    microseconds and never sleeps, so a training loop can take one every few seconds."""

    per_cpu: tuple[tuple[float, float], ...]
    own_s: float
    wall: float


def cpu_snapshot() -> CpuSnapshot:
    """The usable CPUs' times now (:class:`CpuSnapshot`; needs psutil, a dependency)."""
    import psutil

    cpus = usable_cpus()
    per = psutil.cpu_times(percpu=True)
    # per-CPU lines are in CPU order when none is offline; otherwise use them all
    pick = cpus if cpus and len(per) == (os.cpu_count() or 0) and max(cpus) < len(per) else range(len(per))
    own = sum(psutil.Process().cpu_times()[:2])
    return CpuSnapshot(per_cpu=tuple(_busy_and_total(per[i]) for i in pick), own_s=own, wall=time.perf_counter())


def busy_between(before: CpuSnapshot, after: CpuSnapshot) -> CpuBusy:
    """Busy cores of the usable set between two snapshots, all processes and others only.

    Per-CPU times of the CPUs in this process's affinity mask only (a SLURM job pinned to 4
    cores of a busy 64-core node sees its own 4), system-wide (short-lived processes count
    too), less this process's own CPU time."""
    busy = 0.0
    for (b0, n0), (b1, n1) in zip(before.per_cpu, after.per_cpu, strict=False):  # a CPU set that changed: the common part
        if n1 > n0:
            busy += min(1.0, max(0.0, (b1 - b0) / (n1 - n0)))
    wall = max(1e-6, after.wall - before.wall)
    return CpuBusy(busy=busy, other=max(0.0, busy - (after.own_s - before.own_s) / wall), wall_s=wall)


def sample_busy(interval: float = SAMPLE_S) -> CpuBusy:
    """Sample the usable CPUs' busy time for ``interval`` seconds (sleeps that long;
    :func:`busy_between` of two :func:`cpu_snapshot`)."""
    before = cpu_snapshot()
    time.sleep(max(0.0, interval))
    return busy_between(before, cpu_snapshot())


def busy_cores(interval: float = SAMPLE_S) -> float:
    """Cores of this process's usable set kept busy by *other* processes, averaged over
    ``interval`` seconds (:func:`sample_busy`'s ``other``)."""
    return sample_busy(interval).other


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
