"""What this machine offers for training: versions, GPUs, Apple MPS, CPUs, their load and RAM.

:func:`collect_environment` reads torch (``torch.version``, ``torch.cuda``, ``torch.backends``),
NVML through :mod:`lmkit.monitor.nvml` (driver version, free memory; never raises) and psutil.
It does not allocate on a GPU, so it creates no CUDA context and leaves the free memory it reports
as it found it. It returns data; ``lmkit doctor`` renders it.

:func:`sample_cpu_load` measures what other processes take from the cores this one may use
(a short system-wide sample, ~0.2 s): torch's OpenMP threads spin-wait for a core another
process holds, so one busy process on a 2-core machine made a 2-thread training run ~4x slower
(issue 17). It says when the machine is oversubscribed and what to do.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from lmkit.threads import sample_busy, usable_cpus


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device. Memory in bytes; ``None`` where unknown.

    Attributes:
        index: CUDA device index (NVML index when torch cannot see the GPU).
        name: e.g. ``"NVIDIA H200"``.
        capability: compute capability ``"9.0"``.
        total_bytes, free_bytes: device memory (free from NVML: other processes count).
        bf16: bfloat16 tensor cores (compute capability >= 8.0).
        tf32: TF32 matmuls (compute capability >= 8.0, Ampere and later).
        usable_by_torch: this torch build can run on it.
    """

    index: int
    name: str
    capability: str | None
    total_bytes: int | None
    free_bytes: int | None
    bf16: bool | None
    tf32: bool | None
    usable_by_torch: bool


@dataclass(frozen=True)
class BusyProcess:
    """Another process's CPU use over the sample: ``cpu_percent`` of one core (200 = two cores)."""

    pid: int
    name: str
    cpu_percent: float


#: Seconds of the system-wide CPU sample of ``lmkit doctor``.
CPU_SAMPLE_S = 0.2
#: Oversubscribed when other processes' busy cores + torch's threads exceed the usable cores by
#: more than this (a little slack: an idle machine's daemons use a few percent of a core).
OVERSUBSCRIBED_SLACK = 0.5


@dataclass
class CpuLoad:
    """The load on the cores this process may use (:func:`sample_cpu_load`).

    Attributes:
        load_avg: ``os.getloadavg()``: runnable processes averaged over 1, 5, 15 minutes
            (all cores of the machine; ``None`` where the OS has none, e.g. Windows).
        usable_cores: ``len(os.sched_getaffinity(0))`` (``os.cpu_count()`` where unknown).
        sample_s: length of the sample in seconds (wall clock).
        busy_cores: cores kept busy over the sample on the usable cores, by every process
            (``/proc/stat``-style CPU times: all but idle and iowait), in cores (0..usable).
        other_busy_cores: ``busy_cores`` less this process's own CPU time (>= 0).
        top: the busiest other processes (at most 3, those above 1% of a core), busiest first.
        threads: the torch thread count judged (``torch.get_num_threads()`` of this process).
        oversubscribed: ``other_busy_cores + threads > usable_cores + OVERSUBSCRIBED_SLACK``.
        warning: what to do about it (``None`` when not oversubscribed).
    """

    load_avg: tuple[float, float, float] | None
    usable_cores: int
    sample_s: float
    busy_cores: float
    other_busy_cores: float
    top: list[BusyProcess]
    threads: int
    oversubscribed: bool
    warning: str | None


@dataclass
class Environment:
    """The answer of :func:`collect_environment` (``to_dict`` for ``lmkit doctor --json``)."""

    python: str
    platform: str
    lmkit: str
    torch: str
    cuda: str | None
    cudnn: str | None
    driver: str | None
    cuda_available: bool
    cuda_note: str | None
    gpus: list[GpuInfo] = field(default_factory=list)
    mps_built: bool = False
    mps_available: bool = False
    cpu_count: int | None = None
    cpu_usable: int | None = None
    torch_threads: int | None = None
    ram_total_bytes: int | None = None
    ram_available_bytes: int | None = None
    tf32_matmul_enabled: bool | None = None
    nvml_error: str | None = None
    cpu_load: CpuLoad | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cudnn_version(torch) -> str | None:
    try:
        if not torch.backends.cudnn.is_available():
            return None
        v = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001 - a broken cuDNN install is a fact to report, not a crash
        return None
    if v is None:
        return None
    major, minor, patch = v // 10000, (v // 100) % 100, v % 100  # cuDNN >= 9 encodes M*10000 + m*100 + p
    if major == 0:
        major, minor, patch = v // 1000, (v // 100) % 10, v % 100  # cuDNN 8: M*1000 + m*100 + p
    return f"{major}.{minor}.{patch}"


