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
import ctypes
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from typing import Callable, Optional


from yeastarfs import errors
from yeastarfs.pbx.sseries.client import PbxClient
from yeastarfs.cache import DiskCache
from yeastarfs.pbx.sseries.cdrsync import CdrSync
from yeastarfs.config import Config
from yeastarfs.downloads import DownloadManager
from yeastarfs.pbx.sseries.events import EventReceiver
from yeastarfs.fs import FusePlus, YeastarFS
from yeastarfs.index import WAV_HEADER_BYTES, RecordingIndex
from yeastarfs.models import Recording
from yeastarfs.pbx.sseries.tcpevents import TcpEventClient

log = logging.getLogger(__name__)

# Learned bytes-per-second of this PBX's recordings, kept in the index between runs.
RATE_META_KEY = "estimate_bytes_per_s"
# Weight of the newest completed download in the running average.
RATE_SMOOTHING = 0.2
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
# Present in the cache directory while no daemon runs on it and the last one stopped cleanly.
CLEAN_STOP_MARKER = "clean-stop"
# FUSE worker threads; readers blocked on a download each hold one, so allow many.
# (Set explicitly: libfuse 3.14 otherwise warns about an uninitialised value.)
MAX_FUSE_THREADS = 64
# Idle FUSE threads kept for the next burst (libfuse 3.14 warns when this is left unset).
MAX_IDLE_FUSE_THREADS = 16


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


