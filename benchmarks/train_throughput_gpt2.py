"""The ``--gpt2-124m`` part of ``benchmarks/train_throughput.py``: GPT-2 124M in bf16.

Contenders, timed in interleaved rounds in one process (all alive at once: ~2 GB each with
AdamW at this shape): ``lmkit`` (eager), ``lmkit+compile`` (``torch.compile`` through the
single-process strategy's ``wrap``, the code path of ``lmkit train --compile``),
``nanogpt`` / ``nanogpt+compile`` (``benchmarks/nanogpt_peer.py``, compiled as nanoGPT's
``train.py`` does: ``torch.compile(model)``), and ``hf`` (``GPT2LMHeadModel`` with SDPA,
eager) when asked. Every step: bf16 autocast forward, backward, AdamW step (lmkit's fused
AdamW for lmkit; torch's AdamW, fused on CUDA, for the peers), ``zero_grad``. The first
warm-up step of a compiled contender includes its compile (``compile_s``). A contender that
fails (a compile error, say) is reported with its error; the others still run.

MFU = tokens/s x ``flops_per_token`` / peak: one ``flops_per_token`` for every contender,
lmkit's ``flops_per_token()`` of the shape (``6N + 12 L d T``, PaLM appendix B; the
contenders' matmuls are the same), and the dense bf16 peak of
:func:`lmkit.device.peak_flops` (``None`` on the CPU: MFU null).

``--profile DIR``: one ``torch.profiler`` trace (CPU + CUDA activities on CUDA, CPU on the
CPU; schedule wait 1, warm-up 1, active 3) of the faster lmkit contender:
``DIR/trace_gpt2_124m.json.gz`` and ``DIR/profile_gpt2_124m.txt`` (top 25 by self device
time on CUDA, self CPU time on the CPU).
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import traceback

import torch
from train_throughput import interleaved_rates, lmkit_model, make_step, sync

from lmkit.device import peak_flops

#: GPT-2 124M as nanoGPT benchmarks it (vocab padded to 50304), batch 16 x 1024.
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block=1024, batch=16, vocab=50304)
GPT2_CONTENDERS = ("lmkit", "lmkit+compile", "nanogpt", "nanogpt+compile")

# Published figures to read ours against (checked at their sources, Dec 2026):
# - nanoGPT: karpathy/nanoGPT transformer_sizing.ipynb: GPT-2 124M, batch 20 x grad-accum 5 x
#   1024 tokens in 0.755 s on one A100 -> "fraction of A100 used: 37.14%" of 312 TFLOPS bf16;
#   102,400 / 0.755 s = 135.6k tok/s is that cell's arithmetic. Its README only gives the
#   compile speed-up (~250 -> 135 ms/iter) and bench.py prints MFU but states no number.
# - nanochat: karpathy/nanochat discussion #1 ("Introducing nanochat", Oct 2025): d20 (561M
#   params) on 8xH100, steps 2-13 at mfu 47.4-49.0; runs/run1000.sh: d32 (1.88B) on 8xH100,
#   mfu 50.9. Larger models than 124M, and 8 GPUs.
REFERENCES = {
    "nanoGPT A100": "135.6k tok/s, 37% MFU (karpathy/nanoGPT transformer_sizing.ipynb: GPT-2 124M, 100 x 1024 "
                    "tokens in 0.755 s on one A100, 37.14% of 312 TFLOPS bf16; not stated in its README or bench.py)",
    "nanochat H100": "~47-51% MFU (karpathy/nanochat: discussion #1, d20 561M on 8xH100, 47.4-49.0%; "
                     "runs/run1000.sh, d32 1.88B on 8xH100, 50.9%; larger models than 124M)",
}


def parse_shape(text: str | None) -> dict:
    """``N_LAYER,N_HEAD,N_EMBD,BLOCK,BATCH[,VOCAB]`` -> a shape dict (``None``: GPT-2 124M)."""
    if text is None:
        return dict(GPT2_124M)
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (5, 6) or min(values) < 1 or values[2] % values[1]:
        raise SystemExit(f"--gpt2-shape {text!r}: want N_LAYER,N_HEAD,N_EMBD,BLOCK,BATCH[,VOCAB], positive "
                         "integers, N_EMBD a multiple of N_HEAD (e.g. 2,2,64,64,2)")
    keys = ("n_layer", "n_head", "n_embd", "block", "batch", "vocab")
    return {**GPT2_124M, **dict(zip(keys, values, strict=False))}


def compile_as_lmkit_train(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``torch.compile`` of ``model`` exactly as ``lmkit train --compile`` makes it on one
    process: through the single-process strategy's ``wrap`` (lmkit/training/parallel.py)."""
    from types import SimpleNamespace

    from lmkit.training.distributed import Distributed
    from lmkit.training.parallel import make_strategy

    return make_strategy(Distributed(), None, device).wrap(SimpleNamespace(model=model), None, True)


