"""System sampling on a background thread: GPUs through NVML, the host through psutil.

:class:`Sampler` takes a :class:`SystemSample` about once a second on a daemon thread
and hands it to a callback (the dashboard). It reads only driver counters (NVML, see
:mod:`lmkit.monitor.nvml`) and ``/proc`` (psutil): it never touches torch, never creates
a CUDA context and never synchronises a stream, so it costs the training loop nothing
but a few hundred microseconds of the GIL per second.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lmkit.monitor.nvml import GpuStat, nvml_error, query_gpus


@dataclass(frozen=True)
class HostStat:
    """This process and its machine at one moment.

    Attributes:
        rss_bytes: resident set size of this process (bytes).
        cpu_percent: CPU use of this process since the previous sample, in percent of
            one core (200.0 = two cores busy), as ``psutil.Process.cpu_percent``.
        n_cpus: logical CPUs of the machine.
        threads: threads of this process.
        mem_used_bytes / mem_total_bytes: the machine's memory in use / installed (bytes).
    """

    rss_bytes: int
    cpu_percent: float
    n_cpus: int
    threads: int
    mem_used_bytes: int
    mem_total_bytes: int


@dataclass(frozen=True)
class SystemSample:
    """One sample: ``gpus`` (``[]`` without NVML), ``host`` (``None`` if psutil failed),
    ``nvml_error`` (why NVML is unavailable, ``None`` when it works) and the wall time."""

    gpus: list[GpuStat]
    host: HostStat | None
    nvml_error: str | None = None
    time: float = field(default_factory=time.time)


class HostProbe:
    """Reads :class:`HostStat` for this process; the first ``cpu_percent`` is 0.0
    (psutil measures CPU use between two calls)."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._process = psutil.Process(os.getpid())
        self._process.cpu_percent(None)  # start the measuring interval
        self._n_cpus = psutil.cpu_count() or 1

    def __call__(self) -> HostStat | None:
        try:
            with self._process.oneshot():
                rss = self._process.memory_info().rss
                cpu = self._process.cpu_percent(None)
                threads = self._process.num_threads()
            vm = self._psutil.virtual_memory()
            return HostStat(rss_bytes=int(rss), cpu_percent=float(cpu), n_cpus=self._n_cpus, threads=int(threads),
                            mem_used_bytes=int(vm.total - vm.available), mem_total_bytes=int(vm.total))
        except Exception:  # noqa: BLE001 - a sampler must never take the run down
            return None


def sample_system(host: HostProbe | None = None, gpus: bool = True) -> SystemSample:
    """One :class:`SystemSample` now (NVML when ``gpus``; the host when ``host`` is given)."""
    stats = query_gpus() if gpus else []
    return SystemSample(gpus=stats, host=host() if host is not None else None,
                        nvml_error=nvml_error() if gpus and not stats else None)


class Sampler:
    """Calls ``on_sample(SystemSample)`` every ``interval`` seconds on a daemon thread.

    Args:
        on_sample: receives each sample (on the sampler thread; keep it cheap).
        interval: seconds between samples (default 1.0, i.e. ~1 Hz).
        gpus: query NVML (set ``False`` on CPU/MPS runs to skip even the import).
        host: sample this process and the machine with psutil.

    ``start()`` takes the first sample at once; ``stop()`` wakes the thread and joins it
    (at most ``interval`` + one sample). Usable as a context manager. Exceptions raised by
    ``on_sample`` are swallowed: monitoring never stops training.
    """

    def __init__(self, on_sample: Callable[[SystemSample], None], *, interval: float = 1.0, gpus: bool = True,
                 host: bool = True) -> None:
        self.on_sample = on_sample
        self.interval = interval
        self.gpus = gpus
        self.host = host
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0
        self.cpu_seconds = 0.0  # CPU time of this thread (time.thread_time), for overhead checks

    def _run(self) -> None:
        probe: HostProbe | None = None
        if self.host:
            try:
                probe = HostProbe()
            except Exception:  # noqa: BLE001 - no psutil / no /proc: GPUs only
                probe = None
        while not self._stop.is_set():
            started, cpu = time.monotonic(), time.thread_time()
            try:
                self.on_sample(sample_system(probe, self.gpus))
                self.samples += 1
            except Exception:  # noqa: BLE001
                pass
            self.cpu_seconds += time.thread_time() - cpu
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def start(self) -> Sampler:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="lmkit-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread and wait for it (up to ``timeout`` seconds, default 2 intervals)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout if timeout is not None else 2 * self.interval + 1.0)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["HostProbe", "HostStat", "Sampler", "SystemSample", "sample_system"]
