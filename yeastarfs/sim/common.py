"""Pieces any PBX simulator can share: observation and download-fault bookkeeping, HTTP
serving with paced audio, a clock tests can move, the failed-login lockout rule, a retrying
event pusher, an audio cache, and WebSocket framing.

What it owns: transport mechanics that are the same whatever the PBX family (how a reply is
sent, paced, cut or reset; how an IP is locked; how an event is re-sent; how a WebSocket frame
is built and parsed) and a minimal stdlib WebSocket *client* for the tests. It knows no PBX
API: each family's module (``sseries``, ``pseries``) decides what the
endpoints answer. Like every module in ``sim/`` it imports nothing outside ``yeastarfs.sim``
and the standard library.

Threading contract:

- ``SimClock``, ``AudioCache`` and ``RetryingPusher`` each guard their own state with one
  private lock, taken last (after the owning simulator's lock, if any) and never held while
  sleeping or doing I/O.
- ``LoginGuard`` has no lock: its owner calls it under the owner's lock.
- ``SimulatorBase`` creates the simulator's one ``_lock``; its methods take it briefly and
  never hold it during I/O.
- ``StreamingHandler`` runs on the HTTP server's per-connection threads; it reads
  ``bandwidth_bps`` (per chunk), ``_stopping`` and ``_count_downloaded`` from
  ``server.simulator`` and touches nothing else of it.
- The WebSocket codec functions are pure. A ``WebSocketClient`` is for one thread at a time.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import heapq
import http.client
import itertools
import json
import logging
import os
import re
import socket
import ssl
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
# Bandwidth pacing sends at most this fraction of a second's budget per chunk, so the rate
# stays smooth enough for timing tests.
PACE_SLICES_PER_S = 20
# Before an RST, give bytes already written a moment to leave the send queue: an RST
# discards whatever is still queued, and tests want "N bytes, then reset".
RST_GRACE_S = 0.05
# Polling period of background loops: bounds how long stop() waits for them.
POLL_S = 0.05
EVENT_TIMEOUT_S = 2.0
SECRET_PARAM_RE = re.compile(r"(token|random|password|secret)=[^&\s'\"]*", re.IGNORECASE)


# ---------------------------------------------------------------------------------------
# Time and lockouts


class SimClock:
    """The simulator's clock: real monotonic time plus whatever a test has advanced it by.

    Token lifetimes, lockouts, download links, idle timers and not-written-yet periods read
    ``now()``; a test moves them all at once with ``advance(seconds)`` instead of sleeping.
    The PBX's wall clock is another matter (its owner adds an offset to ``time.time()``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._advanced_s = 0.0

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        with self._lock:
            self._advanced_s += seconds

    @property
    def advanced_s(self) -> float:
        with self._lock:
            return self._advanced_s

    def now(self) -> float:
        return time.monotonic() + self.advanced_s


class LoginGuard:
    """The failed-login rule: *failures* failures from one IP within *window_s* lock it for
    *lockout_s*.

    Not thread-safe: its owner calls it under the owner's lock, passing the owner's clock time.
    """

    def __init__(self, failures: int, window_s: float, lockout_s: float) -> None:
        self.failures, self.window_s, self.lockout_s = failures, window_s, lockout_s
        self._recent: dict[str, list[float]] = {}
        self._locked_until: dict[str, float] = {}

    def is_locked(self, ip: str, now: float) -> bool:
        return self._locked_until.get(ip, float("-inf")) > now

    def note_failure(self, ip: str, now: float) -> bool:
        """Count a failed login from *ip*; True if it has just locked the IP."""
        recent = [t for t in self._recent.get(ip, []) if now - t < self.window_s]
        recent.append(now)
        if len(recent) >= self.failures:
            self._locked_until[ip] = now + self.lockout_s
            self._recent[ip] = []
            return True
        self._recent[ip] = recent
        return False

    def note_success(self, ip: str) -> None:
        self._recent.pop(ip, None)

    def lock(self, ip: str, now: float) -> None:
        self._locked_until[ip] = now + self.lockout_s

    def clear(self) -> None:
        self._recent.clear()
        self._locked_until.clear()


# ---------------------------------------------------------------------------------------
# What every simulator keeps


LOG_LIMIT = 10000
CHAOS_SHAPES = ("reset", "http500", "json", "truncate", "latency")


