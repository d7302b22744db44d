"""Renderers and writers of training events."""

import dataclasses
import io
import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from rich.console import Console

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
    StepTimeJump,
)
from lmkit.monitor.console import PlainLog, RichProgress
from lmkit.monitor.steptime import RunningMedian, StepTimeWatch
from lmkit.monitor.writers import EventsWriter, MetricsWriter

STARTED = RunStarted(name="demo", run_dir="runs/demo", preset="pilot", model_type="gpt", n_params=664192,
                     device="cpu", device_name="cpu (2 threads)", precision="fp32", compile=False, max_steps=100,
                     steps_per_epoch=63, tokens_per_step=1024)
STEP = StepMetrics(step=50, max_steps=100, epoch=0.79, tokens=30000, loss=2.5, lr=1.5e-4, grad_norm=1.2,
                   tok_per_s=17000.0, step_time_s=0.033, mfu=None, gpu_mem_gb=None, elapsed_s=2.0)
EVAL = EvalResult(step=100, epoch=1.6, tokens=60000, split="val", loss=1.9, is_best=True, elapsed_s=0.5,
                  metrics={"ppl": 6.7, "acc_val": 0.015, "acc_flat": 0.0, "acc_paren": 0.01, "paren_gap": 0.01})
FINISHED = RunFinished(status="completed", summary={"name": "demo", "steps": 100, "tokens": 60000,
                                                    "wall_time_s": 5.0, "run_dir": "runs/demo",
                                                    "final_val_loss": 1.9, "final_val_step": 100,
                                                    "best_val_loss": 1.9, "best_step": 100,
                                                    "final_metrics": {"acc_flat": 0.0, "acc_paren": 0.01}})
SCRIPT = [DataProgress(stage="tokenize train", completed=10, total=10), STARTED, STEP, EVAL,
          CheckpointSaved(step=100, path="runs/demo/checkpoints/latest.pt", tags=("latest", "best"), val_loss=1.9,
                          seconds=0.01),
          Notice(level="warning", message="something to know"), FINISHED]


def test_plain_log_lines():
    out = io.StringIO()
    log = PlainLog(out)
    for event in SCRIPT:
        log(event)
    text = out.getvalue()
    assert "data: tokenize train done (10 rows)" in text
    assert "model gpt (pilot): 664,192 params" in text
    assert "step 50/100 | ep 0.79 | loss 2.5000 | lr 1.50e-04 | 17k tok/s | 33 ms/step" in text
    assert "eval step 100 | val loss 1.9000 (best) | ppl 6.70 acc_val 1.5% acc_flat 0.0% acc_paren 1.0%" in text
    assert "paren_gap +1.0pp" in text and "saved latest, best" in text and "warning: something to know" in text
    assert "completed: 100 steps" in text


class ClosedPipe(io.StringIO):
    def write(self, text):
        raise BrokenPipeError


def test_plain_log_survives_a_closed_pipe():
    log = PlainLog(ClosedPipe())
    for event in SCRIPT:
        log(event)  # must not raise: training goes on when `| head` exits
    assert log.closed


def test_summary_without_a_best_yet():
    out = io.StringIO()
    PlainLog(out)(RunFinished(status="interrupted", summary={"steps": 7, "tokens": 100, "wall_time_s": 1.0,
                                                             "final_val_loss": 3.5, "final_val_step": 0,
                                                             "best_val_loss": None, "best_step": None}))
    assert "interrupted: 7 steps" in out.getvalue() and "val loss 3.5000 at step 0" in out.getvalue()


def test_rich_progress_renders_into_a_recorded_console():
    console = Console(record=True, width=120, force_terminal=True)
    view = RichProgress(console)
    for event in SCRIPT:
        view(event)
    view.close()
    text = console.export_text()
    assert "eval step 100" in text and "run demo: completed" in text and "acc_paren 1.0%" in text


def test_metrics_and_events_writers(tmp_path):
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    events = EventsWriter(tmp_path / "events.jsonl")
    for event in SCRIPT:
        metrics(event)
        events(event)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in rows] == ["train", "val"]
    assert rows[0]["loss"] == 2.5 and rows[1]["acc_paren"] == 0.01 and rows[1]["is_best"]
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert kinds == ["run_started", "checkpoint", "notice", "run_finished"]


@dataclass(frozen=True)
class SVDModeSwitch(Event):
    """An event type the writer has never heard of (a later issue's SVD mode switch)."""

    kind: ClassVar[str] = "svd_mode_switch"
    step: int
    layer: str
    mode: str
    rank: int
    alignment: float
    factors: Path  # not a JSON type: written as its text


def test_events_jsonl_records_every_non_metric_event_kind(tmp_path):
    switch = SVDModeSwitch(step=300, layer="h.0.mlp.c_fc", mode="lowrank", rank=32, alignment=float("nan"),
                           factors=Path("runs/demo/svd/h.0.pt"), time=1.5)
    resumed = Resumed(step=50, checkpoint="runs/demo/checkpoints/step_0000050.pt", skipped=[("a.pt", "corrupt")],
                      config_changes={"training.lr": [1e-4, 2e-4]}, dropped_metrics=3, removed_temp_files=[])
    ready = DataReady(description="arithmetic", tokenizer="char", vocab_size=35, split_sizes={"train": 8},
                      unit="examples", cache_dir=None, reused=True)
    stream = [DataProgress(stage="tokenize", completed=1, total=2), ready, STARTED, STEP, resumed, switch,
              NaNSkipped(step=51, total=1), EVAL, FINISHED]
    events = EventsWriter(tmp_path / "events.jsonl")
    for event in stream:
        events(event)
    rows = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["data_ready", "run_started", "resumed", "svd_mode_switch", "nan_skipped",
                                         "run_finished"]
    assert rows[3] == {"kind": "svd_mode_switch", "step": 300, "layer": "h.0.mlp.c_fc", "mode": "lowrank", "rank": 32,
                       "alignment": "nan", "factors": "runs/demo/svd/h.0.pt", "time": 1.5}
    assert rows[4]["step"] == 51 and rows[4]["total"] == 1 and rows[4]["skipped"] == 1
    assert rows[2]["skipped"] == [["a.pt", "corrupt"]] and rows[2]["config_changes"] == {"training.lr": [1e-4, 2e-4]}
    events(NaNSkipped(step=52, total=2))  # after the run's end: appended, not lost
    assert json.loads((tmp_path / "events.jsonl").read_text().splitlines()[-1])["step"] == 52


