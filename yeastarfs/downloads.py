"""Downloads: at most one transfer per recording, streamed into the cache, read while it runs.

``DownloadManager.acquire(name)`` returns the shared ``Download`` of a recording, starting
it if needed; every reader of that recording, on any handle or thread, uses the same one,
because each PBX ``random`` works once and two readers must never each ask for one.
``Download.read(offset, size)`` blocks until exactly those bytes have arrived (never
returning short or zero-filled data before the real end), or fails with the download's
error, or with ``DownloadStalledError`` when nothing arrived for ``stall_timeout_s``.

Policy, in one place (README "How downloads behave" says the same):

* Flow control. A download may run ahead of the furthest byte any reader asked for by a
  window that starts at ``INITIAL_WINDOW_BYTES`` and grows to twice what was asked, so a
  sequential reader soon gets the full PBX speed, while a file manager that reads 4 KiB
  and closes pulls little more than the window. A reader that seeks to the end opens the
  window to the end.
* Early leavers. When the last reader closes, a download that has more than half of the
  file continues to the end (someone read most of it; it will be wanted again). Otherwise
  it is *suspended* at once: its connection is closed, so the PBX stops sending, and its
  worker slot is freed, but the bytes held are kept for ``KEEP_SUSPENDED_S``. A reader
  that comes back (file managers reopen) resumes it with a fresh random (see Failures for
  how a resume re-uses held bytes); nobody coming back drops it and deletes its partial
  file. A download that nobody wanted while it was queued or between attempts is
  suspended before it asks the PBX for a random.
* Idle readers. A download paused by flow control for ``PAUSE_SUSPEND_S`` (a player on
  pause holding the file open) is suspended too, so idle readers never hold the
  ``max_downloads`` slots; the reader's next read resumes it.
  ``stop()`` cancels running downloads and fails queued and suspended ones at once.
* Failures. A reset, truncated body, JSON ``Failed`` or HTTP error is retried with a fresh
  random, up to ``MAX_FAILURES`` consecutive failures without progress, with exponential
  backoff. The retry asks for ``Range: bytes=N-``; a 206 is appended, a 200 is re-read from
  the start and the bytes already held are compared, not trusted. A download is complete
  only when the bytes equal the announced length; then it is fsynced and renamed into the
  cache atomically.
* Sizes. The length a reply announces (Content-Length, or the Content-Range total) is
  believed at once, and reported through ``on_size``, when the file's own RIFF header
  gives the same size or the file has no RIFF header to compare with. When the header
  disagrees (a bogus Content-Length, or a bogus header), it is believed only once a body
  ended cleanly at exactly that length. Until a size is believed, reads wait for their
  bytes as if the file were long. Each attempt's body is checked against its announced
  length both ways (``PbxClient`` reads it up to the PBX's close), so a short or an
  overlong body is a failed attempt, never a wrong size.
* Load. At most ``max_downloads`` transfers run at once; reader-driven ones go before
  prefetches (a priority queue).

This module knows nothing of paths, FUSE or PBX families; it gets the PBX's
``open_stream`` and the cache passed in.

Threading and lock order: ``DownloadManager._lock`` (the name -> Download map) before
``Download._cond`` before ``DiskCache._lock``. No lock is held during network I/O or disk
reads; readers wait on ``Download._cond`` without holding anything else.
"""

from __future__ import annotations

import errno as errno_codes
import itertools
import logging
import os
import queue
import struct
import threading
import time
from typing import Callable, Optional

from yeastarfs import errors

log = logging.getLogger(__name__)

# A file manager sniffing a file reads a few KiB; 128 KiB covers the header of any audio
# format and one kernel read-ahead, and keeps what an abandoned open pulls small.
INITIAL_WINDOW_BYTES = 128 * 1024
# Keep the bytes of a suspended download this long for a reader to come back (file
# managers reopen what they sniffed; thumbnailers follow sniffers).
KEEP_SUSPENDED_S = 30.0
# A download paused this long by flow control gives back its connection and worker slot.
PAUSE_SUSPEND_S = 5.0
# How often the manager looks for suspended downloads nobody came back to.
JANITOR_INTERVAL_S = 1.0
# Keep downloading after the last reader left when at least this share has arrived.
FINISH_SHARE = 0.5
# Consecutive failed attempts (each with a fresh random) before readers get EIO.
MAX_FAILURES = 4
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 8.0
# Priorities in the worker queue: lower goes first.
PRIORITY_READER = 0
PRIORITY_PREFETCH = 1
# "RIFF" <size - 8, little-endian u32> "WAVE": what a WAV file says about its own length.
RIFF_HEADER_BYTES = 12