class SimulatorBase:
    """Observation and download-fault bookkeeping shared by the PBX simulators.

    Owns, under the one ``_lock`` its subclass uses for everything: ``counters``,
    ``requests_log``, the audio bytes sent, per-recording download counts and byte
    generations, and the consumption of the download fault switches (``fail_downloads``,
    ``fail_mode``, ``chaos``, ``reset_after_bytes``/``reset_downloads``,
    ``mutate_bytes_after_downloads``, ``range_mode``), which the subclass's
    ``_set_default_faults`` sets. A subclass provides ``start``, ``stop``, ``host``, ``port``
    and ``certfile``.
    """

    def __init__(self) -> None:
        self.counters: collections.Counter = collections.Counter()
        self.requests_log: list[dict] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._downloaded = 0
        self._download_counts: collections.Counter = collections.Counter()
        self._generations: dict[str, int] = {}  # names whose bytes changed

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"{'https' if self.certfile else 'http'}://{self.host}:{self.port}"

    @property
    def honour_range(self) -> bool:
        """Alias of ``range_mode`` for older tests: reading says ``range_mode != "ignore"``,
        True sets "honour", False "ignore"."""
        return self.range_mode != "ignore"

    @honour_range.setter
    def honour_range(self, value: bool) -> None:
        self.range_mode = "honour" if value else "ignore"

    def downloaded_bytes(self) -> int:
        """Total recording body bytes sent since start (or the last ``reset``)."""
        with self._lock:
            return self._downloaded

    def _clear_observations_locked(self) -> None:
        """What ``reset`` clears besides the switches: counters, log, bytes, download counts."""
        self.counters.clear()
        self.requests_log.clear()
        self._downloaded = 0
        self._download_counts.clear()

    def _log_request(self, endpoint: str, entry: dict) -> None:
        """Count a request to *endpoint* and keep *entry* in the (bounded) request log."""
        with self._lock:
            self.counters[endpoint] += 1
            self.requests_log.append(entry)
            if len(self.requests_log) > LOG_LIMIT:
                del self.requests_log[: len(self.requests_log) - LOG_LIMIT]

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n

    def _count_downloaded(self, n: int) -> None:
        with self._lock:
            self._downloaded += n

    def _count_download(self, name: str) -> int:
        """Count a download of *name*; the generation of bytes it gets (0 = the original)."""
        with self._lock:
            done = self._download_counts[name]
            self._download_counts[name] = done + 1
            after = self.mutate_bytes_after_downloads
            if after is not None and done >= after:
                self._generations[name] = max(1, self._generations.get(name, 0))
            return self._generations.get(name, 0)

    def _download_faults(self) -> tuple[Optional[str], Optional[int]]:
        """Consume the download fault switches: (fail_mode, a chaos shape or None;
        reset_after_bytes or None)."""
        with self._lock:
            if self.fail_downloads > 0:
                self.fail_downloads -= 1
                return self.fail_mode, None
            if self.chaos and self._chaos_rng.random() < self.chaos:
                shape = self._chaos_rng.choice(CHAOS_SHAPES)
                if shape == "reset":
                    return None, self._chaos_rng.randint(1, 200_000)
                return shape, None
            reset_at = self.reset_after_bytes
            if reset_at is not None and self.reset_downloads > 0:
                self.reset_downloads -= 1
                if self.reset_downloads == 0:
                    # The counted resets are used up; 0 must not now mean "every download".
                    self.reset_after_bytes = None
            return None, reset_at


# ---------------------------------------------------------------------------------------
# Audio


class AudioCache:
    """Recently served recording bytes, up to *limit_bytes*, least recently used dropped first.

    Rebuilding a recording's bytes is cheap but not free (milliseconds for 20 MB); readers
    of the same recording share one copy.
    """

    def __init__(self, limit_bytes: int) -> None:
        self._lock = threading.Lock()
        self._limit_bytes = limit_bytes
        self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._bytes = 0

    def get(self, key: str, build: Callable[[], bytes]) -> bytes:
        """The bytes cached under *key*, built with *build* (outside the lock) when missing."""
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                return data
        data = build()
        with self._lock:
            if key not in self._items:
                self._items[key] = data
                self._bytes += len(data)
            while self._bytes > self._limit_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)
        return data


# ---------------------------------------------------------------------------------------
# HTTP serving


