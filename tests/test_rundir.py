"""The run directory: checkpoint tag names, and records moved aside (never deleted) on a resume."""

from __future__ import annotations

import json
import re

import pytest

from lmkit.rundir import CHECKPOINT_TAG, RunDir, SupersededRecords, parse_checkpoint_tag


@pytest.mark.parametrize("name, expected", [
    ("step_0002000.pt", ("step", 2000)),
    ("epoch_005.pt", ("epoch", 5)),
    ("step_12345678.pt", ("step", 12345678)),  # past the 7 digits of the padding
    ("latest.pt", None), ("best.pt", None),
    (".step_0000010.pt.abc123.tmp", None),  # an interrupted save's temporary file
    ("step_0000010.pt.bak", None), ("step_.pt", None), ("steps_0000010.pt", None), ("step_-1.pt", None),
])
def test_parse_checkpoint_tag(name, expected):
    assert parse_checkpoint_tag(name) == expected
    assert (CHECKPOINT_TAG.match(name) is not None) == (expected is not None)


# ------------------------------------------------------------------ records moved aside on a resume

EARLY = [b'{"split": "train", "step": 1, "loss": 3.5}\n', b'{"split":"val","step":2,"loss":3.25, "name":"\xc3\xa9"}\n']
LATER = [b'{"split": "train", "step": 3, "loss": 2.0000000000000004}\n', b'{"split": "val", "step": 4,  "loss": 1.5}\n',
         b'{"split": "train", "step": 5, "lo']  # the last one cut short by a kill mid-write


def test_resume_moves_later_metrics_aside_byte_for_byte(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    run.metrics_path.write_bytes(b"".join(EARLY + LATER))
    result = run.supersede_records_after(2)
    assert result == SupersededRecords(metrics=3, events=0, metrics_path=run.path / "superseded/metrics.jsonl",
                                       events_path=None)
    assert run.metrics_path.read_bytes() == b"".join(EARLY)
    assert result.metrics_path.read_bytes() == b"".join(LATER)

    # A second abandoned continuation: its rows get a new file; the first file is untouched.
    again = [b'{"split": "train", "step": 3, "loss": 2.5}\n']
    with run.metrics_path.open("ab") as f:
        f.write(again[0])
    second = run.supersede_records_after(2)
    assert re.fullmatch(r"metrics\.\d{8}-\d{6}\.jsonl", second.metrics_path.name)
    assert second.metrics_path.read_bytes() == b"".join(again)
    assert result.metrics_path.read_bytes() == b"".join(LATER)
    assert run.metrics_path.read_bytes() == b"".join(EARLY)
    # nothing later: nothing moved, no file made
    assert run.supersede_records_after(2) == SupersededRecords(0, 0, None, None)
    assert len(list(run.superseded_dir.iterdir())) == 2


def test_resume_marks_later_events_and_keeps_the_rest_byte_for_byte(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    early = b'{"kind": "checkpoint",  "step": 2, "path": "x"}\n'
    later = b'{"kind": "checkpoint", "step": 4, "path": "y"}\n'
    cut = b'{"kind": "notice", "lev'
    run.events_path.write_bytes(early + b'{"kind": "run_started", "name": "r"}\n' + later + cut)
    result = run.supersede_records_after(2)
    assert (result.metrics, result.events) == (0, 1) and result.events_path.read_bytes() == cut
    lines = run.events_path.read_bytes().splitlines(keepends=True)
    assert lines[:2] == [early, b'{"kind": "run_started", "name": "r"}\n']
    assert json.loads(lines[2]) == {**json.loads(later), "superseded": True} and len(lines) == 3


def test_old_name_still_answers_with_counts(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    run.metrics_path.write_bytes(b"".join(EARLY + LATER))
    assert run.drop_records_after(2) == (3, 0)
    assert (run.superseded_dir / "metrics.jsonl").read_bytes() == b"".join(LATER)  # moved, not dropped
