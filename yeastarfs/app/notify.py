"""Telling a supervisor how the daemon is: systemd's notification protocol and the thread that speaks it.

`Notifier` is sd_notify(3) in a few lines of the standard library: newline-separated
``KEY=value`` assignments in one datagram to the AF_UNIX socket named by ``$NOTIFY_SOCKET``
(a path, or ``@name`` for the abstract namespace). Without ``$NOTIFY_SOCKET`` (not started by
systemd, or not ``Type=notify``) every call does nothing. Sending never raises: a supervisor
that went away must not take the mount with it.

`Heartbeat` follows a mount from libfuse's ``init`` to its end:

- **ready.** libfuse calls ``init`` before it answers any request, so ``init`` itself proves
  nothing. The heartbeat's thread stats the mountpoint (it must be another file system than
  its parent) and asks its ``statfs``, which the kernel never caches, until both answer; only
  then does it call the mount's ``on_ready`` (the background ``mount``'s pipe) and send
  ``READY=1``. Never from a FUSE callback: that thread's answer is what the stat waits for;
- **status.** ``STATUS=`` with `describe` of the mount's statistics (backfilling, serving N
  recordings, PBX unreachable), checked every ``STATUS_CHECK_S`` and sent only when the text
  changed;
- **watchdog.** With ``$WATCHDOG_USEC`` (``WatchdogSec=``) set for this process, ``WATCHDOG=1``
  every half of it, but only after a probe of the mount answered within that half: a hung
  FUSE loop stops the pings and systemd restarts the service. One probe at most is
  outstanding, so a hung mount costs one stuck thread, not one per tick;
- **stopping.** `stop` sends ``STOPPING=1`` and ends the thread.

Leaves to others: what the statistics hold (``app.mount.Mount.stats``), when the mount ends.

Threading: `Notifier.send` may be called from any thread (one ``sendto`` per message). A
`Heartbeat` owns one thread between `start` and `stop`, and probe threads (daemon threads,
at most one alive); ``_stop`` is the only state shared with them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable, Mapping, Optional

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
# How often the status line is recomputed (it is sent only when it changed).
STATUS_CHECK_S = 2.0
# Between readiness probes while the kernel has not answered yet.
READY_RETRY_S = 0.05
# How long one readiness probe may take before it is asked again (a probe blocks while
# libfuse finishes init; a slow first answer is not a failure).
READY_PROBE_TIMEOUT_S = 5.0
# How long `Heartbeat.stop` waits for its thread (which may be waiting on a stuck probe).
STOP_WAIT_S = 1.0


class Notifier:
    """sd_notify(3): one datagram of ``KEY=value`` lines to the supervisor's socket.

    Attributes:
        address: the socket address as ``socket.sendto`` wants it, or None (disabled).
        watchdog_interval_s: how often to ping, half of ``$WATCHDOG_USEC``; None without a
            watchdog for this process.
    """

    def __init__(self, address: Optional[str], watchdog_usec: Optional[int] = None) -> None:
        self.address = _socket_address(address) if address else None
        self.watchdog_interval_s = watchdog_usec / 2e6 if self.address and watchdog_usec else None
        self._warned = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "Notifier":
        """The notifier systemd set up for this process (disabled when it set none)."""
        return cls(environ.get(NOTIFY_SOCKET_ENV) or None, _watchdog_usec(environ))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` *assignments* as one message; False if nothing was sent."""
        if self.address is None or not assignments:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
            return True
        except OSError as exc:
            if not self._warned:  # once: a supervisor that went away would fill the log
                self._warned = True
                log.warning("notify: cannot reach the service manager at %s: %s", self.address, exc)
            return False

    def ready(self, status: Optional[str] = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")


def _socket_address(name: str) -> Optional[str]:
    if name.startswith("@"):
        return "\0" + name[1:]  # Linux's abstract namespace, as systemd spells it
    if name.startswith("/"):
        return name
    log.warning("notify: $%s=%s is not an AF_UNIX socket address; not notifying", NOTIFY_SOCKET_ENV, name)
    return None


def _watchdog_usec(environ: Mapping[str, str]) -> Optional[int]:
    """``$WATCHDOG_USEC`` when it applies to this process (sd_watchdog_enabled(3))."""
    try:
        usec = int(environ.get(WATCHDOG_USEC_ENV, ""))
        pid = int(environ.get(WATCHDOG_PID_ENV) or os.getpid())
    except ValueError:
        return None
    return usec if usec > 0 and pid == os.getpid() else None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe(stats: dict) -> str:
    """The STATUS= line for a mount's statistics (``Mount.stats``): what it is doing."""
    count = stats.get("recordings_indexed", 0)
    discovery = stats.get("discovery") or {}
    failing = stats.get("last_poll_error")  # set while the catalogue's last attempts failed
    if failing or not stats.get("pbx_reachable"):
        return f"PBX unreachable ({failing or 'no answer yet'}); serving the {count} indexed recordings, retrying"
    if discovery.get("last_resync_time") is None:
        return f"backfilling the PBX's catalogue; {count} recordings so far"
    downloads = len(stats.get("downloads_in_flight") or ())
    return f"serving {count} recordings" + (f", {downloads} downloading" if downloads else "")


def mount_answers(mountpoint: str) -> bool:
    """True when *mountpoint* is a mount (not its empty directory) and its file system answers.

    ``statvfs`` always reaches the daemon (the kernel caches attributes, never statfs), so
    a hung FUSE loop makes this block rather than answer from the kernel's memory.
    """
    try:
        here = os.stat(mountpoint)
        parent = os.stat(os.path.dirname(mountpoint.rstrip("/")) or "/")
        os.statvfs(mountpoint)
    except OSError:
        return False
    return here.st_dev != parent.st_dev


class Heartbeat:
    """Readiness, status and watchdog of one mount, as the module docstring says.

    *probe* answers whether the mount answers (may block: it runs on its own thread);
    *status* gives the current status line (cheap, called every ``STATUS_CHECK_S``).
    """

    def __init__(self, notifier: Notifier, probe: Callable[[], bool], status: Callable[[], str]) -> None:
        self.notifier = notifier
        self._probe = probe
        self._status = status
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._probe_thread: Optional[threading.Thread] = None
        self._probe_result = False
        self._last_status: Optional[str] = None

    def start(self, on_ready: Callable[[], None]) -> None:
        """Wait (on a thread) for the mount to answer, then *on_ready*, ``READY=1`` and the
        status and watchdog loop. Called from libfuse's ``init``; returns at once."""
        self._thread = threading.Thread(target=self._run, args=(on_ready,), name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """``STOPPING=1``, and end the thread (the mount is going away)."""
        self._stop.set()
        self.notifier.stopping()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=STOP_WAIT_S)  # a daemon thread: never hold up the exit

    # -- the thread ----------------------------------------------------------------------------

    def _run(self, on_ready: Callable[[], None]) -> None:
        if not self._wait_ready() or self._stop.is_set():
            return
        log.info("mount: answering requests; ready")
        on_ready()
        self._last_status = self._safe_status()
        self.notifier.ready(self._last_status)
        if not self.notifier.enabled:
            return
        interval_s = self.notifier.watchdog_interval_s
        next_ping = time.monotonic() if interval_s else float("inf")
        next_status = time.monotonic() + STATUS_CHECK_S
        while True:
            now = time.monotonic()
            if now >= next_ping:
                next_ping = now + interval_s  # on schedule, however long the probe took
                self._ping()
            if now >= next_status:
                next_status = now + STATUS_CHECK_S
                self._update_status()
            if self._stop.wait(max(0.0, min(next_ping, next_status) - time.monotonic())):
                return

    def _wait_ready(self) -> bool:
        while not self._stop.is_set():
            if self._probe_within(READY_PROBE_TIMEOUT_S):
                return True
            self._stop.wait(READY_RETRY_S)
        return False

    def _ping(self) -> None:
        answered = self._probe_within(self.notifier.watchdog_interval_s or STATUS_CHECK_S)
        if self._stop.is_set():
            return  # never a ping after STOPPING=1
        if answered:
            self.notifier.watchdog()
        else:
            log.warning("mount: the mount did not answer within %.1f s; not feeding systemd's watchdog",
                        self.notifier.watchdog_interval_s)

    def _update_status(self) -> None:
        text = self._safe_status()
        if text != self._last_status:
            self._last_status = text
            self.notifier.status(text)

    def _safe_status(self) -> str:
        try:
            return _one_line(self._status())
        except Exception as exc:  # noqa: BLE001 - a status line must never end the heartbeat
            log.debug("notify: status failed: %s", exc)
            return "running"

    def _probe_within(self, timeout_s: float) -> bool:
        """Run the probe on its own thread; False if it failed or is still blocked after
        *timeout_s* (then no new probe starts until that one returns)."""
        if self._probe_thread is None or not self._probe_thread.is_alive():
            self._probe_result = False
            self._probe_thread = threading.Thread(target=self._probe_once, name="mount-probe", daemon=True)
            self._probe_thread.start()
        self._probe_thread.join(timeout_s)
        return not self._probe_thread.is_alive() and self._probe_result

    def _probe_once(self) -> None:
        try:
            self._probe_result = bool(self._probe())
        except Exception:  # noqa: BLE001 - a failed probe means "not answering"
            self._probe_result = False
