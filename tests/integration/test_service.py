"""The daemon under a service manager: systemd's notification protocol, heard on a datagram
socket the test owns, as systemd would hear it (with the sender's pid from SCM_CREDENTIALS)."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import time

import pytest

from harness import fusermount, mount_command, wait_until

pytestmark = pytest.mark.fuse

WATCHDOG_USEC = 1_000_000  # pings every 0.5 s


class NotifySocket:
    """A bound AF_UNIX datagram socket that records (arrival time, sender pid, message)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # as systemd does
        self.sock.bind(path)
        self.messages: list[tuple[float, int, dict]] = []

    def receive(self, timeout_s: float) -> tuple[float, int, dict] | None:
        self.sock.settimeout(timeout_s)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except socket.timeout:
            return None
        pid = next((struct.unpack("3i", cdata)[0] for level, kind, cdata in ancillary
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), 0)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        entry = (time.monotonic(), pid, fields)
        self.messages.append(entry)
        return entry

    def wait_for(self, key: str, timeout_s: float, on_each=None) -> tuple[float, int, dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            entry = self.receive(max(0.01, deadline - time.monotonic()))
            if entry is None:
                continue
            if on_each is not None:
                on_each(entry)
            if key in entry[2]:
                return entry
        raise AssertionError(f"no {key} within {timeout_s} s; heard {[m[2] for m in self.messages]}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    listener = NotifySocket(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", listener.path)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield listener
    listener.close()


def _answers(path: str) -> bool:
    """The mount (not the empty directory under it) answers a stat and a statfs."""
    return os.path.ismount(path) and os.stat(path).st_dev != os.stat(os.path.dirname(path)).st_dev \
        and os.statvfs(path) is not None


def test_ready_only_once_the_mount_answers_then_status_watchdog_and_stopping(pbx, mounted, notify_socket,
                                                                              monkeypatch):
    pbx.populate(3, days=1)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    mount = mounted(wait=False)
    seen_before_ready = []

    def check(entry):
        if "READY" in entry[2]:
            # The moment READY=1 arrives the mount answers, and libfuse's init came first.
            seen_before_ready.append((_answers(mount.mountpoint), "(FUSE init)" in mount.log()))

    ready_at, pid, ready = notify_socket.wait_for("READY", timeout_s=30, on_each=check)
    assert seen_before_ready == [(True, True)]
    assert pid == mount.process.pid and ready["READY"] == "1"
    assert ready["STATUS"] == "serving 3 recordings"
    assert notify_socket.messages[0][2]["STATUS"].startswith("starting")  # before the mount existed

    notify_socket.wait_for("WATCHDOG", timeout_s=5)
    for _ in range(4):
        notify_socket.wait_for("WATCHDOG", timeout_s=5)
    pings = [at for at, _, fields in notify_socket.messages if "WATCHDOG" in fields]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert all(0.35 <= gap <= 0.8 for gap in gaps), gaps  # half of WATCHDOG_USEC, 0.5 s

    mount.process.send_signal(signal.SIGTERM)
    _, pid, _ = notify_socket.wait_for("STOPPING", timeout_s=20)
    assert pid == mount.process.pid
    assert mount.process.wait(timeout=20) == 0
    while notify_socket.receive(0.2) is not None:  # whatever it sent before it exited
        pass
    stopping = [fields for _, _, fields in notify_socket.messages].index({"STOPPING": "1"})
    assert not any("WATCHDOG" in fields for _, _, fields in notify_socket.messages[stopping:])


def test_status_follows_the_pbx_and_no_watchdog_without_watchdog_usec(pbx, mounted, notify_socket, monkeypatch):
    pbx.populate(2, days=1)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    mount = mounted("--poll-interval", "1", wait=False)
    notify_socket.wait_for("READY", timeout_s=30)
    mount.errors_expected = True  # the PBX goes away on purpose
    pbx.stop()
    _, _, fields = notify_socket.wait_for("STATUS", timeout_s=30)
    while "unreachable" not in fields["STATUS"]:
        _, _, fields = notify_socket.wait_for("STATUS", timeout_s=30)
    assert "serving the 2 indexed recordings" in fields["STATUS"], fields
    assert not any("WATCHDOG" in fields for _, _, fields in notify_socket.messages)


def test_background_mount_hands_systemd_the_daemon_pid(pbx, password_file, tmp_path, notify_socket):
    """``yeastarfs mount`` without --foreground in a Type=notify unit: MAINPID= names the
    daemon, whose READY=1 comes once it answers, while the command returns."""
    pbx.populate(1, days=1)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = subprocess.run(mount_command(mountpoint, pbx.base_url, tmp_path / "cache", password_file),
                            capture_output=True, text=True, timeout=60)
    try:
        assert result.returncode == 0, result.stderr
        assert _answers(str(mountpoint))
        _, parent_pid, handoff = notify_socket.wait_for("MAINPID", timeout_s=5)
        daemon_pid = int(handoff["MAINPID"])
        assert parent_pid != daemon_pid
        _, sender, _ = notify_socket.wait_for("READY", timeout_s=10)
        assert sender == daemon_pid
    finally:
        subprocess.run([fusermount(), "-u", str(mountpoint)], capture_output=True)
    wait_until(lambda: not _alive(daemon_pid), timeout_s=20, message="the daemon to exit after unmount")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
