"""Every raw term of a training step's memory, phase by phase, for calibrating the estimator.

:func:`measure_terms` runs real training steps of a model (as
:meth:`lmkit.training.loop.Trainer.train_step` does: autocast, ``GradScaler`` for fp16,
``clip_grad_norm_``, fused AdamW, ``zero_grad(set_to_none=True)``) and records, through a
:class:`MemoryProbe`, what the allocator holds at each phase boundary and the peak of each phase
(forward; backward; unscale + clip + optimizer step). The tensors themselves give the weight,
gradient, optimizer-state and saved-for-backward bytes (:func:`lmkit.analysis.memory_measure.recording_saved`).

The probe is the only part that depends on the device: :class:`MemoryProbe` (the CPU) reads
nothing and returns ``None`` for every allocator figure, with the same keys as
:class:`CudaProbe`, which reads ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` /
``memory_reserved`` / ``max_memory_reserved`` / ``memory_stats`` / ``mem_get_info``, resets the peaks
between phases (``torch.cuda.reset_peak_memory_stats``), clears cuBLAS's cached workspaces at the
start of each row (``torch._C._cuda_clearCublasWorkspaces``, which empties PyTorch's maps of
cuBLAS and cuBLASLt workspaces, one per (handle, stream); ``aten/src/ATen/cuda/CublasHandlePool.cpp``)
and reads the process's device memory from NVML. So a CPU dry run exercises every phase boundary,
term and key that the GPU run will.

Bytes throughout; ``None`` where the probe cannot see a figure.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import torch

from lmkit.analysis.memory_measure import (
    _attention_context,
    _optimizer_bytes,
    _storage_bytes,
    recording_saved,
)
from lmkit.config import ModelConfig
from lmkit.models import build_model
from lmkit.training.optim import param_groups

#: the measured phases of a step, in order (each one's peak is read after ``reset_peak_memory_stats``)
PHASES = ("forward", "backward", "optimizer")
#: ``memory_allocated`` readings of a step, in order
STEP_POINTS = ("before_forward", "forward_end", "after_backward", "after_optimizer", "after_zero_grad")
#: ``torch.cuda.memory_stats()`` keys read at the end of each phase (peaks since the phase began;
#: ``requested_bytes`` vs ``allocated_bytes`` is the allocator's rounding, ``inactive_split_bytes``
#: its fragmentation)
STAT_KEYS = (
    "allocated_bytes.all.peak", "requested_bytes.all.peak", "reserved_bytes.all.peak", "active_bytes.all.peak",
    "inactive_split_bytes.all.peak", "allocated_bytes.large_pool.peak", "allocated_bytes.small_pool.peak",
    "allocation.all.peak", "segment.all.peak", "num_alloc_retries", "num_ooms", "num_device_alloc",
)
#: environment variables that change the allocator or the cuBLAS workspaces
ENV_KEYS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE",
            "TORCH_CUBLASLT_UNIFIED_WORKSPACE", "CUDA_MODULE_LOADING")
#: what :meth:`MemoryProbe.device_usage` reads (NVML: this process and the whole device; CUDA runtime:
#: ``total - free``; the allocator's reserved bytes at the same moment)
USAGE_KEYS = ("nvml_process_used", "nvml_device_used", "cudart_device_used", "reserved", "max_reserved")
#: the cuBLAS workspace probes of :meth:`MemoryProbe.workspaces` (each after clearing the workspaces)
WORKSPACE_PROBES = ("mm_fp32", "linear_bias_fp32", "mm_bf16", "linear_bias_bf16", "linear_fwd_bwd_fp32")


class MemoryProbe:
    """The CPU probe: the phase boundaries are called, nothing is read (every figure ``None``).

    Subclasses read a device's allocator; :func:`measure_terms` calls, per row: :meth:`start_row`,
    then :meth:`begin_phase` / :meth:`end_phase` around the build and around each phase of each
    step (:data:`PHASES`), :meth:`allocated` at each point of :data:`STEP_POINTS`, :meth:`sync` at
    the end of each step, :meth:`device_usage` after the steps and :meth:`end_row`.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)

    # -- per process -----------------------------------------------------------------------
    def setup(self) -> dict[str, Any]:
        """Process-level facts, read once before any row (device, versions, allocator settings)."""
        return {"device": str(self.device), "device_name": None, "capability": None, "total_memory": None,
                "torch": torch.__version__, "cuda": torch.version.cuda, "allocator_backend": None,
                "float32_matmul_precision": torch.get_float32_matmul_precision(),
                "env": {k: os.environ.get(k) for k in ENV_KEYS}, "nvml_device_used_before_init": None,
                "clear_workspaces_api": None}

    def workspaces(self) -> dict[str, Any]:
        """cuBLAS / cuBLASLt workspace bytes, one probe per kind of GEMM (:data:`WORKSPACE_PROBES`)."""
        return {name: {"allocated_delta": None, "requested_delta": None, "output_bytes": None, "workspace": None}
                for name in WORKSPACE_PROBES} | {"all_resident": None}

    # -- per row ---------------------------------------------------------------------------
    def start_row(self) -> None:
        """Free what an earlier row left (garbage, cached blocks, workspaces) and reset the peaks."""
        gc.collect()

    def end_row(self) -> None:
        gc.collect()

    def allocated(self) -> int | None:
        return None

    def reserved(self) -> int | None:
        return None

    def begin_phase(self, name: str) -> None:  # noqa: ARG002 - the name is for recording probes
        """Start a phase: its peak counts from here."""

    def end_phase(self, name: str) -> dict[str, Any]:  # noqa: ARG002
        """End a phase: ``{"peak_allocated", "peak_reserved", "allocated_end", "stats"}``."""
        return {"peak_allocated": None, "peak_reserved": None, "allocated_end": None,
                "stats": dict.fromkeys(STAT_KEYS)}

    def sync(self) -> None:
        """Wait for the device (CUDA: ``torch.cuda.synchronize``), so step times are real."""

    def device_usage(self) -> dict[str, int | None]:
        """The process's device memory now (:data:`USAGE_KEYS`)."""
        return dict.fromkeys(USAGE_KEYS)


