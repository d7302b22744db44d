"""Measure what :func:`lmkit.analysis.memory.estimate_memory` predicts, on a real model.

* :func:`measure_saved` (any device and model family, used on the CPU): one AdamW step, then a second forward under
  ``torch.autograd.graph.saved_tensors_hooks`` recording every tensor autograd saves for backward.
  Storages are de-duplicated by ``data_ptr`` and counted whole (a view keeps its whole storage
  alive); parameters and buffers are left out (they are the weights). Parameter, gradient and
  optimizer-state bytes are read from the tensors themselves.
* :func:`measure_cpu_peak` (CPU): the peak of live allocated bytes during one training step
  (forward, backward, AdamW step, ``zero_grad``), from the allocation and free events that
  ``torch.profiler`` records with ``profile_memory=True``, plus the weights and optimizer state
  alive before it: the CPU counterpart of ``torch.cuda.max_memory_allocated()``.
* :func:`measure_cuda_peak`: ``torch.cuda.max_memory_allocated()`` over a few real training steps
  that follow :meth:`lmkit.training.loop.Trainer.train_step` (autocast, ``GradScaler`` for fp16,
  ``clip_grad_norm_``, fused AdamW, ``zero_grad(set_to_none=True)``; with targets the model
  returns no logits, so none are held), plus the process's device memory as NVML sees it.
  Every term of such a step, phase by phase: :func:`lmkit.analysis.memory_terms.measure_terms`.
* :func:`recording_saved`: the ``saved_tensors_hooks`` that count the bytes saved for backward,
  on any device (:func:`measure_saved` and :mod:`lmkit.analysis.memory_terms` use it).

All import torch; :mod:`lmkit.analysis.memory` does not.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterator
from typing import Any

import torch

from lmkit.config import ModelConfig
from lmkit.models import build_model
from lmkit.training.optim import param_groups


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return _storage_bytes(v for state in opt.state.values() for v in state.values() if torch.is_tensor(v))


def _attention_context(attention: str):
    if attention == "eager":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


@contextlib.contextmanager
def recording_saved(model: torch.nn.Module) -> Iterator[dict[int, int]]:
    """Record the storages autograd saves for backward inside the block (any device).

    Yields a dict ``storage data_ptr -> bytes`` that fills while the block runs (under
    :func:`torch.autograd.graph.saved_tensors_hooks`; the pack hook returns the tensor itself, so
    nothing is copied or kept longer). Views count their whole storage once; ``model``'s
    parameters and buffers are left out (they are the weights). The inputs that non-reentrant
    :func:`torch.utils.checkpoint.checkpoint` regions keep are saved through autograd too.
    """
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def _profiled_peak(step) -> int:
    """The most CPU memory ``step()`` allocated above what was alive when it began (bytes), from
    ``torch.profiler``'s allocation and free events (``profile_memory=True``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure_saved(cfg: ModelConfig, batch_size: int, seq_len: int | None = None, *, precision: str = "fp32",
                  attention: str = "sdpa", device: str = "cpu", seed: int = 0,
                  grad_checkpointing: bool = False) -> dict[str, int]:
    """Bytes of one training step of any registered model family, counted tensor by tensor.

    Args:
        cfg: model config with ``vocab_size`` set.
        batch_size, seq_len: the micro-batch ``(B, T)``; ``T`` defaults to ``block_size``.
        precision: ``fp32`` or ``bf16`` (autocast).
        attention: ``sdpa`` (whatever kernel PyTorch picks: on the CPU with ``dropout > 0`` that is
            the math kernel) or ``eager`` (the math SDPA kernel forced).
        device: where to run.
        grad_checkpointing: ``model.set_grad_checkpointing(True)``; the inputs each
            (non-reentrant) ``torch.utils.checkpoint`` region keeps for its recomputation are
            saved through autograd too, so the hooks count them.

    Returns:
        ``{"weights", "gradients", "optimizer_state", "saved_for_backward", "total"}`` in bytes.
    """
    torch.manual_seed(seed)
    T = cfg.block_size if seq_len is None else seq_len
    dev = torch.device(device)
    model = build_model(cfg, device=device)
    model.train()
    model.set_grad_checkpointing(grad_checkpointing)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)  # as training does
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    x = torch.randint(0, cfg.vocab_size, (batch_size, T), device=dev)
    y = torch.randint(0, cfg.vocab_size, (batch_size, T), device=dev)

    with _attention_context(attention):
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

        with recording_saved(model) as saved:
            with autocast:
                _, loss = model(x, y)
        loss.backward()
    out = {
        "weights": _storage_bytes(model.parameters()),
        "gradients": _storage_bytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer_state": _optimizer_bytes(opt),
        "saved_for_backward": sum(saved.values()),
    }
    out["total"] = sum(out.values())
    return out


