"""``lmkit resume RUN``: continue a run exactly where it stopped."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from lmkit.cli._common import handle_errors, render_run


@handle_errors
def resume_command(
    ctx: typer.Context,
    run: str = typer.Argument(..., help="Run directory (runs/NAME) or a run name under --out-dir."),
    checkpoint: str = typer.Option(None, "--checkpoint", "-c",
                                   help="latest, best, step_…, epoch_… or a path (default: the newest complete "
                                        "checkpoint, skipping corrupt ones)."),
    out_dir: str = typer.Option("runs", "--out-dir", help="Where run names are looked up."),
    max_steps: int = typer.Option(None, "--max-steps", help="Train to this many optimizer steps in all."),
    epochs: int = typer.Option(None, "--epochs", help="Train to this many epochs in all."),
    device: str = typer.Option(None, "--device", help="auto, cuda, cuda:N, mps or cpu."),
    gpu_only: bool = typer.Option(False, "--gpu-only", help="Exit 3 before any step unless training on CUDA."),
    on_nan: str = typer.Option(None, "--on-nan", help="abort (default) or skip a step with a non-finite loss."),
    overrides: list[str] = typer.Option([], "--set", help="Allowed changes only: lengths, eval/log/checkpoint "
                                        "intervals, device, compile (repeatable)."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads (default: the count the run was "
                                "started with; another count makes the continuation not bitwise)."),
    no_tui: bool = typer.Option(False, "--no-tui", help="Plain log lines even on a terminal."),
    json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout at the end."),
    nproc_per_node: int = typer.Option(None, "--nproc-per-node", help="Continue with N processes on this machine "
                                       "(PyTorch's elastic launcher, as `torchrun --standalone` starts it)."),
    max_restarts: int = typer.Option(None, "--max-restarts", help="With --nproc-per-node: restart the workers up "
                                     "to K times after a failure, resuming from the newest complete checkpoint "
                                     "(a stop by SIGINT/SIGTERM never restarts; default 0)."),
) -> None:
    """Continue a run from its newest complete checkpoint: weights, optimizer, LR schedule, GradScaler,
    data position and RNG states are restored, so the steps are the ones an uninterrupted run takes."""
    from lmkit.cli.train import length_flags

    flags: dict[str, tuple[str, Any]] = length_flags(max_steps, epochs)
    if device is not None:
        flags["training.device"] = ("--device", device)
    if gpu_only:
        flags["training.gpu_only"] = ("--gpu-only", True)
    if on_nan is not None:
        flags["training.on_nan"] = ("--on-nan", on_nan)
    if threads is not None:
        flags["training.threads"] = ("--threads", threads)

    from lmkit.cli import launch

    if launch.check_options(nproc_per_node, max_restarts):
        from lmkit.rundir import RunDir
        from lmkit.training.resume import resume_config

        run_dir = RunDir.existing(run, out_dir)
        launch.check_devices(nproc_per_node, resume_config(run_dir.config_path, overrides, flags)[0].training.device)
        run_dir.lock()
        raise typer.Exit(launch.launch(run_dir, ctx, nproc_per_node, max_restarts or 0, new=False,
                                       out=sys.stderr if json_out else sys.stdout))
    launched = launch.launched_run_dir()  # a worker of lmkit's launcher: the run folder is fixed
    if launched is not None:
        run = str(launched)
        if launch.restart_count() > 0:
            checkpoint = None  # a restarted worker continues from the newest complete checkpoint

    from lmkit.training.loop import resume

    summary = render_run(lambda emit: resume(run, emit, checkpoint=checkpoint, overrides=overrides, flags=flags,
                                             out_dir=out_dir), no_tui=no_tui, json_out=json_out)
    if json_out:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
