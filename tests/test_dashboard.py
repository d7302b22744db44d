"""The live dashboard: rendered from scripted events into a recorded console, and a real
`lmkit train` under a pseudo-terminal (panels drawn, terminal restored, piped output plain)."""

from __future__ import annotations

import dataclasses
import fcntl
import math
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from rich.console import Console

from lmkit.cli._common import render_run
from lmkit.errors import DataError
from lmkit.events import (
    CheckpointSaved,
    DataProgress,
    DataReady,
    EvalResult,
    Event,
    NaNSkipped,
    Notice,
    Resumed,
    RunFinished,
    RunStarted,
    StepMetrics,
)
from lmkit.monitor.dashboard import BucketSeries, Dashboard, LossChart
from lmkit.monitor.nvml import GpuStat
from lmkit.monitor.sampler import HostStat, Sampler, SystemSample, sample_system

from conftest import TINY_PRESET, run_cli

GiB = 2**30
N_STEPS = 100_000
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


def started(device: str = "cpu", **kw) -> RunStarted:
    fields = dict(name="demo", run_dir="runs/demo", preset="pilot", model_type="gpt", n_params=664_192, device=device,
                  device_name="cpu (2 threads)" if device == "cpu" else "cuda:0 (NVIDIA H200, 139.8 GiB)",
                  precision="fp32" if device == "cpu" else "bf16", compile=device != "cpu", max_steps=N_STEPS,
                  steps_per_epoch=1000, tokens_per_step=1024, device_uuid=None if device == "cpu" else "GPU-aaaa")
    fields.update(kw)
    return RunStarted(**fields)


def loss_at(step: int) -> float:
    return 2.0 + 3.0 * math.exp(-step / 5000) + 0.05 * math.sin(step)


def step_event(step: int, device: str = "cpu") -> StepMetrics:
    cuda = device != "cpu"
    return StepMetrics(step=step, max_steps=N_STEPS, epoch=step / 1000, tokens=step * 1024, loss=loss_at(step),
                       lr=3e-4, grad_norm=0.8, tok_per_s=17_300.0, step_time_s=0.0592,
                       mfu=0.412 if cuda else None, gpu_mem_gb=13.1 if cuda else None, elapsed_s=step * 0.0592,
                       gpu_alloc_gb=12.3 if cuda else None, gpu_reserved_gb=14.0 if cuda else None)


def scripted_run(dash: Dashboard, device: str = "cpu", steps: int = N_STEPS) -> None:
    """A 100k-step run logged every step, evaluated every 10k steps, with checkpoints and notices."""
    dash(DataProgress(stage="tokenize train", completed=2000, total=2000, unit="examples"))
    dash(DataReady(description="arithmetic", tokenizer="char", vocab_size=35, split_sizes={"train": 2000, "val": 200},
                   unit="examples", cache_dir=None, reused=False))
    dash(started(device))
    for step in range(1, steps + 1):
        dash(step_event(step, device))
        if step % 10_000 == 0:
            dash(EvalResult(step=step, epoch=step / 1000, tokens=step * 1024, split="val", loss=loss_at(step) + 0.1,
                            metrics={"ppl": math.exp(loss_at(step) + 0.1)}, is_best=True, elapsed_s=0.3))
            dash(CheckpointSaved(step=step, path="runs/demo/checkpoints/best.pt", tags=("latest", "best"),
                                 val_loss=loss_at(step) + 0.1, seconds=0.04))
    dash(NaNSkipped(step=4242, total=1))


def render(dash: Dashboard, width: int = 140, height: int = 42) -> str:
    console = Console(record=True, width=width, height=height, force_terminal=True, color_system="truecolor")
    console.print(dash)
    return console.export_text()


