"""``yeastarfs watch``: every recording a running mount learns of, delivered once, as a line,
a symlink or a command.

Owns:

- the watch loop: read the mount's index (read-only) for recordings discovered after the
  cursor, wait for the cache when asked (``--cached``), deliver each one (a line on stdout,
  a symlink in ``--link-into``, a command from ``--exec``), retry failed commands with
  backoff, and stop cleanly on SIGINT/SIGTERM;
- the cursor (`Cursor`): the index's ``seq``, the order in which the mount discovered its
  recordings. Every seq at or below ``low`` is settled; ``done`` holds the seqs above it that
  finished early (commands end out of order); ``failed`` those given up on, which run again
  at the next start. A recording discovered late (a CDR poll, a resync) gets a later seq
  even when its call is older, so it is still delivered, once;
- the ``--state`` file (`StateFile`): the cursor as JSON, replaced atomically (temp file,
  fsync, rename) and locked against a second watch using it.

Leaves to others: discovering recordings (the mount's discovery writes them to its index),
whether a recording is cached (asked through the mount's ``user.yeastarfs.cached``
attribute, never by reading the cache folder), finding and checking the mount and its index
(`tools.open_mount_index`), and the CDR columns of a JSON line (`tools._call_row`, the same
as ``calls``).

Guarantees: a recording is settled only when its line was written, its link made and its
command exited 0; it is settled in the state file at the end of the loop turn that settled
it. A restart resumes from the state file: nothing settled runs again, nothing unsettled is
lost. A SIGKILL of watch between a command's success and the next save (milliseconds) runs
that command again: at-least-once is the promise for commands; exactly-once holds for every
success that reached the state file. A command does not outlive a SIGKILLed watch (it gets
SIGKILL too, through PR_SET_PDEATHSIG; processes it started itself are not covered).

Threading contract: one thread, no locks. Commands are child processes, each in its own
session (process group, so a terminal's Ctrl-C reaches only watch, and a kill reaches the
whole command); the loop reaps them. Signal handlers only set flags; SIGCHLD, SIGINT and
SIGTERM also wake the loop's select through ``signal.set_wakeup_fd``, so a finished command
or a stop request is seen at once. `run` must be called from the main thread.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import datetime as dt
import errno
import fcntl
import heapq
import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Callable, Optional, TextIO

# _call_row: a JSON line has exactly the columns of `calls` (and their time format).
from yeastarfs.app.tools import CACHED_XATTR, MOUNT_FSTYPE, _call_row, mount_fstype, open_mount_index
from yeastarfs.errors import ConfigError
from yeastarfs.models import Recording

# A NewCdr reaches the index within milliseconds; polling it 5 times a second (one indexed
# query, tens of microseconds) keeps a line well under a second behind the event.
POLL_INTERVAL_S = 0.2
# Recordings read from the index per query, and the most queued for delivery at once: a
# backlog of a million goes through in pages while memory stays flat.
PAGE_ROWS = 1000
MAX_QUEUED_JOBS = 10 * PAGE_ROWS
# --cached asks the mount about this many waiting recordings per loop turn at most (a
# thousand getxattr calls a second), the longest waiting first.
CACHED_CHECKS_PER_TURN = 200
# Failed commands wait 1, 2, 4... s before the next attempt (a CRM that is down for a moment
# gets time to come back), never more than 5 minutes.
RETRY_BASE_S = 1.0
RETRY_MAX_S = 300.0
# A run through a backlog reports how far it got this often (stderr).
PROGRESS_INTERVAL_S = 5.0
# Is the mount still there? Reading /proc/self/mountinfo this often costs nothing.
MOUNT_CHECK_INTERVAL_S = 5.0
STATE_VERSION = 1
# Links are made here, then renamed into --link-into DIR: a folder watcher on DIR sees one
# IN_MOVED_TO of a complete link, never a half-made one or a temporary name.
LINK_TMP_DIR = ".yeastarfs-watch-tmp"
PR_SET_PDEATHSIG = 1


@dataclasses.dataclass
class WatchOptions:
    """What ``yeastarfs watch`` was asked to do (cli.py builds it from the arguments)."""

    follow: bool = False
    output_format: str = "paths"       # "paths" or "json"
    since_s: Optional[float] = None    # start with the calls of the last since_s seconds
    cached: bool = False               # deliver only once fully cached
    state_path: Optional[str] = None
    link_dir: Optional[str] = None
    command: Optional[list[str]] = None
    shell: bool = False
    jobs: int = 1
    retries: int = 3
    grace_s: float = 30.0


@dataclasses.dataclass
class Job:
    """One recording on its way: waiting for the cache, ready, running, or due for a retry."""

    seq: int
    recording: Recording
    path: str                          # absolute, in the mount
    attempts: int = 0
    process: Optional[subprocess.Popen] = None

    def __lt__(self, other: "Job") -> bool:  # heaps order jobs by discovery
        return self.seq < other.seq


# -- the cursor ----------------------------------------------------------------------------

class Cursor:
    """Which recordings are settled, by discovery order (seq).

    Attributes:
        low: every seq <= low is settled: done, or given up (in ``failed``).
        done: settled seqs above ``low`` (pruned by `to_json`).
        failed: seqs given up on; they are tried again at the next start.
        last: (seq, name) of the highest seq ever fetched, to recognise the index later.
        position: the highest seq fetched in this run (fetching continues after it).
    """

    def __init__(self, low: int = 0, done=(), failed=(), last: Optional[tuple[int, str]] = None) -> None:
        self.low = low
        self.done = set(done)
        self.failed = set(failed)
        self.last = last
        self.position = low
        self._open: set[int] = set()
        self._open_order: collections.deque[int] = collections.deque()  # seqs taken, ascending

    def take(self, seq: int, name: str) -> bool:
        """Note that *seq* was fetched; True when it still needs delivering."""
        self.position = max(self.position, seq)
        if self.last is None or seq > self.last[0]:
            self.last = (seq, name)
        if seq in self.done or seq in self.failed:  # settled before a restart, or queued apart
            self._advance()
            return False
        self._open.add(seq)
        self._open_order.append(seq)
        return True

    def settle(self, seq: int, ok: bool) -> None:
        """*seq* is done (*ok*) or given up on."""
        self._open.discard(seq)
        if ok:
            self.failed.discard(seq)
            if seq > self.low:
                self.done.add(seq)
        else:
            self.failed.add(seq)
        self._advance()

    def open_count(self) -> int:
        return len(self._open)

    def _advance(self) -> None:
        # Seqs are taken in ascending order, so the lowest open one is the first of
        # _open_order still open; settled ones are dropped from its front as they go.
        while self._open_order and self._open_order[0] not in self._open:
            self._open_order.popleft()
        low = self._open_order[0] - 1 if self._open_order else self.position
        self.low = max(self.low, low)

    def to_json(self) -> dict:
        self.done = {seq for seq in self.done if seq > self.low}
        last = None if self.last is None else {"seq": self.last[0], "name": self.last[1]}
        return {"version": STATE_VERSION, "cursor": self.low, "done": sorted(self.done),
                "failed": sorted(self.failed), "last": last}

    @classmethod
    def from_json(cls, data: dict) -> "Cursor":
        """Raises ValueError or TypeError or KeyError for anything but a state this version wrote."""
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {STATE_VERSION}")
        last = data["last"]
        numbers = [data["cursor"], *data["done"], *data["failed"], *([last["seq"]] if last else [])]
        if not all(isinstance(n, int) and n >= 0 for n in numbers) or (last and not isinstance(last["name"], str)):
            raise ValueError("not a cursor")
        return cls(data["cursor"], data["done"], data["failed"], None if last is None else (last["seq"], last["name"]))


class StateFile:
    """The cursor in a JSON file, replaced atomically; ``FILE.lock`` keeps a second watch off it."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        folder = os.path.dirname(self.path)
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"state file {path}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise ConfigError(f"state file {path} is in use by another yeastarfs watch") from None

    def load(self) -> Optional[Cursor]:
        """The saved cursor; None when there is no file yet. Raises ConfigError for a bad one."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                return Cursor.from_json(json.load(handle))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"state file {self.path} is unusable ({exc}); move it away to start afresh") from None

    def save(self, cursor: Cursor) -> None:
        """Write *cursor* so that a crash at any moment leaves the old file or the new one.

        Raises ConfigError when it cannot (a full disk): progress that is not saved is lost.
        """
        temporary = f"{self.path}.tmp-{os.getpid()}"
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(cursor.to_json(), handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(temporary, self.path)
            folder_fd = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(folder_fd)  # the rename itself survives a power cut
            finally:
                os.close(folder_fd)
        except OSError as exc:
            raise ConfigError(f"state file {self.path}: cannot write: {exc.strerror}") from None

    def close(self) -> None:
        os.close(self._lock_fd)


# -- where a watch starts --------------------------------------------------------------------

def end_of(index) -> tuple[int, Optional[tuple[int, str]]]:
    """(end, last): no recording still on the PBX was discovered after seq *end*; *last* is
    (seq, name) of the one found there, None when the index ends in gone ones or is empty."""
    # Every stored recording has a distinct seq, so the highest is at least count(); only
    # the few seqs lost to rolled-back batches lie between, one or two pages.
    end, last = max(0, index.count() - 1), None
    while True:
        page = index.recordings_after(end, PAGE_ROWS)
        if page:
            end, last = page[-1][0], (page[-1][0], page[-1][1].name)
        if len(page) < PAGE_ROWS:
            return end, last


def first_seq_since(index, start: dt.datetime) -> Optional[int]:
    """The lowest seq among recordings whose call started at or after *start* (naive, PBX local)."""
    seqs = [entry.seq for entry in map(index.get, (rec.name for rec in index.recordings_since(start)))
            if entry is not None and entry.seq is not None]
    return min(seqs) if seqs else None


def check_state_matches(index, cursor: Cursor, state_path: str) -> None:
    """Raises ConfigError when *cursor* was saved against another index (a rebuilt cache):
    its seqs would mean other recordings, and some would be skipped or repeated."""
    if cursor.last is None:
        return
    seq, name = cursor.last
    entry = index.get(name)
    if entry is None or entry.seq != seq:
        raise ConfigError(f"state file {state_path} belongs to another index (recording {seq} was {name}); "
                          "move it away and start with --since to choose where to begin")


# -- the watcher -----------------------------------------------------------------------------

class Watcher:
    """The loop of one ``yeastarfs watch``: fetch, wait for the cache, deliver, retry, save.

    Multithreading: none; see the module docstring.
    """

    def __init__(self, mountpoint: str, index, options: WatchOptions, cursor: Cursor,
                 state: Optional[StateFile] = None, out: TextIO = sys.stdout,
                 since_start: Optional[dt.datetime] = None, horizon_seq: int = 0,
                 zone: Optional[dt.tzinfo] = None, mount_alive: Optional[Callable[[], bool]] = None) -> None:
        self.mountpoint = os.path.abspath(mountpoint)
        self._mount_alive = mount_alive or (lambda: mount_fstype(self.mountpoint) == MOUNT_FSTYPE)
        self.index, self.options, self.cursor, self.state, self.out = index, options, cursor, state, out
        self.zone = zone  # the PBX's, for times with their offset (None: this machine's)
        # --since: recordings up to horizon_seq (the end when watch started) whose calls
        # started before since_start (naive, PBX local) are not wanted; anything discovered
        # later is.
        self._since_start, self._horizon_seq = since_start, horizon_seq
        self._waiting: list[Job] = []                # --cached: not cached yet, in seq order
        self._ready: list[Job] = []                  # heap by seq
        self._retrying: list[tuple[float, Job]] = []  # heap by due time (monotonic)
        self._running: dict[int, Job] = {}           # pid -> job
        self._fetched_all = False
        self._backlog = False                        # the last fetch stopped at MAX_QUEUED_JOBS
        self._next_fetch_s = self._next_mount_check_s = self._last_progress_s = 0.0
        self._stop_signal: Optional[int] = None
        self._stop_deadline_s = 0.0
        self._killed = self._output_closed = self._progress_shown = False
        self._dirty = state is not None  # a first run writes its starting point at once
        self.delivered = self.given_up = 0
        self._libc = ctypes.CDLL(None, use_errno=True) if options.command else None

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        """Watch until done (no --follow), a stop signal or a closed stdout; the exit status."""
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = {number: signal.signal(number, self._on_signal)
                    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)}
        previous_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        try:
            self._requeue_failed()
            if self.options.follow:  # also tells a supervisor (or a test) that the watch is on
                self._note(f"following {self.mountpoint} after cursor {self.cursor.low}")
            while not self._turn():
                self._wait(wake_r)
        finally:
            signal.set_wakeup_fd(previous_fd)
            for number, handler in previous.items():
                signal.signal(number, handler)
            os.close(wake_r)
            os.close(wake_w)
            self._save()
        return self._exit_status()

    def _turn(self) -> bool:
        """One pass of the loop; True when the watch is over."""
        now = time.monotonic()
        stopping = self._stop_signal is not None or self._output_closed
        if not stopping:
            self._check_mount(now)
            if (now >= self._next_fetch_s or self._hungry()) and not self._fetched_all:
                self._next_fetch_s = now + POLL_INTERVAL_S
                self._fetch()
                self._promote_cached()
        self._reap()
        if stopping:
            self._stop_running(now)
        else:
            self._start_due(now)
        self._save()
        self._progress(now)
        if stopping:
            return not self._running
        return not self.options.follow and self._fetched_all and not (self._ready or self._retrying or self._running)

    def _wait(self, wake_r: int) -> None:
        """Sleep until the next fetch or retry is due, or a signal (a command ended) wakes us."""
        timeout_s = 0.0 if self._hungry() else POLL_INTERVAL_S
        if self._retrying:
            timeout_s = min(timeout_s, self._retrying[0][0] - time.monotonic())
        poller = select.poll()  # not select.select: it fails on descriptors over 1,023
        poller.register(wake_r, select.POLLIN)
        poller.poll(max(0.0, timeout_s) * 1000)
        try:
            while os.read(wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _hungry(self) -> bool:
        """A backlog is waiting in the index and the queue has room for it."""
        return self._backlog and len(self._ready) < MAX_QUEUED_JOBS // 2

    def _on_signal(self, number: int, frame) -> None:
        if number == signal.SIGCHLD:
            return  # only here to wake the loop (set_wakeup_fd), which reaps
        if self._stop_signal is not None:
            self._stop_deadline_s = 0.0  # a second Ctrl-C: no more grace
            return
        self._stop_signal = number
        self._stop_deadline_s = time.monotonic() + self.options.grace_s

    def _exit_status(self) -> int:
        if self._output_closed:
            return 0
        if self._stop_signal is not None:
            interrupted = self._killed or not self.options.follow
            return 128 + self._stop_signal if interrupted else 0
        return 1 if self.given_up else 0

    # -- fetching ----------------------------------------------------------------------------

    def _fetch(self) -> None:
        """Take the recordings discovered after the cursor's position, while the queue has room."""
        self._backlog = True
        while len(self._ready) < MAX_QUEUED_JOBS:
            page = self.index.recordings_after(self.cursor.position, PAGE_ROWS)
            for seq, recording, _ in page:
                if self.cursor.take(seq, recording.name):
                    self._queue(Job(seq, recording, self._path_of(recording)))
            if len(page) < PAGE_ROWS:
                self._backlog = False
                self._fetched_all = not self.options.follow
                return

    def _queue(self, job: Job) -> None:
        if self._since_start is not None and job.seq <= self._horizon_seq and job.recording.start < self._since_start:
            self._settle(job, ok=True)  # before --since: not wanted, so done
        elif self.options.cached:
            self._waiting.append(job)
        else:
            heapq.heappush(self._ready, job)

    def _requeue_failed(self) -> None:
        """Recordings given up on in an earlier run are tried again first."""
        for seq in sorted(self.cursor.failed):
            page = self.index.recordings_after(seq - 1, 1)
            if page and page[0][0] == seq:
                self._queue(Job(seq, page[0][1], self._path_of(page[0][1])))
            else:
                self.cursor.failed.discard(seq)  # gone from the PBX meanwhile: nothing left to do
                self._dirty = True

    def _promote_cached(self) -> None:
        """Move waiting recordings that are fully cached now to the ready queue (which delivers
        in seq order); those checked and still waiting go to the back of the line."""
        checked, self._waiting = self._waiting[:CACHED_CHECKS_PER_TURN], self._waiting[CACHED_CHECKS_PER_TURN:]
        still_waiting = []
        for job in checked:
            try:
                cached = os.getxattr(job.path, CACHED_XATTR) == b"1"
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    still_waiting.append(job)
                    continue
                self._note(f"{job.recording.name}: no longer on the PBX and never cached; skipped")
                self._settle(job, ok=True)
                continue
            if cached:
                heapq.heappush(self._ready, job)
            else:
                still_waiting.append(job)
        self._waiting += still_waiting

    def _check_mount(self, now: float) -> None:
        """Raises ConfigError when the mount went away (its index would never move again)."""
        if now < self._next_mount_check_s:
            return
        self._next_mount_check_s = now + MOUNT_CHECK_INTERVAL_S
        if not self._mount_alive():
            raise ConfigError(f"{self.mountpoint} is no longer a yeastarfs mount")

    def _path_of(self, recording: Recording) -> str:
        return os.path.join(self.mountpoint, self.index.path_of(recording.name).lstrip("/"))

    # -- delivering --------------------------------------------------------------------------

    def _start_due(self, now: float) -> None:
        while self._retrying and self._retrying[0][0] <= now:
            heapq.heappush(self._ready, heapq.heappop(self._retrying)[1])
        while self._ready and len(self._running) < self.options.jobs and not self._output_closed:
            self._attempt(heapq.heappop(self._ready))

    def _attempt(self, job: Job) -> None:
        """Link, then run the command (or, without one, write the line now)."""
        job.attempts += 1
        try:
            if self.options.link_dir:
                make_link(self.options.link_dir, job.recording.name, job.path)
            if not self.options.command:
                self._succeeded(job)
                return
            job.process = self._spawn(job, self._row(job))
        except OSError as exc:
            self._attempt_failed(job, exc.strerror or str(exc))
            return
        self._running[job.process.pid] = job

    def _spawn(self, job: Job, row: dict) -> subprocess.Popen:
        command = self.options.command
        if self.options.shell:
            argv = ["/bin/sh", "-c", " ".join(command), "yeastarfs-watch", job.path]  # the path is "$1"
        else:
            argv = [*command, job.path]
        parent_pid = os.getpid()

        def die_with_watch() -> None:  # in the child, between fork and exec
            self._libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent_pid:  # watch died before prctl took effect
                os.kill(os.getpid(), signal.SIGKILL)

        # The command's stdout goes to our stderr: stdout carries only watch's own lines.
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=_stderr_fd(),
                                env={**os.environ, **command_environment(row)},
                                start_new_session=True, preexec_fn=die_with_watch)

    def _reap(self) -> None:
        for pid, job in list(self._running.items()):
            code = job.process.poll()
            if code is None:
                continue
            del self._running[pid]
            if code == 0:
                self._succeeded(job)
            else:
                self._attempt_failed(job, f"exit status {code}" if code > 0 else f"killed by signal {-code}")

    def _succeeded(self, job: Job) -> None:
        # A command's success counts even when its line cannot be written (stdout closed):
        # running it again would repeat what it did. A line that is all there is must be written.
        if self._emit(job) or self.options.command:
            self._settle(job, ok=True)
            self.delivered += 1

    def _attempt_failed(self, job: Job, reason: str) -> None:
        if self._stop_signal is not None or self._output_closed:
            return  # stopping: left unsettled, so the next start runs it again
        if job.attempts <= self.options.retries:
            delay_s = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (job.attempts - 1))
            self._note(f"{job.recording.name}: {reason}; retry {job.attempts} of {self.options.retries} "
                       f"in {delay_s:g} s")
            heapq.heappush(self._retrying, (time.monotonic() + delay_s, job))
            return
        error = f"{reason} (after {job.attempts} attempts)"
        self._note(f"{job.recording.name}: failed: {error}")
        self._emit(job, error)
        self._settle(job, ok=False)
        self.given_up += 1

    def _settle(self, job: Job, ok: bool) -> None:
        self.cursor.settle(job.seq, ok)
        self._dirty = True

    def _emit(self, job: Job, error: Optional[str] = None) -> bool:
        """One line on stdout (failures only in JSON); False if stdout is closed, which stops
        the watch quietly."""
        if self._output_closed:
            return False
        if error and self.options.output_format != "json":
            return True
        if self.options.output_format == "json":
            row = self._row(job)
            if error:
                row["error"] = error
            line = json.dumps(row)
        else:
            line = job.path
        try:
            self.out.write(line + "\n")
            self.out.flush()
        except BrokenPipeError:
            self._output_closed = True
            _quiet(self.out)
            return False
        return True

    def _row(self, job: Job) -> dict:
        """The recording's columns as `calls` shows them (times with the PBX's offset), and its cursor."""
        row = _call_row(self.mountpoint, self.index.path_of(job.recording.name), job.recording, self.zone)
        row["cursor"] = job.seq
        return row

    # -- stopping, saving, reporting ---------------------------------------------------------

    def _stop_running(self, now: float) -> None:
        """Past the grace period, kill what still runs (its whole process group)."""
        if not self._running or now < self._stop_deadline_s:
            return
        for job in self._running.values():
            self._note(f"{job.recording.name}: command still running after the grace period; killed")
            try:
                os.killpg(job.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            job.process.wait()
        self._running.clear()
        self._killed = True

    def _save(self) -> None:
        if self._dirty and self.state is not None:
            self.state.save(self.cursor)
        self._dirty = False

    def _progress(self, now: float) -> None:
        if self.options.follow or now - self._last_progress_s < PROGRESS_INTERVAL_S:
            return
        if self._last_progress_s:
            self._note(f"{self.delivered} done, {self.given_up} failed, {self.cursor.open_count()} to go")
            self._progress_shown = True
        self._last_progress_s = now

    def summary(self) -> Optional[str]:
        """The closing line of a run without --follow, when there is something to say."""
        left = len(self._waiting)
        if not (self._progress_shown or self.given_up or left):
            return None
        text = f"{self.delivered} done, {self.given_up} failed"
        return text + (f", {left} not cached yet (left for the next run)" if left else "")

    @staticmethod
    def _note(text: str) -> None:
        print(f"watch: {text}", file=sys.stderr, flush=True)


# -- pieces ----------------------------------------------------------------------------------

def _stderr_fd() -> Optional[int]:
    """Our stderr's descriptor, for a command's stdout (None: inherit, as under pytest's capture)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _quiet(stream: TextIO) -> None:
    """Point a stream whose reader went away at /dev/null, so the interpreter's final flush
    does not complain about the broken pipe."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def make_link(folder: str, name: str, target: str) -> None:
    """``folder/name`` -> *target*, made under a temporary name in a hidden subfolder and renamed
    into place: a watcher of *folder* sees one IN_MOVED_TO of a complete link. Raises OSError."""
    temporary = os.path.join(folder, LINK_TMP_DIR, f"{name}.{os.getpid()}")
    try:
        os.symlink(target, temporary)
    except FileNotFoundError:  # someone removed the folder `watch` made at its start
        os.makedirs(os.path.dirname(temporary), mode=0o700, exist_ok=True)
        os.symlink(target, temporary)
    except FileExistsError:  # left by a watch of the same pid that died
        os.unlink(temporary)
        os.symlink(target, temporary)
    os.rename(temporary, os.path.join(folder, name))


# YEASTAR_<name> -> the column of a JSON line it carries.
ENVIRONMENT = {"PATH": "path", "RECORDING": "recording", "CALLER": "caller", "CALLEE": "callee",
               "CALLID": "callid", "START_TIME": "start_time", "TYPE": "type", "STATUS": "status",
               "CALL_SECONDS": "call_seconds", "TALK_SECONDS": "talk_seconds", "CURSOR": "cursor"}


def command_environment(row: dict) -> dict[str, str]:
    """A recording's JSON-line columns for its command, as YEASTAR_* variables ("" when unknown)."""
    return {f"YEASTAR_{name}": "" if row[column] is None else str(row[column]) for name, column in ENVIRONMENT.items()}


def starting_cursor(index, state: Optional[StateFile], since_s: Optional[float],
                    zone: Optional[dt.tzinfo] = None) -> tuple[Cursor, Optional[dt.datetime], int]:
    """(cursor, since_start, horizon_seq): where this watch begins.

    A state file wins (its cursor must belong to this index). Without one: the current end
    (only new recordings), or with *since_s* the first recording whose call started within
    that time (up to the end, older calls are skipped; recordings found later are all new).
    *since_start* is that moment as the PBX's wall clock in *zone* shows it.
    """
    cursor = state.load() if state is not None else None
    if cursor is not None:
        check_state_matches(index, cursor, state.path)
        return cursor, None, 0
    end_seq, last = end_of(index)
    if since_s is None:
        return Cursor(end_seq, last=last), None, 0
    since_start = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=since_s)).astimezone(zone)
    since_start = since_start.replace(tzinfo=None)
    first = first_seq_since(index, since_start)
    low = end_seq if first is None else first - 1
    return Cursor(low, last=last), since_start, end_seq


def watch(mountpoint: str, options: WatchOptions, out: TextIO = sys.stdout) -> int:
    """``yeastarfs watch``: the exit status. Raises ConfigError for a bad mount or state file."""
    if options.link_dir:
        options.link_dir = os.path.abspath(options.link_dir)
        # Made now, not with the first link: a watcher of the folder sees it appear (one
        # IN_CREATE|IN_ISDIR, the first time only) before any recording does.
        os.makedirs(os.path.join(options.link_dir, LINK_TMP_DIR), mode=0o700, exist_ok=True)
    index, zone = open_mount_index(mountpoint)
    state = None
    try:
        state = StateFile(options.state_path) if options.state_path else None
        cursor, since_start, horizon_seq = starting_cursor(index, state, options.since_s, zone)
        watcher = Watcher(mountpoint, index, options, cursor, state, out, since_start, horizon_seq, zone)
        status = watcher.run()
        summary = None if options.follow else watcher.summary()
        if summary:
            Watcher._note(summary)
        return status
    finally:
        if state is not None:
            state.close()
        index.close()
