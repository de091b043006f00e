"""The cache folder, owned end to end: its layout, who may touch it, its lock, crash
recovery, the complete recordings (an LRU bounded in bytes) and the partial files that
downloads fill.

Layout (every folder 0700, every file 0600, all owned by the user the daemon runs as):

    CACHE_ROOT/yeastarfs.log                 the background daemon's log (`daemon_log_path`)
    CACHE_ROOT/<pbx>/index.sqlite3           the recording index (`CacheDir.index_path`)
    CACHE_ROOT/<pbx>/lock                    flock()ed by the running daemon; holds its pid
    CACHE_ROOT/<pbx>/clean-stop              present while no daemon runs and the last one stopped cleanly
    CACHE_ROOT/<pbx>/complete/<name>         a whole recording, exactly as the PBX sent it
    CACHE_ROOT/<pbx>/partial/<sha1>.<n>.part a download in progress; never served after a restart

Trust. Another user who can write into the cache folder can swap a file for a symlink and
make the daemon (often root) truncate, write, chmod or delete where they choose. So the
cache root and the per-PBX folder must be real folders (no symlink), owned by this user and
not writable by group or others, and no folder above the root may be changeable by another
user; anything else is refused with a ConfigError naming the path and the fix. Missing
folders are created 0700. Inside, every file is opened relative to a folder descriptor with
O_NOFOLLOW, and only regular files of ours are used: anything else found in complete/ or
partial/ is removed (the entry itself, never what a link points to).

A commit (`PartialFile.commit`, then `PartialFile.sync`): the finished partial file is
renamed into complete/ in one atomic step, the readers waiting for the last bytes are
served, and only then is the file fsynced, because an fsync costs as much as the transfer
on a fast link. A killed process loses nothing (the page cache survives it). After a power
loss a file renamed but not yet fsynced may come back short (ext4 and XFS expose no
unwritten data, only a shorter file), so a start without the clean-stop marker compares
each cached file with the size the PBX announced and deletes short ones; a clean start only
lists complete/. Partial files never survive a start.

Budget, by bytes held. Idle complete files live in a byte-sized LRU whose eviction deletes
the file. Files open for reading and partial files are *pinned*: never evicted, and counted
at the bytes they hold on disk. A partial file's pin grows as its bytes are written,
evicting least-recently-used idle files only as far as the budget needs, and not at all
while the pins alone exceed the budget or for a recording known to be larger than the
budget (it will not be kept). A suspended, queued or failed download so counts only what
it holds. When the last pin of a complete file goes, the file joins the LRU as the most
recent entry (older ones are evicted to fit) or, if it cannot fit, is deleted. Reading
works with any cache size; the budget is exceeded only by files in use.

This module does no network I/O and imports nothing above ``errors``.

Threading: ``DiskCache._lock`` guards the LRU, the pins and file renames/unlinks; it is
held for bookkeeping and single-file operations, never while data is copied. A
PartialFile is written by one thread at a time (its download's worker) and read by many
(pread); its own ``_lock`` orders commit, sync, discard and close, and is taken before
``DiskCache._lock``, never after.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import grp
import hashlib
import itertools
import logging
import os
import pwd
import shutil
import stat
import struct
import threading
import time
from typing import Callable, Optional

import cachetools

from yeastarfs import errors

log = logging.getLogger(__name__)

INDEX_FILE = "index.sqlite3"
LOCK_FILE = "lock"
CLEAN_STOP_FILE = "clean-stop"
LOG_FILE = "yeastarfs.log"
COMPLETE_DIR = "complete"
PARTIAL_DIR = "partial"
PARTIAL_SUFFIX = ".part"
# Files SQLite creates beside the index, by path.
_INDEX_COMPANIONS = ("-wal", "-shm", "-journal")
# Rewriting a file's mtime on every read would cost a syscall per FUSE read; once a
# minute is plenty for an LRU order that only matters under pressure.
TOUCH_INTERVAL_S = 60.0
# "RIFF" <size - 8, little-endian u32> "WAVE": what a WAV file says about its own length.
RIFF_HEADER_BYTES = 12

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_partial_ids = itertools.count(1)


# -- what a recording's bytes say about themselves -------------------------------------------

def riff_size(head: bytes) -> Optional[int]:
    """The whole file's length as its RIFF header declares it, from the file's first
    RIFF_HEADER_BYTES bytes; None when *head* is not a RIFF/WAVE header."""
    if len(head) < RIFF_HEADER_BYTES or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    return struct.unpack("<I", head[4:8])[0] + 8


def file_problem(size_bytes: int, head: bytes, expected_bytes: Optional[int]) -> Optional[str]:
    """Why a cached file is not a whole recording, or None: its size must equal the size the
    PBX announced (when known) and, for a WAV file, the size its RIFF header declares."""
    if expected_bytes is not None and size_bytes != expected_bytes:
        return f"{size_bytes} bytes, the PBX announced {expected_bytes}"
    declared = riff_size(head)
    if declared is not None and declared != size_bytes:
        return f"{size_bytes} bytes, its RIFF header says {declared}"
    return None


# -- folders no one else can change ----------------------------------------------------------

def _refusal(path: str, problem: str, fix: str) -> errors.ConfigError:
    return errors.ConfigError(f"cache folder {path} {problem}; {fix}")


def _unreachable(path: str, current: str, exc: OSError) -> errors.ConfigError:
    return _refusal(path, f"cannot be reached: {current}: {exc.strerror or exc}", "use another --cache-dir")


def _check_ancestors(path: str) -> None:
    """Refuse *path* when a folder above it could be changed by another user (who could
    then swap *path* itself); a symlink on the way must be root's or ours."""
    euid = os.geteuid()
    trusted = (0, euid)
    parts = os.path.abspath(path).strip(os.sep).split(os.sep)[:-1]
    current = os.sep
    for part in parts:
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            break  # created below, by us
        except OSError as exc:  # a part that is a file, a name too long, no permission
            raise _unreachable(path, current, exc) from exc
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in trusted:
            raise _refusal(path, f"is reached through {current}, a symlink of uid {st.st_uid}",
                           "use another --cache-dir, one in folders only root or this user can change")
    current = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    while True:
        try:
            st = os.stat(current)
        except FileNotFoundError:
            st = None  # created below, by us
        except OSError as exc:
            raise _unreachable(path, current, exc) from exc
        if st is not None:
            if st.st_uid not in trusted:
                raise _refusal(path, f"lies in {current}, which belongs to uid {st.st_uid}",
                               "use another --cache-dir, one in folders only root or this user can change")
            others_write = st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and not _own_group(st.st_gid))
            if others_write and not st.st_mode & stat.S_ISVTX:
                raise _refusal(path, f"lies in {current}, which other users may write to",
                               f"run chmod go-w {current}, or use another --cache-dir")
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent


