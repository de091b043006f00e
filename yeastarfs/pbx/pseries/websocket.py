"""New recordings as the P-Series pushes them over its WebSocket (yeastar-p-series-api.md,
"Events"; the simulator's contract, point 8, for what the guide leaves open).

Owns:
    EventSubscription  one thread that connects to ``/openapi/v1.0/subscribe?access_token=…``,
                       subscribes to 30012 (New CDR), sends the text ``heartbeat`` every
                       ``HEARTBEAT_INTERVAL_S`` (the PBX drops a connection silent for 60 s),
                       and reconnects, with backoff, whenever the connection drops, goes
                       silent or is closed; after every token renewal it subscribes again
                       with the new token *before* closing the old connection, so that no
                       event falls in between. Events announced while no connection is
                       subscribed are lost, as on a real PBX: the catalogue's next poll finds
                       their recordings.
    WebSocket          a small RFC 6455 client on the standard library: handshake, masked
                       frames, pings answered, fragments reassembled, every frame and message
                       bounded. It is ours rather than the ``websocket-client`` package's so
                       that ``--pin-sha256`` is checked on the TLS handshake *before* the
                       upgrade request carries the token, with the same ``--ca-file``,
                       ``--insecure`` and ``--proxy`` (HTTP CONNECT) rules and our timeouts.

Leaves to others: what an event means and the strict decoding of its ``msg`` (``records``),
deduplication and dispatch (`events.EventSink`), the token (`client.PSeriesClient`: this
module asks it for a valid token and tells it when the PBX refused one).

Threading: one daemon thread between `start` and `stop` owns the socket; the dispatch
thread of its `EventSink` runs ``on_recording``. `stop` may be called from any thread and
returns within about a second. ``stats`` is updated by these threads; read it only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import socket
import ssl
import struct
import threading
import time
import urllib.parse
import urllib.request
from typing import Callable, Optional, Union

from yeastarfs import errors
from yeastarfs.models import Recording
from yeastarfs.pbx.events import MAX_BODY_BYTES, Counters, EventFormat, EventSink, Throttle
from yeastarfs.pbx.pseries.client import TOKEN_ERRCODES, TOKEN_MESSAGES, USER_AGENT, PSeriesClient
from yeastarfs.pbx.pseries.records import TOPIC_NEW_CDR

log = logging.getLogger(__name__)

# The PBX drops a connection silent for 60 s: three heartbeats in that time.
HEARTBEAT_INTERVAL_S = 20.0
# Nothing heard for this long (a heartbeat is answered at once) means the connection is dead.
SILENCE_LIMIT_S = 3 * HEARTBEAT_INTERVAL_S + 5.0
# How often a waiting read wakes to send a heartbeat or notice `stop` and renewals.
RECV_POLL_S = 0.25
# After a renewal, the old connection is read this long for events sent before the new one
# was subscribed.
DRAIN_S = 0.2
CONNECT_TIMEOUT_S = 10.0
HANDSHAKE_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 8192
# A New CDR is under 1 KiB; the same cap as an event pushed over HTTP.
MAX_MESSAGE_BYTES = MAX_BODY_BYTES
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 60.0
# A session that lasted this long proves the PBX healthy, so the backoff starts over.
HEALTHY_SESSION_S = 30.0
JITTER_FRACTION = 0.25
# A subscription ended for its token is renewed at once, unless the one before it was too and
# lasted less than this (then the backoff applies).
QUICK_AGAIN_AFTER_S = 1.0
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG, CLOSE_POLICY = 1000, 1002, 1009, 1008


class Closed(Exception):
    """The connection ended: a close frame (*code*, *reason*) or a drop (code None)."""

    def __init__(self, code: Optional[int], reason: str = "") -> None:
        super().__init__(f"closed ({code or 'dropped'}{': ' + reason if reason else ''})")
        self.code, self.reason = code, reason


class ProtocolError(Exception):
    """The server broke RFC 6455 (or our bounds); the connection is closed with 1002/1009."""

    def __init__(self, message: str, code: int = CLOSE_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class HandshakeRefused(errors.PbxUnavailableError):
    """The PBX answered the upgrade with something else; *token_refused* when it was the token."""

    def __init__(self, message: str, token_refused: bool = False) -> None:
        super().__init__(message)
        self.token_refused = token_refused


# -- the connection ----------------------------------------------------------------------------


def tls_context(verify: Union[bool, str], pinned: bool) -> ssl.SSLContext:
    """The context for ``wss``: the same trust as the HTTP session's (see transport.py)."""
    if pinned or verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # pinned: the fingerprint is checked instead
        return context
    return ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)


