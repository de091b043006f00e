"""prefetch's progress (tqdm): a redrawn bar on a terminal, plain periodic lines anywhere else.

prefetch reads through any folder; a plain one stands in for a mount here (its files have no
cache xattr, so every file is read)."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import termios
import time

import pytest

from harness import yeastarfs_command
from yeastarfs.app import tools

FILE_BYTES = 3_000_000
LINE = re.compile(r"^prefetch: [\d.]+[kMG]?B of ~[\d.]+[kMG]?B \(\d+%\), .*B/s, ETA \S+(, \d+/\d+ files)?$")


@pytest.fixture
def folder(tmp_path):
    for i in range(3):
        (tmp_path / f"2026112{i}093012-1.{i}-1001-2002-Inbound.wav").write_bytes(os.urandom(FILE_BYTES))
    return tmp_path


def run_on_pty(argv: list[str], columns: int) -> tuple[int, str]:
    """Run *argv* with its stdout and stderr on a new pseudo-terminal *columns* wide (0: unsized)."""
    master, slave = pty.openpty()
    if columns:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    return process.wait(timeout=60), output.decode()


@pytest.mark.parametrize("columns", [100, 0])
def test_a_terminal_gets_a_bar_with_rate_and_eta(folder, columns):
    code, output = run_on_pty(yeastarfs_command("prefetch", str(folder)), columns)
    assert code == 0, output
    frames = [frame for frame in output.split("\r") if "%|" in frame]
    assert frames, output  # redrawn in place (carriage returns), with a bar
    last = frames[-1]
    assert "100%|" in last and "9.00M/9.00M" in last and "B/s" in last and "3/3 files" in last
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", last)  # elapsed<ETA
    assert "prefetch: 3 fetched, 0 already cached, 0 failed" in output


def test_a_log_gets_plain_lines_and_the_summary(folder):
    result = subprocess.run(yeastarfs_command("prefetch", str(folder)), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("prefetch: 3 fetched, 0 already cached, 0 failed, 8.6 MiB in ")
    assert lines[:-1] and all(LINE.match(line) for line in lines[:-1]), lines


def test_plain_lines_come_every_interval(monkeypatch):
    monkeypatch.setattr(tools, "PLAIN_INTERVAL_S", 0.2)
    log = io.StringIO()
    progress = tools.Progress(total_bytes=30_000, files=3, stream=log)
    started = time.monotonic()
    while time.monotonic() - started < 1.2:
        progress.add(1000)
        time.sleep(0.05)
    progress.file_done(True)
    progress.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert all(LINE.match(line) for line in lines), lines
    # The first line at once, then one per interval (1.2 s / 0.2 s), and the final state.
    assert 4 <= len(lines) <= 9, lines
    assert lines[-1].endswith("1/3 files")


def test_messages_and_a_total_that_was_an_estimate():
    log = io.StringIO()
    progress = tools.Progress(total_bytes=1000, files=1, stream=log)
    progress.message("prefetch: x.wav: Input/output error")
    progress.add(1500)  # the exact size turned out larger than the estimate
    progress.close()
    lines = log.getvalue().splitlines()
    assert "prefetch: x.wav: Input/output error" in lines
    assert "(100%)" in lines[-1] and "1.50kB of ~1.50kB" in lines[-1]

