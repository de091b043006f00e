"""New recordings as the PBX announces them: its pushed events (yeastar-api.md §7, §12.6, §12.7).

Owns:
    EventReceiver     the HTTP server the PBX POSTs events to (Report Method "HTTP");
    TcpEventClient    the client of the PBX's TCP event port (Report Method "TCP");
    JsonObjectStream  the splitter of that TCP byte stream into JSON objects.
Both transports reject malformed input, deduplicate NewCdr events by ``callid`` (the PBX
re-sends an event until it gets a 200) and hand each new `Recording` to ``on_recording``.

Leaves to others: reading an event's fields and the PBX's misspellings (`models`); where a
recording goes (the callback; in practice the index); the HTTP login that tells the PBX
where to send events, and CDR polling as a fallback (`api`, `cli`).

Threading: each transport runs on its own daemon threads between `start()` and `stop()`,
and `stop()` returns within about a second.
    EventReceiver   one accept thread, plus at most `max_handler_threads` short-lived
                    handler threads, one per connection;
    TcpEventClient  one connection thread.
Each also has one dispatch thread that runs the callbacks one at a time, in arrival order,
fed by a bounded queue: a slow callback never delays a reply to the PBX, but the callbacks
run on that thread, not the caller's, so they must be thread-safe. A callback that raises is
logged and the next event is still delivered. ``stats`` is updated by these threads; read
it, do not write it.
"""

from __future__ import annotations

import collections
import enum
import errno
import http
import ipaddress
import json
import logging
import queue
import random
import re
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Collection, Optional

from yeastarfs.errors import ConfigError, redact, register_secret
from yeastarfs.models import Recording, event_name, recording_from_event

log = logging.getLogger(__name__)

__all__ = ["EventReceiver", "JsonObjectStream", "TcpEventClient"]

# The PBX's default port for HTTP events (yeastar-api.md §7.1).
DEFAULT_HTTP_PORT = 8260
# A NewCdr body is under 1 KiB; 64 KiB leaves room for odd PBXs without letting any sender
# make us buffer much.
MAX_BODY_BYTES = 65536
# The PBX opens one connection per event, so 32 handlers at once absorb any real burst,
# while a flood cannot create threads without limit.
MAX_HANDLER_THREADS = 32
# Per-read timeout on an HTTP connection: a client that stalls this long is dropped.
SOCKET_TIMEOUT_S = 5.0
# Events waiting for the dispatch thread. Past this (a stuck callback) events are dropped
# and counted rather than growing memory; CDR polling can still find their recordings.
MAX_QUEUED_EVENTS = 10_000
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
# Largest TCP event kept; anything bigger is discarded while the stream resyncs.
MAX_OBJECT_BYTES = 1 << 20
# How far past max_object_bytes an oversized TCP event is followed to its closing brace
# before the stream gives up on finding it.
DISCARD_LIMIT_FACTOR = 16
# The login reply is one short block (§12.7); more than this means we are not talking to
# the PBX's event port.
LOGIN_REPLY_MAX_BYTES = 4096
RECV_BYTES = 65536
# How often a blocked TCP read wakes up to check for stop() (which also closes the socket).
STOP_POLL_S = 0.5
# A session that lasted this long proves the PBX healthy, so the backoff starts over.
# Shorter sessions (login accepted, then dropped at once) keep backing off: no tight loop.
HEALTHY_SESSION_S = 30.0
# Each wait is shortened by up to this fraction at random, so that clients restarted
# together (or a PBX reboot) do not make them all retry in step.
JITTER_FRACTION = 0.25

_SEPARATORS = b" \t\r\n"
_OUTSIDE_STRING = re.compile(rb'[{}"]')
_INSIDE_STRING = re.compile(rb'["\\]')
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_BUSY_REPLY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n\r\n"
)


# --- shared helpers -------------------------------------------------------------------


