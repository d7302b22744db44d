"""``lmkit train``: build the config, run :func:`lmkit.training.loop.train`, render events."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from lmkit.cli._common import handle_errors, render_run
from lmkit.config import available_presets
from lmkit.errors import ConfigError
from lmkit.rundir import RunDir

_PRESETS = ", ".join(available_presets())


@handle_errors
def train_command(
    ctx: typer.Context,
    preset: str = typer.Option(None, "--preset", "-p", help=f"Preset name ({_PRESETS}) or a YAML path "
                               "(default: pilot; none with --init-from: the source's architecture)."),
    data: str = typer.Option(None, "--data", help="'arithmetic', a local file or folder, or a hub name "
                             "(wikitext-2-raw-v1, wikitext-103-raw-v1, fineweb-edu, europarl)."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="char, byte, bpe, gpt2 or hf:NAME_OR_PATH."),
    encoding: str = typer.Option(None, "--encoding", help="Text encoding of local files (default utf-8)."),
    name: str = typer.Option(None, "--name", help="Run name: the run is written to OUT_DIR/NAME."),
    out_dir: Path = typer.Option(None, "--out-dir", help="Folder of run directories (default: runs)."),
    fp16: bool = typer.Option(False, "--fp16", help="fp16 autocast + GradScaler (needs a GPU)."),
    bf16: bool = typer.Option(False, "--bf16", help="bf16 autocast."),
    device: str = typer.Option(None, "--device", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu."),
    gpu_only: bool = typer.Option(False, "--gpu-only", help="Exit 3 before any step unless training on CUDA."),
    batch_size: int = typer.Option(None, "--batch-size", help="Sequences per micro-batch."),
    max_steps: int = typer.Option(None, "--max-steps", help="Optimizer steps to train (replaces --epochs)."),
    epochs: int = typer.Option(None, "--epochs", help="Passes over the training split (replaces --max-steps)."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate."),
    seed: int = typer.Option(None, "--seed", help="Seed for initialisation, batches and dropout."),
    compile_: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Recompute activations in backward."),
    init_from: str = typer.Option(None, "--init-from", help="Start from weights: another run (RUN or "
                                  "RUN:CHECKPOINT) or a Hugging Face model (hf:PATH_OR_NAME); fresh optimizer."),
    overrides: list[str] = typer.Option([], "--set", help="Override any config key, e.g. --set training.lr=3e-4 "
                                        "(repeatable)."),
    on_nan: str = typer.Option(None, "--on-nan", help="abort (default: stop before the update, exit 1) or skip "
                               "a step whose loss or gradient norm is not finite."),
    resume_run: bool = typer.Option(False, "--resume", help="Continue runs/NAME (needs --name) instead of starting "
                                    "a new run; the same as `lmkit resume runs/NAME`."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: the cores "
                                "that other processes leave free; also LMKIT_THREADS, OMP_NUM_THREADS)."),
    no_tui: bool = typer.Option(False, "--no-tui", help="Plain log lines even on a terminal."),
    json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout at the end."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config, parameter count, memory "
                                 "estimate and step/token plan; train nothing, write nothing."),
    nproc_per_node: int = typer.Option(None, "--nproc-per-node", help="Train with N processes on this machine "
                                       "(data parallel; one per GPU, or N CPU processes with --device cpu): "
                                       "PyTorch's elastic launcher, as `torchrun --standalone` starts it."),
    max_restarts: int = typer.Option(None, "--max-restarts", help="With --nproc-per-node: restart the workers up "
                                     "to K times after a failure, resuming from the run's newest complete "
                                     "checkpoint (a stop by SIGINT/SIGTERM never restarts; default 0)."),
) -> None:
    """Train a model; writes runs/NAME/ (config.yaml, metrics.jsonl, events.jsonl, tb/, checkpoints/,
    tokenizer/, summary.json)."""
    from lmkit.config import build_run_config

    if preset is None and not init_from:
        preset = "pilot"  # with --init-from and no preset: defaults, and the source's architecture
    if fp16 and bf16:
        raise ConfigError("--fp16 and --bf16: choose one precision")

    flags: dict[str, tuple[str, Any]] = {}
    for key, label, value in (
        ("data.dataset", "--data", data),
        ("data.tokenizer", "--tokenizer", tokenizer),
        ("data.encoding", "--encoding", encoding),
        ("name", "--name", name),
        ("out_dir", "--out-dir", str(out_dir) if out_dir is not None else None),
        ("training.device", "--device", device),
        ("training.batch_size", "--batch-size", batch_size),
        ("training.lr", "--lr", lr),
        ("training.seed", "--seed", seed),
        ("training.compile", "--compile", compile_),
        ("init_from", "--init-from", init_from),
    ):
        if value is not None:
            flags[key] = (label, value)
    if fp16:
        flags["training.precision"] = ("--fp16", "fp16")
    if bf16:
        flags["training.precision"] = ("--bf16", "bf16")
    if gpu_only:
        flags["training.gpu_only"] = ("--gpu-only", True)
    if grad_checkpointing:
        flags["training.grad_checkpointing"] = ("--grad-checkpointing", True)
    flags.update(length_flags(max_steps, epochs))
    if on_nan is not None:
        flags["training.on_nan"] = ("--on-nan", on_nan)

    from lmkit.cli import launch

    launching = launch.check_options(nproc_per_node, max_restarts)
    if dry_run:
        if resume_run:
            raise ConfigError("--dry-run plans a new run; it does not combine with --resume")
        from lmkit.dry_run import plan_run

        config = build_run_config(preset, overrides, flags)
        report = plan_run(config)
        if json_out:
            sys.stdout.write(json.dumps(report, indent=2) + "\n")
        else:
            render_dry_run(report)
            if launching:  # planned on any machine; the launch itself refuses too few GPUs
                tcfg, n = config.training, nproc_per_node
                try:
                    launch.check_devices(n, tcfg.device)
                    here = ""
                except ConfigError as exc:
                    here = f"; on this machine the launch would fail: {exc}"
                sys.stdout.write(f"launch: {n} processes, global batch {n * tcfg.batch_size * tcfg.grad_accum_steps} "
                                 f"sequences = {n} x {tcfg.batch_size} x {tcfg.grad_accum_steps} accumulation "
                                 f"steps (the plan above is one process's){here}\n")
        return
    if launching:
        if resume_run:
            if name is None:
                raise ConfigError("--resume: name the run to continue with --name (or use `lmkit resume runs/NAME`)")
            from lmkit.training.resume import resume_config

            run = RunDir.existing(name, str(out_dir) if out_dir is not None else "runs")
            launch.check_devices(nproc_per_node, resume_config(run.config_path, overrides, flags)[0].training.device)
            run.lock()
        else:
            config = build_run_config(preset, overrides, flags)
            launch.check_devices(nproc_per_node, config.training.device)
            run = RunDir.claim(config)
        raise typer.Exit(launch.launch(run, ctx, nproc_per_node, max_restarts or 0, new=not resume_run,
                                       out=sys.stderr if json_out else sys.stdout))
    launched = launch.launched_run_dir()  # a worker of lmkit's launcher: the run folder is fixed
    if launched is not None and not resume_run and launch.holds_checkpoint(launched):
        from lmkit.training.loop import resume  # a restarted worker continues the run

        summary = render_run(lambda emit: resume(launched, emit), no_tui=no_tui, json_out=json_out)
    elif resume_run:
        if threads is not None:
            flags["training.threads"] = ("--threads", threads)
        if name is None:
            raise ConfigError("--resume: name the run to continue with --name (or use `lmkit resume runs/NAME`)")
        from lmkit.training.loop import resume

        summary = render_run(lambda emit: resume(launched or name, emit, overrides=overrides, flags=flags,
                                                 out_dir=str(out_dir) if out_dir is not None else "runs"),
                             no_tui=no_tui, json_out=json_out)
    else:
        config = build_run_config(preset, overrides, flags)
        from lmkit.threads import choose_threads

        choice = choose_threads(threads if threads is not None else config.training.threads)
        config.training.threads = choice.threads  # the trainer applies and records it
        from lmkit.training.loop import Trainer

        notes = [f"threads: {choice.reason}"]
        summary = render_run(lambda emit: Trainer(config, emit, notes=notes, run_dir=launched).run(),
                             no_tui=no_tui, json_out=json_out)
    if json_out:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")


def length_flags(max_steps: int | None, epochs: int | None) -> dict[str, tuple[str, Any]]:
    """``--max-steps`` / ``--epochs`` as config flags; setting one clears the other.

    Raises:
        ConfigError: both given.
    """
    if max_steps is not None and epochs is not None:
        raise ConfigError("--max-steps and --epochs: choose one way to set the length of training")
    if max_steps is not None:
        return {"training.max_steps": ("--max-steps", max_steps), "training.epochs": ("--max-steps", None)}
    if epochs is not None:
        return {"training.epochs": ("--epochs", epochs), "training.max_steps": ("--epochs", None)}
    return {}


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def render_dry_run(report: dict[str, Any]) -> None:
    """Print a :func:`lmkit.dry_run.plan_run` report: the YAML, then one line each for the
    model, the memory, the data and the plan (estimates say so)."""
    out = sys.stdout
    cfg, params, mem, data, plan = (report[k] for k in ("config", "params", "memory", "data", "plan"))
    out.write("# dry run: nothing trained, nothing written\n# resolved config (what runs/NAME/config.yaml would hold)\n")
    out.write(report["yaml"])
    out.write("\n")
    name = f" ({cfg['preset']})" if cfg.get("preset") else ""
    if params["total"] is not None:
        out.write(f"model {cfg['model']['type']}{name}: {params['total']:,} params "
                  f"({params['total'] / 1e6:.2f}M; vocab {params['vocab_size']:,})\n")
    else:
        out.write(f"model {cfg['model']['type']}{name}: params unknown ({params['note']})\n")
    if mem is not None:
        prec = "fp32" if mem["precision"] == "fp32" else f"{mem['precision']} autocast"
        out.write(f"memory of one training step on CUDA (lmkit doctor's estimate; B={mem['batch_size']}, "
                  f"T={mem['seq_len']}, {prec}, {mem['optimizer']}, gradient checkpointing "
                  f"{'on' if mem['grad_checkpointing'] else 'off'}): {_gib(mem['total_bytes'])} "
                  f"(peak allocated {_gib(mem['peak_allocated_bytes'])} + overhead {_gib(mem['overhead_bytes'])})\n")
    mark = "" if data["exact"] else "~"
    size = f"{mark}{data['train_size']:,} {data['unit']}" if data["train_size"] is not None else "size unknown"
    out.write(f"data: train {size} ({data['source']})\n")
    steps = plan["max_steps"]
    if steps is None:
        out.write("plan: unknown length (training.epochs needs the data's size; give --max-steps N)\n")
    else:
        est = lambda exact: "" if exact else "~"  # noqa: E731
        per = f"{plan['tokens_per_step']:,} tokens/step" + (" at most (padded to each batch's longest)"
                                                            if plan["padded"] else "")
        epochs = (f", {est(plan['epochs_exact'])}{plan['epochs']:.2f} epochs ({est(plan['epochs_exact'])}"
                  f"{plan['steps_per_epoch']:,} steps/epoch)" if plan["epochs"] is not None else "")
        out.write(f"plan: {est(plan['steps_exact'])}{steps:,} optimizer steps, {per}, "
                  f"{est(plan['steps_exact'])}{plan['total_tokens']:,} tokens{epochs}\n")
        if not plan["steps_exact"] or (plan["epochs"] is not None and not plan["epochs_exact"]):
            basis = ("the token budget data.max_tokens" if "token budget" in data["source"]
                     else "the data's size in bytes")
            out.write(f"(~ = estimated from {basis}; exact once the token cache exists)\n")
    for note in report.get("notes", []):
        out.write(f"init_from: {note}\n")
    if report["gpu_only"]:
        out.write("note: the config requires a GPU (training.gpu_only): `lmkit train` without --dry-run exits 3 "
                  "on a machine without CUDA\n")
