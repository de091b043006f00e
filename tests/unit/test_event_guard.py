"""yeastarfs.pbx.events: what guards the event receiver, pinned more tightly than
test_events.py does: which connection yields a slot when all are taken (`_ConnectionTable`,
driven with chosen clock values so that every boundary is exact), what the warnings about
refused connections say, who may connect (`allowed_sources`, `set_allowed_ips`), the
handler threads, the canned replies that must never block the accept thread, and the
log throttle's tracebacks.

Real sockets on 127.0.0.1 (any 127/8 address is a separate source on Linux), ports picked
by the kernel.
"""

from __future__ import annotations

import gc
import json
import logging
import re
import socket
import threading
import time
import weakref
from typing import Any, Optional

import pytest
from test_events import (LOGGER, Calls, connect_from, make_receiver,  # noqa: F401 - make_receiver: a fixture
                         new_cdr, post_from, post_json, raw_post, read_until_closed, wait_for)

from yeastarfs.config import Config
from yeastarfs.errors import ConfigError
from yeastarfs.pbx import events as shared_events
from yeastarfs.pbx.events import Counters, EventFormat, Throttle, allowed_sources
from yeastarfs.pbx.sseries.events import NEW_CDR, EventReceiver

HEAD_ONLY = b"POST / HTTP/1.1\r\n"  # a request that has begun and never goes on


@pytest.fixture
def sockets():
    """socket.socket objects to close after the test."""
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING]


def handler_threads(port: int) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"yeastarfs-events-conn:{port}"]


# --- which connection gives way: _ConnectionTable on a clock of our choosing -------------------


class Table:
    """A `_ConnectionTable` and connections of chosen sources and accept times, each a real
    socket pair: ``peer_of(conn)`` is the client's end, which sees EOF once conn is shut."""

    def __init__(self, sockets: list[socket.socket], max_active: int, slow_s: float) -> None:
        self.table = shared_events._ConnectionTable(max_active, slow_s)
        self._sockets = sockets
        self._peers: dict[int, socket.socket] = {}

    def conn(self, source: str, accepted_s: float) -> Any:
        ours, peer = socket.socketpair()
        self._sockets += [ours, peer]
        peer.settimeout(0.5)
        conn = shared_events._Connection(ours, (source, 40000 + len(self._sockets)), accepted_s,
                                         accepted_s + 10.0)
        self._peers[id(conn)] = peer
        return conn

    def admit(self, source: str, accepted_s: float) -> tuple[Any, bool, Any]:
        conn = self.conn(source, accepted_s)
        admitted, evicted = self.table.admit(conn)
        return conn, admitted, evicted

    def was_shut(self, conn: Any) -> bool:
        """Whether *conn* was shut down (its client reads EOF) rather than left open."""
        peer = self._peers[id(conn)]
        peer.settimeout(0.0)
        try:
            return peer.recv(1) == b""
        except BlockingIOError:
            return False


def test_the_heaviest_source_yields_its_oldest_unfinished_connection(sockets):
    t = Table(sockets, max_active=3, slow_s=100.0)  # nobody is ever slow here
    other, _, _ = t.admit("10.0.0.9", 0.0)
    flood_1, _, _ = t.admit("10.0.0.2", 0.1)
    flood_2, _, _ = t.admit("10.0.0.2", 0.2)

    pbx, admitted, evicted = t.admit("10.0.0.1", 0.3)  # 10.0.0.2 holds 2, the PBX would hold 1

    assert admitted and evicted is flood_1
    assert t.was_shut(flood_1) and not t.was_shut(flood_2) and not t.was_shut(other)
    assert t.table.done_reading(flood_1) is False  # its handler learns it lost the slot
    assert t.table.done_reading(pbx) is True
    # flood_1 still counts until its thread ends: 4 admitted, the cap is 2 x 3.
    _, admitted, evicted = t.admit("10.0.0.3", 0.4)  # 10.0.0.2 holds 1 now: no one yields
    assert (admitted, evicted) == (False, None)


