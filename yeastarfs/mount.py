"""The composition root: builds every component from a Config, runs FUSE, tears down.

Order of construction (and, reversed, of teardown through one ExitStack):
mountpoint check → cache directory lock → index → cache → event receiver → PBX client
(login) → CDR backfill and poll → downloads → FUSE. Nothing here holds logic worth
testing on its own; the integration tests exercise it through the real CLI.

Start-up failures raise ``ConfigError``/``PbxError`` with one clear message. A PBX that
cannot be reached is fatal only on the very first mount (nothing to show yet); with a
persisted index the mount comes up and the CDR sync keeps retrying in the background.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import subprocess
import threading
from typing import Callable, Optional

import mfusepy

from yeastarfs import errors
from yeastarfs.api import PbxClient
from yeastarfs.cache import DiskCache
from yeastarfs.cdrsync import CdrSync
from yeastarfs.config import Config
from yeastarfs.downloads import DownloadManager
from yeastarfs.events import EventReceiver
from yeastarfs.fs import YeastarFS
from yeastarfs.index import RecordingIndex
from yeastarfs.models import Recording

log = logging.getLogger(__name__)

# Learned bytes-per-second of this PBX's recordings, kept in the index between runs.
RATE_META_KEY = "estimate_bytes_per_s"
# Weight of the newest completed download in the running average.
RATE_SMOOTHING = 0.2
# Kernel attribute/entry cache time in seconds: 1 s is libfuse's default and rclone's.
ATTR_TIMEOUT_S = 1.0
# FUSE worker threads; readers blocked on a download each hold one, so allow many.
# (Set explicitly: libfuse 3.14 otherwise warns about an uninitialised value.)
MAX_FUSE_THREADS = 64


def prepare_mountpoint(path: str) -> str:
    """Return the absolute mountpoint; recover a stale one. Raises ConfigError."""
    path = os.path.abspath(path)
    try:
        os.stat(path)
        if os.path.ismount(path):
            os.listdir(path)  # a dead FUSE mount may still stat, but never lists
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise errors.ConfigError(f"mountpoint {path}: {exc.strerror}") from None
        log.warning("mount: %s is a dead FUSE mount (crashed daemon); unmounting it", path)
        _lazy_unmount(path)
    if not os.path.isdir(path):
        raise errors.ConfigError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise errors.ConfigError(f"mountpoint {path} is busy: something is already mounted there")
    return path


def _lazy_unmount(path: str) -> None:
    for tool in ("fusermount3", "fusermount"):
        try:
            if subprocess.run([tool, "-uz", path], capture_output=True, timeout=10).returncode == 0:
                return
        except (OSError, subprocess.TimeoutExpired):
            continue
    raise errors.ConfigError(f"mountpoint {path} is a dead FUSE mount and could not be unmounted; "
                             f"run: fusermount -uz {path}")


def lock_cache_dir(cache_dir: str) -> int:
    """Take the cache directory for this process; two daemons on one cache corrupt it."""
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(cache_dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise errors.ConfigError(f"cache directory {cache_dir} is in use by another yeastarfs (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Mount:
    """The running components of one mount (attributes are the components)."""

    def __init__(self, config: Config, stack: contextlib.ExitStack) -> None:
        self.config = config
        self.mountpoint = prepare_mountpoint(config.mountpoint)
        lock_fd = lock_cache_dir(config.cache_dir)
        stack.callback(os.close, lock_fd)
        self.index = RecordingIndex(os.path.join(config.cache_dir, "index.sqlite3"))
        stack.callback(self.index.close)
        self._load_rate()
        self.cache = DiskCache(config.cache_dir, config.cache_max_bytes, config.cache_min_free_bytes)
        self.events = self._start_events(stack)
        self.client = self._connect(stack)
        self.sync = self._start_sync(stack)
        self.downloads = DownloadManager(self.client, self.cache, max_downloads=config.max_downloads,
                                         stall_timeout_s=config.stall_timeout_s,
                                         on_size=self._size_learned, on_complete=self._download_complete)
        stack.callback(self.downloads.stop)
        self.fs: Optional[YeastarFS] = None

    # -- construction ------------------------------------------------------------------------

    def _start_events(self, stack: contextlib.ExitStack) -> Optional[EventReceiver]:
        if not self.config.events_enabled:
            return None
        receiver = EventReceiver(self._add_one, host=self.config.events_host, port=self.config.events_port)
        receiver.start()
        stack.callback(receiver.stop)
        return receiver

    def _connect(self, stack: contextlib.ExitStack) -> PbxClient:
        config = self.config
        client = PbxClient(config.pbx_url, config.username, config.password, verify=config.verify,
                           events_port=self.events.port if self.events else None)
        stack.callback(client.stop)
        try:
            client.login()
        except errors.AuthError:
            raise
        except errors.PbxError as exc:
            if self.index.count() == 0:
                raise
            log.warning("mount: PBX unreachable (%s); serving the %d indexed recordings and retrying",
                        exc, self.index.count())
        stack.callback(client.logout)
        client.start_heartbeat()
        return client

    def _start_sync(self, stack: contextlib.ExitStack) -> CdrSync:
        sync = CdrSync(self.client, self._add_many, since_s=self.config.since_s,
                       poll_interval_s=self.config.poll_interval_s)
        try:
            sync.backfill()
        except errors.AuthError:
            raise
        except errors.PbxError as exc:
            log.warning("mount: CDR backfill failed (%s); retrying in the background", exc)
        sync.start()
        stack.callback(sync.stop)
        return sync

    # -- callbacks ---------------------------------------------------------------------------

    def _add_many(self, recordings: list[Recording]) -> None:
        new = self.index.add(recordings)
        if new:
            log.info("index: %d new recordings", len(new))

    def _add_one(self, recording: Recording) -> None:
        self._add_many([recording])

    def _size_learned(self, name: str, size_bytes: int) -> None:
        self.index.set_size(name, size_bytes)
        if self.fs is not None:
            self.fs.invalidate(self.index.path_of(name))

    def _download_complete(self, name: str, size_bytes: int, _when: float) -> None:
        """Learn this PBX's bytes per second of talk, so estimates of unseen files improve."""
        entry = self.index.get(name)
        talk_s = entry.recording.talk_s if entry is not None and entry.recording is not None else None
        if not talk_s:
            return
        rate = max(1.0, (size_bytes - 44) / talk_s)
        previous = self._rate
        self._rate = rate if previous is None else previous + RATE_SMOOTHING * (rate - previous)
        self.index.set_estimate_rate(self._rate)
        self.index.set_meta(RATE_META_KEY, f"{self._rate:.1f}")

    def _load_rate(self) -> None:
        stored = self.index.get_meta(RATE_META_KEY)
        self._rate: Optional[float] = float(stored) if stored else None
        if self._rate:
            self.index.set_estimate_rate(self._rate)

    # -- serving -----------------------------------------------------------------------------

    def serve(self, on_ready: Callable[[], None]) -> None:
        """Mount and answer the kernel until unmounted (fusermount -u, SIGINT, SIGTERM)."""
        self.fs = YeastarFS(self.index, self.cache, self.downloads, on_ready=on_ready)
        options = dict(foreground=True, ro=True, nosuid=True, nodev=True, default_permissions=True,
                       fsname=f"yeastarfs:{self.config.pbx_host}", subtype="yeastarfs",
                       attr_timeout=ATTR_TIMEOUT_S, entry_timeout=ATTR_TIMEOUT_S,
                       max_threads=MAX_FUSE_THREADS)
        if self.config.allow_other:
            options["allow_other"] = True
        try:
            mfusepy.FUSE(self.fs, self.mountpoint, raw_fi=True, **options)
        except RuntimeError as exc:
            # libfuse also reports an exit by SIGINT/SIGTERM as an error (8): that is a
            # clean unmount when the filesystem had been mounted.
            if not self.fs.mounted:
                raise errors.ConfigError(f"cannot mount {self.mountpoint} (libfuse error {exc})") from None
            log.info("mount: stopped by a signal")


def run_mount(config: Config, on_ready: Callable[[], None]) -> None:
    """Build, serve until unmounted, tear down. Raises YeastarfsError on start-up failure."""
    with contextlib.ExitStack() as stack:
        mount = Mount(config, stack)
        mount.serve(on_ready)
    log.info("mount: %s unmounted", config.mountpoint)


def ready_notifier(fd: Optional[int], message: Optional[str] = None) -> Callable[[], None]:
    """A callback that tells the waiting parent (``fd``) that the mount is up."""
    fired = threading.Event()

    def notify() -> None:
        if fired.is_set():
            return
        fired.set()
        if message:
            print(message, flush=True)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.write(fd, b"ready\n")
                os.close(fd)

    return notify
