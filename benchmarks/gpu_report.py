"""Markdown tables from the files ``benchmarks/gpu_check.sh`` brought back (issue 15).

Reads OUTDIR (the eight files) and prints what the closing note and the README's performance
section quote: the pytest result, the bitwise resume checks, GPT-2 124M throughput and MFU per
contender, the memory estimate against ``max_memory_allocated`` row by row (with the per-phase
errors), HellaSwag's items/s, and whether the dashboard showed its GPU panel. A file that is
missing or cut short gives a line saying so; nothing is filled in.

Usage::

    python benchmarks/gpu_report.py OUTDIR            # e.g. /work/.device/.../files_at
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

MIB = 2**20


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"{path.name}: not readable ({type(exc).__name__}); the stage did not finish\n")
        return None


def _pct(value) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:,.0f}"


def setup(out: Path) -> None:
    text = (out / "1_setup.txt").read_text() if (out / "1_setup.txt").exists() else ""
    cuda = re.search(r"^cuda .*$", text, re.M)
    smi = re.search(r"^name, memory.total.*\n(.*)$", text, re.M)
    print("## Machine\n")
    print(f"- {cuda.group(0) if cuda else 'no torch/CUDA line in 1_setup.txt'}")
    if smi:
        print(f"- nvidia-smi: {smi.group(1)}")
    for name in ("torch", "triton", "lmkit", "transformers"):
        m = re.search(rf"^  {name}\s+(\S+(?: FAILED:.*)?)", text, re.M)
        if m:
            print(f"- {name} {m.group(1)}")
    print()


def pytest_result(out: Path) -> None:
    text = (out / "2_pytest.txt").read_text() if (out / "2_pytest.txt").exists() else ""
    lines = [ln for ln in text.splitlines() if re.search(r"\b(passed|failed|error|skipped)\b", ln)]
    failed = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    print("## `python -m pytest -m gpu`\n")
    print(f"`{lines[-1].strip('= ')}`" if lines else "no summary line (the stage was cut short)")
    for line in failed:
        print(f"- {line}")
    print()


def resume(out: Path) -> None:
    text = (out / "3_resume.txt").read_text() if (out / "3_resume.txt").exists() else ""
    print("## Seed 000's run, straight vs SIGTERM at step ~100 + resumed (bitwise)\n")
    print("| kernels | equal | first difference |\n|---|---|---|")
    for block in re.findall(r'\{\n  "label".*?\n\}', text, re.S):
        try:
            r = json.loads(block)
        except ValueError:
            continue
        first = "; ".join(f"{k}: {v}" for k, v in r.get("first_difference", {}).items()) or "-"
        kernels = "deterministic" if r["label"].endswith("_true") else "default"
        print(f"| {kernels} | {'yes' if r['equal'] else 'NO'} | {first} |")
    for m in re.finditer(r"^(straight_\w+) summary: (.*)$", text, re.M):
        print(f"\n`{m.group(1)}`: {m.group(2)}")
    print()


def throughput(out: Path) -> None:
    data = _json(out / "4_throughput.json")
    g = (data or {}).get("gpt2_124m_bf16")
    print("## GPT-2 124M, bf16, batch 16 x 1024 (`benchmarks/train_throughput.py --device cuda --skip-small "
          "--gpt2-124m --json --profile DIR`)\n")
    if not g:
        print("no result\n")
        return
    peak = f"{g['peak_flops'] / 1e12:.1f} TFLOP/s ({g['peak_name']})" if g.get("peak_flops") else "unknown"
    print(f"{g.get('device_name')}; peak {peak}; {g['flops_per_token'] / 1e6:.1f} MFLOP/token for every contender\n")
    print("| contender | tokens/s | MFU | compile + first step |\n|---|---:|---:|---:|")
    for name, c in g["contenders"].items():
        if c.get("tok_per_s") is None:
            print(f"| {name} | failed: {str(c.get('error'))[:80]} | | |")
            continue
        mfu = "-" if c.get("mfu") is None else f"{100 * c['mfu']:.1f}%"
        comp = "-" if c.get("compile_s") is None else f"{c['compile_s']:.0f} s"
        print(f"| {name} | {c['tok_per_s']:,.0f} | {mfu} | {comp} |")
    ratio = g.get("ratio_compiled_lmkit_over_nanogpt")
    print(f"\ncompiled lmkit / compiled nanoGPT peer: {ratio:.3f}x" if ratio else "")
    for name, ref in (g.get("references") or {}).items():
        print(f"- reference {name}: {ref}")
    print()


def memory(out: Path) -> None:
    data = _json(out / "5_memory.json")
    print("## Memory estimate vs `torch.cuda.max_memory_allocated` (`benchmarks/memory_estimate.py --device cuda "
          "--terms --json`)\n")
    if not data:
        return
    print("| preset | B | precision | ckpt | est. peak MiB | measured MiB | err | fwd err | bwd err | step err |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in data.get("rows", []):
        e, m = r.get("err_pct") or {}, r.get("measured") or {}
        print(f"| {r['preset']} | {r['batch_size']} | {r['precision']} | {'on' if r['grad_checkpointing'] else 'off'} | "
              f"{_mib((r.get('estimate') or {}).get('peak_allocated'))} | {_mib(m.get('max_allocated'))} | "
              f"{_pct(e.get('peak'))} | {_pct(e.get('forward'))} | {_pct(e.get('backward'))} | "
              f"{_pct(e.get('optimizer'))} |")
    errs = [abs(r["err_pct"]["peak"]) for r in data.get("rows", []) if (r.get("err_pct") or {}).get("peak") is not None]
    if errs:
        print(f"\nlargest |error| of the peak: {max(errs):.1f}% (target 5%)")
    if data.get("skipped"):
        print(f"\nskipped (time limit): {data['skipped']}")
    print()


def hellaswag(out: Path) -> None:
    text = (out / "6_hellaswag.txt").read_text() if (out / "6_hellaswag.txt").exists() else ""
    print("## HellaSwag, medium (124M) shape, untrained (`lmkit eval --task hellaswag`)\n")
    m = re.search(r"\{\n \"n_items\".*?\n\}", text, re.S)
    if not m:
        print("no result\n")
        return
    r = json.loads(m.group(0))
    print(f"{r['n_items']:,} items in {r['wall_time_s']:.1f} s: {r['items_per_s']:,.1f} items/s on {r['device']} "
          f"(target: 10,042 in <= 60 s); acc_norm {r['metrics'].get('acc_norm')}\n")


def dashboard(out: Path) -> None:
    text = (out / "7_dashboard.txt").read_text() if (out / "7_dashboard.txt").exists() else ""
    print("## Dashboard\n")
    panel = re.search(r"─ GPU \(.*$", text, re.M)
    print(f"GPU panel: `{panel.group(0).strip()}`" if panel else "no GPU panel in the capture")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    args = parser.parse_args()
    if not args.outdir.is_dir():
        sys.exit(f"gpu_report: {args.outdir}: not a folder")
    for section in (setup, pytest_result, resume, throughput, memory, hellaswag, dashboard):
        section(args.outdir)


if __name__ == "__main__":
    main()
