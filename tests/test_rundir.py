"""The run directory: checkpoint tag names, and records moved aside (never deleted) on a resume."""

from __future__ import annotations

import pytest

from lmkit.rundir import CHECKPOINT_TAG, parse_checkpoint_tag


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