def build_contender(name: str, shape: dict, device: torch.device):
    """The step function of contender ``name`` on ``shape`` (bf16 autocast)."""
    from nanogpt_peer import NanoGPT
    from train_throughput import hf_model

    kind, _, variant = name.partition("+")
    dims = {k: shape[k] for k in ("vocab", "n_layer", "n_head", "n_embd", "block")}
    torch.manual_seed(0)
    model = {"lmkit": lmkit_model, "nanogpt": NanoGPT, "hf": hf_model}[kind](**dims).to(device).train()
    call = None
    if variant == "compile":
        call = compile_as_lmkit_train(model, device) if kind == "lmkit" else torch.compile(model)  # nanoGPT's train.py
    return make_step(model, kind, device, torch.bfloat16, call=call)


def _progress(text: str) -> None:
    """A line on stderr as each stage ends (stdout carries the JSON): a run cut short by a time
    limit still leaves what it measured."""
    print(f"[gpt2] {text}", file=sys.stderr, flush=True)


def _dynamo_graphs() -> int | None:
    try:  # private counters: only to show that nothing recompiled while timing
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001
        return None


def time_gpt2(shape: dict, names: list[str], device: torch.device, rounds: int, steps: int, warmup: int):
    """Build and warm up each contender (the first step compiles), then time them in
    interleaved rounds. A contender that fails to build or warm up is reported with its
    error and left out. Returns ``(report, step_fns, (x, y))``."""
    torch.manual_seed(0)
    x = torch.randint(0, shape["vocab"], (shape["batch"], shape["block"]), device=device)
    y = torch.randint(0, shape["vocab"], (shape["batch"], shape["block"]), device=device)
    step_fns, warm, errors, compiled = {}, {}, {}, {}
    for name in names:
        graphs = _dynamo_graphs()
        try:
            step = build_contender(name, shape, device)
            times = []
            for _ in range(max(1, warmup)):
                sync(device)
                t0 = time.perf_counter()
                step(x, y)
                sync(device)
                times.append(time.perf_counter() - t0)
            step_fns[name], warm[name] = step, times
            after = _dynamo_graphs()
            compiled[name] = after - graphs if graphs is not None and after is not None else None
            _progress(f"{name}: warm-up steps " + ", ".join(f"{t:.2f}" for t in times) + " s")
        except Exception as exc:  # noqa: BLE001 -- one shot on the GPU: keep the others' numbers
            traceback.print_exc(file=sys.stderr)
            errors[name] = f"{type(exc).__name__}: {exc}"[:600]
            _progress(f"{name}: failed: {errors[name]}")
        if name in errors:  # free what it built
            step = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    graphs_before = _dynamo_graphs()
    try:
        rates = interleaved_rates(step_fns, x, y, device, rounds, steps) if step_fns else {}
    except Exception as exc:  # noqa: BLE001 -- keep the warm-up figures
        traceback.print_exc(file=sys.stderr)
        errors.update({name: f"timing: {type(exc).__name__}: {exc}"[:600] for name in step_fns})
        rates = {}
    graphs_after = _dynamo_graphs()

    fpt = float(lmkit_model(**{k: shape[k] for k in ("vocab", "n_layer", "n_head", "n_embd", "block")})
                .flops_per_token())
    peak, peak_name = peak_flops(device, "bf16")
    contenders = {}
    for name in names:
        if name in errors:
            contenders[name] = {"tok_per_s": None, "mfu": None, "rounds": [], "compile_s": None,
                                "warmup_s": warm.get(name), "error": errors[name]}
            continue
        tok = statistics.median(rates[name])
        _progress(f"{name}: {tok:,.0f} tok/s (rounds " + ", ".join(f"{r:,.0f}" for r in rates[name]) + ")")
        contenders[name] = {
            "tok_per_s": tok,
            "mfu": tok * fpt / peak if peak else None,
            "rounds": rates[name],
            "compile_s": warm[name][0] if name.endswith("+compile") else None,
            "warmup_s": warm[name],
            "graphs_compiled": compiled[name],  # Dynamo graphs its warm-up compiled (0 when eager)
        }

    def ratio(a: str, b: str) -> float | None:
        ta, tb = (contenders.get(n, {}).get("tok_per_s") for n in (a, b))
        return ta / tb if ta and tb else None

    report = {
        "shape": {**shape, "precision": "bf16 autocast", "tied_head": True, "dropout": 0.0,
                  "activation": "gelu_tanh", "gpt2_124m": shape == GPT2_124M},
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_flops": peak,
        "peak_name": peak_name,
        "flops_per_token": fpt,
        "flops_per_token_basis": "lmkit GPT.flops_per_token() of this shape (6N + 12 L d T, N = the matmul "
                                 "weights, tied head once); the same number for every contender",
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else None,
        "timing": {"rounds": rounds, "steps_per_round": steps, "warmup_steps": max(1, warmup),
                   "tokens_per_step": shape["batch"] * shape["block"]},
        "contenders": contenders,
        "ratio_compiled_lmkit_over_nanogpt": ratio("lmkit+compile", "nanogpt+compile"),
        "ratio_eager_lmkit_over_nanogpt": ratio("lmkit", "nanogpt"),
        "recompiles_while_timing": (graphs_after - graphs_before) if graphs_before is not None
        and graphs_after is not None else None,
        "max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "references": REFERENCES,
    }
    return report, step_fns, (x, y)


