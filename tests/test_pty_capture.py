"""benchmarks/pty_capture.py: a command's terminal screen as plain text (stage 7 of gpu_check.sh)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pyte")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pty_capture.py"

# A Rich Live display that redraws a table in place, as lmkit's dashboard does, then exits 3.
LIVE = """
import sys, time
from rich.live import Live
from rich.table import Table
from rich.console import Console

assert sys.stdout.isatty(), "not on a terminal"
def table(i):
    t = Table(title="panel")
    t.add_column("step"); t.add_column("gpu mem")
    t.add_row(str(i), f"{i * 1.5:.1f} GiB")
    return t
with Live(table(0), console=Console(), auto_refresh=False) as live:
    for i in range(1, 6):
        time.sleep(0.15)
        live.update(table(i), refresh=True)
print("done", Console().size.width)
sys.exit(3)
"""


def test_the_last_screen_is_the_final_frame_without_escape_codes(tmp_path):
    prog = tmp_path / "live.py"
    prog.write_text(LIVE)
    out = tmp_path / "screen.txt"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--cols", "90", "--rows", "20",
                           "--every", "0.1", "--", sys.executable, str(prog)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3, proc.stderr  # the command's exit code
    text = out.read_text()
    assert "\x1b" not in text
    last = text.split("# last screen")[1]
    assert "7.5 GiB" in last and "done 90" in last  # step 5's row, and the pty's width reached Rich
    # an in-place redraw leaves one table on the screen, not one per frame
    assert last.count("gpu mem") == 1 and "1.5 GiB" not in last
    assert "# exit 3" in text


def test_a_command_that_overruns_its_timeout_is_killed(tmp_path):
    from importlib import util

    spec = util.spec_from_file_location("pty_capture", SCRIPT)
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(subprocess.TimeoutExpired):
        mod.capture([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1.0)
