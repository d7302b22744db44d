"""Device and precision policy.

* ``auto`` picks CUDA, then MPS, then CPU, and says which it picked and why.
* An explicit device that is missing is an error (exit 3), never a fallback.
* ``gpu_only`` makes every non-CUDA situation an error (exit 3) before any work.
* ``fp16`` needs a GPU (CUDA or MPS) and uses a ``GradScaler``; on the CPU it is a
  config error (exit 2), never a silent fp32 run. ``bf16`` needs a device that supports
  it (exit 3 otherwise). TF32 matmuls are enabled on CUDA when ``training.tf32``.

A low-layer module (beside :mod:`lmkit.config`): training and evaluation both run models
under a :class:`DevicePlan`, and neither imports the other for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lmkit.config import TrainConfig
from lmkit.errors import ConfigError, DeviceError

#: Dense peak FLOP/s by GPU name fragment (vendor data sheets, without sparsity), used for
#: MFU: ``(fp32, tf32, bf16/fp16 tensor cores)``. A run is scored against the peak of the
#: precision it actually uses: fp32 matmuls with TF32 allowed run on the TF32 tensor cores,
#: without it on the fp32 units; autocast to bf16/fp16 on the 16-bit tensor cores. GPUs
#: without TF32 (V100, T4, consumer Turing) list their fp32 peak there. Checked in order,
#: so more specific names come first.
PEAK_FLOPS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("H200 NVL", (60.0e12, 417.5e12, 835.5e12)),  # NVIDIA H200 NVL datasheet (dense: half the sparse figures)
    ("H200", (66.9e12, 494.7e12, 989.5e12)),
    ("H100 PCIe", (51.2e12, 378.0e12, 756.0e12)),
    ("H100", (66.9e12, 494.7e12, 989.5e12)),
    ("GH200", (66.9e12, 494.7e12, 989.5e12)),
    ("A100", (19.5e12, 156.0e12, 312.0e12)),
    ("A800", (19.5e12, 156.0e12, 312.0e12)),
    ("L40S", (91.6e12, 183.0e12, 362.1e12)),
    ("L40", (90.5e12, 90.5e12, 181.0e12)),
    ("L4", (30.3e12, 60.0e12, 121.0e12)),
    ("A10G", (31.2e12, 62.5e12, 125.0e12)),
    ("A10", (31.2e12, 62.5e12, 125.0e12)),
    ("RTX 4090", (82.6e12, 82.6e12, 165.2e12)),
    ("RTX 3090", (35.6e12, 35.6e12, 71.0e12)),
    ("V100", (15.7e12, 15.7e12, 125.0e12)),
    ("T4", (8.1e12, 8.1e12, 65.0e12)),
)

#: The 16-bit column of :data:`PEAK_FLOPS` (what ``doctor`` and older code read).
PEAK_FLOPS_16BIT: tuple[tuple[str, float], ...] = tuple((name, peaks[2]) for name, peaks in PEAK_FLOPS)


@dataclass(frozen=True)
class DevicePlan:
    """Where and in what precision a run trains.

    Attributes:
        device: the torch device.
        description: e.g. ``"cuda:0 (NVIDIA H200, 139.8 GiB)"`` or ``"cpu (2 threads)"``.
        reason: how it was chosen (``"auto: CUDA is available"``).
        precision: ``fp32``, ``fp16`` or ``bf16``.
        autocast_dtype: the autocast dtype, ``None`` for fp32.
        use_scaler: fp16 gradient scaling.
        peak_flops: the device's dense peak in FLOP/s for this precision (MFU's
            denominator), ``None`` when unknown.
        peak_basis: what ``peak_flops`` is, e.g. ``"NVIDIA H200, bf16 dense"``.
    """

    device: torch.device
    description: str
    reason: str
    precision: str
    autocast_dtype: torch.dtype | None
    use_scaler: bool
    peak_flops: float | None
    peak_basis: str | None = None

    def autocast(self):
        """A context manager: autocast to ``autocast_dtype``, or a no-op for fp32."""
        return torch.autocast(
            device_type=self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        )


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _cuda_missing_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"


def preset_requires_gpu(preset: str | None) -> bool:
    """Whether the shipped preset named ``preset`` sets ``training.gpu_only`` itself (so a
    GPU-only run was asked for by the preset, not only by ``--gpu-only``)."""
    if not preset:
        return False
    from lmkit.config import available_presets, read_yaml

    path = available_presets().get(preset)
    if path is None:
        return False
    try:
        training = read_yaml(path).get("training") or {}
    except Exception:  # noqa: BLE001 - an unreadable preset would have failed earlier
        return False
    return bool(isinstance(training, dict) and training.get("gpu_only"))


def gpu_only_origin(preset: str | None = None) -> str:
    """Who asked for a GPU-only run, in the words of the error: ``preset scale_10m requires a
    GPU`` when the shipped preset sets ``training.gpu_only``, else the flag and the key."""
    if preset_requires_gpu(preset):
        return f"preset {preset} requires a GPU (training.gpu_only)"
    return "this run is GPU-only (--gpu-only / training.gpu_only)"


def resolve_device(requested: str, gpu_only: bool = False, *, preset: str | None = None) -> tuple[torch.device, str]:
    """The device for ``training.device`` and the reason it was chosen. ``preset``: the run's
    preset name, so that a GPU-only error says the preset asked for it (the user may have
    typed no ``--gpu-only``).

    Raises:
        DeviceError: ``gpu_only`` without CUDA, or an explicit device that is missing.
    """
    cuda = torch.cuda.is_available()
    if gpu_only:
        if not cuda:
            raise DeviceError(
                f"{gpu_only_origin(preset)}, but CUDA is not available ({_cuda_missing_reason()}); lmkit never "
                "falls back to the CPU -- run on a machine with an NVIDIA GPU and a CUDA build of torch"
            )
        if not requested.startswith("cuda") and requested != "auto":
            raise DeviceError(f"{gpu_only_origin(preset)}, but --device {requested} is not CUDA: "
                              "gpu-only runs must use CUDA")
    if requested == "auto":
        if cuda:
            return torch.device("cuda", torch.cuda.current_device()), "auto: CUDA is available"
        if _mps_available():
            return torch.device("mps"), "auto: no CUDA, Apple MPS is available"
        return torch.device("cpu"), "auto: no CUDA or MPS GPU found"
    if requested.startswith("cuda"):
        if not cuda:
            raise DeviceError(f"--device {requested}: CUDA is not available ({_cuda_missing_reason()}); "
                              "use --device auto or cpu")
        device = torch.device(requested)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) visible")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device, "requested"
    if requested == "mps":
        if not _mps_available():
            raise DeviceError("--device mps: Apple MPS is not available on this machine; use --device auto or cpu")
        return torch.device("mps"), "requested"
    return torch.device("cpu"), "requested"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    if device.type == "cpu":
        n = torch.get_num_threads()
        return f"cpu ({n} thread{'s' if n != 1 else ''})"
    return str(device)


def peak_flops(device: torch.device, precision: str = "bf16", tf32: bool = False) -> tuple[float | None, str | None]:
    """The dense peak FLOP/s of a CUDA device for ``precision`` (``fp32``/``fp16``/``bf16``;
    ``tf32``: fp32 matmuls may use TF32) from :data:`PEAK_FLOPS`, with what it is; or
    ``$LMKIT_PEAK_FLOPS`` (FLOP/s) when set. ``(None, None)`` for unknown GPUs and CPU/MPS."""
    env = os.environ.get("LMKIT_PEAK_FLOPS")
    if env:
        return float(env), "LMKIT_PEAK_FLOPS"
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    column, label = (2, f"{precision} dense") if precision in ("fp16", "bf16") else \
        ((1, "tf32 dense") if tf32 else (0, "fp32"))
    for fragment, peaks in PEAK_FLOPS:
        if fragment in name:
            return peaks[column], f"{name}, {label}"
    return None, None


def use_deterministic_kernels() -> None:
    """``training.deterministic``: PyTorch's deterministic kernels for the rest of this process
    (``torch.use_deterministic_algorithms(True)``; an op without one raises), cuDNN's
    deterministic algorithms, and cuBLAS's fixed workspace ``CUBLAS_WORKSPACE_CONFIG=:4096:8``
    (unless set), which cuBLAS reads when its handle is created, so this must run before the
    first CUDA matmul. Source: PyTorch's notes on reproducibility."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def plan_device(training: TrainConfig, *, preset: str | None = None) -> DevicePlan:
    """Resolve device and precision for a run, before any data or model work. ``preset``:
    the run config's ``preset`` (names the preset in a GPU-only error).

    Raises:
        DeviceError: see :func:`resolve_device`; bf16 on a GPU without bf16.
        ConfigError: fp16 on the CPU.
    """
    device, reason = resolve_device(training.device, training.gpu_only, preset=preset)
    precision = training.precision
    dtype: torch.dtype | None = None
    if precision == "fp16":
        if device.type == "cpu":
            raise ConfigError(
                "--fp16: fp16 mixed precision needs a GPU, but this run is on the CPU "
                f"({reason}); use fp32 (drop --fp16) or --bf16"
            )
        dtype = torch.float16
    elif precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError(f"--bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; use --fp16")
        dtype = torch.bfloat16
    if device.type == "cuda" and training.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if training.deterministic:
        use_deterministic_kernels()
    peak = peak_flops(device, precision, tf32=device.type == "cuda" and training.tf32)
    return DevicePlan(
        device=device,
        description=describe_device(device),
        reason=reason,
        precision=precision,
        autocast_dtype=dtype,
        use_scaler=precision == "fp16",
        peak_flops=peak[0],
        peak_basis=peak[1],
    )