def test_nan_skips_print_as_warnings():
    out = io.StringIO()
    PlainLog(out)(NaNSkipped(step=12, total=3))
    assert out.getvalue() == "warning: step 12: non-finite loss or gradient norm; update skipped (3 so far)\n"
    console = Console(record=True, width=120, force_terminal=True)
    view = RichProgress(console)
    view(NaNSkipped(step=20, total=5, skipped=2))
    view.close()
    assert "warning: steps up to 20: 2 updates skipped for a non-finite loss or gradient norm (5 so far)" \
        in console.export_text()


# ------------------------------------------------------------------------------ step-time jumps (issue 17)

CPU_JUMP = ("warning: steps 4.0x slower than this run's median (100 ms -> 400 ms): is the CPU shared with another "
            "process? (--threads 1 or --set training.adapt_threads=true suffer less next to one; lmkit doctor shows "
            "the load)")


def windows(*times: float, device: str = "cpu") -> list[Event]:
    """A run whose log windows took ``times`` seconds per step, one log line each."""
    start = dataclasses.replace(STARTED, device=device, max_steps=1000)
    return [start] + [dataclasses.replace(STEP, step=10 * (i + 1), max_steps=1000, step_time_s=t)
                      for i, t in enumerate(times)]


def plain_lines(events: list[Event]) -> list[str]:
    out = io.StringIO()
    log = PlainLog(out)
    for event in events:
        log(event)
    return out.getvalue().splitlines()


def warnings_in(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("warning: steps")]


def test_a_step_time_jump_is_flagged_once_in_the_plain_log():
    lines = plain_lines(windows(*[0.1] * 10, 0.4, *[0.4] * 10))
    assert warnings_in(lines) == [CPU_JUMP]
    # right after the log line of the slow window (step 110), not before
    at = lines.index(CPU_JUMP)
    assert lines[at - 1].startswith("step 110/1000 ") and "400 ms/step" in lines[at - 1]


def test_a_steady_run_and_a_short_history_give_no_step_time_warning():
    jitter = [0.1, 0.12, 0.09, 0.11, 0.1, 0.25, 0.1] * 10  # a 2.5x blip is not a jump
    assert warnings_in(plain_lines(windows(*jitter))) == []
    assert warnings_in(plain_lines(windows(0.1, 0.1, 0.1, 0.1, 0.4))) == []  # 4 windows before: no verdict
    assert warnings_in(plain_lines(windows(*[0.1] * 5, 0.4))) == [CPU_JUMP]  # 5 windows before: a verdict
    # millisecond steps: a 4x jump of 3 ms is timer noise, not news
    assert warnings_in(plain_lines(windows(*[0.001] * 10, 0.004))) == []


def test_the_warning_names_the_gpu_on_cuda_runs_and_comes_back_only_after_normal_steps():
    lines = warnings_in(plain_lines(windows(*[0.092] * 8, 0.31, device="cuda:0")))
    assert lines == ["warning: steps 3.4x slower than this run's median (92 ms -> 310 ms): is the GPU or the host "
                     "shared with another process? (lmkit doctor shows the load)"]
    # slow again after only 4 normal windows: the same slowdown, no second warning
    assert len(warnings_in(plain_lines(windows(*[0.1] * 10, 0.4, *[0.1] * 4, 0.4, 0.4)))) == 1
    # back to normal for 5 windows, then a new jump: warned again
    assert warnings_in(plain_lines(windows(*[0.1] * 10, 0.4, *[0.1] * 5, 0.4))) == [CPU_JUMP] * 2
    # a new run (resume) starts a new history
    log = windows(*[0.1] * 10, 0.4)
    assert warnings_in(plain_lines(log + log)) == [CPU_JUMP] * 2


def test_rich_progress_shows_the_jump_once():
    console = Console(record=True, width=200, force_terminal=True)
    view = RichProgress(console)
    for event in windows(*[0.1] * 10, *[0.4] * 10):
        view(event)
    view.close()
    assert console.export_text().count("steps 4.0x slower than this run's median (100 ms -> 400 ms): is the CPU") == 1


def test_an_emitted_jump_is_not_shown_twice():
    events = windows(*[0.1] * 10, 0.4)
    emitted = StepTimeJump(step=110, ratio=4.0, median_s=0.1, now_s=0.4, device_type="cpu")
    assert warnings_in(plain_lines(events + [emitted])) == [CPU_JUMP]
    watch = StepTimeWatch()
    assert [type(e) for e in watch.expand(emitted)] == [StepTimeJump] and watch.upstream  # the emitter's, shown
    assert all(watch(e) is None for e in windows(*[0.1] * 10, 0.4)[1:])  # and the watch stands down


def test_running_median_matches_statistics_median():
    rng = random.Random(17)
    median = RunningMedian()
    seen = []
    for _ in range(301):
        value = rng.choice([rng.random(), 0.5, rng.expovariate(3.0)])
        median.add(value)
        seen.append(value)
        assert median.median() == pytest.approx(statistics.median(seen), abs=0, rel=1e-15)