def test_a_source_only_one_slot_ahead_keeps_its_slot(sockets):
    t = Table(sockets, max_active=1, slow_s=100.0)
    first, _, _ = t.admit("10.0.0.2", 0.0)

    # 10.0.0.2 holds 1; taking it would leave the newcomer holding 1: no gain in fairness.
    _, admitted, evicted = t.admit("10.0.0.1", 0.1)

    assert (admitted, evicted) == (False, None)
    assert not t.was_shut(first)


def test_a_source_whose_requests_are_all_received_evicts_nothing(sockets):
    t = Table(sockets, max_active=2, slow_s=1.0)
    done = [t.admit("10.0.0.2", 0.0)[0], t.admit("10.0.0.2", 0.1)[0]]
    for conn in done:
        assert t.table.done_reading(conn) is True

    # The heaviest source, and slow, but both requests are complete: being answered.
    _, admitted, evicted = t.admit("10.0.0.1", 50.0)

    assert (admitted, evicted) == (False, None)
    assert not any(t.was_shut(conn) for conn in done)


def test_only_a_connection_receiving_for_over_slow_s_yields(sockets):
    t = Table(sockets, max_active=1, slow_s=1.0)
    old, _, _ = t.admit("10.0.0.1", 10.0)

    assert t.admit("10.0.0.1", 11.0)[1:] == (False, None)  # exactly slow_s: not over it
    assert not t.was_shut(old)

    newer, admitted, evicted = t.admit("10.0.0.1", 11.5)
    assert admitted and evicted is old
    assert t.was_shut(old)


def test_evicted_connections_count_against_twice_the_cap_until_released(sockets):
    t = Table(sockets, max_active=1, slow_s=1.0)
    first, _, _ = t.admit("10.0.0.1", 0.0)
    second, admitted, evicted = t.admit("10.0.0.1", 5.0)
    assert admitted and evicted is first

    # second is slow too, but first's thread has not ended: 2 x 1 threads already.
    assert t.admit("10.0.0.1", 10.0)[1:] == (False, None)
    assert not t.was_shut(second)

    t.table.release(first)
    _, admitted, evicted = t.admit("10.0.0.1", 15.0)
    assert admitted and evicted is second


# --- the same rules through a running receiver, and what they log ---------------------------


