"""yeastarfs.pbx.events: how the HTTP receiver reads one request and answers it.

What a client sees on the wire (status, reply headers and body, a clean close rather than a
reset), how long the server keeps a connection, and what the one warning about a refused
request says. Raw HTTP over real sockets on 127.0.0.1 to a real receiver; the reader of a
connection's head is also driven over a socketpair, where the tests decide how the bytes
are split between receives.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import threading
import time
from typing import Any, Callable, Optional

import pytest
from harness import holds_for, readable
from test_events import Calls, connect_from, expected_recording, new_cdr, padded_head, raw_post, wait_for

from yeastarfs.pbx import events as shared_events
from yeastarfs.pbx.sseries.events import EventReceiver

LOGGER = "yeastarfs.pbx.events"


@pytest.fixture
def make_receiver():
    """Start receivers on 127.0.0.1:0 (``deadline_s`` lowers the connection deadline,
    ``tune`` sets other attributes read by `start`); every one is stopped afterwards."""
    made: list[EventReceiver] = []

    def make(on_recording: Optional[Callable] = None, deadline_s: Optional[float] = None,
             tune: Optional[dict] = None, **kwargs: Any) -> EventReceiver:
        receiver = EventReceiver(Calls() if on_recording is None else on_recording,
                                 host="127.0.0.1", port=0, **kwargs)
        if deadline_s is not None:
            receiver.connection_deadline_s = deadline_s
        for name, value in (tune or {}).items():  # max_handler_threads, slow_connection_s
            setattr(receiver, name, value)
        made.append(receiver)
        return receiver.start()

    yield make
    for receiver in made:
        receiver.stop()


def handlers(receiver: EventReceiver) -> int:
    """How many connection handler threads of *receiver* are alive."""
    name = f"yeastarfs-events-conn:{receiver.port}"
    return sum(thread.name == name for thread in threading.enumerate())


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the server sends up to its FIN; a reset instead fails the test."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def exchange(port: int, data: bytes, timeout_s: float = 3.0) -> tuple[bytes, float]:
    """Send *data*, read to the server's close; (reply, seconds it took)."""
    with connect_from("127.0.0.1", port, timeout_s=timeout_s) as sock:
        started_s = time.monotonic()
        sock.sendall(data)
        reply = read_to_eof(sock)
        return reply, time.monotonic() - started_s


def split_reply(reply: bytes) -> tuple[str, list[str], bytes]:
    """(status line, header lines, body) of a raw HTTP reply."""
    head, _, body = reply.partition(b"\r\n\r\n")
    status, *headers = head.decode("latin-1").split("\r\n")
    return status, headers, body


def refusal_warning(caplog) -> str:
    """The one warning the receiver logged about a refused request."""
    messages = [r.getMessage() for r in caplog.records
                if r.name == LOGGER and r.levelno == logging.WARNING and "refused" in r.getMessage()]
    assert len(messages) == 1, messages
    return messages[0]


def assert_says(message: str, *phrases: str) -> None:
    """Each phrase is in *message* as whole words, spelt as given."""
    for phrase in phrases:
        assert re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", message), (phrase, message)


def unread_by_server(sock: socket.socket) -> int:
    """Bytes *sock* has sent that the server has not yet read (Linux's /proc/net/tcp: the
    rx_queue of the server's end); 0 once the server's end is gone."""
    def hex_address(address: tuple[str, int]) -> str:
        ip = int.from_bytes(socket.inet_aton(address[0]), sys.byteorder)
        return f"{ip:08X}:{address[1]:04X}"

    server, client = hex_address(sock.getpeername()), hex_address(sock.getsockname())
    with open("/proc/net/tcp", encoding="ascii") as table:
        for line in table:
            fields = line.split()
            if fields[1:3] == [server, client]:
                return int(fields[4].split(":")[1], 16)
    return 0


