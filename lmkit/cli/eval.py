"""``lmkit eval RUN --task T``: evaluate a run's checkpoint(s) and write ``runs/NAME/eval/``.

The command loads the run (:func:`lmkit.runs.load_run`), gives every task an
:class:`~lmkit.evaluation.task.EvalContext`, and writes what the task returns together
with where it came from: checkpoint, step, tokens, wall time, items/s, lmkit version.
File layout: see :mod:`lmkit.evaluation.task`.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import typer

from lmkit.cli._common import handle_errors
from lmkit.errors import CheckpointError, ConfigError
from lmkit.numbers import finite


def _direction(record: dict, metric: str) -> str:
    """`` (lower is better)`` / `` (higher is better)``: the direction the result declares for
    ``metric`` (older results: the name rule); empty for a metric with no direction."""
    from lmkit.evaluation.task import fallback_direction

    direction = (record.get("directions") or {}).get(metric) or fallback_direction(metric)
    return f" ({direction} is better)" if direction in ("lower", "higher") else ""


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(finite(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _replaced_note(path: Path, record: dict[str, Any]) -> str | None:
    """A warning when ``path`` holds a result of other items (another data file or --limit) or
    of another step than ``record``, which is about to replace it; ``None`` otherwise."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    what = {"data_file": "data", "n_items": "items", "step": "step"}  # (a checkpoint path depends on the cwd)
    changed = [f"{label} {old.get(key)!s} -> {record.get(key)!s}" for key, label in what.items()
               if key in old and old.get(key) != record.get(key)]
    if not changed:
        return None
    return f"warning: replaced {path}, which held a result on other items ({'; '.join(changed)})"


def resolve_tasks(names: list[str]) -> dict[str, Any]:
    """``name -> evaluate`` for every requested task, before any model is loaded.

    Raises:
        ConfigError: unknown task (listing the known ones), or a task whose module is not
            part of this build.
    """
    from lmkit.evaluation.task import TASKS, get_task, task_module

    funcs: dict[str, Any] = {}
    for name in names:
        if name in funcs:
            continue
        try:
            funcs[name] = get_task(name)
        except ModuleNotFoundError as exc:
            module = task_module(name)
            if exc.name != module:
                raise
            raise ConfigError(f"--task {name}: not available in this build ({module} is missing); "
                              f"available: {', '.join(t for t in TASKS if _importable(TASKS[t]))}") from None
    return funcs


def _importable(spec: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(spec.partition(":")[0]) is not None


def _fmt(value: Any, count: bool = False) -> str:
    """A metric value for the table; ``count``: a quantity with no better direction (a count,
    a length), printed as an integer when it is one (``0``, not ``0.0000``)."""
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer() and (abs(value) >= 2 or count):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


class _Progress:
    """A Rich bar per (task, checkpoint) on a terminal; nothing in between off one."""

    def __init__(self, stream, enabled: bool):
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=Console(file=stream), transient=False)

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def bar(self, description: str):
        """A ``progress(done, total)`` callback for one task."""
        if self.progress is None:
            return lambda done, total: None
        task_id = self.progress.add_task(description, total=None, rate="")
        started = time.perf_counter()

        def update(done: int, total: int) -> None:
            elapsed = time.perf_counter() - started
            rate = f"{done / elapsed:,.1f} items/s" if done and elapsed > 0 else ""
            self.progress.update(task_id, completed=done, total=total, rate=rate)

        return update

    def print(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, highlight=False)


