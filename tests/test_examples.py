"""Every example's commands still work: they are read from the READMEs' fenced ``bash`` blocks,
so a README cannot go stale without this test failing.

Default (fast): each ``lmkit train`` command runs with ``--dry-run`` (config, presets, flags,
``--set`` keys and local data paths checked, nothing trained or written), and every other
``lmkit`` command is parsed against the real command line (an unknown or renamed option fails).

``slow``: each README's commands run in order in a scratch folder, shortened -- a training
gets ``--max-steps 3`` and 2 eval batches, a resume one step more, an eval ``--limit 8`` --
except GPU-only, hub-data and multi-node (``torchrun``) trainings, which stay ``--dry-run``.

A line is a command when it starts with ``lmkit`` (or ``torchrun … -m lmkit``); ``NAME=value``
lines set a variable that later lines use as ``$NAME``; a command with a placeholder path
(``path/to/…``) is a template and is skipped.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*/README.md"))
FENCE = re.compile(r"^```bash[^\n]*\n(.*?)^```", re.S | re.M)
ASSIGN = re.compile(r"^([A-Z_][A-Z0-9_]*)=(\S+)$")


def readme_commands(readme: Path) -> list[list[str]]:
    """The ``lmkit`` commands of a README's ``bash`` blocks, as argument lists after ``lmkit``,
    in order; variables substituted, comments dropped, ``\\`` continuations joined."""
    commands: list[list[str]] = []
    env: dict[str, str] = {}
    for block in FENCE.findall(readme.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if (m := ASSIGN.match(line)) is not None:
                env[m.group(1)] = m.group(2)
                continue
            words = shlex.split(re.sub(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", lambda v: env.get(v.group(1), v.group(0)),
                                       line), comments=True)
            if not words:
                continue
            if words[0] == "lmkit":
                args, launcher = words[1:], None
            elif words[0] == "torchrun" and "lmkit" in words:
                args, launcher = words[words.index("lmkit") + 1:], "torchrun"
            else:
                continue
            if any("path/to/" in w for w in args):
                continue  # a template, not a command
            commands.append(args + (["--multi-node-launcher"] if launcher else []))
    return commands


def _absolute(args: list[str]) -> list[str]:
    """Paths the READMEs give from the repository root, made absolute (commands run elsewhere)."""
    out = []
    for arg in args:
        for prefix, base in (("../shared/", REPO.parent / "shared"), ("examples/", REPO / "examples")):
            if arg.startswith(prefix):
                arg = str(base / arg[len(prefix):])
            elif "=" in arg and arg.split("=", 1)[1].startswith(prefix):
                key, value = arg.split("=", 1)
                arg = f"{key}={base / value[len(prefix):]}"
        out.append(arg)
    return out


def _positional(args: list[str]) -> list[str]:
    """The arguments that are neither options nor their values (every lmkit option takes one,
    except the flags below)."""
    flags = {"--json", "--no-plot", "--no-tui", "--dry-run"}
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg not in flags and "=" not in arg
        else:
            out.append(arg)
    return out


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _needs_dry_run(args: list[str]) -> bool:
    """GPU-only, hub data or a multi-node launch: never trained by the tests."""
    from lmkit.config import build_run_config
    from lmkit.data.sources import is_hub_name

    if "--multi-node-launcher" in args or "--gpu-only" in args or "--fp16" in args:
        return True
    config = build_run_config(_option(args, "--preset") or "pilot", [], {})
    data = _option(args, "--data") or config.data.dataset
    return bool(config.training.gpu_only) or config.training.precision == "fp16" or is_hub_name(data)


def _strip(args: list[str], *names: str) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in names:
            skip = True
            continue
        if any(arg.startswith(n + "=") for n in names):
            continue
        out.append(arg)
    return out


def _app():
    from lmkit.cli import app

    return app


def _invoke(args: list[str]):
    result = CliRunner().invoke(_app(), args, env={"COLUMNS": "120"})
    return result


def _case_ids():
    cases = []
    for readme in EXAMPLES:
        for i, args in enumerate(readme_commands(readme)):
            cases.append(pytest.param(readme, args, id=f"{readme.parent.name}-{i}-{args[0]}"))
    return cases


def test_every_example_has_commands():
    assert EXAMPLES, "no examples/*/README.md"
    for readme in EXAMPLES:
        assert readme_commands(readme), f"{readme}: no lmkit command in a ```bash block"


def test_the_parser_reads_continuations_variables_and_comments(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("text\n```bash\nDATA=../shared/data/x\nlmkit train --data $DATA \\\n    --max-steps 5   # a note\n"
                      "python -c 'x'\nlmkit train --data path/to/folder\n"
                      "torchrun --nproc_per_node 4 -m lmkit train --preset p\n```\n```\nlmkit not-bash\n```\n")
    assert readme_commands(readme) == [["train", "--data", "../shared/data/x", "--max-steps", "5"],
                                       ["train", "--preset", "p", "--multi-node-launcher"]]


def _scratch(tmp_path, monkeypatch) -> Path:
    """A scratch working folder with ``../shared`` beside it, as in the checkout: presets name
    their local data relative to the checkout (``../shared/data/...``)."""
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(REPO.parent / "shared", target_is_directory=True)
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize(("readme", "args"), _case_ids())
def test_example_command_parses_or_dry_runs(readme, args, tmp_path, monkeypatch):
    """Fast: a training is dry-run (the same config build as the real command); any other
    command's options are parsed by the real command line without running it."""
    work = _scratch(tmp_path, monkeypatch)
    args = _absolute(args)
    if args[0] == "train":
        result = _invoke(_strip(args, "--multi-node-launcher") + ["--dry-run"])
        assert result.exit_code == 0, f"{readme}: lmkit {shlex.join(args)} --dry-run\n{result.output}"
        assert "plan:" in result.output
        assert list(work.iterdir()) == []
        return
    group = typer.main.get_command(_app())
    ctx = group.make_context("lmkit", [], resilient_parsing=True)
    command = group.get_command(ctx, args[0])
    assert command is not None, f"{readme}: `lmkit {args[0]}` is not a command"
    command.make_context(args[0], list(args[1:]), parent=ctx)  # raises on an unknown option or a bad value


