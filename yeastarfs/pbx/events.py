"""New recordings as a PBX pushes them over HTTP, whatever its family, and what every event
transport shares.

Owns:
    EventReceiver    the HTTP server a PBX POSTs events to (the S-Series' Report Method
                     "HTTP", the P-Series' webhook); it refuses unwanted sources at accept,
                     before reading a byte, and bounds what any connection may cost: head
                     and body bytes, a total deadline, a handler slot that the heaviest or
                     slowest source yields when all are taken;
    EventSink        what a transport does with a usable event: drop repeats of a call (a
                     PBX re-sends an event until it gets a 2xx; two transports may carry
                     the same call), then hand each new `Recording` to ``on_recording``;
    EventFormat      what a family's events look like: the check that a payload is usable,
                     and how a new call's identity and `Recording` are read out of it;
    Counters, Throttle
                     the statistics and rate-limited warnings of every transport.

Leaves to others: each family's event format (``sseries/events.py``: NewCdr;
``pseries/records.py``: 30012 New CDR), its other transports (the S-Series TCP port, the
P-Series WebSocket, which use `EventSink`), telling the PBX where to send events (the
family's client), catalogue polling as a fallback, and starting and stopping the
transports (the family's `Pbx`).

Threading: `EventReceiver` runs on daemon threads between `start()` and `stop()`, and
`stop()` returns within about a second: one accept thread, which also refuses forbidden
sources and busy moments itself, plus one short-lived handler thread per admitted
connection: at most `max_handler_threads` admitted at once, and at most as many again that
were just evicted and are ending (see `_ConnectionTable`). Each transport also
has one `EventSink` whose dispatch thread runs the callbacks one at a time, in arrival
order, fed by a bounded queue: a slow callback never delays a reply to the PBX, but the
callbacks run on that thread, not the caller's, so they must be thread-safe. A callback that
raises is logged and the next event is still delivered. ``stats`` is updated by these
threads; read it, do not write it. `Counters`, `Throttle` and `EventSink.accept` may be used
from any thread.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import http
import io
import ipaddress
import json
import logging
import queue
import re
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Callable, Collection, NamedTuple, Optional

from yeastarfs.config import Config
from yeastarfs.errors import ConfigError, redact
from yeastarfs.models import Recording

log = logging.getLogger(__name__)

__all__ = ["Counters", "EventFormat", "EventReceiver", "EventSink", "NewCall", "Throttle", "allowed_sources"]

# A NewCdr body is under 1 KiB; 64 KiB leaves room for odd PBXs without letting any sender
# make us buffer much.
MAX_BODY_BYTES = 65536
# The request line and headers together. The PBX sends about 250 bytes in 7 lines (§7.1);
# http.server alone would take 100 lines of 64 KiB each, 6.4 MB per connection.
MAX_HEAD_BYTES = 8192
MAX_HEAD_LINES = 32
# From accept to the end of the request: a connection that has not sent all of it by then
# gets 408 and is closed, however it trickles its bytes. The PBX sends each event at once.
CONNECTION_DEADLINE_S = 10.0
# The PBX opens one connection per event, so 32 handlers at once absorb any real burst,
# while a flood cannot create threads without limit.
MAX_HANDLER_THREADS = 32
# A connection still receiving its request after this long may lose its slot to a newer
# one when all are taken (see _ConnectionTable). The PBX sends an event in one go, within
# milliseconds on a LAN.
SLOW_CONNECTION_S = 1.0
# Events waiting for the dispatch thread, by count and by the text of their recordings.
# Past either (a stuck callback) events are dropped and counted rather than growing memory;
# CDR polling can still find their recordings. A real NewCdr gives under 1 KiB of text, so
# the byte cap only bites on events padded by a hostile sender (each up to 64 KiB).
MAX_QUEUED_EVENTS = 10_000
MAX_QUEUED_BYTES = 8 << 20
# NewCdr identities remembered for deduplication. The PBX re-sends within seconds
# (§12.6), so the last 10,000 calls are far more than enough.
DEDUP_MAX_KEYS = 10_000
# At most one warning per interval for each kind of trouble (refused requests, a full
# queue, failing callbacks), so a flood of bad input cannot flood the log.
WARN_INTERVAL_S = 60.0
# A refused body is read and thrown away up to this size, because closing a socket with
# unread data resets the connection and the client may then never see our reply.
DRAIN_MAX_BYTES = 1 << 20
DRAIN_TIMEOUT_S = 1.0
# Writing a reply: ours are under 200 bytes and fit in any socket buffer, so this only
# matters for a client that has gone away.
REPLY_TIMEOUT_S = 1.0

# --- shared by both transports --------------------------------------------------------


class Counters(dict):
    """A dict of statistics that several threads update; `add` is atomic."""

    __slots__ = ("_lock",)

    def __init__(self, **initial: Any) -> None:
        super().__init__(**initial)
        self._lock = threading.Lock()

    def add(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self[key] += amount


class Throttle:
    """Allows one log line per interval and counts the ones it held back. Thread-safe."""

    def __init__(self, interval_s: float = WARN_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._next_s = 0.0
        self._held = 0

    def ready(self) -> Optional[int]:
        """Return how many lines were held back if one may be logged now, else None."""
        with self._lock:
            now_s = time.monotonic()
            if now_s < self._next_s:
                self._held += 1
                return None
            held, self._held = self._held, 0
            self._next_s = now_s + self._interval_s
            return held

    def emit(self, logger: logging.Logger, level: int, message: str, *args: Any,
             exc_info: bool = False) -> None:
        """Log *message* with *args* and then the held-back count, if `ready` allows it."""
        held = self.ready()
        if held is not None:
            logger.log(level, message, *args, held, exc_info=exc_info)


class _RecentKeys:
    """The last *max_keys* keys seen, oldest forgotten first. Thread-safe."""

    def __init__(self, max_keys: int) -> None:
        self._max_keys = max_keys
        self._keys: collections.OrderedDict[Any, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, key: Any) -> bool:
        """Remember *key*; return False if it was already remembered."""
        with self._lock:
            if key in self._keys:
                self._keys.move_to_end(key)
                return False
            self._keys[key] = None
            if len(self._keys) > self._max_keys:
                self._keys.popitem(last=False)
            return True

    def discard(self, key: Any) -> None:
        with self._lock:
            self._keys.pop(key, None)


class NewCall(NamedTuple):
    """What an event says about a call that has ended: its identity for deduplication
    (None: it has none, so it is never taken for a repeat) and its recording, if any."""

    key: Optional[tuple[str, str]]
    recording: Optional[Recording]


@dataclasses.dataclass(frozen=True)
class EventFormat:
    """A family's events, as the shared transports need them.

    Attributes:
        problem: why a decoded payload is not a usable event at all, or None.
        new_call: the `NewCall` a usable payload announces, or None when it is another
            kind of event (pure; it may raise nothing).
    """

    problem: Callable[[Any], Optional[str]]
    new_call: Callable[[dict], Optional[NewCall]]


class EventSink:
    """What every transport does with a usable event: note it, drop repeated calls, and run
    the callbacks on one dispatch thread (started at once), in arrival order.

    `accept` never blocks: when the queue is full (MAX_QUEUED_EVENTS, MAX_QUEUED_BYTES) the
    event is dropped and counted. A payload is kept only when ``on_event`` wants it; those
    (tests and tools use on_event) count against MAX_QUEUED_EVENTS only.
    """

    def __init__(
        self,
        on_recording: Callable[[Recording], None],
        on_event: Optional[Callable[[dict], None]],
        stats: Counters,
        thread_name: str,
        event_format: EventFormat,
    ) -> None:
        self._format = event_format
        self._on_recording = on_recording
        self._on_event = on_event
        self._stats = stats
        self._recent = _RecentKeys(DEDUP_MAX_KEYS)
        self._queue: queue.Queue[Optional[tuple[Optional[dict], Optional[Recording], int]]] = \
            queue.Queue(MAX_QUEUED_EVENTS)
        self._budget_lock = threading.Lock()
        self._queued_bytes = 0
        self._stopping = threading.Event()
        self._drop_throttle = Throttle()
        self._error_throttle = Throttle()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Stop the dispatch thread; events still queued are dropped."""
        self._stopping.set()
        try:
            self._queue.put_nowait(None)  # wakes the thread if it is waiting
        except queue.Full:
            pass  # it is busy, and checks _stopping after each event
        self._thread.join(timeout_s)

    def accept(self, payload: dict) -> None:
        """Count *payload* and queue its callbacks (the caller checked `payload_problem`)."""
        self._stats["last_event_time"] = time.time()
        key, recording = self._new_cdr(payload)
        if recording is None and self._on_event is None:
            return
        kept = payload if self._on_event is not None else None
        size_bytes = len(repr(recording)) if recording is not None else 0  # about its text
        if not self._reserve(size_bytes):
            self._drop(key)
            return
        try:
            self._queue.put_nowait((kept, recording, size_bytes))
        except queue.Full:
            self._reserve(-size_bytes)
            self._drop(key)

    def _reserve(self, size_bytes: int) -> bool:
        """Count *size_bytes* more as queued (negative: fewer); False if over the budget."""
        with self._budget_lock:
            if size_bytes > 0 and self._queued_bytes + size_bytes > MAX_QUEUED_BYTES:
                return False
            self._queued_bytes += size_bytes
            return True

    def _drop(self, key: Optional[tuple[str, str]]) -> None:
        self._stats.add("dropped")
        if key is not None:
            self._recent.discard(key)  # so that a re-send is not taken for a repeat
        self._drop_throttle.emit(
            log, logging.WARNING, "event dispatch: queue full (%d events or %d bytes), callbacks"
            " too slow; event dropped (%d more dropped since the last warning)",
            MAX_QUEUED_EVENTS, MAX_QUEUED_BYTES)

    def _new_cdr(self, payload: dict) -> tuple[Optional[tuple[str, str]], Optional[Recording]]:
        """The dedup key and recording of a first-seen new call; (None, None) for anything else."""
        call = self._format.new_call(payload)
        if call is None:
            return None, None
        key, recording = call
        if key is not None and not self._recent.add(key):
            self._stats.add("duplicates")
            return None, None
        self._stats.add("new_cdr")
        return key, recording

    def _run(self) -> None:
        while not self._stopping.is_set():
            item = self._queue.get()
            if item is None:
                break
            payload, recording, size_bytes = item
            self._deliver(payload, recording)
            self._reserve(-size_bytes)

    def _deliver(self, payload: Optional[dict], recording: Optional[Recording]) -> None:
        calls = ((self._on_event, payload), (self._on_recording, recording))
        for callback, argument in calls:
            if callback is None or argument is None:
                continue
            try:
                callback(argument)
            except Exception:  # a broken callback must not end the dispatch thread
                self._error_throttle.emit(
                    log, logging.ERROR, "event dispatch: callback %s failed (%d more failures"
                    " since the last report)", getattr(callback, "__qualname__", callback),
                    exc_info=True)