def is_memory_error(exc: BaseException) -> bool:
    """Whether ``exc`` is running out of GPU or host memory (torch's CPU allocator raises a
    plain ``RuntimeError``)."""
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "DefaultCPUAllocator" in str(exc))
    )


def out_of_memory_error(exc: BaseException, batch_size: int, n_params: int | None) -> DeviceError:
    """The one-line error (exit 3) for an out-of-memory ``exc``: where, the batch size, what the
    weights, gradients and AdamW state alone need (16 B per parameter), and what to try."""
    static = ""
    if n_params:
        need = 16 * n_params  # fp32 weights + grads + AdamW's two moments
        size = f"{need / 2**30:.2f} GiB" if need >= 2**30 else f"{need / 2**20:.1f} MiB"
        static = f" (weights + grads + AdamW alone need ~{size} before activations)"
    where = "GPU" if isinstance(exc, torch.OutOfMemoryError) else "host"
    return DeviceError(
        f"out of {where} memory at batch size {batch_size}{static}; try a smaller --batch-size with "
        "--set training.grad_accum_steps=N, --grad-checkpointing, or --bf16"
    )


def device_uuid(device: torch.device) -> str | None:
    """The CUDA device's UUID (``GPU-…``, NVML's spelling), ``None`` off CUDA or when unknown."""
    if device.type != "cuda":
        return None
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
    except Exception:  # noqa: BLE001 - older drivers / builds
        return None
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
