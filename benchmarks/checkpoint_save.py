"""Time :func:`lmkit.training.checkpoint.save_checkpoint` (and the load that verifies it)
on a ~10M-parameter training state on the CPU: model weights plus AdamW's two moment
buffers (~30M fp32 numbers, ~120 MB on disk).

    python benchmarks/checkpoint_save.py [--params 10e6] [--repeats 5] [--dir DIR]

Prints the median and min seconds of ``save_checkpoint``, of its checksum pass alone, of a
plain ``torch.save`` of the same state to the same folder (write + fsync: the floor a save
cannot beat), and of ``load_checkpoint``. Not a test: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmkit.training import checkpoint as ckpt


def training_state(n_params: float) -> dict:
    """A state shaped like the trainer's: 8 square layers + AdamW state after one step."""
    torch.manual_seed(0)
    d = int((n_params / 8) ** 0.5)
    model = torch.nn.Sequential(*[torch.nn.Linear(d, d, bias=True) for _ in range(8)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, d)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1, "micro_step": 1,
            "rng": {"torch": torch.get_rng_state(), "python": [3, list(range(625)), None]},
            "config": {"model": {"n_embd": d}}, "n_params": sum(p.numel() for p in model.parameters())}


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=10e6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp folder)")
    args = parser.parse_args()
    state = training_state(args.params)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "latest.pt"
        plain = Path(tmp) / "plain.pt"

        def torch_save() -> None:
            with plain.open("wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

        rows = {
            "save_checkpoint": timed(lambda: ckpt.save_checkpoint(state, path), args.repeats),
            "checksum alone": timed(lambda: ckpt.tensor_checksum(state), args.repeats),
            "torch.save+fsync": timed(torch_save, args.repeats),
            "load_checkpoint": timed(lambda: ckpt.load_checkpoint(path), args.repeats),
        }
        size = path.stat().st_size
    print(f"state: {state['n_params'] / 1e6:.1f}M params (+ AdamW moments), {size / 1e6:.0f} MB; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, times in rows.items():
        print(f"{name:18s} median {statistics.median(times):.3f}s  min {min(times):.3f}s  (n={len(times)})")


if __name__ == "__main__":
    main()
