"""Run a command under a pseudo-terminal and write what its screen showed, as plain text.

``lmkit train`` draws its Rich dashboard only on a terminal, so a log file never shows it. This
runs the command on a pty of a fixed size, feeds its output to a terminal emulator (``pyte``) and
writes the screen -- a few snapshots taken while it ran, and the last one -- without escape codes.
Stage 7 of ``benchmarks/gpu_check.sh`` uses it to record the dashboard's GPU panel (NVML).

Usage::

    python benchmarks/pty_capture.py --out screen.txt [--cols 150 --rows 50 --every 5] -- CMD [ARGS...]

Exits with the command's exit code (128 + N when a signal N ended it).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import struct
import subprocess
import sys
import termios
import time

import pyte


def _screen_text(screen: pyte.Screen) -> str:
    lines = [line.rstrip() for line in screen.display]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def capture(cmd: list[str], *, cols: int = 150, rows: int = 50, every: float = 5.0,
            timeout: float | None = None) -> tuple[int, list[tuple[float, str]], str, float]:
    """Run ``cmd`` on a ``cols`` x ``rows`` pty.

    Returns:
        ``(exit_code, snapshots, final_screen, seconds)``: ``snapshots`` is ``[(t, text)]``, the
        screen every ``every`` seconds while it changed (``t`` in seconds since the start).

    Raises:
        subprocess.TimeoutExpired: the command ran past ``timeout`` seconds (it is killed first).
    """
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(cols), "LINES": str(rows)}
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                            start_new_session=True)
    os.close(slave)
    screen = pyte.Screen(cols, rows)
    stream = pyte.ByteStream(screen)
    snapshots: list[tuple[float, str]] = []
    start = next_snap = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if timeout is not None and now - start > timeout:
                proc.kill()
                proc.wait()
                raise subprocess.TimeoutExpired(cmd, timeout)
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the pty
                    data = b""
                if not data:
                    break
                stream.feed(data)
            if not ready and now >= next_snap:  # a quiet moment: not in the middle of a redraw
                text = _screen_text(screen)
                if text and (not snapshots or snapshots[-1][1] != text):
                    snapshots.append((now - start, text))
                next_snap = now + every
    finally:
        os.close(master)
    code = proc.wait()
    return (128 - code if code < 0 else code), snapshots, _screen_text(screen), time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="text file to write")
    parser.add_argument("--cols", type=int, default=150)
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between snapshots")
    parser.add_argument("--keep", type=int, default=3, help="snapshots written besides the last screen")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("give the command after --")
    code, snapshots, final, seconds = capture(cmd, cols=args.cols, rows=args.rows, every=args.every,
                                              timeout=args.timeout)
    rule = "-" * args.cols
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.write(f"$ {' '.join(cmd)}\n# exit {code}, {seconds:.1f} s, a {args.cols}x{args.rows} pty\n")
        for t, text in snapshots[-args.keep - 1:-1] if len(snapshots) > 1 else []:
            fh.write(f"{rule}\n# screen at {t:.1f} s\n{rule}\n{text}\n")
        fh.write(f"{rule}\n# last screen\n{rule}\n{final}\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
