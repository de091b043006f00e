"""YeastarFS: the thin FUSE adapter. Paths and stat dicts go in, bytes or errnos come out.

Every callback calls one method of the core (``core.Core``), which holds all the policy,
and converts its answer into what mfusepy wants; ``open`` also tells the core who is asking
(the pid and uid of the FUSE request, which only the binding can read). The errno of every failure is chosen in
exactly one place, ``_errno_for``: anything unforeseen is logged and becomes EIO, never
the binding's EINVAL. This is the only module that imports mfusepy.

Listings: ``FusePlus`` (a small subclass of mfusepy's ``FUSE``) answers the kernel's
READDIRPLUS with each entry's attributes, so walks and ``ls -l`` need no per-file lookup,
and refuses the ``security.*``/``system.*`` extended attributes ``ls -l`` asks of every
file before they reach Python. ``YeastarFS.invalidate`` makes the kernel forget a path's
cached attributes (libfuse 3), which lets the mount use long attribute timeouts.

Threading: mfusepy calls back on many threads; the adapter has no state of its own but the
libfuse pointer, set once in ``init``. The core is thread-safe.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import functools
import logging
import os
import stat
from typing import Callable, Optional

import mfusepy

from yeastarfs import errors
from yeastarfs.core import BLOCK_SIZE_BYTES
from yeastarfs.readers import Reader

log = logging.getLogger(__name__)

# "No such attribute": ENODATA on Linux (mfusepy exports the platform's value).
ENOATTR = getattr(mfusepy, "ENOATTR", errno.ENODATA)
FILE_MODE = stat.S_IFREG | 0o444
# What a background reader (thumbnailer, indexer) gets for an uncached recording: "permission
# denied" is a failure those programs record and do not retry (README "File managers").
BACKGROUND_READER_ERRNO = errno.EACCES

# What the core refuses, by type: checked in order, so subclasses come before their bases.
_TREE_ERRNOS = (
    (errors.NoSuchPathError, errno.ENOENT),
    (errors.NoSuchAttributeError, ENOATTR),
    (errors.BadHandleError, errno.EBADF),
    (errors.IsADirError, errno.EISDIR),
    (errors.ReadOnlyError, errno.EROFS),
    (errors.RecordingNotFoundError, errno.ENOENT),
    (errors.AuthError, errno.EACCES),
    (errors.CacheFullError, errno.ENOSPC),
    (errors.BackgroundReaderError, BACKGROUND_READER_ERRNO),
)


def _errno_for(exc: BaseException) -> int:
    """The errno a failure becomes at the FUSE boundary (style-guide §3.5)."""
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
        return exc.errno
    for error_type, code in _TREE_ERRNOS:
        if isinstance(exc, error_type):
            return code
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
            if code == errno.EIO and isinstance(exc, errors.YeastarfsError) and not isinstance(exc, errors.TreeError):
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


# Entries read from the index per page of a listing: large enough that a page costs one
# query, small enough that a folder of any size needs little memory.
LISTING_PAGE_ENTRIES = 1024
# Entries of one folder that carry their attributes (READDIRPLUS). libfuse keeps a node (about
# 250 bytes) for each entry it hands out with attributes, until the kernel forgets it: past this
# many (a day busier than any PBX's), entries go without, and a folder of a million
# recordings costs at most this many nodes (~12 MB); `ls -l` then looks the rest up one by one.
LISTING_PLUS_MAX_ENTRIES = 50_000
# Listings in progress whose rest of a page is kept for the kernel's next call; bounded (the
# oldest is forgotten, and found again by counting if its reader comes back).
LISTINGS_PENDING_MAX = 32


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
        # Offsets, not one unbounded batch: libfuse attaches the attributes (and creates the
        # kernel's entries) only for entries filled with a non-zero offset. The kernel asks for
        # a large folder in many calls (a few dozen entries each), each starting at the offset
        # after the last entry it took. The folder is read from the index a page at a time, and
        # the rest of the page in use waits for the next call (`_pending`), so a day of a
        # million recordings costs one query per page and bounded memory.
        st = mfusepy.c_stat()
        uid, gid = self.operations.stat_fields()
        position = offset
        for name in (".", "..")[offset:]:
            if filler(buf, name.encode(), None, position + 1, 0) != 0:
                return 0
            position += 1
        decoded = path.decode(self.encoding, self.errors)
        entries, more = self._page_at(path, decoded, position, plus)
        while entries:
            for index, (name, mode, size_bytes, mtime_ns) in enumerate(entries):
                ctypes.memset(ctypes.byref(st), 0, ctypes.sizeof(st))
                _fill_stat(st, mode, size_bytes, mtime_ns, uid, gid)
                # Later chunks of a listing may come as plain READDIR: same entries, same offsets.
                plus_wanted = flags & FUSE_READDIR_PLUS and position < LISTING_PLUS_MAX_ENTRIES
                fill_flags = FUSE_FILL_DIR_PLUS if plus_wanted else 0
                if filler(buf, name.encode(self.encoding, self.errors), st, position + 1, fill_flags) != 0:
                    self._keep_pending(path, position, entries[index:], more)
                    return 0
                position += 1
            if not more:
                return 0
            entries = plus(decoded, entries[-1][0], 0, LISTING_PAGE_ENTRIES)
            more = len(entries) == LISTING_PAGE_ENTRIES
        return 0

    def _page_at(self, path: bytes, decoded: str, position: int, plus) -> tuple[list, bool]:
        """The entries from *position* on (up to a page), and whether more pages follow."""
        pending = self.__dict__.setdefault("_pending", collections.OrderedDict()).pop((path, position), None)
        if pending is not None:
            return pending
        # A listing starts at position 2, after "." and ".."; without a pending page (a seekdir,
        # or one forgotten) the place is found by counting.
        entries = plus(decoded, "", position - 2, LISTING_PAGE_ENTRIES)
        return entries, len(entries) == LISTING_PAGE_ENTRIES

    def _keep_pending(self, path: bytes, position: int, entries: list, more: bool) -> None:
        pending = self.__dict__.setdefault("_pending", collections.OrderedDict())
        pending[(path, position)] = (entries, more)
        while len(pending) > LISTINGS_PENDING_MAX:
            pending.popitem(last=False)

    def getxattr(self, path: bytes, name: bytes, value, size: int, *args) -> int:
        # ls -l asks every file for security.selinux and system.posix_acl_access and the
        # kernel never caches the answer: refuse those here, before decoding, a Python
        # exception and the binding's logging; only user.* reaches YeastarFS.getxattr.
        if not name.startswith(b"user."):
            return -ENOATTR
        return super().getxattr(path, name, value, size, *args)


STAT_FIELDS = ("st_mode", "st_nlink", "st_size", "st_blksize", "st_blocks", "st_uid", "st_gid")


def _stat_values(mode: int, size_bytes: int, uid: int, gid: int) -> tuple:
    """The attributes of an entry, in STAT_FIELDS order: one rule for getattr and listings."""
    return (mode, 2 if stat.S_ISDIR(mode) else 1, size_bytes, BLOCK_SIZE_BYTES, (size_bytes + 511) // 512,
            uid, gid)


def _fill_stat(st, mode: int, size_bytes: int, mtime_ns: int, uid: int, gid: int) -> None:
    """Set a c_stat's fields directly: what `YeastarFS.getattr` returns as a dict, without the
    dict (a listing fills one per recording)."""
    for field, value in zip(STAT_FIELDS, _stat_values(mode, size_bytes, uid, gid)):
        setattr(st, field, value)
    seconds, nanoseconds = divmod(mtime_ns, 1_000_000_000)
    for spec in (st.st_mtimespec, st.st_ctimespec, st.st_atimespec):
        spec.tv_sec, spec.tv_nsec = seconds, nanoseconds


def _caller() -> Optional[Reader]:
    """Who sent the FUSE request being answered (valid only inside a callback), or None."""
    try:
        uid, _, pid = mfusepy.fuse_get_context()
    except (ValueError, OSError, AttributeError):  # no request context (a direct call, in tests)
        return None
    return Reader(pid=pid, uid=uid)


def _fh_number(fh) -> int:
    """With raw_fi the binding passes fuse_file_info, otherwise the number."""
    return fh if isinstance(fh, int) else fh.fh


class YeastarFS(mfusepy.Operations):
    """The FUSE callbacks over a `core.Core`: resolve, call the core, translate.

    Attributes:
        core: the Core that answers everything.
        mounted: True once libfuse called ``init`` (the kernel has mounted).

    Multithreading: no state of its own but the libfuse pointer, set once in ``init``.
    """

    use_ns = True

    def __init__(self, core, *, on_ready: Optional[Callable[[], None]] = None) -> None:
        self.core = core
        self._on_ready = on_ready
        self._fuse_ptr: Optional[ctypes.c_void_p] = None
        self.mounted = False
        core.set_invalidator(self.invalidate)

    def stat_fields(self) -> tuple[int, int]:
        return self.core.uid, self.core.gid

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
        attributes = self.core.stat(path, _fh_number(fh) if fh is not None else None)
        mode = self.core.mode_of(attributes.is_dir)
        stat_dict = dict(zip(STAT_FIELDS, _stat_values(mode, attributes.size_bytes, self.core.uid, self.core.gid)))
        stat_dict.update(st_mtime=attributes.mtime_ns, st_ctime=attributes.mtime_ns, st_atime=attributes.mtime_ns)
        return stat_dict

    @_translated
    def readdir(self, path: str, fh) -> list:
        listing: list = [".", ".."]
        # Plain READDIR needs only each entry's type; libfuse asks getattr for the rest.
        listing.extend((name, {"st_mode": stat.S_IFDIR | 0o555 if is_dir else FILE_MODE}, 0)
                       for name, is_dir, _, _ in self.core.list(path))
        return listing

    @_translated
    def readdir_plus(self, path: str, after: str = "", skip: int = 0, limit: int = -1) -> list:
        """``(name, mode, size_bytes, mtime_ns)`` per entry of a page, for READDIRPLUS (see `FusePlus`)."""
        return [(name, self.core.mode_of(is_dir), size_bytes, mtime_ns)
                for name, is_dir, size_bytes, mtime_ns in self.core.list(path, after, skip, limit)]

    @_translated
    def open(self, path: str, fi) -> int:
        opened = self.core.open(path, writing=fi.flags & os.O_ACCMODE != os.O_RDONLY, reader=_caller())
        fi.fh, fi.keep_cache, fi.direct_io = opened.fh, int(opened.keep_cache), int(opened.direct_io)
        return 0

    @_translated
    def read(self, path: str, size: int, offset: int, fh) -> bytes:
        return self.core.read(_fh_number(fh), offset, size)

    @_translated
    def release(self, path: str, fh) -> int:
        self.core.release(_fh_number(fh))
        return 0

    @_translated
    def statfs(self, path: str) -> dict:
        fs_stats = self.core.statfs()
        return {"f_bsize": fs_stats.block_size, "f_frsize": fs_stats.block_size, "f_blocks": fs_stats.blocks,
                "f_bfree": fs_stats.blocks_free, "f_bavail": fs_stats.blocks_available, "f_files": fs_stats.files,
                "f_ffree": 0, "f_favail": 0, "f_namemax": fs_stats.name_max}

    @_translated
    def listxattr(self, path: str) -> list:
        return self.core.xattr_names(path)

    @_translated
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        return self.core.xattr(path, name)

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
