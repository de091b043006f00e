"""Downloads: at most one transfer per recording, streamed into the cache, read while it runs.

``DownloadManager.acquire(name)`` returns the shared ``Download`` of a recording, starting
it if needed; every reader of that recording, on any handle or thread, uses the same one,
because each PBX ``random`` works once and two readers must never each ask for one.
``Download.read(offset, size)`` blocks until exactly those bytes have arrived (never
returning short or zero-filled data before the real end), or fails with the download's
error, or with ``DownloadStalledError`` when nothing arrived for ``stall_timeout_s``.

A download's lifecycle is one `State`; `TRANSITIONS` lists every legal move, `check_move`
refuses any other, and every move is made by `Download._to` under the download's condition:

    QUEUED     waiting for a worker (a reader or a prefetch wants bytes)
    RUNNING    a worker transfers (or waits between attempts); holds a --max-downloads slot
    PARKED     connection open but unread, no worker: TCP flow control stops the PBX
    SUSPENDED  connection closed, bytes kept for a resume with ``Range``
    COMPLETE   committed to the cache                         } ends: the partial file is
    FAILED     the readers got the error                      } deleted (unless COMPLETE) and
    CANCELLED  dropped (nobody came back) or shut down        } the Download leaves the manager

    QUEUED → RUNNING, CANCELLED            RUNNING → PARKED, SUSPENDED, COMPLETE, FAILED, CANCELLED
    PARKED → QUEUED, SUSPENDED, CANCELLED  SUSPENDED → QUEUED, CANCELLED

Policy, in one place (README "How downloads and the cache behave" says the same):

* Flow control. A download may run ahead of the furthest byte any reader asked for by a
  window that starts at ``INITIAL_WINDOW_BYTES`` and grows to twice what was asked, so a
  sequential reader soon gets the full PBX speed, while a file manager that reads 4 KiB
  and closes pulls little more than the window. A reader that seeks to the end opens the
  window to the end.
* Readers leaving. When the last reader closes, a download that has more than half of the
  file, or whose recording was opened again within ``REOPEN_WINDOW_S`` (a thumbnailer's
  32 opens, a player that re-opens), continues to the end and is cached: repeated opens
  cost one download in total. Any other is *parked* for ``REOPEN_LINGER_S`` (a reader that
  comes back at once continues the same transfer, with no new random), then suspended
  (connection closed, bytes kept ``KEEP_SUSPENDED_S`` for a resume at their end) when the
  PBX is known to honour ``Range``, else dropped with its bytes: without ``Range`` a resume
  would make the PBX send them again, so a later open is simply a new transfer and no
  transfer ever restarts from byte 0 while its bytes are held.
* Idle readers. A download paused by flow control for ``PAUSE_SUSPEND_S`` (a player on
  pause, holding the file open) gives back its worker slot: suspended when the PBX honours
  ``Range``, else parked with its connection open; the reader's next read resumes it.
  So the ``max_downloads`` slots limit *active* transfers only.
* Range. Whether the PBX honours ``Range`` is learned from the first reply to a request
  that asked for it (206 at that offset: yes; 200 from byte 0: no), reported through
  ``on_range`` (the core keeps it in the index) and can be given at start.
* Failures. A reset, truncated body, JSON ``Failed`` or HTTP error is retried with a fresh
  random, up to ``MAX_FAILURES`` consecutive failures without progress, with exponential
  backoff. The retry asks for ``Range: bytes=N-``; a 206 is appended, a 200 is re-read from
  the start and the bytes already held are compared, not trusted.
* Not there (yet). "Does not exist" for a recording the caller calls young
  (``not_found_grace_s`` of `acquire`: the PBX may still be writing it) is retried with
  backoff for that long; then, or at once for any other, the readers get
  RecordingNotFoundError and ``on_gone(name)`` is called.
* Sizes. The length a reply announces (Content-Length, or the Content-Range total) is
  believed at once, and reported through ``on_size``, when the file's own RIFF header
  gives the same size or the file has no RIFF header to compare with. When the header
  disagrees (a bogus Content-Length, or a bogus header), it is believed only once a body
  ended cleanly at exactly that length. Until a size is believed, reads wait for their
  bytes as if the file were long. A download is complete only when the bytes equal the
  believed length; then it is committed to the cache (cache.py says in which order).
* Load. At most ``max_downloads`` transfers run at once; reader-driven ones go before
  prefetches (a priority queue).

This module knows nothing of paths, FUSE or PBX families; it gets the PBX's
``open_stream`` and the cache passed in. The bytes live in the cache's `PartialFile`.

Threading and lock order: ``DownloadManager._lock`` (the name -> Download map) before
``Download._cond`` before the cache's locks. No lock is held during network I/O or disk
reads; readers wait on ``Download._cond`` without holding anything else. A download's
transfer (its stream and partial file) belongs to its worker while RUNNING and to whoever
moves it out of PARKED or SUSPENDED (under ``_cond``) otherwise.
"""

