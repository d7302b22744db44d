"""Are two lmkit runs the same training, bit for bit? (stage 3 of ``benchmarks/gpu_check.sh``)

Compares the ``latest`` checkpoints of run A and run B -- step, model tensors, AdamW state,
scheduler, GradScaler state (fp16), best validation loss -- and the per-step training losses of
their ``metrics.jsonl``, and prints one JSON object: what is equal, and for what is not, the first
difference (the tensor and its largest absolute difference, or the first step whose loss differs).

Usage::

    python benchmarks/runs_equal.py runs/straight runs/resumed [--label resume]

Exits 0 when everything is equal, 1 when something differs, 2 on unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _load(run: Path) -> dict:
    from lmkit.training.checkpoint import load_checkpoint

    return load_checkpoint(run / "checkpoints" / "latest.pt" if (run / "checkpoints" / "latest.pt").exists()
                           else run / "checkpoints" / "latest.dcp")


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if r.get("split") == "train"]


def _tensor_diff(a: dict, b: dict, prefix: str) -> str | None:
    """The first key whose tensors differ (with the largest absolute difference), else None."""
    if a.keys() != b.keys():
        return f"{prefix}: keys differ ({sorted(set(a) ^ set(b))[:5]})"
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            found = _tensor_diff(x, y, f"{prefix}.{key}")
            if found:
                return found
            continue
        tx, ty = torch.as_tensor(x), torch.as_tensor(y)
        if tx.shape != ty.shape or tx.dtype != ty.dtype:
            return f"{prefix}.{key}: shape/dtype {tuple(tx.shape)} {tx.dtype} vs {tuple(ty.shape)} {ty.dtype}"
        if not torch.equal(tx, ty):
            gap = (tx.double() - ty.double()).abs().max().item() if tx.is_floating_point() else "n/a"
            return f"{prefix}.{key}: max |diff| {gap}"
    return None


def compare(run_a: Path, run_b: Path) -> dict:
    a, b = _load(run_a), _load(run_b)
    checks: dict[str, bool] = {}
    first: dict[str, str] = {}
    for name in ("step", "micro_step", "tokens", "best_val_loss", "best_step"):
        checks[name] = a.get(name) == b.get(name)
        if not checks[name]:
            first[name] = f"{a.get(name)!r} vs {b.get(name)!r}"
    for name, (x, y) in {"model": (a["model"], b["model"]),
                         # a sharded (.dcp) checkpoint consolidates without its optimizer
                         "optimizer_state": (a.get("optimizer", {}).get("state", {}),
                                             b.get("optimizer", {}).get("state", {}))}.items():
        diff = _tensor_diff(x, y, name)
        checks[name] = diff is None
        if diff:
            first[name] = diff
    checks["scheduler"] = a["scheduler"].get("last_epoch") == b["scheduler"].get("last_epoch") and \
        a["scheduler"].get("_last_lr") == b["scheduler"].get("_last_lr")
    sa, sb = a.get("scaler"), b.get("scaler")
    checks["grad_scaler"] = sa == sb
    if sa != sb:
        first["grad_scaler"] = f"{sa} vs {sb}"
    la, lb = _losses(run_a), _losses(run_b)
    checks["train_losses"] = la == lb
    if la != lb:
        steps_a = [s for s, _ in la]
        steps_b = [s for s, _ in lb]
        if steps_a != steps_b:
            first["train_losses"] = f"logged steps differ ({len(steps_a)} vs {len(steps_b)} rows)"
        else:
            k = next(i for i, (x, y) in enumerate(zip(la, lb, strict=True)) if x != y)
            first["train_losses"] = f"step {la[k][0]}: {la[k][1]!r} vs {lb[k][1]!r}"
    return {"a": str(run_a), "b": str(run_b), "step": a.get("step"), "equal": all(checks.values()),
            "checks": checks, "first_difference": first,
            "grad_scaler": {"a": sa, "b": sb} if sa is not None or sb is not None else None,
            "logged_steps": len(la)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--label", default=None, help="a name for this comparison in the JSON")
    args = parser.parse_args()
    from lmkit.errors import LmkitError

    try:
        result = compare(args.run_a, args.run_b)
    except (OSError, KeyError, ValueError, LmkitError) as exc:
        print(f"runs_equal: cannot compare {args.run_a} and {args.run_b}: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.label:
        result = {"label": args.label, **result}
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["equal"] else 1)


if __name__ == "__main__":
    main()