def lock_cache_dir(cache_dir: str) -> int:
    """Take the cache directory for this process; two daemons on one cache corrupt it."""
    os.makedirs(os.path.dirname(cache_dir), mode=0o700, exist_ok=True)  # the root, if new: private too
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
        if config.allow_other:
            check_allow_other()
        self.started_at = time.time()
        # Events and the CDR sync may deliver recordings before these exist.
        self.downloads: Optional[DownloadManager] = None
        self.fs: Optional[YeastarFS] = None
        lock_fd = lock_cache_dir(config.cache_dir)
        stack.callback(os.close, lock_fd)
        self.index = RecordingIndex(os.path.join(config.cache_dir, "index.sqlite3"))
        stack.callback(self.index.close)
        self._load_rate()
        self.cache = self._open_cache(stack)
        self.events = self._start_events(stack)
        self.client = self._connect(stack)
        self._start_tcp_events(stack)
        self.sync = self._start_sync(stack)
        self.downloads = DownloadManager(self.client, self.cache, max_downloads=config.max_downloads,
                                         stall_timeout_s=config.stall_timeout_s,
                                         on_size=self._size_learned, on_complete=self._download_complete)
        stack.callback(self.downloads.stop)

    # -- construction ------------------------------------------------------------------------

    def _start_events(self, stack: contextlib.ExitStack) -> Optional[EventReceiver]:
        if not self.config.events_enabled:
            return None
        receiver = EventReceiver(self._add_one, host=self.config.events_host, port=self.config.events_port,
                                 allowed_ips=self._event_sources())
        receiver.start()
        stack.callback(receiver.stop)
        return receiver

    def _event_sources(self) -> Optional[set[str]]:
        """Who may push events: the PBX's addresses unless the user said otherwise."""
        if self.config.allow_any_event_source:
            return None
        if self.config.events_allow_from:
            return set(self.config.events_allow_from)
        try:
            infos = socket.getaddrinfo(self.config.pbx_host, None)
        except OSError as exc:
            raise errors.ConfigError(f"cannot resolve PBX host {self.config.pbx_host}: {exc}") from None
        addresses = {info[4][0] for info in infos}
        # An IPv4 PBX may reach an IPv6 socket as ::ffff:a.b.c.d.
        return addresses | {f"::ffff:{address}" for address in addresses if ":" not in address}

    def _start_tcp_events(self, stack: contextlib.ExitStack) -> None:
        """The PBX reports events over TCP (login said so): connect to it and listen."""
        if self.client.transport != "TCP" or not self.config.events_enabled:
            return
        client = TcpEventClient(self.config.pbx_host, self.config.tcp_events_port, self.config.username,
                                self.config.password, self._add_one)
        client.start()
        stack.callback(client.stop)
        log.info("mount: receiving events over TCP from %s:%d", self.config.pbx_host, self.config.tcp_events_port)

    def _connect(self, stack: contextlib.ExitStack) -> PbxClient:
        config = self.config
        client = PbxClient(config.pbx_url, config.username, config.password, verify=config.verify,
                           events_port=self.events.port if self.events else None,
                           heartbeat_interval_s=config.heartbeat_interval_s, pin_sha256=config.pin_sha256)
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
        """Backfill on the sync thread; wait for it up to --start-timeout, so that a first
        mount shows the PBX's recordings but a slow PBX never holds up the mount (or boot)."""
        sync = CdrSync(self.client, self._add_many, since_s=self.config.since_s,
                       poll_interval_s=self.config.poll_interval_s)
        sync.start()
        stack.callback(sync.stop)
        if not sync.wait_first_pass(self.config.start_timeout_s):
            log.warning("mount: CDR backfill still running after %.0f s; mounting now, it goes on in the background",
                        self.config.start_timeout_s)
        return sync

    def _open_cache(self, stack: contextlib.ExitStack) -> DiskCache:
        """Open the cache; check cached sizes against the index only after an unclean stop.

        A clean stop leaves a marker (written last, after downloads are stopped); without
        it (kill -9, power loss) every cached file is compared with the size the PBX
        announced, because a file renamed into place but not yet fsynced may be short.
        Clean restarts of a large cache so cost one directory listing, not an index lookup
        per file.
        """
        marker = os.path.join(self.config.cache_dir, CLEAN_STOP_MARKER)
        clean = os.path.exists(marker)
        if clean:
            os.unlink(marker)
        else:
            log.info("cache: the last run did not stop cleanly; checking cached sizes against the index")
        cache = DiskCache(self.config.cache_dir, self.config.cache_max_bytes, self.config.cache_min_free_bytes,
                          expected_size=None if clean else self._exact_size)
        stack.callback(_write_marker, marker)  # runs after everything registered later
        return cache

    def _exact_size(self, name: str) -> Optional[int]:
        entry = self.index.get(name)
        return entry.size_bytes if entry is not None and entry.size_exact else None

    # -- callbacks ---------------------------------------------------------------------------

    def _add_many(self, recordings: list[Recording]) -> None:
        new = self.index.add(recordings)
        if new:
            log.info("index: %d new recordings", len(new))
        if new and self.config.prefetch_new and self.downloads is not None:
            for recording in new:  # the reservation grows to the real size once it is announced
                self.downloads.prefetch(recording.name)

    def _add_one(self, recording: Recording) -> None:
        self._add_many([recording])

    def _size_learned(self, name: str, size_bytes: int) -> None:
        self.index.set_size(name, size_bytes)
        if self.fs is not None:
            self.fs.invalidate(self.index.path_of(name))

    def _download_complete(self, name: str, size_bytes: int) -> None:
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

    def _load_rate(self) -> None:
        stored = self.index.get_meta(RATE_META_KEY)
        self._rate: Optional[float] = float(stored) if stored else None
        if self._rate:
            self.index.set_estimate_rate(self._rate)

    # -- observing ---------------------------------------------------------------------------

    def stats(self) -> dict:
        """What a status command or SIGUSR1 shows; cheap, no PBX request."""
        cache = self.cache.usage()
        lookups = self.cache.stats.hits + self.cache.stats.misses
        in_flight = []
        for download in self.downloads.running():
            received, total = download.progress()
            in_flight.append({"recording": download.name, "received_bytes": received, "total_bytes": total})
        client = self.client.stats
        return {
            "mountpoint": self.mountpoint, "pbx": self.config.pbx_url, "pid": os.getpid(),
            "cache_dir": self.config.cache_dir,
            "uptime_s": round(time.time() - self.started_at, 1),
            # The CDR poll talks to the PBX every --poll-interval, heartbeats every 10 minutes.
            "pbx_reachable": client.last_success_time is not None
            and time.time() - client.last_success_time < max(900.0, 3 * self.config.poll_interval_s),
            "token_age_s": None if self.client.token_age_s is None else round(self.client.token_age_s, 1),
            "logins": client.logins,
            "last_event_time": self.events.stats.get("last_event_time") if self.events else None,
            "last_poll_time": self.sync.stats["last_poll_time"],
            "last_poll_error": self.sync.stats["last_error"],
            "recordings_indexed": self.index.count(),
            "cache_used_bytes": cache["idle_bytes"] + cache["pinned_bytes"],
            "cache_limit_bytes": cache["max_bytes"], "cache_files": cache["files"],
            "cache_hit_rate": round(self.cache.stats.hits / lookups, 3) if lookups else None,
            "downloads_in_flight": in_flight,
            "fuse_reads": self.fs.reads if self.fs is not None else 0,
            "fuse_getattrs": self.fs.getattrs if self.fs is not None else 0,
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
                    log.info("mount: SIGHUP: polling the CDR now")
                    self.sync.poll_now()
                elif signum == signal.SIGUSR1:
                    log.info("mount: statistics: %s", json.dumps(self.stats(), default=str))

    # -- serving -----------------------------------------------------------------------------

    def serve(self, on_ready: Callable[[], None]) -> None:
        """Mount and answer the kernel until unmounted (fusermount -u, SIGINT, SIGTERM)."""
        timeout_s = ATTR_TIMEOUT_S if FusePlus.can_invalidate() else ATTR_TIMEOUT_NO_INVALIDATE_S
        self.fs = YeastarFS(self.index, self.cache, self.downloads, on_ready=on_ready, status=self.stats,
                            uid=self.config.uid, gid=self.config.gid, umask=self.config.umask)
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


def run_mount(config: Config, on_ready: Callable[[], None]) -> None:
    """Build, serve until unmounted, tear down. Raises YeastarfsError on start-up failure."""
    _limit_malloc_arenas()
    with contextlib.ExitStack() as stack:
        mount = Mount(config, stack)
        mount.watch_signals(stack)
        mount.serve(on_ready)
    log.info("mount: %s unmounted", config.mountpoint)


def _write_marker(path: str) -> None:
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))


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
