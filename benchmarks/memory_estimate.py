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

``--terms`` (CUDA, or ``--dry-run`` on the CPU) measures, for each of :data:`CUDA_CASES` × fp32/bf16
(12 rows), every raw term the estimator's typical figures can be calibrated against, from the JSON
alone (:func:`lmkit.analysis.memory_terms.measure_terms`): the weight / gradient / optimizer-state /
saved-for-backward bytes counted on the tensors; ``memory_allocated`` after the build and at each
point of each step; the peak of each phase (forward; backward; unscale + clip + optimizer step),
``torch.cuda.reset_peak_memory_stats`` between them; a handful of ``torch.cuda.memory_stats()``
counters (requested vs allocated bytes, inactive splits, retries); what the steps leave allocated
beyond the tensors (the cuBLAS workspaces); NVML's process memory minus the reserved bytes (the
CUDA context); and, once per process, the cuBLAS/cuBLASLt workspace of each kind of GEMM. Next to
it, the estimate's own numbers for the row: its rows, peak, and the phase walk
(``MemoryEstimate.phases``: phase -> weights + optimizer state + the parts alive). Each row starts
from an empty allocator (garbage collected, cuBLAS workspaces cleared, ``empty_cache``, peaks
reset), so no row inherits another's blocks. The dry run passes two small rows through the same
code with a probe that reads nothing: the same keys, allocator figures null.

Usage::

    python benchmarks/memory_estimate.py                     # CPU, the default cases
    python benchmarks/memory_estimate.py --device cuda       # on a GPU: peak allocated vs estimate
    python benchmarks/memory_estimate.py --json
    python3 benchmarks/memory_estimate.py --device cuda --terms --json       # the GPU check (issue 15)
    python benchmarks/memory_estimate.py --device cpu --terms --dry-run --json  # the same code on the CPU

``--terms --json`` prints one object: ``mode``, ``device``, ``dry_run``, ``complete``, ``seconds``,
``steps``, ``process`` (``setup``, ``start``, ``workspaces``, ``end``, ``cuda_context_end``,
``cuda_context_end_cudart``, ``errors``), ``rows`` and ``skipped``. Rows start only while the script has run under
``--max-seconds`` (default 45); SIGTERM prints the rows done (``complete: false``).

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

_T_START = time.perf_counter()  # --max-seconds counts from here (torch is imported later)

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

#: (preset, batch_size, grad_checkpointing) measured on CUDA, each in fp32 and bf16: issue 15's rows
#: (tiny, small, GPT-2 124M; with and without gradient checkpointing; one batch size each). The
#: sizes make the step's tensors (5-20 GiB) dwarf the fixed costs (workspaces, rounding) and keep
#: a step well under a second on an H200. GPT-2 124M first: the rows the issue cares most about are
#: measured even if a time limit cuts the run (each row starts from an empty allocator, so the
#: order changes no allocator figure; only NVML's context grows as kernels load).
CUDA_CASES = [
    ("gpt2-124m", 16, False),
    ("gpt2-124m", 16, True),
    ("small", 16, False),
    ("small", 16, True),
    ("tiny", 32, False),
    ("tiny", 32, True),
]