class _Counters(dict):
    """A dict of statistics that several threads update; `add` is atomic."""

    __slots__ = ("_lock",)

    def __init__(self, **initial: Any) -> None:
        super().__init__(**initial)
        self._lock = threading.Lock()

    def add(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self[key] += amount


class _Throttle:
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


def _payload_problem(payload: Any) -> Optional[str]:
    """Why *payload* is not a usable event, or None.

    Only the fields this module relies on are checked; `models` copes with the others.
    A number as ``recording`` is refused here because `models` would turn it into a name.
    """
    if not isinstance(payload, dict):
        return f"a JSON {type(payload).__name__} instead of an object"
    for key in ("event", "action", "recording"):
        if payload.get(key) is not None and not isinstance(payload[key], str):
            return f"{key!r} is a {type(payload[key]).__name__}, not a string"
    return None


def _dedup_key(payload: dict, recording: Optional[Recording]) -> Optional[tuple[str, str]]:
    """The identity of a NewCdr: its callid, else its recording name; None if it has neither."""
    if recording is not None:
        callid = recording.callid
    else:
        raw = payload.get("callid")
        valid = isinstance(raw, (str, int, float)) and not isinstance(raw, bool)
        callid = str(raw).strip() if valid else ""
    if callid:
        return ("callid", callid)
    if recording is not None:
        return ("recording", recording.name)
    return None


class _EventSink:
    """What both transports do with a usable event: note it, drop NewCdr repeats, and run
    the callbacks on one dispatch thread, in arrival order.

    `accept` never blocks: when the queue is full the event is dropped and counted.
    """

    def __init__(
        self,
        on_recording: Callable[[Recording], None],
        on_event: Optional[Callable[[dict], None]],
        stats: _Counters,
        thread_name: str,
    ) -> None:
        self._on_recording = on_recording
        self._on_event = on_event
        self._stats = stats
        self._recent = _RecentKeys(DEDUP_MAX_KEYS)
        self._queue: queue.Queue[Optional[tuple[dict, Optional[Recording]]]] = queue.Queue(
            MAX_QUEUED_EVENTS
        )
        self._stopping = threading.Event()
        self._drop_throttle = _Throttle()
        self._error_throttle = _Throttle()
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
        """Count *payload* and queue its callbacks (the caller checked `_payload_problem`)."""
        self._stats["last_event_time"] = time.time()
        key, recording = self._new_cdr(payload)
        if recording is None and self._on_event is None:
            return
        try:
            self._queue.put_nowait((payload, recording))
        except queue.Full:
            self._stats.add("dropped")
            if key is not None:
                self._recent.discard(key)  # so that a re-send is not taken for a repeat
            held = self._drop_throttle.ready()
            if held is not None:
                log.warning(
                    "event dispatch: queue full (%d events), callbacks too slow; event dropped"
                    " (%d more dropped since the last warning)", MAX_QUEUED_EVENTS, held)

    def _new_cdr(self, payload: dict) -> tuple[Optional[tuple[str, str]], Optional[Recording]]:
        """The dedup key and recording of a first-seen NewCdr; (None, None) for anything else."""
        if event_name(payload).lower() != "newcdr":
            return None, None
        recording = recording_from_event(payload)
        key = _dedup_key(payload, recording)
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
            self._deliver(*item)

    def _deliver(self, payload: dict, recording: Optional[Recording]) -> None:
        calls = ((self._on_event, payload), (self._on_recording, recording))
        for callback, argument in calls:
            if callback is None or argument is None:
                continue
            try:
                callback(argument)
            except Exception:  # a broken callback must not end the dispatch thread
                held = self._error_throttle.ready()
                if held is not None:
                    log.exception("event dispatch: callback %s failed (%d more failures since"
                                  " the last report)", getattr(callback, "__qualname__", callback),
                                  held)


# --- HTTP events ----------------------------------------------------------------------


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


def _decode_event(body: bytes) -> tuple[Optional[dict], Optional[str]]:
    """The event in an HTTP body, or the reason it is unusable."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # ValueError covers bad UTF-8 too
        return None, f"not JSON ({exc})"
    problem = _payload_problem(payload)
    return (None, problem) if problem else (payload, None)


class _EventRequestHandler(BaseHTTPRequestHandler):
    """One HTTP request from the PBX: answer at once, then queue its event.

    Any path is accepted (the PBX appends its ``url`` setting), and the Host header is not
    looked at (the PBX sends ``Host: 192.168.5.150: 8260``, with a space).
    """

    protocol_version = "HTTP/1.1"
    server_version = "yeastarfs"
    sys_version = ""
    disable_nagle_algorithm = True
    server: _BoundedHTTPServer

    def setup(self) -> None:
        self.timeout = self.server.socket_timeout_s  # read by StreamRequestHandler.setup
        super().setup()

    def do_POST(self) -> None:
        receiver = self.server.receiver
        receiver.stats.add("received")
        length = self._content_length()
        if not receiver._is_allowed(self.client_address[0]):
            self._refuse(403, "source address not in allowed_ips", unread_bytes=length or 0)
            return
        if length is None:
            self._refuse(411, "no Content-Length")
            return
        if length < 0:
            self._refuse(400, "unreadable Content-Length")
            return
        if length > receiver.max_body_bytes:
            self._refuse(413, f"body of {length} bytes is over the limit of"
                              f" {receiver.max_body_bytes}", unread_bytes=length)
            return
        body = self.rfile.read(length)  # bounded by max_body_bytes, each read by the timeout
        if len(body) < length:
            self._refuse(400, "body shorter than its Content-Length")
            return
        # Decoding happens before the reply, unlike the dispatch: it takes microseconds for
        # a body this small, and it lets malformed input get 400 rather than 200. The PBX
        # re-sends after a non-200 (3 times, 5 s apart: §12.6), which for malformed input is
        # pointless but cheap, while a 400 shows up in the sender's logs and tells whoever
        # is testing with curl that the event was not taken.
        payload, problem = _decode_event(body)
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
        """Count the protocol errors http.server finds itself (bad request line, huge headers)."""
        receiver = self.server.receiver
        receiver.stats.add("received")
        receiver._note_rejected(self.client_address[0], code, message or "bad request")
        super().send_error(code, message, explain)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base signature)
        log.debug("event receiver: %s: %s", self.client_address[0], redact(format % args))

    def _content_length(self) -> Optional[int]:
        """The declared body length; None when missing, -1 when not a plain number."""
        text = self.headers.get("Content-Length")
        if text is None:
            return None
        text = text.strip()
        return int(text) if text.isascii() and text.isdigit() else -1

    def _refuse(self, status: int, reason: str, unread_bytes: int = 0,
                allow: Optional[str] = None) -> None:
        self.server.receiver._note_rejected(self.client_address[0], status, reason)
        self._reply(status, allow=allow)
        if unread_bytes > 0:
            self._drain(unread_bytes)

    def _reply(self, status: int, allow: Optional[str] = None) -> None:
        """Send a complete, tiny response and half-close, so the client is done at once."""
        body = b"OK\n" if status == 200 else f"{http.HTTPStatus(status).phrase}\n".encode()
        self.close_connection = True  # the PBX opens a new connection per event (§7.1)
        try:
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
        try:
            self.connection.settimeout(DRAIN_TIMEOUT_S)
            while remaining > 0:
                chunk = self.rfile.read1(min(remaining, 65536))
                if not chunk:
                    return
                remaining -= len(chunk)
        except OSError:
            pass


class _BoundedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on handler threads; connections beyond it get 503."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False  # stop() must not wait for handlers stuck on slow clients
    request_queue_size = 128  # listen backlog, for bursts

    def __init__(self, address: tuple[str, int], receiver: EventReceiver) -> None:
        self.receiver = receiver
        self.socket_timeout_s = receiver.socket_timeout_s
        self._slots = threading.BoundedSemaphore(receiver.max_handler_threads)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _EventRequestHandler)

    def server_bind(self) -> None:
        # Not HTTPServer.server_bind: it calls socket.getfqdn(), a DNS lookup that can stall
        # startup for seconds, for a server name nothing here uses.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), port

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse_busy(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # the thread never started
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Resets and timeouts from clients are routine; the default prints to stderr.
        log.debug("event receiver: connection from %s failed", client_address[0], exc_info=True)

    def _refuse_busy(self, request: Any, client_address: Any) -> None:
        """Answer 503 on the accept thread (a write to a fresh socket does not block)."""
        self.receiver.stats.add("received")
        self.receiver._note_rejected(client_address[0], 503, "too many connections at once")
        try:
            request.settimeout(DRAIN_TIMEOUT_S)
            request.sendall(_BUSY_REPLY)
        except OSError:
            pass
        self.shutdown_request(request)


class EventReceiver:
    """HTTP server that receives the PBX's pushed events (NewCdr) on its own thread.

    Attributes:
        port: the port asked for; after `start`, the port actually bound (0 picks one).
        max_body_bytes: larger bodies get 413 and are not read.
        stats: counters, updated by the server's threads:
            received: HTTP requests handled; rejected: those refused (forbidden, malformed,
            oversized, wrong method, server busy); new_cdr / duplicates: NewCdr events seen
            for the first time / again (by callid, else recording name); dropped: events
            lost because the dispatch queue was full; last_event_time: ``time.time()`` of
            the last usable event, or None.
        socket_timeout_s, max_handler_threads: read by `start` (tests lower them).

    Threading: see the module docstring. ``on_event`` (every usable event, of any type,
    duplicates included) and ``on_recording`` run on the one dispatch thread.
    `set_allowed_ips` may be called from any thread at any time.
    """

    socket_timeout_s = SOCKET_TIMEOUT_S
    max_handler_threads = MAX_HANDLER_THREADS

    def __init__(
        self,
        on_recording: Callable[[Recording], None],
        *,
        host: str = "0.0.0.0",
        port: int = DEFAULT_HTTP_PORT,
        allowed_ips: Optional[Collection[str]] = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        on_event: Optional[Callable[[dict], None]] = None,
    ) -> None:
        if max_body_bytes <= 0:
            raise ConfigError("event receiver: max_body_bytes must be positive")
        self._on_recording = on_recording
        self._on_event = on_event
        self._host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self._allowed = _parse_allowed_ips(allowed_ips)
        self.stats = _Counters(received=0, new_cdr=0, duplicates=0, rejected=0, dropped=0,
                               last_event_time=None)
        self._reject_throttle = _Throttle()
        self._server: Optional[_BoundedHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._sink: Optional[_EventSink] = None

    def start(self) -> EventReceiver:
        """Bind and serve on a daemon thread. Raises ConfigError if the port cannot be used."""
        if self._server is not None:
            return self
        try:
            server = _BoundedHTTPServer((self._host, self.port), self)
        except (OSError, OverflowError) as exc:  # OverflowError: port out of range
            raise ConfigError(_bind_problem(self._host, self.port, exc)) from exc
        self.port = server.server_address[1]
        self._sink = _EventSink(self._on_recording, self._on_event, self.stats,
                                thread_name=f"yeastarfs-events-dispatch:{self.port}")
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"yeastarfs-events-http:{self.port}", daemon=True)
        self._thread.start()
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
        """Accept events only from *ips* (None: from anywhere). Raises ConfigError."""
        self._allowed = _parse_allowed_ips(ips)  # one assignment: handlers see old or new

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

    def _note_rejected(self, address: str, status: int, reason: str) -> None:
        """Count a refused request, and warn about it unless a warning went out lately."""
        self.stats.add("rejected")
        held = self._reject_throttle.ready()
        if held is not None:
            log.warning("event receiver: refused a request from %s with HTTP %d: %s"
                        " (%d more refused since the last warning)",
                        address, status, redact(reason), held)


# --- TCP events -----------------------------------------------------------------------


class JsonObjectStream:
    """Incremental splitter of a byte stream into JSON objects by brace balancing.

    Braces inside strings, and escaped quotes inside strings, do not count. Objects may be
    separated by whitespace such as ``\\r\\n``, or by nothing. Other bytes between objects
    are garbage: skipped and counted in `skipped_bytes`.

    Resync: an object longer than `max_object_bytes` is discarded without being buffered
    whole (`discarded_objects`), and the stream picks up after its closing brace (or, if
    that has not come after DISCARD_LIMIT_FACTOR times the limit, wherever it then is). A
    ``{`` where JSON allows no value (not after ``:``, ``,`` or ``[``) means the object
    before it was cut short, or began with a stray ``{`` in garbage: that part is dropped
    and a new object starts at this brace. Dropped parts, and balanced objects that are not
    valid JSON, are counted in `invalid_objects`.

    Not thread-safe: one stream per connection, fed by one thread.
    """

    def __init__(self, max_object_bytes: int = MAX_OBJECT_BYTES) -> None:
        if max_object_bytes < 2:
            raise ValueError("max_object_bytes must be at least 2")
        self.max_object_bytes = max_object_bytes
        self.skipped_bytes = 0
        self.discarded_objects = 0
        self.invalid_objects = 0
        self._buf = bytearray()  # unconsumed input; inside an object it starts at its '{'
        self._pos = 0  # how much of _buf has been scanned
        self._depth = 0  # braces open outside strings; 0 between objects
        self._in_string = False
        self._discarding = False  # skipping the rest of an oversized object
        self._discarded_bytes = 0

    def feed(self, data: bytes) -> list[Any]:
        """Return the objects that *data* completes, in stream order."""
        self._buf += data
        found: list[Any] = []
        while self._buf:
            if self._depth == 0 and not self._start_object():
                break
            closed = self._scan()
            if self._discarding:
                self._skip_scanned(closed)
            elif closed:
                self._take_object(found)
            elif self._pos > self.max_object_bytes:
                self._begin_discarding()
            if not closed:
                break  # everything buffered has been scanned
        return found

    def _start_object(self) -> bool:
        """Drop what precedes the next '{', counting non-whitespace; False if there is none."""
        start = self._buf.find(b"{")
        end = len(self._buf) if start < 0 else start
        self.skipped_bytes += len(self._buf[:end].translate(None, _SEPARATORS))
        del self._buf[:end]
        if start < 0:
            return False
        self._depth, self._pos, self._in_string = 1, 1, False
        return True

    def _scan(self) -> bool:
        """Advance through the current object; True once its closing brace is passed."""
        buf = self._buf
        while True:
            pattern = _INSIDE_STRING if self._in_string else _OUTSIDE_STRING
            match = pattern.search(buf, self._pos)
            if match is None:
                self._pos = len(buf)
                return False
            i = match.start()
            char = buf[i]
            if char == ord("\\"):  # the next byte is escaped, whatever it is
                if i + 1 >= len(buf):
                    self._pos = i  # rescan the backslash once its partner arrives
                    return False
                self._pos = i + 2
                continue
            self._pos = i + 1
            if char == ord('"'):
                self._in_string = not self._in_string
            elif char == ord("{"):
                if self._discarding or self._may_open_value(i):
                    self._depth += 1
                else:
                    self._restart_at(i)
            else:
                self._depth -= 1
                if self._depth == 0:
                    return True

    def _may_open_value(self, i: int) -> bool:
        """Whether JSON allows the '{' at *i* inside the current object."""
        j = i - 1
        while self._buf[j] in _SEPARATORS:  # stops at buf[0], the object's own '{'
            j -= 1
        return self._buf[j] in b":,["

    def _restart_at(self, i: int) -> None:
        """Drop the unfinished object before *i* and start a new one at the '{' there."""
        self.invalid_objects += 1
        del self._buf[:i]
        self._depth, self._pos = 1, 1

    def _take_object(self, found: list[Any]) -> None:
        raw = bytes(self._buf[: self._pos])
        del self._buf[: self._pos]
        self._pos = 0
        if len(raw) > self.max_object_bytes:  # arrived whole, in one large chunk
            self.discarded_objects += 1
            return
        try:
            found.append(json.loads(raw))
        except (ValueError, RecursionError):
            self.invalid_objects += 1

    def _begin_discarding(self) -> None:
        self.discarded_objects += 1
        self._discarding = True
        self._discarded_bytes = 0  # the give-up budget counts from here
        del self._buf[: self._pos]
        self._pos = 0

    def _skip_scanned(self, closed: bool) -> None:
        self._discarded_bytes += self._pos
        del self._buf[: self._pos]
        self._pos = 0
        if closed:
            self._discarding = False
        elif self._discarded_bytes > DISCARD_LIMIT_FACTOR * self.max_object_bytes:
            self._discarding, self._depth, self._in_string = False, 0, False


class _SessionEnd(enum.Enum):
    FAILED = "failed"  # no connection, no usable login reply, or dropped soon after login
    REJECTED = "rejected"  # the PBX refused the username or password
    DROPPED = "dropped"  # lost after a healthy session (HEALTHY_SESSION_S)


class _LoginRejected(Exception):
    pass


def _jittered(delay_s: float) -> float:
    return delay_s * (1.0 - JITTER_FRACTION * random.random())


def _enable_keepalive(sock: socket.socket) -> None:
    """Let the kernel notice a PBX that vanished without closing (power loss, cable).

    Hours may pass without an event, so silence alone proves nothing.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
        if hasattr(socket, name):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
            except OSError:
                pass


class TcpEventClient:
    """Connects to the PBX's TCP event port (transport "TCP"), logs in with the clear-text
    password, streams events (yeastar-api.md §7.2, §12.7).

    Whenever the connection drops or the login fails, it reconnects and logs in again,
    waiting between attempts with exponential backoff and jitter; after a rejected login
    it waits ``backoff_max_s`` (5 failed logins lock the PBX for 10 minutes, §11 item 5).

    Attributes:
        stats: counters, updated by the client's threads:
            connected: logged in right now; logins: successful logins; reconnects:
            connection attempts after the first; received: JSON objects read; rejected:
            objects that were not usable events; new_cdr, duplicates, dropped,
            last_event_time: as in `EventReceiver`.

    Threading: see the module docstring. The password is never logged.
    """

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        on_recording: Callable[[Recording], None],
        *,
        version: str = "2.0.0",
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        connect_timeout_s: float = 10.0,
    ) -> None:
        for label, value in (("username", username), ("password", password), ("version", version)):
            if "\r" in value or "\n" in value:  # it would end the login block early
                raise ConfigError(f"TCP events: the {label} must not contain a line break")
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ConfigError("TCP events: need 0 < backoff_initial_s <= backoff_max_s")
        register_secret(password)
        self._address = (host, port)
        self._label = f"TCP events {host}:{port}"
        self._login_block = (f"Action: login\r\nUsername: {username}\r\nSecret: {password}\r\n"
                             f"Version: {version}\r\n\r\n").encode("utf-8")
        self._on_recording = on_recording
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._connect_timeout_s = connect_timeout_s
        self.stats = _Counters(connected=False, logins=0, reconnects=0, received=0, rejected=0,
                               new_cdr=0, duplicates=0, dropped=0, last_event_time=None)
        self._stopping = threading.Event()
        self._sock_lock = threading.Lock()
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._sink: Optional[_EventSink] = None
        self._failing = False  # a connection problem was already logged at WARNING
        self._rejection_logged = False
        self._problem_throttle = _Throttle()
        self._stream_counts = (0, 0, 0)

    def start(self) -> TcpEventClient:
        """Connect, log in and stream on a daemon thread (failures are retried there)."""
        if self._thread is not None:
            return self
        self._sink = _EventSink(self._on_recording, None, self.stats,
                                thread_name="yeastarfs-events-dispatch:tcp")
        self._thread = threading.Thread(target=self._run, name="yeastarfs-events-tcp", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the connection and stop; returns within about a second. Idempotent."""
        self._stopping.set()
        with self._sock_lock:
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked connect() or recv()
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(0.5)
        if self._sink is not None:
            self._sink.stop(timeout_s=0.4)

    def __enter__(self) -> TcpEventClient:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _run(self) -> None:
        delay_s = self._backoff_initial_s
        first = True
        while not self._stopping.is_set():
            if not first:
                self.stats.add("reconnects")
            first = False
            end = self._session()
            if end is _SessionEnd.DROPPED:
                delay_s = self._backoff_initial_s
            wait_s = self._backoff_max_s if end is _SessionEnd.REJECTED else delay_s
            if end is _SessionEnd.FAILED:
                delay_s = min(delay_s * 2, self._backoff_max_s)
            log.debug("%s: next attempt in about %.1f s", self._label, wait_s)
            self._stopping.wait(_jittered(wait_s))

    def _session(self) -> _SessionEnd:
        """Connect, log in and stream until the connection ends; say how it ended."""
        sock: Optional[socket.socket] = None
        try:
            sock = self._connect()
            leftover = self._login(sock)
            self._on_logged_in()
            started_s = time.monotonic()
            self._stream(sock, leftover)
            if not self._stopping.is_set():
                log.info("%s: connection closed by the PBX; reconnecting", self._label)
            healthy = time.monotonic() - started_s >= HEALTHY_SESSION_S
            return _SessionEnd.DROPPED if healthy else _SessionEnd.FAILED
        except _LoginRejected:
            return _SessionEnd.REJECTED
        except (OSError, ValueError) as exc:
            if not self._stopping.is_set():
                self._log_failure(exc)
            return _SessionEnd.FAILED
        finally:
            self.stats["connected"] = False
            if sock is not None:
                self._forget_socket(sock)

    def _connect(self) -> socket.socket:
        """A connected socket, registered so that stop() can abort it. Raises OSError."""
        host, port = self._address
        last_error: Optional[OSError] = None
        for family, kind, proto, _, address in socket.getaddrinfo(host, port,
                                                                  type=socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            with self._sock_lock:
                self._sock = sock
            try:
                if self._stopping.is_set():
                    raise OSError("stopping")
                sock.settimeout(self._connect_timeout_s)
                sock.connect(address)
                _enable_keepalive(sock)
                return sock
            except OSError as exc:
                last_error = exc
                self._forget_socket(sock)
        raise last_error or OSError(f"no address found for {host}")

    def _forget_socket(self, sock: socket.socket) -> None:
        with self._sock_lock:
            if self._sock is sock:
                self._sock = None
        sock.close()

    def _login(self, sock: socket.socket) -> bytes:
        """Send the login block; return the bytes that followed a Success reply.

        Raises _LoginRejected, OSError, or ValueError for a reply that is not a login reply.
        """
        sock.sendall(self._login_block)
        fields, leftover = self._read_reply_block(sock)
        response = fields.get("response", "").lower()
        if response == "success":
            return leftover
        if not response:
            raise ValueError("no 'Response:' line in the reply to the login")
        if not self._rejection_logged:
            log.error("%s: PBX rejected the TCP event login: check username/password"
                      " (reply %r; retrying every %.0f s)", self._label,
                      redact(fields.get("response", "")), self._backoff_max_s)
            self._rejection_logged = True
        raise _LoginRejected()

    def _read_reply_block(self, sock: socket.socket) -> tuple[dict[str, str], bytes]:
        """Read ``Key: value`` lines up to a blank line; return them (keys lowercased) and
        the bytes after the blank line. Raises OSError or ValueError."""
        deadline_s = time.monotonic() + self._connect_timeout_s
        buf = b""
        while (end := _BLANK_LINE.search(buf)) is None:
            if len(buf) > LOGIN_REPLY_MAX_BYTES:
                raise ValueError("reply to the login is too long; is this the event port?")
            remaining_s = deadline_s - time.monotonic()
            if remaining_s <= 0:
                raise socket.timeout("no reply to the login")
            sock.settimeout(remaining_s)
            chunk = sock.recv(LOGIN_REPLY_MAX_BYTES)
            if not chunk:
                raise ConnectionError("connection closed before the login reply")
            buf += chunk
        fields = {}
        for line in buf[: end.start()].decode("utf-8", "replace").splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        return fields, buf[end.end():]

    def _on_logged_in(self) -> None:
        self.stats.add("logins")
        self.stats["connected"] = True
        if self._failing or self._rejection_logged:
            log.info("%s: logged in again", self._label)
        else:
            log.info("%s: logged in; waiting for events", self._label)
        self._failing = self._rejection_logged = False

    def _log_failure(self, exc: BaseException) -> None:
        """Warn about the first failure in a row; later ones only at DEBUG."""
        level = logging.DEBUG if self._failing else logging.WARNING
        self._failing = True
        log.log(level, "%s: %s; retrying with backoff", self._label, redact(str(exc) or repr(exc)))

    def _stream(self, sock: socket.socket, leftover: bytes) -> None:
        """Read events until the connection ends or stop() is called."""
        stream = JsonObjectStream()
        self._stream_counts = (0, 0, 0)
        self._accept_all(stream, leftover)
        sock.settimeout(STOP_POLL_S)
        while not self._stopping.is_set():
            try:
                data = sock.recv(RECV_BYTES)
            except socket.timeout:
                continue  # no event lately; the timeout is only there to notice stop()
            if not data:
                return
            self._accept_all(stream, data)

    def _accept_all(self, stream: JsonObjectStream, data: bytes) -> None:
        for payload in stream.feed(data):
            self.stats.add("received")
            problem = _payload_problem(payload)
            if problem is None:
                assert self._sink is not None
                self._sink.accept(payload)
            else:
                self.stats.add("rejected")
                self._warn_throttled("unusable event skipped: %s", problem)
        counts = (stream.skipped_bytes, stream.discarded_objects, stream.invalid_objects)
        if counts != self._stream_counts:
            self.stats.add("rejected", sum(counts[1:]) - sum(self._stream_counts[1:]))
            self._stream_counts = counts
            self._warn_throttled("this connection has so far had %d bytes of garbage, %d"
                                 " oversized and %d invalid objects (skipped)", *counts)

    def _warn_throttled(self, message: str, *args: Any) -> None:
        held = self._problem_throttle.ready()
        if held is not None:
            log.warning("%s: " + message + " (%d more warnings held back)", self._label,
                        *args, held)