class CudaProbe(MemoryProbe):
    """Reads PyTorch's CUDA caching allocator and NVML.

    Args:
        device: a CUDA device.
        cuda: the ``torch.cuda`` module (a stand-in in tests).
        clear_workspaces: ``torch._C._cuda_clearCublasWorkspaces`` (a stand-in in tests; ``None``
            where torch lacks it: the workspaces then stay from row to row).
    """

    def __init__(self, device: str = "cuda", *, cuda: Any = None, clear_workspaces: Any = "torch") -> None:
        super().__init__(device)
        self.cuda = torch.cuda if cuda is None else cuda
        self.clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None) if clear_workspaces == "torch" \
            else clear_workspaces

    def setup(self) -> dict[str, Any]:
        out = super().setup()
        out["nvml_device_used_before_init"] = self._nvml()[1]  # before this process makes its context
        self.cuda.init()
        props = self.cuda.get_device_properties(self.device)
        out.update(device_name=props.name, capability=f"{props.major}.{props.minor}", total_memory=props.total_memory,
                   allocator_backend=self.cuda.get_allocator_backend(), clear_workspaces_api=self.clear is not None)
        return out

    def _clear(self) -> None:
        self.cuda.synchronize(self.device)
        if self.clear is not None:
            self.clear()
        self.cuda.empty_cache()

    def workspaces(self) -> dict[str, Any]:
        dev = self.device
        runs = _gemm_runs(dev)
        out: dict[str, Any] = {}
        for name in WORKSPACE_PROBES:
            self._clear()
            before, req = self.cuda.memory_allocated(dev), self._stat("requested_bytes.all.current")
            y = runs[name]()
            self.cuda.synchronize(dev)
            delta = self.cuda.memory_allocated(dev) - before
            rdelta = None if req is None else self._stat("requested_bytes.all.current") - req
            nbytes = y.untyped_storage().nbytes()
            out[name] = {"allocated_delta": delta, "requested_delta": rdelta, "output_bytes": nbytes,
                         "workspace": (rdelta if rdelta is not None else delta) - nbytes}
            del y
        # every kind once, the workspaces left in place: what a training step keeps resident
        self._clear()
        before = self.cuda.memory_allocated(dev)
        keep = [runs[name]() for name in WORKSPACE_PROBES]
        self.cuda.synchronize(dev)
        out["all_resident"] = self.cuda.memory_allocated(dev) - before - sum(t.untyped_storage().nbytes() for t in keep)
        del keep, runs
        self._clear()
        return out

    def _stat(self, key: str) -> int | None:
        return self.cuda.memory_stats(self.device).get(key)

    def start_row(self) -> None:
        gc.collect()
        self._clear()
        self.cuda.reset_peak_memory_stats(self.device)

    def end_row(self) -> None:
        gc.collect()
        self._clear()

    def allocated(self) -> int:
        return self.cuda.memory_allocated(self.device)

    def reserved(self) -> int:
        return self.cuda.memory_reserved(self.device)

    def begin_phase(self, name: str) -> None:
        self.cuda.reset_peak_memory_stats(self.device)

    def end_phase(self, name: str) -> dict[str, Any]:
        stats = self.cuda.memory_stats(self.device)
        return {"peak_allocated": self.cuda.max_memory_allocated(self.device),
                "peak_reserved": self.cuda.max_memory_reserved(self.device),
                "allocated_end": self.cuda.memory_allocated(self.device),
                "stats": {k: stats.get(k) for k in STAT_KEYS}}

    def sync(self) -> None:
        self.cuda.synchronize(self.device)

    def _nvml(self) -> tuple[int | None, int | None]:
        """(this process's, the whole device's) memory in use, from NVML; ``None`` where unknown."""
        from lmkit.monitor.nvml import nvml_init

        if not nvml_init():
            return None, None
        import pynvml

        idx = self.device.index if self.device.index is not None else 0
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
            device_used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception:  # noqa: BLE001 - NVMLError: the driver does not say
            return None, None
        try:  # a container's PIDs may not be the host's: then the one process listed is this one
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            mine = [p for p in procs if p.pid == os.getpid()] or (procs if len(procs) == 1 else [])
            used = getattr(mine[0], "usedGpuMemory", None) if mine else None
        except Exception:  # noqa: BLE001 - NVMLError_NotSupported on some boards
            used = None
        return (int(used) if used is not None else None), device_used

    def device_usage(self) -> dict[str, int | None]:
        proc, dev_used = self._nvml()
        free, total = self.cuda.mem_get_info(self.device)
        return {"nvml_process_used": proc, "nvml_device_used": dev_used, "cudart_device_used": total - free,
                "reserved": self.cuda.memory_reserved(self.device),
                "max_reserved": self.cuda.max_memory_reserved(self.device)}


