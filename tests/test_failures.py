"""How a run ends when something goes wrong: OOM, Ctrl-C, a non-finite loss."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lmkit.config import build_run_config
from lmkit.errors import ConfigError, DeviceError, TrainingError
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
    assert "out of GPU memory at batch size 16" in message and "--grad-checkpointing" in message
    assert "MiB before activations" in message
    assert DeviceError.exit_code == 3
    assert json.loads(trainer.run.summary_path.read_text())["status"] == "failed"


def test_non_finite_loss_aborts_with_exit_1(tmp_path, tiny_preset, monkeypatch):
    original = GPT.forward

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = original(self, idx, targets, **kw)
        return logits, (loss * math.nan if loss is not None and self.training else loss)

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) .* at step 1; the update was not applied"):
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
    assert "stopped by SIGINT at step" in stderr and "resume with: lmkit resume runs/int" in stderr
    run = tmp_path / "runs" / "int"
    state = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and state["step"] == summary["steps"] >= 20
    assert state["micro_step"] == state["step"]  # no half-finished step recorded


def test_generated_run_names_do_not_collide(tmp_path, monkeypatch):
    monkeypatch.setattr("lmkit.rundir.default_run_name", lambda config: "pilot-20260101-000000")
    config = build_run_config("pilot", [], {"out_dir": ("--out-dir", str(tmp_path))})
    first, second = RunDir.claim(config), RunDir.claim(config)  # two runs started in the same second
    assert (first.name, second.name) == ("pilot-20260101-000000", "pilot-20260101-000000-2")
    named = config.model_copy(update={"name": "pilot-20260101-000000"})
    with pytest.raises(ConfigError, match="already holds a run"):
        RunDir.claim(named)
    second.release()
    assert not second.path.exists() and first.path.exists()


def test_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("")
    config = build_run_config("pilot", [], {"out_dir": ("--out-dir", str(tmp_path / "afile"))})
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        RunDir.claim(config)


def test_parallel_cli_runs_get_their_own_folders(tmp_path, tiny_preset):
    procs = [subprocess.Popen([sys.executable, "-m", "lmkit", "train", "--preset", str(tiny_preset), "--max-steps",
                               "2", "--set", "training.eval_interval=2"], cwd=tmp_path,
                              env={**os.environ, "OMP_NUM_THREADS": "1"},  # 3 processes on 2 cores
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 3
    for run in runs:
        kinds = [json.loads(line)["kind"] for line in (run / "events.jsonl").read_text().splitlines()]
        assert kinds.count("run_started") == 1
