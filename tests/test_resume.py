"""Exact resume: a run stopped and resumed in new processes equals one that never stopped."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_cli, shared

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # bitwise comparisons across processes: same thread count

ARITH = """\
model: {n_layer: 2, n_head: 2, n_embd: 32, d_ff: 64, block_size: 32, pos_encoding: rope, dropout: 0.1}
data:
  dataset: arithmetic
  tokenizer: char
  arithmetic: {n_train: 256, n_val: 32, n_test_flat: 8, n_test_paren: 8}
training:
  batch_size: 16
  grad_accum_steps: 2
  max_steps: 24
  lr: 3.0e-3
  warmup_steps: 4
  log_interval: 1
  eval_interval: 8
  checkpoint_interval: 6
  keep_last: 2
  seed: 5
"""


def text_preset(path) -> str:
    return (
        "model: {n_layer: 2, n_head: 2, n_embd: 32, block_size: 32, pos_encoding: learned, dropout: 0.1}\n"
        f"data: {{dataset: '{path}', tokenizer: char}}\n"
        "training: {batch_size: 8, grad_accum_steps: 2, max_steps: 24, lr: 3.0e-3, warmup_steps: 4, log_interval: 1,"
        " eval_interval: 8, eval_iters: 2, checkpoint_interval: 6, seed: 5}\n"
    )


def train_losses(run) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


def assert_same_state(a_path, b_path):
    a = torch.load(a_path, weights_only=True)
    b = torch.load(b_path, weights_only=True)
    assert a["step"] == b["step"] and a["micro_step"] == b["micro_step"] and a["tokens"] == b["tokens"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for pid in sa:
        for name in sa[pid]:
            assert torch.equal(torch.as_tensor(sa[pid][name]), torch.as_tensor(sb[pid][name])), (pid, name)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert a["scheduler"]["_last_lr"] == b["scheduler"]["_last_lr"]
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]
    assert a["best_val_loss"] == b["best_val_loss"] and a["best_step"] == b["best_step"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


@pytest.fixture
def arith_preset(tmp_path):
    path = tmp_path / "arith.yaml"
    path.write_text(ARITH)
    return path


@pytest.mark.parametrize("micro", [19, 7])  # mid-accumulation (odd micro-batch), mid-epoch
def test_bitwise_resume_after_sigterm_arithmetic(tmp_path, arith_preset, micro):
    straight = run_cli("train", "--preset", str(arith_preset), "--name", "straight", cwd=tmp_path, env=ONE_THREAD)
    assert straight.returncode == 0, straight.stderr
    stopped = run_cli("train", "--preset", str(arith_preset), "--name", "cut", cwd=tmp_path,
                      env={**ONE_THREAD, "LMKIT_TEST_SIGNAL": f"{micro}:SIGTERM"})
    assert stopped.returncode == 143, stopped.stderr
    assert "stopped by SIGTERM" in stopped.stderr and "resume with: lmkit resume runs/cut" in stopped.stderr
    cut_step = torch.load(tmp_path / "runs/cut/checkpoints/latest.pt", weights_only=True)["step"]
    assert cut_step == (micro + 1) // 2 and cut_step < 24  # the step in progress was finished, then saved
    resumed = run_cli("resume", "runs/cut", cwd=tmp_path, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr

    runs = tmp_path / "runs"
    assert_same_state(runs / "straight/checkpoints/latest.pt", runs / "cut/checkpoints/latest.pt")
    losses = train_losses(runs / "cut")
    assert [s for s, _ in losses] == list(range(1, 25))  # no step duplicated or missing
    assert losses == train_losses(runs / "straight")  # float-exact per-step losses
    events = [json.loads(line) for line in (runs / "cut/events.jsonl").read_text().splitlines()]
    resumed_event = [e for e in events if e["kind"] == "resumed"][0]
    assert resumed_event["step"] == cut_step and resumed_event["skipped"] == []


def test_bitwise_resume_after_sigterm_token_stream(tmp_path):
    text = shared("tinyshakespeare", "input.txt")
    preset = tmp_path / "text.yaml"
    preset.write_text(text_preset(text))
    straight = run_cli("train", "--preset", str(preset), "--name", "straight", cwd=tmp_path, env=ONE_THREAD)
    assert straight.returncode == 0, straight.stderr
    stopped = run_cli("train", "--preset", str(preset), "--name", "cut", cwd=tmp_path,
                      env={**ONE_THREAD, "LMKIT_TEST_SIGNAL": "21:SIGTERM"})
    assert stopped.returncode == 143, stopped.stderr
    resumed = run_cli("resume", "cut", cwd=tmp_path, env=ONE_THREAD)  # a run name works as well as a path
    assert resumed.returncode == 0, resumed.stderr
    runs = tmp_path / "runs"
    assert_same_state(runs / "straight/checkpoints/latest.pt", runs / "cut/checkpoints/latest.pt")
    assert train_losses(runs / "cut") == train_losses(runs / "straight")
    assert list((runs / "cut/tb").glob("events.out.tfevents.*"))  # TensorBoard continued in the same folder


def test_sigint_and_sigterm_exit_codes_and_resume_line(tmp_path, arith_preset):
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        name = f"sig{code}"
        proc = subprocess.Popen([sys.executable, "-m", "lmkit", "train", "--preset", str(arith_preset), "--name", name,
                                 "--max-steps", "100000"], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, **ONE_THREAD})
        for line in proc.stdout:
            if line.startswith("step 5/"):
                break
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        assert f"resume with: lmkit resume runs/{name}" in err
        state = torch.load(tmp_path / "runs" / name / "checkpoints" / "latest.pt", weights_only=True)
        summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
        assert state["step"] == summary["steps"] >= 5 and summary["status"] == "interrupted"


def test_second_ctrl_c_aborts_and_keeps_the_last_checkpoint(tmp_path, arith_preset):
    proc = subprocess.Popen([sys.executable, "-m", "lmkit", "train", "--preset", str(arith_preset), "--name", "twice",
                             "--max-steps", "100000", "--set", "training.checkpoint_interval=1"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ONE_THREAD})
    for line in proc.stdout:
        if line.startswith("step 10/"):
            break
    proc.send_signal(signal.SIGINT)
    time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    ckpts = tmp_path / "runs/twice/checkpoints"
    torch.load(ckpts / "latest.pt", weights_only=True)  # still a complete checkpoint
    assert not [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]


def test_second_ctrl_c_during_the_save_of_latest_is_an_abort(tmp_path, arith_preset, monkeypatch):
    """The CI failure of the first submission: a second Ctrl-C that lands inside torch.save
    reaches the loop as a RuntimeError (torch's zip writer finalises the file in __exit__ and
    raises "unexpected pos", replacing the KeyboardInterrupt). It must still be exit 130, with
    the previous checkpoint intact and no temporary file left behind."""
    from lmkit.config import build_run_config
    from lmkit.errors import Interrupted
    from lmkit.events import StepMetrics
    from lmkit.training.loop import train

    real_save = torch.save
    sent = []

    class SignalOnWrite:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.writes = getattr(self, "writes", 0) + 1
            if self.writes == 3 and not sent:  # after some records are out: torch's writer then fails in __exit__
                sent.append(True)
                os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, mid-write
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def save(obj, f, *args, **kwargs):
        if stopping:
            f = SignalOnWrite(f)
        return real_save(obj, f, *args, **kwargs)

    stopping = []

    def emit(event):
        if isinstance(event, StepMetrics) and event.step == 3 and not stopping:
            stopping.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: stop after this step

    monkeypatch.setattr(torch, "save", save)
    config = build_run_config(str(arith_preset), ["training.max_steps=50", "training.checkpoint_interval=2"],
                              {"out_dir": ("--out-dir", str(tmp_path / "runs"))})
    with pytest.raises(Interrupted) as info:
        train(config, emit)
    assert sent, "the second signal was never sent inside torch.save"
    assert info.value.exit_code == 130 and "second Ctrl-C" in str(info.value)
    ckpts = next((tmp_path / "runs").iterdir()) / "checkpoints"
    assert torch.load(ckpts / "latest.pt", weights_only=True)["step"] == 2  # the last good one
    assert not [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]


def test_previous_signal_handlers_are_restored(tmp_path, arith_preset):
    from lmkit.config import build_run_config
    from lmkit.training.loop import train

    def mine(signum, frame):
        pass

    before_term = signal.signal(signal.SIGTERM, mine)
    try:
        before_int = signal.getsignal(signal.SIGINT)
        config = build_run_config(str(arith_preset), ["training.max_steps=2"],
                                  {"out_dir": ("--out-dir", str(tmp_path / "runs"))})
        train(config)
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is before_int
    finally:
        signal.signal(signal.SIGTERM, before_term)
