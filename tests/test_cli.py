"""The lmkit command line, through Typer's CliRunner and real subprocesses."""

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from lmkit.cli import app

from conftest import REPO, run_cli

runner = CliRunner()


def one_error_line(result) -> str:
    stderr = result.stderr.strip()
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_help_lists_train_and_imports_no_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from lmkit.cli import app\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "assert 'train' in result.output\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_console_script_and_module_entry_points(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0 and "train" in result.stdout
    version = run_cli("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("lmkit ")
    script = subprocess.run(["lmkit", "train", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert script.returncode == 0 and "--gpu-only" in script.stdout and "Examples" in script.stdout


def test_train_help_through_cli_runner():
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    for option in ("--preset", "--data", "--set", "--fp16", "--bf16", "--device", "--max-steps", "--epochs"):
        assert option in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "training.lrr=1e-3"], "training.lrr: unknown key (did you mean training.lr?)"),
        (["--set", "model.n_head=3"], "n_embd (128) must be divisible by n_head (3)"),
        (["--lr", "-0.1"], "--lr: training.lr: must be greater than 0"),
        (["--preset", "nonexistent"], "--preset nonexistent: unknown preset"),
        (["--fp16", "--bf16"], "choose one precision"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_config_errors_exit_2_with_one_line(args, needle, tmp_path):
    result = run_cli("train", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert needle in one_error_line(result)
    assert not (tmp_path / "runs").exists()


def test_config_error_through_cli_runner(tmp_path):
    result = runner.invoke(app, ["train", "--set", "training.lr=-1", "--out-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "training.lr: must be greater than 0" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fp16_on_cpu_exits_2(tmp_path):
    result = run_cli("train", "--fp16", cwd=tmp_path)
    assert result.returncode == 2
    assert "fp16 mixed precision needs a GPU" in one_error_line(result)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("args", [["--gpu-only"], ["--preset", "scale_10m"], ["--device", "cuda"]])
def test_no_cuda_exits_3_before_any_step(args, tmp_path):
    result = run_cli("train", *args, cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert "CUDA is not available" in one_error_line(result)
    assert not (tmp_path / "runs").exists()


def test_train_subprocess_end_to_end(tmp_path, tiny_preset):
    result = run_cli("train", "--preset", str(tiny_preset), "--name", "cli", "--max-steps", "10",
                     "--set", "training.eval_interval=10", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and summary["steps"] == 10
    assert "eval step 10" in result.stderr  # progress goes to stderr with --json
    run = tmp_path / "runs" / "cli"
    assert (run / "checkpoints" / "latest.pt").is_file() and (run / "summary.json").is_file()

    again = run_cli("train", "--preset", str(tiny_preset), "--name", "cli", cwd=tmp_path)
    assert again.returncode == 2
    assert "already holds a run" in one_error_line(again)


def test_plain_output_off_a_terminal(tmp_path, tiny_preset):
    result = run_cli("train", "--preset", str(tiny_preset), "--max-steps", "5", "--name", "plain",
                     "--set", "training.eval_interval=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "run plain -> runs/plain" in out
    assert "step 5/5" in out and "eval step 5 | val loss" in out and "completed: 5 steps" in out
    assert "\x1b[" not in out  # no terminal escape codes in logs


def test_debug_shows_traceback_and_keeps_the_exit_code(tmp_path):
    result = run_cli("--debug", "train", "--set", "training.lr=-1", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" in result.stderr  # bad input: still exit 2
    assert result.stderr.rstrip().splitlines()[-1].startswith("error: ")
    result = run_cli("train", "--gpu-only", "--device", "cpu", cwd=tmp_path, env={"LMKIT_DEBUG": "1"})
    assert result.returncode == 3 and "Traceback" in result.stderr  # the machine cannot: still exit 3


@pytest.mark.parametrize(("args", "expected"), [
    (["train", "--max-stepz", "3"], "error: No such option: --max-stepz (Possible options: --max-restarts, "
                                    "--max-steps); see "),
    (["train", "--threads", "0"], "error: Invalid value for '--threads'"),
    (["eval"], "error: Missing argument 'run'; see "),
    (["nosuch"], "error: No such command 'nosuch'; see "),
])
def test_usage_errors_are_one_line_with_exit_2(tmp_path, args, expected):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.rstrip().endswith("--help")