@handle_errors
def eval_command(
    run: str = typer.Argument(..., help="Run directory (runs/NAME) or a run name under --out-dir."),
    tasks: list[str] = typer.Option(..., "--task", "-t", help="Task to run (repeatable): perplexity, arithmetic, "
                                    "hellaswag, gsm8k, arithmetic-probes, sample, senses, head-ablation, depth-probe, attention, "
                                    "lm-eval:TASK."),
    checkpoint: str = typer.Option("best", "--checkpoint", "-c", help="best, latest, step_…, epoch_…, a path, or "
                                   "'all' to sweep every checkpoint (writes a curve per task)."),
    data: Path = typer.Option(None, "--data", help="Local data instead of the task's default (a text file for "
                              "perplexity, a JSONL for hellaswag/gsm8k, a folder of pilot_*.jsonl files for arithmetic)."),
    encoding: str = typer.Option(None, "--encoding", help="perplexity: text encoding of --data (default utf-8), "
                                 "as train's --encoding."),
    limit: int = typer.Option(None, "--limit", min=1, help="Evaluate only the first N items."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Items (or sequences) per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu."),
    out_dir: str = typer.Option("runs", "--out-dir", help="Where run names are looked up."),
    fewshot: int = typer.Option(None, "--fewshot", min=0, help="gsm8k: K worked examples from the train split."),
    legacy_eos_metric: bool = typer.Option(False, "--legacy-eos-metric", help="arithmetic: also report the "
                                           "original metric of Step-free-arithmetic-transformers (argmax at the "
                                           "last label position, i.e. predicting EOS)."),
    legacy_last_number: bool = typer.Option(False, "--legacy-last-number", help="arithmetic-probes: score the "
                                            "LAST number of the response (domain-token-gpt2's rule) instead of the first."),
    legacy_extraction: bool = typer.Option(False, "--legacy-extraction", help="gsm8k: also report accuracy_legacy, "
                                           "scored with the original answer extraction (domain-token-gpt2), which "
                                           "drops thousands separators ('1,234' reads 1)."),
    prompts: list[str] = typer.Option([], "--prompt", help="sample: a prompt (repeatable)."),
    temperature: float = typer.Option(None, "--temperature", min=0.0, help="sample: 0 = greedy."),
    top_k: int = typer.Option(None, "--top-k", min=1, help="sample: keep the K most likely tokens."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1, help="Generation length limit."),
    seed: int = typer.Option(None, "--seed", help="Random seed (sampling, few-shot draws)."),
    words: list[str] = typer.Option([], "--word", help="senses: a word whose sense table to show (repeatable)."),
    sense_top_k: int = typer.Option(None, "--sense-top-k", min=1, help="senses: vocabulary items per sense (10)."),
    sense_scale: list[str] = typer.Option([], "--sense-scale", help="sample, perplexity (backpack): WORD:SENSE=FACTOR "
                                          "multiplies that sense's weights for WORD's tokens (0 removes it; repeatable)."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout (human output "
                                  "goes to stderr)."),
    ablate_heads: str = typer.Option(None, "--ablate-heads", help="head-ablation: also ablate these heads together, "
                                     "e.g. L0H2,L0H3."),
    probe_heads: bool = typer.Option(False, "--probe-heads", help="depth-probe: also probe every (layer, head)'s "
                                     "output, not only the residual stream."),
    exprs: list[str] = typer.Option([], "--expr", help="attention: the expression whose attention patterns to draw "
                                    "(repeatable)."),
    accuracy: str = typer.Option(None, "--accuracy", help="head-ablation: teacher-forced (default), exact-match "
                                 "(greedy generation) or legacy-eos (the original last-label metric)."),
    include_path: Path = typer.Option(None, "--include-path", help="lm-eval:TASK: a folder of extra task YAML files."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: the cores "
                                "that other processes leave free; also LMKIT_THREADS, OMP_NUM_THREADS)."),
    tf32: bool = typer.Option(None, "--tf32/--no-tf32", help="CUDA: TF32 for fp32 matmuls (default: the run's "
                              "training.tf32, as it trained; recorded in the result)."),
) -> None:
    """Evaluate a run: perplexity/bpb, parenthesised arithmetic (flat vs parenthesised), HellaSwag, GSM8K,
    arithmetic probes, samples. Writes runs/NAME/eval/TASK.json, or with --checkpoint all one file per
    checkpoint, checkpoint_results.json and curve.png under runs/NAME/eval/TASK/."""
    funcs = resolve_tasks(tasks)
    if data is not None and not data.exists():
        raise ConfigError(f"--data {data}: no such file or folder")
    options: dict[str, Any] = {}
    if encoding is not None:
        import codecs

        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ConfigError(f"--encoding {encoding}: unknown text encoding (e.g. utf-8, latin-1)") from None
        options["encoding"] = encoding
    for key, value in (("fewshot", fewshot), ("temperature", temperature), ("top_k", top_k),
                       ("max_new_tokens", max_new_tokens), ("seed", seed), ("sense_top_k", sense_top_k)):
        if value is not None:
            options[key] = value
    if legacy_eos_metric:
        options["legacy_eos_metric"] = True
    if legacy_last_number:
        options["legacy_last_number"] = True
    if legacy_extraction:
        options["legacy_extraction"] = True
    if prompts:
        options["prompt"] = list(prompts)
    if words:
        options["word"] = list(words)
    if sense_scale:
        options["sense_scale"] = list(sense_scale)
    if ablate_heads is not None:
        options["ablate_heads"] = ablate_heads
    if probe_heads:
        options["probe_heads"] = True
    if exprs:
        options["expr"] = list(exprs)
    if accuracy is not None:
        if accuracy not in ("teacher-forced", "exact-match", "legacy-eos"):
            raise ConfigError(f"--accuracy {accuracy}: choose teacher-forced, exact-match or legacy-eos")
        options["accuracy"] = accuracy
    if include_path is not None:
        if not include_path.is_dir():
            raise ConfigError(f"--include-path {include_path}: not a folder (give the folder of the task YAML files)")
        options["include_path"] = str(include_path)

    from lmkit.threads import apply_threads, choose_threads

    apply_threads(choose_threads(threads))
    import torch

    from lmkit import __version__
    from lmkit.device import resolve_device
    from lmkit.evaluation.task import EvalContext, file_stem
    from lmkit.rundir import RunDir
    from lmkit.runs import list_checkpoints, load_run

    run_dir = RunDir.existing(run, out_dir)
    dev, _ = resolve_device(device)
    sweep = checkpoint == "all"
    if sweep:
        points = list_checkpoints(run_dir.path)
        if not points:
            raise CheckpointError(f"{run_dir.path}: no checkpoints to sweep")
        choices = [str(path) for _, path in points]
    else:
        choices = [checkpoint]

    human = sys.stderr if json_out else sys.stdout
    bars = _Progress(human, enabled=human.isatty())
    records: list[dict[str, Any]] = []
    sweeps: dict[str, list[dict[str, Any]]] = {name: [] for name in funcs}
    files: list[str] = []
    with bars:
        for choice in choices:
            loaded = load_run(run_dir.path, choice, device=dev)
            use_tf32 = dev.type == "cuda" and (loaded.config.training.tf32 if tf32 is None else tf32)
            if dev.type == "cuda":  # as the run trained (lmkit.device.plan_device), unless told
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = use_tf32
            for name, evaluate in funcs.items():
                progress = bars.bar(f"{name} @ step {loaded.step}")
                ctx = EvalContext(model=loaded.model, tokenizer=loaded.tokenizer, config=loaded.config,
                                  run_dir=run_dir.path, device=dev, step=loaded.step, data=data, limit=limit,
                                  batch_size=batch_size, progress=progress,
                                  # the checkpoint's data fingerprint: tasks that rebuild the run's data check it
                                  options={**options, "data_fingerprint": loaded.state.get("data_fingerprint")})
                started = time.perf_counter()
                from lmkit.evaluation.senses import steering

                with torch.inference_mode() if dev.type != "mps" else nullcontext(), steering(ctx, name):
                    result = evaluate(ctx)
                wall = time.perf_counter() - started
                record = {
                    **result.to_dict(),
                    "run": run_dir.name,
                    "checkpoint": str(loaded.checkpoint),
                    "step": loaded.step,
                    "tokens": loaded.tokens,
                    "wall_time_s": round(wall, 3),
                    "items_per_s": round(result.n_items / wall, 3) if wall > 0 else None,
                    "device": str(dev),
                    "tf32": use_tf32,
                    "batch_size": batch_size,
                    "limit": limit,
                    "options": options,
                    "lmkit_version": __version__,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
                if sweep:
                    path = run_dir.eval_dir / file_stem(name) / f"step_{loaded.step:07d}.json"
                    sweeps[name].append(record)
                else:
                    path = run_dir.eval_dir / f"{file_stem(name)}.json"
                    note = _replaced_note(path, record) if path.exists() else None
                    if note and bars.progress is not None:
                        bars.print(note)
                    elif note:
                        human.write(note + "\n")
                _write_json(path, record)
                record["file"] = str(path)
                files.append(str(path))
                records.append(record)
                head = result.metrics.get(result.headline)
                line = (f"{name} @ step {loaded.step}: {result.headline} {_fmt(head)} "
                        f"({result.n_items:,} items, {wall:.1f} s, {record['items_per_s'] or 0:,.1f} items/s) -> {path}")
                if bars.progress is not None:
                    bars.print(line)
                else:
                    human.write(line + "\n")
            del loaded

    for name, rows in sweeps.items():
        if not rows:
            continue
        rows.sort(key=lambda r: r["step"])
        headline = rows[-1]["headline"]
        table = [{"step": r["step"], "tokens": r["tokens"], "checkpoint": r["checkpoint"], "headline": headline,
                  "metrics": r["metrics"]} for r in rows]
        summary_path = run_dir.eval_dir / file_stem(name) / "checkpoint_results.json"
        _write_json(summary_path, table)
        from lmkit.evaluation.curves import plot_sweep

        chance = rows[-1].get("details", {}).get("chance")
        png = plot_sweep(table, task=name, metric=headline, path=run_dir.eval_dir / file_stem(name) / "curve.png",
                         title=f"{run_dir.name}: {name} {headline}{_direction(rows[-1], headline)}",
                         chance=chance)
        files += [str(summary_path), str(png)]
        human.write(f"{name}: sweep of {len(rows)} checkpoints -> {summary_path}, {png}\n")

    _render_table(records, human)
    if json_out:
        out = {"run": run_dir.name, "run_dir": str(run_dir.path), "results": records, "files": files}
        sys.stdout.write(json.dumps(finite(out), indent=2) + "\n")


def _render_table(records: list[dict[str, Any]], stream) -> None:
    """A Rich table: one row per (task, checkpoint, metric); the headline in bold; then the notes."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(file=stream, highlight=False, soft_wrap=True)
    table = Table(title="lmkit eval", title_justify="left")
    for col, justify in (("task", "left"), ("step", "right"), ("metric", "left"), ("value", "right"),
                         ("items", "right"), ("wall s", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for rec in records:
        first = True
        directions = rec.get("directions") or {}
        for metric, value in rec["metrics"].items():
            bold = metric == rec["headline"]
            count = directions.get(metric) == "neither"
            table.add_row(rec["task"] if first else "", str(rec["step"]) if first else "",
                          f"[bold]{metric}[/bold]" if bold else metric,
                          f"[bold]{_fmt(value, count)}[/bold]" if bold else _fmt(value, count),
                          f"{rec['n_items']:,}" if first else "", f"{rec['wall_time_s']:.1f}" if first else "")
            first = False
    console.print(table)
    for rec in records:  # generations (the sample task) are what the user came for: show them
        for sample in (rec.get("details") or {}).get("samples", [])[:20]:
            if isinstance(sample, dict) and "text" in sample:
                console.print(Text.assemble((str(sample.get("prompt", "")), "bold"), str(sample["text"])))
        if rec["task"] == "senses":
            from lmkit.cli.senses_view import print_sense_tables

            print_sense_tables(rec, console)
    seen: set[str] = set()
    for rec in records:
        for note in rec.get("notes", []):
            if note not in seen:
                seen.add(note)
                console.print(Text(f"note ({rec['task']}): {note}"))