def _gemm_runs(dev: torch.device) -> dict[str, Any]:
    """One GEMM of each kind :data:`WORKSPACE_PROBES` names, at GPT-2's width (``(1024, 768) @ (768, 768)``):
    a plain ``mm`` (cuBLAS), ``linear`` with a bias (the cuBLASLt epilogue path), in fp32 and bf16,
    and a ``linear`` forward + backward (backward runs on autograd's device thread, whose cuBLAS
    handle, and so workspace, is its own)."""
    a = torch.randn(1024, 768, device=dev)
    w = torch.randn(768, 768, device=dev)
    b = torch.randn(768, device=dev)
    ab, wb, bb = a.bfloat16(), w.bfloat16(), b.bfloat16()
    linear = torch.nn.functional.linear

    def fwd_bwd() -> torch.Tensor:
        wg = w.clone().requires_grad_(True)
        linear(a, wg, b).square().mean().backward()
        return wg.grad

    return {"mm_fp32": lambda: a @ w.t(), "linear_bias_fp32": lambda: linear(a, w, b),
            "mm_bf16": lambda: ab @ wb.t(), "linear_bias_bf16": lambda: linear(ab, wb, bb),
            "linear_fwd_bwd_fp32": fwd_bwd}


def probe_for(device: str) -> MemoryProbe:
    """:class:`CudaProbe` for a CUDA device, else the reading-nothing :class:`MemoryProbe`."""
    return CudaProbe(device) if torch.device(device).type == "cuda" else MemoryProbe(device)


def measure_terms(cfg: ModelConfig, batch_size: int, seq_len: int | None = None, *, probe: MemoryProbe,
                  precision: str = "fp32", grad_checkpointing: bool = False, attention: str = "sdpa",
                  steps: int = 3, seed: int = 0) -> dict[str, Any]:
    """Run ``steps`` training steps of ``cfg`` on ``probe.device`` and record every memory term.

    The first step creates AdamW's state; the last is the steady step an estimate describes. After
    the steps one more forward under :func:`~lmkit.analysis.memory_measure.recording_saved` (and its
    backward) counts the bytes saved for backward; it is not a measured step.

    Args:
        cfg: model config with ``vocab_size`` set.
        batch_size, seq_len: the micro-batch ``(B, T)``; ``T`` defaults to ``block_size``.
        probe: what reads the allocator (:func:`probe_for`).
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 with a ``GradScaler``).
        grad_checkpointing, attention: as :func:`lmkit.analysis.memory_measure.measure_saved`.
        steps: measured training steps (at least 2: the first has no optimizer state before it).

    Returns:
        ``{"tensors", "row_start", "build", "after_build", "steps", "max_allocated", "max_reserved",
        "stats_peak", "workspace_resident", "usage", "oom", "seconds"}``: ``tensors`` are bytes
        counted on the tensors (``weights``, ``buffers``, ``inputs``, ``gradients``,
        ``optimizer_state``, ``saved_for_backward``); ``steps`` one dict per step with
        ``allocated`` (:data:`STEP_POINTS`), ``peaks`` (:data:`PHASES` -> :meth:`MemoryProbe.end_phase`)
        and ``seconds``; ``max_allocated`` / ``max_reserved`` the largest phase peak of the row
        (the build included: ``max_memory_allocated`` over the whole row); ``stats_peak`` the
        largest of each :data:`STAT_KEYS` over the phases; ``workspace_resident`` what the last
        step leaves allocated beyond the weights, buffers, optimizer state and inputs (cuBLAS
        workspaces); ``usage`` :meth:`MemoryProbe.device_usage` after the steps.

    Raises:
        ValueError: ``steps < 2``.
    """
    if steps < 2:
        raise ValueError(f"steps {steps}: at least 2 (the first step creates the optimizer state)")
    t0 = time.perf_counter()
    probe.start_row()
    out = _measure_row(cfg, batch_size, cfg.block_size if seq_len is None else seq_len, probe, precision,
                       grad_checkpointing, attention, steps, seed)
    probe.end_row()  # the row's model, optimizer and inputs are gone with _measure_row's frame
    out["seconds"] = time.perf_counter() - t0
    return out


