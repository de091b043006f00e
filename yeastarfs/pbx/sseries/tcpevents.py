"""New recordings as the PBX streams them over its TCP event port (yeastar-api.md §7.2,
§12.7).

Owns:
    TcpEventClient    the client of the PBX's TCP event port (Report Method "TCP"): connect,
                      log in with the clear-text password, read events, and reconnect with
                      backoff whenever the connection or the login fails;
    JsonObjectStream  the splitter of that byte stream into JSON objects, with resync after
                      garbage, cut-short and oversized objects.

Leaves to others: what happens to a usable event (`events.EventSink`: NewCdr repeats are
dropped by ``callid``, each new `Recording` goes to ``on_recording``) and the event check,
counters and rate-limited warnings (`events`, which never imports this module); reading an
event's fields (`records`); the HTTP login whose reply says events come over TCP (`client`);
starting and stopping the client (`mount`).

Threading: between `start()` and `stop()` a `TcpEventClient` runs one connection thread,
plus the dispatch thread of its `EventSink`, which runs ``on_recording`` one event at a
time, in arrival order, so the callback must be thread-safe. `stop()` may be called from any
thread and returns within about a second. ``stats`` is updated by these threads; read it, do
not write it. A `JsonObjectStream` is not thread-safe: one per connection, fed by one thread.
"""

from __future__ import annotations

import enum
import json
import logging
import random
import re
import socket
import threading
import time
from typing import Any, Callable, Optional

from yeastarfs.errors import ConfigError, redact, register_secret
from yeastarfs.pbx.sseries.events import (MAX_BODY_BYTES, Counters, EventSink, Throttle,
                                          payload_problem)
from yeastarfs.models import Recording

log = logging.getLogger(__name__)

__all__ = ["JsonObjectStream", "TcpEventClient"]

# Largest TCP event kept; anything bigger is discarded while the stream resyncs. The same
# cap as an HTTP event's body: a NewCdr is under 1 KiB, and a decoded object can take 20
# times its JSON in memory.
MAX_OBJECT_BYTES = MAX_BODY_BYTES
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


# --- the byte stream ------------------------------------------------------------------

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


# --- the client -----------------------------------------------------------------------


class _SessionEnd(enum.Enum):
    FAILED = "failed"  # no connection, no usable login reply, or dropped soon after login
    REJECTED = "rejected"  # the PBX refused the username or password
    DROPPED = "dropped"  # lost after a healthy session (HEALTHY_SESSION_S)


class _LoginRejected(Exception):
    pass


def _jittered(delay_s: float) -> float:
    return delay_s * (1.0 - JITTER_FRACTION * random.random())


def _login_block(username: str, password: str, version: str) -> bytes:
    """The login request (§12.7). Raises ConfigError for a value that would end it early."""
    for label, value in (("username", username), ("password", password), ("version", version)):
        if "\r" in value or "\n" in value:
            raise ConfigError(f"TCP events: the {label} must not contain a line break")
    return (f"Action: login\r\nUsername: {username}\r\nSecret: {password}\r\n"
            f"Version: {version}\r\n\r\n").encode("utf-8")


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
            last_event_time: as in `events.EventReceiver`.

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
        login_block = _login_block(username, password, version)
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ConfigError("TCP events: need 0 < backoff_initial_s <= backoff_max_s")
        register_secret(password)
        self._address = (host, port)
        self._label = f"TCP events {host}:{port}"
        self._login_block = login_block
        self._on_recording = on_recording
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._connect_timeout_s = connect_timeout_s
        self.stats = Counters(connected=False, logins=0, reconnects=0, received=0, rejected=0,
                              new_cdr=0, duplicates=0, dropped=0, last_event_time=None)
        self._stopping = threading.Event()
        self._sock_lock = threading.Lock()
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._sink: Optional[EventSink] = None
        self._failing = False  # a connection problem was already logged at WARNING
        self._rejection_logged = False
        self._problem_throttle = Throttle()
        self._stream_counts = (0, 0, 0)

    def start(self) -> TcpEventClient:
        """Connect, log in and stream on a daemon thread (failures are retried there)."""
        if self._thread is not None:
            return self
        self._sink = EventSink(self._on_recording, None, self.stats,
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
        while not self._stopping.is_set():
            end = self._session()
            if end is _SessionEnd.DROPPED:
                delay_s = self._backoff_initial_s
            wait_s = self._backoff_max_s if end is _SessionEnd.REJECTED else delay_s
            if end is _SessionEnd.FAILED:
                delay_s = min(delay_s * 2, self._backoff_max_s)
            log.debug("%s: next attempt in about %.1f s", self._label, wait_s)
            if not self._stopping.wait(_jittered(wait_s)):
                self.stats.add("reconnects")

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
            problem = payload_problem(payload)
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
        self._problem_throttle.emit(log, logging.WARNING,
                                    "%s: " + message + " (%d more warnings held back)",
                                    self._label, *args)