def _own_group(gid: int) -> bool:
    """Whether group *gid* is this user's own (its primary group, no other member): a folder
    above the cache that only it can write to, as umask 002 with user private groups makes
    ``~/.cache``, is harmless."""
    try:
        user = pwd.getpwuid(os.geteuid())
        members = grp.getgrgid(gid).gr_mem
    except KeyError:
        return False
    return gid == user.pw_gid and all(member == user.pw_name for member in members)


def _open_dir(name: str, dir_fd: Optional[int], shown: str, *, create: bool = True,
              private: bool = True, tighten: bool = True) -> int:
    """Open folder *name* (relative to *dir_fd*) without following a symlink; create it 0700
    when missing. Refuse one that is not a real folder owned by this user and, when
    *private*, one that group or others may write to; with *tighten*, make it 0700."""
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise errors.ConfigError(f"cache folder {shown}: cannot create it: {exc.strerror}") from None
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refusal(shown, "is a symlink or not a folder", f"remove it (rm {shown}), yeastarfs makes its own") \
                from None
        if exc.errno == errno.ENOENT:
            raise errors.ConfigError(f"cache folder {shown} does not exist") from None
        raise errors.ConfigError(f"cache folder {shown}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise _refusal(shown, f"belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})",
                           "remove it or use another --cache-dir (its owner could plant links in it)")
        if private and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise _refusal(shown, f"is writable by other users (mode {stat.S_IMODE(st.st_mode):03o})",
                           f"run chmod 700 {shown}")
        if tighten and stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_cache_root(cache_root: str, *, create: bool = True, tighten: bool = False) -> int:
    """A descriptor of folder *cache_root*, created 0700 when missing and checked as the module
    docstring says ("Trust"); *tighten* makes an existing one 0700 too."""
    cache_root = os.path.abspath(cache_root)
    _check_ancestors(cache_root)
    parent = os.path.dirname(cache_root)
    if create:
        try:
            _make_folders(parent)
        except OSError as exc:
            raise errors.ConfigError(f"cache folder {parent}: cannot create it: {exc.strerror}") from None
    try:
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.ConfigError(f"cache folder {cache_root}: {parent}: {exc.strerror}") from None
    try:
        # An existing root keeps its mode unless told (a shared /var/cache/yeastarfs may be 0755).
        return _open_dir(os.path.basename(cache_root), parent_fd, cache_root, create=create, tighten=tighten)
    finally:
        os.close(parent_fd)