def _measure_row(cfg: ModelConfig, batch_size: int, T: int, probe: MemoryProbe, precision: str,
                 grad_checkpointing: bool, attention: str, steps: int, seed: int) -> dict[str, Any]:
    dev = probe.device
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    out: dict[str, Any] = {"row_start": {"allocated": probe.allocated(), "reserved": probe.reserved()}}
    probe.begin_phase("build")
    torch.manual_seed(seed)
    model = build_model(cfg, device=str(dev))
    model.train()
    model.set_grad_checkpointing(grad_checkpointing)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)  # as training does
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    x = torch.randint(0, cfg.vocab_size, (batch_size, T), device=dev)
    y = torch.randint(0, cfg.vocab_size, (batch_size, T), device=dev)
    out["build"] = probe.end_phase("build")
    out["after_build"] = probe.allocated()
    tensors: dict[str, int | None] = {
        "weights": _storage_bytes(model.parameters()), "buffers": _storage_bytes(model.buffers()),
        "inputs": _storage_bytes([x, y]), "gradients": None, "optimizer_state": None, "saved_for_backward": None}

    def autocast():
        return torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def step(i: int) -> dict[str, Any]:
        t = time.perf_counter()
        alloc: dict[str, int | None] = {"before_forward": probe.allocated()}
        peaks: dict[str, Any] = {}
        probe.begin_phase("forward")
        with autocast():
            _, loss = model(x, y)
        alloc["forward_end"] = probe.allocated()
        peaks["forward"] = probe.end_phase("forward")
        probe.begin_phase("backward")
        scaler.scale(loss).backward()
        alloc["after_backward"] = probe.allocated()
        peaks["backward"] = probe.end_phase("backward")
        if i == 0:
            tensors["gradients"] = _storage_bytes(p.grad for p in model.parameters() if p.grad is not None)
        probe.begin_phase("optimizer")
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        alloc["after_optimizer"] = probe.allocated()
        peaks["optimizer"] = probe.end_phase("optimizer")
        model.zero_grad(set_to_none=True)  # as Trainer.train_step
        del loss
        alloc["after_zero_grad"] = probe.allocated()
        probe.sync()
        return {"step": i + 1, "allocated": alloc, "peaks": peaks, "seconds": time.perf_counter() - t}

    out["steps"] = []
    out["oom"] = False
    try:
        with _attention_context(attention):
            for i in range(steps):
                out["steps"].append(step(i))
            tensors["optimizer_state"] = _optimizer_bytes(opt)
            out["usage"] = probe.device_usage()  # before the saved-tensor pass: the steps' reserved memory
            with recording_saved(model) as saved, autocast():
                _, loss = model(x, y)
            tensors["saved_for_backward"] = sum(saved.values())
            loss.backward()
            model.zero_grad(set_to_none=True)
            del loss
            probe.sync()
    except torch.OutOfMemoryError:
        out["oom"] = True
        out.setdefault("usage", probe.device_usage())
    out["tensors"] = tensors
    all_peaks = [out["build"], *(s["peaks"][p] for s in out["steps"] for p in PHASES)]
    out["max_allocated"] = _max(p["peak_allocated"] for p in all_peaks)
    out["max_reserved"] = _max(p["peak_reserved"] for p in all_peaks)
    out["stats_peak"] = {k: _max(p["stats"][k] for p in all_peaks) for k in STAT_KEYS}
    last = out["steps"][-1]["allocated"]["after_zero_grad"] if out["steps"] else None
    held = [tensors[k] for k in ("weights", "buffers", "optimizer_state", "inputs")]
    out["workspace_resident"] = None if last is None or None in held else last - sum(held)
    return out


def _max(values) -> int | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None