from __future__ import annotations

import collections
import enum
import itertools
import logging
import queue
import threading
import time
from typing import Callable, Optional

from yeastarfs import errors
from yeastarfs.cache import RIFF_HEADER_BYTES, riff_size

log = logging.getLogger(__name__)

# A file manager sniffing a file reads a few KiB; 128 KiB covers the header of any audio
# format and one kernel read-ahead, and keeps what an abandoned open pulls small.
INITIAL_WINDOW_BYTES = 128 * 1024
# At most this much per socket read of a download (the stream's own limit applies too).
READ_MAX_BYTES = 1 << 20
# After the last reader leaves, keep the connection this long for one who comes right back
# (a thumbnailer reopens within milliseconds). Short: meanwhile the PBX fills the network
# buffers (at its link speed), which a sniffer that never returns would waste.
REOPEN_LINGER_S = 0.1
# A recording opened again within this long is fetched to the end once its readers leave.
REOPEN_WINDOW_S = 30.0
# Names remembered for REOPEN_WINDOW_S (bounded: a walk opens every file).
RECENT_OPENS_MAX = 10_000
# Keep the bytes of a suspended download this long for a reader to come back.
KEEP_SUSPENDED_S = 30.0
# A download paused this long by flow control gives back its worker slot.
PAUSE_SUSPEND_S = 5.0
# The janitor (parked and suspended downloads nobody came back to) wakes at their deadlines
# and at least this often.
JANITOR_INTERVAL_S = 1.0
# Keep downloading after the last reader left when at least this share has arrived.
FINISH_SHARE = 0.5
# Consecutive failed attempts (each with a fresh random) before readers get EIO.
MAX_FAILURES = 4
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 8.0
# Retries of "does not exist" for a young recording: after 0.5 s, then every second.
NOT_FOUND_BACKOFF_S = 0.5
NOT_FOUND_BACKOFF_MAX_S = 1.0
# Priorities in the worker queue: lower goes first.
PRIORITY_READER = 0
PRIORITY_PREFETCH = 1


class State(enum.Enum):
    """Where a download is in its lifecycle (module docstring)."""

    QUEUED = "queued"
    RUNNING = "running"
    PARKED = "parked"
    SUSPENDED = "suspended"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.RUNNING, State.CANCELLED}),
    State.RUNNING: frozenset({State.PARKED, State.SUSPENDED, State.COMPLETE, State.FAILED, State.CANCELLED}),
    State.PARKED: frozenset({State.QUEUED, State.SUSPENDED, State.CANCELLED}),
    State.SUSPENDED: frozenset({State.QUEUED, State.CANCELLED}),
    State.COMPLETE: frozenset(),
    State.FAILED: frozenset(),
    State.CANCELLED: frozenset(),
}
IDLE_STATES = frozenset({State.PARKED, State.SUSPENDED})
END_STATES = frozenset({State.COMPLETE, State.FAILED, State.CANCELLED})


def check_move(name: str, old: State, new: State) -> None:
    """Raise RuntimeError unless `TRANSITIONS` allows *old* → *new* (a refused move is a bug)."""
    if new not in TRANSITIONS[old]:
        raise RuntimeError(f"recording {name}: download cannot go from {old.value} to {new.value}")


class _Cancelled(Exception):
    """Internal: the download was cancelled (shutdown)."""


class _Idle(Exception):
    """Internal: nobody needs more bytes now; give back the worker slot."""


