"""YeastarFS: the thin FUSE adapter. Paths and stat dicts go in, bytes or errnos come out.

Every callback resolves the path in the index, calls one component (index, cache,
downloads) and converts the result. The errno of every failure is chosen in exactly one
place, ``_errno_for``: anything unforeseen is logged and becomes EIO, never the binding's
EINVAL. This is the only module that imports mfusepy.

Open files: a cached recording is read from its cache file with ``keep_cache`` (repeated
reads are served by the kernel's page cache without reaching Python); any other recording
is read through its shared ``Download`` with ``direct_io``, so reads never depend on the
estimated size the kernel may hold.

Listings: ``FusePlus`` (a small subclass of mfusepy's ``FUSE``) answers the kernel's
READDIRPLUS with each entry's attributes, so walks and ``ls -l`` need no per-file lookup.
Extended attributes: ``user.yeastar.*`` carry a recording's CDR fields from the index; the
root's ``user.yeastarfs.status`` carries the daemon's statistics (``yeastarfs status``).

Threading: mfusepy calls back on many threads. The adapter's own state is the handle table
and the reported-size memo under ``_lock`` (held for dict access only); everything else is
the components' business.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import os
import stat
import threading
import time
from typing import Callable, Optional

import mfusepy

from yeastarfs import errors

log = logging.getLogger(__name__)

# "No such attribute": ENODATA on Linux (mfusepy exports the platform's value).
ENOATTR = getattr(mfusepy, "ENOATTR", errno.ENODATA)

# Python's buffered I/O and many tools size their reads from st_blksize; the kernel sends
# FUSE reads of up to 128 KiB, so that is the useful block size.
BLOCK_SIZE_BYTES = 128 * 1024
# How long open() waits for an uncached recording's exact size before returning anyway
# (reads never depend on it: they use direct I/O).
OPEN_SIZE_WAIT_S = 5.0
# Remember what size the kernel was last told per file, to know whether its cached size
# can be trusted for page-cache reads; bounded because a walk touches every file.
REPORTED_SIZES_MAX = 20_000
# CDR fields offered as extended attributes, name -> Recording attribute.
XATTR_PREFIX = "user.yeastar."
XATTR_FIELDS = {
    "callid": "callid", "caller": "callfrom", "callee": "callto", "type": "call_type",
    "status": "status", "start_time": "timestart", "call_seconds": "call_s",
    "talk_seconds": "talk_s", "src_trunk": "src_trunk", "dst_trunk": "dst_trunk", "did": "did",
}
# The root directory carries the daemon's statistics (JSON) for `yeastarfs status`.
STATUS_XATTR = "user.yeastarfs.status"
CACHED_XATTR = "user.yeastarfs.cached"
DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444


def _errno_for(exc: BaseException) -> int:
    """The errno a failure becomes at the FUSE boundary (style-guide §3.5)."""
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
        return exc.errno
    if isinstance(exc, errors.RecordingNotFoundError):
        return errno.ENOENT
    if isinstance(exc, errors.AuthError):
        return errno.EACCES
    if isinstance(exc, errors.CacheFullError):
        return errno.ENOSPC
    if isinstance(exc, errors.YeastarfsError):
        return errno.EIO
    log.error("fs: unexpected %s: %s", type(exc).__name__, errors.redact(str(exc)), exc_info=exc)
    return errno.EIO


def _translated(method: Callable) -> Callable:
    """Run a FUSE callback so that every exception leaves it as FuseOSError(errno)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except mfusepy.FuseOSError:
            raise
        except BaseException as exc:  # noqa: BLE001 - this is the one translation point
            if not isinstance(exc, Exception):
                raise
            code = _errno_for(exc)
            if code == errno.EIO and isinstance(exc, errors.YeastarfsError):
                log.warning("fs: %s %s: %s", method.__name__, args[0] if args else "", exc)
            raise mfusepy.FuseOSError(code) from None

    return wrapper


