"""The composition root: builds every component from a Config, runs FUSE, tears down.

Order of construction (and, reversed, of teardown through one ExitStack):
mountpoint check → cache folder (``cache.CacheDir``: checked, locked) → index → cache →
downloads → core → PBX session
and its event sources (``pbx.open_pbx``) → discovery (backfill, then poll and resync) →
the metrics endpoint (``--metrics-port``, ``app/metrics.py``) → FUSE. Nothing here holds
logic worth testing on its own (the policies live in ``core``, ``downloads``, ``cache``,
``discovery`` and the PBX family); the integration tests exercise it through the real CLI.

Start-up failures raise ``ConfigError``/``PbxError`` with one clear message. A PBX that
cannot be reached is fatal only on the very first mount (nothing to show yet); with a
persisted index the mount comes up and discovery keeps retrying in the background.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import signal
import subprocess
import threading
import time
from typing import Callable, Optional


from yeastarfs import errors
from yeastarfs.app import metrics, notify
from yeastarfs.cache import CacheDir, DiskCache
from yeastarfs.config import Config
from yeastarfs.core import Core
from yeastarfs.discovery import Discovery
from yeastarfs.downloads import DownloadManager
from yeastarfs.fs import FusePlus, YeastarFS
from yeastarfs.index import RecordingIndex
from yeastarfs.models import Recording
from yeastarfs.pbx import open_pbx

log = logging.getLogger(__name__)

# How long the kernel may trust a name and its attributes, in seconds. Recordings never
# change or disappear; the one attribute that changes (an estimated size becoming exact)
# is invalidated explicitly (fs.invalidate), so a long timeout is safe where that works
# (libfuse 3). Without invalidation (libfuse 2), 1 s like libfuse's and rclone's default.
ATTR_TIMEOUT_S = 60.0
ATTR_TIMEOUT_NO_INVALIDATE_S = 1.0
# glibc gives every thread that allocates its own malloc arena and keeps freed 1 MiB
# download buffers in each: with dozens of download and FUSE threads the RSS only grows.
MALLOC_ARENAS = 2
M_ARENA_MAX = -8  # mallopt parameter number (malloc.h)
# FUSE worker threads; readers blocked on a download each hold one, so allow many.
# (Set explicitly: libfuse 3.14 otherwise warns about an uninitialised value.)
MAX_FUSE_THREADS = 64
# Idle FUSE threads kept for the next burst: all of them. Each keeps its Python thread
# state between callbacks (fs.FusePlus), which a thread that exited would leak; threads
# are cheap to keep and costly to remake. (libfuse 3.14 warns when this is left unset.)
MAX_IDLE_FUSE_THREADS = MAX_FUSE_THREADS


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


def check_allow_other(fuse_conf: str = "/etc/fuse.conf") -> None:
    """allow_other needs user_allow_other in fuse.conf for non-root users; say so up front."""
    if os.getuid() == 0:
        return
    try:
        with open(fuse_conf, encoding="utf-8") as handle:
            enabled = any(line.split("#", 1)[0].strip() == "user_allow_other" for line in handle)
    except OSError:
        enabled = False
    if not enabled:
        raise errors.ConfigError(f"--allow-other needs a line 'user_allow_other' in {fuse_conf} "
                                 f"(as root: echo user_allow_other >> {fuse_conf})")


class Mount:
    """The running components of one mount (attributes are the components)."""

    def __init__(self, config: Config, stack: contextlib.ExitStack) -> None:
        self.config = config
        self.mountpoint = prepare_mountpoint(config.mountpoint)
        if config.allow_other:
            check_allow_other()
        self.started_at = time.time()
        self.fs: Optional[YeastarFS] = None
        self.metrics: Optional[metrics.MetricsServer] = None
        # The folder is left last: its clean-stop marker says everything after it stopped.
        self.folder = CacheDir(config.cache_root, os.path.basename(config.cache_dir))
        stack.callback(self.folder.close)
        self.index = RecordingIndex(self.folder.index_path)
        stack.callback(self.index.close)
        self.cache = DiskCache.open(self.folder, config.cache_max_bytes, config.cache_min_free_bytes,
                                    expected_size=self._exact_size)
        stack.callback(self.cache.close)
        self.pbx = open_pbx(config)
        self.downloads = DownloadManager(self.pbx.open_stream, self.cache, max_downloads=config.max_downloads,
                                         stall_timeout_s=config.stall_timeout_s,
                                         on_size=self._size_learned, on_complete=self._download_complete,
                                         on_gone=self._recording_gone, on_range=self._range_learned,
                                         on_commit=self._download_committed)
        stack.callback(self.downloads.stop)
        self.core = Core(self.index, self.cache, self.downloads, status=self.stats,
                         uid=config.uid, gid=config.gid, umask=config.umask,
                         background_readers=config.background_readers,
                         exact_size_readers=config.exact_size_readers)
        self._start_pbx(stack)
        self.discovery = self._start_discovery(stack)
        if config.metrics_port is not None:
            self.metrics = metrics.start(self, config.metrics_address, config.metrics_port)
            stack.callback(self.metrics.stop)

    # -- construction ------------------------------------------------------------------------

    def _start_pbx(self, stack: contextlib.ExitStack) -> None:
        """Log in and start the event sources. A rejected login is fatal; an unreachable PBX
        only when nothing is indexed yet (otherwise the index and cache are served and the
        session keeps retrying in the background)."""
        stack.callback(self.pbx.stop)
        try:
            self.pbx.start(self._add_one, on_timezone=self.index.set_timezone)
        except errors.AuthError:
            raise
        except errors.PbxError as exc:
            if self.index.count() == 0:
                raise
            log.warning("mount: PBX unreachable (%s); serving the %d indexed recordings and retrying",
                        exc, self.index.count())

    def _start_discovery(self, stack: contextlib.ExitStack) -> Discovery:
        """Backfill on the discovery thread; wait for it up to --start-timeout, so that a first
        mount shows the PBX's recordings but a slow PBX never holds up the mount (or boot)."""
        discovery = Discovery(self.pbx.catalogue, self._add_many, since_s=self.config.since_s,
                              poll_interval_s=self.config.poll_interval_s,
                              resync_interval_s=self.config.resync_interval_s)
        discovery.start()
        stack.callback(discovery.stop)
        if not discovery.wait_first_pass(self.config.start_timeout_s):
            log.warning("mount: CDR backfill still running after %.0f s; mounting now, it goes on in the background",
                        self.config.start_timeout_s)
        return discovery

    def _exact_size(self, name: str) -> Optional[int]:
        entry = self.index.get(name)
        return entry.size_bytes if entry is not None and entry.size_exact else None

    # -- callbacks ---------------------------------------------------------------------------

    def _add_many(self, recordings: list[Recording], kind: str = "event") -> int:
        # Only the catalogue is authoritative: an event may add a call, never rewrite one.
        new = self.index.add(recordings, authoritative=kind != "event")
        if new:
            log.info("index: %d new recordings (%s)", len(new), kind)
        # --prefetch new: calls that end from now on, not the backlog a backfill or resync finds.
        if new and self.config.prefetch_new and kind in ("event", "poll"):
            for recording in new:  # the reservation grows to the real size once it is announced
                self.downloads.prefetch(recording.name)
        return len(new)

    def _add_one(self, recording: Recording) -> None:
        self._add_many([recording], "event")

    def _size_learned(self, name: str, size_bytes: int) -> None:
        self.core.size_learned(name, size_bytes)

    def _download_complete(self, name: str, size_bytes: int) -> None:
        self.core.download_complete(name, size_bytes)

    def _download_committed(self, name: str, size_bytes: int, pread) -> None:
        self.core.download_committed(name, size_bytes, pread)

    def _recording_gone(self, name: str) -> None:
        self.core.recording_gone(name)

    def _range_learned(self, honoured: bool) -> None:
        self.core.range_learned(honoured)

    # -- observing ---------------------------------------------------------------------------

    def stats(self) -> dict:
        """What a status command or SIGUSR1 shows; cheap, no PBX request."""
        cache = self.cache.usage()
        discovery = self.discovery.status()
        return {
            "mountpoint": self.mountpoint, "pid": os.getpid(), "cache_dir": self.config.cache_dir,
            "metrics_port": self.metrics.port if self.metrics is not None else None,
            "uptime_s": round(time.time() - self.started_at, 1),
            **self.pbx.status(),
            "last_poll_time": discovery["last_poll_time"],
            "last_poll_error": discovery["last_error"] if discovery["consecutive_failures"] else None,
            "discovery": discovery,
            "recordings_indexed": self.index.count(),
            # Bytes held on disk: idle cached files, open ones, and what downloads hold.
            "cache_used_bytes": cache["idle_bytes"] + cache["pinned_bytes"],
            "cache_limit_bytes": cache["max_bytes"], "cache_files": cache["files"],
            **self.core.transfer_stats(),
            "fuse_reads": self.core.counters["read"],
            "fuse_getattrs": self.core.counters["getattr"],
            # Whether NFS handles from an earlier mount fail (README "Sharing with other machines").
            "nfs_handles": self.fs.handles if self.fs is not None else None,
        }

    def watch_signals(self, stack: contextlib.ExitStack) -> None:
        """SIGHUP polls the CDR now; SIGUSR1 logs statistics.

        The main thread sits inside libfuse, so Python-level handlers would never run; the
        C-level handler writes the signal number to a wakeup pipe that a thread reads.
        libfuse keeps SIGHUP for us because it only claims signals still at SIG_DFL.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        for signum in (signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, lambda *_: None)
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        stack.callback(signal.set_wakeup_fd, previous)
        threading.Thread(target=self._signal_loop, args=(read_fd,), name="signals", daemon=True).start()
        stack.callback(os.close, write_fd)

    def _signal_loop(self, read_fd: int) -> None:
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum == signal.SIGHUP:
                    log.info("mount: SIGHUP: re-reading the PBX's catalogue now")
                    self.discovery.resync_now()
                elif signum == signal.SIGUSR1:
                    log.info("mount: statistics: %s", json.dumps(self.stats(), default=str))

    # -- serving -----------------------------------------------------------------------------

    def serve(self, on_ready: Callable[[], None], notifier: Optional[notify.Notifier] = None) -> None:
        """Mount and answer the kernel until unmounted (fusermount -u, SIGINT, SIGTERM).

        *on_ready* runs once the mount answers a stat from outside libfuse's callbacks;
        *notifier* then hears READY=1, STATUS= lines, WATCHDOG=1 and, at the end, STOPPING=1
        (app/notify.py).
        """
        heartbeat = notify.Heartbeat(notifier or notify.Notifier(None), lambda: notify.mount_answers(self.mountpoint),
                                     lambda: notify.describe(self.stats()))

        def kernel_mounted() -> None:  # libfuse's init: nothing is answered until it returns
            log.info("mount: the kernel mounted %s (FUSE init)", self.mountpoint)
            heartbeat.start(on_ready)

        timeout_s = ATTR_TIMEOUT_S if FusePlus.can_invalidate() else ATTR_TIMEOUT_NO_INVALIDATE_S
        self.fs = YeastarFS(self.core, on_ready=kernel_mounted, mountpoint=self.mountpoint)
        options = dict(foreground=True, ro=True, nosuid=True, nodev=True, default_permissions=True,
                       fsname=f"yeastarfs:{self.config.pbx_host}", subtype="yeastarfs",
                       attr_timeout=timeout_s, entry_timeout=timeout_s)
        if FusePlus.is_libfuse3():  # libfuse 2 rejects these options
            options.update(max_threads=MAX_FUSE_THREADS, max_idle_threads=MAX_IDLE_FUSE_THREADS)
        if self.config.allow_other:
            options["allow_other"] = True
        try:
            FusePlus(self.fs, self.mountpoint, raw_fi=True, **options)
        except RuntimeError as exc:
            # libfuse also reports an exit by SIGINT/SIGTERM as an error (8): that is a
            # clean unmount when the filesystem had been mounted.
            if not self.fs.mounted:
                raise errors.ConfigError(f"cannot mount {self.mountpoint} (libfuse error {exc})") from None
            log.info("mount: stopped by a signal")
        finally:
            heartbeat.stop()


def run_mount(config: Config, on_ready: Callable[[], None]) -> None:
    """Build, serve until unmounted, tear down. Raises YeastarfsError on start-up failure."""
    _limit_malloc_arenas()
    notifier = notify.Notifier.from_environment()
    notifier.status("starting: logging in to the PBX and reading its catalogue")
    with contextlib.ExitStack() as stack:
        mount = Mount(config, stack)
        mount.watch_signals(stack)
        mount.serve(on_ready, notifier)
    log.info("mount: %s unmounted", config.mountpoint)


def _limit_malloc_arenas() -> None:
    """Cap glibc's per-thread malloc arenas before any thread starts (see MALLOC_ARENAS)."""
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):  # not glibc: nothing to cap
        pass


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
