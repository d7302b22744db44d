"""``training.deterministic``: PyTorch's deterministic kernels for the run (what makes a GPU run
bitwise repeatable; the GPU half is tests/test_gpu.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lmkit.config import TrainConfig
from lmkit.device import plan_device

from conftest import TINY_PRESET


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, \
        torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]


def test_the_setting_turns_on_deterministic_kernels_and_the_cublas_workspace(restore_determinism):
    torch.use_deterministic_algorithms(False)
    plan_device(TrainConfig(device="cpu", max_steps=1))
    assert not torch.are_deterministic_algorithms_enabled()  # off by default: nothing changed
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    plan_device(TrainConfig(device="cpu", max_steps=1, deterministic=True))
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


def test_a_user_set_cublas_workspace_is_kept(restore_determinism, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    plan_device(TrainConfig(device="cpu", max_steps=1, deterministic=True))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


@pytest.mark.parametrize("family", ["gpt", pytest.param("backpack", marks=pytest.mark.slow)])
def test_every_op_of_a_cpu_training_step_has_a_deterministic_kernel(tmp_path, family):
    """A whole run (train, eval, checkpoint) with the setting on raises nothing and gives the
    losses of a run without it (the CPU is deterministic either way)."""
    preset = tmp_path / "p.yaml"
    text = TINY_PRESET.format(pos="rope", steps=6, eval_interval=3, ckpt_interval="null")
    if family == "backpack":
        text = text.replace("model:\n", "model:\n  type: backpack\n  n_senses: 4\n")
    preset.write_text(text)
    losses = {}
    for name, flag in (("plain", "false"), ("det", "true")):
        proc = subprocess.run([sys.executable, "-m", "lmkit", "train", "--preset", str(preset), "--name", name,
                               "--no-tui", "--set", f"training.deterministic={flag}"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "LMKIT_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses["det"] == losses["plain"] and losses["det"]