# --- the HTTP receiver ----------------------------------------------------------------


def allowed_sources(config: Config) -> Optional[set[str]]:
    """Who may push events to a mount of *config*: the PBX's addresses unless the user said
    otherwise (None: anyone). Raises ConfigError when the PBX's name does not resolve."""
    if config.allow_any_event_source:
        return None
    if config.events_allow_from:
        return set(config.events_allow_from)
    try:
        infos = socket.getaddrinfo(config.pbx_host, None)
    except OSError as exc:
        raise ConfigError(f"cannot resolve PBX host {config.pbx_host}: {exc}") from None
    addresses = {info[4][0] for info in infos}
    # An IPv4 PBX may reach an IPv6 socket as ::ffff:a.b.c.d.
    return addresses | {f"::ffff:{address}" for address in addresses if ":" not in address}

def _normalize_ip(text: str) -> str:
    """The canonical form of an IP address (IPv4-mapped IPv6 as IPv4). Raises ValueError."""
    ip = ipaddress.ip_address(text.strip())
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _parse_allowed_ips(ips: Optional[Collection[str]]) -> Optional[frozenset[str]]:
    """*ips* normalized; None means any source. Raises ConfigError on a bad address."""
    if ips is None:
        return None
    if isinstance(ips, (str, bytes)):
        raise ConfigError("allowed_ips must be a collection of IP addresses, not one string")
    allowed = set()
    for text in ips:
        try:
            allowed.add(_normalize_ip(str(text)))
        except ValueError:
            raise ConfigError(f"allowed_ips: {text!r} is not an IP address") from None
    return frozenset(allowed)