def _uuid(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if text.startswith("GPU-") else f"GPU-{text}"


def oversubscription_warning(other_busy: float, usable: int, threads: int,
                             top: list[BusyProcess] = ()) -> str | None:
    """The warning for a machine where other processes leave torch's ``threads`` too few cores
    (``other_busy + threads > usable + OVERSUBSCRIBED_SLACK``), or ``None``."""
    if other_busy + threads <= usable + OVERSUBSCRIBED_SLACK:
        return None
    fit = max(1, min(threads - 1, int(usable - other_busy + 0.5)))
    busiest = f" (busiest: {top[0].name}, pid {top[0].pid}, {top[0].cpu_percent:.0f}% of a core)" if top else ""
    return (f"other processes keep ~{other_busy:.1f} of {usable} cores busy; torch's {threads} threads will "
            f"spin-wait for them (training can run several times slower): a new lmkit train picks fewer "
            f"threads itself; pass --threads {fit} to a resume or another torch program, or stop the other "
            f"work{busiest}")


def sample_cpu_load(seconds: float = CPU_SAMPLE_S, threads: int | None = None) -> CpuLoad:
    """Sample the load on this process's usable cores for ``seconds`` (sleeps that long).

    Busy cores come from the per-CPU times of the usable CPUs (system-wide, so short-lived
    processes count too), less this process's own CPU time; the top processes from psutil's
    per-process ``cpu_percent`` over the same interval. ``threads`` defaults to
    ``torch.get_num_threads()``. Never raises for an unreadable process (it is skipped).
    """
    import psutil

    if threads is None:
        import torch

        threads = torch.get_num_threads()
    try:
        load_avg = tuple(round(x, 2) for x in os.getloadavg())
    except (AttributeError, OSError):
        load_avg = None
    cpus = usable_cpus()
    usable = len(cpus) if cpus else (os.cpu_count() or 1)
    me = os.getpid()
    procs = []
    for proc in psutil.process_iter(["pid", "name"]):
        if proc.pid == me:
            continue
        try:
            proc.cpu_percent(None)  # primes the per-process counter
            procs.append(proc)
        except (psutil.Error, OSError):
            continue
    sample = sample_busy(seconds)  # the thread policy's own measurement, over the same interval
    busy, other, wall = sample.busy, sample.other, sample.wall_s
    top: list[BusyProcess] = []
    for proc in procs:
        try:
            pct = proc.cpu_percent(None)
        except (psutil.Error, OSError):
            continue
        if pct > 1.0:
            top.append(BusyProcess(pid=proc.pid, name=proc.info.get("name") or "?", cpu_percent=round(pct, 1)))
    top = sorted(top, key=lambda p: -p.cpu_percent)[:3]
    warning = oversubscription_warning(other, usable, threads, top)
    return CpuLoad(load_avg=load_avg, usable_cores=usable, sample_s=round(wall, 3), busy_cores=round(busy, 2),
                   other_busy_cores=round(other, 2), top=top, threads=threads, oversubscribed=warning is not None,
                   warning=warning)


def collect_environment(cpu_sample_s: float | None = CPU_SAMPLE_S) -> Environment:
    """Versions and devices of this machine. Never raises for a missing GPU, driver or NVML.

    ``cpu_sample_s``: seconds of the CPU-load sample (:func:`sample_cpu_load`); ``None`` skips it
    (``cpu_load`` is then ``None``)."""
    import psutil
    import torch

    from lmkit import __version__
    from lmkit.monitor import nvml

    nv_gpus = nvml.query_gpus()
    by_uuid = {g.uuid: g for g in nv_gpus if g.uuid}
    cuda_available = torch.cuda.is_available()
    gpus: list[GpuInfo] = []
    note = None
    if cuda_available:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            nv = by_uuid.get(_uuid(getattr(props, "uuid", None)))
            if nv is None and len(nv_gpus) == torch.cuda.device_count():
                nv = nv_gpus[i]
            ampere = props.major >= 8
            gpus.append(GpuInfo(index=i, name=props.name, capability=f"{props.major}.{props.minor}",
                                total_bytes=int(props.total_memory),
                                free_bytes=nv.mem_free_bytes if nv is not None else None,
                                bf16=ampere, tf32=ampere, usable_by_torch=True))
    else:
        if torch.version.cuda is None:
            note = f"torch {torch.__version__} is a CPU-only build"
        else:
            note = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
        for g in nv_gpus:
            gpus.append(GpuInfo(index=g.index, name=g.name, capability=None, total_bytes=g.mem_total_bytes,
                                free_bytes=g.mem_free_bytes, bf16=None, tf32=None, usable_by_torch=False))
    mps = getattr(torch.backends, "mps", None)
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    vm = psutil.virtual_memory()
    try:
        tf32_enabled = bool(torch.backends.cuda.matmul.allow_tf32)
    except Exception:  # noqa: BLE001 - newer torch: fp32_precision API only
        tf32_enabled = None
    return Environment(
        python=sys.version.split()[0],
        platform=platform.platform(),
        lmkit=__version__,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=_cudnn_version(torch),
        driver=nvml.driver_version(),
        cuda_available=cuda_available,
        cuda_note=note,
        gpus=gpus,
        mps_built=bool(mps is not None and mps.is_built()),
        mps_available=bool(mps is not None and mps.is_available()),
        cpu_count=os.cpu_count(),
        cpu_usable=usable,
        torch_threads=torch.get_num_threads(),
        ram_total_bytes=int(vm.total),
        ram_available_bytes=int(vm.available),
        tf32_matmul_enabled=tf32_enabled,
        nvml_error=nvml.nvml_error(),
        cpu_load=sample_cpu_load(cpu_sample_s) if cpu_sample_s is not None else None,
    )