def panel(text: str, title: str) -> str:
    """The inside of the panel titled ``title`` in a rendered screen (its columns only)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        at = line.find(f"╭─ {title} ")
        if at >= 0:
            end = line.index("╮", at)
            body = []
            for below in lines[i + 1:]:
                if below[at] == "╰":
                    return "\n".join(body)
                body.append(below[at + 1:end])
    raise AssertionError(f"no panel {title!r} in:\n{text}")


HOST = HostStat(rss_bytes=int(1.5 * GiB), cpu_percent=187.0, n_cpus=2, threads=9, mem_used_bytes=5 * GiB,
                mem_total_bytes=8 * GiB)


# ------------------------------------------------------------------------------ series


def test_bucket_series_stays_bounded_and_keeps_min_and_mean():
    series = BucketSeries(capacity=256)
    values = [loss_at(s) for s in range(1, N_STEPS + 1)]
    for step, value in enumerate(values, start=1):
        series.add(step, value)
    series.add(N_STEPS + 1, math.nan)
    assert len(series.buckets) <= 256 and series.width == 512  # 100k steps / 256 buckets -> 512 steps per bucket
    assert series.count == N_STEPS and series.non_finite == 1
    points = series.points()
    assert min(p[1] for p in points) == pytest.approx(min(values))
    total = sum(b[2] for b in series.buckets if b)
    assert total / N_STEPS == pytest.approx(sum(values) / N_STEPS)
    # bucket means follow the curve: the first bucket's mean is the mean of its 512 steps
    assert points[0][2] == pytest.approx(sum(values[:512]) / 512)
    assert points[0][0] < points[-1][0] <= N_STEPS


def test_loss_chart_draws_the_curve_where_it_is():
    """A loss of 4.0 over the first half and 2.0 over the second: the dots of the left half
    are on the top row, those of the right half on the bottom row."""
    train, val = BucketSeries(64), BucketSeries(64)
    for step in range(1, 1001):
        train.add(step, 4.0 if step <= 500 else 2.0)
    console = Console(record=True, width=60, height=12, color_system=None)
    console.print(LossChart(train, val, max_steps=1000), height=12)
    lines = console.export_text().splitlines()
    plot = [line.split("┤", 1)[1] for line in lines if "┤" in line]
    assert len(plot) == 11 and lines[-1].strip().startswith("0 ") and lines[-1].rstrip().endswith("step 1,000")
    half = len(plot[0]) // 2
    assert plot[0][:half - 2].strip() and not plot[0][half + 2:].strip()  # top row: left half only
    assert plot[-1][half + 2:].strip() and not plot[-1][:half - 2].strip()  # bottom row: right half only
    assert lines[0].lstrip().startswith("4") and plot[-1] and "2" in lines[-2].split("┤")[0]


# ------------------------------------------------------------------------------ panels


def test_dashboard_from_a_scripted_100k_step_run_on_cpu():
    dash = Dashboard(live=False, sampler=False)
    started_at = time.perf_counter()
    scripted_run(dash)
    per_event_us = (time.perf_counter() - started_at) / (N_STEPS + 20) * 1e6
    dash.update_system(SystemSample(gpus=[], host=HOST))
    text = render(dash)
    # header
    assert "demo" in text and "pilot" in text and "gpt 664,192 params" in text and "cpu (2 threads)" in text
    assert "fp32" in text and "compile off" in text and "training" in text
    # the loss chart: bucketed, labelled, drawn with braille dots
    assert "100,000 logged steps · 256 per bucket" in text and "step 100,000" in text
    assert sum(1 for ch in text if 0x2800 < ord(ch) <= 0x28FF) > 100
    # stats
    for expected in ("100,000 / 100,000", "100.0%", "epoch 100.00", "102M targets", "3.000e-04",
                     f"{loss_at(N_STEPS):.4f}", f"best {loss_at(N_STEPS) + 0.1:.4f} @100,000", "17.3k", "n/a (peak unknown)", "59.2 ms",
                     "ETA       done"):
        assert expected in text, expected
    # host panel (CPU run)
    assert "process RSS 1.5 GiB" in text and "187% of 2 cores" in text and "5.0/8.0 GiB" in text
    assert "process RSS" in panel(text, "host") and "GPU" not in text
    # events panel: evals, checkpoints, the warning
    val = loss_at(N_STEPS) + 0.1
    assert f"eval val {val:.4f} (best) ppl {math.exp(val):.2f}" in text and "saved latest, best (0.04s)" in text
    assert "warning: step 4242: non-finite loss" in text
    # events by kind: one row per kind (notices by level), with counts
    kinds = panel(text, "events by kind")
    assert re.search(r"checkpoint\s+10\s+100,000\s+tags=latest,b", kinds)
    assert re.search(r"eval\s+10\s+100,000\s+split=val", kinds)
    assert re.search(r"nan_skipped\s+1\s+4,242\s+step 4242: non-finite", kinds)
    assert re.search(r"data_ready\s+1\s", kinds)
    # handling an event costs the training thread microseconds, not milliseconds
    assert per_event_us < 200, per_event_us


def test_gpu_panel_from_nvml_snapshots_and_torch_allocator():
    dash = Dashboard(live=False, sampler=False)
    scripted_run(dash, device="cuda", steps=2000)
    dash(dataclasses.replace(step_event(2000, "cuda"), grad_scale=32768.0))
    gpus = [GpuStat(index=i, name="NVIDIA H200", uuid=uuid, util_percent=util, mem_used_bytes=int(used * GiB),
                    mem_total_bytes=int(139.8 * GiB), temperature_c=temp, power_w=power, power_limit_w=700.0)
            for i, uuid, util, used, temp, power in ((0, "GPU-aaaa", 87.0, 34.1, 61.0, 350.0),
                                                     (1, "GPU-bbbb", 3.0, 0.5, 33.0, 75.0))]
    dash.update_system(SystemSample(gpus=gpus, host=HOST))
    text = render(dash)
    assert "bf16" in text and "compile on" in text and "MFU       41.2%" in text
    assert "▶GPU0" in text and "GPU1" in text and "▶GPU1" not in text  # the training GPU is marked by UUID
    assert "H200  61°C 350/700 W" in text and "H200  33°C 75/700 W" in text
    assert " 87%" in text and "34.1/139.8 GiB" in text and "0.5/139.8 GiB" in text
    assert "alloc 12.30 · reserved 14.00 · peak 13.10 GiB" in text
    assert "RSS 1.5 GiB · CPU 187%" in text and "loss scale 32768" in text
    assert "process RSS" not in text  # no separate host panel on CUDA

    # no NVML on a CUDA run: the panel says why instead of showing nothing
    dash.update_system(SystemSample(gpus=[], host=HOST, nvml_error="NVMLError_LibraryNotFound: NVML Shared Library Not Found"))
    assert re.search(r"NVML\s+no GPU data \(NVMLError_LibraryNotFound", render(dash))


def test_fp16_overflow_and_resume_show_in_events():
    dash = Dashboard(live=False, sampler=False)
    dash(Resumed(step=500, checkpoint="runs/demo/checkpoints/latest.pt", skipped=[], config_changes={},
                 dropped_metrics=0, removed_temp_files=[]))
    dash(started(start_step=500))
    base = dict(max_steps=N_STEPS, epoch=0.5, tokens=1, lr=1e-4, grad_norm=1.0, tok_per_s=1.0, step_time_s=0.1, mfu=None,
                gpu_mem_gb=None, elapsed_s=1.0)
    dash(StepMetrics(step=525, loss=2.0, grad_scale=65536.0, **base))
    dash(StepMetrics(step=550, loss=1.9, grad_scale=32768.0, nan_skips=2, **base))
    text = render(dash)
    assert "1.9000  ‖g‖ 1  2 NaN skips" in text
    assert "resumed at step 500" in text and "resumed from runs/demo/checkpoints/latest.pt" in text
    assert "fp16 overflow: loss scale 65536 → 32768" in text
    dash(Resumed(step=400, checkpoint="runs/demo/checkpoints/step_0000400.pt", skipped=[], config_changes={},
                 dropped_metrics=7, removed_temp_files=[], superseded_metrics="runs/demo/superseded/metrics.jsonl"))
    assert dash.events[-1][2:] == ("magenta", "resumed from runs/demo/checkpoints/step_0000400.pt; 7 later log "
                                              "record(s) moved to runs/demo/superseded/metrics.jsonl")


def test_nan_skips_are_recognised_by_type_not_by_message_text():
    dash = Dashboard(live=False, sampler=False)
    dash(started())
    dash(NaNSkipped(step=7, total=1))
    dash(NaNSkipped(step=40, total=4, skipped=3))  # counted on the device, reported at a log line
    # a notice that merely mentions the words is an ordinary notice
    dash(Notice(level="info", message="eval: 2 non-finite losses in the data were ignored"))
    # nor is a warning worded like the old NaN notice: only the type says what an event is
    dash(Notice(level="warning", message="step 9: non-finite loss or gradient norm; update skipped (5 so far)"))
    styles = {text: (step, style) for _, step, style, text in dash.events}
    assert styles["warning: step 7: non-finite loss or gradient norm; update skipped (1 so far)"] == (7, "bold red")
    assert styles["warning: steps up to 40: 3 updates skipped for a non-finite loss or gradient norm (4 so far)"] \
        == (40, "bold red")
    assert styles["info: eval: 2 non-finite losses in the data were ignored"] == (None, "dim")
    assert styles["warning: step 9: non-finite loss or gradient norm; update skipped (5 so far)"] == (None, "yellow")
    kinds = panel(render(dash, width=160), "events by kind")
    assert re.search(r"nan_skipped\s+2\s+40\s+steps up to 40: 3 updates skipped", kinds)


@dataclass(frozen=True)
class ModeSwitch(Event):
    """Stands in for the SVD mode switches of a later issue: a new kind, grouped by layer."""

    kind: ClassVar[str] = "svd_mode"
    group_by: ClassVar[str | None] = "layer"
    step: int
    layer: str
    mode: str
    rank: int
    reason: str


def test_events_by_kind_is_generic_and_groups_new_kinds():
    dash = Dashboard(live=False, sampler=False)
    dash(started())
    dash(ModeSwitch(step=100, layer="h.0.mlp.c_fc", mode="lowrank", rank=32, reason="alignment 0.91 > 0.9"))
    dash(ModeSwitch(step=200, layer="h.1.attn.c_attn", mode="lowrank", rank=48, reason="alignment 0.93 > 0.9"))
    dash(ModeSwitch(step=300, layer="h.0.mlp.c_fc", mode="full", rank=128, reason="minor alignment 0.4 < 0.5"))
    dash(Notice(level="info", message="first"))
    dash(Notice(level="info", message="second"))
    text = render(dash, width=160)
    kinds = panel(text, "events by kind")
    # layer keys may lose common leading components to fit the column ("…0.mlp.c_fc")
    assert re.search(r"svd_mode\s+(h\.|…)0\.mlp\.c_fc\s+2\s+300\s+mode=full rank=128 reason=minor", kinds)
    assert re.search(r"svd_mode\s+(h\.|…)1\.attn\.c_attn\s+1\s+200\s+mode=lowrank rank=48", kinds)
    assert re.search(r"notice\s+info\s+2\s+second", kinds) and "first" not in kinds
    assert "svd_mode: layer=h.0.mlp.c_fc mode=full" in text  # unknown kinds also reach the events panel


def test_run_finished_marks_the_header_and_prints_a_summary():
    console = Console(record=True, width=120, height=40, force_terminal=True)
    dash = Dashboard(console, live=False, sampler=False)
    dash(started())
    dash(step_event(10))
    dash(RunFinished(status="interrupted", summary={"name": "demo", "steps": 10, "tokens": 10240, "wall_time_s": 1.0,
                                                    "run_dir": "runs/demo"}))
    text = render(dash)
    assert "interrupted" in text.splitlines()[0] and "run interrupted" in text


# ------------------------------------------------------------------------------ sampler


def test_sampler_thread_samples_the_host_and_stops():
    got: list[SystemSample] = []
    sampler = Sampler(got.append, interval=0.05, gpus=False).start()
    deadline = time.time() + 5
    while len(got) < 3 and time.time() < deadline:
        time.sleep(0.02)
    sampler.stop()
    assert not sampler.running and len(got) >= 3
    host = got[-1].host
    assert host is not None and host.rss_bytes > 10 * 2**20 and host.n_cpus >= 1 and host.mem_total_bytes > 0
    assert all(s.gpus == [] for s in got)
    count = len(got)
    time.sleep(0.15)
    assert len(got) == count  # stopped means stopped
    # with NVML asked for: GPUs, or the reason there are none -- never an exception
    sample = sample_system(None, gpus=True)
    assert sample.gpus or sample.nvml_error


# ------------------------------------------------------------------------------ real runs


def run_in_pty(args: list[str], cwd: Path, *, cols: int = 120, rows: int = 40, interrupt_when: str | None = None,
               timeout: float = 120) -> tuple[int, str]:
    """Run ``python -m lmkit ARGS`` with stdin/stdout/stderr on a pseudo-terminal of
    ``cols`` x ``rows``; with ``interrupt_when``, send SIGINT once that text was drawn."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {**os.environ, "COLUMNS": str(cols), "LINES": str(rows), "TERM": "xterm-256color", "OMP_NUM_THREADS": "1"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "lmkit", *args], cwd=cwd, stdin=slave, stdout=slave, stderr=slave,
                            env=env, close_fds=True)
    os.close(slave)
    out = bytearray()
    interrupted = False
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                out += data
                if interrupt_when and not interrupted and interrupt_when in out.decode("utf-8", "replace"):
                    proc.send_signal(signal.SIGINT)
                    interrupted = True
            elif proc.poll() is not None:
                break
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return rc, out.decode("utf-8", "replace")


