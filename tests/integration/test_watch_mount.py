"""yeastarfs watch against real mounts: latency from NewCdr and from a CDR poll, exactly-once
across a SIGKILL, retries and reported failures, --cached with --prefetch new, --link-into seen
by inotifywait, SIGTERM's grace, and a real speech recognizer fed through the mount."""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

import pytest

from harness import download_requests, holds_for, sha256_of, wait_until, yeastarfs_command
from yeastarfs.app.tools import CALL_COLUMNS

pytestmark = pytest.mark.fuse

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
POLL_S = 2.0  # the mount's --poll-interval where a test relies on the CDR poll
STOP_TIMEOUT_S = 20.0


class WatchProcess:
    """One ``yeastarfs watch`` in a subprocess (its own session); its stdout lines, with the
    time each arrived and what *on_line* said at that moment, are gathered by a thread."""

    def __init__(self, args: list, stderr_path, on_line: Optional[Callable[[str], object]] = None) -> None:
        self.stderr_path = str(stderr_path)
        self._stderr = open(self.stderr_path, "ab")
        self.process = subprocess.Popen(yeastarfs_command("watch", *map(str, args)), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                        start_new_session=True)
        self.lines: list[tuple[float, str, object]] = []
        self._on_line = on_line or (lambda line: None)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            probe = self._on_line(line.rstrip("\n"))  # e.g. "is the file cached now?"
            self.lines.append((time.monotonic(), line.rstrip("\n"), probe))

    def texts(self) -> list[str]:
        return [text for _, text, _ in self.lines]

    def rows(self) -> list[dict]:
        return [json.loads(text) for text in self.texts()]

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def wait_following(self) -> None:
        """Until the watch has read where the index ends (it says so on stderr)."""
        wait_until(lambda: "watch: following" in self.stderr() or self.process.poll() is not None, 30,
                   message="the watch to start")
        assert self.process.poll() is None, self.stderr()

    def line_time(self, needle: str, timeout_s: float) -> float:
        """When the first line containing *needle* arrived (waiting up to *timeout_s*)."""
        found = wait_until(lambda: [at for at, text, _ in self.lines if needle in text], timeout_s,
                           message=lambda: f"a line with {needle}; stderr:\n{self.stderr()}")
        return found[0]

    def wait(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        code = self.process.wait(timeout=timeout_s)
        self._reader.join(5)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self._stderr.close()


@pytest.fixture
def watch(tmp_path):
    """watch(*args, on_line=None) starts ``yeastarfs watch``; all are killed at the end."""
    started: list[WatchProcess] = []

    def start(*args, on_line=None) -> WatchProcess:
        process = WatchProcess(list(args), tmp_path / f"watch{len(started)}.err", on_line)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def recent(pbx, seconds_ago: float = 180, **kwargs):
    return pbx.add_recording(start=dt.datetime.now() - dt.timedelta(seconds=seconds_ago),
                             duration_s=kwargs.pop("duration_s", 5), **kwargs)


def lines_of(path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().split()
    except FileNotFoundError:
        return []


@pytest.mark.families
def test_follow_json_prints_an_event_within_a_second_and_a_polled_one_within_a_poll(pbx, mounted, watch):
    pbx.populate(2, days=1)
    mount = mounted("--poll-interval", str(POLL_S))
    watcher = watch(mount.mountpoint, "--follow", "--format", "json")
    other = watch(mount.mountpoint, "--follow")  # watchers do not get in each other's way
    watcher.wait_following()
    other.wait_following()
    announced = recent(pbx, announce=True)
    sent = time.monotonic()
    assert watcher.line_time(announced.name, 5) - sent < 1.0
    polled = recent(pbx, seconds_ago=120, announce=False)  # no event: only the CDR poll finds it
    added = time.monotonic()
    # The poll comes within POLL_S; the watch adds at most its own promise (a second) to it.
    assert watcher.line_time(polled.name, POLL_S + 5) - added < POLL_S + 1.0
    holds_for(lambda: len(watcher.lines) == 2, POLL_S + 0.5, message="nothing else (no repeats after a poll)")
    first, second = watcher.rows()
    assert set(first) == set(CALL_COLUMNS) | {"cursor"} and second["cursor"] > first["cursor"]
    assert (first["recording"], second["recording"]) == (announced.name, polled.name)
    assert first["caller"] == announced.callfrom and first["talk_seconds"] == announced.talk_s
    assert first["path"] == mount.recording_path(announced.name) and os.path.isfile(first["path"])
    assert other.texts() == [first["path"], second["path"]]


RUN_ONCE = """#!/bin/sh
echo "$YEASTAR_RECORDING" >> "{log}.started"
sleep 3
echo "$YEASTAR_RECORDING" >> "{log}"
"""


def script(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def test_sigkill_mid_command_then_restart_processes_each_recording_exactly_once(pbx, mounted, watch, tmp_path):
    pbx.populate(1, days=1)
    mount = mounted("--poll-interval", "3600")
    log = tmp_path / "done.log"
    command = script(tmp_path, "run-once", RUN_ONCE.format(log=log))
    args = (mount.mountpoint, "--follow", "--state", tmp_path / "state.json", "--jobs", "2", "--exec", command)
    first = watch(*args)
    first.wait_following()
    before = [recent(pbx, seconds_ago=300 - i, announce=True) for i in range(3)]
    wait_until(lambda: len(lines_of(f"{log}.started")) == 2, 10, message="two commands running")
    first.process.send_signal(signal.SIGKILL)
    first.wait()
    during = [recent(pbx, seconds_ago=200 - i, announce=True) for i in range(2)]
    wait_until(lambda: all(os.path.exists(mount.recording_path(rec.name)) for rec in during), 10,
               message="the recordings added while watch was down")
    second = watch(*args)
    names = sorted(rec.name for rec in before + during)
    wait_until(lambda: sorted(lines_of(log)) == names, 30, message=lambda: f"every recording done once: "
               f"{lines_of(log)}\n{second.stderr()}")
    # Long enough for a command that outlived the first watch to finish a second time.
    holds_for(lambda: sorted(lines_of(log)) == names, 3.5, message="each recording done exactly once")
    started = lines_of(f"{log}.started")
    assert sorted(set(started)) == names and len(started) == len(names) + 2  # the 2 killed ran again


FLAKY = """#!/bin/sh
tries="{log}.$YEASTAR_RECORDING"
echo x >> "$tries"
if [ "$YEASTAR_CALLER" = 666 ]; then exit 7; fi
if [ "$YEASTAR_CALLER" = 13 ] && [ "$(wc -l < "$tries")" -eq 1 ]; then exit 1; fi
echo "$YEASTAR_RECORDING" >> "{log}"
"""


def test_exec_retries_then_succeeds_and_reports_what_keeps_failing(pbx, mounted, watch, tmp_path):
    ok = recent(pbx, seconds_ago=600, announce=False)
    flaky = recent(pbx, seconds_ago=500, callfrom="13", announce=False)
    broken = recent(pbx, seconds_ago=400, callfrom="666", announce=False)
    last = recent(pbx, seconds_ago=300, announce=False)
    mount = mounted("--poll-interval", "3600")
    log = tmp_path / "done.log"
    command = script(tmp_path, "flaky", FLAKY.format(log=log))
    run = watch(mount.mountpoint, "--since", "1h", "--format", "json", "--retries", "2", "--exec", command)
    assert run.wait(30) == 1
    assert sorted(lines_of(log)) == sorted([ok.name, flaky.name, last.name])
    assert len(lines_of(f"{log}.{flaky.name}")) == 2 and len(lines_of(f"{log}.{broken.name}")) == 3
    rows = {row["recording"]: row for row in run.rows()}
    assert set(rows) == {ok.name, flaky.name, broken.name, last.name}
    assert rows[broken.name]["error"] == "exit status 7 (after 3 attempts)"
    assert "error" not in rows[flaky.name] and "error" not in rows[last.name]
    assert f"{broken.name}: failed: exit status 7" in run.stderr()


def test_cached_waits_for_the_whole_file_and_then_costs_no_pbx_request(pbx, mounted, watch):
    pbx.populate(1, days=1)
    mount = mounted("--prefetch", "new", "--poll-interval", "3600")
    watcher = watch(mount.mountpoint, "--follow", "--cached",
                    on_line=lambda line: os.path.exists(mount.cache_file(os.path.basename(line))))
    watcher.wait_following()
    pbx.bandwidth_bps = 400_000
    rec = recent(pbx, duration_s=60, announce=True)  # 960 kB: about 2.4 s to download
    path = mount.recording_path(rec.name)
    indexed = wait_until(lambda: os.path.exists(path) and time.monotonic(), 5, message="the recording listed")
    printed = watcher.line_time(rec.name, 30)
    [(_, line, cached_then)] = watcher.lines
    assert line == path and cached_then, "printed before the cache held the whole file"
    assert printed - indexed > 1.0  # it did wait for the download
    pbx.reset()
    assert sha256_of(path) == rec.sha256
    assert download_requests(pbx) == (0, 0)


def test_link_into_is_seen_by_inotifywait_and_reads_the_recording(pbx, mounted, watch, tmp_path, require):
    inotifywait = shutil.which("inotifywait")
    require(inotifywait, "inotifywait is not installed (scripts/setup installs inotify-tools)")
    pbx.populate(1, days=1)
    mount = mounted("--poll-interval", "3600")
    folder = tmp_path / "incoming"
    folder.mkdir()
    events_path = tmp_path / "events"
    with open(events_path, "w") as events_out, open(tmp_path / "inotify.err", "w") as events_err:
        listener = subprocess.Popen([inotifywait, "-m", "-e", "moved_to,create,close_write", "--format", "%e %f",
                                     str(folder)], stdout=events_out, stderr=events_err)
    try:
        wait_until(lambda: "Watches established" in (tmp_path / "inotify.err").read_text(), 10,
                   message="inotifywait ready")
        watcher = watch(mount.mountpoint, "--follow", "--link-into", folder)
        watcher.wait_following()
        recordings = [recent(pbx, seconds_ago=200 - i, announce=True) for i in range(2)]
        # The hidden folder where links are made is created when watch starts, then one
        # IN_MOVED_TO per recording, for a complete link; never a CLOSE_WRITE. (Two events
        # pushed at once may reach the index, and so the folder, in either order.)
        expected = ["CREATE,ISDIR .yeastarfs-watch-tmp"] + sorted(f"MOVED_TO {rec.name}" for rec in recordings)
        wait_until(lambda: sorted(events_path.read_text().splitlines()) == expected, 10,
                   message=lambda: f"inotify events {expected}, got {events_path.read_text()!r}")
        holds_for(lambda: len(events_path.read_text().splitlines()) == 3, 0.5, message="no further event")
    finally:
        listener.terminate()
        listener.wait(10)
    for rec in recordings:
        assert os.readlink(folder / rec.name) == mount.recording_path(rec.name)
        assert sha256_of(folder / rec.name) == rec.sha256


SLOW = """#!/bin/sh
echo "$YEASTAR_CURSOR" >> "{log}.started"
sleep {seconds}
echo "$YEASTAR_CURSOR" >> "{log}"
"""


def test_sigterm_lets_running_commands_finish_within_the_grace(pbx, mounted, watch, tmp_path):
    pbx.populate(1, days=1)
    mount = mounted("--poll-interval", "3600")
    log = tmp_path / "done.log"
    command = script(tmp_path, "slow", SLOW.format(log=log, seconds=1.5))
    watcher = watch(mount.mountpoint, "--follow", "--state", tmp_path / "state.json", "--grace", "20s",
                    "--exec", command)
    watcher.wait_following()
    recent(pbx, announce=True)
    wait_until(lambda: lines_of(f"{log}.started"), 10, message="the command started")
    signalled = time.monotonic()
    watcher.process.send_signal(signal.SIGTERM)
    assert watcher.wait() == 0  # a clean stop: every running command finished
    assert lines_of(log) == lines_of(f"{log}.started") and time.monotonic() - signalled < 20
    assert json.load(open(tmp_path / "state.json"))["cursor"] == int(lines_of(log)[0])


def test_sigterm_kills_commands_after_the_grace_and_marks_nothing_done(pbx, mounted, watch, tmp_path):
    pbx.populate(1, days=1)
    mount = mounted("--poll-interval", "3600")
    log = tmp_path / "done.log"
    state = tmp_path / "state.json"
    watcher = watch(mount.mountpoint, "--follow", "--state", state, "--grace", "1s",
                    "--exec", script(tmp_path, "slow", SLOW.format(log=log, seconds=60)))
    watcher.wait_following()
    rec = recent(pbx, announce=True)
    wait_until(lambda: lines_of(f"{log}.started"), 10, message="the command started")
    signalled = time.monotonic()
    watcher.process.send_signal(signal.SIGTERM)
    assert watcher.wait() == 128 + signal.SIGTERM and time.monotonic() - signalled < 10
    assert "killed" in watcher.stderr() and lines_of(log) == []
    again = watch(mount.mountpoint, "--state", state, "--exec", "true")  # the next start runs it
    assert again.wait(30) == 0 and again.texts() == [mount.recording_path(rec.name)]


# -- a real transcriber ----------------------------------------------------------------------

SENTENCE = "please call me back tomorrow morning about the order"


def transcriber_script(tmp_path) -> str:
    """The README's transcribe.py, exactly as documented."""
    with open(README, encoding="utf-8") as handle:
        match = re.search(r"<!-- transcribe\.py:[^\n]*-->\n```python\n(.*?)```", handle.read(), re.S)
    assert match, "README lost its transcribe.py"
    return script(tmp_path, "transcribe.py", match.group(1))


def phone_audio(tmp_path, text: str) -> bytes:
    """*text* spoken by espeak-ng, as a PBX stores a call: 8 kHz, 16-bit, mono, plain WAV header."""
    spoken, stored = tmp_path / "spoken.wav", tmp_path / "stored.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "130", "-w", str(spoken), text], check=True, timeout=60)
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(spoken), "-ar", "8000", "-ac", "1",
                    "-c:a", "pcm_s16le", "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:a", "+bitexact",
                    str(stored)], check=True, timeout=60)
    return stored.read_bytes()


def test_a_real_transcriber_fed_by_watch_hears_what_the_pbx_recorded(pbx, mounted, watch, tmp_path, require):
    require(shutil.which("espeak-ng"), "espeak-ng is not installed (scripts/setup installs it)")
    require(shutil.which("ffmpeg"), "ffmpeg is not installed (scripts/setup installs it)")
    require(importlib.util.find_spec("pocketsphinx"), "pocketsphinx is not installed (the test extra has it)")
    audio = phone_audio(tmp_path, SENTENCE)
    assert audio[:4] == b"RIFF" and int.from_bytes(audio[24:28], "little") == 8000
    transcribe = transcriber_script(tmp_path)
    pbx.populate(1, days=1)
    mount = mounted("--poll-interval", "3600")
    transcripts = tmp_path / "transcripts"
    transcripts.mkdir()
    watcher = watch(mount.mountpoint, "--follow", "--exec", sys.executable, transcribe, transcripts)
    watcher.wait_following()
    rec = recent(pbx, duration_s=len(audio) / 16_000, audio=audio, announce=True)
    through_mount = transcripts / f"{rec.name}.txt"
    wait_until(through_mount.exists, 60, message=lambda: f"the transcript; stderr:\n{watcher.stderr()}")
    # The same script on the bytes the simulator holds, read on its side.
    original = tmp_path / "original" / rec.name
    original.parent.mkdir()
    original.write_bytes(pbx.recording_bytes(rec.name))
    reference = tmp_path / "reference"
    reference.mkdir()
    subprocess.run([sys.executable, transcribe, str(reference), str(original)], check=True, timeout=120,
                   capture_output=True)
    heard = through_mount.read_text()
    assert heard.strip(), "the recognizer heard nothing"
    assert heard == (reference / f"{rec.name}.txt").read_text()
    assert hashlib.sha256(audio).hexdigest() == rec.sha256 == sha256_of(mount.recording_path(rec.name))
    assert watcher.texts() == [mount.recording_path(rec.name)]


def test_a_closed_pipe_ends_the_watch_quietly_with_status_0(pbx, mounted, tmp_path):
    pbx.populate(1500, days=2)  # more lines than a pipe holds, so watch meets the closed end
    mount = mounted("--poll-interval", "3600")
    wait_until(lambda: json.loads(os.getxattr(mount.mountpoint, "user.yeastarfs.status"))["recordings_indexed"]
               == 1500, 30, message="the backfill")
    command = " ".join(map(shlex.quote, yeastarfs_command("watch", mount.mountpoint, "--since", "3d")))
    result = subprocess.run(["bash", "-c", f'{command} 2>"$1" | head -1; echo "${{PIPESTATUS[0]}}"', "bash",
                             str(tmp_path / "err")], capture_output=True, text=True, timeout=60)
    first, status = result.stdout.splitlines()
    assert first.startswith(mount.mountpoint + "/") and status == "0"
    assert (tmp_path / "err").read_text() == ""
