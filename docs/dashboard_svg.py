"""Make docs/dashboard.svg: the dashboard's last frame of a real training run.

Trains a preset in this process with the dashboard as an observer (drawing into a
recorded console instead of a terminal; the host/GPU sampler thread runs as in
``lmkit train``), then exports the final frame with Rich's ``Console.export_svg``.

    OMP_NUM_THREADS=1 python docs/dashboard_svg.py --preset pilot --max-steps 630 \
        --set training.log_interval=5 --set training.eval_every_epochs=1 --out docs/dashboard.svg
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

from rich.console import Console
from rich.terminal_theme import MONOKAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="pilot")
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--name", default="pilot-demo")
    parser.add_argument("--width", type=int, default=140)
    parser.add_argument("--height", type=int, default=42)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("dashboard.svg"))
    args = parser.parse_args()

    from lmkit.config import build_run_config
    from lmkit.monitor.dashboard import Dashboard
    from lmkit.training.loop import train

    console = Console(record=True, width=args.width, height=args.height, force_terminal=True,
                      color_system="truecolor", file=io.StringIO())
    dashboard = Dashboard(console, live=False)  # the sampler thread still runs
    with tempfile.TemporaryDirectory() as tmp:
        config = build_run_config(args.preset, args.overrides, {
            "out_dir": ("--out-dir", tmp), "name": ("--name", args.name),
            "training.max_steps": ("--max-steps", args.max_steps), "training.epochs": ("--max-steps", None)})
        train(config, emit=dashboard)
    console.print(dashboard, height=args.height - 1)
    command = " ".join([f"lmkit train --preset {args.preset} --max-steps {args.max_steps} --name {args.name}",
                        *(f"--set {o}" for o in args.overrides)])
    args.out.write_text(console.export_svg(title=command, theme=MONOKAI))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