def profile_steps(step, x: torch.Tensor, y: torch.Tensor, device: torch.device, out_dir: str,
                  active: int = 3, title: str = "") -> dict:
    """One ``torch.profiler`` trace of ``active`` steps (after 1 waiting and 1 warm-up step):
    ``out_dir/trace_gpt2_124m.json.gz`` (Chrome trace, gzipped) and
    ``out_dir/profile_gpt2_124m.txt`` (``key_averages()`` top 25 by self device time on CUDA,
    self CPU time on the CPU)."""
    import gzip
    import os
    import shutil
    import tempfile

    from torch.profiler import ProfilerActivity, profile, schedule

    os.makedirs(out_dir, exist_ok=True)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    used: list[str] = []
    trace = os.path.join(out_dir, "trace_gpt2_124m.json.gz")
    table_path = os.path.join(out_dir, "profile_gpt2_124m.txt")
    tmp = tempfile.mkdtemp()
    raw = os.path.join(tmp, "trace.json")
    tables: list[str] = []

    def ready(prof) -> None:
        prof.export_chrome_trace(raw)
        averages = prof.key_averages()
        # torch >= 2.4: FunctionEventAvg.self_device_time_total (an instance attribute), and
        # table() maps a "cuda" sort key to "device"; before, self_cuda_time_total
        sort_by = "self_cpu_time_total"
        if cuda:
            sort_by = ("self_device_time_total" if averages and hasattr(averages[0], "self_device_time_total")
                       else "self_cuda_time_total")
        try:
            tables.append(averages.table(sort_by=sort_by, row_limit=25))
        except (AttributeError, KeyError) as exc:  # a name this torch lacks: fall back, and say so
            sort_by = "cpu_time_total"
            tables.append(f"(sorting by device time failed: {exc})\n" + averages.table(sort_by=sort_by, row_limit=25))
        used.append(sort_by)

    with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=active, repeat=1),
                 on_trace_ready=ready, record_shapes=False, profile_memory=False, with_stack=False) as prof:
        for _ in range(2 + active):
            step(x, y)
            sync(device)
            prof.step()
    if not os.path.exists(raw):
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError("the profiler recorded no trace (on_trace_ready never ran)")
    with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw_bytes = os.path.getsize(raw)
    shutil.rmtree(tmp, ignore_errors=True)
    with open(table_path, "w") as f:
        f.write(f"# {title}: torch {torch.__version__}, {active} profiled steps, sorted by {used[0]}\n")
        f.write(tables[0])
    return {"trace": trace, "trace_bytes": os.path.getsize(trace), "trace_json_bytes": raw_bytes,
            "table": table_path, "sort_by": used[0], "active_steps": active,
            "activities": [str(a) for a in activities]}