def proxy_for(url: str, proxy: Optional[str]) -> Optional[tuple[str, int, Optional[str]]]:
    """(host, port, Proxy-Authorization) of the HTTP proxy to tunnel *url* through, or None.

    Raises ConfigError for a proxy a CONNECT tunnel cannot use (SOCKS, or an https:// one).
    """
    if proxy == "environment":
        host = urllib.parse.urlsplit(url).hostname or ""
        if urllib.request.proxy_bypass(host):
            return None
        found = urllib.request.getproxies()
        proxy = found.get("https" if url.startswith("wss:") else "http") or found.get("all")
    if not proxy:
        return None
    parts = urllib.parse.urlsplit(proxy)
    if parts.scheme != "http" or not parts.hostname:
        raise errors.ConfigError(f"WebSocket events cannot go through the proxy {parts.scheme}://{parts.hostname}"
                                 " (only http:// proxies tunnel them); polling still finds every recording")
    auth = None
    if parts.username is not None:
        user_pass = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(user_pass.encode()).decode()
        errors.register_secret(auth.split(" ", 1)[1])
    return parts.hostname, parts.port or 80, auth


class WebSocket:
    """One client connection (RFC 6455), opened by `connect`. For one thread at a time."""

    def __init__(self, sock: socket.socket, buffered: bytes = b"") -> None:
        self._sock = sock
        self._buffer = bytearray(buffered)
        self._fragments: Optional[list[bytes]] = None
        self._fragment_opcode = OP_TEXT

    @classmethod
    def connect(cls, url: str, *, verify: Union[bool, str] = True, pin_sha256: Optional[str] = None,
                proxy: Optional[str] = None, headers: Optional[dict] = None) -> "WebSocket":
        """Open *url* (ws or wss). Raises PbxUnavailableError (HandshakeRefused when the
        PBX answered with something other than 101), ConfigError for an unusable proxy."""
        parts = urllib.parse.urlsplit(url)
        secure = parts.scheme == "wss"
        host, port = parts.hostname or "", parts.port or (443 if secure else 80)
        tunnel = proxy_for(url, proxy)
        try:
            sock = socket.create_connection(tunnel[:2] if tunnel else (host, port), timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            raise errors.PbxUnavailableError(f"cannot reach {host}:{port} for events: {exc}") from None
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            if tunnel:
                _open_tunnel(sock, host, port, tunnel[2])
            if secure:
                sock = _secure(sock, host, verify, pin_sha256)
            return cls._upgrade(sock, host, port, parts, headers or {})
        except BaseException:
            sock.close()
            raise

    @classmethod
    def _upgrade(cls, sock: socket.socket, host: str, port: int, parts: urllib.parse.SplitResult,
                 headers: dict) -> "WebSocket":
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        try:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            status, fields, rest = _read_head(sock)
        except OSError as exc:
            raise errors.PbxUnavailableError(f"WebSocket handshake failed: {exc}") from None
        if status != 101:
            raise _refusal(status, fields, rest, sock)
        expected = base64.b64encode(hashlib.sha1((key + WS_GUID).encode("ascii")).digest()).decode()
        if fields.get("sec-websocket-accept") != expected:
            raise errors.PbxUnavailableError("WebSocket handshake: wrong Sec-WebSocket-Accept")
        return cls(sock, rest)

    def send_text(self, text: str) -> None:
        self._send(OP_TEXT, text.encode("utf-8"))

    def _send(self, opcode: int, payload: bytes) -> None:
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        self._sock.settimeout(HANDSHAKE_TIMEOUT_S)  # a frame cut by a timeout would corrupt the stream
        self._sock.sendall(header + mask + masked)

    def receive(self, timeout_s: float) -> Optional[tuple[int, bytes]]:
        """The next whole message as (OP_TEXT or OP_BINARY, payload), or None when nothing
        came within *timeout_s*. Pings are answered here. Raises Closed, ProtocolError, OSError."""
        deadline = time.monotonic() + timeout_s
        while True:
            frame = self._next_frame()
            if frame is not None:
                message = self._message(*frame)
                if message is not None:
                    return message
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except (socket.timeout, ssl.SSLWantReadError):
                return None
            if not data:
                raise Closed(None)
            self._buffer += data

    def _next_frame(self) -> Optional[tuple[bool, int, bytes]]:
        """(fin, opcode, payload) of the first whole frame buffered, removed from the buffer."""
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        fin, opcode, masked, length = bool(buffer[0] & 0x80), buffer[0] & 0x0F, bool(buffer[1] & 0x80), buffer[1] & 0x7F
        if buffer[0] & 0x70 or masked:
            raise ProtocolError("reserved bits or a masked frame from the server")
        offset = 2
        if length == 126:
            if len(buffer) < 4:
                return None
            length, offset = struct.unpack_from("!H", buffer, 2)[0], 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            length, offset = struct.unpack_from("!Q", buffer, 2)[0], 10
        if opcode >= OP_CLOSE and (length > 125 or not fin):
            raise ProtocolError("a control frame that is long or fragmented")
        if length > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"a frame of {length} bytes", CLOSE_TOO_BIG)
        if len(buffer) < offset + length:
            return None
        payload = bytes(buffer[offset:offset + length])
        del buffer[:offset + length]
        return fin, opcode, payload

    def _message(self, fin: bool, opcode: int, payload: bytes) -> Optional[tuple[int, bytes]]:
        if opcode == OP_PING:
            self._send(OP_PONG, payload)
            return None
        if opcode == OP_PONG:
            return None
        if opcode == OP_CLOSE:
            code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else None
            reason = payload[2:].decode("utf-8", "replace")
            self.close(code or CLOSE_NORMAL)
            raise Closed(code, reason)
        if opcode not in (OP_CONTINUATION, OP_TEXT, OP_BINARY):
            raise ProtocolError(f"unknown opcode {opcode:#x}")
        if opcode == OP_CONTINUATION:
            if self._fragments is None:
                raise ProtocolError("a continuation without a message")
            self._fragments.append(payload)
        elif self._fragments is not None:
            raise ProtocolError("a new message inside a fragmented one")
        else:
            self._fragments, self._fragment_opcode = [payload], opcode
        if sum(map(len, self._fragments)) > MAX_MESSAGE_BYTES:
            raise ProtocolError("a message over the size limit", CLOSE_TOO_BIG)
        if not fin:
            return None
        parts, self._fragments = self._fragments, None
        return self._fragment_opcode, b"".join(parts)

    def close(self, code: int = CLOSE_NORMAL) -> None:
        """Send a close frame (best effort) and close the socket; safe to call again."""
        try:
            self._send(OP_CLOSE, struct.pack("!H", code))
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass


def _open_tunnel(sock: socket.socket, host: str, port: int, auth: Optional[str]) -> None:
    lines = [f"CONNECT {host}:{port} HTTP/1.1", f"Host: {host}:{port}"]
    if auth:
        lines.append(f"Proxy-Authorization: {auth}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    status, _, _ = _read_head(sock)
    if status != 200:
        raise errors.PbxUnavailableError(f"the proxy refused a tunnel to {host}:{port} (HTTP {status})")


def _secure(sock: socket.socket, host: str, verify: Union[bool, str], pin_sha256: Optional[str]) -> ssl.SSLSocket:
    """TLS on *sock*; with a pin, the certificate's fingerprint is compared before anything is sent."""
    try:
        secured = tls_context(verify, bool(pin_sha256)).wrap_socket(sock, server_hostname=host)
    except (ssl.SSLError, ssl.CertificateError) as exc:
        raise errors.PbxUnavailableError(f"TLS verification of {host} failed for events ({exc})") from None
    except OSError as exc:
        raise errors.PbxUnavailableError(f"TLS handshake with {host} failed for events: {exc}") from None
    if pin_sha256:
        seen = hashlib.sha256(secured.getpeercert(binary_form=True) or b"").hexdigest()
        if seen != pin_sha256.replace(":", "").lower():
            secured.close()
            raise errors.PbxUnavailableError(f"the certificate of {host} does not match --pin-sha256 (events)")
    return secured


def _read_head(sock: socket.socket) -> tuple[int, dict, bytes]:
    """(status, lower-cased header fields, bytes after the head) of an HTTP response head."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD_BYTES:
            raise errors.PbxUnavailableError("an HTTP response head over 8 KiB")
        chunk = sock.recv(4096)
        if not chunk:
            raise errors.PbxUnavailableError("the connection closed during the handshake")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(status_line.split()[1])
    except (IndexError, ValueError):
        raise errors.PbxUnavailableError("an unreadable HTTP status line") from None
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return status, fields, rest


def _refusal(status: int, fields: dict, rest: bytes, sock: socket.socket) -> HandshakeRefused:
    """What the PBX said instead of switching protocols (a JSON error, per the contract)."""
    try:
        length = min(int(fields.get("content-length", "0") or 0), MAX_HEAD_BYTES)
        while len(rest) < length:
            chunk = sock.recv(4096)
            if not chunk:
                break
            rest += chunk
        reply = json.loads(rest[:length].decode("utf-8", "replace")) if length else None
    except (OSError, ValueError, RecursionError):
        reply = None
    if not isinstance(reply, dict):
        return HandshakeRefused(f"the PBX refused the event subscription (HTTP {status})")
    errcode, message = reply.get("errcode"), str(reply.get("errmsg", ""))[:100]
    token_refused = errcode in TOKEN_ERRCODES or any(words in message.upper() for words in TOKEN_MESSAGES)
    return HandshakeRefused(f"the PBX refused the event subscription (errcode {errcode} {message})", token_refused)


# -- the subscription --------------------------------------------------------------------------


class EventSubscription:
    """New CDR events over the PBX's WebSocket, on a thread of its own.

    Attributes:
        stats: received (event messages), new_cdr / duplicates (New CDRs seen first / again),
            rejected (unusable messages), dropped (dispatch queue full), connections (opened),
            subscriptions (acknowledged), last_event_time; connected (bool).

    Multithreading: see the module docstring.
    """

    def __init__(self, client: PSeriesClient, on_recording: Callable[[Recording], None], event_format: EventFormat,
                 *, verify: Union[bool, str] = True, pin_sha256: Optional[str] = None,
                 proxy: Optional[str] = None, on_event: Optional[Callable[[dict], None]] = None) -> None:
        self._client = client
        self._on_recording = on_recording
        self._on_event = on_event
        self._format = event_format
        self._tls = {"verify": verify, "pin_sha256": pin_sha256, "proxy": proxy}
        self.stats = Counters(received=0, new_cdr=0, duplicates=0, rejected=0, dropped=0, connections=0,
                              subscriptions=0, last_event_time=None, connected=False)
        self._stop = threading.Event()
        self._renewed = threading.Event()
        self._warn = Throttle()
        self._sink: Optional[EventSink] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "EventSubscription":
        self._sink = EventSink(self._on_recording, self._on_event, self.stats, "yeastarfs-ws-dispatch", self._format)
        self._client.on_token(lambda _token: self._renewed.set())
        self._thread = threading.Thread(target=self._run, name="yeastarfs-ws-events", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * RECV_POLL_S + 1)
        if self._sink is not None:
            self._sink.stop(timeout_s=0.5)

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        backoff_s, quick = BACKOFF_INITIAL_S, False
        while not self._stop.is_set():
            started, again_now = time.monotonic(), False
            try:
                again_now = self._session()
            except errors.ConfigError as exc:
                log.warning("events: %s", exc)
                return
            except (errors.PbxError, Closed, ProtocolError, OSError) as exc:
                self._warn.emit(log, logging.WARNING, "events: the WebSocket subscription ended (%s); "
                                "reconnecting (%d more since the last warning)", errors.redact(str(exc)))
            finally:
                self.stats["connected"] = False
            lasted_s = time.monotonic() - started
            if lasted_s >= HEALTHY_SESSION_S:
                backoff_s = BACKOFF_INITIAL_S
            # A token the PBX ended: subscribe again at once, but never in a tight loop.
            if again_now and (not quick or lasted_s >= QUICK_AGAIN_AFTER_S):
                quick = True
                continue
            quick = False
            self._stop.wait(backoff_s * (1 - JITTER_FRACTION * random.random()))
            backoff_s = min(BACKOFF_MAX_S, backoff_s * 2)

    def _session(self) -> bool:
        """Subscribe, then listen until `stop` (False) or until the PBX ended the subscription
        for its token (True: reconnect at once); any other end raises."""
        socket_, token = self._subscribe(self._client.current_token())
        try:
            last_heard = next_heartbeat = time.monotonic()
            while not self._stop.is_set():
                if self._renewed.is_set():
                    socket_, token = self._resubscribe(socket_)
                now = time.monotonic()
                if now >= next_heartbeat:
                    socket_.send_text("heartbeat")
                    next_heartbeat = now + HEARTBEAT_INTERVAL_S
                if now - last_heard > SILENCE_LIMIT_S:
                    raise errors.PbxUnavailableError(f"nothing heard for {SILENCE_LIMIT_S:.0f} s")
                try:
                    message = socket_.receive(RECV_POLL_S)
                except Closed as closed:
                    if closed.code != CLOSE_POLICY or not any(w in closed.reason.upper() for w in TOKEN_MESSAGES):
                        raise
                    log.info("events: the PBX ended the subscription (%s); subscribing with a renewed token",
                             closed.reason)
                    self._client.token_failed(token)
                    return True
                if message is not None:
                    last_heard = time.monotonic()
                    self._handle(*message)
        except ProtocolError as exc:
            socket_.close(exc.code)
            raise
        finally:
            socket_.close()
        return False

    def _subscribe(self, token: str) -> tuple[WebSocket, str]:
        """A new connection subscribed to New CDR events with *token* (renewed once if refused)."""
        self._renewed.clear()
        try:
            socket_ = self._connect(token)
        except HandshakeRefused as exc:
            if not exc.token_refused:
                raise
            token = self._client.token_failed(token)
            self._renewed.clear()
            socket_ = self._connect(token)
        try:
            socket_.send_text(json.dumps({"topic_list": [TOPIC_NEW_CDR]}))
            self._await_ack(socket_)
        except BaseException:
            socket_.close()
            raise
        self.stats.add("subscriptions")
        self.stats["connected"] = True
        log.info("events: subscribed to New CDR events over the PBX's WebSocket")
        return socket_, token

    def _resubscribe(self, old: WebSocket) -> tuple[WebSocket, str]:
        """After a renewal: the new subscription first, then the old connection's last events."""
        new = self._subscribe(self._client.current_token())
        try:  # what the old one still carries, until it is quiet (or the PBX closed it)
            while (message := old.receive(DRAIN_S)) is not None:
                self._handle(*message)
        except (Closed, ProtocolError, OSError):
            pass
        old.close()
        return new

    def _connect(self, token: str) -> WebSocket:
        self.stats.add("connections")
        return WebSocket.connect(self._client.subscribe_url(token), headers={"User-Agent": USER_AGENT},
                                 **self._tls)

    def _await_ack(self, socket_: WebSocket) -> None:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        while time.monotonic() < deadline:
            message = socket_.receive(deadline - time.monotonic())
            if message is None:
                break
            reply = _json(message[1]) if message[0] == OP_TEXT else None
            if isinstance(reply, dict) and "errcode" in reply:
                if reply["errcode"] == 0:
                    return
                raise errors.PbxUnavailableError(f"the PBX refused the topic list (errcode {reply['errcode']})")
        raise errors.PbxUnavailableError("the PBX did not acknowledge the topic list")

    def _handle(self, opcode: int, payload: bytes) -> None:
        if opcode != OP_TEXT:
            return  # binary messages mean nothing here
        if payload.strip() == b"heartbeat response":
            return
        message = _json(payload)
        if isinstance(message, dict) and "errcode" in message and "type" not in message:
            log.debug("events: the PBX said errcode %s", message.get("errcode"))
            return
        self.stats.add("received")
        problem = self._format.problem(message) if message is not None else "not JSON"
        if problem is not None:
            self.stats.add("rejected")
            self._warn.emit(log, logging.WARNING, "events: refused a WebSocket message: %s (%d more since the "
                            "last warning)", errors.redact(problem))
            return
        self._sink.accept(message)


def _json(payload: bytes) -> object:
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
