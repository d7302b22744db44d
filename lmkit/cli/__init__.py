"""The ``lmkit`` command line (Typer). One module per command; commands stay thin:
parse options, call the library, render events.

``lmkit --help`` imports neither torch nor the training code: command modules import
them inside their bodies.
"""

from __future__ import annotations

import os

import typer

from lmkit import __version__
from lmkit.cli import _common
from lmkit.cli.resume import resume_command
from lmkit.cli.train import train_command

app = typer.Typer(
    name="lmkit",
    help="Train, resume, analyse, export and evaluate small transformer language models.",
    no_args_is_help=True,
    add_completion=False,
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


app.command(
    "train",
    help=train_command.__doc__,
    epilog=(
        "Examples:\n\n"
        "  lmkit train                                   # pilot preset on the built-in arithmetic task\n\n"
        "  lmkit train --preset tiny --data input.txt --tokenizer bpe --max-steps 300\n\n"
        "  lmkit train --preset scale_10m --gpu-only      # the 10M arithmetic run: CUDA + fp16 or exit 3\n\n"
        "  lmkit train --preset small --set training.lr=6e-4 --set training.warmup_steps=2000"
    ),
    no_args_is_help=False,
)(train_command)


app.command(
    "resume",
    help=resume_command.__doc__,
    epilog=(
        "Examples:\n\n"
        "  lmkit resume runs/pilot-20261121-101500        # newest complete checkpoint\n\n"
        "  lmkit resume runs/big --max-steps 40000        # train longer than first planned\n\n"
        "  lmkit resume runs/big --checkpoint step_0020000 --device cuda:1"
    ),
)(resume_command)


from lmkit.cli.compare import compare_command  # noqa: E402 - light module: torch/matplotlib load in its body

app.command(
    "compare",
    help=compare_command.__doc__,
    epilog=(
        "Examples:\n\n"
        "  lmkit compare baseline mul_tokens        # runs/baseline vs runs/mul_tokens\n\n"
        "  lmkit compare s1 s2 s3 --out fig/seeds.png\n\n"
        "  lmkit compare runs/a ../b --json-out r.json   # table + JSON report\n\n"
        "  lmkit compare a b --json > r.json         # JSON report, no table"
    ),
)(compare_command)


from lmkit.cli.export import export_command  # noqa: E402 - registered here to keep the edit in one place

app.command(
    "export",
    help=export_command.__doc__,
    epilog=(
        "Examples:\n\n"
        "  lmkit export runs/pilot-20261121-101500 --to hf hf/pilot          # GPT-NeoX folder, verified\n\n"
        "  lmkit export runs/big --to hf hf/big --checkpoint step_0020000 --dtype bfloat16\n\n"
        "  lmkit export runs/big --to safetensors weights/big                 # model.safetensors + config.yaml"
    ),
)(export_command)


from lmkit.cli.eval import eval_command  # noqa: E402 - light module: torch loads in its body

app.command(
    "eval",
    help=eval_command.__doc__,
    epilog=(
        "Examples:\n\n"
        "  lmkit eval runs/pilot --task arithmetic --legacy-eos-metric   # exact match, flat vs paren\n\n"
        "  lmkit eval runs/tiny --task perplexity --data wiki.test.raw   # loss, perplexity, bits per byte\n\n"
        "  lmkit eval runs/gpt2 --task hellaswag --data hellaswag_val.jsonl --checkpoint all\n\n"
        "  lmkit eval runs/gpt2 --task gsm8k --fewshot 5 --limit 200 --json > gsm8k.json"
    ),
)(eval_command)


from lmkit.cli.doctor import doctor_command  # noqa: E402 - registered here, next to its epilog

app.command(
    "doctor",
    help=doctor_command.__doc__,
    epilog=(
        "Examples:\n\n"
        "  lmkit doctor                                        # versions, GPUs, MPS, CPUs, RAM\n\n"
        "  lmkit doctor --json > doctor.json                   # for a bug report\n\n"
        "  lmkit doctor --preset small --batch-size 32 --gpu-memory 16GiB\n\n"
        "  lmkit doctor --preset medium --bf16 --grad-checkpointing\n\n"
        "  lmkit doctor --preset scale_10m                     # parameter count vs the 10M target\n\n"
        "  lmkit doctor --preset medium --batch-size 8 --legacy-hand-table"
    ),
)(doctor_command)


from lmkit.cli.svd_analyze import svd_analyze_command  # noqa: E402 - light module: torch loads in its body

app.command(
    "svd-analyze",
    help=svd_analyze_command.__doc__,
    epilog=(
        "Examples:\n\n"
        "  lmkit svd-analyze runs/d4-svd                         # every checkpoint, every matrix\n\n"
        "  lmkit svd-analyze d4-svd --layers 'transformer.h.0.attn.*' --checkpoint latest\n\n"
        "  lmkit svd-analyze runs/pilot --k 5 --out fig/pilot-svd\n\n"
        "  lmkit svd-analyze runs/pilot --json > svd.json"
    ),
)(svd_analyze_command)


def main() -> None:
    """Console-script entry point."""
    app()
