"""DiskCache: complete recordings on disk, least-recently-used first out, bounded in bytes.

Layout under the cache root (created 0700, files 0600):

    complete/<recording name>   a whole recording, exactly as the PBX sent it
    partial/<sha1 of name>.part a download in progress; never served after a restart

A file reaches ``complete/`` only by an atomic rename of a finished, fsynced partial file,
so a crash at any moment leaves either a complete file or a partial one, and partial
files are deleted at start. The last-access order is the files' mtime (touched at most
once a minute per file), so it survives restarts without a journal; start-up lists the
directory once and never reads or hashes file contents.

Budget: idle complete files live in a cachetools ``LRUCache`` sized in bytes whose
``popitem`` deletes the file. Files that are open or still downloading are *pinned*: they
are kept out of the LRU, never evicted, but their bytes count against the budget
(rclone's rule). When the last pin of a complete file is released it joins the LRU as the
most recent entry and older idle files are evicted to fit; a file that cannot fit even
then (larger than the budget, or pins fill it) is deleted at once. So reading works with
any cache size, and the budget is exceeded only while files are in use.

This module does no network I/O and imports nothing above ``errors``.

Threading: every public method takes ``_lock``; it is held only for bookkeeping and for
unlinking/renaming single files, never while data is copied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import threading
import time
from typing import Callable, Optional

import cachetools

from yeastarfs import errors

log = logging.getLogger(__name__)

# Rewriting a file's mtime on every read would cost a syscall per FUSE read; once a
# minute is plenty for an LRU order that only matters under pressure.
TOUCH_INTERVAL_S = 60.0


class _SizedLRU(cachetools.LRUCache):
    """LRUCache of name -> size in bytes whose eviction deletes the file."""

    def __init__(self, max_bytes: int, on_evict) -> None:
        super().__init__(maxsize=max(1, max_bytes), getsizeof=lambda size_bytes: max(1, size_bytes))
        self._on_evict = on_evict

    def popitem(self):
        name, size_bytes = super().popitem()
        self._on_evict(name, size_bytes)
        return name, size_bytes

    def peek(self, name: str) -> int:
        """The size of *name* without making it the most recently used (a stat is no read)."""
        return cachetools.Cache.__getitem__(self, name)


@dataclasses.dataclass
class _Pin:
    count: int
    size_bytes: int


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    evicted_bytes: int = 0


class DiskCache:
    """Recordings cached on local disk.

    Attributes:
        root: the cache directory.
        max_bytes: budget for complete and in-progress files together.
        min_free_bytes: free space to leave on the cache's filesystem.
        stats: hit/miss/eviction counters.

    Multithreading: one lock, ``_lock``, around the LRU, the pins and the file moves.
    """

    def __init__(self, root: str, max_bytes: int, min_free_bytes: int = 0,
                 expected_size: Optional[Callable[[str], Optional[int]]] = None) -> None:
        self.root = root
        self._expected_size = expected_size
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.stats = CacheStats()
        self._complete_dir = os.path.join(root, "complete")
        self._partial_dir = os.path.join(root, "partial")
        self._lock = threading.Lock()
        self._lru = _SizedLRU(max_bytes, self._evicted)
        self._pins: dict[str, _Pin] = {}
        self._touched: dict[str, float] = {}
        for path in (root, self._complete_dir, self._partial_dir):
            os.makedirs(path, mode=0o700, exist_ok=True)
            os.chmod(path, 0o700)
        self._remove_partials()
        self._load_complete()

    # -- start-up ----------------------------------------------------------------------------

    def _remove_partials(self) -> None:
        """Partial files from a previous run are unverifiable: delete them."""
        for entry in os.scandir(self._partial_dir):
            _unlink_quietly(entry.path)

    def _load_complete(self) -> None:
        entries = []
        for entry in os.scandir(self._complete_dir):
            try:
                stat = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if self._expected_size is not None and self._expected_size(entry.name) not in (None, stat.st_size):
                # Cut short by a power loss before its fsync: never serve it.
                log.warning("cache: %s is %d bytes, not the size the PBX announced; deleted",
                            entry.name, stat.st_size)
                _unlink_quietly(entry.path)
                continue
            entries.append((stat.st_mtime, entry.name, stat.st_size))
        for _, name, size_bytes in sorted(entries):  # oldest first: inserted first, evicted first
            self._insert_locked(name, size_bytes)
        log.info("cache: %d recordings, %d bytes in %s", len(self._lru), self._lru.currsize, self.root)

    # -- lookups -----------------------------------------------------------------------------

    def open_complete(self, name: str) -> Optional[int]:
        """Open the complete file of *name* for reading and pin it; None if not cached.

        The caller must `release` the name when it closes the returned fd.
        """
        with self._lock:
            size_bytes = self._lru.pop(name, None) if name in self._lru else None
            pin = self._pins.get(name)
            if size_bytes is None and (pin is None or not self._is_complete(name)):
                self.stats.misses += 1
                return None
            try:
                fd = os.open(self.complete_path(name), os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                self.stats.misses += 1
                if size_bytes is not None and not isinstance(exc, FileNotFoundError):
                    self._lru[name] = size_bytes  # still on disk (EMFILE, EACCES…): keep counting it
                return None
            self._pin_locked(name, size_bytes if size_bytes is not None else pin.size_bytes)
            self.stats.hits += 1
        self._touch(name)
        return fd

    def contains(self, name: str) -> bool:
        with self._lock:
            return name in self._lru or (name in self._pins and self._is_complete(name))

    def size_of(self, name: str) -> Optional[int]:
        """Size of the complete cached file of *name*, or None."""
        with self._lock:
            if name in self._lru:
                return self._lru.peek(name)
            pin = self._pins.get(name)
            return pin.size_bytes if pin is not None and self._is_complete(name) else None

    def complete_path(self, name: str) -> str:
        return os.path.join(self._complete_dir, name)

    def partial_path(self, name: str) -> str:
        digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()
        return os.path.join(self._partial_dir, digest + ".part")

    def _is_complete(self, name: str) -> bool:
        return os.path.exists(self.complete_path(name))

    # -- downloads ---------------------------------------------------------------------------

    def reserve(self, name: str, size_bytes: int) -> None:
        """Pin room for a download of *size_bytes*, evicting idle files as needed.

        Never refuses: reads must work even with a tiny cache. Whether the file is kept
        is decided when its last pin is released (see `release`).
        """
        with self._lock:
            pin = self._pins.get(name)
            if pin is None:
                # A cached name downloaded again: its idle file moves from the LRU to the pin,
                # so it is counted once and eviction cannot delete it while it is in use.
                idle_bytes = self._lru.pop(name, 0) if name in self._lru else 0
                pin = self._pins[name] = _Pin(count=0, size_bytes=idle_bytes)
            pin.count += 1
            extra_bytes = max(0, size_bytes - pin.size_bytes)
            self._make_room_locked(extra_bytes)  # before the pin grows, so counted once
            pin.size_bytes += extra_bytes

    def resize(self, name: str, size_bytes: int) -> None:
        """The real size of a reserved download became known; adjust its reservation."""
        with self._lock:
            pin = self._pins.get(name)
            if pin is None:
                return
            extra_bytes = size_bytes - pin.size_bytes
            if extra_bytes > 0:
                self._make_room_locked(extra_bytes)  # before the pin grows, so counted once
            pin.size_bytes = size_bytes

    def commit(self, name: str, partial_path: str) -> str:
        """Move a finished partial file into place atomically; return the complete path."""
        final_path = self.complete_path(name)
        with self._lock:
            os.chmod(partial_path, 0o600)
            os.replace(partial_path, final_path)
        self._touch(name, force=True)
        return final_path

    def release(self, name: str) -> None:
        """Drop one pin of *name*; on the last, an idle complete file goes back to the LRU."""
        with self._lock:
            pin = self._pins.get(name)
            if pin is None:
                return
            pin.count -= 1
            if pin.count > 0:
                return
            del self._pins[name]
            try:
                # The file's real size, not the reservation (a size hint, maybe never resized).
                size_bytes = os.stat(self.complete_path(name)).st_size
            except OSError:
                return  # never completed: a failed or cancelled download
            self._insert_locked(name, size_bytes)

    def free_space_ok(self) -> bool:
        return self._free_bytes() >= self.min_free_bytes

    # -- maintenance -------------------------------------------------------------------------

    def clear(self) -> int:
        """Delete every idle complete file; return the bytes freed."""
        with self._lock:
            freed = self._lru.currsize
            while self._lru:
                self._lru.popitem()
            return freed

    def usage(self) -> dict:
        with self._lock:
            pinned = sum(pin.size_bytes for pin in self._pins.values())
            return {"idle_bytes": self._lru.currsize, "pinned_bytes": pinned, "files": len(self._lru),
                    "pinned": len(self._pins), "max_bytes": self.max_bytes}

    # -- internals (call with _lock held) ----------------------------------------------------

    def _pin_locked(self, name: str, size_bytes: int) -> None:
        pin = self._pins.setdefault(name, _Pin(count=0, size_bytes=size_bytes))
        pin.count += 1

    def _insert_locked(self, name: str, size_bytes: int) -> None:
        if size_bytes + self._pinned_bytes_locked() > self.max_bytes:
            self._make_room_locked(size_bytes)
        try:
            self._lru[name] = size_bytes
        except ValueError:  # larger than the whole budget
            _unlink_quietly(self.complete_path(name))
            return
        if not self._make_room_locked(0):
            log.debug("cache: over budget with %s only because of pinned files", name)

    def _make_room_locked(self, extra_bytes: int) -> bool:
        """Evict idle files until *extra_bytes* more fit; False if pins alone are too many."""
        pinned_bytes = self._pinned_bytes_locked()
        while self._lru and (self._lru.currsize + pinned_bytes + extra_bytes > self.max_bytes
                             or self._free_bytes() < self.min_free_bytes + extra_bytes):
            self._lru.popitem()
        return pinned_bytes + self._lru.currsize + extra_bytes <= self.max_bytes

    def _pinned_bytes_locked(self) -> int:
        # Pins are few (open files and downloads), so summing is cheaper than bookkeeping.
        return sum(pin.size_bytes for pin in self._pins.values())

    def _evicted(self, name: str, size_bytes: int) -> None:
        _unlink_quietly(self.complete_path(name))
        self._touched.pop(name, None)
        self.stats.evictions += 1
        self.stats.evicted_bytes += size_bytes
        log.debug("cache: evicted %s (%d bytes)", name, size_bytes)

    def _free_bytes(self) -> int:
        if not self.min_free_bytes:
            return 1 << 62
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return 0

    def _touch(self, name: str, force: bool = False) -> None:
        """Record an access in the file's mtime, which orders the LRU after a restart."""
        now = time.monotonic()
        if not force and now - self._touched.get(name, -TOUCH_INTERVAL_S) < TOUCH_INTERVAL_S:
            return
        self._touched[name] = now
        try:
            os.utime(self.complete_path(name))
        except OSError:
            pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cache: cannot delete %s: %s", path, exc)
