"""The LM loss's forward + backward on the CPU: lmkit's route (lmkit.models.loss) against
ATen's ``F.cross_entropy``, median of interleaved repeats.

Usage::

    python benchmarks/cross_entropy_speed.py                      # N=2048 rows, V=8192, 1 thread
    python benchmarks/cross_entropy_speed.py --rows 8192 --vocab 50304 --threads 2

A benchmark, not a test: it asserts nothing (tests/test_loss.py checks the values).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmkit.models.loss import cross_entropy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2048, help="B*T target positions")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logits = torch.randn(args.rows, args.vocab)
    targets = torch.randint(0, args.vocab, (args.rows,))
    routes = {"aten": lambda z: F.cross_entropy(z, targets), "lmkit": lambda z: cross_entropy(z, targets)}
    times: dict[str, list[float]] = {k: [] for k in routes}
    for _ in range(args.repeats):
        for name, fn in routes.items():
            z = logits.clone().requires_grad_(True)
            t0 = time.perf_counter()
            (fn(z) * 0.5).backward()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"cross-entropy fwd+bwd, {args.rows} x {args.vocab} fp32, {args.threads} thread(s), "
          f"median of {args.repeats}:")
    for name, ms in med.items():
        print(f"  {name:6s} {ms:8.1f} ms")
    print(f"  aten / lmkit = {med['aten'] / med['lmkit']:.2f}x")


if __name__ == "__main__":
    main()