#: ``--dry-run``: (preset, batch_size, seq_len, precision, grad_checkpointing) run through the same
#: ``--terms`` code on the CPU, small enough for a few seconds.
DRY_RUN_CASES = [
    ("tiny", 2, 64, "fp32", False),
    ("tiny", 2, 64, "bf16", True),
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


# --------------------------------------------------------------------------------------
# --terms: every raw term of each row, so that the estimator can be calibrated from the JSON
# --------------------------------------------------------------------------------------

def _err(est: float | None, meas: float | None) -> float | None:
    return None if est is None or not meas else err(est, meas)


def phase_group(name: str) -> str:
    """Which measured phase (:data:`lmkit.analysis.memory_terms.PHASES`) an estimate phase falls in."""
    if name.startswith("forward"):
        return "forward"
    if name.startswith("optimizer"):
        return "optimizer"
    return "backward"


def estimate_terms(cfg, batch: int, seq: int, precision: str, ckpt: bool, device: str, attention: str) -> dict:
    """The estimate's own numbers for a row: its rows, peak, and the phase walk.

    ``phases``: each step of :attr:`MemoryEstimate.phases` with ``bytes`` = weights + optimizer
    state + the parts alive (no workspace); ``phase_peaks``: the largest of those per measured
    phase, plus the cuBLAS workspace (as ``peak_allocated`` counts it), comparable with the
    measured phase peaks.
    """
    from dataclasses import asdict

    from lmkit.analysis.memory import FrameworkOverhead

    est = estimate_memory(cfg, batch, seq_len=seq, precision=precision, attention=attention,
                          grad_checkpointing=ckpt, device=device)
    base = est.row("weights").size_bytes + est.row("optimizer state").size_bytes
    ws = next((r.size_bytes for r in est.rows if r.name == "cuBLAS workspace"), 0)
    phases = [{"phase": name, "bytes": base + sum(live.values()), "parts": dict(live)} for name, live in est.phases]
    peaks: dict[str, int] = {}
    for ph in phases:
        group = phase_group(ph["phase"])
        peaks[group] = max(peaks.get(group, 0), ph["bytes"] + ws)
    return {"peak_allocated": est.peak_allocated, "peak_phase": est.peak_phase, "total": est.total,
            "overhead": est.overhead, "overhead_detail": dict(est.overhead_detail),
            "framework": asdict(FrameworkOverhead()) if device == "cuda" else None,
            "saved_for_backward": est.saved_for_backward, "model_state": est.model_state, "workspace_bytes": ws,
            "rows": [{"name": r.name, "size": r.size_bytes, "at_peak": r.at_peak_bytes} for r in est.rows],
            "per_layer": dict(est.per_layer), "phases": phases, "phase_peaks": peaks}


def terms_row(probe, preset: str, batch: int, seq: int | None, precision: str, ckpt: bool, steps: int) -> dict:
    """One row of ``--terms``: the estimate, every raw measurement, and the errors (``est - meas``, %)."""
    from lmkit.analysis.memory_terms import PHASES, measure_terms

    t0 = time.perf_counter()
    cfg = model_config(preset, [])
    T = cfg.block_size if seq is None else seq
    device = probe.device.type
    # the kernel PyTorch runs: on the CPU dropout > 0 makes SDPA take its math kernel
    attention = "eager" if device == "cpu" and cfg.dropout > 0 else "sdpa"
    row = {"preset": preset, "batch_size": batch, "seq_len": T, "precision": precision, "grad_checkpointing": ckpt,
           "attention": attention, "device": device, "steps": steps, "seconds": None, "oom": None,
           "estimate": estimate_terms(cfg, batch, T, precision, ckpt, device, attention),
           "tensors": None, "measured": None, "derived": None, "err_pct": None, "errors": []}
    try:
        meas = measure_terms(cfg, batch, T, probe=probe, precision=precision, grad_checkpointing=ckpt, steps=steps)
    except Exception as exc:  # noqa: BLE001 - one broken row must not cost the others (one GPU shot)
        row["errors"].append(f"{type(exc).__name__}: {exc}")
        row["seconds"] = time.perf_counter() - t0
        return row
    row["oom"] = meas.pop("oom")
    row["tensors"] = meas.pop("tensors")
    meas.pop("seconds")
    last = meas["steps"][-1]["peaks"] if meas["steps"] else None
    meas["phase_peaks"] = {p: (last[p]["peak_allocated"] if last else None) for p in PHASES}
    row["measured"] = meas
    usage, stats, est = meas["usage"], meas["stats_peak"], row["estimate"]
    peak, reserved = meas["max_allocated"], meas["max_reserved"]
    requested = stats["requested_bytes.all.peak"]
    row["derived"] = {
        # NVML's process memory beyond what the caching allocator reserved: the CUDA context
        "cuda_context": None if None in (usage["nvml_process_used"], usage["reserved"])
        else usage["nvml_process_used"] - usage["reserved"],
        # reserved but not allocated, as a fraction of the allocated peak (FrameworkOverhead.allocator_slack)
        "allocator_slack": None if None in (peak, reserved) else (reserved - peak) / peak,
        # block rounding at the peak: allocated minus requested bytes
        "rounding_at_peak": None if None in (peak, requested) else peak - requested,
        "workspace_resident": meas["workspace_resident"],
    }
    row["err_pct"] = {
        "peak": _err(est["peak_allocated"], peak),
        **{p: _err(est["phase_peaks"].get(p), meas["phase_peaks"][p]) for p in PHASES},
        "saved_for_backward": _err(est["saved_for_backward"], row["tensors"]["saved_for_backward"]),
        "total": _err(est["total"], usage["nvml_process_used"]),
    }
    row["seconds"] = time.perf_counter() - t0
    return row


class _Stopped(BaseException):
    """SIGTERM (a time limit): print what is done."""


def run_terms(doc: dict, probe, cases: list[tuple], steps: int, log, max_seconds: float = 0) -> None:
    """Fill ``doc`` (``process``, ``rows``) as the rows finish, so that a stop keeps them."""
    t0 = time.perf_counter()
    process = doc["process"]
    process["setup"] = probe.setup()
    process["start"] = probe.device_usage()
    try:
        process["workspaces"] = probe.workspaces()
    except Exception as exc:  # noqa: BLE001 - the rows do not need it
        process["workspaces"] = None
        process["errors"].append(f"workspaces: {type(exc).__name__}: {exc}")
    log(f"process setup + workspaces: {time.perf_counter() - t0:.2f} s")
    for i, (preset, batch, seq, precision, ckpt) in enumerate(cases):
        if max_seconds and time.perf_counter() - _T_START > max_seconds:
            doc["skipped"] = [list(c) for c in cases[i:]]
            log(f"--max-seconds {max_seconds:g} reached: {len(cases) - i} rows skipped")
            break
        row = terms_row(probe, preset, batch, seq, precision, ckpt, steps)
        doc["rows"].append(row)
        e = row["err_pct"] or {}
        log(f"row {i + 1}/{len(cases)} {preset} B={batch} {precision} ckpt={'on' if ckpt else 'off'}: "
            f"{row['seconds']:.2f} s, peak err {_pct(e.get('peak'))}" + (f"  {row['errors']}" if row["errors"] else ""))
    process["end"] = probe.device_usage()
    end = process["end"]
    process["cuda_context_end"] = (None if None in (end["nvml_process_used"], end["reserved"])
                                   else end["nvml_process_used"] - end["reserved"])
    # the same from cudaMemGetInfo, less what the device held before this process (NVML, before init)
    base = process["setup"]["nvml_device_used_before_init"]
    process["cuda_context_end_cudart"] = (None if None in (end["cudart_device_used"], end["reserved"], base)
                                          else end["cudart_device_used"] - end["reserved"] - base)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}"


