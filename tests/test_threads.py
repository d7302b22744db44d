"""The CPU thread policy: who wins, what the automatic choice sees, and that a resume keeps
the count (results differ in the last bits between thread counts)."""

import json
import os
import subprocess
import sys
import time

import pytest

from lmkit import threads as th
from lmkit.errors import ConfigError

from conftest import run_cli


@pytest.fixture
def no_thread_env(monkeypatch):
    for var in ("LMKIT_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)


def test_the_user_wins_in_order(no_thread_env, monkeypatch):
    monkeypatch.setattr(th, "busy_cores", lambda interval=0: 0.0)
    monkeypatch.setattr(th, "usable_cores", lambda: 8)
    assert th.choose_threads().threads == 8
    assert th.choose_threads(recorded=3).threads == 3  # a resumed run keeps its count
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert (th.choose_threads(recorded=3).threads, th.choose_threads().source) == (2, "OMP_NUM_THREADS")
    monkeypatch.setenv("LMKIT_THREADS", "5")
    assert (th.choose_threads().threads, th.choose_threads().source) == (5, "LMKIT_THREADS")
    assert (th.choose_threads(4).threads, th.choose_threads(4).source) == (4, "--threads")


def test_auto_leaves_the_busy_cores_to_their_processes(no_thread_env, monkeypatch):
    monkeypatch.setattr(th, "usable_cores", lambda: 2)
    monkeypatch.setattr(th, "busy_cores", lambda interval=0: 1.05)
    choice = th.choose_threads()
    assert choice.threads == 1 and "other processes keep 1.1 busy" in choice.reason
    monkeypatch.setattr(th, "busy_cores", lambda interval=0: 7.0)
    assert th.choose_threads().threads == 1  # never 0
    monkeypatch.setattr(th, "busy_cores", lambda interval=0: 0.2)
    assert th.choose_threads().threads == 2


def test_a_bad_environment_value_is_one_line(no_thread_env, monkeypatch):
    monkeypatch.setenv("LMKIT_THREADS", "two")
    with pytest.raises(ConfigError, match=r"LMKIT_THREADS='two': expected a positive number of threads"):
        th.choose_threads()


def test_busy_cores_sees_a_real_busy_process_and_not_itself():
    idle = th.busy_cores(0.3)
    if idle > 0.5:
        pytest.skip(f"the machine is already busy ({idle:.2f} cores)")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = th.busy_cores(0.3)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy > 0.6, busy
    t0 = time.process_time()
    while time.process_time() - t0 < 0.05:  # this process busy right before: not counted as "other"
        pass
    assert th.busy_cores(0.2) < 0.5 + idle


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two usable CPUs and affinity masks")
def test_busy_cores_counts_only_the_cpus_this_process_may_use():
    # a spinner pinned to one CPU, the measurement pinned to another: the measuring process's
    # usable set holds no busy core (a system-wide count would say one)
    first, second = sorted(os.sched_getaffinity(0))[:2]
    spinner = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{second}}})\nwhile True: pass"])
    probe = (f"import os; os.sched_setaffinity(0, {{{first}}}); from lmkit import threads; "
             "print(threads.busy_cores(0.4), threads.sample_busy(0.4).busy)")
    try:
        time.sleep(0.3)
        inside = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
        both = subprocess.run([sys.executable, "-c", probe.replace(f"{{{first}}}", f"{{{first}, {second}}}")],
                              capture_output=True, text=True, timeout=60)
    finally:
        spinner.kill()
        spinner.wait()
    other_inside, _ = map(float, inside.stdout.split())
    other_both, _ = map(float, both.stdout.split())
    if other_inside > 0.5 and other_both > 1.5:
        pytest.skip("the machine is busy beyond the spinner")
    assert other_inside < 0.5, inside.stdout
    assert other_both > 0.6, both.stdout  # the same spinner, seen once its CPU is in the set


def test_a_run_records_its_threads_and_a_resume_keeps_them(tmp_path, tiny_preset, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = {"OMP_NUM_THREADS": "", "LMKIT_THREADS": ""}
    first = run_cli("train", "--preset", str(tiny_preset), "--name", "t", "--max-steps", "5", "--threads", "1",
                    "--no-tui", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    assert "info: threads: 1 (--threads) of" in first.stdout
    assert "device cpu (1 thread)" in first.stdout
    assert "threads: 1" in (tmp_path / "runs/t/config.yaml").read_text()

    again = run_cli("resume", "runs/t", "--max-steps", "8", "--no-tui", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert "threads: 1, as the run was started with" in again.stdout and "cpu (1 thread)" in again.stdout

    other = run_cli("resume", "runs/t", "--max-steps", "10", "--threads", "2", "--no-tui", cwd=tmp_path, env=env)
    assert other.returncode == 0, other.stderr
    assert "training.threads changed from 1 to 2 on resume" in other.stdout
    events = [json.loads(line) for line in (tmp_path / "runs/t/events.jsonl").read_text().splitlines()]
    assert any("not bitwise" in e.get("message", "") or "differ from the uninterrupted" in e.get("message", "")
               for e in events if e["kind"] == "notice")
