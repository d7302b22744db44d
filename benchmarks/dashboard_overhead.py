"""What the live dashboard costs a training run (a benchmark, not a test).

Trains the same preset in one process, alternately with the dashboard drawing on a
pseudo-terminal and with plain log lines on a pseudo-terminal (what ``--no-tui`` does),
and reports per run: the median step time over the logged windows (the loop's own
``step_time_s``, which excludes evaluation and checkpoint pauses), steps/s, the frames the
dashboard drew and the CPU time its refresh thread and the sampler thread used, as a
share of the process's CPU time.

    python benchmarks/dashboard_overhead.py --preset pilot --max-steps 300 --repeats 2

Timing on a shared machine is noisy; the CPU-time share of the dashboard's threads is the
robust number (it does not depend on what else runs on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path


def drain(fd: int, stop: threading.Event) -> None:
    import select

    while not stop.is_set():
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                if not os.read(fd, 1 << 16):
                    return
            except OSError:
                return


def run_once(mode: str, preset: str, max_steps: int, root: Path, cols: int, rows: int) -> dict:
    import fcntl
    import struct
    import termios

    from rich.console import Console

    from lmkit.config import build_run_config
    from lmkit.monitor.console import PlainLog
    from lmkit.monitor.dashboard import Dashboard
    from lmkit.training.loop import train

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    stop = threading.Event()
    reader = threading.Thread(target=drain, args=(master, stop), daemon=True)
    reader.start()
    term = os.fdopen(slave, "w", encoding="utf-8", buffering=1)
    name = f"{mode}-{time.time_ns()}"
    config = build_run_config(preset, [], {"out_dir": ("--out-dir", str(root)), "name": ("--name", name),
                                           "training.max_steps": ("--max-steps", max_steps),
                                           "training.epochs": ("--max-steps", None)})
    if mode == "dashboard":
        renderer = Dashboard(Console(file=term, width=cols, height=rows, force_terminal=True))
    else:
        renderer = PlainLog(term)
    cpu0, wall0 = time.process_time(), time.time()
    try:
        summary = train(config, emit=renderer)
    finally:
        if mode == "dashboard":
            renderer.close()
    cpu, wall = time.process_time() - cpu0, time.time() - wall0
    stop.set()
    term.close()
    reader.join(timeout=2)
    os.close(master)
    rows_ = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows_ if r.get("split") == "train" and r["step"] > 1]
    step_s = statistics.median(r["step_time_s"] for r in windows[1:] or windows)
    out = {"mode": mode, "steps": summary["steps"], "median_step_ms": round(1000 * step_s, 2),
           "steps_per_s": round(1 / step_s, 2), "wall_s": round(wall, 1), "process_cpu_s": round(cpu, 1)}
    if mode == "dashboard":
        sampler_cpu = renderer._sampler.cpu_seconds if renderer._sampler is not None else 0.0  # noqa: SLF001
        out.update(frames=renderer.renders, render_cpu_s=round(renderer.render_cpu_seconds, 2),
                   sampler_cpu_s=round(sampler_cpu, 2),
                   dashboard_cpu_share=f"{100 * (renderer.render_cpu_seconds + sampler_cpu) / cpu:.2f}%")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="pilot")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cols", type=int, default=140)
    parser.add_argument("--rows", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for _ in range(args.repeats):
            for mode in ("dashboard", "plain"):
                result = run_once(mode, args.preset, args.max_steps, Path(tmp), args.cols, args.rows)
                print(json.dumps(result), flush=True)
                results.append(result)
    for mode in ("dashboard", "plain"):
        rates = [r["steps_per_s"] for r in results if r["mode"] == mode]
        print(f"{mode}: steps/s {', '.join(map(str, rates))} (median {statistics.median(rates):.2f})")


if __name__ == "__main__":
    main()
