"""New recordings as the PBX pushes them over HTTP (yeastar-api.md §7.1, §12.6), and what
both event transports share.

Owns:
    EventReceiver    the HTTP server the PBX POSTs events to (Report Method "HTTP"); it
                     refuses unwanted sources, malformed requests and floods;
    EventSink        what a transport does with a usable event: drop NewCdr repeats by
                     ``callid`` (the PBX re-sends an event until it gets a 200), then hand
                     each new `Recording` to ``on_recording``;
    payload_problem, Counters, Throttle
                     the event check, statistics and rate-limited warnings of both transports.

Leaves to others: the PBX's TCP event port (`tcpevents`, which imports this module; never
the reverse); reading an event's fields and the PBX's misspellings (`records`); where a
recording goes (the callback; in practice the index); the HTTP login that tells the PBX
where to send events (`client`); CDR polling as a fallback (`cdrsync`); starting and stopping
the transports (`mount`).

Threading: `EventReceiver` runs on daemon threads between `start()` and `stop()`, and
`stop()` returns within about a second: one accept thread, plus at most
`max_handler_threads` short-lived handler threads, one per connection. Each transport also
has one `EventSink` whose dispatch thread runs the callbacks one at a time, in arrival
order, fed by a bounded queue: a slow callback never delays a reply to the PBX, but the
callbacks run on that thread, not the caller's, so they must be thread-safe. A callback that
raises is logged and the next event is still delivered. ``stats`` is updated by these
threads; read it, do not write it. `Counters`, `Throttle` and `EventSink.accept` may be used
from any thread.
"""

from __future__ import annotations

import collections
import errno
import http
import ipaddress
import json
import logging
import queue
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Collection, Optional

from yeastarfs.errors import ConfigError, redact
from yeastarfs.models import Recording
from yeastarfs.pbx.sseries.records import event_name, recording_from_event

log = logging.getLogger(__name__)

__all__ = ["Counters", "EventReceiver", "EventSink", "Throttle", "payload_problem"]

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

_BUSY_REPLY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n\r\n"
)


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


def payload_problem(payload: Any) -> Optional[str]:
    """Why *payload* is not a usable event, or None.

    Only the fields the transports rely on are checked; `records` copes with the others.
    A number as ``recording`` is refused here because `records` would turn it into a name.
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


class EventSink:
    """What both transports do with a usable event: note it, drop NewCdr repeats, and run
    the callbacks on one dispatch thread (started at once), in arrival order.

    `accept` never blocks: when the queue is full the event is dropped and counted.
    """

    def __init__(
        self,
        on_recording: Callable[[Recording], None],
        on_event: Optional[Callable[[dict], None]],
        stats: Counters,
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
        try:
            self._queue.put_nowait((payload, recording))
        except queue.Full:
            self._stats.add("dropped")
            if key is not None:
                self._recent.discard(key)  # so that a re-send is not taken for a repeat
            self._drop_throttle.emit(
                log, logging.WARNING, "event dispatch: queue full (%d events), callbacks too"
                " slow; event dropped (%d more dropped since the last warning)", MAX_QUEUED_EVENTS)

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
                self._error_throttle.emit(
                    log, logging.ERROR, "event dispatch: callback %s failed (%d more failures"
                    " since the last report)", getattr(callback, "__qualname__", callback),
                    exc_info=True)


# --- the HTTP receiver ----------------------------------------------------------------
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
    problem = payload_problem(payload)
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
        body = self._read_body()
        if body is None:
            return  # refused
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

    def _read_body(self) -> Optional[bytes]:
        """The body of a request that may be read; None once the request has been refused."""
        receiver = self.server.receiver
        length = self._content_length()
        if not receiver._is_allowed(self.client_address[0]):
            self._refuse(403, "source address not in allowed_ips", unread_bytes=length or 0)
        elif length is None:
            self._refuse(411, "no Content-Length")
        elif length < 0:
            self._refuse(400, "unreadable Content-Length")
        elif length > receiver.max_body_bytes:
            self._refuse(413, f"body of {length} bytes is over the limit of"
                              f" {receiver.max_body_bytes}", unread_bytes=length)
        else:
            body = self.rfile.read(length)  # bounded by max_body_bytes, each read by the timeout
            if len(body) == length:
                return body
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
        self.stats = Counters(received=0, new_cdr=0, duplicates=0, rejected=0, dropped=0,
                              last_event_time=None)
        self._reject_throttle = Throttle()
        self._server: Optional[_BoundedHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._sink: Optional[EventSink] = None

    def start(self) -> EventReceiver:
        """Bind and serve on a daemon thread. Raises ConfigError if the port cannot be used."""
        if self._server is not None:
            return self
        try:
            server = _BoundedHTTPServer((self._host, self.port), self)
        except (OSError, OverflowError) as exc:  # OverflowError: port out of range
            raise ConfigError(_bind_problem(self._host, self.port, exc)) from exc
        self.port = server.server_address[1]
        self._sink = EventSink(self._on_recording, self._on_event, self.stats,
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
        self._reject_throttle.emit(
            log, logging.WARNING, "event receiver: refused a request from %s with HTTP %d: %s"
            " (%d more refused since the last warning)", address, status, redact(reason))
