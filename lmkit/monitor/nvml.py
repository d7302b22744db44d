"""GPU facts from NVML (``pynvml``, shipped by the ``nvidia-ml-py`` package).

NVML reads the driver's counters: it never touches a CUDA context and never
synchronises a stream, so it is safe to call from a background thread while a step
runs. Every function here degrades to "nothing known" (``[]`` / ``None``) when NVML,
the driver or a GPU is missing, and never raises.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

_lock = threading.Lock()
_state: dict[str, Any] = {"tried": False, "ok": False, "error": None}


@dataclass(frozen=True)
class GpuStat:
    """One GPU at one moment. Memory in bytes, temperature in °C, power in W;
    ``None`` where the driver does not report the value."""

    index: int
    name: str
    uuid: str | None
    util_percent: float | None
    mem_used_bytes: int
    mem_total_bytes: int
    temperature_c: float | None
    power_w: float | None
    power_limit_w: float | None

    @property
    def mem_free_bytes(self) -> int:
        return self.mem_total_bytes - self.mem_used_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pynvml():
    import pynvml

    return pynvml


def nvml_init() -> bool:
    """Initialise NVML once per process; ``False`` (and :func:`nvml_error` says why)
    when it is not available."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            try:
                _pynvml().nvmlInit()
                _state["ok"] = True
            except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, driver errors
                _state["error"] = f"{type(exc).__name__}: {exc}"
        return bool(_state["ok"])


def nvml_error() -> str | None:
    """Why NVML is unavailable (``None`` when it works or was never tried)."""
    return _state["error"]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def driver_version() -> str | None:
    """The NVIDIA driver version, e.g. ``"550.54.15"``."""
    if not nvml_init():
        return None
    try:
        return _text(_pynvml().nvmlSystemGetDriverVersion())
    except Exception:  # noqa: BLE001
        return None


def _maybe(func, *args) -> Any:
    try:
        return func(*args)
    except Exception:  # noqa: BLE001 - NVMLError_NotSupported on some boards
        return None


def query_gpus() -> list[GpuStat]:
    """A snapshot of every GPU NVML sees (NVML's order, which is PCI order; CUDA's
    default order can differ -- match on ``uuid`` when it matters)."""
    if not nvml_init():
        return []
    nv = _pynvml()
    stats = []
    try:
        count = nv.nvmlDeviceGetCount()
    except Exception:  # noqa: BLE001
        return []
    for i in range(count):
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
        except Exception:  # noqa: BLE001
            continue
        util = _maybe(nv.nvmlDeviceGetUtilizationRates, handle)
        temp = _maybe(nv.nvmlDeviceGetTemperature, handle, getattr(nv, "NVML_TEMPERATURE_GPU", 0))
        power = _maybe(nv.nvmlDeviceGetPowerUsage, handle)  # milliwatts
        limit = _maybe(nv.nvmlDeviceGetEnforcedPowerLimit, handle)  # milliwatts
        stats.append(GpuStat(
            index=i,
            name=_text(_maybe(nv.nvmlDeviceGetName, handle) or f"GPU {i}"),
            uuid=(lambda u: _text(u) if u is not None else None)(_maybe(nv.nvmlDeviceGetUUID, handle)),
            util_percent=float(util.gpu) if util is not None else None,
            mem_used_bytes=int(mem.used),
            mem_total_bytes=int(mem.total),
            temperature_c=float(temp) if temp is not None else None,
            power_w=power / 1000.0 if power is not None else None,
            power_limit_w=limit / 1000.0 if limit is not None else None,
        ))
    return stats