def _bind_problem(host: str, port: int, exc: BaseException) -> str:
    """A message telling the user why the event port could not be opened."""
    where = f"{host}:{port}"
    code = getattr(exc, "errno", None)
    if code == errno.EADDRINUSE:
        reason = "the port is already in use (another program, or another yeastarfs)"
    elif code in (errno.EACCES, errno.EPERM):
        reason = "not permitted (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    elif code == errno.EADDRNOTAVAIL:
        reason = f"{host} is not an address of this host"
    else:
        reason = str(exc)
    return f"event receiver: cannot listen on {where} for PBX events: {reason}"


def _decode_event(body: bytes, event_format: EventFormat) -> tuple[Optional[dict], Optional[str]]:
    """The event in an HTTP body, or the reason it is unusable."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # ValueError covers bad UTF-8 too
        return None, f"not JSON ({exc})"
    problem = event_format.problem(payload)
    return (None, problem) if problem else (payload, None)


_HEAD_END = re.compile(rb"\n\r?\n")  # the blank line after the headers (http.server's rule)


class _HeadTooLarge(Exception):
    pass


def _canned_reply(status: int, *headers: str) -> bytes:
    """A complete reply without a request to answer (sent before or instead of parsing)."""
    phrase = http.HTTPStatus(status).phrase
    body = f"{phrase}\n".encode()
    lines = [f"HTTP/1.1 {status} {phrase}", "Content-Type: text/plain; charset=utf-8",
             f"Content-Length: {len(body)}", *headers, "Connection: close", "", ""]
    return "\r\n".join(lines).encode() + body


_BUSY_REPLY = _canned_reply(503, "Retry-After: 1")
_FORBIDDEN_REPLY = _canned_reply(403)


def _send_nowait(sock: socket.socket, data: bytes) -> None:
    """Send a canned reply without ever blocking the caller (the accept thread)."""
    try:
        sock.setblocking(False)
        sock.send(data)  # under 200 bytes into a fresh socket's buffer: all or nothing
    except OSError:
        pass  # the client is already gone: nobody is owed more


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading it
    except OSError:
        pass


class _Connection:
    """An admitted connection: its socket, its source, its times, and its state."""

    __slots__ = ("sock", "client_address", "source", "accepted_s", "deadline_s", "reading",
                 "evicted")

    def __init__(self, sock: socket.socket, client_address: Any, accepted_s: float,
                 deadline_s: float) -> None:
        self.sock = sock
        self.client_address = client_address
        self.source: str = client_address[0]
        self.accepted_s = accepted_s
        self.deadline_s = deadline_s
        self.reading = True  # its request is still arriving: it may be evicted
        self.evicted = False


class _ConnectionTable:
    """The admitted connections, and which one gives way when all slots are taken.

    At most *max_active* connections hold a slot. When they all do, a new connection takes
    the slot of one still receiving its request: first one of the source holding the most
    slots, if that source would still hold more than the newcomer's; else the oldest that
    has been receiving for over *slow_s*. Failing both, the newcomer is turned away (503).
    So a flood, even from an allowed source, cannot keep a slot from a source that holds
    fewer (the PBX, which opens one connection per event), and slow clients, even at the
    PBX's own address, yield to whoever comes next; a quick request loses its slot only to
    a source holding fewer, and its sender re-sends (the PBX does, §12.6). An evicted
    connection is shut down at once and its thread ends as soon as its read returns; until
    then it still counts, so handler threads never exceed 2 x max_active.

    Thread-safe. One lock, held for bookkeeping and non-blocking shutdown() calls only; a
    connection leaves the table (`release`) before its socket is closed, so a shutdown()
    made under the lock never reaches a closed socket or a reused descriptor.
    """

    def __init__(self, max_active: int, slow_s: float) -> None:
        self._max_active = max_active
        self._slow_s = slow_s
        self._lock = threading.Lock()
        self._admitted: list[_Connection] = []  # oldest first; evicted ones until they end

    def admit(self, conn: _Connection) -> tuple[bool, Optional[_Connection]]:
        """Admit *conn*, evicting one connection if need be; return (admitted, evicted)."""
        with self._lock:
            if len(self._admitted) >= 2 * self._max_active:
                return False, None
            active = [c for c in self._admitted if not c.evicted]
            victim = None
            if len(active) >= self._max_active:
                victim = self._victim(active, conn)
                if victim is None:
                    return False, None
                victim.evicted = True
                _shutdown(victim.sock)
            self._admitted.append(conn)
            return True, victim

    def _victim(self, active: list[_Connection], newcomer: _Connection) -> Optional[_Connection]:
        """The connection still receiving its request that yields to *newcomer*, or None."""
        held = collections.Counter(c.source for c in active)
        heaviest, most = held.most_common(1)[0]
        reading = [c for c in active if c.reading]  # oldest first
        if most > held[newcomer.source] + 1:
            victim = next((c for c in reading if c.source == heaviest), None)
            if victim is not None:
                return victim
        slow_before_s = newcomer.accepted_s - self._slow_s
        return next((c for c in reading if c.accepted_s < slow_before_s), None)

    def done_reading(self, conn: _Connection) -> bool:
        """Mark *conn*'s request complete (no longer evictable); False if it was evicted."""
        with self._lock:
            conn.reading = False
            return not conn.evicted

    def release(self, conn: _Connection) -> None:
        with self._lock:
            self._admitted.remove(conn)

    def close_all(self) -> None:
        """Shut every admitted connection down, so that their threads end now."""
        with self._lock:
            for conn in self._admitted:
                conn.evicted = True
                _shutdown(conn.sock)