class Download:
    """One recording's transfer into a partial cache file, shared by all its readers.

    Attributes (read under ``_cond``):
        name: the recording name.
        state: the `State`.
        received_bytes: bytes present in the partial file, contiguous from offset 0.
        total_bytes: the recording's size once believed (module docstring, "Sizes"), else None.
        error: the exception readers get when their bytes will never arrive.
        handles: open reader handles.
        opens: how many times it was acquired.

    Multithreading: one ``threading.Condition``; the worker notifies it after every chunk.
    """

    def __init__(self, manager: "DownloadManager", name: str, *, keep_going: bool = False,
                 reopened: bool = False, not_found_grace_s: float = 0.0) -> None:
        self.name = name
        self._manager = manager
        self._cond = threading.Condition()
        self.state = State.QUEUED
        self.received_bytes = 0
        self.total_bytes: Optional[int] = None
        self.error: Optional[BaseException] = None
        self.handles = 0
        self.opens = 0
        self._keep_going = keep_going      # finish regardless of readers (prefetch, reopened, most read)
        self._reopened = reopened
        self._want_bytes = 0               # furthest byte end any reader asked for
        self._progress_time = time.monotonic()
        self._idle_since = 0.0
        self._paused_since: Optional[float] = None
        self._cancel_reason = ""
        # The transfer: owned by the worker while RUNNING (module docstring, "Threading").
        self._partial = None               # cache.PartialFile, created by the first run
        self._stream = None                # the open pbx.RecordingStream, kept while PARKED
        self._chunks = None                # its chunks() iterator
        self._pending: Optional[bytes] = None   # a chunk received but not yet written (parked before it)
        self._announced: Optional[int] = None
        self._believed: Optional[bool] = None
        self._skip_bytes = 0
        self._failures = 0
        self._not_found_grace_s = not_found_grace_s
        self._not_found_since: Optional[float] = None
        self._not_found_tries = 0

    # -- the lifecycle -----------------------------------------------------------------------

    def _to(self, new: State) -> None:
        """Move to *new* (the caller holds ``_cond``); see `check_move`."""
        check_move(self.name, self.state, new)
        if new in IDLE_STATES and self.state not in IDLE_STATES:
            self._idle_since = time.monotonic()
        self.state = new
        self._cond.notify_all()

    @property
    def done(self) -> bool:
        return self.state in END_STATES

    @property
    def complete(self) -> bool:
        return self.state is State.COMPLETE

    @property
    def cancelled(self) -> bool:
        return self.state is State.CANCELLED

    @property
    def suspended(self) -> bool:
        return self.state is State.SUSPENDED

    @property
    def parked(self) -> bool:
        return self.state is State.PARKED

    # -- reader side -------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Return the bytes at [offset, offset+size), waiting for them to arrive.

        Shorter only at the real end of the recording. Raises the download's error,
        DownloadStalledError after ``stall_timeout_s`` without progress, or CacheError.
        """
        end = offset + size
        stall_s = self._manager.stall_timeout_s
        with self._cond:
            self._want_locked(end)
            waited_since = time.monotonic()
            while not self._readable_locked(offset, end):
                if self.error is not None:
                    raise self.error
                if self.state in IDLE_STATES:
                    self._resume_locked()
                quiet_s = time.monotonic() - max(self._progress_time, waited_since)
                if quiet_s >= stall_s:
                    raise errors.DownloadStalledError(
                        f"recording {self.name}: no data from the PBX for {stall_s:.0f} s")
                self._cond.wait(min(1.0, stall_s - quiet_s))
            available = self.received_bytes
            partial = self._partial
        if partial is None or offset >= available:
            return b""
        return partial.pread(min(end, available) - offset, offset)

    def _readable_locked(self, offset: int, end: int) -> bool:
        if self.state is State.COMPLETE:
            return True
        if self.total_bytes is not None and end >= self.total_bytes:
            # The last bytes are handed out once the file is committed to the cache: a reader
            # that got to the end can rely on the recording being cached (and in LRU order).
            return False
        return self.received_bytes >= end

    def _want_locked(self, end: int) -> None:
        if end > self._want_bytes:
            self._want_bytes = end
            self._cond.notify_all()

    def _resume_locked(self) -> None:
        """A reader needs bytes an idle download does not hold: queue it again."""
        self._to(State.QUEUED)
        self._progress_time = time.monotonic()
        self._manager.enqueue(self, PRIORITY_READER if self.handles > 0 else PRIORITY_PREFETCH)

    def size_if_known(self) -> Optional[int]:
        with self._cond:
            return self.total_bytes

    def progress(self) -> tuple[int, Optional[int]]:
        with self._cond:
            return self.received_bytes, self.total_bytes

    def snapshot(self) -> dict:
        """What ``status`` shows of this download."""
        with self._cond:
            return {"recording": self.name, "state": self.state.value, "received_bytes": self.received_bytes,
                    "total_bytes": self.total_bytes, "readers": self.handles}

    def wait_for_size(self, timeout_s: float) -> Optional[int]:
        """Wait up to *timeout_s* for the exact size; raise the download's error if it failed
        first (so an open can fail with the real cause), None if still unknown."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.total_bytes is None and self.state not in END_STATES | IDLE_STATES:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    break
                self._cond.wait(remaining_s)
            if self.total_bytes is None and self.error is not None:
                raise self.error
            return self.total_bytes

    # -- the manager's side ------------------------------------------------------------------

    def join(self) -> bool:
        """A reader opens it; False when it ended without the bytes (start a new one)."""
        with self._cond:
            if self.state in (State.FAILED, State.CANCELLED):
                return False
            self.handles += 1
            self.opens += 1
            if self.state in IDLE_STATES:
                self._resume_locked()
            elif self.state is State.QUEUED:
                # A queued prefetch (or a fresh one) is queued at reader priority; the worker runs it once.
                self._manager.enqueue(self, PRIORITY_READER)
            self._cond.notify_all()
            return True

    def wake(self) -> None:
        """Make the worker and the readers look at the state again (the manager is stopping)."""
        with self._cond:
            self._cond.notify_all()

    def leave(self) -> None:
        """A reader closed its handle."""
        with self._cond:
            self.handles -= 1
            self._cond.notify_all()

    def begin(self) -> bool:
        """A worker takes it; False when it is not waiting for one (queued twice, or cancelled)."""
        with self._cond:
            if self.state is not State.QUEUED:
                return False
            self._to(State.RUNNING)
            self._progress_time = time.monotonic()
            return True

    def retirable(self) -> bool:
        """Ended and no reader left: its pin and read descriptor may go."""
        with self._cond:
            return self.state in END_STATES and self.handles == 0

    def close(self) -> None:
        """Let go of the partial file (its reader side and its cache pin); once retirable."""
        if self._partial is not None:
            self._partial.close()

    def idle_deadline(self) -> Optional[float]:
        """When the janitor should look at it again (monotonic), or None."""
        with self._cond:
            if self.state not in IDLE_STATES or self.handles > 0:
                return None
            return self._idle_deadline_locked()

    def _idle_deadline_locked(self) -> float:
        if self.state is State.PARKED:
            return self._idle_since + REOPEN_LINGER_S
        worth_keeping = self._manager.range_honoured is True and self.received_bytes > 0
        return self._idle_since + (KEEP_SUSPENDED_S if worth_keeping else REOPEN_LINGER_S)

    def expire(self, now: float, stopping: bool = False) -> None:
        """Janitor and shutdown: move on a download nobody came back to (module docstring,
        "Readers leaving"); with *stopping*, cancel any that no worker runs."""
        with self._cond:
            if stopping:
                if self.state not in IDLE_STATES and self.state is not State.QUEUED:
                    return
                stream, target = self._take_stream_locked(), State.CANCELLED
                self._cancel_reason = "shutdown"
            else:
                if self.state not in IDLE_STATES or self.handles > 0 or now < self._idle_deadline_locked():
                    return
                keep_bytes = self.state is State.PARKED and self._manager.range_honoured is True
                target = State.SUSPENDED if keep_bytes else State.CANCELLED
                stream = self._take_stream_locked()
                self._cancel_reason = "dropped: no reader came back"
            if target is State.SUSPENDED:
                self._to(State.SUSPENDED)
            else:
                self._end_locked(State.CANCELLED, None)
        _close_stream(stream)
        if target is State.SUSPENDED:
            log.debug("recording %s: suspended at %d bytes", self.name, self.received_bytes)
        else:
            self._after_end(f"cancelled ({self._cancel_reason})", quiet=True)

    # -- worker side -------------------------------------------------------------------------

    def run(self) -> None:
        """Transfer the recording, as the module docstring says (worker thread, RUNNING)."""
        try:
            if self._partial is None:
                self._partial = self._manager.cache.new_partial(self.name)
            self._transfer_with_retries()
            self._finish()
        except _Idle:
            self._go_idle()
        except _Cancelled:
            self._end(State.CANCELLED, None, f"cancelled ({self._cancel_reason})")
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the readers
            if isinstance(exc, errors.RecordingNotFoundError):
                self._manager.recording_gone(self.name)  # before the readers hear of it
            self._end(State.FAILED, _as_pbx_or_cache_error(exc), f"failed: {exc}")

    def _go_idle(self) -> None:
        """Give back the worker slot: park (connection kept) or suspend (connection closed)."""
        with self._cond:
            keep_connection = self._stream is not None and (
                self.handles == 0 or self._manager.range_honoured is not True)
            stream = None if keep_connection else self._take_stream_locked()
            self._paused_since = None
            self._to(State.PARKED if keep_connection else State.SUSPENDED)
            if self.handles > 0 and self._want_bytes > self.received_bytes:
                self._resume_locked()  # a reader asked for more while we were giving up the slot
            state = self.state
        _close_stream(stream)
        self._manager.wake_janitor()
        log.debug("recording %s: %s at %d bytes", self.name, state.value, self.received_bytes)

    def _transfer_with_retries(self) -> None:
        while True:
            self._check_wanted()
            before = self.received_bytes
            try:
                self._attempt()
                return
            except errors.RecordingNotFoundError:
                self._drop_stream()
                delay_s = self._not_found_delay()
                if delay_s is None:
                    raise
                log.info("recording %s: the PBX says it does not exist (yet); asking again in %.1f s",
                         self.name, delay_s)
            except (errors.AuthError, errors.CacheError):
                raise
            except errors.PbxError as exc:
                self._drop_stream()
                self._failures = 1 if self.received_bytes > before else self._failures + 1
                if self._failures >= MAX_FAILURES:
                    raise
                delay_s = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** (self._failures - 1))
                log.info("recording %s: attempt failed at %d bytes (%s); retrying in %.1f s",
                         self.name, self.received_bytes, exc, delay_s)
            self._sleep(delay_s)

    def _not_found_delay(self) -> Optional[float]:
        """The wait before asking again for a recording the PBX does not have (yet); None
        once its grace (`DownloadManager.acquire`) is over."""
        now = time.monotonic()
        if self._not_found_since is None:
            self._not_found_since = now
        left_s = self._not_found_grace_s - (now - self._not_found_since)
        if left_s <= 0:
            return None
        self._not_found_tries += 1
        return min(left_s, NOT_FOUND_BACKOFF_MAX_S, NOT_FOUND_BACKOFF_S * 2 ** (self._not_found_tries - 1))

    def _attempt(self) -> None:
        """Continue the open transfer, or open one (a fresh random) from the bytes held."""
        if self._stream is None:
            self._open_stream()
        while True:
            if self._pending is None:
                self._limit_next_read()
            chunk = self._next_chunk()
            if chunk is None:
                break
            if chunk:
                self._pending = chunk
                allowed = self._wait_for_demand()  # may park: the chunk waits in _pending
                # A socket read may return far more than the window: the rest waits in memory,
                # so a sniffed file holds (and counts against the cache) only what was wanted.
                self._pending = chunk[allowed:] if allowed is not None and allowed < len(chunk) else None
                self._append(chunk if self._pending is None else chunk[:allowed])
            if self._believed is None:
                self._believed = self._header_agrees(self._announced)
                if self._believed:
                    self._accept_total(self._announced)
            if self.total_bytes is not None and self.received_bytes >= self.total_bytes:
                break  # the client has confirmed the body ends here
        self._drop_stream()
        # The body ended cleanly (the client checked it against its Content-Length): its
        # length is now believed; with no length announced, the end is all the evidence.
        self._accept_total(self._announced if self._announced is not None else self.received_bytes)
        if self.received_bytes < self.total_bytes:
            raise errors.DownloadError(
                f"recording {self.name}: body ended after {self.received_bytes} of {self.total_bytes} bytes")

    def _open_stream(self) -> None:
        offset = self.received_bytes
        stream = self._manager.open_stream(self.name, offset)
        self._stream, self._chunks, self._pending = stream, stream.chunks(), None
        self._announced = stream.total_bytes
        self._believed = None if self._announced is not None else False
        if offset > 0:
            self._manager.learn_range(stream.start_offset == offset)
        self._skip_bytes = self._skip_for(stream.start_offset)

    def _limit_next_read(self) -> None:
        """Wait for demand *before* reading the socket, and read no more than it allows: bytes
        left unread stay in the network's buffers, which fill and make TCP stop the PBX
        (a sniffed file costs about the window plus those buffers, not a socket read's worth)."""
        allowed = self._wait_for_demand()  # may park: nothing read is left waiting
        self._stream.read_size_bytes = READ_MAX_BYTES if allowed is None else max(1, min(READ_MAX_BYTES, allowed))

    def _next_chunk(self) -> Optional[bytes]:
        if self._pending is not None:
            chunk, self._pending = self._pending, None
            return chunk
        chunk = next(self._chunks, None)
        if chunk is not None and self._skip_bytes:
            chunk = self._verify_prefix(chunk)
        return chunk

    def _drop_stream(self) -> None:
        with self._cond:
            stream = self._take_stream_locked()
        _close_stream(stream)

    def _take_stream_locked(self):
        stream, self._stream, self._chunks, self._pending = self._stream, None, None, None
        return stream

    def _accept_total(self, total_bytes: Optional[int]) -> None:
        """Believe *total_bytes*: tell the manager first (index, kernel attributes), then
        readers, so that whoever sees the size through ``wait_for_size`` sees it everywhere."""
        if total_bytes is None:
            return
        with self._cond:
            if self.total_bytes is not None and self.total_bytes != total_bytes:
                raise errors.DownloadError(
                    f"recording {self.name}: PBX announced {total_bytes} bytes, earlier {self.total_bytes}")
            if self.received_bytes > total_bytes:
                raise errors.DownloadError(f"recording {self.name}: more bytes held than announced")
            first = self.total_bytes is None
        if first:
            self._partial.expect(total_bytes)
            self._manager.size_learned(self.name, total_bytes)
        with self._cond:
            self.total_bytes = total_bytes
            self._cond.notify_all()

    def _header_agrees(self, announced: int) -> Optional[bool]:
        """Whether the held RIFF header confirms *announced* (module docstring, "Sizes").

        None while too few bytes are held to tell; True also for a file that is not RIFF.
        """
        if self.received_bytes < RIFF_HEADER_BYTES:
            return None
        declared = riff_size(self._partial.pread(RIFF_HEADER_BYTES, 0))
        if declared is None:
            return True
        if declared != announced:
            log.info("recording %s: PBX announced %d bytes, its RIFF header %d; waiting for the end of the body",
                     self.name, announced, declared)
        return declared == announced

    def _skip_for(self, start_offset: int) -> int:
        """How many leading body bytes repeat what is held (0 when the PBX honoured Range)."""
        if start_offset == self.received_bytes:
            return 0
        if start_offset == 0:
            log.info("recording %s: PBX ignored Range; re-reading %d held bytes to verify them",
                     self.name, self.received_bytes)
            return self.received_bytes
        raise errors.DownloadError(f"recording {self.name}: PBX resumed at {start_offset}, not {self.received_bytes}")

    def _verify_prefix(self, chunk: bytes) -> bytes:
        held_offset = self.received_bytes - self._skip_bytes
        overlap = chunk[:self._skip_bytes]
        if self._partial.pread(len(overlap), held_offset) != overlap:
            raise errors.DownloadError(f"recording {self.name}: bytes changed between attempts")
        self._skip_bytes -= len(overlap)
        with self._cond:
            self._progress_time = time.monotonic()
        return chunk[len(overlap):]

    def _append(self, chunk: bytes) -> None:
        self._partial.write(chunk)
        with self._cond:
            self.received_bytes += len(chunk)
            self._progress_time = time.monotonic()
            self._cond.notify_all()

    def _wait_for_demand(self) -> Optional[int]:
        """Pause while far enough ahead of the readers; give the slot back when nobody wants
        more. Returns how many more bytes may be written now (None: any number)."""
        with self._cond:
            while True:
                self._check_wanted_locked()
                if self._keep_going:
                    self._paused_since = None
                    return None
                window_bytes = max(INITIAL_WINDOW_BYTES, 2 * self._want_bytes)
                allowed = self._want_bytes + window_bytes - self.received_bytes
                if allowed > 0:
                    self._paused_since = None
                    return allowed
                now = time.monotonic()
                self._paused_since = self._paused_since or now
                if now - self._paused_since >= PAUSE_SUSPEND_S:
                    raise _Idle()
                self._cond.wait(0.25)

    def _check_wanted(self) -> None:
        """Before each attempt: no PBX request (and no random) for a download nobody wants."""
        with self._cond:
            self._check_wanted_locked()

    def _check_wanted_locked(self) -> None:
        """Cancel at shutdown; with no reader left, go on to the end when the recording is
        mostly here or was opened again, else give up the slot (module docstring)."""
        if self._manager.stopping:
            self._cancel_reason = "shutdown"
            raise _Cancelled()
        if self._keep_going or self.handles > 0:
            return
        mostly_here = self.total_bytes and self.received_bytes >= FINISH_SHARE * self.total_bytes
        if mostly_here or self._reopened or self.opens > 1:
            self._keep_going = True
            return
        raise _Idle()

    def _sleep(self, delay_s: float) -> None:
        deadline = time.monotonic() + delay_s
        with self._cond:
            while not self._manager.stopping and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
        self._check_wanted()

    def _finish(self) -> None:
        """Commit to the cache, hand the last bytes to the readers, then make them durable.

        Between the commit and the readers' last bytes, ``on_commit`` may put the verified
        bytes in the kernel's page cache, so that a reader's next open finds them there."""
        self._partial.commit()
        self._manager.committed(self.name, self.received_bytes, self._partial.pread)
        with self._cond:
            self._to(State.COMPLETE)
        self._partial.sync()
        log.info("recording %s: downloaded %d bytes", self.name, self.received_bytes)
        self._manager.finished(self)

    def _end(self, state: State, error: Optional[BaseException], message: str) -> None:
        """The worker ends it without the bytes (FAILED or CANCELLED)."""
        with self._cond:
            stream = self._take_stream_locked()
            self._end_locked(state, error)
        _close_stream(stream)
        self._after_end(message, quiet=error is None)

    def _end_locked(self, state: State, error: Optional[BaseException]) -> None:
        self.error = error or errors.PbxUnavailableError(
            f"recording {self.name}: download cancelled ({self._cancel_reason or 'no reason'})")
        self._to(state)

    def _after_end(self, message: str, quiet: bool) -> None:
        if self._partial is not None:
            self._partial.discard()
        (log.debug if quiet else log.warning)("recording %s: download %s", self.name, message)
        self._manager.finished(self)


