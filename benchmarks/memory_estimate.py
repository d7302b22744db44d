"""Accuracy of lmkit's memory estimator (:mod:`lmkit.analysis.memory`) against measurement.

For each preset and micro-batch that fits the device, the estimate is compared with:

* on the CPU: the bytes of the tensors autograd saves for backward (``saved_tensors_hooks``,
  storages de-duplicated by ``data_ptr``) plus parameter, gradient and AdamW-state bytes
  (:func:`lmkit.analysis.memory_measure.measure_saved`). Two error columns: the saved
  activations alone (what the estimator models) and the whole (state + activations).
* on CUDA: ``torch.cuda.max_memory_allocated()`` over three real steps
  (:func:`lmkit.analysis.memory_measure.measure_cuda_peak`) against the estimated peak, and the
  process's NVML memory against the estimated total (context + allocator slack included).

The attention kernel is the one PyTorch runs: on the CPU, ``dropout > 0`` makes SDPA fall back to
its math kernel, so those rows are estimated with ``attention="eager"``; ``dropout=0`` rows use the
fused CPU kernel (``sdpa``). Target: within ±5%.

Usage::

    python benchmarks/memory_estimate.py                     # CPU, the default cases
    python benchmarks/memory_estimate.py --device cuda       # on a GPU: peak allocated vs estimate
    python benchmarks/memory_estimate.py --json

A benchmark, not a test: it asserts nothing (tests/test_memory.py asserts ±10% on two CPU cases).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from rich.console import Console
from rich.table import Table

from lmkit.analysis.memory import MiB, estimate_memory, resolve_vocab_size
from lmkit.config import build_run_config

#: (preset, batch_size, seq_len, extra --set overrides) measured on the CPU.
CPU_CASES = [
    ("pilot", 32, 32, []),
    ("scale_10m", 8, 32, []),
    ("scale_10m", 8, 32, ["model.dropout=0"]),
    ("tiny", 4, 256, []),
    ("tiny", 8, 128, ["model.dropout=0"]),
    ("small", 2, 256, []),
    ("small", 2, 512, ["model.dropout=0"]),
    ("medium", 1, 256, ["model.dropout=0"]),
]

#: (preset, batch_size, grad_checkpointing) measured on CUDA, each in fp32 and bf16.
CUDA_CASES = [
    ("pilot", 32, False),
    ("scale_10m", 8, False),
    ("tiny", 32, False),
    ("small", 8, False),
    ("small", 32, False),
    ("small", 32, True),
    ("medium", 8, False),
    ("medium", 8, True),
    ("gpt2-124m", 16, False),
]


def model_config(preset: str, overrides: list[str]):
    cfg = build_run_config(preset, overrides)
    model = cfg.model.model_copy()
    model.vocab_size = resolve_vocab_size(cfg)
    return model


def err(est: float, meas: float) -> float:
    return 100.0 * (est - meas) / meas


def run_cpu(precisions: list[str]) -> list[dict]:
    from lmkit.analysis.memory_measure import measure_saved

    rows = []
    for preset, batch, seq, overrides in CPU_CASES:
        cfg = model_config(preset, overrides)
        attention = "eager" if cfg.dropout > 0 else "sdpa"
        for precision in precisions:
            t0 = time.perf_counter()
            meas = measure_saved(cfg, batch, seq, precision=precision)
            est = estimate_memory(cfg, batch, seq_len=seq, precision=precision, attention=attention, device="cpu")
            est_total = est.model_state + est.saved_for_backward
            rows.append({
                "preset": preset + ("" if not overrides else " " + " ".join(overrides)),
                "batch_size": batch, "seq_len": seq, "precision": precision, "attention": attention,
                "est_saved": est.saved_for_backward, "meas_saved": meas["saved_for_backward"],
                "err_saved_pct": err(est.saved_for_backward, meas["saved_for_backward"]),
                "est_total": est_total, "meas_total": meas["total"], "err_total_pct": err(est_total, meas["total"]),
                "seconds": time.perf_counter() - t0,
            })
    return rows


def run_cuda(precisions: list[str]) -> list[dict]:
    from lmkit.analysis.memory_measure import measure_cuda_peak

    rows = []
    for preset, batch, ckpt in CUDA_CASES:
        cfg = model_config(preset, [])
        for precision in precisions:
            est = estimate_memory(cfg, batch, precision=precision, grad_checkpointing=ckpt, device="cuda")
            meas = measure_cuda_peak(cfg, batch, precision=precision, grad_checkpointing=ckpt)
            rows.append({
                "preset": preset, "batch_size": batch, "seq_len": cfg.block_size, "precision": precision,
                "grad_checkpointing": ckpt, "est_peak": est.peak_allocated, "meas_peak": meas["max_allocated"],
                "err_peak_pct": err(est.peak_allocated, meas["max_allocated"]), "meas_reserved": meas["max_reserved"],
                "est_total": est.total, "meas_process": meas["process_used"], "oom": meas["oom"],
                "peak_phase": est.peak_phase,
            })
    return rows


def render(rows: list[dict], device: str) -> None:
    console = Console()
    mib = lambda n: "-" if n is None else f"{n / MiB:,.1f}"  # noqa: E731
    if device == "cpu":
        table = Table(title="memory estimate vs measurement (CPU: saved tensors + params/grads/AdamW), MiB")
        for col in ("preset", "B", "T", "precision", "attention", "est saved", "measured", "err %",
                    "est total", "measured", "err %"):
            table.add_column(col, justify="left" if col in ("preset", "precision", "attention") else "right")
        for r in rows:
            table.add_row(r["preset"], str(r["batch_size"]), str(r["seq_len"]), r["precision"], r["attention"],
                          mib(r["est_saved"]), mib(r["meas_saved"]), f"{r['err_saved_pct']:+.2f}",
                          mib(r["est_total"]), mib(r["meas_total"]), f"{r['err_total_pct']:+.2f}")
    else:
        table = Table(title="memory estimate vs torch.cuda.max_memory_allocated (3 steps), MiB")
        for col in ("preset", "B", "precision", "ckpt", "est peak", "max allocated", "err %", "max reserved",
                    "est total", "NVML used", "peak at"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["preset"], str(r["batch_size"]), r["precision"], "on" if r["grad_checkpointing"] else "off",
                          mib(r["est_peak"]), mib(r["meas_peak"]) + (" OOM" if r["oom"] else ""),
                          f"{r['err_peak_pct']:+.2f}", mib(r["meas_reserved"]), mib(r["est_total"]),
                          mib(r["meas_process"]), r["peak_phase"])
    console.print(table)
    worst = max(abs(r["err_saved_pct"] if device == "cpu" else r["err_peak_pct"]) for r in rows)
    console.print(f"largest |error|: {worst:.2f}% (target 5%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", action="append", choices=("fp32", "bf16", "fp16"),
                        help="repeatable; default fp32 and bf16")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    precisions = args.precision or ["fp32", "bf16"]
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available on this machine")
        rows = run_cuda(precisions)
    else:
        rows = run_cpu([p for p in precisions if p != "fp16"])
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        render(rows, args.device)


if __name__ == "__main__":
    main()