class _DeadlineReader(io.RawIOBase):
    """A connection's incoming bytes, never waited for past its deadline.

    Each recv waits only for the time left, so a client trickling a byte every few seconds
    gains nothing. `read_head` receives the request line and headers against their caps
    before http.server sees any of it; `readinto` hands those bytes out first, so
    http.server parses a head that is known to be complete and small.
    """

    def __init__(self, sock: socket.socket, deadline_s: float) -> None:
        super().__init__()
        self._sock = sock
        self.deadline_s = deadline_s  # `_drain` may bring it closer
        self._pending = memoryview(b"")  # received, not yet handed out

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._pending:
            self._pending = memoryview(self._recv(len(buffer)))
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def read_head(self) -> bool:
        """Receive up to the blank line that ends the headers; False if the peer closed first.

        Raises _HeadTooLarge past MAX_HEAD_BYTES or MAX_HEAD_LINES, without receiving the
        rest; socket.timeout at the deadline; OSError.
        """
        head = bytearray()
        searched = 0
        while True:
            end = _HEAD_END.search(head, max(0, searched - 2))  # a match is at most 3 bytes
            searched = len(head)
            size = end.end() if end else len(head)
            if size > MAX_HEAD_BYTES or head.count(b"\n", 0, size) > MAX_HEAD_LINES:
                raise _HeadTooLarge()
            if end:
                self._pending = memoryview(bytes(head))
                return True
            chunk = self._recv(MAX_HEAD_BYTES + 1 - len(head))  # never more than the cap
            if not chunk:
                return False
            head += chunk

    def _recv(self, max_bytes: int) -> bytes:
        remaining_s = self.deadline_s - time.monotonic()
        if remaining_s <= 0:
            raise socket.timeout("the connection's deadline has passed")
        self._sock.settimeout(remaining_s)
        return self._sock.recv(max_bytes)