def _make_folders(path: str) -> None:
    """Create folder *path* and the missing ones above it, each 0700 (os.makedirs gives the
    ones above the last the umask's mode: 0777 under umask 0)."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        _make_folders(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass  # made meanwhile, or not a folder: the open that follows says which


def _open_file(name: str, dir_fd: int, flags: int, shown: str) -> int:
    """Open file *name* in the folder *dir_fd* without following a symlink; 0600 if created.
    Raises ConfigError when it is not a regular file of this user."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refusal(shown, "is a symlink", f"remove it (rm {shown})") from None
        raise errors.ConfigError(f"cache file {shown}: {exc.strerror}") from None
    st = os.fstat(fd)
    # A second hard link would let someone else's name reach what we write here.
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        os.close(fd)
        raise _refusal(shown, "is not a regular file of this user with one link", f"remove it (rm {shown})")
    return fd


def _is_own_file(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def daemon_log_path(cache_root: str) -> str:
    """The background daemon's log file in *cache_root*, created 0600 if missing, after the
    root passed the checks of the module docstring ("Trust"): a path the CLI may open and
    reopen (log rotation) because nobody else can put anything in its place."""
    root_fd = open_cache_root(cache_root)
    try:
        os.close(_open_file(LOG_FILE, root_fd, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                            os.path.join(cache_root, LOG_FILE)))
    finally:
        os.close(root_fd)
    return os.path.join(os.path.abspath(cache_root), LOG_FILE)


# -- one PBX's folder ------------------------------------------------------------------------

class CacheDir:
    """One PBX's folder under the cache root: layout, lock, clean-stop marker, index file.

    The mount holds one for its lifetime (``lock=True``: a second daemon on the same folder
    is refused); the cache commands open one to read, or with the lock to change it.

    Attributes:
        path: the folder.
        fd: a descriptor of it (everything inside is opened relative to it).
        clean_start: the last run stopped cleanly, or none ever ran (so cached files need
            no check against the index).

    Multithreading: used by the thread that opened it.
    """

    def __init__(self, cache_root: str, name: str, *, lock: bool = True, create: bool = True) -> None:
        self.path = os.path.join(os.path.abspath(cache_root), name)
        root_fd = open_cache_root(cache_root, create=create)
        try:
            self.fd = _open_dir(name, root_fd, self.path, create=create)
        finally:
            os.close(root_fd)
        self._lock_fd: Optional[int] = None
        try:
            never_ran = not self._exists(INDEX_FILE)
            if lock:
                self._lock_fd = self._take_lock()
            self.clean_start = self._take_clean_stop_marker() or never_ran
        except BaseException:
            self.close(clean_stop=False)
            raise

    def __enter__(self) -> "CacheDir":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close(clean_stop=False)

    @staticmethod
    def names(cache_root: str) -> list[str]:
        """The per-PBX folders under *cache_root* (those holding an index), by name.
        Raises ConfigError when the root is missing or untrustworthy, or holds none."""
        if not os.path.isdir(cache_root):
            raise errors.ConfigError(f"cache directory {cache_root} does not exist")
        root_fd = open_cache_root(cache_root, create=False)
        try:
            found = []
            for entry in sorted(os.scandir(root_fd), key=lambda e: e.name):
                if entry.is_dir(follow_symlinks=False) and _exists_in(entry.name + os.sep + INDEX_FILE, root_fd):
                    found.append(entry.name)
        finally:
            os.close(root_fd)
        if not found:
            raise errors.ConfigError(f"no yeastarfs cache under {cache_root}")
        return found

    @property
    def index_path(self) -> str:
        """The index file's path, once it (and SQLite's companions) is known to be a regular
        file of ours or absent: SQLite opens them by path, following links."""
        shown = os.path.join(self.path, INDEX_FILE)
        if self._exists(INDEX_FILE):
            os.close(_open_file(INDEX_FILE, self.fd, os.O_RDONLY, shown))
        for suffix in _INDEX_COMPANIONS:
            companion = INDEX_FILE + suffix
            try:
                st = os.stat(companion, dir_fd=self.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not _is_own_file(st):
                log.warning("cache: %s is not a regular file of this user; removed", os.path.join(self.path, companion))
                os.unlink(companion, dir_fd=self.fd)
        return shown

    def holder_pid(self) -> str:
        """The pid the lock file names (the daemon using this folder), or "?"."""
        try:
            fd = _open_file(LOCK_FILE, self.fd, os.O_RDONLY, os.path.join(self.path, LOCK_FILE))
        except errors.ConfigError:
            return "?"
        try:
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)

    def complete_files(self) -> list[tuple[str, int]]:
        """(name, size in bytes) of every cached recording."""
        complete_fd = self._open_subdir(COMPLETE_DIR)
        if complete_fd is None:
            return []
        try:
            files = []
            for entry in os.scandir(complete_fd):
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if _is_own_file(st):
                    files.append((entry.name, st.st_size))
            return sorted(files)
        finally:
            os.close(complete_fd)

    def problem_with(self, name: str, expected_bytes: Optional[int]) -> Optional[str]:
        """Why cached recording *name* is not whole (`file_problem`), or None."""
        complete_fd = self._open_subdir(COMPLETE_DIR)
        if complete_fd is None:
            return "not cached"
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=complete_fd)
        except OSError as exc:
            return f"cannot open it: {exc.strerror}"
        finally:
            os.close(complete_fd)
        try:
            return file_problem(os.fstat(fd).st_size, os.pread(fd, RIFF_HEADER_BYTES, 0), expected_bytes)
        finally:
            os.close(fd)

    def remove_complete(self, names: Optional[list[str]] = None) -> tuple[int, int]:
        """Delete the cached recordings *names* (None: all); (files, bytes) deleted.
        Needs the lock: a running mount must not lose files under its readers."""
        if self._lock_fd is None:
            raise RuntimeError("remove_complete needs the folder's lock")
        complete_fd = self._open_subdir(COMPLETE_DIR)
        if complete_fd is None:
            return 0, 0
        count = freed = 0
        try:
            wanted = set(names) if names is not None else None
            for name, size_bytes in self.complete_files():
                if wanted is None or name in wanted:
                    os.unlink(name, dir_fd=complete_fd)
                    count, freed = count + 1, freed + size_bytes
        finally:
            os.close(complete_fd)
        return count, freed

    def close(self, clean_stop: bool = True) -> None:
        """Leave the folder; with *clean_stop* (and the lock held), write the marker that
        lets the next start skip the size check. Safe to call more than once."""
        if self._lock_fd is not None:
            if clean_stop:
                try:
                    os.close(_open_file(CLEAN_STOP_FILE, self.fd, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                        os.path.join(self.path, CLEAN_STOP_FILE)))
                except errors.ConfigError as exc:
                    log.warning("cache: cannot write the clean-stop marker: %s", exc)
            os.close(self._lock_fd)
            self._lock_fd = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # -- internals ---------------------------------------------------------------------------

    def _exists(self, name: str) -> bool:
        return _exists_in(name, self.fd)

    def _open_subdir(self, name: str) -> Optional[int]:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except OSError:
            return None

    def _take_lock(self) -> int:
        """flock the lock file (two daemons on one folder corrupt it) and write our pid."""
        fd = _open_file(LOCK_FILE, self.fd, os.O_RDWR | os.O_CREAT, os.path.join(self.path, LOCK_FILE))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise errors.ConfigError(f"cache directory {self.path} is in use by a running yeastarfs (pid {holder}); "
                                     f"unmount it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _take_clean_stop_marker(self) -> bool:
        """Whether the marker was there; it is removed (it is written again at a clean stop)."""
        try:
            st = os.stat(CLEAN_STOP_FILE, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        os.unlink(CLEAN_STOP_FILE, dir_fd=self.fd)  # the entry itself, whatever it is
        return _is_own_file(st)


def _exists_in(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except OSError:
        return False


# -- the complete recordings and the downloads filling partial files ----------------------------

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


class PartialFile:
    """A download's bytes on their way into the cache: appended by one writer, read by many.

    Created by `DiskCache.new_partial`, which pins the recording's name; every `write`
    grows the pin by the bytes written. `commit` moves the file into complete/, `sync`
    then makes it durable (module docstring: the order of a commit); `discard` deletes it;
    `close` (once no reader is left) drops the pin.

    Attributes:
        name: the recording.
        path: where the file is while partial (for logs and tests).
        size_bytes: bytes written so far.
        committed: True once renamed into complete/.

    Multithreading: `write`, `commit`, `sync` and `discard` belong to the writer (one
    thread at a time); `pread` may be called from any thread until `close`.
    """

    def __init__(self, cache: "DiskCache", name: str) -> None:
        self.name = name
        self._cache = cache
        self._file_name = f"{_name_digest(name)}.{next(_partial_ids)}{PARTIAL_SUFFIX}"
        self.path = os.path.join(cache.root, PARTIAL_DIR, self._file_name)
        self.size_bytes = 0
        self.committed = False
        self._expected_bytes: Optional[int] = None
        self._lock = threading.Lock()
        self._closed = False
        self._write_fd: Optional[int] = None
        self._read_fd: Optional[int] = None
        flags = os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self._write_fd = os.open(self._file_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flags, 0o600,
                                     dir_fd=cache._partial_fd)
            self._read_fd = os.open(self._file_name, os.O_RDONLY | flags, dir_fd=cache._partial_fd)
        except OSError as exc:
            if self._write_fd is not None:
                os.close(self._write_fd)
                _unlink_quietly(self._file_name, cache._partial_fd)
            raise errors.CacheError(f"recording {name}: cannot create a cache file: {exc.strerror}") from None

    def write(self, data: bytes) -> None:
        """Append *data*. Raises CacheError (disk full, I/O error, discarded)."""
        fd = self._write_fd
        if fd is None:
            raise errors.CacheError(f"recording {self.name}: its cache file is closed")
        try:
            written = os.pwrite(fd, data, self.size_bytes)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise errors.CacheError(f"recording {self.name}: cache disk is full") from None
            raise errors.CacheError(f"recording {self.name}: cannot write cache file: {exc.strerror}") from None
        if written != len(data):
            raise errors.CacheError(f"recording {self.name}: short write to the cache file")
        self.size_bytes += written
        self._cache._grow(self.name, written, self._expected_bytes)

    def expect(self, total_bytes: int) -> None:
        """The whole recording will be *total_bytes*: a file larger than the budget evicts nothing."""
        self._expected_bytes = total_bytes

    def pread(self, size: int, offset: int) -> bytes:
        fd = self._read_fd
        if fd is None:
            raise errors.CacheError(f"recording {self.name}: its cache file is closed")
        return os.pread(fd, size, offset)

    def commit(self) -> None:
        """Rename the finished file into complete/ (atomically). Raises CacheError."""
        with self._lock:
            if self._write_fd is None:
                raise errors.CacheError(f"recording {self.name}: its cache file was discarded")
            try:
                self._cache._commit(self.name, self._file_name)
            except OSError as exc:
                raise errors.CacheError(f"recording {self.name}: cannot store the download: {exc.strerror}") from None
            self.committed = True

    def sync(self) -> None:
        """After `commit`: make the cached file durable, then close the writer's side."""
        with self._lock:
            fd, self._write_fd = self._write_fd, None
        if fd is None:
            return
        try:
            os.fsync(fd)
        except OSError as exc:
            log.warning("recording %s: fsync of the cached file failed: %s", self.name, exc.strerror)
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Delete the file and give back what it held (a failed or dropped download). Readers
        that still hold it keep reading until `close`."""
        with self._lock:
            if self._write_fd is None or self.committed:
                return
            fd, self._write_fd = self._write_fd, None
            os.close(fd)
            self._cache._forget_partial(self.name, self._file_name, self.size_bytes)

    def close(self) -> None:
        """No reader is left: close the file and drop the pin (once)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            fd, self._read_fd = self._read_fd, None
        if fd is not None:
            os.close(fd)
        self._cache.release(self.name)


class DiskCache:
    """Recordings cached on local disk (see the module docstring).

    Attributes:
        root: the per-PBX cache folder.
        max_bytes: budget for complete and partial files together.
        min_free_bytes: free space to leave on the cache's filesystem.
        stats: hit/miss/eviction counters.

    Multithreading: one lock, ``_lock``, around the LRU, the pins and the file moves.
    """

    def __init__(self, root: str, max_bytes: int, min_free_bytes: int = 0,
                 expected_size: Optional[Callable[[str], Optional[int]]] = None) -> None:
        """Open the cache in folder *root* (created, or checked as "Trust" says).

        *expected_size*: after a stop that was not clean, the size the PBX announced for a
        cached name (None: unknown); a cached file of another size is deleted.
        Raises ConfigError when the folder cannot be trusted or used.
        """
        self.root = os.path.abspath(root)
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._lru = _SizedLRU(max_bytes, self._evicted)
        self._pins: dict[str, _Pin] = {}
        self._touched: dict[str, float] = {}
        root_fd = open_cache_root(self.root, tighten=True)
        try:
            self._complete_fd = _open_dir(COMPLETE_DIR, root_fd, os.path.join(self.root, COMPLETE_DIR),
                                          private=False)
            self._partial_fd = _open_dir(PARTIAL_DIR, root_fd, os.path.join(self.root, PARTIAL_DIR),
                                         private=False)
        finally:
            os.close(root_fd)
        self._remove_partials()
        self._load_complete(expected_size)

    @classmethod
    def open(cls, folder: CacheDir, max_bytes: int, min_free_bytes: int = 0,
             expected_size: Optional[Callable[[str], Optional[int]]] = None) -> "DiskCache":
        """The cache in *folder*; cached sizes are checked only when it did not stop cleanly."""
        if not folder.clean_start:
            log.info("cache: the last run did not stop cleanly; checking cached sizes against the index")
        return cls(folder.path, max_bytes, min_free_bytes, expected_size=None if folder.clean_start else expected_size)

    def close(self) -> None:
        """Close the folders' descriptors (the mount stops; the files stay)."""
        for fd in (self._complete_fd, self._partial_fd):
            os.close(fd)

    # -- start-up ----------------------------------------------------------------------------

    def _remove_partials(self) -> None:
        """Partial files of a previous run are unverifiable: delete them (the entries
        themselves: a symlink is removed, never followed)."""
        for entry in os.scandir(self._partial_fd):
            _unlink_quietly(entry.name, self._partial_fd)

    def _load_complete(self, expected_size: Optional[Callable[[str], Optional[int]]]) -> None:
        entries = []
        for entry in os.scandir(self._complete_fd):
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not _is_own_file(st) or _name_problem(entry.name) is not None:
                log.warning("cache: %s is not a cached recording of this user; removed",
                            os.path.join(self.root, COMPLETE_DIR, entry.name))
                _unlink_quietly(entry.name, self._complete_fd)
                continue
            if expected_size is not None and expected_size(entry.name) not in (None, st.st_size):
                # Cut short by a power loss before its fsync: never serve it.
                log.warning("cache: %s is %d bytes, not the size the PBX announced; deleted",
                            entry.name, st.st_size)
                _unlink_quietly(entry.name, self._complete_fd)
                continue
            entries.append((st.st_mtime, entry.name, st.st_size))
        with self._lock:
            for _, name, size_bytes in sorted(entries):  # oldest first: inserted first, evicted first
                self._insert_locked(name, size_bytes)
        log.info("cache: %d recordings, %d bytes in %s", len(self._lru), self._lru.currsize, self.root)

    # -- lookups -----------------------------------------------------------------------------

    def open_complete(self, name: str) -> Optional[int]:
        """Open the complete file of *name* for reading and pin it; None if not cached.

        The caller must `release` the name when it closes the returned fd.
        """
        if _name_problem(name):
            return None
        with self._lock:
            size_bytes = self._lru.pop(name, None) if name in self._lru else None
            pin = self._pins.get(name)
            if size_bytes is None and (pin is None or not self._is_complete(name)):
                self.stats.misses += 1
                return None
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._complete_fd)
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
            if pin is None or _name_problem(name):
                return None
            try:
                return os.stat(name, dir_fd=self._complete_fd, follow_symlinks=False).st_size
            except OSError:
                return None

    def complete_path(self, name: str) -> str:
        """Where the complete copy of *name* lies (for logs and tests; the cache itself opens
        files relative to its folders)."""
        return os.path.join(self.root, COMPLETE_DIR, name)

    # -- downloads ---------------------------------------------------------------------------

    def new_partial(self, name: str) -> PartialFile:
        """A new, empty partial file for a download of *name*, pinned at 0 bytes; its pin
        grows with what is written. Raises CacheError."""
        problem = _name_problem(name)
        if problem:
            raise errors.CacheError(f"recording name {name!r} {problem}; not cached")
        with self._lock:
            pin = self._pins.get(name)
            if pin is None:
                # A cached name downloaded again: its idle file moves from the LRU to the pin,
                # so it is counted once and eviction cannot delete it while it is in use.
                idle_bytes = self._lru.pop(name, 0) if name in self._lru else 0
                pin = self._pins[name] = _Pin(count=0, size_bytes=idle_bytes)
            pin.count += 1
        try:
            return PartialFile(self, name)
        except BaseException:
            self.release(name)
            raise

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
                # The file's real size, not the pin (which counted partial bytes too).
                st = os.stat(name, dir_fd=self._complete_fd, follow_symlinks=False)
            except OSError:
                return  # never completed: a failed or cancelled download
            if not _is_own_file(st):  # something planted in its place: removed, never served
                _unlink_quietly(name, self._complete_fd)
                return
            self._insert_locked(name, st.st_size)

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
        """Bytes held: idle complete files, and pinned ones (open files, partial files)."""
        with self._lock:
            pinned = sum(pin.size_bytes for pin in self._pins.values())
            return {"idle_bytes": self._lru.currsize, "pinned_bytes": pinned, "files": len(self._lru),
                    "pinned": len(self._pins), "max_bytes": self.max_bytes}

    # -- for PartialFile ---------------------------------------------------------------------

    def _grow(self, name: str, size_bytes: int, expected_bytes: Optional[int]) -> None:
        """A partial file of *name* holds *size_bytes* more: count them, evicting idle files
        as far as the budget needs (module docstring, "Budget")."""
        with self._lock:
            pin = self._pins.get(name)
            if pin is None:
                return
            pin.size_bytes += size_bytes
            never_kept = expected_bytes is not None and expected_bytes > self.max_bytes
            if not never_kept and self._pinned_bytes_locked() <= self.max_bytes:
                self._make_room_locked(0)
            elif self.min_free_bytes:
                self._make_room_locked(0, budget=False)  # the disk floor still holds

    def _commit(self, name: str, file_name: str) -> None:
        with self._lock:
            os.rename(file_name, name, src_dir_fd=self._partial_fd, dst_dir_fd=self._complete_fd)
        self._touch(name, force=True)

    def _forget_partial(self, name: str, file_name: str, size_bytes: int) -> None:
        with self._lock:
            _unlink_quietly(file_name, self._partial_fd)
            pin = self._pins.get(name)
            if pin is not None:
                pin.size_bytes = max(0, pin.size_bytes - size_bytes)

    # -- internals (call with _lock held) ----------------------------------------------------

    def _is_complete(self, name: str) -> bool:
        return _exists_in(name, self._complete_fd)

    def _pin_locked(self, name: str, size_bytes: int) -> None:
        pin = self._pins.setdefault(name, _Pin(count=0, size_bytes=size_bytes))
        pin.count += 1

    def _insert_locked(self, name: str, size_bytes: int) -> None:
        if size_bytes > self.max_bytes:  # larger than the whole budget: never kept, evicts nothing
            _unlink_quietly(name, self._complete_fd)
            return
        if size_bytes + self._pinned_bytes_locked() > self.max_bytes:
            self._make_room_locked(size_bytes)
        self._lru[name] = size_bytes
        if not self._make_room_locked(0):
            log.debug("cache: over budget with %s only because of pinned files", name)

    def _make_room_locked(self, extra_bytes: int, budget: bool = True) -> bool:
        """Evict idle files until *extra_bytes* more fit (in the budget, unless *budget* is
        False, and above the disk's free-space floor); False if pins alone are too many."""
        pinned_bytes = self._pinned_bytes_locked()
        while self._lru and ((budget and self._lru.currsize + pinned_bytes + extra_bytes > self.max_bytes)
                             or self._free_bytes() < self.min_free_bytes + extra_bytes):
            self._lru.popitem()
        return pinned_bytes + self._lru.currsize + extra_bytes <= self.max_bytes

    def _pinned_bytes_locked(self) -> int:
        # Pins are few (open files and downloads), so summing is cheaper than bookkeeping.
        return sum(pin.size_bytes for pin in self._pins.values())

    def _evicted(self, name: str, size_bytes: int) -> None:
        _unlink_quietly(name, self._complete_fd)
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
            os.utime(name, dir_fd=self._complete_fd, follow_symlinks=False)
        except OSError:
            pass


def _name_digest(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()


def _name_problem(name: str) -> Optional[str]:
    """Why *name* cannot be a file of complete/ (the index never passes such a name; this
    is the cache's own guard against leaving its folder)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        return "is not a plain file name"
    return None


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cache: cannot delete %s: %s", name, exc)
