"""yeastarfs.events: the HTTP receiver and the event handling both transports share.

Real sockets on 127.0.0.1, ports picked by the kernel. The helpers above the first banner
(`new_cdr`, `expected_recording`, `wait_for`, `Calls`) are reused by test_tcpevents.py.
"""

from __future__ import annotations

import errno
import http.client
import json
import logging
import socket
import threading
import time
from typing import Any, Callable, Optional

import pytest
from harness import holds_for, readable

from yeastarfs.errors import ConfigError
from yeastarfs.pbx import events as shared_events
from yeastarfs.pbx.sseries import events
from yeastarfs.pbx.sseries.events import EventReceiver
from yeastarfs.models import Recording

NAME = "20191024201242-1571897930.5-203-201-Internal.wav"
LOGGER = "yeastarfs.pbx.events"


def new_cdr(callid: str = "1571897930.5", name: str = NAME, key: str = "event",
            **extra: Any) -> dict:
    """A NewCdr event as the v2 docs show it (v1: key="action"), with their misspellings."""
    payload = {
        key: "NewCdr", "callid": callid, "timestart": "2019-10-23 22:18:50",
        "callfrom": "1023", "callto": "2023", "callduraction": "19", "talkduraction": "14",
        "srctrunkname": "", "dsttrcunkname": "", "pincode": "", "status": "ANSWERED",
        "type": "Internal", "recording": name, "didnumber": "", "agentringtime": "0",
        "sn": "369451090405",
    }
    payload.update(extra)
    return payload


def expected_recording(callid: str = "1571897930.5", name: str = NAME,
                       dst_trunk: str = "") -> Recording:
    return Recording(name=name, callid=callid, timestart="2019-10-23 22:18:50", callfrom="1023",
                     callto="2023", call_s=19, talk_s=14, src_trunk="", dst_trunk=dst_trunk,
                     status="ANSWERED", call_type="Internal", pincode="", did="",
                     sn="369451090405")


def wait_for(predicate: Callable[[], Any], timeout_s: float = 3.0) -> bool:
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


class Calls:
    """A thread-safe recorder of callback arguments."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.items: list[Any] = []
        self._lock = threading.Lock()
        self._delay_s = delay_s

    def __call__(self, item: Any) -> None:
        time.sleep(self._delay_s)
        with self._lock:
            self.items.append(item)

    def __len__(self) -> int:
        with self._lock:
            return len(self.items)


def post(port: int, body: Optional[bytes], *, method: str = "POST", path: str = "/",
         timeout_s: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def post_json(port: int, payload: Any) -> int:
    return post(port, json.dumps(payload).encode())[0]


def status_or_none(port: int) -> Optional[int]:
    """The status a NewCdr POST gets, or None if the connection failed."""
    try:
        return post_json(port, new_cdr())
    except OSError:
        return None


def raw_exchange(port: int, data: bytes, timeout_s: float = 5.0) -> bytes:
    """Send *data* on a fresh connection and return everything read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def raw_post(body: bytes, path: str = "/", host: str = "192.168.5.150: 8260") -> bytes:
    """A POST exactly as the PBX writes it (§7.1), odd Host header included."""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n"
            f"User-Agent: WebAPI\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def connect_from(source: str, port: int, timeout_s: float = 5.0) -> socket.socket:
    """A connection to 127.0.0.1:*port* from *source* (any 127/8 address works on Linux)."""
    sock = socket.socket()
    try:
        sock.settimeout(timeout_s)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; a reset counts as closing (the server
    closes with our unread bytes pending when it refuses without reading them)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def post_from(source: str, port: int, payload: Any) -> int:
    """The status a NewCdr POST from *source* gets; the server may refuse before reading it."""
    with connect_from(source, port) as sock:
        try:
            sock.sendall(raw_post(json.dumps(payload).encode()))
        except OSError:
            pass  # refused and closed already: the reply is still there to read
        reply = read_until_closed(sock)
    return int(reply.split(b" ", 2)[1])


def trickle_until_closed(sock: socket.socket, interval_s: float, give_up_s: float) -> bytes:
    """Send one byte every *interval_s* until the server closes; return what it sent."""
    deadline_s = time.monotonic() + give_up_s
    while time.monotonic() < deadline_s:
        if readable([sock], interval_s):
            return read_until_closed(sock)
        sock.send(b"a")
    raise AssertionError(f"still open after {give_up_s} s")


