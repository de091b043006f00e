"""The core: the recordings tree as a read-only filesystem, without any FUSE binding.

`Core` answers what a filesystem is asked (stat, list, open, read, release, extended
attributes, statfs) from the index, the cache and the downloads. ``fs.py`` is a thin
adapter that turns these answers into the binding's dicts and errnos; a unit test (or
another adapter) can use the core directly.

Owns the policies the adapter must not hold:

- **which size is true.** A file's size is the exact size when anything knows it (the
  open handle's download, the cache, the index), else the index's estimate. Every size
  handed to the kernel is remembered (bounded), because the kernel's page cache may be
  trusted for a cached file only when the kernel was told that file's exact size;
- **which kind of handle a file gets.** A cached recording is read from its cache file
  (page cache allowed, ``keep_cache``); any other through its shared download with direct
  I/O, so reads never depend on an estimated size. ``open`` waits up to
  ``OPEN_SIZE_WAIT_S`` for the PBX's reply headers so that ``fstat`` right after ``open``
  sees the exact size, and says when the kernel may hold another size for the path
  (`OpenFile.size_changed`: the adapter invalidates it before the open returns). A
  download is read with direct I/O (a read asks exactly what its reader asked); once
  committed, its bytes are put in the kernel's page cache when the kernel was told its
  exact size (``download_committed``), where the next open (``keep_cache``) finds them;
- **who gets an uncached recording.** A background reader (``--background-readers``:
  thumbnailers, indexers) is served from the cache only; an uncached recording is refused
  at once (`errors.BackgroundReaderError`), so that browsing never makes the PBX send
  every file of a folder. An exact-size reader (``--exact-size-readers``: file servers,
  which read exactly the size they stat after opening) gets a recording only once its exact
  size is known: its open waits up to the downloads' stall timeout, then fails
  (`errors.DownloadStalledError`, EIO), never hands it an estimate to truncate at;
- **recordings the PBX no longer has.** "Does not exist" for a young recording (first
  seen less than ``YOUNG_S`` ago, its call over less than ``YOUNG_CALL_S`` before that:
  the PBX may still be writing it) is retried for ``NOT_FOUND_GRACE_S``; past that, the
  index marks it gone and the kernel forgets it: it leaves its folder unless a cached copy
  keeps it there (and readable);
- **learning the estimate.** Completed downloads teach the index this PBX's bytes per
  second of talk (a running average kept in the index), so unseen files are estimated
  better; a size learned mid-download reaches the index and the kernel (through the
  adapter's invalidation callback) at once; and whether the PBX honours Range is kept in
  the index for the next start;
- **statfs and the open counters** ``status`` shows: the cache budget, what is held, and
  how opens were served (from the cache, by joining a running download, by a new one);
- the extended attributes: ``user.yeastar.*`` from the index, the root's
  ``user.yeastarfs.status`` (the daemon's statistics), and each file's
  ``user.yeastarfs.cached`` and ``user.yeastarfs.cache`` (complete, partial, none).

Errors: raises ``errors.TreeError`` types (no such path, no such attribute, bad handle,
is a folder, read-only) and lets the components' errors through; the adapter maps both.

Threading: every method may be called from any thread (FUSE callbacks). ``_lock`` guards
the handle table and the reported-size memo, and is held for dict access only; the
components lock themselves. The invalidation callback is called from download threads,
never while a lock is held.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
import threading
import time
from typing import Callable, Iterable, Optional

from yeastarfs import errors
from yeastarfs.index import WAV_HEADER_BYTES
from yeastarfs.readers import ProcessNames, Reader

log = logging.getLogger(__name__)

# How long open() waits for an uncached recording's exact size before returning anyway
# (reads never depend on it: without it they use direct I/O).
OPEN_SIZE_WAIT_S = 5.0
# Remember what size the kernel was last told per file, to know whether its cached size
# can be trusted for page-cache reads; bounded because a walk touches every file.
REPORTED_SIZES_MAX = 20_000
# A download larger than this is not copied into the page cache at its commit: its reader
# would wait for the copy, and the pages would push out others (an hour of PCM is 58 MB).
PAGE_CACHE_FILL_MAX_BYTES = 128 << 20
# Learned bytes-per-second of this PBX's recordings, kept in the index between runs.
RATE_META_KEY = "estimate_bytes_per_s"
# Whether this PBX honours Range ("1"/"0"), kept in the index between runs.
RANGE_META_KEY = "pbx_honours_range"
# A recording is young (the PBX may still be writing it) when first seen less than YOUNG_S
# ago and its call ended at most YOUNG_CALL_S before that (a backfill finds old calls);
# "does not exist" for a young one is retried for NOT_FOUND_GRACE_S before the read fails.
YOUNG_S = 60.0
YOUNG_CALL_S = 600.0
NOT_FOUND_GRACE_S = 30.0
# Weight of the newest completed download in the running average.
RATE_SMOOTHING = 0.2
# CDR fields offered as extended attributes, name -> Recording attribute.
XATTR_PREFIX = "user.yeastar."
XATTR_FIELDS = {
    "callid": "callid", "caller": "callfrom", "callee": "callto", "type": "call_type",
    "status": "status", "start_time": "timestart", "call_seconds": "call_s",
    "talk_seconds": "talk_s", "src_trunk": "src_trunk", "dst_trunk": "dst_trunk", "did": "did",
}
# The root carries the daemon's statistics (JSON) for `yeastarfs status`.
STATUS_XATTR = "user.yeastarfs.status"
CACHED_XATTR = "user.yeastarfs.cached"
# Per file: "complete", "partial <bytes held> of <total bytes or ?>" or "none"; not listed
# (a copy with its xattrs, rsync -X, must not carry a state that is only true here).
CACHE_XATTR = "user.yeastarfs.cache"
# Python's buffered I/O and many tools size their reads from st_blksize; the kernel sends
# FUSE reads of up to 128 KiB, so that is the useful block size.
BLOCK_SIZE_BYTES = 128 * 1024
NAME_MAX_BYTES = 255


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What ``stat`` says of an entry (owner and mode bits come from `Core.mode_of`).

    ``stored_bytes`` is what this machine holds of it on disk: a cached recording's size, 0 for
    one not cached (and for folders) — the adapter's ``st_blocks``, so ``du`` tells the truth.
    """

    is_dir: bool
    size_bytes: int
    mtime_ns: int
    stored_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class OpenFile:
    """An opened recording: its handle, and how the kernel may cache its pages.

    ``size_changed``: the kernel may hold another size for this path than the exact one now
    known (it was told an estimate, or nothing this core remembers). The adapter makes the
    kernel forget it before the open returns, so a ``fstat`` right after (Samba's) asks again.
    """

    fh: int
    keep_cache: bool
    direct_io: bool
    size_changed: bool = False