@dataclasses.dataclass
class Reply:
    """What a handler sends. ``stream`` bodies are chunked, paced and counted as downloads."""

    status: int = 200
    content_type: str = "application/json"
    body: bytes = b""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    stream: Optional[memoryview] = None
    content_length: Optional[int] = None  # None: the real length of body/stream
    omit_length: bool = False  # send no Content-Length at all (the body ends at the close)
    cut_after: Optional[int] = None  # stop the body after this many bytes...
    cut_with_rst: bool = False  # ...and abort with an RST instead of a normal close
    on_done: Optional[Callable[[], None]] = None  # called once the reply is sent or has failed


def json_reply(payload: dict, status: int = 200) -> Reply:
    return Reply(status=status, body=json.dumps(payload).encode("utf-8"))


def html_reply(status: int, title: str) -> Reply:
    page = f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>\n"
    return Reply(status=status, content_type="text/html", body=page.encode("ascii"))


def parse_json_object(raw: bytes) -> Optional[dict]:
    """A request body as a dict: ``{}`` when empty, None when it is not a JSON object."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d+)\s*-\s*(\d*)\s*$")


def parse_range(header: str, size: int) -> Optional[tuple[int, int]]:
    """(first, last) of a single ``bytes=N-[M]`` range; None to ignore it; (-1, -1) for 416."""
    match = RANGE_RE.match(header)
    if match is None:
        return None
    first = int(match.group(1))
    if first >= size:
        return (-1, -1)
    last = int(match.group(2)) if match.group(2) else size - 1
    return None if last < first else (first, min(last, size - 1))


RANGE_MODES = ("ignore", "honour", "wrong_offset")


def audio_reply(data: memoryview, range_header: Optional[str], *, range_mode: str,
                announced_size: Optional[int], content_type: str, omit_length: bool) -> Reply:
    """The recording body as the Range switches say.

    *range_mode*: "ignore" (200, whole file) | "honour" (206 + Content-Range for
    ``bytes=N-[M]``, 416 past the end) | "wrong_offset" (206 starting elsewhere: at N // 2,
    or at 1 when N is 0, its Content-Range saying so truthfully). *announced_size*: announce
    this size (Content-Length, Content-Range total) while sending the real bytes.
    """
    size, total = len(data), len(data) if announced_size is None else announced_size
    audio = {"content_type": content_type, "omit_length": omit_length}
    if range_mode not in RANGE_MODES:
        log.warning("simulator: unknown range_mode %r, ignoring Range", range_mode)
    wanted = None
    if range_mode in ("honour", "wrong_offset") and range_header:
        wanted = parse_range(range_header, size)
    if wanted is None:
        return Reply(stream=data, content_length=announced_size, **audio)
    first, last = wanted
    if first < 0:
        reply = html_reply(416, "416 Requested Range Not Satisfiable")
        reply.headers["Content-Range"] = f"bytes */{total}"
        return reply
    if range_mode == "wrong_offset":
        first = first // 2 if first else min(1, last)
    # An announced size stretches the range to its end; the real bytes still stop at last.
    shown_last, length = (last, None) if announced_size is None else (total - 1, total - first)
    return Reply(status=206, stream=data[first:last + 1], content_length=length,
                 headers={"Content-Range": f"bytes {first}-{shown_last}/{total}"}, **audio)


class SimHttpServer(ThreadingHTTPServer):
    """One daemon thread per connection; refuses connections while the simulator says so."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 64
    simulator: Any

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # PBX down / firewall: the caller sees its connection closed without a reply.
        if self.simulator.refuse_connections:
            self.simulator._count("refused")
            return False
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout, ssl.SSLError)):
            log.debug("simulator: client %s went away: %s", client_address[0], exc)
        else:
            log.exception("simulator: request from %s failed", client_address[0])


def serve_http(simulator: Any, handler: type, host: str, port: int, certfile: Optional[str],
               keyfile: Optional[str]) -> tuple[SimHttpServer, threading.Thread]:
    """Bind *handler* on (host, port), HTTPS when *certfile* is given; serve on a daemon thread."""
    server = SimHttpServer((host, port), handler)
    server.simulator = simulator
    if certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile)
        # The handshake happens on the handler thread's first read, not in accept().
        server.socket = context.wrap_socket(server.socket, server_side=True,
                                            do_handshake_on_connect=False)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": POLL_S},
                              name="pbxsim-http", daemon=True)
    thread.start()
    return server, thread