class SlowLoris:
    """*count* connections from *source* that each send a request line, then one header byte
    every *interval_s*, until the server closes them; one thread drives them all.

    ``closed_after_s[i]``: how long connection i stayed open; ``replies[i]``: what it got.
    """

    def __init__(self, port: int, source: str, count: int = 32, interval_s: float = 0.1):
        self.opened_s: list[float] = []
        self.closed_after_s: list[float] = []
        self.replies = [b""] * count
        self._socks: list[socket.socket] = []
        self._open: set[int] = set()
        self._lock = threading.Lock()
        self._interval_s = interval_s
        self._stopping = threading.Event()
        for i in range(count):
            sock = connect_from(source, port)
            self.opened_s.append(time.monotonic())
            self._socks.append(sock)
            self._open.add(i)
            self._send(i, b"POST / HTTP/1.1\r\nX-Slow: ")
        self.closed_after_s = [float("inf")] * count
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SlowLoris:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stopping.set()
        self._thread.join(5)
        for sock in self._socks:
            sock.close()

    def open_count(self) -> int:
        with self._lock:
            return len(self._open)

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                still_open = list(self._open)
            if not still_open:
                return
            ready = readable([self._socks[i] for i in still_open], self._interval_s)
            for i in still_open:
                if self._socks[i] in ready:
                    self._receive(i)
                else:
                    self._send(i, b"a")

    def _receive(self, i: int) -> None:
        try:
            data = self._socks[i].recv(65536)
        except OSError:
            data = b""
        self.replies[i] += data
        if not data:
            self._closed(i)

    def _send(self, i: int, data: bytes) -> None:
        try:
            self._socks[i].send(data)
        except OSError:  # closed by the server: what it said before is still to be read
            self.replies[i] += read_until_closed(self._socks[i])
            self._closed(i)

    def _closed(self, i: int) -> None:
        with self._lock:
            if i in self._open:
                self._open.discard(i)
                self.closed_after_s[i] = time.monotonic() - self.opened_s[i]


class _Sampler:
    """Samples *measure()* every few milliseconds on a thread while in a with block."""

    def __init__(self, measure: Callable[[], int]) -> None:
        self._measure = measure
        self.first = self.peak = measure()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._done.set()
        self._thread.join(5)
        self.peak = max(self.peak, self._measure())

    def _run(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, self._measure())


def rss_bytes(pid: str = "self") -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/PID/status")


class ThreadPeak(_Sampler):
    """The most threads alive at once in this process (the sampler's own included)."""

    def __init__(self) -> None:
        super().__init__(threading.active_count)


class RssPeak(_Sampler):
    """How far this process's resident memory rose above its level at the start."""

    def __init__(self) -> None:
        super().__init__(rss_bytes)

    @property
    def growth_bytes(self) -> int:
        return self.peak - self.first


@pytest.fixture
def make_receiver():
    """Build (not start) receivers on 127.0.0.1:0; every one is stopped afterwards."""
    made: list[EventReceiver] = []

    def make(on_recording: Optional[Callable] = None, *, cls: Any = EventReceiver, **kwargs: Any) -> EventReceiver:
        kwargs.setdefault("host", "127.0.0.1")
        kwargs.setdefault("port", 0)
        receiver = cls(Calls() if on_recording is None else on_recording, **kwargs)
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.stop()


@pytest.fixture
def served(make_receiver):
    """A started receiver and the recordings it has dispatched."""
    calls = Calls()
    return make_receiver(calls).start(), calls


# --- HTTP receiver ----------------------------------------------------------------------


@pytest.mark.parametrize("key, trunk_field", [("event", "dsttrcunkname"),
                                              ("action", "desttrunkname"),
                                              ("action", "dstrunkname")])
def test_new_cdr_in_v2_and_v1_formats_gives_the_recording(served, key, trunk_field):
    receiver, calls = served
    payload = new_cdr(key=key)
    del payload["dsttrcunkname"]
    payload[trunk_field] = "SIP-out"

    assert post_json(receiver.port, payload) == 200

    assert wait_for(lambda: len(calls) == 1)
    assert calls.items == [expected_recording(dst_trunk="SIP-out")]
    assert receiver.stats["new_cdr"] == 1
    assert receiver.stats["last_event_time"] is not None