def run_gpt2(args, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the legacy flags, as lmkit train sets them (the
        torch.backends.cudnn.allow_tf32 = True  # new fp32_precision API mixed with them breaks Inductor)
    try:
        torch._logging.set_logs(recompiles=True)  # a recompile shows on stderr with its reason
    except Exception:  # noqa: BLE001
        pass
    shape = parse_shape(args.gpt2_shape)
    names = list(args.gpt2_contenders.split(",")) + (["hf"] if args.gpt2_hf else [])
    report, step_fns, (x, y) = time_gpt2(shape, names, device, args.gpt2_rounds, args.gpt2_steps, args.gpt2_warmup)
    if args.profile:
        lm = [n for n in ("lmkit+compile", "lmkit") if n in step_fns]
        best = max(lm, key=lambda n: report["contenders"][n]["tok_per_s"]) if lm else None
        for name in [n for n in step_fns if n != best]:  # free the rest before profiling
            del step_fns[name]
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if best is None:
            report["profile"] = {"error": "no lmkit contender ran"}
        else:
            _progress(f"profiling {best} -> {args.profile}")
            try:
                s = report["shape"]
                title = (f"{best}, GPT-2 {s['n_layer']}x{s['n_embd']}, batch {s['batch']} x {s['block']}, "
                         f"bf16 autocast, on {report['device_name']}")
                graphs = _dynamo_graphs()
                prof = profile_steps(step_fns[best], x, y, device, args.profile, title=title)
                if prof["trace_bytes"] > 12 * 2**20:  # keep it well under 16 MiB: one active step
                    prof = profile_steps(step_fns[best], x, y, device, args.profile, active=1, title=title)
                after = _dynamo_graphs()
                report["profile"] = {"contender": best, **prof, "recompiles_while_profiling":
                                     after - graphs if graphs is not None and after is not None else None}
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc(file=sys.stderr)
                report["profile"] = {"contender": best, "error": f"{type(exc).__name__}: {exc}"[:600]}
    return report


def print_gpt2(g: dict) -> None:
    s = g["shape"]
    title = "GPT-2 124M" if s["gpt2_124m"] else f"GPT-2 shape {s['n_layer']}x{s['n_embd']} (dry run)"
    peak = f"{g['peak_name']}, {g['peak_flops'] / 1e12:.1f} TFLOP/s" if g["peak_flops"] else "unknown peak (no MFU)"
    print(f"{title} bf16 (batch {s['batch']} x {s['block']}, vocab {s['vocab']}) on {g['device_name']}; "
          f"peak: {peak}; {g['flops_per_token']:.4g} FLOPs/token (lmkit's, the same for all)")
    for name, c in g["contenders"].items():
        if c.get("error"):
            print(f"  {name:16s} failed: {c['error']}")
            continue
        mfu = f"MFU {100 * c['mfu']:.1f}%" if c["mfu"] is not None else "MFU n/a"
        comp = f", compile+first step {c['compile_s']:.1f} s" if c["compile_s"] is not None else ""
        print(f"  {name:16s} {c['tok_per_s']:10,.0f} tok/s  {mfu}{comp}")
    for label, key in (("lmkit+compile / nanogpt+compile", "ratio_compiled_lmkit_over_nanogpt"),
                       ("lmkit / nanogpt (eager)", "ratio_eager_lmkit_over_nanogpt")):
        if g[key] is not None:
            print(f"  ratio {label} = {g[key]:.3f}x")
    if "profile" in g:
        p = g["profile"]
        print(f"  profile ({p.get('contender')}): " + (p["error"] if "error" in p else f"{p['trace']}, {p['table']}"))
    for name, text in g["references"].items():
        print(f"  reference {name}: {text}")