def _read_only(method: Callable) -> Callable:
    """Every write-type callback: the filesystem is read-only."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        raise mfusepy.FuseOSError(errno.EROFS)

    return wrapper


FUSE_CAP_READDIRPLUS_AUTO = 1 << 14  # fuse_common.h (libfuse 3)
FUSE_READDIR_PLUS = 1       # enum fuse_readdir_flags: the kernel asked for READDIRPLUS
FUSE_FILL_DIR_PLUS = 2      # enum fuse_fill_dir_flags: this entry carries full attributes


LISTING_REUSE_S = 2.0  # a listing fetched for offset 0 serves the continuation calls


class FusePlus(mfusepy.FUSE):
    """mfusepy's FUSE with READDIRPLUS: listings carry each entry's attributes (libfuse 3).

    mfusepy passes only the file type to libfuse's filler, so after every listing the
    kernel sends one LOOKUP per entry (a walk of a million recordings: a million round
    trips into Python). With libfuse 3 and the kernel asking for READDIRPLUS, this hands
    libfuse the full attributes with FUSE_FILL_DIR_PLUS, and the kernel caches the entries
    and their attributes from the listing itself. Everything else is mfusepy's.
    """

    @staticmethod
    def is_libfuse3() -> bool:
        return mfusepy.fuse_version_major == 3

    @staticmethod
    def can_invalidate() -> bool:
        """Whether `YeastarFS.invalidate` works (libfuse 3.1+), so attributes may be cached long."""
        return FusePlus.is_libfuse3() and hasattr(mfusepy._libfuse, "fuse_invalidate_path")

    def readdir_fuse_3(self, path, buf, filler, offset, fip, flags) -> int:
        plus = getattr(self.operations, "readdir_plus", None)
        if plus is None:
            return super().readdir_fuse_3(path, buf, filler, offset, fip, flags)
        entries = self._listing(path, offset, plus)
        # Offsets, not one unbounded batch: libfuse attaches the attributes (and creates the
        # kernel's entries) only for entries filled with a non-zero offset.
        st = mfusepy.c_stat()
        uid, gid = self.operations.stat_fields()
        for position in range(offset, len(entries)):
            name, mode, size_bytes, mtime_ns = entries[position]
            ctypes.memset(ctypes.byref(st), 0, ctypes.sizeof(st))
            _fill_stat(st, mode, size_bytes, mtime_ns, uid, gid)
            # Later chunks of a listing may come as plain READDIR: same entries, same offsets.
            fill_flags = FUSE_FILL_DIR_PLUS if position >= 2 and flags & FUSE_READDIR_PLUS else 0
            if filler(buf, name.encode(self.encoding, self.errors), st, position + 1, fill_flags) != 0:
                break
        return 0

    def getxattr(self, path: bytes, name: bytes, value, size: int, *args) -> int:
        # ls -l asks every file for security.selinux and system.posix_acl_access and the
        # kernel never caches the answer: refuse those here, before decoding, a Python
        # exception and the binding's logging; only user.* reaches YeastarFS.getxattr.
        if not name.startswith(b"user."):
            return -ENOATTR
        return super().getxattr(path, name, value, size, *args)

    def _listing(self, path: bytes, offset: int, plus) -> list:
        """The entries of *path*, built once per listing: a large folder is read by the
        kernel in several calls (offsets), each of which would otherwise rebuild it."""
        cache = self.__dict__.setdefault("_listings", {})
        cached = cache.get(path)
        if offset > 0 and cached is not None and time.monotonic() - cached[0] < LISTING_REUSE_S:
            return cached[1]
        entries = [(".", stat.S_IFDIR, 0, 0), ("..", stat.S_IFDIR, 0, 0)]
        entries += plus(path.decode(self.encoding, self.errors))
        if len(cache) > 64:
            cache.clear()
        cache[path] = (time.monotonic(), entries)
        return entries


STAT_FIELDS = ("st_mode", "st_nlink", "st_size", "st_blksize", "st_blocks", "st_uid", "st_gid")


def _stat_values(mode: int, size_bytes: int, uid: int, gid: int) -> tuple:
    """The attributes of an entry, in STAT_FIELDS order: one rule for getattr and listings."""
    return (mode, 2 if stat.S_ISDIR(mode) else 1, size_bytes, BLOCK_SIZE_BYTES, (size_bytes + 511) // 512,
            uid, gid)


def _fill_stat(st, mode: int, size_bytes: int, mtime_ns: int, uid: int, gid: int) -> None:
    """Set a c_stat's fields directly: what `YeastarFS._stat` returns as a dict, without the
    dict (a listing fills one per recording)."""
    for field, value in zip(STAT_FIELDS, _stat_values(mode, size_bytes, uid, gid)):
        setattr(st, field, value)
    seconds, nanoseconds = divmod(mtime_ns, 1_000_000_000)
    for spec in (st.st_mtimespec, st.st_ctimespec, st.st_atimespec):
        spec.tv_sec, spec.tv_nsec = seconds, nanoseconds


def _cdr_fields(recording) -> dict:
    """The recording's CDR fields by xattr key ("" or None when unknown)."""
    if recording is None:
        return {}
    return {key: getattr(recording, attr) for key, attr in XATTR_FIELDS.items()}