def test_reply_is_fast_while_the_callback_is_slow(make_receiver):
    calls = Calls(delay_s=2.0)
    receiver = make_receiver(calls).start()

    for callid in ("1.1", "1.2"):
        started_s = time.monotonic()
        assert post_json(receiver.port, new_cdr(callid=callid)) == 200
        assert time.monotonic() - started_s < 0.5

    started_s = time.monotonic()
    receiver.stop()
    assert time.monotonic() - started_s < 1.0


def test_duplicates_are_dropped_by_callid_else_by_recording_name(served):
    receiver, calls = served
    for _ in range(3):
        assert post_json(receiver.port, new_cdr(callid="7.1", name="20240101000000-a.wav")) == 200
    for _ in range(2):
        assert post_json(receiver.port, new_cdr(callid="", name="20240101000000-b.wav")) == 200

    assert wait_for(lambda: receiver.stats["duplicates"] == 3 and len(calls) == 2)
    holds_for(lambda: len(calls) == 2, duration_s=0.1, message="no repeat dispatched")
    assert [rec.name for rec in calls.items] == ["20240101000000-a.wav", "20240101000000-b.wav"]
    assert receiver.stats["duplicates"] == 3
    assert receiver.stats["new_cdr"] == 2


@pytest.mark.parametrize("body", [
    b'{"event": "NewCdr", "recording": ',
    b"\xff\xfe not utf-8",
    b"",
    json.dumps([new_cdr()]).encode(),
    json.dumps("NewCdr").encode(),
    json.dumps(new_cdr(recording=123)).encode(),
    json.dumps(new_cdr(recording=[NAME])).encode(),
    json.dumps(new_cdr(event=["NewCdr"])).encode(),
    b"[" * 50_000,
], ids=["truncated", "bad-utf8", "empty", "list", "string", "recording-int",
        "recording-list", "event-list", "deeply-nested"])
def test_malformed_bodies_get_400_and_change_nothing(served, body):
    receiver, calls = served

    status, _ = post(receiver.port, body)

    assert status == 400
    assert receiver.stats["rejected"] == 1
    assert post_json(receiver.port, new_cdr()) == 200  # still works afterwards
    assert wait_for(lambda: len(calls) == 1)
    assert calls.items == [expected_recording()]


def test_other_events_get_200_reach_on_event_and_give_no_recording(make_receiver):
    calls, events = Calls(), Calls()
    receiver = make_receiver(calls, on_event=events).start()
    ring = {"event": "RING", "callid": "9.9", "from": "1001"}
    no_recording = new_cdr(callid="9.8", recording="")

    assert post_json(receiver.port, ring) == 200
    assert post_json(receiver.port, no_recording) == 200
    assert post_json(receiver.port, new_cdr()) == 200

    assert wait_for(lambda: len(events) == 3 and len(calls) == 1)
    # Each reply goes out before its event is queued, so concurrent handlers may queue
    # in either order; the PBX's events carry no order we rely on.
    assert sorted(events.items, key=repr) == sorted([ring, no_recording, new_cdr()], key=repr)
    assert calls.items == [expected_recording()]
    assert receiver.stats["rejected"] == 0