def measure_cpu_peak(cfg: ModelConfig, batch_size: int, seq_len: int | None = None, *, precision: str = "fp32",
                     grad_checkpointing: bool = False, attention: str = "sdpa", seed: int = 0) -> dict[str, int]:
    """Peak allocated bytes of one CPU training step (after a first step created AdamW's state).

    Args: as :func:`measure_saved`, plus ``grad_checkpointing``.

    Returns:
        ``{"peak_allocated", "weights", "optimizer_state"}`` in bytes; ``peak_allocated`` counts
        the weights and optimizer state too (what :attr:`MemoryEstimate.peak_allocated
        <lmkit.analysis.memory.MemoryEstimate>` predicts with ``device="cpu"``).
    """

    torch.manual_seed(seed)
    T = cfg.block_size if seq_len is None else seq_len
    model = build_model(cfg, device="cpu")
    model.train()
    model.set_grad_checkpointing(grad_checkpointing)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)  # as training does
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    x = torch.randint(0, cfg.vocab_size, (batch_size, T))
    y = torch.randint(0, cfg.vocab_size, (batch_size, T))

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with _attention_context(attention):
        step()
        weights, state = _storage_bytes(model.parameters()), _optimizer_bytes(opt)
        peak = _profiled_peak(step)
    return {"peak_allocated": weights + state + peak, "weights": weights, "optimizer_state": state}