class StreamingHandler(BaseHTTPRequestHandler):
    """Sends ``Reply`` objects; stream bodies are paced by ``bandwidth_bps`` and may be cut.

    Subclasses add ``do_GET``/``do_POST`` and set ``common_headers`` (sent on every reply).
    From ``server.simulator`` it reads ``bandwidth_bps`` (per chunk), ``first_byte_delay_s``,
    ``pbx_time()`` (the Date header: the PBX's own clock), ``_stopping`` and
    ``_count_downloaded``.
    """

    protocol_version = "HTTP/1.1"
    timeout = 30  # a stuck client must not hold a thread forever
    common_headers: tuple[tuple[str, str], ...] = (("Connection", "close"),)
    server: SimHttpServer

    def date_time_string(self, timestamp: Optional[float] = None) -> str:
        # send_response's Date header: the PBX's own (possibly skewed) clock, in GMT.
        if timestamp is None:
            timestamp = self.server.simulator.pbx_time()
        return super().date_time_string(timestamp)

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        # The query string carries tokens: log the path only.
        log.debug("simulator: %s %s -> %s", self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:
        # http.server's own messages may quote the raw request line, query included.
        log.debug("simulator: %s", SECRET_PARAM_RE.sub(r"\1=***", format % args))

    def read_body(self, limit_bytes: int) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        return self.rfile.read(min(length, limit_bytes)) if length > 0 else b""

    def send_reply(self, reply: Reply) -> None:
        """Send *reply*; a client that goes away mid-reply only ends this connection."""
        try:
            self._send(reply)
        except (ConnectionError, socket.timeout, ssl.SSLError) as exc:
            log.debug("simulator: client went away mid-reply: %s", exc)
            self.close_connection = True
        finally:
            if reply.on_done is not None:
                reply.on_done()

    def _send(self, reply: Reply) -> None:
        source = reply.stream if reply.stream is not None else reply.body
        length = len(source) if reply.content_length is None else reply.content_length
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        if not reply.omit_length:
            self.send_header("Content-Length", str(length))
        for name, value in self.common_headers + tuple(reply.headers.items()):
            self.send_header(name, value)
        self.end_headers()  # writes the headers out: wfile is unbuffered
        delay = self.server.simulator.first_byte_delay_s
        if delay > 0:
            self.server.simulator._stopping.wait(delay)
        if reply.stream is None:
            self.wfile.write(reply.body)
        else:
            self._stream(reply)

    # The body loop re-reads bandwidth_bps for every chunk, so a test may change the cap
    # mid-transfer. Pacing keeps a "next send time"; if the cap was lifted or the client
    # stalled us, the schedule restarts from now instead of bursting to catch up.
    def _stream(self, reply: Reply) -> None:
        sim = self.server.simulator
        data = reply.stream
        limit = len(data) if reply.cut_after is None else min(len(data), reply.cut_after)
        sent, next_send = 0, time.monotonic()
        while sent < limit and not sim._stopping.is_set():
            bps = sim.bandwidth_bps
            size = CHUNK_BYTES if not bps else max(1, min(CHUNK_BYTES, bps // PACE_SLICES_PER_S))
            piece = data[sent:min(limit, sent + size)]
            # Counted before the write so a client that has read the whole body already
            # sees the final figure; taken back if the write fails.
            sim._count_downloaded(len(piece))
            try:
                self.wfile.write(piece)
            except OSError:
                sim._count_downloaded(-len(piece))
                raise
            sent += len(piece)
            if bps and sent < limit:
                next_send = max(next_send, time.monotonic() - 0.5) + len(piece) / bps
                delay = next_send - time.monotonic()
                if delay > 0:
                    sim._stopping.wait(delay)
        if reply.cut_with_rst or sent < limit:
            self._abort_connection()

    def _abort_connection(self) -> None:
        """End the connection with an RST (SO_LINGER 0) instead of an orderly close."""
        time.sleep(RST_GRACE_S)
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The socket really closes once rfile (a makefile reference) is closed in finish().
        self.connection.close()
        self.close_connection = True


# ---------------------------------------------------------------------------------------
# Events pushed over HTTP


class RetryingPusher:
    """Delivers jobs on one thread in submission order, re-trying each until it succeeds.

    *deliver(job)* returns True when the job is done (delivered, or no longer wanted). A job
    that is not done is tried again up to *resends* more times, *retry_s()* seconds apart.
    Jobs live in a heap ordered by (due, sequence).
    """

    def __init__(self, deliver: Callable[[Any], bool], retry_s: Callable[[], float],
                 resends: int, name: str) -> None:
        self._deliver, self._retry_s, self._resends = deliver, retry_s, resends
        self._cond = threading.Condition()
        self._heap: list[tuple] = []
        self._sequence = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=0.5)

    def submit(self, job: Any) -> None:
        self._schedule(time.monotonic(), job, 0)

    def _schedule(self, due: float, job: Any, attempt: int) -> None:
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._sequence), job, attempt))
            self._cond.notify_all()

    def _next_job(self) -> Optional[tuple]:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                if self._heap and self._heap[0][0] <= now:
                    return heapq.heappop(self._heap)
                self._cond.wait(self._heap[0][0] - now if self._heap else None)
            return None

    def _run(self) -> None:
        while True:
            entry = self._next_job()
            if entry is None:
                return
            _, _, job, attempt = entry
            if not self._deliver(job) and attempt < self._resends:
                self._schedule(time.monotonic() + self._retry_s(), job, attempt + 1)


