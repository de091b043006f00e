"""yeastarfs.events: the HTTP receiver, the TCP client and the JSON stream splitter.

Real sockets on 127.0.0.1, ports picked by the kernel; the TCP side talks to a tiny fake
PBX event port defined here (yeastar-api.md §12.7).
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from typing import Any, Callable, Optional

import pytest

from yeastarfs.errors import ConfigError
from yeastarfs.events import EventReceiver, JsonObjectStream, TcpEventClient
from yeastarfs.models import Recording

NAME = "20191024201242-1571897930.5-203-201-Internal.wav"
LOGGER = "yeastarfs.events"


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


@pytest.fixture
def make_receiver():
    """Build (not start) receivers on 127.0.0.1:0; every one is stopped afterwards."""
    made: list[EventReceiver] = []

    def make(on_recording: Optional[Callable] = None, **kwargs: Any) -> EventReceiver:
        kwargs.setdefault("host", "127.0.0.1")
        kwargs.setdefault("port", 0)
        receiver = EventReceiver(Calls() if on_recording is None else on_recording, **kwargs)
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

    assert wait_for(lambda: len(calls) == 2)
    time.sleep(0.1)  # a wrongly dispatched repeat would show up by now
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

    assert post_json(receiver.port, new_cdr()) == 403
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
], ids=["stalled-headers", "stalled-body"])
def test_a_stalled_client_blocks_no_one_and_is_dropped(make_receiver, partial):
    calls = Calls()
    receiver = make_receiver(calls)
    receiver.socket_timeout_s = 0.5
    receiver.start()

    with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as stalled:
        stalled.sendall(partial)
        started_s = time.monotonic()
        assert post_json(receiver.port, new_cdr()) == 200
        assert time.monotonic() - started_s < 0.5

        stalled.settimeout(3)
        leftover = b""
        while chunk := stalled.recv(4096):  # ends when the server drops us
            leftover += chunk
        assert time.monotonic() - started_s < 3
    assert wait_for(lambda: len(calls) == 1)


def test_connections_beyond_the_thread_cap_get_503(make_receiver):
    receiver = make_receiver()
    receiver.max_handler_threads = 2
    receiver.socket_timeout_s = 2.0
    receiver.start()
    stalled = [socket.create_connection(("127.0.0.1", receiver.port), timeout=5)
               for _ in range(2)]
    try:
        for sock in stalled:
            sock.sendall(b"POST / HTTP/1.1\r\n")
        # Accepted in order, so both stalled connections hold their slots by now.
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as third:
            assert third.recv(4096).startswith(b"HTTP/1.1 503 ")
    finally:
        for sock in stalled:
            sock.close()
    assert wait_for(lambda: status_or_none(receiver.port) == 200)


def test_a_busy_port_raises_config_error(make_receiver):
    first = make_receiver().start()

    with pytest.raises(ConfigError, match="already in use"):
        make_receiver(port=first.port).start()
    with pytest.raises(ConfigError, match="cannot listen"):
        make_receiver(port=70000).start()


# --- JsonObjectStream ---------------------------------------------------------------------

TRICKY_OBJECTS = [
    {"event": "NewCdr", "recording": "20240101000000-a{b}c.wav"},
    {"s": 'quote " and brace } inside', "n": {"x": [1, {"y": "}"}], "z": {}}},
    {"t": "\\"},
    {"u": '\\"{'},
    {"v": "ünïcödé € {"},
]


def _encoded(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()  # raw UTF-8, to split mid-character


# \r\n, nothing, \n and spaces between objects.
TRICKY_STREAM = (_encoded(TRICKY_OBJECTS[0]) + b"\r\n" + _encoded(TRICKY_OBJECTS[1])
                 + _encoded(TRICKY_OBJECTS[2]) + _encoded(TRICKY_OBJECTS[3])
                 + b"\n  " + _encoded(TRICKY_OBJECTS[4]) + b"\r\n")


def test_stream_split_at_every_byte_boundary():
    for cut in range(len(TRICKY_STREAM) + 1):
        stream = JsonObjectStream()
        found = stream.feed(TRICKY_STREAM[:cut]) + stream.feed(TRICKY_STREAM[cut:])
        assert found == TRICKY_OBJECTS, f"cut at {cut}"
        assert stream.skipped_bytes == stream.invalid_objects == stream.discarded_objects == 0


def test_stream_fed_one_byte_at_a_time():
    stream = JsonObjectStream()
    found = []
    for i in range(len(TRICKY_STREAM)):
        found += stream.feed(TRICKY_STREAM[i:i + 1])
    assert found == TRICKY_OBJECTS


@pytest.mark.parametrize("separator", [b"", b"\r\n", b"\n", b" \t "])
def test_stream_separators(separator):
    objects = [new_cdr(callid=str(n)) for n in range(3)]
    data = separator.join(json.dumps(o).encode() for o in objects) + separator
    assert JsonObjectStream().feed(data) == objects


def test_stream_skips_and_counts_garbage_between_objects():
    first, second = json.dumps(new_cdr("1")).encode(), json.dumps(new_cdr("2")).encode()
    garbage = b'Heartbeat ] } "quoted" :'
    stream = JsonObjectStream()

    found = stream.feed(b"\r\nResponse: Ping\r\n" + first + garbage + second + b"}")

    assert found == [new_cdr("1"), new_cdr("2")]
    assert stream.skipped_bytes == len(b"Response:Ping") + len(garbage.replace(b" ", b"")) + 1


def test_stream_resyncs_after_a_stray_brace_or_a_cut_object():
    stream = JsonObjectStream()
    good = json.dumps({"event": "NewCdr", "callid": "1"}).encode()

    # A stray '{' in garbage, then an object cut short after a complete string: in both
    # cases the next object's '{' stands where JSON allows no value.
    found = stream.feed(b"junk {stray text\r\n" + good + b'\r\n{"event": "NewCdr"' + good)

    assert found == [{"event": "NewCdr", "callid": "1"}] * 2
    assert stream.invalid_objects == 2


def test_stream_counts_balanced_objects_that_are_not_json():
    stream = JsonObjectStream()
    assert stream.feed(b'{"a": 1,}{"b": 2}{nope}') == [{"b": 2}]
    assert stream.invalid_objects == 2


@pytest.mark.parametrize("chunk_bytes", [7, 100, 100_000])
def test_stream_discards_an_oversized_object_and_resyncs(chunk_bytes):
    big = json.dumps({"event": "NewCdr", "junk": "x{\\\"" * 300, "n": {"m": "}"}}).encode()
    small = [{"event": "NewCdr", "callid": str(n)} for n in range(2)]
    data = big + b"\r\n" + b"".join(json.dumps(o).encode() for o in small)
    stream = JsonObjectStream(max_object_bytes=200)

    found = []
    for start in range(0, len(data), chunk_bytes):
        found += stream.feed(data[start:start + chunk_bytes])

    assert found == small
    assert stream.discarded_objects == 1
    assert len(stream._buf) < 200 + chunk_bytes  # never buffered the big object whole


def test_stream_gives_up_on_an_oversized_object_that_never_closes():
    stream = JsonObjectStream(max_object_bytes=10)
    stream.feed(b'{"a": "' + b"x" * 50)  # oversized, still in a string
    assert stream.feed(b"y" * 200) == []  # past the give-up limit (16 x 10 bytes)
    assert stream.feed(b'"\r\n{"b": 2}') == [{"b": 2}]


# --- TCP client -------------------------------------------------------------------------

SUCCESS = b"Response: Success\r\n\r\n"
FAILED = b"Response: Failed\r\n\r\n"
LOGIN = b"Action: login\r\nUsername: apiuser\r\nSecret: s3cret-Pa55\r\nVersion: 2.0.0\r\n\r\n"


class FakePbx:
    """The PBX's TCP event port (§12.7), scripted: read a login block, send `reply`, then
    each of `chunks` as a separate write, then close (or, with `hold`, keep the line open)."""

    def __init__(self, reply: bytes = SUCCESS, chunks: tuple[bytes, ...] = (), hold: bool = False):
        self.reply, self.chunks, self.hold = reply, chunks, hold
        self.logins: list[tuple[float, bytes]] = []
        self._closing = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def close(self) -> None:
        self._closing.set()
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            block = b""
            while b"\r\n\r\n" not in block:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                block += chunk
            self.logins.append((time.monotonic(), block))
            conn.sendall(self.reply)
            if b"success" not in self.reply.lower():
                return
            for chunk in self.chunks:
                time.sleep(0.02)  # separate writes, so separate reads on the other side
                conn.sendall(chunk)
            if self.hold:
                self._closing.wait(10)


@pytest.fixture
def make_client():
    made: list[TcpEventClient] = []

    def make(port: int, on_recording: Callable, **kwargs: Any) -> TcpEventClient:
        kwargs.setdefault("backoff_initial_s", 0.05)
        kwargs.setdefault("backoff_max_s", 0.5)
        kwargs.setdefault("connect_timeout_s", 2.0)
        client = TcpEventClient("127.0.0.1", port, "apiuser", "s3cret-Pa55", on_recording,
                                **kwargs)
        made.append(client)
        return client.start()

    yield make
    for client in made:
        client.stop()


@pytest.fixture
def fake_pbx():
    pbxs: list[FakePbx] = []

    def make(**kwargs: Any) -> FakePbx:
        pbxs.append(FakePbx(**kwargs))
        return pbxs[-1]

    yield make
    for pbx in pbxs:
        pbx.close()


def test_tcp_client_logs_in_streams_and_logs_in_again_after_a_drop(make_client, fake_pbx,
                                                                   caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    events = [new_cdr(callid="3.1", name="20240101000000-1.wav"),
              new_cdr(callid="3.2", name="20240101000000-2.wav", key="action")]
    data = b"\r\n".join(json.dumps(e).encode() for e in events) + b"\r\n"
    cut = len(json.dumps(events[0])) - 20  # near the end of the first object
    # The first bytes arrive with the login reply, in the same write.
    pbx = fake_pbx(reply=b"RESPONSE: success\r\n\r\n" + data[:9], chunks=(data[9:cut], data[cut:]))
    calls = Calls()

    client = make_client(pbx.port, calls)

    assert wait_for(lambda: len(pbx.logins) >= 2)  # it reconnected after the PBX closed
    assert all(block == LOGIN for _, block in pbx.logins)
    assert wait_for(lambda: client.stats["duplicates"] >= 2)  # the 2nd session's repeats
    assert [(r.callid, r.name) for r in calls.items] == [("3.1", "20240101000000-1.wav"),
                                                         ("3.2", "20240101000000-2.wav")]
    assert client.stats["logins"] >= 2
    assert client.stats["reconnects"] >= 1
    assert client.stats["new_cdr"] == 2
    assert "s3cret-Pa55" not in caplog.text


def test_tcp_client_backs_off_after_a_rejected_login(make_client, fake_pbx, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    pbx = fake_pbx(reply=FAILED)

    client = make_client(pbx.port, Calls(), backoff_max_s=0.5)

    assert wait_for(lambda: len(pbx.logins) >= 3, timeout_s=4)
    times = [t for t, _ in pbx.logins]
    # backoff_max_s less the jitter (at most 25 %), never the 0.05 s initial backoff
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.5 * 0.75 - 0.02
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "PBX rejected the TCP event login: check username/password" in errors[0]
    assert client.stats["logins"] == 0 and client.stats["connected"] is False
    assert "s3cret-Pa55" not in caplog.text


def test_tcp_client_retries_an_unreachable_pbx_and_warns_once(make_client, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        closed_port = placeholder.getsockname()[1]  # nothing listens there afterwards

    client = make_client(closed_port, Calls())

    assert wait_for(lambda: client.stats["reconnects"] >= 3)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    started_s = time.monotonic()
    client.stop()
    assert time.monotonic() - started_s < 1.0


def test_tcp_client_stops_quickly_while_connected(make_client, fake_pbx):
    pbx = fake_pbx(chunks=(json.dumps(new_cdr()).encode(),), hold=True)
    calls = Calls()
    client = make_client(pbx.port, calls)
    assert wait_for(lambda: len(calls) == 1 and client.stats["connected"])

    started_s = time.monotonic()
    client.stop()

    assert time.monotonic() - started_s < 1.0
    assert client.stats["connected"] is False
    assert calls.items == [expected_recording()]


def test_tcp_client_skips_unusable_objects(make_client, fake_pbx):
    bad = json.dumps(new_cdr(callid="4.1", recording=5)).encode()
    good = json.dumps(new_cdr(callid="4.2")).encode()
    pbx = fake_pbx(chunks=(bad + b"garbage" + good,), hold=True)
    calls = Calls()

    client = make_client(pbx.port, calls)

    assert wait_for(lambda: len(calls) == 1)
    assert calls.items == [expected_recording(callid="4.2")]
    assert client.stats["rejected"] == 1
    assert client.stats["received"] == 2


@pytest.mark.parametrize("field", ["username", "password"])
def test_tcp_credentials_with_line_breaks_are_refused(field):
    credentials = {"username": "apiuser", "password": "s3cret-Pa55"}
    credentials[field] += "\r\nAction: evil"
    with pytest.raises(ConfigError, match=field):
        TcpEventClient("127.0.0.1", 1, credentials["username"], credentials["password"], Calls())