class _EventRequestHandler(BaseHTTPRequestHandler):
    """One connection, one HTTP request from the PBX: answer at once, then queue its event.

    Any path is accepted (the PBX appends its ``url`` setting), and the Host header is not
    looked at (the PBX sends ``Host: 192.168.5.150: 8260``, with a space).
    """

    protocol_version = "HTTP/1.1"
    server_version = "yeastarfs"
    sys_version = ""
    disable_nagle_algorithm = True
    server: _GuardedHTTPServer

    def __init__(self, conn: _Connection, server: _GuardedHTTPServer) -> None:
        self._conn = conn
        self._reader = _DeadlineReader(conn.sock, conn.deadline_s)
        super().__init__(conn.sock, conn.client_address, server)  # setup, handle, finish

    def setup(self) -> None:
        super().setup()  # self.connection and self.wfile; its rfile is replaced
        self.rfile.close()
        self.rfile = io.BufferedReader(self._reader)

    def handle(self) -> None:
        """Receive the head within its caps, then let http.server parse one request."""
        try:
            if not self._reader.read_head():
                return  # the client left, or was evicted, before its headers were complete
        except _HeadTooLarge:
            self._refuse_unparsed(431, f"request line and headers over {MAX_HEAD_BYTES} bytes"
                                       f" or {MAX_HEAD_LINES} lines")
            return
        except socket.timeout:
            self.server.receiver.stats.add("timed_out")
            self._refuse_unparsed(408, "headers not complete within the connection deadline")
            return
        except OSError:
            return  # reset by the client
        self.handle_one_request()  # one request per connection: the PBX sends one (§7.1)

    def do_POST(self) -> None:
        receiver = self.server.receiver
        receiver.stats.add("received")
        body = self._read_body()
        if body is None:
            return  # refused, or evicted
        # Decoding happens before the reply, unlike the dispatch: it takes microseconds for
        # a body this small, and it lets malformed input get 400 rather than 200. The PBX
        # re-sends after a non-200 (3 times, 5 s apart: §12.6), which for malformed input is
        # pointless but cheap, while a 400 shows up in the sender's logs and tells whoever
        # is testing with curl that the event was not taken.
        payload, problem = _decode_event(body, receiver.event_format)
        if payload is None:
            self._refuse(400, problem or "unusable event")
            return
        self._reply(200)
        receiver._sink.accept(payload)  # after the reply: the client is already done

    def _method_not_allowed(self) -> None:
        self.server.receiver.stats.add("received")
        self._refuse(405, f"method {self.command} (events are POSTed)", allow="POST")

    do_GET = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _method_not_allowed

    def send_error(self, code: int, message: Optional[str] = None,
                   explain: Optional[str] = None) -> None:
        """Count the protocol errors http.server finds itself (bad request line, method)."""
        receiver = self.server.receiver
        receiver.stats.add("received")
        receiver._note_rejected(self.client_address[0], code, message or "bad request")
        super().send_error(code, message, explain)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base signature)
        log.debug("event receiver: %s: %s", self.client_address[0], redact(format % args))

    def _read_body(self) -> Optional[bytes]:
        """The body of a request that may be read; None once the request has been refused."""
        receiver = self.server.receiver
        length = self._content_length()
        if length is None:
            self._refuse(411, "no Content-Length")
        elif length < 0:
            self._refuse(400, "unreadable Content-Length")
        elif length > receiver.max_body_bytes:
            self._refuse(413, f"body of {length} bytes is over the limit of"
                              f" {receiver.max_body_bytes}", unread_bytes=length)
        else:
            try:
                body = self.rfile.read(length)  # bounded by max_body_bytes and the deadline
            except socket.timeout:
                receiver.stats.add("timed_out")
                self._refuse(408, "body not complete within the connection deadline")
                return None
            if len(body) == length:
                return body if self.server.table.done_reading(self._conn) else None
            self._refuse(400, "body shorter than its Content-Length")
        return None

    def _content_length(self) -> Optional[int]:
        """The declared body length; None when missing, -1 when not a plain number."""
        text = self.headers.get("Content-Length")
        if text is None:
            return None
        text = text.strip()
        return int(text) if text.isascii() and text.isdigit() else -1

    def _refuse(self, status: int, reason: str, unread_bytes: int = 0,
                allow: Optional[str] = None) -> None:
        if self._conn.evicted:
            return  # counted when it was evicted, and its socket is shut
        self.server.receiver._note_rejected(self.client_address[0], status, reason)
        self._reply(status, allow=allow)
        if unread_bytes > 0:
            self._drain(unread_bytes)

    def _refuse_unparsed(self, status: int, reason: str) -> None:
        """Refuse a request whose head was never parsed (so http.server cannot reply)."""
        receiver = self.server.receiver
        receiver.stats.add("received")
        receiver._note_rejected(self.client_address[0], status, reason)
        try:
            self.connection.settimeout(REPLY_TIMEOUT_S)
            self.connection.sendall(_canned_reply(status))
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the client went away: there is no one left to tell

    def _reply(self, status: int, allow: Optional[str] = None) -> None:
        """Send a complete, tiny response and half-close, so the client is done at once."""
        body = b"OK\n" if status == 200 else f"{http.HTTPStatus(status).phrase}\n".encode()
        self.close_connection = True  # the PBX opens a new connection per event (§7.1)
        try:
            self.connection.settimeout(REPLY_TIMEOUT_S)
            self.send_response(status)
            if allow:
                self.send_header("Allow", allow)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the client went away: there is no one left to tell

    def _drain(self, unread_bytes: int) -> None:
        """Read and discard a refused body, bounded in bytes and time (see DRAIN_MAX_BYTES)."""
        remaining = min(unread_bytes, DRAIN_MAX_BYTES)
        self._reader.deadline_s = min(self._reader.deadline_s, time.monotonic() + DRAIN_TIMEOUT_S)
        try:
            while remaining > 0:
                chunk = self.rfile.read1(min(remaining, 65536))
                if not chunk:
                    return
                remaining -= len(chunk)
        except OSError:
            pass  # socket.timeout included: the drain is a courtesy, not a duty