class DownloadManager:
    """Starts, shares and retires downloads; runs ``max_downloads`` worker threads.

    Attributes:
        open_stream: ``open_stream(name, offset)`` of the PBX (`pbx.Pbx.open_stream`).
        cache: the DiskCache whose partial files the downloads fill.
        stall_timeout_s: how long a reader waits without any progress before EIO.
        range_honoured: whether the PBX honours Range (None: not known yet).
        counts: reader opens that ``started`` a download and that ``joined`` one.

    Multithreading: ``_lock`` guards ``_downloads`` and the recent opens; see the module
    docstring for the order.
    """

    def __init__(self, open_stream, cache, *, max_downloads: int = 4, stall_timeout_s: float = 60.0,
                 range_honoured: Optional[bool] = None,
                 on_size: Optional[Callable[[str, int], None]] = None,
                 on_complete: Optional[Callable[[str, int], None]] = None,
                 on_gone: Optional[Callable[[str], None]] = None,
                 on_range: Optional[Callable[[bool], None]] = None,
                 on_commit: Optional[Callable[[str, int, Callable[[int, int], bytes]], None]] = None) -> None:
        self.open_stream = open_stream
        self.cache = cache
        self.stall_timeout_s = stall_timeout_s
        self.range_honoured = range_honoured
        self.stopping = False
        self.counts = {"started": 0, "joined": 0}
        self._on_size = on_size
        self._on_complete = on_complete
        self._on_gone = on_gone
        self._on_range = on_range
        self._on_commit = on_commit
        self._lock = threading.Lock()
        self._downloads: dict[str, Download] = {}
        self._recent_opens: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._queue: "queue.PriorityQueue[tuple[int, int, Optional[Download]]]" = queue.PriorityQueue()
        self._sequence = itertools.count()
        self._janitor_wake = threading.Event()
        self._workers = [threading.Thread(target=self._work, name=f"download-{i}", daemon=True)
                         for i in range(max_downloads)]
        for worker in self._workers:
            worker.start()
        self._janitor = threading.Thread(target=self._janitor_loop, name="download-janitor", daemon=True)
        self._janitor.start()

    # -- readers -----------------------------------------------------------------------------

    def acquire(self, name: str, *, not_found_grace_s: float = 0.0) -> Download:
        """Return the download of *name* for a new reader, starting one if there is none.

        *not_found_grace_s*: how long "does not exist" is retried (a recording the PBX may
        still be writing). The caller must `release` the download when the reader closes.
        """
        with self._lock:
            reopened = self._note_open_locked(name)
            download = self._downloads.get(name)
            if download is not None and download.join():
                self.counts["joined"] += 1
                return download
            download = self._downloads[name] = Download(self, name, reopened=reopened,
                                                         not_found_grace_s=not_found_grace_s)
            download.join()
            self.counts["started"] += 1
        return download

    def release(self, download: Download) -> None:
        """A reader closed its handle on *download*."""
        download.leave()
        self.wake_janitor()
        self._retire_if_idle(download)

    def prefetch(self, name: str) -> Optional[Download]:
        """Queue a background download of *name* behind reader-driven ones (None if cached)."""
        if self.cache.contains(name):
            return None
        with self._lock:
            download = self._downloads.get(name)
            if download is not None:
                return download
            download = self._downloads[name] = Download(self, name, keep_going=True)
        self.enqueue(download, PRIORITY_PREFETCH)
        return download

    def running(self) -> list[Download]:
        with self._lock:
            return list(self._downloads.values())

    def stop(self) -> None:
        """Cancel every download and stop the workers."""
        self.stopping = True
        for download in self.running():
            download.wake()
        for _ in self._workers:
            self._queue.put((-1, next(self._sequence), None))
        for worker in self._workers:
            worker.join(timeout=5)
        # Queued, parked and suspended downloads: their readers must not wait for the stall timeout.
        now = time.monotonic()
        for download in self.running():
            download.expire(now, stopping=True)
        self.wake_janitor()
        self._janitor.join(timeout=5)

    # -- for Download ------------------------------------------------------------------------

    def enqueue(self, download: Download, priority: int) -> None:
        """Put *download* in the worker queue (may be called under its ``_cond``: the queue is a leaf)."""
        self._queue.put((priority, next(self._sequence), download))

    def wake_janitor(self) -> None:
        self._janitor_wake.set()

    def learn_range(self, honoured: bool) -> None:
        """The PBX answered a request with Range: remember whether it honoured it."""
        if self.range_honoured is honoured:
            return
        self.range_honoured = honoured
        log.info("downloads: the PBX %s Range requests", "honours" if honoured else "ignores")
        if self._on_range is not None:
            self._on_range(honoured)

    def size_learned(self, name: str, total_bytes: int) -> None:
        if self._on_size is not None:
            self._on_size(name, total_bytes)

    def recording_gone(self, name: str) -> None:
        """The PBX says *name* does not exist (past any grace)."""
        if self._on_gone is not None:
            self._on_gone(name)

    def committed(self, name: str, size_bytes: int, pread: Callable[[int, int], bytes]) -> None:
        """A download is in the cache, its readers not yet told: ``on_commit(name, size,
        pread)`` may read it (``pread(size, offset)``). Its failure costs only its purpose."""
        if self._on_commit is None:
            return
        try:
            self._on_commit(name, size_bytes, pread)
        except Exception as exc:  # noqa: BLE001 - the download itself is complete and sound
            log.warning("recording %s: after commit: %s", name, exc)

    def finished(self, download: Download) -> None:
        if download.complete and self._on_complete is not None:
            self._on_complete(download.name, download.received_bytes)
        with self._lock:
            # A failed or cancelled download leaves the map now, so the next open starts afresh.
            if self._downloads.get(download.name) is download and not download.complete:
                del self._downloads[download.name]
        self._retire_if_idle(download)

    # -- internals ---------------------------------------------------------------------------

    def _note_open_locked(self, name: str) -> bool:
        """Remember an open of *name*; True when it was opened within REOPEN_WINDOW_S."""
        now = time.monotonic()
        recent = self._recent_opens
        while recent and (len(recent) > RECENT_OPENS_MAX or now - next(iter(recent.values())) > REOPEN_WINDOW_S):
            recent.popitem(last=False)
        reopened = name in recent
        recent[name] = now
        recent.move_to_end(name)
        return reopened

    def _work(self) -> None:
        while True:
            _, _, download = self._queue.get()
            if download is None:
                return
            if download.begin():
                download.run()

    def _janitor_loop(self) -> None:
        """Parked and suspended downloads nobody came back to move on at their deadlines."""
        while not self.stopping:
            now = time.monotonic()
            deadlines = []
            for download in self.running():
                download.expire(now)
                deadline = download.idle_deadline()
                if deadline is not None:
                    deadlines.append(deadline)
            wait_s = JANITOR_INTERVAL_S
            if deadlines:
                wait_s = min(wait_s, max(0.005, min(deadlines) - time.monotonic()))
            self._janitor_wake.wait(wait_s)
            self._janitor_wake.clear()

    def _retire_if_idle(self, download: Download) -> None:
        """Release the cache pin and the read fd once ended and nobody reads any more."""
        with self._lock:
            if not download.retirable():
                return
            if self._downloads.get(download.name) is download:
                del self._downloads[download.name]
        download.close()


def _close_stream(stream) -> None:
    if stream is None:
        return
    try:
        stream.close()
    except Exception as exc:  # noqa: BLE001 - closing a dead connection must not fail anything
        log.debug("download: closing a stream failed: %s", exc)


def _as_pbx_or_cache_error(exc: BaseException) -> errors.YeastarfsError:
    if isinstance(exc, errors.YeastarfsError):
        return exc
    log.error("download: unexpected %s", type(exc).__name__, exc_info=exc)
    return errors.PbxUnavailableError(f"download failed unexpectedly: {type(exc).__name__}")
