"""How a run ends when something goes wrong: OOM, Ctrl-C, a non-finite loss."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from lmkit.config import build_run_config
from lmkit.errors import DeviceError, TrainingError
from lmkit.models.gpt import GPT
from lmkit.rundir import RunDir
from lmkit.training.loop import Trainer


def _config(tmp_path, preset, *overrides, name="f"):
    return build_run_config(str(preset), list(overrides),
                            {"out_dir": ("--out-dir", str(tmp_path / "runs")), "name": ("--name", name)})


def test_cuda_oom_stops_with_batch_size_and_advice(tmp_path, tiny_preset, monkeypatch):
    def oom(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train_step", oom)
    trainer = Trainer(_config(tmp_path, tiny_preset))
    with pytest.raises(DeviceError) as info:
        trainer.run()
    message = str(info.value)
    assert "out of memory at batch size 16" in message and "--grad-checkpointing" in message
    assert DeviceError.exit_code == 3
    assert json.loads(trainer.run.summary_path.read_text())["status"] == "failed"


def test_non_finite_loss_aborts_with_exit_1(tmp_path, tiny_preset, monkeypatch):
    original = GPT.forward

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = original(self, idx, targets, **kw)
        return logits, (loss * math.nan if loss is not None and self.training else loss)

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TrainingError, match="training loss is nan at step 1"):
        Trainer(_config(tmp_path, tiny_preset)).run()
    assert TrainingError.exit_code == 1


def test_ctrl_c_saves_latest_and_exits_130(tmp_path, tiny_preset):
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmkit", "train", "--preset", str(tiny_preset), "--name", "int", "--max-steps",
         "100000", "--set", "training.log_interval=1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 60
    for line in proc.stdout:
        if line.startswith("step 20/") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stderr and "latest.pt" in stderr
    run = tmp_path / "runs" / "int"
    state = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and state["step"] == summary["steps"] >= 20
    assert state["micro_step"] == state["step"]  # no half-finished step recorded


def test_generated_run_names_do_not_collide(tmp_path, monkeypatch):
    monkeypatch.setattr("lmkit.rundir.default_run_name", lambda config: "pilot-20260101-000000")
    config = build_run_config("pilot", [], {"out_dir": ("--out-dir", str(tmp_path))})
    (tmp_path / "pilot-20260101-000000").mkdir()
    assert RunDir.for_new_run(config).name == "pilot-20260101-000000-2"
