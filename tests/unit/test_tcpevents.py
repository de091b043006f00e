"""yeastarfs.tcpevents: the JSON stream splitter and the TCP client.

The client talks to a tiny fake PBX event port defined here (yeastar-api.md §12.7), on
127.0.0.1 with a port picked by the kernel.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import Any, Callable

import pytest
from test_events import Calls, expected_recording, new_cdr, padded_new_cdr, wait_for

from yeastarfs.errors import ConfigError
from yeastarfs.pbx.sseries.tcpevents import JsonObjectStream, TcpEventClient

LOGGER = "yeastarfs.pbx.sseries.tcpevents"


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
    """The PBX's TCP event port (§12.7), scripted: read a login block, send `reply` (with
    `trickle_s`, one byte at a time, that far apart), then each of `chunks` as a separate
    write, then close (or, with `hold`, keep the line open)."""

    def __init__(self, reply: bytes = SUCCESS, chunks: tuple[bytes, ...] = (), hold: bool = False,
                 trickle_s: float = 0.0):
        self.reply, self.chunks, self.hold, self.trickle_s = reply, chunks, hold, trickle_s
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
            try:
                self._send_reply(conn)
                if b"success" not in self.reply.lower():
                    return
                for chunk in self.chunks:
                    time.sleep(0.02)  # separate writes, so separate reads on the other side
                    conn.sendall(chunk)
            except OSError:
                return  # the client hung up on us
            if self.hold:
                self._closing.wait(10)

    def _send_reply(self, conn: socket.socket) -> None:
        if not self.trickle_s:
            conn.sendall(self.reply)
            return
        for i in range(len(self.reply)):
            if self._closing.wait(self.trickle_s):
                return
            conn.sendall(self.reply[i:i + 1])


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


def test_tcp_events_over_the_http_body_cap_are_discarded(make_client, fake_pbx):
    padded = json.dumps(new_cdr(callid="6.1", name="20240101000000-big.wav",
                                pad="x" * 100_000)).encode()  # NewCdr, 100 KiB
    normal = json.dumps(new_cdr(callid="6.2")).encode()
    pbx = fake_pbx(chunks=(padded[:60_000], padded[60_000:] + b"\r\n" + normal + b"\r\n"),
                   hold=True)
    calls = Calls()

    client = make_client(pbx.port, calls)

    assert wait_for(lambda: len(calls) == 1)
    assert calls.items == [expected_recording(callid="6.2")]
    assert client.stats["rejected"] == 1  # the padded one, discarded unread
    assert client.stats["new_cdr"] == 1


def test_the_tcp_event_cap_is_64_kib(make_client, fake_pbx):
    """README (Security, Event listener): the TCP event client keeps at most 64 KiB per event."""
    kept = padded_new_cdr(64 * 1024)
    dropped = json.dumps(new_cdr(callid="6.3", name="20240101000000-big.wav")).encode()
    dropped = dropped[:-1] + b', "pad": "' + b"x" * (64 * 1024 + 1 - len(dropped) - 11) + b'"}'
    assert len(dropped) == 64 * 1024 + 1
    pbx = fake_pbx(chunks=(dropped + b"\r\n" + kept + b"\r\n",), hold=True)
    calls = Calls()

    client = make_client(pbx.port, calls)

    assert wait_for(lambda: len(calls) == 1)
    assert calls.items[0].name == expected_recording().name
    assert client.stats["rejected"] == 1 and client.stats["new_cdr"] == 1


@pytest.mark.parametrize("reply, trickle_s", [
    (b"Response: Success\r\n", 0.3),  # never reaches its blank line, a byte at a time
    (b"X-Junk: a\r\n" * 1000, 0.0),  # endless lines, all at once
], ids=["trickled", "endless"])
def test_tcp_login_replies_that_never_end_are_cut_off(make_client, fake_pbx, reply, trickle_s):
    pbx = fake_pbx(reply=reply, trickle_s=trickle_s)
    started_s = time.monotonic()

    client = make_client(pbx.port, Calls(), connect_timeout_s=1.0)

    # The login gives up at its deadline (or its size cap, at once) and starts over.
    assert wait_for(lambda: len(pbx.logins) >= 2, timeout_s=3)
    first_gap_s = pbx.logins[1][0] - pbx.logins[0][0]
    if trickle_s:
        assert 0.9 < first_gap_s < 1.5  # the deadline, not the 0.3 s between bytes
    else:
        assert first_gap_s < 0.5
    assert pbx.logins[0][0] - started_s < 0.5
    assert client.stats["logins"] == 0
