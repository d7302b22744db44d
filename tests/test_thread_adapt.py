"""training.adapt_threads (lmkit.training.thread_adapt): the count follows a real competing
process down and back up, changes only when windows agree, and is off by default."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from lmkit import threads as th
from lmkit.config import build_run_config
from lmkit.events import Notice
from lmkit.training import thread_adapt
from lmkit.training.hooks import StepOutput, TrainingHook
from lmkit.training.loop import Trainer
from lmkit.training.thread_adapt import ThreadAdapter

from conftest import TINY_PRESET


class _FakeTrainer:
    def __init__(self):
        self.events = []

    def emit(self, event):
        self.events.append(event)


def _step(n: int) -> StepOutput:
    return StepOutput(step=n, loss=torch.zeros(()), grad_norm=torch.zeros(()), lr=0.0, n_targets=1, prev_micro_step=0)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_change_needs_the_windows_in_a_row_to_agree(monkeypatch, two_threads):
    # the load seen in each window, as other processes' busy cores out of 2 usable
    seen = iter([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    clock = iter(range(100))
    monkeypatch.setattr(thread_adapt, "usable_cores", lambda: 2)
    monkeypatch.setattr(thread_adapt, "cpu_snapshot", lambda: th.CpuSnapshot((), 0.0, float(next(clock))))
    monkeypatch.setattr(thread_adapt, "busy_between", lambda a, b: th.CpuBusy(busy=2.0, other=next(seen), wall_s=1.0))
    hook, trainer = ThreadAdapter(check_every_s=1.0, confirm=2), _FakeTrainer()
    hook.on_start(trainer)
    counts = []
    for n in range(1, 7):
        hook.after_step(trainer, _step(n))
        counts.append(torch.get_num_threads())
    # one busy window alone changes nothing; two in a row go to 1; two idle ones back to the start count
    assert counts == [2, 2, 2, 1, 1, 2]
    assert [(s, old, new) for s, old, new, _ in hook.changes] == [(4, 2, 1), (6, 1, 2)]
    notices = [e for e in trainer.events if isinstance(e, Notice)]
    assert len(notices) == 2 and "not bitwise reproducible" in notices[0].message
    assert notices[0].level == "warning" and "not bitwise" not in notices[1].message


def test_never_above_the_count_the_run_started_with(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        clock = iter(range(100))
        monkeypatch.setattr(thread_adapt, "usable_cores", lambda: 8)
        monkeypatch.setattr(thread_adapt, "cpu_snapshot", lambda: th.CpuSnapshot((), 0.0, float(next(clock))))
        monkeypatch.setattr(thread_adapt, "busy_between", lambda a, b: th.CpuBusy(busy=0.0, other=0.0, wall_s=1.0))
        hook, trainer = ThreadAdapter(check_every_s=1.0, confirm=1), _FakeTrainer()
        hook.on_start(trainer)
        for n in range(1, 5):
            hook.after_step(trainer, _step(n))
        assert torch.get_num_threads() == 1 and hook.changes == []
    finally:
        torch.set_num_threads(before)


def _adapter(trainer) -> ThreadAdapter:
    return next(h for h in trainer.hooks if isinstance(h, ThreadAdapter))


def _preset(tmp_path, steps: int):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_PRESET.format(pos="rope", steps=steps, eval_interval="null", ckpt_interval="null"))
    return path


class _Spinner(TrainingHook):
    """Starts a busy process at step 2; stops it once the adapter has come down to 1 thread."""

    name = "spinner"

    def __init__(self):
        self.proc = None
        self.stopped_at = None

    def after_step(self, trainer, step):
        if step.step == 2:
            self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        elif self.proc is not None and self.stopped_at is None and torch.get_num_threads() == 1:
            self.proc.kill()
            self.proc.wait()
            self.stopped_at = step.step

    def on_end(self, trainer, status):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.skipif(th.usable_cores() < 2, reason="needs two usable cores")
def test_a_run_follows_a_real_competing_process_down_and_back_up(tmp_path, monkeypatch, two_threads):
    if th.busy_cores(0.3) > 0.4:
        pytest.skip("the machine is already busy")
    monkeypatch.setattr(thread_adapt, "CHECK_EVERY_S", 0.4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LMKIT_THREADS", raising=False)
    config = build_run_config(str(_preset(tmp_path, 100000)), ["training.adapt_threads=true", "training.threads=2",
                                                               "training.log_interval=1000"],
                              {"out_dir": ("--out-dir", str(tmp_path / "runs")), "name": ("--name", "adapt")})
    events = []
    trainer = Trainer(config, events.append)
    spinner = trainer.add_hook(_Spinner())

    class StopWhenBack(TrainingHook):
        name = "stop_when_back"

        def __init__(self):
            self.deadline = time.monotonic() + 60

        def after_step(self, trainer, step):
            adapter = _adapter(trainer)
            if len(adapter.changes) >= 2 or time.monotonic() > self.deadline:
                trainer.max_steps = trainer.step  # ends the loop after this step

    trainer.add_hook(StopWhenBack())
    trainer.run()
    adapter = _adapter(trainer)
    moves = [(old, new) for _, old, new, _ in adapter.changes]
    assert moves[:2] == [(2, 1), (1, 2)], (moves, spinner.stopped_at)
    notices = [e.message for e in events if isinstance(e, Notice) and "threads: 2 -> 1" in e.message]
    assert notices and "training.adapt_threads" in notices[0]


def test_off_by_default(tmp_path):
    config = build_run_config(str(_preset(tmp_path, 3)), [], {"out_dir": ("--out-dir", str(tmp_path / "runs"))})
    assert config.training.adapt_threads is False
    trainer = Trainer(config)
    trainer.run()
    assert list(trainer.hooks) and not any(isinstance(h, ThreadAdapter) for h in trainer.hooks)
