"""What adaptive SVD costs: nanochat-d4 steps with and without the analysis.

Three settings of the ``nanochat-d4`` preset (36.7M parameters, batch 1 x 512 tokens, Muon +
AdamW) on WikiText-2's validation text, each a fresh in-process run of ``--steps`` steps:

* ``off``: ``svd.enabled=false``;
* ``phase1``: the original experiment's Phase 1, layer 0's ``c_q`` analysed every 20 steps;
* ``phase2``: its Phase 2, every attention matrix of every layer (16) every 20 steps.

For each: the training time per step (the throughput meter's, evaluation excluded), the time
spent in the analyses (the sum of :class:`lmkit.events.SVDAnalysis` ``seconds``: the SVDs,
metrics and actions), the number of switches, and the overhead against ``off``. A switched
layer changes the step too (its forward forms ``W_p + B·A``; the switch step is skipped), so
the totals include that. Settings are interleaved per round.

Usage::

    python benchmarks/svd_overhead.py                 # 60 steps, 1 round: about 4 minutes on 2 cores
    python benchmarks/svd_overhead.py --steps 100 --rounds 2 --json

Run it alone. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw"

SETTINGS = {
    "off": ["svd.enabled=false"],
    "phase1": ["svd.enabled=true", "svd.targets=[transformer.h.0.attn.c_q]", "svd.interval=20"],
    "phase2": ["svd.enabled=true", "svd.targets=[transformer.h.*.attn.*]", "svd.interval=20"],
}


def one_run(setting: str, steps: int, out_dir: Path, threads: int | None) -> dict:
    from lmkit.config import build_run_config
    from lmkit.events import SVDAnalysis, SVDModeSwitch
    from lmkit.training.loop import Trainer

    overrides = [f"out_dir={out_dir}", f"data.dataset={TEXT}", f"training.max_steps={steps}",
                 "training.eval_at_start=false", f"training.eval_interval={10 * steps}",
                 "training.checkpoint_interval=null", "training.tensorboard=false", *SETTINGS[setting]]
    if threads:
        overrides.append(f"training.threads={threads}")
    config = build_run_config("nanochat-d4", overrides)
    analysis_s, switches = [0.0], [0]

    def emit(event):
        if isinstance(event, SVDAnalysis):
            analysis_s[0] += event.seconds
        elif isinstance(event, SVDModeSwitch):
            switches[0] += 1

    trainer = Trainer(config, emit)
    summary = trainer.run()
    return {"train_s_per_step": summary["train_time_s"] / summary["steps"], "analysis_s": analysis_s[0],
            "switches": switches[0], "threads": trainer.config.training.threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="default: lmkit's thread policy")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name in SETTINGS:
                results[name].append(one_run(name, args.steps, Path(tmp) / "runs", args.threads))
    table = {}
    for name, runs in results.items():
        table[name] = {
            "train_s_per_step": statistics.median(r["train_s_per_step"] for r in runs),
            "analysis_s_total": statistics.median(r["analysis_s"] for r in runs),
            "switches": [r["switches"] for r in runs],
            "threads": runs[0]["threads"],
        }
    base = table["off"]["train_s_per_step"]
    for row in table.values():
        row["overhead_pct"] = 100.0 * (row["train_s_per_step"] / base - 1.0)
    if args.json:
        print(json.dumps({"steps": args.steps, "rounds": args.rounds, "results": table}, indent=2))
        return
    print(f"nanochat-d4, batch 1 x 512, {args.steps} steps, {args.rounds} round(s), "
          f"{table['off']['threads']} thread(s); median per setting")
    print(f"{'setting':<8} {'s/step':>8} {'analyses s':>11} {'switches':>9} {'overhead':>9}")
    for name, row in table.items():
        print(f"{name:<8} {row['train_s_per_step']:>8.3f} {row['analysis_s_total']:>11.2f} "
              f"{'/'.join(map(str, row['switches'])):>9} {row['overhead_pct']:>+8.1f}%")


if __name__ == "__main__":
    main()