_download_ids = itertools.count(1)


class _Cancelled(Exception):
    """Internal: the download was cancelled (shutdown)."""


class _Suspended(Exception):
    """Internal: nobody needs more bytes now; give back the connection and the slot."""


class Download:
    """One recording's transfer into a partial cache file, shared by all its readers.

    Attributes (read under ``_cond``):
        name: the recording name.
        received_bytes: bytes present in the partial file, contiguous from offset 0.
        total_bytes: the recording's size once the PBX announced it, else None.
        done: True once finished, failed or cancelled; ``error`` says which.
        error: the exception readers get when their bytes will never arrive.

    Multithreading: one ``threading.Condition``; the worker notifies it after every chunk.
    """

    def __init__(self, manager: "DownloadManager", name: str) -> None:
        self.name = name
        self._manager = manager
        self._cond = threading.Condition()
        self.received_bytes = 0
        self.total_bytes: Optional[int] = None
        self.done = False
        self.complete = False
        self.error: Optional[BaseException] = None
        self.handles = 0
        self.keep_going = False          # finish regardless of readers (prefetch, most read)
        self.started = False
        self.retired = False
        self._want_bytes = 0             # furthest byte end any reader asked for
        self._cancel_reason: Optional[str] = None
        self._progress_time = time.monotonic()
        # Unique per Download: a cancelled transfer may still be cleaning up its file while
        # a new reader starts the next one.
        self.path = f"{manager.cache.partial_path(name)}.{next(_download_ids)}"
        self.cancelled = False
        self.suspended = False
        self._suspended_since = 0.0
        self._paused_since: Optional[float] = None
        self._write_fd: Optional[int] = None
        self._read_fd: Optional[int] = None

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
                if self.suspended:
                    self._resume_locked()
                quiet_s = time.monotonic() - max(self._progress_time, waited_since)
                if quiet_s >= stall_s:
                    raise errors.DownloadStalledError(
                        f"recording {self.name}: no data from the PBX for {stall_s:.0f} s")
                self._cond.wait(min(1.0, stall_s - quiet_s))
            available = self.received_bytes
            fd = self._read_fd
        if fd is None or offset >= available:
            return b""
        return os.pread(fd, min(end, available) - offset, offset)

    def _readable_locked(self, offset: int, end: int) -> bool:
        if self.complete:
            return True
        if self.total_bytes is not None and end >= self.total_bytes:
            # The last bytes are handed out once the file is committed to the cache: a reader
            # that got to the end can rely on the recording being cached (and in LRU order).
            return self.done and self.received_bytes >= self.total_bytes
        return self.received_bytes >= end

    def _resume_locked(self) -> None:
        """A reader needs bytes a suspended download does not hold: queue it again."""
        self.suspended = False
        self._progress_time = time.monotonic()
        self._manager.requeue(self)

    def _want_locked(self, end: int) -> None:
        if end > self._want_bytes:
            self._want_bytes = end
            self._cond.notify_all()

    def size_if_known(self) -> Optional[int]:
        with self._cond:
            return self.total_bytes

    def progress(self) -> tuple[int, Optional[int]]:
        with self._cond:
            return self.received_bytes, self.total_bytes

    # -- worker side -------------------------------------------------------------------------

    def run(self) -> None:
        """Transfer the recording, retrying as the module docstring says (worker thread)."""
        try:
            self._open_files()
            self._transfer_with_retries()
            self._finish()
        except _Suspended:
            self._suspend()
        except _Cancelled:
            self._end(None, f"cancelled ({self._cancel_reason})")
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the readers
            self._end(_as_pbx_or_cache_error(exc), f"failed: {exc}")

    def _suspend(self) -> None:
        with self._cond:
            self.suspended = True
            self.started = False
            self._suspended_since = time.monotonic()
            self._paused_since = None
            wanted = self.handles > 0 and self._want_bytes > self.received_bytes
            self._cond.notify_all()
            if wanted:  # a reader asked for more while we were closing the connection
                self._resume_locked()
        log.debug("recording %s: suspended at %d bytes", self.name, self.received_bytes)

    def discard_if_abandoned(self) -> None:
        """Drop a suspended download nobody came back to within KEEP_SUSPENDED_S."""
        with self._cond:
            if not self.suspended or self.handles > 0 or self.done:
                return
            if time.monotonic() - self._suspended_since < KEEP_SUSPENDED_S and not self._manager.stopping:
                return
            self.suspended = False
            self.cancelled = True
        self._end(None, "dropped: no reader came back")

    def _open_files(self) -> None:
        if self._write_fd is not None:
            return  # resuming a suspended download: keep what is held
        try:
            self._write_fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            self._read_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise errors.CacheError(f"recording {self.name}: cannot create cache file: {exc.strerror}") from None

    def _transfer_with_retries(self) -> None:
        failures = 0
        while True:
            self._check_cancel()
            before = self.received_bytes
            try:
                self._attempt()
                return
            except (errors.RecordingNotFoundError, errors.AuthError, errors.CacheError):
                raise
            except errors.PbxError as exc:
                failures = 1 if self.received_bytes > before else failures + 1
                if failures >= MAX_FAILURES:
                    raise
                delay_s = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** (failures - 1))
                log.info("recording %s: attempt failed at %d bytes (%s); retrying in %.1f s",
                         self.name, self.received_bytes, exc, delay_s)
                self._sleep(delay_s)

    def _attempt(self) -> None:
        """One get_random + download, appending to (or verifying) what is already held."""
        stream = self._manager.open_stream(self.name, self.received_bytes)
        with stream:
            announced = stream.total_bytes
            believed: Optional[bool] = None if announced is not None else False
            skip_bytes = self._skip_for(stream.start_offset)
            for chunk in stream.chunks():
                if skip_bytes:
                    chunk, skip_bytes = self._verify_prefix(chunk, skip_bytes)
                if chunk:
                    self._wait_for_demand()
                    self._append(chunk)
                if believed is None:
                    believed = self._header_agrees(announced)
                    if believed:
                        self._accept_total(announced)
                if self.total_bytes is not None and self.received_bytes >= self.total_bytes:
                    break  # the client has confirmed the body ends here
        # The body ended cleanly (the client checked it against its Content-Length): its
        # length is now believed; with no length announced, the end is all the evidence.
        self._accept_total(announced if announced is not None else self.received_bytes)
        if self.received_bytes < self.total_bytes:
            raise errors.DownloadError(
                f"recording {self.name}: body ended after {self.received_bytes} of {self.total_bytes} bytes")

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
            self._manager.size_learned(self.name, total_bytes)
        with self._cond:
            self.total_bytes = total_bytes
            self._cond.notify_all()

    def wait_for_size(self, timeout_s: float) -> Optional[int]:
        """Wait up to *timeout_s* for the exact size; raise the download's error if it failed
        first (so an open can fail with the real cause), None if still unknown."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.total_bytes is None and not self.done and not self.suspended:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    break
                self._cond.wait(remaining_s)
            if self.total_bytes is None and self.error is not None:
                raise self.error
            return self.total_bytes

    def _header_agrees(self, announced: int) -> Optional[bool]:
        """Whether the held RIFF header confirms *announced* (module docstring, "Sizes").

        None while too few bytes are held to tell; True also for a file that is not RIFF.
        """
        if self.received_bytes < RIFF_HEADER_BYTES:
            return None
        head = os.pread(self._read_fd, RIFF_HEADER_BYTES, 0)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return True
        declared = struct.unpack("<I", head[4:8])[0] + 8
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

    def _verify_prefix(self, chunk: bytes, skip_bytes: int) -> tuple[bytes, int]:
        held_offset = self.received_bytes - skip_bytes
        overlap = chunk[:skip_bytes]
        if os.pread(self._read_fd, len(overlap), held_offset) != overlap:
            raise errors.DownloadError(f"recording {self.name}: bytes changed between attempts")
        self._touch_progress()
        return chunk[len(overlap):], skip_bytes - len(overlap)

    def _append(self, chunk: bytes) -> None:
        try:
            written = os.pwrite(self._write_fd, chunk, self.received_bytes)
        except OSError as exc:
            if exc.errno in (errno_codes.ENOSPC, errno_codes.EDQUOT):
                raise errors.CacheError(f"recording {self.name}: cache disk is full") from None
            raise errors.CacheError(f"recording {self.name}: cannot write cache file: {exc.strerror}") from None
        if written != len(chunk):
            raise errors.CacheError(f"recording {self.name}: short write to the cache file")
        with self._cond:
            self.received_bytes += written
            self._progress_time = time.monotonic()
            self._cond.notify_all()

    def _touch_progress(self) -> None:
        with self._cond:
            self._progress_time = time.monotonic()

    def _wait_for_demand(self) -> None:
        """Pause while far enough ahead of the readers; suspend when nobody wants more."""
        with self._cond:
            while True:
                if self._manager.stopping:
                    self._cancel_locked("shutdown")
                self._check_abandoned_locked()
                if self.keep_going:
                    break
                window_bytes = max(INITIAL_WINDOW_BYTES, 2 * self._want_bytes)
                if self.received_bytes < self._want_bytes + window_bytes:
                    break
                now = time.monotonic()
                self._paused_since = self._paused_since or now
                if now - self._paused_since >= PAUSE_SUSPEND_S:
                    raise _Suspended()
                self._cond.wait(0.25)
            self._paused_since = None

    def _check_abandoned_locked(self) -> None:
        """With no reader left: finish past FINISH_SHARE, else suspend (docstring)."""
        if self.keep_going or self.handles > 0:
            return
        if self.total_bytes and self.received_bytes >= FINISH_SHARE * self.total_bytes:
            self.keep_going = True
            return
        raise _Suspended()

    def _cancel_locked(self, reason: str) -> None:
        self._cancel_reason = reason
        self.cancelled = True
        raise _Cancelled()

    def _check_cancel(self) -> None:
        """Before each attempt: no PBX request (and no random) for a download nobody wants."""
        with self._cond:
            if self._manager.stopping:
                self._cancel_locked("shutdown")
            self._check_abandoned_locked()

    def _sleep(self, delay_s: float) -> None:
        deadline = time.monotonic() + delay_s
        with self._cond:
            while not self._manager.stopping and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
        self._check_cancel()

    def _finish(self) -> None:
        """Make the bytes visible in the cache by one atomic rename, hand them to readers,
        then make them durable.

        The fsync comes after the readers are served because it costs as much as the
        download itself on a fast link. A killed process loses nothing (the page cache
        survives it); after a power loss a file may come back shorter than announced, which
        the cache's start-up check (sizes against the index) deletes.
        """
        try:
            self._manager.cache.commit(self.name, self.path)
        except OSError as exc:
            raise errors.CacheError(f"recording {self.name}: cannot store the download: {exc.strerror}") from None
        with self._cond:
            self.complete = True
            self.done = True
            self._cond.notify_all()
        try:
            os.fsync(self._write_fd)
        except OSError as exc:
            log.warning("recording %s: fsync of the cached file failed: %s", self.name, exc.strerror)
        self._close_write_fd()
        log.info("recording %s: downloaded %d bytes", self.name, self.received_bytes)
        self._manager.finished(self)

    def _end(self, error: Optional[BaseException], message: str) -> None:
        self._close_write_fd()
        _unlink_quietly(self.path)
        with self._cond:
            self.done = True
            self.error = error or errors.PbxUnavailableError(f"recording {self.name}: download {message}")
            self._cond.notify_all()
        (log.warning if error is not None else log.debug)("recording %s: download %s", self.name, message)
        self._manager.finished(self)

    def _close_write_fd(self) -> None:
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None

    def close_read_fd(self) -> None:
        with self._cond:
            fd, self._read_fd = self._read_fd, None
        if fd is not None:
            os.close(fd)


class DownloadManager:
    """Starts, shares and retires downloads; runs ``max_downloads`` worker threads.

    Attributes:
        open_stream: ``open_stream(name, offset)`` of the PBX (`pbx.Pbx.open_stream`).
        cache: the DiskCache the downloads fill.
        stall_timeout_s: how long a reader waits without any progress before EIO.

    Multithreading: ``_lock`` guards ``_downloads``; see the module docstring for the order.
    """

    def __init__(self, open_stream, cache, *, max_downloads: int = 4, stall_timeout_s: float = 60.0,
                 on_size: Optional[Callable[[str, int], None]] = None,
                 on_complete: Optional[Callable[[str, int], None]] = None) -> None:
        self.open_stream = open_stream
        self.cache = cache
        self.stall_timeout_s = stall_timeout_s
        self.stopping = False
        self._on_size = on_size
        self._on_complete = on_complete
        self._lock = threading.Lock()
        self._downloads: dict[str, Download] = {}
        self._queue: "queue.PriorityQueue[tuple[int, int, Optional[Download]]]" = queue.PriorityQueue()
        self._sequence = itertools.count()
        self._workers = [threading.Thread(target=self._work, name=f"download-{i}", daemon=True)
                         for i in range(max_downloads)]
        for worker in self._workers:
            worker.start()
        self._janitor = threading.Thread(target=self._drop_abandoned, name="download-janitor", daemon=True)
        self._janitor.start()

    def acquire(self, name: str, size_hint: Optional[int] = None) -> Download:
        """Return the running download of *name*, starting one if there is none."""
        with self._lock:
            download = self._downloads.get(name)
            if download is not None:
                with download._cond:
                    # Decided under _cond: a worker cancels only under _cond and only while
                    # handles == 0, so a download joined here can no longer be cancelled.
                    if download.cancelled or (download.done and not download.complete):
                        download = None
                    else:
                        download.handles += 1
                        if download.suspended:
                            download._resume_locked()
                        download._cond.notify_all()
            fresh = download is None
            if fresh:
                download = self._downloads[name] = Download(self, name)
                download.handles = 1
        if fresh:
            self.cache.reserve(name, size_hint or 0)
        if fresh or not download.started:
            # A queued prefetch is queued again at reader priority; the worker runs it once.
            self._queue.put((PRIORITY_READER, next(self._sequence), download))
        return download

    def requeue(self, download: Download) -> None:
        """Queue a suspended download again (called under its ``_cond``; the queue is a leaf)."""
        priority = PRIORITY_READER if download.handles > 0 else PRIORITY_PREFETCH
        self._queue.put((priority, next(self._sequence), download))

    def prefetch(self, name: str, size_hint: Optional[int] = None) -> Optional[Download]:
        """Queue a background download of *name* behind reader-driven ones (None if cached)."""
        if self.cache.contains(name):
            return None
        with self._lock:
            download = self._downloads.get(name)
            if download is not None:
                return download
            download = self._downloads[name] = Download(self, name)
            download.keep_going = True
        self.cache.reserve(name, size_hint or 0)
        self._queue.put((PRIORITY_PREFETCH, next(self._sequence), download))
        return download

    def release(self, download: Download) -> None:
        """A reader closed its handle on *download*."""
        with download._cond:
            download.handles -= 1
            download._cond.notify_all()
        self._retire_if_idle(download)

    def running(self) -> list[Download]:
        with self._lock:
            return list(self._downloads.values())

    def stop(self) -> None:
        """Cancel every download and stop the workers."""
        self.stopping = True
        for download in self.running():
            with download._cond:
                download._cond.notify_all()
        for _ in self._workers:
            self._queue.put((-1, next(self._sequence), None))
        for worker in self._workers:
            worker.join(timeout=5)
        # Downloads still queued never ran: their readers must not wait for the stall timeout.
        for download in self.running():
            with download._cond:
                never_ran, download.started = not download.started, True
            if never_ran:
                download.cancelled = True
                download._end(None, "cancelled (shutdown)")

    # -- callbacks from Download -------------------------------------------------------------

    def size_learned(self, name: str, total_bytes: int) -> None:
        self.cache.resize(name, total_bytes)
        if self._on_size is not None:
            self._on_size(name, total_bytes)

    def finished(self, download: Download) -> None:
        if download.complete and self._on_complete is not None:
            self._on_complete(download.name, download.received_bytes)
        with self._lock:
            # A failed or cancelled download leaves the map now, so the next open starts afresh.
            if self._downloads.get(download.name) is download and not download.complete:
                del self._downloads[download.name]
        self._retire_if_idle(download)

    # -- internals ---------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            _, _, download = self._queue.get()
            if download is None:
                return
            with download._cond:
                if download.started:
                    continue  # queued twice (prefetch, then a reader): already handled
                download.started = True
                download._progress_time = time.monotonic()
            download.run()

    def _drop_abandoned(self) -> None:
        """Suspended downloads nobody came back to give back their disk space."""
        while not self.stopping:
            time.sleep(JANITOR_INTERVAL_S)
            for download in self.running():
                download.discard_if_abandoned()

    def _retire_if_idle(self, download: Download) -> None:
        """Release the cache pin and the read fd once done and nobody reads any more."""
        with self._lock:
            with download._cond:
                if not download.done or download.handles > 0 or download.retired:
                    return
                download.retired = True
            if self._downloads.get(download.name) is download:
                del self._downloads[download.name]
        download.close_read_fd()
        self.cache.release(download.name)


def _as_pbx_or_cache_error(exc: BaseException) -> errors.YeastarfsError:
    if isinstance(exc, errors.YeastarfsError):
        return exc
    log.error("download: unexpected %s", type(exc).__name__, exc_info=exc)
    return errors.PbxUnavailableError(f"download failed unexpectedly: {type(exc).__name__}")


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