class _GuardedHTTPServer(HTTPServer):
    """HTTPServer that refuses forbidden sources at accept and runs each admitted connection
    on its own daemon thread, within the caps of a `_ConnectionTable`."""

    allow_reuse_address = True
    request_queue_size = 128  # listen backlog, for bursts

    def __init__(self, address: tuple[str, int], receiver: EventReceiver) -> None:
        self.receiver = receiver
        self.table = _ConnectionTable(receiver.max_handler_threads, receiver.slow_connection_s)
        self._deadline_s = receiver.connection_deadline_s
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _EventRequestHandler)

    def server_bind(self) -> None:
        # Not HTTPServer.server_bind: it calls socket.getfqdn(), a DNS lookup that can stall
        # startup for seconds, for a server name nothing here uses.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), port

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse a source outside allowed_ips at once, before reading a byte from it."""
        if self.receiver._is_allowed(client_address[0]):
            return True
        self.receiver.stats.add("forbidden")
        self.receiver._note_rejected(client_address[0], 403, "source address not in allowed_ips")
        _send_nowait(request, _FORBIDDEN_REPLY)
        return False  # BaseServer closes it

    def process_request(self, request: Any, client_address: Any) -> None:
        now_s = time.monotonic()
        conn = _Connection(request, client_address, now_s, now_s + self._deadline_s)
        admitted, evicted = self.table.admit(conn)
        if evicted is not None:
            self.receiver.stats.add("evicted")
            self.receiver._note_rejected(evicted.source, None, "its request was still"
                                         " incomplete when a newer connection needed the room")
        if not admitted:
            self._refuse_busy(request, client_address)
            return
        thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                  name=f"yeastarfs-events-conn:{self.server_port}")
        try:
            thread.start()
        except BaseException:
            self.table.release(conn)  # the thread never started; BaseServer closes the socket
            raise

    def _serve(self, conn: _Connection) -> None:
        try:
            _EventRequestHandler(conn, self)
        except Exception:
            self.handle_error(conn.sock, conn.client_address)
        finally:
            self.table.release(conn)  # before the close: see _ConnectionTable
            self.shutdown_request(conn.sock)

    def server_close(self) -> None:
        super().server_close()
        self.table.close_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Resets and timeouts from clients are routine; the default prints to stderr.
        log.debug("event receiver: connection from %s failed", client_address[0], exc_info=True)

    def _refuse_busy(self, request: Any, client_address: Any) -> None:
        """Answer 503 on the accept thread, without waiting, and close."""
        self.receiver.stats.add("received")
        self.receiver._note_rejected(client_address[0], 503, "too many connections at once")
        _send_nowait(request, _BUSY_REPLY)
        self.shutdown_request(request)


class EventReceiver:
    """HTTP server that receives the PBX's pushed events on its own thread.

    Attributes:
        port: the port asked for; after `start`, the port actually bound (0 picks one).
        max_body_bytes: larger bodies get 413 and are not read.
        stats: counters, updated by the server's threads:
            received: HTTP requests handled; rejected: requests and connections refused
            (forbidden source, malformed, oversized, too slow, wrong method, evicted,
            server busy), of which forbidden: sources outside allowed_ips, closed at
            accept; timed_out: past the connection deadline; evicted: closed unfinished
            to make room (see `_ConnectionTable`); new_cdr / duplicates: new-call events
            seen for the first time / again (by call id, else recording name); dropped: events
            lost because the dispatch queue was full; last_event_time: ``time.time()`` of
            the last usable event, or None.
        connection_deadline_s, max_handler_threads, slow_connection_s: read by `start`
            (tests lower them).

    Threading: see the module docstring. ``on_event`` (every usable event, of any type,
    duplicates included) and ``on_recording`` run on the one dispatch thread.
    `set_allowed_ips` may be called from any thread at any time.
    """

    connection_deadline_s = CONNECTION_DEADLINE_S
    max_handler_threads = MAX_HANDLER_THREADS
    slow_connection_s = SLOW_CONNECTION_S

    def __init__(
        self,
        on_recording: Callable[[Recording], None],
        *,
        event_format: EventFormat,
        port: int,
        host: str = "0.0.0.0",
        allowed_ips: Optional[Collection[str]] = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        on_event: Optional[Callable[[dict], None]] = None,
    ) -> None:
        if max_body_bytes <= 0:
            raise ConfigError("event receiver: max_body_bytes must be positive")
        self.event_format = event_format
        self._on_recording = on_recording
        self._on_event = on_event
        self._host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self._allowed = _parse_allowed_ips(allowed_ips)
        self.stats = Counters(received=0, new_cdr=0, duplicates=0, rejected=0, forbidden=0,
                              timed_out=0, evicted=0, dropped=0, last_event_time=None)
        self._reject_throttle = Throttle()
        self._server: Optional[_GuardedHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._sink: Optional[EventSink] = None

    def start(self) -> EventReceiver:
        """Bind and serve on a daemon thread. Raises ConfigError if the port cannot be used."""
        if self._server is not None:
            return self
        try:
            server = _GuardedHTTPServer((self._host, self.port), self)
        except (OSError, OverflowError) as exc:  # OverflowError: port out of range
            raise ConfigError(_bind_problem(self._host, self.port, exc)) from exc
        self.port = server.server_address[1]
        self._sink = EventSink(self._on_recording, self._on_event, self.stats,
                               thread_name=f"yeastarfs-events-dispatch:{self.port}",
                               event_format=self.event_format)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                  name=f"yeastarfs-events-http:{self.port}", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # "can't start new thread": keep no server stop() would wait for forever
            server.server_close()
            self._sink.stop(timeout_s=0.5)
            raise
        self._server, self._thread = server, thread
        log.info("event receiver: listening for PBX events on %s:%d", self._host, self.port)
        return self

    def stop(self) -> None:
        """Stop serving and dispatching; returns within about a second. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # returns once serve_forever has seen it: within its poll_interval
        server.server_close()
        if self._sink is not None:
            self._sink.stop(timeout_s=0.5)
        log.info("event receiver: stopped listening on port %d", self.port)

    def set_allowed_ips(self, ips: Optional[Collection[str]]) -> None:
        """Accept connections only from *ips* (None: from anywhere). Raises ConfigError.

        Checked as each connection is accepted; connections already admitted are kept.
        """
        self._allowed = _parse_allowed_ips(ips)  # one assignment: the accept thread sees old or new

    def __enter__(self) -> EventReceiver:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _is_allowed(self, address: str) -> bool:
        allowed = self._allowed  # read once: set_allowed_ips may swap it meanwhile
        if allowed is None:
            return True
        try:
            return _normalize_ip(address) in allowed
        except ValueError:
            return False

    def _note_rejected(self, address: str, status: Optional[int], reason: str) -> None:
        """Count a refused request (*status* None: closed without a reply), and warn about
        it unless a warning went out lately."""
        self.stats.add("rejected")
        how = f"with HTTP {status}" if status else "by closing its connection"
        self._reject_throttle.emit(
            log, logging.WARNING, "event receiver: refused a request from %s %s: %s"
            " (%d more refused since the last warning)", address, how, redact(reason))
