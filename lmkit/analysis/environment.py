"""What this machine offers for training: versions, GPUs, Apple MPS, CPUs and RAM.

:func:`collect_environment` reads torch (``torch.version``, ``torch.cuda``, ``torch.backends``),
NVML through :mod:`lmkit.monitor.nvml` (driver version, free memory; never raises) and psutil.
It does not allocate on a GPU, so it creates no CUDA context and leaves the free memory it reports
as it found it. It returns data; ``lmkit doctor`` renders it.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any


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


def collect_environment() -> Environment:
    """Versions and devices of this machine. Never raises for a missing GPU, driver or NVML."""
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
    )