def _shortened(args: list[str]) -> list[str] | None:
    """The command as the slow test runs it (``None``: skip it)."""
    head = args[0]
    if head == "train":
        if _needs_dry_run(args):
            return _strip(args, "--multi-node-launcher") + ["--dry-run"]
        rest = _strip(args, "--max-steps", "--epochs")
        return [*rest, "--max-steps", "3", "--set", "training.eval_iters=2", "--set", "training.log_interval=1"]
    if head == "resume":
        return [*_strip(args, "--max-steps", "--epochs"), "--max-steps", "4"]
    if head == "eval":
        return [*_strip(args, "--limit"), "--limit", "8"] if "--limit" not in args else args
    return args


@pytest.mark.slow
@pytest.mark.parametrize("readme", EXAMPLES, ids=[p.parent.name for p in EXAMPLES])
def test_example_runs_shortened(readme, tmp_path, monkeypatch):
    _scratch(tmp_path, monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "offline")  # the W&B examples log to a local offline run
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    def missing(run: str) -> bool:
        return not Path(run).exists() and not (Path("runs") / run).exists()

    for args in readme_commands(readme):
        args = _shortened(_absolute(args))
        if args is None:
            continue
        if args[0] in ("resume", "eval", "export", "svd-analyze") and missing(args[1]):
            continue  # the run it reads was dry-run only (GPU-only, hub data, ...)
        if args[0] == "compare" and any(missing(a) for a in _positional(args[1:])):
            continue
        source = _option(args, "--init-from")
        if args[0] == "train" and "--dry-run" not in args and source and not source.startswith("hf:") \
                and missing(source.partition(":")[0]):
            args = [*args, "--dry-run"]  # fine-tuning a run that was dry-run only: plan it
        result = _invoke(args)
        assert result.exit_code == 0, f"{readme}: lmkit {shlex.join(args)}\n{result.output[-3000:]}"