def post_json(url: str, body: bytes, headers: dict[str, str],
              timeout_s: float = EVENT_TIMEOUT_S) -> Optional[int]:
    """POST *body* to *url* (http or https, certificates not checked); the status, or None."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        # A PBX pushing to a receiver with a self-signed certificate: the tests' case.
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout_s,
            context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("POST", path, body=body, headers={**headers,
                                                       "Content-Length": str(len(body))})
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException, ValueError) as exc:
        log.debug("simulator: event POST to %s failed: %s", parts.hostname, exc)
        return None
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------
# WebSocket (RFC 6455) framing, shared by the server side and the test client

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)
KNOWN_OPCODES = (OP_CONTINUATION, OP_TEXT, OP_BINARY) + CONTROL_OPCODES
WS_MAX_FRAME_BYTES = 1024 * 1024
# Close status codes (RFC 6455 §7.4.1).
CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_PROTOCOL_ERROR, CLOSE_POLICY = 1000, 1001, 1002, 1008


class WebSocketError(Exception):
    """A peer broke the framing rules (the connection must be closed with 1002)."""


@dataclasses.dataclass(frozen=True)
class Frame:
    fin: bool
    opcode: int
    payload: bytes
    masked: bool


def ws_accept(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value answering ``Sec-WebSocket-Key`` *key*."""
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode("ascii")).digest()).decode()


def ws_key_is_valid(key: str) -> bool:
    """A client key must be the base64 of 16 bytes."""
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (ValueError, UnicodeEncodeError):
        return False


def encode_frame(opcode: int, payload: bytes = b"", *, mask: bool, fin: bool = True) -> bytes:
    """One frame; clients must mask (*mask* True), servers must not."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", (0x80 if fin else 0) | opcode, (0x80 if mask else 0) | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", (0x80 if fin else 0) | opcode, (0x80 if mask else 0) | 126,
                             length)
    else:
        header = struct.pack("!BBQ", (0x80 if fin else 0) | opcode, (0x80 if mask else 0) | 127,
                             length)
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + _apply_mask(payload, key)


def decode_frame(buffer: bytes) -> Optional[tuple[Frame, int]]:
    """The first frame in *buffer* and its length in bytes, or None while it is incomplete.

    Raises WebSocketError for reserved bits, unknown opcodes, bad control frames and frames
    larger than WS_MAX_FRAME_BYTES.
    """
    if len(buffer) < 2:
        return None
    first, second = buffer[0], buffer[1]
    fin, opcode = bool(first & 0x80), first & 0x0F
    masked, length = bool(second & 0x80), second & 0x7F
    if first & 0x70:
        raise WebSocketError("reserved bits set")
    if opcode not in KNOWN_OPCODES:
        raise WebSocketError(f"unknown opcode {opcode:#x}")
    offset = 2
    if length == 126:
        if len(buffer) < 4:
            return None
        (length,), offset = struct.unpack_from("!H", buffer, 2), 4
    elif length == 127:
        if len(buffer) < 10:
            return None
        (length,), offset = struct.unpack_from("!Q", buffer, 2), 10
    if opcode in CONTROL_OPCODES and (length > 125 or not fin):
        raise WebSocketError("control frames are short and never fragmented")
    if length > WS_MAX_FRAME_BYTES:
        raise WebSocketError(f"frame of {length} bytes is too large")
    key = b""
    if masked:
        if len(buffer) < offset + 4:
            return None
        key, offset = buffer[offset:offset + 4], offset + 4
    if len(buffer) < offset + length:
        return None
    payload = buffer[offset:offset + length]
    if masked:
        payload = _apply_mask(payload, key)
    return Frame(fin, opcode, bytes(payload), masked), offset + length


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode("utf-8")[:123]


def parse_close(payload: bytes) -> tuple[Optional[int], str]:
    """(status code or None, reason) of a close frame's payload."""
    if len(payload) < 2:
        return None, ""
    return struct.unpack_from("!H", payload)[0], payload[2:].decode("utf-8", "replace")


