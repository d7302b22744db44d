"""The ``lmkit`` command line (Typer). One module per command; commands stay thin:
parse options, call the library, render events.

``lmkit --help`` imports neither torch nor the training code: command modules import
them inside their bodies. Commands are listed in the order of an experiment (doctor,
train, resume, svd-analyze, eval, export, compare, runs), each with a one-line summary
(``short_help``); a command whose module is not there yet is left out of the list.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from lmkit import __version__
from lmkit.cli import _common


def _blank_flag_metavars(params: list[Any]) -> list[Any]:
    # a flag takes no value: no "<bool>" type column in --help (Typer 0.2x shows one)
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    """A Typer command whose flags show no ``<bool>`` metavar in ``--help``."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _blank_flag_metavars(super().get_params(ctx))


class _Group(TyperGroup):
    """The root group: the same for ``--version``, ``--debug`` and ``--help``."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _blank_flag_metavars(super().get_params(ctx))


app = typer.Typer(
    name="lmkit",
    help="Train, resume, analyse, export and evaluate small transformer language models.",
    no_args_is_help=True,
    add_completion=False,
    cls=_Group,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lmkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors (also LMKIT_DEBUG=1)."),
) -> None:
    """lmkit: one command for the life of a small-LM experiment."""
    _common.DEBUG = debug or os.environ.get("LMKIT_DEBUG", "") not in ("", "0")


def _register(name: str, module: str, function: str, summary: str, epilog: str, **kw: Any) -> None:
    """Add ``lmkit NAME`` from ``lmkit.cli.MODULE:FUNCTION`` with the one-line ``summary``
    for ``lmkit --help`` (the function's docstring is the command's own ``--help``). A
    command module that is not there (yet) leaves the command out instead of breaking
    every other command."""
    try:
        command: Callable = getattr(importlib.import_module(f"lmkit.cli.{module}"), function)
    except ModuleNotFoundError as exc:
        if exc.name != f"lmkit.cli.{module}":
            raise
        return
    app.command(name, cls=_Command, help=command.__doc__, short_help=summary, epilog=epilog, **kw)(command)


# In the order of an experiment. Command modules are light: torch and the rest load in their bodies.
_register(
    "doctor", "doctor", "doctor_command",
    "Check the machine; with --preset, a model's size and memory.",
    "Examples:\n\n"
    "  lmkit doctor                                        # versions, GPUs, MPS, CPUs, RAM\n\n"
    "  lmkit doctor --json > doctor.json                   # for a bug report\n\n"
    "  lmkit doctor --preset small --batch-size 32 --gpu-memory 16GiB\n\n"
    "  lmkit doctor --preset medium --bf16 --grad-checkpointing\n\n"
    "  lmkit doctor --preset scale_10m                     # parameter count vs the 10M target\n\n"
    "  lmkit doctor --preset medium --batch-size 8 --legacy-hand-table",
)
_register(
    "train", "train", "train_command",
    "Train a model into runs/NAME.",
    "Examples:\n\n"
    "  lmkit train                                   # pilot preset on the built-in arithmetic task\n\n"
    "  lmkit train --preset tiny --data input.txt --tokenizer bpe --max-steps 300\n\n"
    "  lmkit train --preset scale_10m --gpu-only      # the 10M arithmetic run: CUDA + fp16 or exit 3\n\n"
    "  lmkit train --preset small --set training.lr=6e-4 --set training.warmup_steps=2000",
    no_args_is_help=False,
)
_register(
    "resume", "resume", "resume_command",
    "Continue a run from its newest complete checkpoint.",
    "Examples:\n\n"
    "  lmkit resume runs/pilot-20261121-101500        # newest complete checkpoint\n\n"
    "  lmkit resume runs/big --max-steps 40000        # train longer than first planned\n\n"
    "  lmkit resume runs/big --checkpoint step_0020000 --device cuda:1",
)
_register(
    "svd-analyze", "svd_analyze", "svd_analyze_command",
    "Spectra, ranks and subspace changes of a run's weights.",
    "Examples:\n\n"
    "  lmkit svd-analyze runs/d4-svd                         # every checkpoint, every matrix\n\n"
    "  lmkit svd-analyze d4-svd --layers 'transformer.h.0.attn.*' --checkpoint latest\n\n"
    "  lmkit svd-analyze runs/pilot --k 5 --out fig/pilot-svd\n\n"
    "  lmkit svd-analyze runs/pilot --json > svd.json",
)
_register(
    "eval", "eval", "eval_command",
    "Evaluate a run on a task (perplexity, arithmetic, ...).",
    "Examples:\n\n"
    "  lmkit eval runs/pilot --task arithmetic --legacy-eos-metric   # exact match, flat vs paren\n\n"
    "  lmkit eval runs/tiny --task perplexity --data wiki.test.raw   # loss, perplexity, bits per byte\n\n"
    "  lmkit eval runs/gpt2 --task hellaswag --data hellaswag_val.jsonl --checkpoint all\n\n"
    "  lmkit eval runs/gpt2 --task gsm8k --fewshot 5 --limit 200 --json > gsm8k.json",
)
_register(
    "export", "export", "export_command",
    "Export a checkpoint to a verified HF folder or safetensors.",
    "Examples:\n\n"
    "  lmkit export runs/pilot-20261121-101500 --to hf hf/pilot          # GPT-NeoX folder, verified\n\n"
    "  lmkit export runs/big --to hf hf/big --checkpoint step_0020000 --dtype bfloat16\n\n"
    "  lmkit export runs/big --to safetensors weights/big                 # model.safetensors + config.yaml",
)
_register(
    "compare", "compare", "compare_command",
    "Compare runs: a table of metrics and a PNG of the curves.",
    "Examples:\n\n"
    "  lmkit compare baseline mul_tokens        # runs/baseline vs runs/mul_tokens\n\n"
    "  lmkit compare s1 s2 s3 --out fig/seeds.png\n\n"
    "  lmkit compare --group baseline=b1,b2,b3 --group mul=m1,m2,m3   # seeds: mean ± std, 95% CI, Welch p\n\n"
    "  lmkit compare runs/a ../b --json-out r.json   # table + JSON report\n\n"
    "  lmkit compare a b --json > r.json         # JSON report, no table",
)
_register(
    "runs", "runs", "runs_command",
    "List the runs in a folder: status, steps, best val loss.",
    "Examples:\n\n"
    "  lmkit runs                                  # the runs under runs/\n\n"
    "  lmkit runs --out-dir experiments --json     # as JSON",
)


def _click_exception(name: str) -> type[Exception]:
    """Click's ``UsageError`` / ``ClickException`` as this Typer raises them (Typer >= 0.2x vendors
    Click as ``typer._click``; older Typers use ``click``): found through ``typer.BadParameter``."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


def main() -> None:
    """Console-script entry point. A usage error (an unknown option, a bad value) is one line,
    ``error: … ; see lmkit CMD --help``, with exit code 2, like every other bad input."""
    import sys

    usage_error, click_exception = _click_exception("UsageError"), _click_exception("ClickException")
    try:
        code = app(standalone_mode=False)
    except usage_error as exc:
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "lmkit"
        _common.error_line(f"{exc.format_message().rstrip('.')}; see {where} --help")
        sys.exit(exc.exit_code)
    except click_exception as exc:  # other Click errors (a file argument that cannot be opened, ...)
        _common.error_line(exc.format_message())
        sys.exit(exc.exit_code)
    except typer.Abort:  # Ctrl-C at a prompt
        _common.error_line("aborted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