def measure_cuda_peak(cfg: ModelConfig, batch_size: int, seq_len: int | None = None, *, precision: str = "fp32",
                      grad_checkpointing: bool = False, attention: str = "sdpa", steps: int = 3,
                      device: str = "cuda", seed: int = 0) -> dict[str, Any]:
    """Peak CUDA memory of ``steps`` real training steps (the first creates AdamW's state).

    Returns:
        ``{"max_allocated", "max_reserved", "process_used"}`` in bytes: PyTorch's allocator peak,
        its reserved peak, and the device memory NVML reports in use after the steps (context
        included; ``None`` without NVML). ``"oom": True`` when the step ran out of memory.

    Raises:
        RuntimeError: CUDA is not available.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("measure_cuda_peak needs CUDA")
    from lmkit.monitor.nvml import query_gpus

    torch.manual_seed(seed)
    dev = torch.device(device)
    T = cfg.block_size if seq_len is None else seq_len
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    model = build_model(cfg, device=device)
    model.train()
    model.set_grad_checkpointing(grad_checkpointing)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    x = torch.randint(0, cfg.vocab_size, (batch_size, T), device=dev)
    y = torch.randint(0, cfg.vocab_size, (batch_size, T), device=dev)
    oom = False
    try:
        with _attention_context(attention):
            for _step in range(steps):
                with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                    _, loss = model(x, y)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0 or math.inf)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                del loss
        torch.cuda.synchronize(dev)
    except torch.OutOfMemoryError:
        oom = True
    stats = {
        "max_allocated": torch.cuda.max_memory_allocated(dev),
        "max_reserved": torch.cuda.max_memory_reserved(dev),
        "process_used": None,
        "oom": oom,
    }
    gpus = query_gpus()
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if len(gpus) > idx:
        stats["process_used"] = gpus[idx].mem_used_bytes
    del model, opt, x, y
    torch.cuda.empty_cache()
    return stats


# --------------------------------------------------------------------------------------
# Several processes: DDP and FSDP2 (inside an initialised process group)
# --------------------------------------------------------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2's sharded parameters, gradients, optimizer state), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def measure_parallel(cfg: ModelConfig, batch_size: int, seq_len: int | None = None, *, parallelism: str = "ddp",
                     precision: str = "fp32", foreach: bool | None = None, profiled_steps: int = 1,
                     seed: int = 0) -> dict[str, int]:
    """What one rank of a DDP or FSDP2 job holds in one CPU training step, counted on the real tensors.

    Call it on every rank of an initialised ``torch.distributed`` process group (gloo on the CPU).
    The model is :func:`~lmkit.models.build_model` wrapped as lmkit trains it: ``ddp`` --
    :class:`~torch.nn.parallel.DistributedDataParallel` with its defaults (25 MiB buckets,
    ``gradient_as_bucket_view=False``); ``fsdp`` -- ``fully_shard(block, reshard_after_forward=True)``
    for each transformer block (:func:`lmkit.models.base.transformer_blocks`) and then the root. AdamW steps on ``(B, T)`` random
    tokens: two (the first creates the optimizer state, DDP rebuilds its buckets after the first
    backward), then ``profiled_steps`` each under ``torch.profiler`` (``profile_memory=True``), as
    :func:`measure_cpu_peak`. gloo runs collectives on its own threads, which drop their reference to
    a finished collective's flat buffer at a moment that varies from step to step: a step's peak
    may hold one such buffer more (seen: one block's all-gather/reduce-scatter buffer, and the
    root's); the least of the profiled steps is the step without it. ``foreach`` goes to :class:`torch.optim.AdamW` (``True``: the
    multi-tensor step the estimator assumes off CUDA, :func:`~lmkit.analysis.memory.estimate_memory`'s
    ``4 P`` of step temporaries; ``None``: PyTorch's choice, a per-parameter loop on the CPU).

    Returns:
        Bytes, for this rank: ``weights`` (FSDP: the local shards' storages, ``DTensor.to_local()``,
        padding included), ``gradients`` (after backward, before the optimizer step clears them),
        ``optimizer_state``, ``ddp_buckets`` (DDP: the flat bucket tensors, read from
        :class:`torch.distributed.GradBucket` in a communication hook; 0 for FSDP),
        ``n_buckets``, and ``peak_allocated`` / ``peak_allocated_max``: the least / largest of the
        profiled steps' peaks of live allocated bytes, plus what was alive before the step
        (weights, optimizer state, DDP's buckets).

    Raises:
        ValueError: ``parallelism`` is not ``ddp`` or ``fsdp``.
    """
    import torch.distributed as dist

    if parallelism not in ("ddp", "fsdp"):
        raise ValueError(f"parallelism {parallelism!r}: use ddp or fsdp")
    torch.manual_seed(seed)
    T = cfg.block_size if seq_len is None else seq_len
    model = build_model(cfg, device="cpu")
    model.train()
    buckets: dict[int, int] = {}
    if parallelism == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)

        def record(state, bucket):
            buckets[bucket.index()] = bucket.buffer().untyped_storage().nbytes()
            return default_hooks.allreduce_hook(state, bucket)

        wrapped.register_comm_hook(None, record)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        from lmkit.models.base import transformer_blocks

        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        wrapped = fully_shard(model, mesh=mesh, reshard_after_forward=True)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, foreach=foreach)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    gen = torch.Generator().manual_seed(seed + dist.get_rank())
    x = torch.randint(0, cfg.vocab_size, (batch_size, T), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (batch_size, T), generator=gen)
    grads = 0

    def step() -> None:
        nonlocal grads
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            _, loss = wrapped(x, y)
        loss.backward()
        grads = _storage_bytes(_local(p.grad) for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    buckets.clear()
    step()
    weights = _storage_bytes(_local(p) for p in model.parameters())
    state = _storage_bytes(_local(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    held = sum(buckets.values())
    gc.collect()  # an earlier call's cycles (its modules and hooks) must not be freed inside the profiled step
    peaks = []
    for _ in range(profiled_steps):
        peaks.append(weights + state + held + _profiled_peak(step))
    return {"weights": weights, "gradients": grads, "optimizer_state": state, "ddp_buckets": held,
            "n_buckets": len(buckets), "peak_allocated": min(peaks), "peak_allocated_max": max(peaks)}