def render_terms(doc: dict) -> None:
    console = Console()
    mib = lambda n: "-" if n is None else f"{n / MiB:,.1f}"  # noqa: E731
    t = Table(title=f"memory estimate vs measurement, phase by phase ({doc['device']}"
                    f"{', dry run' if doc['dry_run'] else ''}), MiB; err % = (est - meas) / meas")
    cols = ["preset", "B", "prec", "ckpt", "est peak", "meas peak", "err %"]
    for ph in ("fwd", "bwd", "opt"):
        cols += [f"{ph} est", f"{ph} meas", "err %"]
    for c in [*cols, "s"]:
        t.add_column(c, justify="left" if c in ("preset", "prec") else "right")
    for r in doc["rows"]:
        est, meas, e = r["estimate"], r["measured"] or {}, r["err_pct"] or {}
        pp = meas.get("phase_peaks", {})
        cells = [r["preset"], str(r["batch_size"]), r["precision"], "on" if r["grad_checkpointing"] else "off",
                 mib(est["peak_allocated"]), mib(meas.get("max_allocated")) + (" OOM" if r["oom"] else ""),
                 _pct(e.get("peak"))]
        for ph in ("forward", "backward", "optimizer"):
            cells += [mib(est["phase_peaks"].get(ph)), mib(pp.get(ph)), _pct(e.get(ph))]
        t.add_row(*cells, f"{r['seconds']:.2f}")
    console.print(t)
    t2 = Table(title="raw terms, MiB (tensors counted on the tensors; the rest from the allocator / NVML)")
    for c in ("preset", "B", "prec", "ckpt", "weights", "grads", "optim", "saved est", "saved meas", "err %",
              "ws resident", "max reserved", "slack %", "rounding", "context", "errors"):
        t2.add_column(c, justify="left" if c in ("preset", "prec", "errors") else "right")
    for r in doc["rows"]:
        tens, meas, d, e = r["tensors"] or {}, r["measured"] or {}, r["derived"] or {}, r["err_pct"] or {}
        slack = d.get("allocator_slack")
        t2.add_row(r["preset"], str(r["batch_size"]), r["precision"], "on" if r["grad_checkpointing"] else "off",
                   mib(tens.get("weights")), mib(tens.get("gradients")), mib(tens.get("optimizer_state")),
                   mib(r["estimate"]["saved_for_backward"]), mib(tens.get("saved_for_backward")),
                   _pct(e.get("saved_for_backward")), mib(d.get("workspace_resident")), mib(meas.get("max_reserved")),
                   "-" if slack is None else f"{100 * slack:.1f}", mib(d.get("rounding_at_peak")),
                   mib(d.get("cuda_context")), "; ".join(r["errors"]))
    console.print(t2)
    ws = doc["process"].get("workspaces") or {}
    parts = [f"{k} {mib(v.get('workspace'))}" for k, v in ws.items() if isinstance(v, dict)]
    console.print("cuBLAS workspaces (MiB, each after clearing): " + ", ".join(parts)
                  + f"; all resident {mib(ws.get('all_resident'))}")
    console.print(f"CUDA context at the end (NVML process - reserved): {mib(doc['process'].get('cuda_context_end'))} MiB; "
                  f"{doc['seconds']:.1f} s in all" + ("" if doc["complete"] else " (STOPPED: rows missing)")
                  + (f"; {len(doc['skipped'])} rows skipped (--max-seconds)" if doc["skipped"] else ""))
    errs = [abs(v) for r in doc["rows"] for v in [(r["err_pct"] or {}).get("peak")] if v is not None]
    if errs:
        console.print(f"largest |peak error|: {max(errs):.2f}% (target 5%)")


