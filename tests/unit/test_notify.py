"""app/notify.py: the sd_notify datagrams and the heartbeat's rules, without a mount."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from harness import wait_until
from yeastarfs.app import notify


@pytest.fixture
def abstract_socket():
    """A datagram socket in the abstract namespace, as systemd names it: @name."""
    name = f"yeastarfs-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    yield "@" + name, sock
    sock.close()


def received(sock, timeout_s: float = 5.0) -> list[str]:
    sock.settimeout(timeout_s)
    return sock.recv(4096).decode().split("\n")


def test_messages_reach_an_abstract_socket(abstract_socket):
    name, sock = abstract_socket
    notifier = notify.Notifier.from_environment({"NOTIFY_SOCKET": name})
    assert notifier.enabled
    assert notifier.ready("serving 3 recordings")
    assert received(sock) == ["READY=1", "STATUS=serving 3 recordings"]
    notifier.status("two\nlines")  # one line: a newline would start another assignment
    assert received(sock) == ["STATUS=two lines"]
    notifier.stopping()
    assert received(sock) == ["STOPPING=1"]


def test_without_notify_socket_nothing_is_sent():
    notifier = notify.Notifier.from_environment({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    assert not notifier.ready() and not notifier.watchdog()


def test_a_vanished_socket_is_not_an_error(tmp_path, caplog):
    notifier = notify.Notifier(str(tmp_path / "gone.sock"))
    assert not notifier.status("x") and not notifier.status("y")
    assert len([r for r in caplog.records if "cannot reach" in r.message]) == 1  # warned once


@pytest.mark.parametrize("environ, interval_s", [
    ({"WATCHDOG_USEC": "3000000"}, 1.5),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(environ, interval_s):
    notifier = notify.Notifier.from_environment({"NOTIFY_SOCKET": "@x", **environ})
    assert notifier.watchdog_interval_s == interval_s


@pytest.mark.parametrize("stats, text", [
    ({"recordings_indexed": 7, "pbx_reachable": True, "discovery": {"last_resync_time": 1.0},
      "downloads_in_flight": []}, "serving 7 recordings"),
    ({"recordings_indexed": 7, "pbx_reachable": True, "discovery": {"last_resync_time": 1.0},
      "downloads_in_flight": [{}, {}]}, "serving 7 recordings, 2 downloading"),
    ({"recordings_indexed": 3, "pbx_reachable": True, "discovery": {"last_resync_time": None}},
     "backfilling the PBX's catalogue; 3 recordings so far"),
    ({"recordings_indexed": 7, "pbx_reachable": True, "last_poll_error": "connection refused",
      "discovery": {"last_resync_time": 1.0}},
     "PBX unreachable (connection refused); serving the 7 indexed recordings, retrying"),
    ({"recordings_indexed": 7, "pbx_reachable": False, "discovery": {}},
     "PBX unreachable (no answer yet); serving the 7 indexed recordings, retrying"),
])
def test_status_line(stats, text):
    assert notify.describe(stats) == text


def test_a_hung_mount_stops_the_watchdog_pings_and_they_resume_when_it_answers(abstract_socket):
    name, sock = abstract_socket
    answering = threading.Event()
    answering.set()

    def probe():  # like a stat of a mount whose FUSE loop hangs while `answering` is clear
        answering.wait()
        return True

    notifier = notify.Notifier(name, watchdog_usec=200_000)  # pings every 0.1 s
    heartbeat = notify.Heartbeat(notifier, probe, lambda: "serving 1 recordings")
    ready = threading.Event()
    heartbeat.start(ready.set)
    assert received(sock) == ["READY=1", "STATUS=serving 1 recordings"]
    assert ready.is_set()
    assert received(sock) == ["WATCHDOG=1"]
    answering.clear()
    sock.settimeout(0.1)
    drained_at = time.monotonic()
    while time.monotonic() - drained_at < 0.3:  # a ping whose probe answered just before
        try:
            sock.recv(4096)
            drained_at = time.monotonic()
        except socket.timeout:
            pass
    with pytest.raises(socket.timeout):
        sock.settimeout(0.6)
        sock.recv(4096)
    answering.set()
    assert received(sock) == ["WATCHDOG=1"]
    heartbeat.stop()
    messages = []
    while True:
        try:
            messages.append(received(sock, 0.3))
        except socket.timeout:
            break
    assert ["STOPPING=1"] in messages
    assert all(m == ["WATCHDOG=1"] for m in messages[:messages.index(["STOPPING=1"])])
    assert messages[messages.index(["STOPPING=1"]) + 1:] == []


def test_ready_waits_for_the_first_answer(abstract_socket):
    name, sock = abstract_socket
    answers = iter([False, False, True])
    probes = []

    def probe():
        probes.append(time.monotonic())
        return next(answers, True)

    heartbeat = notify.Heartbeat(notify.Notifier(name), probe, lambda: "up")
    ready = threading.Event()
    heartbeat.start(ready.set)
    assert received(sock) == ["READY=1", "STATUS=up"]
    assert len(probes) == 3 and ready.is_set()
    heartbeat.stop()
    wait_until(lambda: received(sock) == ["STOPPING=1"], timeout_s=5)
