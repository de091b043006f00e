"""Issue 9, item 4, through a real mount: a flood on the event port from an address that is
not the PBX's must neither keep the PBX's event out nor grow the daemon's memory.

The flood is the security review's: header lines of 64 KB each, then a byte every second,
from 127.0.0.2 (the PBX, the simulator, pushes from 127.0.0.1, the only allowed source).
On the code the review probed, the pushed event got 503 and the daemon grew by 200 MB.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading

from harness import date_path, wait_stable, wait_until

FLOOD_CONNECTIONS = 32
FOREIGN_SOURCE = "127.0.0.2"
# 98 header lines of 64 KB (6.4 MB) that never reach their blank line.
FLOOD_HEAD = b"POST / HTTP/1.1\r\nHost: x\r\n" + (b"X-Pad: " + b"a" * 65000 + b"\r\n") * 98
TRICKLE_INTERVAL_S = 1.0
RECONNECT_PAUSE_S = 0.3


class Flood:
    """FLOOD_CONNECTIONS threads, each connecting from FOREIGN_SOURCE, sending FLOOD_HEAD,
    then a byte every TRICKLE_INTERVAL_S, and connecting again whenever the daemon drops it,
    until the with block ends. ``connections`` counts the connections made."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.connections = 0
        self._threads = [threading.Thread(target=self._attack, daemon=True)
                         for _ in range(FLOOD_CONNECTIONS)]

    def __enter__(self) -> "Flood":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(10)

    def _attack(self) -> None:
        while not self._stopping.is_set():
            try:
                with socket.socket() as sock:
                    sock.settimeout(5)
                    sock.bind((FOREIGN_SOURCE, 0))
                    sock.connect(("127.0.0.1", self._port))
                    with self._lock:
                        self.connections += 1
                    sock.sendall(FLOOD_HEAD)
                    while not self._stopping.wait(TRICKLE_INTERVAL_S):
                        sock.send(b"a")  # raises once the daemon has closed the connection
            except OSError:
                pass
            self._stopping.wait(RECONNECT_PAUSE_S)


class RssPeak:
    """The highest VmRSS of *mount*'s daemon, sampled on a thread while in the with block."""

    def __init__(self, mount) -> None:
        self._mount = mount
        self.peak_kib = mount.rss_kib()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._done.wait(0.02):
            self.peak_kib = max(self.peak_kib, self._mount.rss_kib())


def test_a_foreign_flood_on_the_event_port_neither_delays_an_event_nor_grows_memory(pbx, mounted):
    pbx.populate(1, days=1)
    mount = mounted("--poll-interval", "3600")  # the new recording can only come by its event
    start_kib = wait_stable(mount.rss_kib, quiet_s=0.5, timeout_s=10, message="the daemon's RSS")

    with RssPeak(mount) as rss, Flood(mount.events_port) as flood:
        wait_until(lambda: flood.connections >= FLOOD_CONNECTIONS, timeout_s=5,
                   message="every flood thread to be connected")
        rec = pbx.add_recording(start=dt.datetime.now() - dt.timedelta(minutes=1), duration_s=20,
                                announce=True)
        wait_until(lambda: os.path.exists(mount.path(*date_path(rec.name))), timeout_s=2,
                   message="the announced recording, during the flood")
        assert pbx.counters["event_push"] == 1  # taken at the first push: no 503, no re-send
        # Each flood thread dropped and back twice more, while the daemon's RSS is sampled.
        wait_until(lambda: flood.connections >= 3 * FLOOD_CONNECTIONS, timeout_s=5,
                   message="the flood to go on")

    assert rss.peak_kib - start_kib < 5 * 1024, f"the daemon grew by {rss.peak_kib - start_kib} KiB"
    assert f"refused a request from {FOREIGN_SOURCE} with HTTP 403" in mount.log()