def terms_main(args, precisions: list[str]) -> None:
    import signal
    import sys

    from lmkit.analysis.memory_terms import probe_for

    device = "cpu" if args.dry_run else args.device
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available on this machine")
        cases = [(p, b, None, prec, ck) for p, b, ck in CUDA_CASES for prec in precisions]
    elif args.dry_run:
        cases = DRY_RUN_CASES
    else:
        raise SystemExit("--terms runs on CUDA (--device cuda) or as a CPU dry run (--dry-run)")

    def log(msg: str) -> None:
        print(f"[memory_estimate] {msg}", file=sys.stderr, flush=True)

    def stop(signum, frame):  # noqa: ARG001
        raise _Stopped

    signal.signal(signal.SIGTERM, stop)
    doc = {"mode": "terms", "device": device, "dry_run": bool(args.dry_run), "complete": False, "seconds": None,
           "steps": args.steps, "process": {"errors": []}, "rows": [], "skipped": []}
    t0 = time.perf_counter()
    try:
        run_terms(doc, probe_for(device), cases, args.steps, log, args.max_seconds)
        doc["complete"] = True
    except (_Stopped, KeyboardInterrupt):
        log("stopped: printing the rows done so far")
    finally:
        doc["seconds"] = time.perf_counter() - t0
        if args.json:
            print(json.dumps(doc, indent=1))
        else:
            render_terms(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", action="append", choices=("fp32", "bf16", "fp16"),
                        help="repeatable; default fp32 and bf16")
    parser.add_argument("--terms", action="store_true",
                        help="every raw term per row (phase peaks, allocator, workspaces, context) + the estimate's walk")
    parser.add_argument("--dry-run", action="store_true",
                        help="--terms' code on the CPU for two small rows (allocator figures null)")
    parser.add_argument("--steps", type=int, default=3, help="--terms: measured steps per row (default 3)")
    parser.add_argument("--max-seconds", type=float, default=45.0,
                        help="--terms: start no row once the script has run this long (default 45; 0: no limit)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    precisions = args.precision or ["fp32", "bf16"]
    if args.dry_run and args.device == "cuda":
        raise SystemExit("--dry-run runs on the CPU: drop --device cuda")
    if args.steps < 2:
        raise SystemExit(f"--steps {args.steps}: at least 2 (the first step creates the optimizer state)")
    if args.terms or args.dry_run:
        terms_main(args, precisions)
        return
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
