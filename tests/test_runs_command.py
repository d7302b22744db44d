"""``lmkit runs``: the table of a folder's runs, checked against the runs' own files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import typer
from typer.testing import CliRunner

from lmkit.config import build_run_config
from lmkit.errors import Interrupted
from lmkit.run_table import is_running, last_eval, list_runs, read_run


def _config(root, name, steps):
    from conftest import TINY_PRESET

    preset = root / "tiny.yaml"
    preset.write_text(TINY_PRESET.format(pos="rope", steps=steps, eval_interval=5, ckpt_interval=5))
    return build_run_config(str(preset), ["training.eval_iters=2", "training.tensorboard=false"],
                            {"out_dir": ("--out-dir", str(root / "runs")), "name": ("--name", name)})


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    import os

    from lmkit.training.loop import train

    root = tmp_path_factory.mktemp("runs-table")
    train(_config(root, "done", 6))
    time.sleep(1.1)  # distinct start times (ISO seconds)
    os.environ["LMKIT_TEST_SIGNAL"] = "3:SIGINT"
    try:
        with pytest.raises(Interrupted):
            train(_config(root, "stopped", 6))
    finally:
        del os.environ["LMKIT_TEST_SIGNAL"]
    runs = root / "runs"
    # a run whose process died: its last session started and never recorded an end
    shutil.copytree(runs / "done", runs / "died")
    (runs / "died" / "summary.json").unlink()
    events = (runs / "died" / "events.jsonl").read_text().splitlines()
    (runs / "died" / "events.jsonl").write_text(
        "\n".join(e for e in events if json.loads(e)["kind"] != "run_finished") + "\n")
    # not runs: skipped quietly
    (runs / "notes").mkdir()
    (runs / "notes" / "todo.txt").write_text("x")
    (runs / "README.txt").write_text("x")
    # an eval result, as `lmkit eval` writes it (two: the newer one is shown)
    (runs / "done" / "eval").mkdir()
    for task, metric, value, created in (("perplexity", "bpb", 2.5, "2026-01-01T00:00:00+00:00"),
                                         ("arithmetic", "acc_val", 0.125, "2026-01-02T00:00:00+00:00")):
        (runs / "done" / "eval" / f"{task}.json").write_text(json.dumps(
            {"task": task, "headline": metric, "metrics": {metric: value, "other": 1.0}, "step": 6,
             "created": created}))
    return runs


def test_rows_match_the_runs_files(runs_root):
    rows = {r.name: r for r in list_runs(runs_root)}
    assert set(rows) == {"done", "stopped", "died"}
    summary = json.loads((runs_root / "done" / "summary.json").read_text())
    done = rows["done"]
    assert (done.status, done.step, done.max_steps, done.tokens) == ("completed", 6, 6, summary["tokens"])
    assert done.params == summary["params"] and done.model_type == "gpt" and done.preset == "tiny"
    assert done.best_val_loss == summary["best_val_loss"] and done.wall_time_s == summary["wall_time_s"]
    assert done.last_eval == {"task": "arithmetic", "metric": "acc_val", "value": 0.125, "step": 6,
                              "created": "2026-01-02T00:00:00+00:00"}
    stopped = rows["stopped"]
    assert stopped.status == "interrupted" and stopped.step == 3 and stopped.max_steps == 6
    assert stopped.last_eval is None
    died = rows["died"]
    metrics = [json.loads(x) for x in (runs_root / "died" / "metrics.jsonl").read_text().splitlines()]
    last_train = [m for m in metrics if m["split"] == "train"][-1]
    val = [m["loss"] for m in metrics if m["split"] == "val" and m["step"] > 0]
    assert died.status == "failed" and died.step == last_train["step"] and died.tokens == last_train["tokens"]
    assert died.best_val_loss == min(val)
    first_start = json.loads((runs_root / "done" / "events.jsonl").read_text().splitlines()[0])
    assert done.started is not None and done.started.startswith(time.strftime(
        "%Y-%m-%dT%H:%M", time.gmtime([json.loads(x) for x in (runs_root / "done" / "events.jsonl").read_text()
                                       .splitlines() if json.loads(x)["kind"] == "run_started"][0]["time"])))
    assert first_start  # events.jsonl is what `started` comes from


def test_newest_first(runs_root):
    names = [r.name for r in list_runs(runs_root)]
    assert names.index("stopped") < names.index("done")  # started later


def test_a_held_lock_is_running_and_a_stale_pid_is_not(runs_root, tmp_path):
    run = tmp_path / "live"
    shutil.copytree(runs_root / "done", run)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(run / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.seek(0); f.truncate(); f.write(str(os.getpid())); f.flush()\n"
        "print('locked', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert is_running(run) and read_run(run).status == "running"
    finally:
        holder.kill()
        holder.wait()
    assert not is_running(run)  # the pid in .lock is gone
    assert read_run(run).status == "completed"


def _app():
    from lmkit.cli.runs import runs_command

    app = typer.Typer()
    app.command()(runs_command)
    return app


def test_cli_json_and_table(runs_root):
    result = CliRunner().invoke(_app(), ["--out-dir", str(runs_root), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == [r.name for r in list_runs(runs_root)]
    result = CliRunner().invoke(_app(), ["--out-dir", str(runs_root)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("done", "stopped", "died", "completed", "interrupted", "failed", "6/6", "3/6",
                 "arithmetic: acc_val 0.125 @ 6", "gpt 18.3k"):
        assert text in result.output, text
    assert "notes" not in result.output and "README" not in result.output


def test_missing_folder_is_one_line(tmp_path):
    result = CliRunner().invoke(_app(), ["--out-dir", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such folder" in result.output


def _eval_record(path, task, metric, value, step, created):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"task": task, "headline": metric, "metrics": {metric: value}, "step": step,
                                "created": created}))


def test_piped_table_at_80_columns_keeps_each_run_on_one_line(runs_root, tmp_path):
    """Not a terminal (a pipe, a file): names are not folded and a row is one line."""
    names = ["pilot-s2", "pilot-s2-with-a-rather-long-name", "transformer-small-lr3e-4-seed1337"]
    for name in names:
        shutil.copytree(runs_root / "done", tmp_path / name)
    result = CliRunner().invoke(_app(), ["--out-dir", str(tmp_path)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in names:
        row = [line for line in lines if f" {name} " in line]
        assert len(row) == 1, (name, result.output)
        assert "arithmetic: acc_val 0.125 @ 6" in row[0] and "completed" in row[0] and "6/6" in row[0]
    rows = [line for line in lines if "completed" in line]
    assert len(rows) == len(names)  # no continuation lines of a folded eval or model


def test_last_eval_breaks_a_same_second_tie_by_the_file_written_last(tmp_path):
    """One `lmkit eval` command writes its tasks within a second: the same ``created``."""
    created = "2026-03-01T12:00:00+00:00"
    for newer, older in (("arithmetic", "perplexity"), ("perplexity", "arithmetic")):
        run = tmp_path / f"run-{newer}"
        _eval_record(run / "eval" / f"{older}.json", older, "m", 1.0, 6, created)
        _eval_record(run / "eval" / f"{newer}.json", newer, "m", 2.0, 6, created)
        ns = 1_772_366_400_000_000_000  # 2026-03-01T12:00:00 UTC, set explicitly: not the clock's resolution
        os.utime(run / "eval" / f"{older}.json", ns=(ns, ns))
        os.utime(run / "eval" / f"{newer}.json", ns=(ns + 1_000, ns + 1_000))  # 1 µs later
        assert last_eval(run)["task"] == newer


def test_last_eval_sees_checkpoint_sweep_files(tmp_path):
    run = tmp_path / "run"
    _eval_record(run / "eval" / "perplexity.json", "perplexity", "bpb", 2.5, 6, "2026-03-01T12:00:00+00:00")
    sweep = run / "eval" / "arithmetic"
    _eval_record(sweep / "step_0000002.json", "arithmetic", "acc_val", 0.1, 2, "2026-03-02T12:00:00+00:00")
    _eval_record(sweep / "step_0000006.json", "arithmetic", "acc_val", 0.5, 6, "2026-03-02T12:00:01+00:00")
    (sweep / "checkpoint_results.json").write_text("[]")
    assert last_eval(run) == {"task": "arithmetic", "metric": "acc_val", "value": 0.5, "step": 6,
                              "created": "2026-03-02T12:00:01+00:00"}
    _eval_record(run / "eval" / "perplexity.json", "perplexity", "bpb", 2.4, 6, "2026-03-03T00:00:00+00:00")
    assert last_eval(run)["task"] == "perplexity"  # a later single-checkpoint result wins again