def no_reset(sock: socket.socket) -> bool:
    """True unless the connection was reset (RST) by the peer."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


# --- what a reply looks like ---------------------------------------------------------------


def test_an_accepted_event_gets_a_plain_ok(make_receiver, caplog):
    calls = Calls()
    receiver = make_receiver(calls)

    reply, _ = exchange(receiver.port, raw_post(json.dumps(new_cdr()).encode()))

    status, headers, body = split_reply(reply)
    assert status == "HTTP/1.1 200 OK"
    assert body == b"OK\n"
    assert [h for h in headers if not h.startswith(("Server:", "Date:"))] == [
        "Content-Type: text/plain; charset=utf-8", "Content-Length: 3", "Connection: close"]
    assert wait_for(lambda: calls.items == [expected_recording()])


def test_a_refusal_after_parsing_looks_like_one_before_it(make_receiver):
    """The same plain reply as `_canned_reply` (see test_events), naming the status."""
    receiver = make_receiver()

    reply, _ = exchange(receiver.port, raw_post(b"{not json"))

    status, headers, body = split_reply(reply)
    assert status == "HTTP/1.1 400 Bad Request"
    assert body == b"Bad Request\n"
    assert [h for h in headers if not h.startswith(("Server:", "Date:"))] == [
        "Content-Type: text/plain; charset=utf-8", "Content-Length: 12", "Connection: close"]


def test_head_gets_the_headers_of_its_405_and_no_body(make_receiver):
    receiver = make_receiver()

    reply, _ = exchange(receiver.port, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")

    status, headers, body = split_reply(reply)
    assert status == "HTTP/1.1 405 Method Not Allowed"
    assert "Allow: POST" in headers
    assert "Content-Length: 19" in headers  # the length a GET's body would have
    assert body == b""


def test_an_unknown_method_is_refused_naming_it(make_receiver, caplog):
    """http.server's own refusals (here 501) are counted and warned about like ours."""
    receiver = make_receiver()
    caplog.set_level(logging.WARNING, logger=LOGGER)

    reply, _ = exchange(receiver.port, b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n")

    status = reply.split(b"\r\n", 1)[0]
    assert status.startswith(b"HTTP/1.1 501 ") and b"BREW" in status
    assert receiver.stats["received"] == 1 and receiver.stats["rejected"] == 1
    assert_says(refusal_warning(caplog), "from 127.0.0.1 with HTTP 501", "BREW")


# --- Content-Length -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["abc", "+5"])
def test_an_unreadable_content_length_gets_400_at_once(make_receiver, caplog, value):
    """No body byte is waited for: the deadline (0.5 s here) would give 408 instead."""
    receiver = make_receiver(deadline_s=0.5)
    caplog.set_level(logging.WARNING, logger=LOGGER)

    reply, took_s = exchange(receiver.port, f"POST / HTTP/1.1\r\nHost: x\r\n"
                                            f"Content-Length: {value}\r\n\r\n".encode())

    assert reply.startswith(b"HTTP/1.1 400 ")
    assert took_s < 0.4
    assert_says(refusal_warning(caplog), "with HTTP 400", "unreadable Content-Length")


def test_a_post_without_content_length_is_told_so(make_receiver, caplog):
    receiver = make_receiver()
    caplog.set_level(logging.WARNING, logger=LOGGER)

    reply, _ = exchange(receiver.port, b"POST / HTTP/1.1\r\nHost: x\r\n\r\n")

    assert reply.startswith(b"HTTP/1.1 411 ")
    assert_says(refusal_warning(caplog), "with HTTP 411", "no Content-Length")


def test_an_empty_body_is_refused_as_not_json_and_the_handler_ends_at_once(make_receiver, caplog):
    """Content-Length: 0 is a readable length; the empty body is what is wrong. Nothing
    follows a refusal without a body, so the server does not wait for more."""
    receiver = make_receiver()
    caplog.set_level(logging.WARNING, logger=LOGGER)

    with connect_from("127.0.0.1", receiver.port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert read_to_eof(sock).startswith(b"HTTP/1.1 400 ")
        # The client keeps its end open: the handler must not wait on it.
        assert wait_for(lambda: handlers(receiver) == 0, timeout_s=0.6)

    assert_says(refusal_warning(caplog), "with HTTP 400", "not JSON")


def test_a_body_shorter_than_its_content_length_gets_400(make_receiver, caplog):
    receiver = make_receiver()
    caplog.set_level(logging.WARNING, logger=LOGGER)

    with connect_from("127.0.0.1", receiver.port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"event\": ")
        sock.shutdown(socket.SHUT_WR)  # and no more: the body ends 90 bytes short
        reply = read_to_eof(sock)

    assert reply.startswith(b"HTTP/1.1 400 ")
    assert receiver.stats["rejected"] == 1
    assert_says(refusal_warning(caplog), "with HTTP 400", "shorter", "Content-Length")


# --- the connection deadline ------------------------------------------------------------------


@pytest.mark.parametrize("partial, what", [
    (b"POST / HTTP/1.1\r\nHost: x\r\n", "headers"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"event\": ", "body"),
], ids=["silent-in-headers", "silent-in-body"])
def test_a_client_that_falls_silent_gets_408_at_the_deadline(make_receiver, caplog, partial, what):
    """Not one byte more after *partial*: the wait for it, too, ends at the deadline."""
    receiver = make_receiver(deadline_s=0.25)
    caplog.set_level(logging.WARNING, logger=LOGGER)

    reply, took_s = exchange(receiver.port, partial)

    assert reply.startswith(b"HTTP/1.1 408 ")
    assert 0.2 < took_s < 1.5
    assert receiver.stats["timed_out"] == 1
    assert_says(refusal_warning(caplog), "with HTTP 408", what, "deadline")


# --- a refused body is drained ----------------------------------------------------------------


def test_an_oversized_body_is_drained_to_its_end_then_the_connection_closes_cleanly(make_receiver):
    """After the 413 the server reads the declared body and throws it away, however it
    arrives, so that its close does not reset the connection; then it is done at once."""
    receiver = make_receiver(max_body_bytes=1024)
    size = 200_000

    with connect_from("127.0.0.1", receiver.port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        assert read_to_eof(sock).startswith(b"HTTP/1.1 413 ")  # before any body byte

        sock.sendall(b"x" * (size - 1))
        assert wait_for(lambda: unread_by_server(sock) == 0, timeout_s=0.5)
        assert handlers(receiver) == 1  # still waiting for the last byte
        sock.sendall(b"x")
        assert wait_for(lambda: handlers(receiver) == 0, timeout_s=0.6)  # not the 1 s drain limit
        assert no_reset(sock)
        sock.sendall(b"y")  # past the declared body: the server has closed, so this resets it
        assert wait_for(lambda: not no_reset(sock), timeout_s=0.5)

    assert receiver.stats["rejected"] == 1


# --- eviction ---------------------------------------------------------------------------------


def test_a_connection_evicted_just_as_its_body_completes_delivers_nothing(make_receiver, monkeypatch):
    """The race a full table makes: the body has been read, but a newer connection took
    the slot before the request was marked complete. The event is dropped (the PBX
    re-sends it); the newer one is served."""
    table_class = shared_events._ConnectionTable
    done_reading = table_class.done_reading
    first = threading.Event()

    def late_done_reading(table, conn):
        if not first.is_set():
            first.set()
            wait_for(lambda: conn.evicted, timeout_s=2.0)  # until the newcomer takes the slot
        return done_reading(table, conn)

    monkeypatch.setattr(table_class, "done_reading", late_done_reading)
    calls = Calls()
    # One slot, and any connection still reading yields it to a newer one.
    receiver = make_receiver(calls, tune={"max_handler_threads": 1, "slow_connection_s": 0.0})
    with connect_from("127.0.0.1", receiver.port) as evicted:
        evicted.sendall(raw_post(json.dumps(new_cdr(callid="1.1")).encode()))
        assert first.wait(2.0)
        with connect_from("127.0.0.1", receiver.port) as newer:
            newer.sendall(raw_post(json.dumps(new_cdr(callid="1.2")).encode()))
            assert read_to_eof(newer).startswith(b"HTTP/1.1 200 ")
        assert read_to_eof(evicted) == b""  # shut down, never answered
    assert wait_for(lambda: len(calls) == 1)
    holds_for(lambda: [recording.callid for recording in calls.items] == ["1.2"], 0.05,
              message="the evicted connection's event never delivered")
    assert receiver.stats["evicted"] == 1 and receiver.stats["new_cdr"] == 1


# --- the head: caps, and where it ends --------------------------------------------------------


def test_line_breaks_in_the_body_do_not_count_against_the_head_cap(make_receiver):
    """32 lines is a cap on the headers; a pretty-printed body may have many more."""
    calls = Calls()
    receiver = make_receiver(calls)
    body = json.dumps(new_cdr(), indent=1).replace(",\n", ",\n\n\n").encode()
    assert body.count(b"\n") > 32

    reply, _ = exchange(receiver.port, raw_post(body))  # head and body in one segment

    assert reply.startswith(b"HTTP/1.1 200 ")
    assert wait_for(lambda: calls.items == [expected_recording()])


def test_a_leading_blank_line_counts_against_the_head_cap(make_receiver):
    receiver = make_receiver()
    request = b"\n" + padded_head(1024, 32, b"{}")  # 33 line breaks before the body

    reply, _ = exchange(receiver.port, request)

    assert reply.startswith(b"HTTP/1.1 431 ")


def test_a_blank_line_alone_ends_the_head_at_once(make_receiver):
    """A head that is only a blank line is complete: the connection is closed without a
    reply (http.server finds no request line), not held until the deadline."""
    receiver = make_receiver(deadline_s=0.5)

    reply, took_s = exchange(receiver.port, b"\n\n")

    assert reply == b""
    assert took_s < 0.4


def test_a_head_over_the_cap_gets_431_and_a_clean_close(make_receiver, caplog):
    """The rest of the head is never read, yet the client reads the reply and then the
    end of the stream, not a reset: the server half-closes before it closes. A refusal is
    routine: it is warned about once, and not also logged as a failed connection."""
    receiver = make_receiver()
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    with connect_from("127.0.0.1", receiver.port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        reply = read_to_eof(sock)
    assert wait_for(lambda: handlers(receiver) == 0)

    assert reply.startswith(b"HTTP/1.1 431 ")
    assert_says(refusal_warning(caplog), "from 127.0.0.1 with HTTP 431")
    assert not [r.getMessage() for r in caplog.records if r.exc_info or "failed" in r.getMessage()]


REQUEST = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
HEAD_END = REQUEST.index(b"\r\n\r\n")


@pytest.mark.parametrize("split", [5, HEAD_END, HEAD_END + 1, HEAD_END + 2, HEAD_END + 3, len(REQUEST) - 1],
                         ids=["request-line", "before-blank-line", "inside-1", "inside-2", "inside-3", "body"])
def test_the_head_is_found_and_handed_on_whole_however_it_is_split(split):
    """`_DeadlineReader.read_head` over a socketpair, the request arriving in two receives."""
    server_end, client_end = socket.socketpair()
    with server_end, client_end:
        reader = shared_events._DeadlineReader(server_end, time.monotonic() + 2.0)
        outcome: list[Any] = []
        thread = threading.Thread(target=lambda: outcome.append(reader.read_head()))
        client_end.sendall(REQUEST[:split])
        thread.start()
        # Once the reader has taken the first part, the second can only come in a later receive.
        assert wait_for(lambda: not readable([server_end], 0), timeout_s=1.0)
        client_end.sendall(REQUEST[split:])
        client_end.shutdown(socket.SHUT_WR)
        thread.join(3.0)

        assert outcome == [True]
        handed_on = reader.read(len(REQUEST))  # what http.server will parse
        assert REQUEST.startswith(handed_on) and len(handed_on) >= HEAD_END + 4