def test_oversized_body_gets_413_without_hanging(make_receiver):
    receiver = make_receiver(max_body_bytes=1024).start()
    big = json.dumps(new_cdr(sn="x" * 200_000)).encode()

    started_s = time.monotonic()
    status, _ = post(receiver.port, big)
    assert status == 413
    # A huge declared length and no body at all: the server must not wait for it.
    reply = raw_exchange(receiver.port, b"POST / HTTP/1.1\r\nHost: x\r\n"
                                        b"Content-Length: 1000000000\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert time.monotonic() - started_s < 1.5
    assert receiver.stats["rejected"] == 2
    assert post_json(receiver.port, new_cdr()) == 200


def padded_new_cdr(size_bytes: int) -> bytes:
    """A NewCdr body of exactly *size_bytes* (padded in its ``sn`` field)."""
    pad = size_bytes - len(json.dumps(new_cdr(sn="")).encode())
    body = json.dumps(new_cdr(sn="9" * pad)).encode()
    assert len(body) == size_bytes
    return body


def test_the_default_body_cap_is_64_kib(served):
    """README (Security, Event listener): a 64 KiB body, and not a byte more."""
    receiver, calls = served
    assert post(receiver.port, padded_new_cdr(64 * 1024))[0] == 200
    assert wait_for(lambda: len(calls) == 1)
    assert post(receiver.port, padded_new_cdr(64 * 1024 + 1))[0] == 413
    assert receiver.stats["rejected"] == 1 and len(calls) == 1


def padded_head(size_bytes: int, lines: int, body: bytes) -> bytes:
    """A POST head of exactly *size_bytes* (request line to blank line) in *lines* lines."""
    fixed = [b"POST / HTTP/1.1", b"Host: x", b"Content-Length: %d" % len(body)]
    padding = [b"X-Pad%d: " % i for i in range(lines - len(fixed) - 1)]
    bare = len(b"\r\n".join(fixed + padding)) + 4
    padding[-1] += b"a" * (size_bytes - bare)
    head = b"\r\n".join(fixed + padding) + b"\r\n\r\n"
    assert len(head) == size_bytes and head.count(b"\n") == lines
    return head + body


@pytest.mark.parametrize("size_bytes, lines, status", [
    (8 * 1024, 32, 200), (8 * 1024 + 1, 32, 431), (8 * 1024, 33, 431), (1024, 33, 431)])
def test_the_head_caps_are_8_kib_and_32_lines(served, size_bytes, lines, status):
    """README (Security, Event listener): 8 KiB of request line and headers (32 lines)."""
    receiver, calls = served
    reply = raw_exchange(receiver.port, padded_head(size_bytes, lines, json.dumps(new_cdr()).encode()))
    assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:80]
    if status == 200:
        assert wait_for(lambda: len(calls) == 1)
    else:
        assert receiver.stats["rejected"] == 1 and len(calls) == 0


@pytest.mark.parametrize("method, status", [("GET", 405), ("HEAD", 405), ("PUT", 405),
                                            ("POST", 411), ("BREW", 501)])
def test_other_methods_and_bodiless_posts_are_refused(served, method, status):
    receiver, calls = served
    request = f"{method} / HTTP/1.1\r\nHost: x\r\n\r\n".encode()

    reply = raw_exchange(receiver.port, request)

    assert reply.startswith(f"HTTP/1.1 {status} ".encode()) or \
        reply.startswith(f"HTTP/1.0 {status} ".encode())
    if status == 405:
        assert b"Allow: POST" in reply
    assert receiver.stats["rejected"] == 1
    assert post_json(receiver.port, new_cdr()) == 200
    assert wait_for(lambda: len(calls) == 1)


@pytest.mark.parametrize("path", ["/", "/yeastar/events?tag=pbx1"])
def test_the_pbx_odd_host_header_and_any_path_work(served, path):
    receiver, calls = served

    reply = raw_exchange(receiver.port, raw_post(json.dumps(new_cdr()).encode(), path=path))

    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b"Connection: close" in reply
    assert wait_for(lambda: len(calls) == 1)
    assert calls.items == [expected_recording()]


def test_allowed_ips_refuse_other_sources_with_403(make_receiver):
    calls = Calls()
    receiver = make_receiver(calls, allowed_ips=["192.0.2.10"]).start()

    assert post_from("127.0.0.1", receiver.port, new_cdr()) == 403
    assert receiver.stats["rejected"] == 1

    receiver.set_allowed_ips(["192.0.2.10", "::ffff:127.0.0.1"])  # mapped form matches too
    assert post_json(receiver.port, new_cdr()) == 200
    assert wait_for(lambda: len(calls) == 1)
    assert receiver.stats["new_cdr"] == 1  # the refused event was not remembered

    receiver.set_allowed_ips(None)
    assert post_json(receiver.port, new_cdr(callid="2.2")) == 200


@pytest.mark.parametrize("ips", [["not-an-ip"], "127.0.0.1"])
def test_bad_allowed_ips_raise_config_error(ips):
    with pytest.raises(ConfigError, match="allowed_ips"):
        EventReceiver(Calls(), allowed_ips=ips)


def test_rejections_are_logged_at_most_once_per_minute(served, caplog):
    receiver, _ = served
    caplog.set_level(logging.WARNING, logger=LOGGER)

    for _ in range(5):
        assert post(receiver.port, b"{not json")[0] == 400

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "refused a request from 127.0.0.1 with HTTP 400" in warnings[0].getMessage()
    assert receiver.stats["rejected"] == 5


