"""The rough edges seen on the screen (issue 16): each test fails on the behaviour that was seen.

Dashboards are drawn on a recording Rich console of a fixed size and read back as text.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import threading
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

from lmkit.errors import CheckpointError, DeviceError
from lmkit.events import (
    DataProgress,
    Notice,
    RunFinished,
    RunStarted,
    StepMetrics,
)
from lmkit.monitor.chart import BucketSeries, LossChart
from lmkit.monitor.console import PlainLog, RichProgress, started_lines
from lmkit.monitor.dashboard import Dashboard

WARMUP_ADVICE = ("training.warmup_steps (1000) outlasts the run's 100 steps: the LR only reaches 2.97e-05 of its "
                 "3.00e-04 peak; lower it with --set training.warmup_steps=N")


def started(run_dir: str | Path = "runs/demo", **kw) -> RunStarted:
    fields = dict(name="demo", run_dir=str(run_dir), preset="pilot", model_type="gpt", n_params=664_192,
                  device="cpu", device_name="cpu (2 threads)", precision="fp32", compile=False, max_steps=100,
                  steps_per_epoch=63, tokens_per_step=1024)
    fields.update(kw)
    return RunStarted(**fields)


def step(n: int, *, tokens_per_step: int = 553, max_steps: int = 100, elapsed: float = 1.0) -> StepMetrics:
    return StepMetrics(step=n, max_steps=max_steps, epoch=n / 63, tokens=n * tokens_per_step, loss=2.0, lr=3e-4,
                       grad_norm=1.0, tok_per_s=5000.0, step_time_s=0.07, mfu=None, gpu_mem_gb=None,
                       elapsed_s=elapsed)


def render(dash: Dashboard, width: int = 120, height: int = 40) -> str:
    console = Console(record=True, width=width, height=height, force_terminal=True, color_system=None)
    console.print(dash)
    return console.export_text()


def panel(text: str, title: str) -> str:
    """The inside of the panel titled ``title`` (its columns only), rows joined by newlines."""
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


def unwrapped(text: str) -> str:
    """Text with the wrapping undone: rows joined by single spaces, table borders dropped."""
    return " ".join(text.replace("│", " ").split())


def write_run(tmp_path: Path, *, warmup: int = 10, train_steps: range = range(0), evals: tuple = ()) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"training": {"warmup_steps": warmup, "max_steps": 100}}))
    lines = [json.dumps({"split": "train", "step": s, "loss": 4.0 - s / 100, "tokens": 553 * s, "elapsed_s": s * 0.1})
             for s in train_steps]
    lines += [json.dumps({"split": "val", "step": s, "loss": loss, "is_best": s > 0, "tokens": 553 * s,
                          "elapsed_s": 0.2}) for s, loss in evals]
    (run / "metrics.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
    return run


# ------------------------------------------------------------------------------ events panel, summary


def test_long_events_wrap_and_keep_their_advice():
    """Seen: the warmup warning cut with `…` ("lower it with --set training.warmup_…") while the
    panel had rows to spare."""
    dash = Dashboard(live=False, sampler=False)
    dash(started())
    dash(Notice(level="warning", message=WARMUP_ADVICE))
    dash(Notice(level="info", message="device cpu (auto: no CUDA or MPS GPU found)"))
    events = panel(render(dash, width=100), "events")
    assert "…" not in events
    assert f"warning: {WARMUP_ADVICE}" in unwrapped(events)
    # continuation rows are indented under the text, not under the time column
    rows = [r for r in events.splitlines() if r.strip()]
    first = next(i for i, r in enumerate(rows) if "warning:" in r)
    assert rows[first + 1].startswith(" " * 17) and rows[first + 1].strip()


def test_warnings_are_repeated_in_the_final_summary():
    finished = RunFinished(status="completed", summary={"name": "demo", "steps": 100, "tokens": 55300,
                                                        "wall_time_s": 5.0, "run_dir": "runs/demo"})
    for make in ("dashboard", "progress"):
        console = Console(record=True, width=100, color_system=None)
        if make == "dashboard":
            dash = Dashboard(console, live=False, sampler=False)
            for e in (started(), Notice(level="warning", message=WARMUP_ADVICE), Notice(level="info", message="fyi"),
                      Notice(level="warning", message="again"), Notice(level="warning", message="again"), finished):
                dash(e)
            console.print(dash.summary_table())
        else:
            progress = RichProgress(console)
            for e in (started(), Notice(level="warning", message=WARMUP_ADVICE), Notice(level="warning",
                                                                                          message="again"), finished):
                progress(e)
        text = console.export_text()
        summary = unwrapped(text[text.index("run demo: completed"):])
        assert f"warning: {WARMUP_ADVICE}" in summary, make
        assert "warning: again" in summary and "fyi" not in summary
        if make == "dashboard":
            assert "warning: again (x2)" in summary


# ------------------------------------------------------------------------------ loss chart


def chart_text(train: BucketSeries, val: BucketSeries, width: int = 70, height: int = 14, **kw) -> list[str]:
    console = Console(record=True, width=width, height=height, color_system=None)
    console.print(LossChart(train, val, **kw), height=height)
    return console.export_text().splitlines()


def test_y_axis_labels_do_not_repeat_on_a_small_range():
    """Seen: `9.01 / 9.01 / 9` for losses between 9.000 and 9.012."""
    train, val = BucketSeries(512), BucketSeries(512)  # one step per bucket: the chart spans 9.000 .. 9.012
    for s in range(1, 201):
        train.add(s, 9.0 + 0.012 * (s - 1) / 199)
    lines = chart_text(train, val)
    labels = [line.split("┤", 1)[0].strip() for line in lines if "┤" in line]
    labels = [lab for lab in labels if lab]
    assert len(labels) == 3 and len(set(labels)) == 3, labels
    # the labels are the range's top, middle and bottom to their last digit
    assert [float(lab) for lab in labels] == pytest.approx([9.012, 9.006, 9.0], abs=5e-4)


def test_val_is_drawn_with_the_marker_its_legend_shows():
    """Seen: the legend said `◆ val` while val was a line of braille dots without markers."""
    train, val = BucketSeries(64), BucketSeries(64)
    for s in range(1, 1001):
        train.add(s, 4.0 - 2.0 * s / 1000)
    for s in (200, 400, 600, 800, 1000):
        val.add(s, 4.2 - 2.0 * s / 1000)
    legend = LossChart.legend().plain
    marker = re.search(r"(\S)\s*val", legend).group(1)
    body = "\n".join(line.split("┤", 1)[1] for line in chart_text(train, val, max_steps=1000) if "┤" in line)
    assert body.count(marker) == 5  # one per evaluation


def test_a_resumed_run_shows_its_history_from_metrics_jsonl(tmp_path):
    """Seen: after `lmkit resume` the chart started empty at the resume step."""
    run = write_run(tmp_path, train_steps=range(5, 101, 5), evals=((0, 4.1), (50, 3.6), (100, 3.1)))
    dash = Dashboard(live=False, sampler=False)
    dash(started(run, start_step=100, max_steps=200))
    dash(step(105, max_steps=200))
    assert dash.train.count == 21 and dash.train.first_step == 5  # 20 records before the resume + 1 after
    assert dash.val.count == 3 and dash.best_val is not None and dash.best_val.step == 100
    text = render(dash)
    chart = panel(text, "loss")
    axis = [line for line in chart.splitlines() if "step 105" in line][0]
    assert axis.split()[0] == "0"  # the x axis starts at the first evaluation (step 0), not at the resume step
    assert "steps ≤ 100 from metrics.jsonl" in text
    assert "3.1000 @100" in panel(text, "stats")  # the last evaluation before the resume


def test_elapsed_names_the_whole_run_and_the_session_after_a_resume(tmp_path):
    dash = Dashboard(live=False, sampler=False)
    dash(started(start_step=50))
    dash(step(60, elapsed=30.0))
    dash(RunFinished(status="completed", summary={"name": "demo"}))
    stats = panel(render(dash), "stats")
    assert re.search(r"elapsed\s+30s in all · \d+(\.\d)?s since resume", stats), stats
    fresh = Dashboard(live=False, sampler=False)
    fresh(started())
    fresh(step(60, elapsed=30.0))
    assert "since resume" not in render(fresh)


# ------------------------------------------------------------------------------ terminal state after Ctrl-C


def test_the_live_dashboard_turns_off_echo_and_output_flush_and_restores_them():
    """Seen: after Ctrl-C a stray `╭── training ─╮` above the `interrupted` frame. Ctrl-C made the
    terminal drop the frame bytes not yet shown (and echo `^C`, scrolling a full-width last
    row): the next frame's cursor moves then start from the wrong row."""
    import termios

    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    assert before[3] & termios.ECHO and not before[3] & termios.NOFLSH  # the terminal's defaults
    out = open(slave, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    drained = threading.Event()

    def drain():
        while True:
            try:
                if not os.read(master, 65536):
                    break
            except OSError:
                break
        drained.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        dash = Dashboard(Console(file=out, force_terminal=True, width=100, height=30), sampler=False)
        dash(started())
        live = termios.tcgetattr(slave)[3]
        assert not live & termios.ECHO and live & termios.NOFLSH
        dash(RunFinished(status="interrupted", summary={"name": "demo"}))
        assert termios.tcgetattr(slave) == before
    finally:
        out.close()
        os.close(slave)
        os.close(master)
        drained.wait(5)


# ------------------------------------------------------------------------------ markup


def test_bracketed_text_is_shown_as_written():
    """Seen: `[cpu]` vanished from the progress line's start (Rich read it as markup)."""
    console = Console(record=True, width=200, color_system=None)
    progress = RichProgress(console)
    progress(started())
    progress(Notice(level="warning", message="layer [bold]h.0[/bold] is [red]odd[/red]"))
    progress.close()
    text = console.export_text()
    assert "cpu (2 threads) [cpu] | fp32" in text
    assert "layer [bold]h.0[/bold] is [red]odd[/red]" in text

    dash = Dashboard(live=False, sampler=False)
    dash(started(device_name="cpu [2 threads]"))
    dash(Notice(level="info", message="read [data] from [bold]x[/bold]"))
    screen = render(dash, width=160)
    assert "read [data] from [bold]x[/bold]" in panel(screen, "events")
    assert "read [data] from [bold]x[/bold]" in panel(screen, "events by kind")
    assert "(cpu [2 threads])" in screen  # the host panel's title


# ------------------------------------------------------------------------------ header: warmup, tokens/step


@pytest.mark.parametrize(("warmup", "shown"), [(1000, "warmup 1,000 steps > the run's 100"),
                                               (60, "warmup 60 of the run's 100 steps"), (10, None)])
def test_a_long_warmup_shows_in_the_header(tmp_path, warmup, shown):
    """Seen: `--max-steps 100` on a preset with 1,000 warmup steps: only an event said so."""
    run = write_run(tmp_path, warmup=warmup)
    dash = Dashboard(live=False, sampler=False)
    dash(started(run))
    header = "\n".join(render(dash).splitlines()[:3])
    assert (shown in header) if shown else ("warmup" not in header)
    # the lines of the plain log and the progress line: a warmup longer than the run is left to
    # the trainer's own warning (it comes next, with its advice), so it is not said twice
    in_lines = shown if warmup <= 100 else None
    lines = "\n".join(started_lines(started(run), warmup))
    assert (f"warning: {in_lines}" in lines) if in_lines else ("warning:" not in lines)
    out = io.StringIO()
    PlainLog(out)(started(run))
    assert (in_lines is not None) == ("warning: warmup" in out.getvalue())


def test_tokens_per_step_says_what_it_counts():
    """Seen: `1.02k tokens/step` (batch x block, padding included) beside ~553 loss targets per step."""
    dash = Dashboard(live=False, sampler=False)
    dash(started())
    dash(step(60))
    stats = panel(render(dash), "stats")
    assert re.search(r"tokens\s+33.2k targets", stats)  # 60 x 553
    assert re.search(r"per step\s+~553 targets of 1.02k positions", stats)
    assert "1.02k tokens/step (batch x block, padding included; tokens seen count loss targets)" in \
        "\n".join(started_lines(started()))


# ------------------------------------------------------------------------------ data preparation


def test_data_progress_shows_documents_tokens_and_tokens_per_second():
    t0 = 1_000_000.0
    events = [DataProgress(stage="encode train", completed=10, total=100, unit="documents", tokens=1_000, time=t0),
              DataProgress(stage="encode train", completed=60, total=100, unit="documents", tokens=51_000,
                           time=t0 + 1.0)]
    dash = Dashboard(live=False, sampler=False)
    for e in events:
        dash(e)
    console = Console(record=True, width=120, color_system=None)
    console.print(dash)
    line = console.export_text()
    assert "encode train" in line and "60/100 documents" in line
    assert "51k tokens · 50k tokens/s" in line  # (51,000 - 1,000) tokens in 1 s

    console = Console(record=True, width=160, color_system=None, force_terminal=True)
    progress = RichProgress(console)
    for e in events:
        progress(e)
    progress.progress.refresh()
    progress.close()
    assert "51k tokens · 50k tokens/s" in console.export_text()

    out = io.StringIO()
    log = PlainLog(out)
    for e in [*events, DataProgress(stage="encode train", completed=100, total=100, unit="documents",
                                    tokens=81_000, time=t0 + 2.0)]:
        log(e)
    assert "data: encode train done (100 documents, 81,000 tokens, 40k tokens/s)" in out.getvalue()


# ------------------------------------------------------------------------------ doctor, device, checkpoint


def test_doctor_shows_a_target_difference_only_for_a_stated_round_target():
    """Seen: `Difference from 44,909,056 target: 0.0%` for small, whose target is its own count."""
    from lmkit.cli import app

    result = CliRunner().invoke(app, ["doctor", "--preset", "small"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Total parameters: 44,909,056" in result.stdout and "Difference from" not in result.stdout
    from lmkit.cli.doctor import target_is_approximate

    assert target_is_approximate(10_000_000) and target_is_approximate(1_500_000)
    assert not target_is_approximate(44_909_056) and not target_is_approximate(664_192)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_gpu_only_preset_says_the_preset_requires_a_gpu():
    """Seen: `error: --gpu-only: CUDA is not available` though no --gpu-only was typed."""
    from lmkit.config import build_run_config
    from lmkit.device import plan_device

    config = build_run_config("scale_10m", [], {})
    with pytest.raises(DeviceError) as exc:  # not knowing the preset: no flag named that was not typed
        plan_device(config.training)
    assert not str(exc.value).startswith("--gpu-only:") and "training.gpu_only" in str(exc.value)
    with pytest.raises(DeviceError) as exc:
        plan_device(config.training, preset=config.preset)
    assert str(exc.value).startswith("preset scale_10m requires a GPU (training.gpu_only), but CUDA is not available")
    with pytest.raises(DeviceError) as exc:  # a GPU-only run of a preset that does not ask for it
        plan_device(build_run_config("pilot", [], {"training.gpu_only": ("--gpu-only", True)}).training,
                    preset="pilot")
    assert str(exc.value).startswith("this run is GPU-only (--gpu-only / training.gpu_only)")


def test_a_pickled_checkpoint_gets_lmkits_error_and_no_torch_warning(tmp_path):
    """Seen: torch's `UserWarning: Detected pickle protocol 4 ...` printed before lmkit's error."""
    from lmkit.training.checkpoint import load_checkpoint, peek_step

    path = tmp_path / "pickled.pt"
    with path.open("wb") as f:
        pickle.dump({"model": {}, "step": 3}, f, protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="pickled.pt: cannot be loaded"):
            load_checkpoint(path)
        assert peek_step(path) is None
    assert [str(w.message) for w in caught] == []
    with warnings.catch_warnings(record=True) as outside:  # the filter was scoped to lmkit's call
        warnings.simplefilter("always")
        warnings.warn("Detected pickle protocol 4 elsewhere", UserWarning, stacklevel=1)
    assert len(outside) == 1


# ------------------------------------------------------------------------------ --help


EXPERIMENT_ORDER = ["doctor", "train", "resume", "svd-analyze", "eval", "export", "compare", "runs"]


def test_help_lists_commands_in_experiment_order_one_line_each_without_bool_metavars():
    from lmkit.cli import app

    runner = CliRunner()
    text = runner.invoke(app, ["--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"}).stdout  # a classic terminal
    rows = [line for line in text.splitlines() if line.startswith("│ ")]
    commands = [row.split()[1] for row in rows if row.split()[1] in EXPERIMENT_ORDER]
    present = [c for c in EXPERIMENT_ORDER if c != "runs" or Path(__file__).parents[1].joinpath(
        "lmkit/cli/runs.py").exists()]
    assert commands == present
    start = next(i for i, row in enumerate(rows) if row.split()[1] == "doctor")
    # every command's summary is one row: the row after a command is the next command
    assert [row.split()[1] for row in rows[start:start + len(present)]] == present
    assert "<bool>" not in text
    for command in ("train", "resume", "doctor", "eval"):
        assert "<bool>" not in runner.invoke(app, [command, "--help"], env={"COLUMNS": "120"}).stdout, command


def test_a_command_module_that_is_not_there_is_left_out():
    from lmkit.cli import _register, app

    before = len(app.registered_commands)
    _register("not-yet", "not_written_yet", "command", "A command still being written.", "")
    assert len(app.registered_commands) == before


def test_data_line_shows_the_study_stats():
    """The data line names what the multiplication-tokens condition did to the text, and what a
    chat set labels (the counts come from the data layer's stats, not from this line)."""
    from lmkit.events import DataReady
    from lmkit.monitor.console import data_line

    base = dict(description="d", tokenizer="gpt2+mul", vocab_size=50349, split_sizes={"train": 10}, unit="tokens",
                cache_dir=None, reused=False)
    plain = data_line(DataReady(**base))
    assert "mul tokens" not in plain and not plain.endswith("| ")
    mul = data_line(DataReady(**base, stats={"condition": "mul_tokens", "mul_tokens": 4827,
                                             "mul_token_ratio": 0.0032794, "tokens_saved": 13459,
                                             "token_reduction": 0.0090612, "synthetic_tokens": 5153}))
    assert "condition mul_tokens, 4,827 mul tokens (0.33% of all), 13,459 tokens saved vs baseline (0.91%)" in mul
    assert "synthetic drills 5,153 tokens" in mul
    baseline = data_line(DataReady(**base, stats={"condition": "baseline", "mul_tokens": 0, "tokens_saved": 0,
                                                  "token_reduction": 0.0}))
    assert "condition baseline" in baseline and "mul tokens" not in baseline
    chat = data_line(DataReady(**base, stats={"format": "chat", "condition": None, "loss_on": "assistant",
                                              "label_tokens": {"train": 683375, "val": 100}, "truncated": 3}))
    assert "683,375 labelled train tokens (loss on assistant)" in chat and "3 conversations cut" in chat


def test_eval_table_prints_counts_as_integers():
    """A count with no better direction reads 0, not 0.0000; a rate of 0 stays 0.0000."""
    import io

    from lmkit.cli.eval import _render_table

    rec = {"task": "gsm8k", "step": 5, "headline": "accuracy", "n_items": 200, "wall_time_s": 1.0,
           "metrics": {"accuracy": 0.0, "mul_token_count": 0.0, "mul_tokens_per_response": 0.25},
           "directions": {"accuracy": "higher", "mul_token_count": "neither", "mul_tokens_per_response": "neither"}}
    out = io.StringIO()
    _render_table([rec], out)
    rows = {line.split("│")[3].strip(): line.split("│")[4].strip() for line in out.getvalue().splitlines()
            if line.count("│") >= 6}
    assert rows["accuracy"] == "0.0000" and rows["mul_token_count"] == "0"
    assert rows["mul_tokens_per_response"] == "0.2500"


def test_warmup_advice_on_a_resume_does_not_suggest_a_change_resume_refuses(tmp_path):
    from conftest import TINY_PRESET, run_cli

    preset = tmp_path / "p.yaml"
    preset.write_text(TINY_PRESET.format(pos="rope", steps=2, eval_interval="null", ckpt_interval="null"))
    first = run_cli("train", "--preset", str(preset), "--name", "w", "--no-tui", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "lower it with --set training.warmup_steps=N" in first.stdout + first.stderr  # warmup 5 > 2 steps
    more = run_cli("resume", "runs/w", "--max-steps", "4", "--no-tui", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    out = more.stdout + more.stderr
    assert "outlasts the run's 4 steps" in out and "--set training.warmup_steps" not in out
    assert "a resume keeps the run's schedule: give it more steps (--max-steps)" in out