def test_a_flooding_source_yields_to_the_pbx_and_the_warning_names_it(make_receiver, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    calls = Calls()
    receiver = make_receiver(calls)
    receiver.max_handler_threads = 2
    receiver.start()
    with connect_from("127.0.0.2", receiver.port) as oldest, \
            connect_from("127.0.0.2", receiver.port) as newer:
        for sock in (oldest, newer):
            sock.sendall(HEAD_ONLY)
        # Neither is slow (1 s): 127.0.0.2 yields because it holds two slots to our none.
        assert post_json(receiver.port, new_cdr()) == 200

        assert read_until_closed(oldest) == b""  # closed without a reply
        newer.settimeout(0.05)
        with pytest.raises(socket.timeout):
            newer.recv(1)  # still held

    assert wait_for(lambda: len(calls) == 1)
    assert (receiver.stats["evicted"], receiver.stats["rejected"]) == (1, 1)
    [warning] = warnings_of(caplog)
    assert "refused a request from 127.0.0.2 by closing its connection" in warning
    assert "HTTP" not in warning
    assert re.search(r"\bstill incomplete\b", warning)
    assert "newer connection" in warning


def test_a_busy_refusal_is_a_503_whose_warning_names_the_source_and_reason(make_receiver, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    receiver = make_receiver()
    receiver.max_handler_threads = 1
    receiver.start()
    with connect_from("127.0.0.1", receiver.port) as stalled:
        stalled.sendall(HEAD_ONLY)
        with connect_from("127.0.0.1", receiver.port) as second:
            reply = read_until_closed(second)

    assert reply.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1\r\n" in reply
    assert (receiver.stats["received"], receiver.stats["rejected"]) == (1, 1)
    [warning] = warnings_of(caplog)
    assert "refused a request from 127.0.0.1 with HTTP 503" in warning
    assert re.search(r"\btoo many connections at once\b", warning)
    # A routine refusal is no failure: nothing logs a traceback for it.
    assert not [r for r in caplog.records if r.exc_info or "failed" in r.getMessage()]


def test_a_forbidden_source_warning_names_the_source_and_reason(make_receiver, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    receiver = make_receiver(allowed_ips=["127.0.0.1"]).start()

    with connect_from("127.0.0.2", receiver.port) as foreign:
        assert read_until_closed(foreign).startswith(b"HTTP/1.1 403 ")

    [warning] = warnings_of(caplog)
    assert "refused a request from 127.0.0.2 with HTTP 403" in warning
    assert re.search(r"\bsource address not in allowed_ips\b", warning)


def test_set_allowed_ips_narrows_who_may_connect_at_runtime(make_receiver):
    calls = Calls()
    receiver = make_receiver(calls).start()  # anyone at first
    assert post_json(receiver.port, new_cdr(callid="1.1")) == 200

    receiver.set_allowed_ips(["192.0.2.10"])
    assert post_from("127.0.0.1", receiver.port, new_cdr(callid="1.2")) == 403
    assert receiver.stats["forbidden"] == 1

    receiver.set_allowed_ips(["192.0.2.10", "127.0.0.1"])
    assert post_json(receiver.port, new_cdr(callid="1.3")) == 200
    assert wait_for(lambda: len(calls) == 2)
    assert [r.callid for r in calls.items] == ["1.1", "1.3"]


def test_an_unreadable_source_address_is_never_allowed(make_receiver):
    receiver = make_receiver(allowed_ips=["127.0.0.1"])
    assert receiver._is_allowed("::ffff:127.0.0.1")
    assert not receiver._is_allowed("127.0.0.2")
    assert not receiver._is_allowed("not an address")
    assert make_receiver()._is_allowed("not an address")  # None: anyone, unchecked


def test_each_admitted_connection_runs_on_a_daemon_thread_named_after_the_port(make_receiver):
    receiver = make_receiver().start()
    with connect_from("127.0.0.1", receiver.port) as stalled:
        stalled.sendall(HEAD_ONLY)
        assert wait_for(lambda: len(handler_threads(receiver.port)) == 1)
        [thread] = handler_threads(receiver.port)
        assert thread.daemon  # a client that never finishes cannot keep the process alive
    assert wait_for(lambda: not handler_threads(receiver.port))


def test_a_handler_that_raises_is_logged_and_frees_its_slot(make_receiver, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    uncaught: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)

    def problem(payload: Any) -> Optional[str]:
        if isinstance(payload, dict) and payload.get("boom"):
            raise ValueError("a family's check is broken")
        return None

    broken = EventFormat(problem=problem, new_call=lambda payload: None)
    receiver = make_receiver(cls=shared_events.EventReceiver, event_format=broken)
    receiver.max_handler_threads = 1
    receiver.start()

    with connect_from("127.0.0.1", receiver.port) as sock:
        sock.sendall(raw_post(b'{"boom": 1}'))
        assert read_until_closed(sock) == b""  # no reply: the handler failed
    assert wait_for(lambda: not handler_threads(receiver.port))

    assert uncaught == []  # the failure went to the log, not out of the thread
    failures = [r for r in caplog.records if "connection from 127.0.0.1 failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info[0] is ValueError
    assert post_json(receiver.port, {"fine": 1}) == 200  # the one slot is free again


def threads_refused(prefix: str) -> type:
    """threading.Thread, but a thread whose name starts with *prefix* cannot start (as when
    the process is out of threads)."""
    real_thread = threading.Thread

    class Refusing(real_thread):
        def start(self) -> None:
            if self.name.startswith(prefix):
                raise RuntimeError("can't start new thread")
            super().start()

    return Refusing


def test_a_handler_thread_that_cannot_start_gives_its_slot_back(make_receiver, monkeypatch):
    receiver = make_receiver()
    receiver.max_handler_threads = 1
    receiver.slow_connection_s = 60.0  # a leaked slot would never be taken back in this test
    receiver.start()
    with monkeypatch.context() as patch:
        patch.setattr(threading, "Thread", threads_refused("yeastarfs-events-conn"))
        with connect_from("127.0.0.1", receiver.port) as sock:
            sock.sendall(raw_post(b"{}"))
            assert read_until_closed(sock) == b""  # closed by the server, unanswered

    assert post_json(receiver.port, new_cdr()) == 200


def test_a_receiver_whose_serving_thread_cannot_start_holds_nothing_and_stops_at_once(make_receiver,
                                                                                      monkeypatch):
    receiver = make_receiver()
    real_thread = threading.Thread
    with monkeypatch.context() as patch:
        patch.setattr(threading, "Thread", threads_refused("yeastarfs-events-http"))
        with pytest.raises(RuntimeError):
            receiver.start()
    port = receiver.port
    stopping = real_thread(target=receiver.stop, daemon=True)
    stopping.start()
    stopping.join(2.0)
    assert not stopping.is_alive()  # a server kept without its thread would make stop() wait forever
    with socket.create_server(("127.0.0.1", port)):  # the port was given back
        pass
    assert not [t for t in threading.enumerate() if t.name == f"yeastarfs-events-dispatch:{port}"]
    receiver.start()  # and a later start serves
    assert post_json(receiver.port, new_cdr()) == 200


# --- canned replies, who is allowed by default, the throttle, the sink -----------------------


def test_a_canned_reply_to_a_client_that_reads_nothing_never_blocks(sockets):
    ours, peer = socket.socketpair()
    sockets += [ours, peer]
    ours.setblocking(False)
    with pytest.raises(BlockingIOError):
        while True:
            ours.send(b"x" * 65536)  # until the buffers are full: the peer never reads
    ours.setblocking(True)  # as an accepted socket is

    sender = threading.Thread(target=shared_events._send_nowait, args=(ours, b"HTTP/1.1 503 \r\n"),
                              daemon=True)
    sender.start()
    sender.join(1.0)
    blocked = sender.is_alive()
    peer.close()  # frees a blocked sender, if any
    sender.join(1.0)
    assert not blocked


def test_a_canned_reply_to_a_client_gone_is_dropped_silently(sockets):
    ours, peer = socket.socketpair()
    sockets.append(ours)
    peer.close()
    shared_events._send_nowait(ours, b"HTTP/1.1 403 Forbidden\r\n\r\n")  # raises nothing


def config(pbx_url: str, **options: Any) -> Config:
    return Config(mountpoint="/mnt", pbx_url=pbx_url, username="api", password="x", **options)


def test_allowed_sources_are_the_pbx_addresses_ipv4_also_as_mapped_ipv6():
    assert allowed_sources(config("https://127.0.0.1:8088")) == {"127.0.0.1", "::ffff:127.0.0.1"}
    assert allowed_sources(config("https://[::1]:8088")) == {"::1"}


def test_allowed_sources_named_by_the_user_replace_the_pbx_addresses():
    chosen = config("https://127.0.0.1:8088", events_allow_from=("192.0.2.7", "192.0.2.8"))
    assert allowed_sources(chosen) == {"192.0.2.7", "192.0.2.8"}
    assert allowed_sources(config("https://127.0.0.1:8088", allow_any_event_source=True)) is None


def test_an_unresolvable_pbx_host_is_a_config_error_naming_it(monkeypatch):
    def no_dns(host: str, *args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # no name server to ask in a unit test
    with pytest.raises(ConfigError) as raised:
        allowed_sources(config("https://pbx.example.invalid:8088"))
    assert "pbx.example.invalid" in str(raised.value)
    assert "Name or service not known" in str(raised.value)


def test_the_throttle_attaches_a_traceback_only_when_asked(caplog):
    logger = logging.getLogger("yeastarfs.test_event_guard")
    caplog.set_level(logging.WARNING, logger=logger.name)
    try:
        raise RuntimeError("callback broke")
    except RuntimeError:
        Throttle().emit(logger, logging.WARNING, "plain (%d held)")
        Throttle().emit(logger, logging.ERROR, "with traceback (%d held)", exc_info=True)

    plain, traced = caplog.records
    assert plain.getMessage() == "plain (0 held)" and not plain.exc_info
    assert "RuntimeError: callback broke" not in caplog.text.split("with traceback")[0]
    assert traced.exc_info and traced.exc_info[0] is RuntimeError
    assert "RuntimeError: callback broke" in caplog.text


def test_a_dropped_event_warns_that_the_queue_is_full(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    monkeypatch.setattr(shared_events, "MAX_QUEUED_BYTES", 1)  # no recording fits
    stats = Counters(new_cdr=0, duplicates=0, dropped=0, last_event_time=None)
    sink = shared_events.EventSink(Calls(), None, stats, "test-dispatch", NEW_CDR)
    try:
        sink.accept(new_cdr(callid="3.1"))
        sink.accept(new_cdr(callid="3.1"))  # dropped, so not remembered: dropped again
    finally:
        sink.stop(timeout_s=1.0)

    assert (stats["new_cdr"], stats["duplicates"], stats["dropped"]) == (2, 0, 2)
    [warning] = warnings_of(caplog)
    assert "queue full" in warning and "event dropped" in warning


def test_recent_keys_forget_the_oldest_and_discard_what_they_never_held():
    keys = shared_events._RecentKeys(2)
    assert [keys.add(k) for k in ("a", "b", "a", "c")] == [True, True, False, True]
    assert keys.add("b") is True  # "b" was the oldest ("a" was seen again): forgotten
    keys.discard("never seen")  # raises nothing
    keys.discard("c")
    assert keys.add("c") is True


# --- building, starting and stopping a receiver ----------------------------------------------


def threads_named(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def test_a_new_receiver_counts_nothing_yet():
    receiver = EventReceiver(Calls(), host="127.0.0.1", port=0)
    assert receiver.stats == {"received": 0, "new_cdr": 0, "duplicates": 0, "rejected": 0,
                              "forbidden": 0, "timed_out": 0, "evicted": 0, "dropped": 0,
                              "last_event_time": None}


def test_max_body_bytes_must_be_positive():
    with pytest.raises(ConfigError) as raised:
        EventReceiver(Calls(), port=0, max_body_bytes=0)
    assert "max_body_bytes" in str(raised.value)
    assert re.search(r"\bmust be positive\b", str(raised.value))
    assert EventReceiver(Calls(), port=0, max_body_bytes=1).max_body_bytes == 1


def test_allowed_ips_errors_say_what_was_wrong():
    with pytest.raises(ConfigError) as one_string:
        EventReceiver(Calls(), port=0, allowed_ips="127.0.0.1")
    assert re.search(r"\ballowed_ips must be a collection of IP addresses\b", str(one_string.value))
    assert re.search(r"\bnot one string\b", str(one_string.value))

    with pytest.raises(ConfigError) as not_an_ip:
        EventReceiver(Calls(), port=0, allowed_ips=["127.0.0.1", "pbx.local"])
    assert "'pbx.local'" in str(not_an_ip.value) and "not an IP address" in str(not_an_ip.value)


def test_by_default_the_receiver_listens_on_every_ipv4_address():
    calls = Calls()
    with shared_events.EventReceiver(calls, event_format=NEW_CDR, port=0) as receiver:  # no host
        with socket.create_connection(("127.0.0.2", receiver.port), timeout=5.0) as sock:
            sock.sendall(raw_post(json.dumps(new_cdr()).encode()))
            assert read_until_closed(sock).startswith(b"HTTP/1.1 200 ")
        assert wait_for(lambda: len(calls) == 1)


def test_a_port_in_use_is_a_config_error_naming_where_and_why(make_receiver):
    first = make_receiver().start()
    with pytest.raises(ConfigError) as raised:
        make_receiver(port=first.port).start()
    message = str(raised.value)
    assert f"127.0.0.1:{first.port}" in message
    assert "already in use" in message
    assert isinstance(raised.value.__cause__, OSError)  # the system's own error is kept


def test_an_ipv6_host_is_served(make_receiver):
    calls = Calls()
    receiver = make_receiver(calls, host="::1").start()
    with socket.create_connection(("::1", receiver.port), timeout=5.0) as sock:
        sock.sendall(raw_post(json.dumps(new_cdr()).encode()))
        assert read_until_closed(sock).startswith(b"HTTP/1.1 200 ")
    assert wait_for(lambda: len(calls) == 1)


def test_the_receiver_threads_are_named_daemons_and_stop_ends_them(make_receiver):
    receiver = make_receiver().start()
    names = [f"yeastarfs-events-http:{receiver.port}", f"yeastarfs-events-dispatch:{receiver.port}"]
    for name in names:
        [thread] = threads_named(name)
        assert thread.daemon, name  # started from a non-daemon thread, still a daemon

    receiver.stop()

    assert wait_for(lambda: not any(threads_named(name) for name in names))
    receiver.stop()  # again: nothing left to stop


def test_the_accept_loop_checks_for_stop_every_fifth_of_a_second(make_receiver, monkeypatch):
    wakeups: list[float] = []
    # BaseServer calls this hook each time its loop wakes up without a connection.
    monkeypatch.setattr(shared_events._GuardedHTTPServer, "service_actions",
                        lambda server: wakeups.append(time.monotonic()))
    receiver = make_receiver()
    started_s = time.monotonic()
    receiver.start()

    assert wait_for(lambda: wakeups, timeout_s=2.0)
    assert wakeups[0] - started_s < 0.45  # 0.2 s, and room for a loaded machine


def test_stop_silences_a_request_whose_body_is_cut_short_by_it(make_receiver, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    receiver = make_receiver().start()
    with connect_from("127.0.0.1", receiver.port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"event\"")
        assert wait_for(lambda: receiver.stats["received"] == 1)  # reading the body now
        receiver.stop()
        assert read_until_closed(sock) == b""
    assert wait_for(lambda: not handler_threads(receiver.port))

    assert receiver.stats["rejected"] == 0  # stopped, not refused: no 400, no warning
    assert warnings_of(caplog) == []


# --- the dispatch side: EventSink ------------------------------------------------------------


class Gate:
    """A callback that records its arguments and blocks until opened."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.calls = Calls()

    def __call__(self, item: Any) -> None:
        self.entered.set()
        self.opened.wait(5)
        self.calls(item)


def sink_stats() -> Counters:
    return Counters(new_cdr=0, duplicates=0, dropped=0, last_event_time=None)


@pytest.fixture
def make_sink():
    made: list[Any] = []

    def make(on_recording: Any, on_event: Any = None, stats: Optional[Counters] = None,
             name: str = "test-event-guard-dispatch") -> Any:
        sink = shared_events.EventSink(on_recording, on_event, stats if stats is not None else sink_stats(),
                                       name, NEW_CDR)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.stop(timeout_s=1.0)


def recording_bytes(payload: dict) -> int:
    """What a NewCdr's recording costs against MAX_QUEUED_BYTES (about its text)."""
    return len(repr(NEW_CDR.new_call(payload).recording))


def test_the_dispatch_thread_is_a_named_daemon(make_sink):
    make_sink(Calls(), name="test-event-guard-named")
    [thread] = threads_named("test-event-guard-named")
    assert thread.daemon  # made from this non-daemon thread


def test_stop_gives_up_on_a_stuck_callback_after_its_timeout(make_sink):
    gate = Gate()
    sink = make_sink(gate)
    sink.accept(new_cdr())
    assert gate.entered.wait(2)
    try:
        started_s = time.monotonic()
        sink.stop(timeout_s=0.05)
        assert time.monotonic() - started_s < 0.4
    finally:
        gate.opened.set()


def test_a_recording_that_exactly_fills_the_byte_budget_is_queued(make_sink, monkeypatch):
    payload = new_cdr(callid="4.1")
    monkeypatch.setattr(shared_events, "MAX_QUEUED_BYTES", recording_bytes(payload))
    calls = Calls()
    stats = sink_stats()
    sink = make_sink(calls, stats=stats)

    before_s = time.time()
    sink.accept(payload)

    assert wait_for(lambda: len(calls) == 1)
    assert stats["dropped"] == 0
    assert before_s <= stats["last_event_time"] <= time.time()


def test_payloads_only_on_event_wants_cost_no_bytes(make_sink, monkeypatch):
    monkeypatch.setattr(shared_events, "MAX_QUEUED_BYTES", 0)  # no recording fits at all
    calls, events = Calls(), Calls()
    stats = sink_stats()
    sink = make_sink(calls, on_event=events, stats=stats)
    ring = {"event": "RING", "callid": "9.9"}

    sink.accept(ring)
    sink.accept(new_cdr(callid="9.8"))  # its recording is over the budget: dropped whole

    assert wait_for(lambda: len(events) == 1)
    assert events.items == [ring] and len(calls) == 0
    assert stats["dropped"] == 1


class Payload(dict):
    """A dict that a weak reference can watch."""


def test_the_sink_keeps_no_payload_nobody_asked_for(make_sink):
    gate = Gate()
    sink = make_sink(gate)  # no on_event
    sink.accept(new_cdr(callid="6.1"))
    assert gate.entered.wait(2)  # the dispatch thread is stuck: what follows stays queued
    try:
        payload = Payload(new_cdr(callid="6.2", padding="x" * 60_000))
        watch = weakref.ref(payload)
        sink.accept(payload)
        del payload
        gc.collect()
        assert watch() is None  # only its recording waits in the queue
    finally:
        gate.opened.set()
    assert wait_for(lambda: len(gate.calls) == 2)


def test_an_event_dropped_on_a_full_queue_returns_its_bytes_and_may_be_resent(make_sink, monkeypatch):
    small = recording_bytes(new_cdr(callid="2.1"))
    big = new_cdr(callid="2.9", callfrom="1" * 4000)
    # Room for big and one small event whose bytes the dispatch thread has yet to give back
    # (it does so just after the callback returns).
    monkeypatch.setattr(shared_events, "MAX_QUEUED_BYTES", recording_bytes(big) + small)
    monkeypatch.setattr(shared_events, "MAX_QUEUED_EVENTS", 1)
    assert 3 * small < recording_bytes(big)
    gate = Gate()
    stats = sink_stats()
    sink = make_sink(gate, stats=stats)

    sink.accept(new_cdr(callid="2.1"))
    assert gate.entered.wait(2)  # 2.1 is in the callback, still counted
    sink.accept(new_cdr(callid="2.2"))  # fills the one place in the queue
    sink.accept(new_cdr(callid="2.3"))  # within the byte budget, but the queue is full
    assert stats["dropped"] == 1
    gate.opened.set()
    assert wait_for(lambda: len(gate.calls) == 2)

    sink.accept(new_cdr(callid="2.3"))  # the PBX re-sends it: not a repeat
    assert wait_for(lambda: len(gate.calls) == 3)
    sink.accept(big)  # fits only if the dropped event's bytes were given back
    assert wait_for(lambda: len(gate.calls) == 4)
    assert [r.callid for r in gate.calls.items] == ["2.1", "2.2", "2.3", "2.9"]
    assert (stats["new_cdr"], stats["duplicates"], stats["dropped"]) == (5, 0, 1)