def plain(screen: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dash")
    (root / "tiny.yaml").write_text(TINY_PRESET.format(pos="rope", steps=60, eval_interval=20, ckpt_interval=30))
    (root / "long.yaml").write_text(TINY_PRESET.format(pos="rope", steps=20000, eval_interval=5000,
                                                       ckpt_interval=5000))
    return root


def test_train_on_a_terminal_shows_the_dashboard_and_restores_the_terminal(workdir):
    rc, screen = run_in_pty(["train", "--preset", "tiny.yaml", "--name", "tty", "--out-dir", "runs"], workdir)
    text = plain(screen)
    assert rc == 0, text[-2000:]
    for panel in ("loss", "stats", "host", "events by kind", "events"):
        assert f"─ {panel} " in text, panel
    assert "60 / 60" in text and "saved latest, best" in text and "compile off" in text
    assert any(0x2800 < ord(ch) <= 0x28FF for ch in text)  # the chart was drawn
    # the cursor is hidden while live and shown again before the summary printed below
    assert HIDE_CURSOR in screen and screen.rfind(SHOW_CURSOR) > screen.rfind(HIDE_CURSOR)
    assert screen.rfind(SHOW_CURSOR) < screen.rfind("completed: 60 steps")
    assert (workdir / "runs" / "tty" / "summary.json").exists()


def test_ctrl_c_on_the_dashboard_saves_and_restores_the_terminal(workdir):
    rc, screen = run_in_pty(["train", "--preset", "long.yaml", "--name", "intr", "--out-dir", "runs"], workdir,
                            interrupt_when="tok/s")
    text = plain(screen)
    assert rc == 130, text[-2000:]
    assert screen.rfind(SHOW_CURSOR) > screen.rfind(HIDE_CURSOR)
    assert "interrupted:" in text and "resume with: lmkit resume" in text
    assert (workdir / "runs" / "intr" / "checkpoints" / "latest.pt").exists()


def test_piped_output_stays_plain(workdir):
    result = run_cli("train", "--preset", "tiny.yaml", "--name", "piped", "--out-dir", "runs", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout and "step 5/60 | ep" in result.stdout and "eval step 20" in result.stdout
    assert "completed: 60 steps" in result.stdout


def test_render_run_restores_the_terminal_when_the_job_fails(monkeypatch):
    """An error after the live display started (here: while data is prepared) stops it and
    shows the cursor before the error propagates to the CLI's one-line message."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    tty = os.fdopen(slave, "w", encoding="utf-8", buffering=1)
    monkeypatch.setattr(sys, "stdout", tty)
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setenv("LINES", "40")
    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)

    def job(emit):
        emit(DataProgress(stage="tokenize train", completed=1, total=10))
        time.sleep(0.3)  # a refresh or two
        raise DataError("data.dataset: broken.txt is empty")

    with pytest.raises(DataError):
        render_run(job, no_tui=False, json_out=False)
    assert sys.stdout is tty  # Live's redirection was undone
    tty.flush()
    out = b""
    while select.select([master], [], [], 0.2)[0]:
        out += os.read(master, 65536)
    tty.close()
    os.close(master)
    screen = out.decode("utf-8", "replace")
    assert "tokenize train" in screen and HIDE_CURSOR in screen
    assert screen.rfind(SHOW_CURSOR) > screen.rfind(HIDE_CURSOR)


def test_a_small_terminal_gets_the_progress_line(monkeypatch):
    master, slave = os.openpty()
    tty = os.fdopen(slave, "w", encoding="utf-8", buffering=1)
    monkeypatch.setattr(sys, "stdout", tty)
    monkeypatch.setenv("COLUMNS", "70")
    monkeypatch.setenv("LINES", "15")
    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)

    def job(emit):
        emit(started())
        emit(step_event(10))
        return {}

    render_run(job, no_tui=False, json_out=False)
    tty.flush()
    out = b""
    while select.select([master], [], [], 0.2)[0]:
        out += os.read(master, 65536)
    tty.close()
    os.close(master)
    screen = plain(out.decode("utf-8", "replace"))
    assert "model gpt (pilot): 664,192 params" in screen and "train" in screen and "─ stats " not in screen


def test_other_ranks_print_only_warnings(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "2")

    def job(emit):
        for event in (started(), step_event(1), Notice(level="info", message="device cpu"),
                      Notice(level="warning", message="something to know"), NaNSkipped(step=3, total=1)):
            emit(event)
        return {"steps": 1}

    assert render_run(job, no_tui=False, json_out=False) == {"steps": 1}
    out, err = capsys.readouterr()
    assert out == "" and err == ("[rank 2] warning: something to know\n"
                                 "[rank 2] warning: step 3: non-finite loss or gradient norm; update skipped (1 so far)\n")


# ------------------------------------------------------------------------------ step-time jumps (issue 17)


def timed_run(dash: Dashboard, times: list[float], device: str = "cpu") -> None:
    dash(started(device))
    for i, t in enumerate(times):
        dash(dataclasses.replace(step_event(100 * (i + 1), device), step_time_s=t))


def jump_notes(dash: Dashboard) -> list[tuple[int | None, str, str]]:
    return [(step, style, text) for _, step, style, text in dash.events if "slower than this run's median" in text]


def test_a_step_time_jump_shows_once_in_the_events_panel():
    dash = Dashboard(live=False, sampler=False)
    timed_run(dash, [0.1] * 10 + [0.4] + [0.4] * 10)
    assert jump_notes(dash) == [(1100, "yellow", "warning: steps 4.0x slower than this run's median (100 ms -> "
                                                 "400 ms): is the CPU shared with another process? (--threads 1 or "
                                                 "--set training.adapt_threads=true suffer less next to one; lmkit "
                                                 "doctor shows the load)")]
    text = render(dash, width=300, height=60)
    events = panel(text, "events")
    assert events.count("warning: steps 4.0x slower than this run's median (100 ms -> 400 ms): is the CPU") == 1
    assert re.search(r"step_time_jump\s+1\s+1,100\s+steps 4.0x slower", panel(text, "events by kind"))


def test_no_step_time_warning_for_a_steady_run_or_a_short_history():
    steady = Dashboard(live=False, sampler=False)
    scripted_run(steady, steps=2000)  # 2,000 log lines at 59.2 ms
    short = Dashboard(live=False, sampler=False)
    timed_run(short, [0.1] * 4 + [0.4])  # 4 windows before the slow one: no verdict yet
    assert jump_notes(steady) == [] and jump_notes(short) == []
    assert "step_time_jump" not in render(steady, width=200) + render(short, width=200)


def test_the_jump_names_the_gpu_on_a_cuda_run():
    dash = Dashboard(live=False, sampler=False)
    timed_run(dash, [0.092] * 8 + [0.31] * 3, device="cuda:0")
    assert [text for _, _, text in jump_notes(dash)] == [
        "warning: steps 3.4x slower than this run's median (92 ms -> 310 ms): is the GPU or the host shared with "
        "another process? (lmkit doctor shows the load)"]