def _fh_number(fh) -> int:
    """With raw_fi the binding passes fuse_file_info, otherwise the number."""
    return fh if isinstance(fh, int) else fh.fh


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


class YeastarFS(mfusepy.Operations):
    """The recordings tree ``/YYYY/MM/DD/<recording name>``, read-only.

    Attributes:
        index: RecordingIndex (tree, attributes).
        cache: DiskCache (complete files).
        downloads: DownloadManager (everything not cached yet).

    Multithreading: ``_lock`` guards ``_handles`` and ``_reported_sizes``.
    """

    use_ns = True

    def __init__(self, index, cache, downloads, *, on_ready: Optional[Callable[[], None]] = None,
                 status: Optional[Callable[[], dict]] = None,
                 uid: Optional[int] = None, gid: Optional[int] = None, umask: int = 0o022) -> None:
        self.index = index
        self.cache = cache
        self.downloads = downloads
        self._on_ready = on_ready
        self._status = status
        self._uid = os.getuid() if uid is None else uid
        self._gid = os.getgid() if gid is None else gid
        self._dir_mode = stat.S_IFDIR | (0o555 & ~umask)
        self._file_mode = stat.S_IFREG | (0o444 & ~umask)
        self._lock = threading.Lock()
        self._handles: dict[int, object] = {}
        self._next_fh = 1
        self._reported_sizes: dict[str, int] = {}
        self._fuse_ptr: Optional[ctypes.c_void_p] = None
        self.mounted = False
        self.reads = 0      # read callbacks served (approximate under threads; for statistics)
        self.getattrs = 0   # getattr callbacks: a listing with READDIRPLUS should need none

    # -- helpers -----------------------------------------------------------------------------

    def _entry(self, path: str):
        entry = self.index.lookup(path)
        if entry is None:
            raise mfusepy.FuseOSError(errno.ENOENT)
        return entry

    def _file_size(self, entry, handle=None) -> int:
        """The exact size when anything knows it, else the index's estimate."""
        for known in (handle.exact_size() if handle is not None else None,
                      None if entry.size_exact else self.cache.size_of(entry.name)):
            if known is not None:
                return known
        return entry.size_bytes

    def _stat(self, entry, size_bytes: int = 0) -> dict:
        mode = self._dir_mode if entry.kind == "dir" else self._file_mode
        attrs = dict(zip(STAT_FIELDS, _stat_values(mode, size_bytes, self._uid, self._gid)))
        attrs.update(st_mtime=entry.mtime_ns, st_ctime=entry.mtime_ns, st_atime=entry.mtime_ns)
        return attrs

    def _remember_size(self, name: str, size_bytes: int) -> None:
        with self._lock:
            if len(self._reported_sizes) >= REPORTED_SIZES_MAX:
                self._reported_sizes.clear()
            self._reported_sizes[name] = size_bytes

    def _handle(self, fh: int):
        with self._lock:
            handle = self._handles.get(fh)
        if handle is None:
            raise mfusepy.FuseOSError(errno.EBADF)
        return handle

    def _add_handle(self, handle) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = handle
        return fh

    def invalidate(self, path: str) -> None:
        """Make the kernel forget cached attributes of *path* (its size became exact).

        Called from download threads, never from a FUSE callback for the same path.
        """
        if self._fuse_ptr is None or not FusePlus.can_invalidate():
            return  # libfuse 2: mount.py then keeps attribute timeouts at 1 s instead
        try:
            mfusepy._libfuse.fuse_invalidate_path(self._fuse_ptr, path.encode("utf-8", "surrogateescape"))
        except Exception as exc:  # noqa: BLE001 - -ENOENT when the kernel never looked the path up
            log.debug("fs: invalidate %s failed: %s", path, exc)

    # -- filesystem operations ---------------------------------------------------------------

    def init_with_config(self, conn, config) -> None:
        """libfuse 3: READDIRPLUS for every chunk of a listing, not only the first ("auto"
        mode), so no entry of a large folder needs its own LOOKUP afterwards."""
        if conn is not None and mfusepy.fuse_version_major == 3:
            conn.want &= ~FUSE_CAP_READDIRPLUS_AUTO
        self.init("/")

    @_translated
    def init(self, path: str) -> None:
        try:
            self._fuse_ptr = ctypes.c_void_p(mfusepy._libfuse.fuse_get_context().contents.fuse)
        except Exception:  # noqa: BLE001 - libfuse without a context: no invalidation
            self._fuse_ptr = None
        self.mounted = True
        if self._on_ready is not None:
            self._on_ready()

    @_translated
    def getattr(self, path: str, fh=None) -> dict:
        self.getattrs += 1
        entry = self._entry(path)
        if entry.kind == "dir":
            return self._stat(entry)
        with self._lock:
            handle = self._handles.get(_fh_number(fh)) if fh is not None else None
        size_bytes = self._file_size(entry, handle)
        self._remember_size(entry.name, size_bytes)
        return self._stat(entry, size_bytes)

    @_translated
    def readdir(self, path: str, fh) -> list:
        entries = self.index.list_dir(path)
        if entries is None:
            raise mfusepy.FuseOSError(errno.ENOENT)
        listing: list = [".", ".."]
        listing.extend((e.name, {"st_mode": DIR_MODE if e.kind == "dir" else FILE_MODE}, 0) for e in entries)
        return listing

    @_translated
    def readdir_plus(self, path: str) -> list:
        """``(name, mode, size_bytes, mtime_ns)`` per entry, for READDIRPLUS (see `FusePlus`)."""
        entries = self.index.list_dir_sizes(path)
        if entries is None:
            raise mfusepy.FuseOSError(errno.ENOENT)
        listing = []
        for name, is_dir, size_bytes, mtime_ns in entries:
            if not is_dir:
                cached = self.cache.size_of(name)  # a cached file's size is exact even if not indexed so
                size_bytes = cached if cached is not None else size_bytes
                self._reported_sizes[name] = size_bytes  # unlocked: a dict store is atomic
            listing.append((name, self._dir_mode if is_dir else self._file_mode, size_bytes, mtime_ns))
        if len(self._reported_sizes) >= REPORTED_SIZES_MAX:
            with self._lock:
                self._reported_sizes.clear()
        return listing

    def stat_fields(self) -> tuple[int, int]:
        return self._uid, self._gid

    @_translated
    def open(self, path: str, fi) -> int:
        if fi.flags & os.O_ACCMODE != os.O_RDONLY:
            raise mfusepy.FuseOSError(errno.EROFS)
        entry = self._entry(path)
        if entry.kind == "dir":
            raise mfusepy.FuseOSError(errno.EISDIR)
        fd = self.cache.open_complete(entry.name)
        if fd is not None:
            size_bytes = os.fstat(fd).st_size
            handle = _CachedHandle(entry.name, fd, size_bytes)
            with self._lock:
                trusted = self._reported_sizes.get(entry.name) == size_bytes
            # Page-cache reads stop at the size the kernel believes: only trust it if we told it.
            fi.keep_cache, fi.direct_io = (1, 0) if trusted else (0, 1)
        else:
            handle = _StreamHandle(entry.name, self.downloads.acquire(entry.name, entry.size_bytes))
            fi.direct_io = 1
            try:
                # Tools fstat right after open and seek from the end: let them see the exact
                # size (the PBX's reply headers come within milliseconds).
                handle.download.wait_for_size(OPEN_SIZE_WAIT_S)
            except BaseException:
                self.downloads.release(handle.download)
                raise
        fi.fh = self._add_handle(handle)
        return 0

    @_translated
    def read(self, path: str, size: int, offset: int, fh) -> bytes:
        self.reads += 1
        return self._handle(_fh_number(fh)).read(offset, size)

    @_translated
    def release(self, path: str, fh) -> int:
        with self._lock:
            handle = self._handles.pop(_fh_number(fh), None)
        if isinstance(handle, _CachedHandle):
            os.close(handle.fd)
            self.cache.release(handle.name)
        elif isinstance(handle, _StreamHandle):
            self.downloads.release(handle.download)
        return 0

    @_translated
    def statfs(self, path: str) -> dict:
        # Read-only and remote: "size" is the cache budget, nothing is free for writing.
        blocks = max(1, self.cache.max_bytes // BLOCK_SIZE_BYTES)
        return {"f_bsize": BLOCK_SIZE_BYTES, "f_frsize": BLOCK_SIZE_BYTES, "f_blocks": blocks,
                "f_bfree": 0, "f_bavail": 0, "f_files": self.index.count(), "f_ffree": 0,
                "f_favail": 0, "f_namemax": 255}

    @_translated
    def listxattr(self, path: str) -> list:
        entry = self._entry(path)
        if entry.kind == "dir":
            return [STATUS_XATTR] if path == "/" and self._status is not None else []
        return [XATTR_PREFIX + key for key, value in _cdr_fields(entry.recording).items() if value != ""]

    @_translated
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if not name.startswith("user."):
            # ls -l asks for security.selinux and system.posix_acl_access on every file, and
            # the kernel does not cache the answer: say no before touching the index.
            raise mfusepy.FuseOSError(ENOATTR)
        entry = self._entry(path)
        if name == CACHED_XATTR and entry.kind == "file":  # for `yeastarfs prefetch`; not listed
            return b"1" if self.cache.contains(entry.name) else b"0"
        if entry.kind == "dir":
            if path == "/" and name == STATUS_XATTR and self._status is not None:
                return json.dumps(self._status(), default=str).encode()
            raise mfusepy.FuseOSError(ENOATTR)
        value = _cdr_fields(entry.recording).get(name[len(XATTR_PREFIX):]) if name.startswith(XATTR_PREFIX) else None
        if value is None or value == "":
            raise mfusepy.FuseOSError(ENOATTR)
        return str(value).encode("utf-8")

    # -- everything that would change the tree: EROFS ----------------------------------------

    @_read_only
    def chmod(self, path, mode): ...

    @_read_only
    def chown(self, path, uid, gid): ...

    @_read_only
    def create(self, path, mode, fi=None): ...

    @_read_only
    def link(self, target, source): ...

    @_read_only
    def mkdir(self, path, mode): ...

    @_read_only
    def mknod(self, path, mode, dev): ...

    @_read_only
    def removexattr(self, path, name): ...

    @_read_only
    def rename(self, old, new): ...

    @_read_only
    def rmdir(self, path): ...

    @_read_only
    def setxattr(self, path, name, value, options, position=0): ...

    @_read_only
    def symlink(self, target, source): ...

    @_read_only
    def truncate(self, path, length, fh=None): ...

    @_read_only
    def unlink(self, path): ...

    @_read_only
    def utimens(self, path, times=None): ...

    @_read_only
    def write(self, path, data, offset, fh): ...