def _apply_mask(data: bytes, key: bytes) -> bytes:
    # XOR as one big integer: fast enough for any frame this project sends.
    if not data:
        return b""
    repeated = (key * (len(data) // 4 + 1))[:len(data)]
    value = int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")
    return value.to_bytes(len(data), "big")


class WebSocketHandshakeError(Exception):
    """The server did not switch protocols; *status* and *body* say what it answered."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"WebSocket handshake answered HTTP {status}")
        self.status, self.body = status, body


class WebSocketClosed(Exception):
    """The connection ended without a close frame (or after one was read)."""


class WebSocketClient:
    """A minimal RFC 6455 client over one socket (tests only): handshake, masked frames.

    ``recv`` returns every frame as it comes (pings are not answered automatically, so a
    test sees exactly what the server sends). Not thread-safe.
    """

    def __init__(self, url: str, *, headers: Optional[dict[str, str]] = None,
                 ssl_context: Optional[ssl.SSLContext] = None, timeout_s: float = 5.0) -> None:
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        sock = socket.create_connection((parts.hostname, port), timeout=timeout_s)
        if secure:
            context = ssl_context or ssl._create_unverified_context()
            sock = context.wrap_socket(sock, server_hostname=parts.hostname)
        self.sock: socket.socket = sock
        self._buffer = b""
        self.response_headers: dict[str, str] = {}
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [f"GET {target} HTTP/1.1", f"Host: {parts.hostname}:{port}",
                 "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        try:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            status = self._read_response_head()
            if status != 101:
                raise WebSocketHandshakeError(status, self._read_response_body())
            if self.response_headers.get("sec-websocket-accept") != ws_accept(key):
                raise WebSocketHandshakeError(status, b"wrong Sec-WebSocket-Accept")
        except BaseException:
            sock.close()
            raise

    def _read_response_head(self) -> int:
        while b"\r\n\r\n" not in self._buffer:
            self._fill()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        for line in header_lines:
            name, _, value = line.partition(":")
            self.response_headers[name.strip().lower()] = value.strip()
        return int(status_line.split()[1])

    def _read_response_body(self) -> bytes:
        length = int(self.response_headers.get("content-length", "0") or 0)
        try:
            while len(self._buffer) < length:
                self._fill()
        except WebSocketClosed:
            pass
        return self._buffer[:length]

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise WebSocketClosed("connection closed by the server")
        self._buffer += data

    def send_frame(self, opcode: int, payload: bytes = b"", *, fin: bool = True,
                   mask: bool = True) -> None:
        self.sock.sendall(encode_frame(opcode, payload, mask=mask, fin=fin))

    def send_text(self, text: str) -> None:
        self.send_frame(OP_TEXT, text.encode("utf-8"))

    def send_json(self, value: Any) -> None:
        self.send_text(json.dumps(value))

    def ping(self, payload: bytes = b"") -> None:
        self.send_frame(OP_PING, payload)

    def recv(self, timeout_s: Optional[float] = None) -> Frame:
        """The next frame. Raises WebSocketClosed at EOF, socket.timeout after *timeout_s*."""
        if timeout_s is not None:
            self.sock.settimeout(timeout_s)
        while True:
            decoded = decode_frame(self._buffer)
            if decoded is not None:
                frame, used = decoded
                self._buffer = self._buffer[used:]
                return frame
            self._fill()

    def recv_text(self, timeout_s: Optional[float] = None) -> str:
        """The next text frame's payload; raises AssertionError for any other frame."""
        frame = self.recv(timeout_s)
        if frame.opcode != OP_TEXT:
            raise AssertionError(f"expected a text frame, got opcode {frame.opcode:#x}")
        return frame.payload.decode("utf-8")

    def close(self, code: int = CLOSE_NORMAL) -> None:
        try:
            self.send_frame(OP_CLOSE, close_payload(code))
        except OSError:
            pass
        self.sock.close()
