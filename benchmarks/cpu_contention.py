"""CPU contention: lmkit training time on an idle machine and next to one busy process.

Two shapes, each a whole ``lmkit train`` process (import and data included):

* ``pilot``: the default preset (0.66M parameters, arithmetic, batch 32 x 32), 100 steps;
* ``shakespeare``: the shape of ``benchmarks/train_throughput.py`` (4 layers, d 256, block
  256, batch 8, byte tokenizer) on Tiny Shakespeare, 20 steps.

Three thread settings: ``default`` (torch's, one thread per core: ``--threads`` = all usable
cores, what lmkit did before its thread policy), ``one`` (``OMP_NUM_THREADS=1``) and
``policy`` (lmkit's automatic choice, :mod:`lmkit.threads`). Conditions: ``idle`` and
``busy`` (one other process spinning a Python loop). Runs are interleaved (every setting
once per round) and repeated ``--rounds`` times, as contention makes single runs erratic.
Prints the median seconds of each cell and the ratio to ``one``.

Usage::

    python benchmarks/cpu_contention.py --rounds 2      # about 6 minutes on 2 cores
    python benchmarks/cpu_contention.py --json

Run it alone: another benchmark or test run on the machine is contention too. A benchmark,
not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

SHAPES = {
    "pilot": ["--max-steps", "100"],
    "shakespeare": ["--data", str(SHAKESPEARE), "--tokenizer", "byte", "--max-steps", "20", "--batch-size", "8",
                    "--set", "model.n_layer=4", "--set", "model.n_head=4", "--set", "model.n_embd=256",
                    "--set", "model.d_ff=1024", "--set", "model.block_size=256", "--set", "training.eval_interval=20",
                    "--set", "training.eval_iters=2", "--set", "training.eval_at_start=false"],
}


def settings() -> dict[str, tuple[list[str], dict[str, str]]]:
    cores = len(os.sched_getaffinity(0))
    return {"default": (["--threads", str(cores)], {}), "one": ([], {"OMP_NUM_THREADS": "1"}), "policy": ([], {})}


def run_once(shape: str, args: list[str], env: dict[str, str], workdir: Path) -> float:
    full_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LMKIT_THREADS")}
    full_env.update(env)
    cmd = [sys.executable, "-m", "lmkit", "train", *SHAPES[shape], *args, "--no-tui", "--out-dir", str(workdir)]
    t0 = time.perf_counter()
    result = subprocess.run(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            check=False)
    seconds = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {result.stderr.strip()[-300:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shapes", default="pilot,shakespeare")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    times: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for shape in shapes:  # warm the token cache and the imports once
            run_once(shape, ["--max-steps", "1"], {}, workdir)
        for _ in range(args.rounds):
            for condition in ("idle", "busy"):
                spinner = None
                if condition == "busy":
                    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    time.sleep(0.5)
                try:
                    for shape in shapes:
                        for name, (extra, env) in settings().items():
                            times.setdefault((shape, condition, name), []).append(run_once(shape, extra, env, workdir))
                finally:
                    if spinner is not None:
                        spinner.kill()
                        spinner.wait()
    med = {k: statistics.median(v) for k, v in times.items()}
    if args.json:
        print(json.dumps([{"shape": s, "condition": c, "setting": n, "median_s": med[(s, c, n)],
                           "runs_s": times[(s, c, n)]} for (s, c, n) in times], indent=2))
        return
    print(f"{'shape':12} {'condition':9} {'setting':8} {'median s':>9} {'x one':>7}  runs")
    for (shape, condition, name), value in med.items():
        one = med[(shape, condition, "one")]
        runs = ", ".join(f"{t:.1f}" for t in times[(shape, condition, name)])
        print(f"{shape:12} {condition:9} {name:8} {value:9.2f} {value / one:7.2f}  {runs}")


if __name__ == "__main__":
    main()