@dataclasses.dataclass(frozen=True)
class FsStats:
    """``statfs``, in blocks of ``block_size``: the size is the cache budget; *free* is what
    the cache does not hold; *available* is what new recordings may use (idle cached files
    are evicted for them), so an idle mount never looks full."""

    block_size: int
    blocks: int
    blocks_free: int
    blocks_available: int
    files: int
    name_max: int


class _CachedHandle:
    """An open complete cache file."""

    def __init__(self, name: str, fd: int, size_bytes: int) -> None:
        self.name, self.fd, self.size_bytes = name, fd, size_bytes

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def exact_size(self) -> Optional[int]:
        return self.size_bytes


class _StreamHandle:
    """A recording being downloaded; reads wait for their bytes."""

    def __init__(self, name: str, download) -> None:
        self.name, self.download = name, download

    def read(self, offset: int, size: int) -> bytes:
        return self.download.read(offset, size)

    def exact_size(self) -> Optional[int]:
        return self.download.size_if_known()


class Core:
    """The recordings tree ``/YYYY/MM/DD/<recording name>``, read-only.

    Attributes:
        index: RecordingIndex (tree, attributes, sizes).
        cache: DiskCache (complete files).
        downloads: DownloadManager (everything not cached yet).
        counters: operations served, by name (approximate under threads; for statistics).

    Multithreading: see the module docstring.
    """

    def __init__(self, index, cache, downloads, *, status: Optional[Callable[[], dict]] = None,
                 uid: Optional[int] = None, gid: Optional[int] = None, umask: int = 0o022,
                 background_readers: Iterable[str] = (), exact_size_readers: Iterable[str] = ()) -> None:
        self.index = index
        self.cache = cache
        self.downloads = downloads
        self._status = status
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self._dir_mode = stat.S_IFDIR | (0o555 & ~umask)
        self._file_mode = stat.S_IFREG | (0o444 & ~umask)
        self._lock = threading.Lock()
        self._handles: dict[int, object] = {}
        self._next_fh = 1
        self._reported_sizes: dict[str, int] = {}
        self._invalidate: Callable[[str], bool] = lambda path: False
        self._inode_of: Callable[[str], Optional[int]] = lambda path: None
        self._fill_pages: Callable[[int, int, Callable[[int, int], bytes]], bool] = lambda *args: False
        self._inodes: dict[str, int] = {}   # name -> the kernel's inode, for downloads being read
        self.counters = {"getattr": 0, "read": 0, "open": 0, "readdir": 0, "open_cached": 0, "open_refused": 0}
        self._background = ProcessNames(background_readers)
        self._exact_size = ProcessNames(exact_size_readers)
        self._rate = self._stored_rate()
        stored_range = index.get_meta(RANGE_META_KEY)
        if downloads is not None and downloads.range_honoured is None and stored_range in ("0", "1"):
            downloads.range_honoured = stored_range == "1"

    def set_invalidator(self, invalidate: Callable[[str], bool]) -> None:
        """Tell the core how to make the kernel forget a path's cached attributes and pages;
        *invalidate* returns True when the kernel then holds nothing stale of the path."""
        self._invalidate = invalidate

    def set_page_filler(self, inode_of: Callable[[str], Optional[int]],
                        fill: Callable[[int, int, Callable[[int, int], bytes]], bool]) -> None:
        """Tell the core how to put a file's bytes in the kernel's page cache: *inode_of(path)*
        is the kernel's inode of a path it holds (None if not), *fill(inode, size, pread)*
        stores the bytes ``pread(n, offset)`` gives and answers whether it did."""
        self._inode_of, self._fill_pages = inode_of, fill

    def mode_of(self, is_dir: bool) -> int:
        return self._dir_mode if is_dir else self._file_mode

    # -- the tree ------------------------------------------------------------------------------

    def stat(self, path: str, fh: Optional[int] = None) -> Attributes:
        """The attributes of *path*. Raises NoSuchPathError."""
        self.counters["getattr"] += 1
        entry = self._entry(path)
        if entry.kind == "dir":
            return Attributes(True, 0, entry.mtime_ns)
        with self._lock:
            handle = self._handles.get(fh) if fh is not None else None
        size_bytes = self._file_size(entry, handle)
        self._remember_size(entry.name, size_bytes)
        return Attributes(False, size_bytes, entry.mtime_ns, self.cache.size_of(entry.name) or 0)

    def list(self, path: str, after: str = "", skip: int = 0,
             limit: int = -1) -> list[tuple[str, bool, int, int, int]]:
        """``(name, is_dir, size_bytes, mtime_ns, stored_bytes)`` of the entries of folder *path*, by name
        (`Attributes` says what each means).

        All of them, or a page: those named after *after*, *skip* more left out, at most
        *limit* (the adapter pages through a day of a million recordings this way, in
        bounded memory). Raises NoSuchPathError. Sizes are what `stat` would say, and are
        remembered as told.
        """
        self.counters["readdir"] += 1
        entries = self.index.list_dir_sizes(path, after, skip, limit)
        if entries is None:
            raise errors.NoSuchPathError(path)
        listing = []
        for name, is_dir, size_bytes, mtime_ns, gone in entries:
            cached = None
            if not is_dir:
                cached = self.cache.size_of(name)  # a cached file's size is exact even if not indexed so
                if gone and cached is None:
                    continue  # deleted on the PBX and not kept here: it has left its folder
                size_bytes = cached if cached is not None else size_bytes
                self._reported_sizes[name] = size_bytes  # unlocked: a dict store is atomic
            listing.append((name, is_dir, size_bytes, mtime_ns, cached or 0))
        if len(self._reported_sizes) >= REPORTED_SIZES_MAX:
            with self._lock:
                self._reported_sizes.clear()
        return listing

    # -- file contents -------------------------------------------------------------------------

    def open(self, path: str, writing: bool = False, reader: Optional[Reader] = None) -> OpenFile:
        """Open recording *path* for *reader* (None: unknown, an ordinary reader). Raises
        ReadOnlyError, IsADirError, NoSuchPathError, BackgroundReaderError, or the
        download's error when it failed before its size was known."""
        self.counters["open"] += 1
        if writing:
            raise errors.ReadOnlyError(path)
        entry = self._entry(path)
        if entry.kind == "dir":
            raise errors.IsADirError(path)
        fd = self.cache.open_complete(entry.name)
        if fd is not None:
            self.counters["open_cached"] += 1
            size_bytes = os.fstat(fd).st_size
            handle = _CachedHandle(entry.name, fd, size_bytes)
            trusted = not self._size_changed(entry.name, size_bytes)
            # Page-cache reads stop at the size the kernel believes: only trust it if we told it.
            return OpenFile(self._add_handle(handle), keep_cache=trusted, direct_io=not trusted,
                            size_changed=not trusted)
        background = self._background.match(reader)
        if background is not None:
            self.counters["open_refused"] += 1
            log.debug("core: %s (pid %d) is a background reader; %s is not cached", background, reader.pid, path)
            raise errors.BackgroundReaderError(f"{path} is not cached, and {background} is a background reader")
        download = self.downloads.acquire(entry.name, not_found_grace_s=self._not_found_grace_s(entry))
        try:
            size_bytes = self._wait_for_size(entry, download, reader)
        except BaseException:
            self.downloads.release(download)
            raise
        # Direct I/O: each read asks exactly what the reader asked. Through the page cache,
        # the kernel's read-ahead would ask more of a sniffed file, which the flow-control
        # window then doubles. The pages come at commit instead (`download_committed`).
        inode = self._inode_of(path)
        if inode is not None:
            with self._lock:
                if len(self._inodes) >= REPORTED_SIZES_MAX:
                    self._inodes.clear()
                self._inodes[entry.name] = inode
        size_changed = size_bytes is not None and self._size_changed(entry.name, size_bytes)
        return OpenFile(self._add_handle(_StreamHandle(entry.name, download)), keep_cache=False, direct_io=True,
                        size_changed=size_changed)

    def _wait_for_size(self, entry, download, reader: Optional[Reader]) -> Optional[int]:
        """The exact size of the recording being opened, once known (None: an estimate stands).

        Tools fstat right after open and seek from the end: let them see the exact size (the
        PBX's reply headers come within milliseconds). An exact-size reader reads exactly what
        it stats: it waits longer, up to the stall timeout (a download queued behind
        ``--max-downloads`` others gets its size when a slot frees), and never gets an estimate.
        A size the catalogue gave (P-Series) is exact already.
        """
        server = None if entry.size_exact else self._exact_size.match(reader)
        wait_s = self.downloads.stall_timeout_s if server is not None else OPEN_SIZE_WAIT_S
        size_bytes = download.wait_for_size(wait_s)
        if size_bytes is None and entry.size_exact:
            return entry.size_bytes
        if size_bytes is None and server is not None:
            raise errors.DownloadStalledError(
                f"recording {entry.name}: no exact size from the PBX after {wait_s:.0f} s; "
                f"not opened for {server}, which would read only the estimated size")
        return size_bytes

    def read(self, fh: int, offset: int, size: int) -> bytes:
        """*size* bytes at *offset* (fewer only at the end). Raises BadHandleError, or the
        download's error."""
        self.counters["read"] += 1
        return self._handle(fh).read(offset, size)

    def release(self, fh: int) -> None:
        with self._lock:
            handle = self._handles.pop(fh, None)
        if isinstance(handle, _CachedHandle):
            os.close(handle.fd)
            self.cache.release(handle.name)
        elif isinstance(handle, _StreamHandle):
            self.downloads.release(handle.download)

    # -- metadata ------------------------------------------------------------------------------

    def xattr_names(self, path: str) -> list[str]:
        entry = self._entry(path)
        if entry.kind == "dir":
            return [STATUS_XATTR] if path == "/" and self._status is not None else []
        return [XATTR_PREFIX + key for key, value in _cdr_fields(entry.recording).items() if value != ""]

    def xattr(self, path: str, name: str) -> bytes:
        """The value of extended attribute *name*. Raises NoSuchAttributeError."""
        if not name.startswith("user."):
            raise errors.NoSuchAttributeError(name)
        entry = self._entry(path)
        if name == CACHED_XATTR and entry.kind == "file":  # for `yeastarfs prefetch`; not listed
            return b"1" if self.cache.contains(entry.name) else b"0"
        if name == CACHE_XATTR and entry.kind == "file":  # for `yeastarfs status PATH`
            return self._cache_state(entry.name).encode()
        if entry.kind == "dir":
            if path == "/" and name == STATUS_XATTR and self._status is not None:
                return json.dumps(self._status(), default=str).encode()
            raise errors.NoSuchAttributeError(name)
        key = name[len(XATTR_PREFIX):] if name.startswith(XATTR_PREFIX) else None
        value = _cdr_fields(entry.recording).get(key) if key else None
        if value is None or value == "":
            raise errors.NoSuchAttributeError(name)
        return str(value).encode("utf-8")

    def statfs(self) -> FsStats:
        """The cache budget and its use (see `FsStats`)."""
        usage = self.cache.usage()
        budget = self.cache.max_bytes
        held = usage["idle_bytes"] + usage["pinned_bytes"]
        blocks = max(1, budget // BLOCK_SIZE_BYTES)
        return FsStats(BLOCK_SIZE_BYTES, blocks, max(0, budget - held) // BLOCK_SIZE_BYTES,
                       max(0, budget - usage["pinned_bytes"]) // BLOCK_SIZE_BYTES, self.index.count(),
                       NAME_MAX_BYTES)

    def transfer_stats(self) -> dict:
        """What ``status`` shows of opens and downloads (no PBX request)."""
        counts = self.downloads.counts if self.downloads is not None else {"started": 0, "joined": 0}
        cached, started = self.counters["open_cached"], counts["started"]
        downloads = [download.snapshot() for download in self.downloads.running()] if self.downloads else []
        return {
            "opens": {"cached": cached, "joined": counts["joined"], "downloaded": started,
                      "refused": self.counters["open_refused"]},
            # Opens that joined a running download cost the PBX nothing more: not misses.
            "cache_hit_rate": round(cached / (cached + started), 3) if cached + started else None,
            "downloads_in_flight": downloads,
            "pbx_honours_range": self.downloads.range_honoured if self.downloads is not None else None,
        }

    # -- what the downloads teach --------------------------------------------------------------

    def size_learned(self, name: str, size_bytes: int) -> None:
        """A download learned *name*'s exact size: the index keeps it, the kernel forgets
        the estimate (called from download threads)."""
        self.index.set_size(name, size_bytes)
        self._invalidate(self.index.path_of(name))

    def download_committed(self, name: str, size_bytes: int, pread: Callable[[int, int], bytes]) -> None:
        """A download read through the mount is committed, its readers not told yet (download
        thread): when the kernel was told its exact size, put its bytes in the kernel's page
        cache, so that the next open (``keep_cache``) reads none of it through FUSE."""
        with self._lock:
            inode = self._inodes.pop(name, None)
            told = self._reported_sizes.get(name) == size_bytes
        if inode is None or not told or size_bytes > PAGE_CACHE_FILL_MAX_BYTES:
            return
        if self._fill_pages(inode, size_bytes, pread):
            log.debug("recording %s: %d bytes put in the page cache", name, size_bytes)

    def recording_gone(self, name: str) -> None:
        """The PBX says *name* does not exist (past any grace): the index marks it gone and
        the kernel forgets it, so it leaves its folder unless cached (called from download
        threads)."""
        if self.index.mark_gone(name):
            log.info("recording %s: the PBX no longer has it; it stays only if cached", name)
            self._invalidate(self.index.path_of(name))

    def range_learned(self, honoured: bool) -> None:
        """Keep what the downloads learned about Range for the next start."""
        self.index.set_meta(RANGE_META_KEY, "1" if honoured else "0")

    def download_complete(self, name: str, size_bytes: int) -> None:
        """Learn this PBX's bytes per second of talk, so estimates of unseen files improve."""
        entry = self.index.get(name)
        talk_s = entry.recording.talk_s if entry is not None and entry.recording is not None else None
        if not talk_s:
            return
        rate = max(1.0, (size_bytes - WAV_HEADER_BYTES) / talk_s)
        previous = self._rate
        self._rate = rate if previous is None else previous + RATE_SMOOTHING * (rate - previous)
        self.index.set_estimate_rate(self._rate)
        self.index.set_meta(RATE_META_KEY, f"{self._rate:.1f}")

    def _stored_rate(self) -> Optional[float]:
        stored = self.index.get_meta(RATE_META_KEY)
        rate = float(stored) if stored else None
        if rate:
            self.index.set_estimate_rate(rate)
        return rate

    def _cache_state(self, name: str) -> str:
        """What this machine holds of recording *name*, from the cache and the downloads alone."""
        if self.cache.contains(name):
            return "complete"
        for download in self.downloads.running():
            if download.name == name:
                held_bytes, total_bytes = download.progress()
                if held_bytes:
                    return f"partial {held_bytes} of {'?' if total_bytes is None else total_bytes}"
        return "none"

    # -- helpers -------------------------------------------------------------------------------

    def _entry(self, path: str):
        entry = self.index.lookup(path)
        if entry is None or (entry.gone and not self.cache.contains(entry.name)):
            raise errors.NoSuchPathError(path)
        return entry

    def _not_found_grace_s(self, entry) -> float:
        """How long "does not exist" is retried for *entry* (module docstring)."""
        first_seen, recording = entry.first_seen, entry.recording
        if first_seen is None or time.time() - first_seen > YOUNG_S:
            return 0.0
        talk_s = (recording.talk_s or recording.call_s or 0) if recording is not None else 0
        call_end_s = entry.mtime_ns / 1e9 + talk_s
        return NOT_FOUND_GRACE_S if first_seen - call_end_s <= YOUNG_CALL_S else 0.0

    def _file_size(self, entry, handle=None) -> int:
        """The exact size when anything knows it, else the index's estimate."""
        for known in (handle.exact_size() if handle is not None else None,
                      None if entry.size_exact else self.cache.size_of(entry.name)):
            if known is not None:
                return known
        return entry.size_bytes

    def _size_changed(self, name: str, size_bytes: int) -> bool:
        """Whether the kernel may hold another size for *name* than *size_bytes*."""
        with self._lock:
            return self._reported_sizes.get(name) != size_bytes

    def _remember_size(self, name: str, size_bytes: int) -> None:
        with self._lock:
            if len(self._reported_sizes) >= REPORTED_SIZES_MAX:
                self._reported_sizes.clear()
            self._reported_sizes[name] = size_bytes

    def _handle(self, fh: int):
        with self._lock:
            handle = self._handles.get(fh)
        if handle is None:
            raise errors.BadHandleError(f"no open file with handle {fh}")
        return handle

    def _add_handle(self, handle) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = handle
        return fh


def _cdr_fields(recording) -> dict:
    """The recording's CDR fields by xattr key ("" or None when unknown)."""
    if recording is None:
        return {}
    return {key: getattr(recording, attr) for key, attr in XATTR_FIELDS.items()}