def test_a_failing_callback_does_not_stop_dispatch(make_receiver, caplog):
    delivered = Calls()

    def on_recording(recording: Recording) -> None:
        if recording.callid == "1.1":
            raise RuntimeError("index is broken")
        delivered(recording)

    receiver = make_receiver(on_recording).start()
    assert post_json(receiver.port, new_cdr(callid="1.1")) == 200
    assert post_json(receiver.port, new_cdr(callid="1.2")) == 200

    assert wait_for(lambda: len(delivered) == 1)
    assert delivered.items[0].callid == "1.2"
    assert any("callback" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def test_a_flood_is_answered_with_bounded_threads(make_receiver):
    calls = Calls()
    receiver = make_receiver(calls).start()
    baseline = threading.active_count()
    peak = [baseline]
    statuses: list[int] = []
    done = threading.Event()

    def watch_threads() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], threading.active_count())
            time.sleep(0.002)

    def client(first: int) -> None:
        for n in range(first, first + 25):
            statuses.append(post_json(receiver.port, new_cdr(callid=f"5.{n}")))

    watcher = threading.Thread(target=watch_threads)
    watcher.start()
    clients = [threading.Thread(target=client, args=(i * 25,)) for i in range(20)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(15)
    done.set()
    watcher.join()

    assert statuses == [200] * 500
    # 20 clients and the watcher, plus at most MAX_HANDLER_THREADS (32) handlers.
    assert peak[0] <= baseline + 21 + 32
    assert wait_for(lambda: threading.active_count() <= baseline)  # handlers are gone
    assert post_json(receiver.port, new_cdr(callid="5.999")) == 200
    assert wait_for(lambda: len(calls) == 501)
    assert receiver.stats["new_cdr"] == 501


@pytest.mark.parametrize("partial", [
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Le",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"event\": \"New",
], ids=["trickled-headers", "trickled-body"])
def test_a_trickling_client_is_cut_off_at_the_connection_deadline(make_receiver, partial):
    calls = Calls()
    receiver = make_receiver(calls)
    receiver.connection_deadline_s = 1.0
    receiver.start()

    with connect_from("127.0.0.1", receiver.port) as slow:
        opened_s = time.monotonic()
        slow.sendall(partial)
        assert post_json(receiver.port, new_cdr()) == 200  # it blocks no one meanwhile
        # One byte every 0.2 s: a per-read timeout alone would never fire.
        reply = trickle_until_closed(slow, interval_s=0.2, give_up_s=4.0)
        closed_after_s = time.monotonic() - opened_s

    assert reply.startswith(b"HTTP/1.1 408 ")
    assert 0.9 < closed_after_s < 1.5
    assert receiver.stats["timed_out"] == 1
    assert wait_for(lambda: len(calls) == 1)


def test_connections_beyond_the_cap_get_503_while_none_is_slow(make_receiver):
    receiver = make_receiver()
    receiver.max_handler_threads = 2
    receiver.start()
    stalled = [connect_from("127.0.0.1", receiver.port) for _ in range(2)]
    try:
        for sock in stalled:
            sock.sendall(b"POST / HTTP/1.1\r\n")
        # Accepted in order, so both stalled connections hold their slots by now, and
        # neither has been receiving for slow_connection_s (1 s): no one yields.
        with connect_from("127.0.0.1", receiver.port) as third:
            assert third.recv(4096).startswith(b"HTTP/1.1 503 ")
    finally:
        for sock in stalled:
            sock.close()
    assert wait_for(lambda: status_or_none(receiver.port) == 200)


def test_a_slow_connection_yields_its_slot_to_a_new_one(make_receiver):
    calls = Calls()
    receiver = make_receiver(calls)
    receiver.max_handler_threads = 2
    receiver.slow_connection_s = 0.2
    receiver.start()
    with connect_from("127.0.0.1", receiver.port) as oldest, \
            connect_from("127.0.0.1", receiver.port) as newer:
        opened_s = time.monotonic()
        for sock in (oldest, newer):
            sock.sendall(b"POST / HTTP/1.1\r\n")
        assert wait_for(lambda: time.monotonic() - opened_s > 0.3)  # both slow by now

        assert post_json(receiver.port, new_cdr()) == 200

        assert read_until_closed(oldest) == b""  # evicted: closed without a reply
        newer.settimeout(0.2)
        with pytest.raises(socket.timeout):
            newer.recv(1)  # still held
    assert receiver.stats["evicted"] == 1
    assert wait_for(lambda: len(calls) == 1)


def test_a_forbidden_source_is_refused_at_accept_before_it_sends_anything(make_receiver):
    calls = Calls()
    receiver = make_receiver(calls, allowed_ips=["127.0.0.1"]).start()
    baseline_threads = threading.active_count()

    with connect_from("127.0.0.2", receiver.port, timeout_s=2.0) as foreign:
        started_s = time.monotonic()
        reply = read_until_closed(foreign)  # sends nothing, reads at once
        took_s = time.monotonic() - started_s
        assert threading.active_count() == baseline_threads  # no handler thread for it

    assert reply.startswith(b"HTTP/1.1 403 ")
    assert took_s < 0.5
    assert receiver.stats["forbidden"] == 1
    assert receiver.stats["received"] == 0

    receiver.set_allowed_ips(["127.0.0.2"])  # at runtime, for the next connection
    assert post_from("127.0.0.2", receiver.port, new_cdr()) == 200
    assert wait_for(lambda: len(calls) == 1)


@pytest.mark.parametrize("source, allowed", [
    ("127.0.0.2", ["127.0.0.1"]),  # a foreign address: refused at accept
    ("127.0.0.2", ["127.0.0.1", "127.0.0.2"]),  # another allowed source: yields to the PBX
    ("127.0.0.1", ["127.0.0.1"]),  # the PBX's own address: its slow connections yield
], ids=["foreign", "allowed-other", "allowed-same"])
def test_32_slow_loris_connections_cannot_keep_an_event_out(make_receiver, source, allowed):
    calls = Calls()
    receiver = make_receiver(calls, allowed_ips=allowed)
    receiver.connection_deadline_s = 2.0
    receiver.slow_connection_s = 0.3
    receiver.start()
    baseline_threads = threading.active_count()

    with ThreadPeak() as threads, SlowLoris(receiver.port, source, count=32) as flood:
        assert wait_for(lambda: time.monotonic() - flood.opened_s[-1] > 0.5)  # flood settled
        if source in allowed:
            assert flood.open_count() == 32  # each holds a slot, trickling a byte at a time
        started_s = time.monotonic()

        assert post_json(receiver.port, new_cdr()) == 200

        assert time.monotonic() - started_s < 0.5
        assert wait_for(lambda: len(calls) == 1)
        assert calls.items == [expected_recording()]
        assert wait_for(lambda: flood.open_count() == 0, timeout_s=3.0)

    bound_s = 0.3 if source not in allowed else receiver.connection_deadline_s + 0.5
    assert max(flood.closed_after_s) < bound_s
    # SlowLoris and ThreadPeak themselves, plus at most 32 handlers and 32 being evicted.
    assert threads.peak <= baseline_threads + 2 + 2 * 32
    if source not in allowed:
        assert receiver.stats["forbidden"] == 32
        assert all(reply.startswith(b"HTTP/1.1 403 ") for reply in flood.replies)
        assert threads.peak <= baseline_threads + 2 + 1  # the event's handler only


@pytest.mark.parametrize("head", [
    b"POST / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n",
    b"POST / HTTP/1.1\r\n" + b"X-Many: a\r\n" * 40,
], ids=["too-many-bytes", "too-many-lines"])
def test_headers_over_the_cap_get_431_without_waiting_for_the_rest(served, head):
    receiver, calls = served

    with connect_from("127.0.0.1", receiver.port, timeout_s=2.0) as sock:
        sock.sendall(head)  # the headers never end: only the cap can answer this
        started_s = time.monotonic()
        reply = read_until_closed(sock)

    assert reply.startswith(b"HTTP/1.1 431 ")
    assert time.monotonic() - started_s < 0.5
    assert receiver.stats["rejected"] == 1
    assert post_json(receiver.port, new_cdr()) == 200
    assert wait_for(lambda: len(calls) == 1)


def test_memory_stays_flat_while_32_connections_send_6_mb_of_headers(make_receiver):
    receiver = make_receiver().start()  # any source: these headers are read, not refused
    line = b"X-Pad: " + b"a" * 65000 + b"\r\n"  # the security review's request
    request = b"POST / HTTP/1.1\r\nHost: x\r\n" + line * 98
    replies: list[bytes] = []
    go = threading.Event()

    def attack() -> None:
        with connect_from("127.0.0.1", receiver.port) as sock:
            go.wait()
            try:
                sock.sendall(request)
            except OSError:
                pass  # refused before the end: expected
            replies.append(read_until_closed(sock))

    baseline_threads = threading.active_count()
    assert post_json(receiver.port, new_cdr()) == 200  # warm: one handler has run
    assert wait_for(lambda: threading.active_count() == baseline_threads)
    attackers = [threading.Thread(target=attack) for _ in range(32)]
    for thread in attackers:
        thread.start()
    with RssPeak() as rss:
        go.set()
        for thread in attackers:
            thread.join(10)

    assert rss.growth_bytes < 4 << 20, f"RSS grew by {rss.growth_bytes >> 10} KiB"
    assert [reply[:13] for reply in replies] == [b"HTTP/1.1 431 "] * 32


def test_a_stuck_callback_queues_events_within_a_byte_budget(make_receiver, monkeypatch):
    monkeypatch.setattr(shared_events, "MAX_QUEUED_BYTES", 64 * 1024)
    gate = threading.Event()
    delivered = Calls()

    def stuck(recording: Recording) -> None:
        gate.wait(5)
        delivered(recording)

    receiver = make_receiver(stuck).start()
    padding = "1" * 20_000  # each recording keeps about 20 KiB of text: 3 fit in 64 KiB
    for n in range(10):
        assert post_json(receiver.port, new_cdr(callid=f"8.{n}", callfrom=padding)) == 200

    assert wait_for(lambda: receiver.stats["dropped"] == 7)  # queued after each reply
    gate.set()
    assert wait_for(lambda: len(delivered) == 3)
    assert post_json(receiver.port, new_cdr(callid="8.9", callfrom=padding)) == 200  # re-sent
    assert wait_for(lambda: len(delivered) == 4)  # the budget was given back


def test_stop_closes_connections_still_being_received(make_receiver):
    receiver = make_receiver().start()
    baseline_threads = threading.active_count()
    with connect_from("127.0.0.1", receiver.port) as slow:
        slow.sendall(b"POST / HTTP/1.1\r\n")
        assert wait_for(lambda: threading.active_count() == baseline_threads + 1)

        started_s = time.monotonic()
        receiver.stop()

        assert read_until_closed(slow) == b""
        assert time.monotonic() - started_s < 1.0


def test_a_busy_port_raises_config_error(make_receiver):
    first = make_receiver().start()

    with pytest.raises(ConfigError, match="already in use"):
        make_receiver(port=first.port).start()
    with pytest.raises(ConfigError, match="cannot listen"):
        make_receiver(port=70000).start()


# --- what a refusal looks like, why a port cannot be used, the log throttle ---------------------


def test_a_refusal_before_parsing_is_a_complete_plain_reply(served):
    receiver, _ = served
    reply = raw_exchange(receiver.port, b"POST / HTTP/1.1\r\n" + b"X-Many: a\r\n" * 40)
    assert reply == (b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     b"Content-Length: 32\r\nConnection: close\r\n\r\nRequest Header Fields Too Large\n")


@pytest.mark.parametrize("code, reason", [
    (errno.EADDRINUSE, "the port is already in use (another program, or another yeastarfs)"),
    (errno.EACCES, "not permitted (ports below 1024 need root or CAP_NET_BIND_SERVICE)"),
    (errno.EPERM, "not permitted (ports below 1024 need root or CAP_NET_BIND_SERVICE)"),
    (errno.EADDRNOTAVAIL, "192.0.2.7 is not an address of this host"),
    (errno.EINVAL, "[Errno 22] odd"),
])
def test_why_the_event_port_cannot_be_used(code, reason):
    message = shared_events._bind_problem("192.0.2.7", 8260, OSError(code, "odd"))
    assert message == f"event receiver: cannot listen on 192.0.2.7:8260 for PBX events: {reason}"


def test_a_port_of_another_host_is_a_config_error_saying_so(make_receiver):
    with pytest.raises(ConfigError, match="192.0.2.7 is not an address of this host"):
        make_receiver(host="192.0.2.7", port=0).start()


def test_the_throttle_allows_one_line_per_interval_and_counts_the_rest(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(shared_events.time, "monotonic", lambda: now[0])
    throttle = shared_events.Throttle(interval_s=60.0)
    assert throttle.ready() == 0                 # the first line at once, nothing held back
    assert [throttle.ready() for _ in range(3)] == [None, None, None]
    now[0] += 59.9
    assert throttle.ready() is None
    now[0] += 0.1                                # a minute after the last line logged
    assert throttle.ready() == 4                 # and it says how many it held back
    assert throttle.ready() is None
    now[0] += 60.0
    assert throttle.ready() == 1
