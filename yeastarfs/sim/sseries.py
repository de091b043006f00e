"""A fake Yeastar S-Series PBX (API v2.0.0) for the tests and for ``yeastarfs demo``.

What it owns: an HTTP server that answers login, heartbeat, logout, recording/get_random,
recording/download, cdr/get_random and cdr/download exactly as yeastar-api.md §12 fixes them;
the HTTP event pusher and the TCP event listener (§12.6, §12.7); deterministic WAV bytes for
every recording (§12.8), or the bytes a test gives (``add_recording(audio=...)``, e.g. speech);
per-endpoint counters, a request log, and fault switches.

What it leaves to others: everything about the client, and the transport mechanics it shares
with the P-Series simulator (``common``: paced and cut replies, Range, the lockout rule, the
retrying event pusher, the audio cache, a clock tests move, observation and download-fault
bookkeeping). It imports only the standard library and ``yeastarfs.sim.common``, so that a
misreading of the API is never shared by the client and the simulator.

Threading contract:

- The HTTP server is a ``ThreadingHTTPServer``: one daemon thread per connection. One HTTP
  event-pusher thread delivers HTTP events in announcement order. With transport ``TCP`` an
  accept thread plus one thread per connected event client run as well.
- All shared state (sessions, randoms, lockouts, recordings, counters, log) is guarded by the
  single ``Simulator._lock`` (made by ``SimulatorBase``). It is never held while sleeping,
  generating audio, or doing network I/O. The clock, the audio cache and the event pusher
  have their own leaf locks (common.py), taken after ``_lock`` when both are needed.
- Fault switches are plain attributes: a test thread may set them at any time. Each download
  reads them once when it starts (the bandwidth cap is re-read for every chunk).

Clocks (what "now" means to the PBX):

- True time is this machine's ``time.time()``. The PBX's wall clock runs ``clock_offset_s``
  ahead of it and shows its zone ``tz``. Everything the PBX says in local time uses that
  clock: names' leading timestamps, CDR ``timestart`` (so cdr/get_random windows, compared
  with ``timestart``, are PBX-local too), NewCdr events, ``now_local()``, and the ``Date``
  header of every reply (in GMT, as Boa sends it).
- Times given to ``add_recording``/``populate``: a naive datetime is a PBX-local wall time
  (taken as is); an aware one is a true instant (shown in ``tz`` on the skewed clock); none
  means now. Callids are Unix seconds of the true instant; except that with ``tz=None`` a
  naive time keeps the machine-independent callid of old (its wall digits read as UTC).
- The simulator clock is ``time.monotonic()`` plus every ``advance_clock(s)``: it times
  token idleness (``token_idle_s``), randoms (``random_ttl_s``), lockouts and the
  not-written-yet periods, so tests move it instead of sleeping. ``reset()`` does not undo
  it (time never runs backwards); it leaves the wall clock, latencies and event resends alone.

Constructor options (not switches, so ``reset()`` leaves them): ``tz = None`` (a
``datetime.tzinfo`` such as ``zoneinfo.ZoneInfo("Asia/Kolkata")``; None = this machine's
local time), ``token_idle_s``, ``random_ttl_s``, ``lockout_*``, ``event_retry_s``, ``transport``.

Fault switches (``reset()`` puts all of them back to these defaults and unlocks every IP):

- ``latency_s = 0.0``          sleep this long before answering every HTTP request
- ``cdr_latency_s = 0.0``      ...and this much longer before answering the two CDR endpoints
- ``first_byte_delay_s = 0.0`` every reply sends its headers at once and its body this much later
- ``bandwidth_bps = None``     cap the recording body rate, sleep-paced per chunk
- ``range_mode = "ignore"``    how recording/download treats ``Range: bytes=N-[M]``:
  "ignore" (200, whole file) | "honour" (§12.4 switched mode: 206 + Content-Range, bytes from
  N; 416 beyond the end) | "wrong_offset" (206 starting elsewhere: at N // 2, or at 1 when N
  is 0, its Content-Range saying so truthfully). ``honour_range`` (bool) is an alias kept for
  older tests: reading it says ``range_mode != "ignore"``, True sets "honour", False "ignore".
- ``announce_size_bytes = None`` recording downloads announce this size while sending the real
  bytes and then closing: ``Content-Length: N`` (a 206: Content-Range ``bytes F-(N-1)/N`` and
  Content-Length N - F), e.g. to show a client refusing more than 4 GiB
- ``mutate_bytes_after_downloads = None`` after N downloads of a recording (every download
  request past its random and existence checks counts, finished or not) its bytes change
  once: same size and WAV header, other audio. Sticky; ``recording_bytes`` then returns the
  new bytes, while ``SimRecording.sha256`` stays that of the original. ``reset()`` restarts
  the counts (bytes already changed stay changed)
- ``reset_after_bytes = None`` downloads send this many body bytes, then a TCP RST
- ``reset_downloads = 0``      ...for the next N downloads only (0 = every download)
- ``fail_downloads = 0``       the next N recording downloads fail in the shape of ``fail_mode``
- ``fail_mode = "json"``       "json" | "http500" | "html" | "truncate" | "overlong"
- ``fail_get_random = 0``      the next N recording/get_random answer Failed 10004
- ``fail_logins = 0``          the next N logins answer 20003 (not counted towards lockout)
- ``refuse_connections = False`` accepted connections (HTTP and TCP events) are closed unanswered
- ``cdr_gzip = False``         cdr/download answers ``Content-Encoding: gzip`` with a gzip body,
  whatever the request's Accept-Encoding said
- ``cdr_raw_body = None``      cdr/download (after its usual token and random checks) sends these
  bytes verbatim as its text/csv body; with ``cdr_gzip`` the header is added but the bytes are
  not compressed again, so a ready-made gzip bomb goes out as is
- ``api_raw_reply = {}``       ``{endpoint: bytes}``: that endpoint (e.g. "cdr/get_random")
  answers HTTP 200, application/json, with these bytes as its body, before any check
- ``chaos = 0.0``              each recording download fails at random with this probability, in
  a random shape: reset part-way, HTTP 500, JSON Failed, truncated, or 0.3 s of latency
  (soak tests; the choices are seeded, so a run is repeatable)

Variant switches (also reset by ``reset()``): what a real PBX may do differently (§12).

- ``success_status = "Success"``   the ``status`` word of every success reply (e.g. "success")
- ``token_errno = "20004"``        errno for an unknown or expired token (a real PBX may say 20006)
- ``audio_content_type = "audio/x-wav"``  Content-Type of recording bodies (200 and 206)
- ``omit_content_length = False``  recording bodies carry no Content-Length; they end at the close
- ``clock_offset_s = 0.0``         the PBX's clock runs this many seconds ahead of true time
  (negative: behind); see Clocks
- ``not_found_errno = "10023"``    errno for "audio file does not exist": an unknown name, a
  recording added with ``stored=False``, deleted, or not written yet
- ``not_found_at = "get_random"``  where "does not exist" is reported: "get_random" (and at
  download, for a recording that went away in between) | "download" (get_random hands out a
  random for any name; the download answers the errno)
- ``not_ready_s = 0.0``            a recording added from now on is "not written yet": it does not
  exist until this long after its ``add_recording`` (simulator clock); per recording,
  ``add_recording(ready_after_s=...)`` overrides it (``populate`` adds ready recordings)

Methods that change the PBX (not switches: ``reset()`` does not undo them):
``expire_all_tokens()``, ``lock_ip(ip)``, ``unlock_all()``, ``disconnect_tcp_clients()``,
``advance_clock(seconds)``, ``publish_cdr(name, announce=False)`` (a recording added with
``in_cdr=False`` gets its CDR row now, as a late export does), ``delete_recording(name,
keep_cdr=True)`` (the PBX's auto-cleanup: get_random and download answer "does not exist";
the CDR row stays unless ``keep_cdr=False``; the name stays in ``recordings`` with
``stored=False`` and ``recording_bytes`` still works). ``now_local()`` (naive PBX-local wall
time, to the second) and ``pbx_time()`` (Unix seconds) read the PBX's clock.

Choices the contract leaves open (documented here so tests can rely on them):

- A POST body that is not a JSON object gets errno 20000 ("only JSON supported"); an empty
  body counts as ``{}``. GET on login or a get_random gets 20001 ("only POST supported");
  heartbeat, logout and both downloads accept GET and POST.
- Randoms are not bound to a token; any valid token may use them.
- cdr/download uses the number and times given to cdr/get_random; if the link repeats them
  with other values the reply is Failed 10004.
- Raw CDR rows (``add_cdr_row``) whose ``timestart`` is not ``yyyy-mm-dd hh:mm:ss`` are
  included in every time window: they model PBX garbage a client must survive.
- A heartbeat carrying ``port`` re-registers the event target exactly as a login would
  (without ``version`` it switches to the 1.0.0 ``action`` key); without ``port`` it keeps it.
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime
import functools
import gzip
import hashlib
import http.client
import itertools
import json
import logging
import math
import queue
import random
import re
import secrets
import select
import socket
import struct
import threading
import time
from typing import Any, Optional
from urllib.parse import parse_qsl, urlsplit

from yeastarfs.sim.common import (
    POLL_S, AudioCache, LoginGuard, Reply, RetryingPusher, SimClock, SimulatorBase, StreamingHandler,
    audio_reply, html_reply, json_reply, parse_json_object, serve_http)

log = logging.getLogger(__name__)

SERVER_HEADER = "Boa/0.94.14rc21"
# Sent on every reply, as Boa and the v2 examples do (yeastar-api.md §1, §9).
COMMON_HEADERS = (
    ("Accept-Ranges", "bytes"),
    ("Connection", "close"),
    ("Access-control-allow-origin", "*"),
    ("Access-control-allow-methods", "GET, POST, OPTIONS, PUT, DELETE"),
)
CDR_COLUMNS = (
    "callid", "timestart", "callfrom", "callto", "callduraction", "talkduraction",
    "srctrunkname", "dsttrunkname", "status", "type", "pincode", "recording", "didnumber", "sn",
)
SERIAL_NUMBER = "369000000001"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

# errno values (yeastar-api.md §3, §12).
E_ENDPOINT = "10003"
E_PARAM = "10004"
E_NO_AUDIO = "10023"
E_JSON = "20000"
E_POST = "20001"
E_LOCKED = "20002"
E_CREDENTIALS = "20003"
E_TOKEN = "20004"
E_NO_TOKEN = "20005"

# Any version segment is accepted: real clients log in at /api/v1.10/ and use /api/v2.0.0/.
API_PATH_RE = re.compile(r"^/api/[^/]+/(?P<endpoint>.+?)/?$")

MAX_BODY_BYTES = 1024 * 1024
EVENT_RESENDS = 3
EVENT_TIMEOUT_S = 2.0
TCP_LOGIN_TIMEOUT_S = 10.0
TCP_SEND_TIMEOUT_S = 5.0
# Recently served WAV bytes kept in memory; older ones are rebuilt on demand (cheap).
AUDIO_CACHE_BYTES = 256 * 1024 * 1024

SAMPLE_RATE = 8000
BYTES_PER_SECOND = SAMPLE_RATE * 2
WAV_HEADER_BYTES = 44
# Per-name prefix: makes every recording's bytes unique even when two tones coincide.
PREFIX_BYTES = 256
TONE_AMPLITUDE = 8000


# ---------------------------------------------------------------------------------------
# Audio


@functools.lru_cache(maxsize=None)
def _tone_period(samples: int) -> bytes:
    """One period of a sine tone, *samples* long, as little-endian PCM-16."""
    values = [round(TONE_AMPLITUDE * math.sin(2 * math.pi * i / samples)) for i in range(samples)]
    return struct.pack(f"<{samples}h", *values)


def wav_data_bytes(duration_s: float) -> int:
    """Bytes of PCM-16 8 kHz mono audio for *duration_s*, rounded to whole samples."""
    data = int(round(BYTES_PER_SECOND * duration_s))
    return max(0, data - data % 2)


def wav_bytes(name: str, size_bytes: int) -> bytes:
    """The deterministic WAV file of *name*: exactly *size_bytes* long, PCM-16 8 kHz mono.

    Built from a per-name prefix and a repeated tone period whose pitch depends on the
    name, so 20 MB take milliseconds and every name gets different bytes.
    """
    if size_bytes < WAV_HEADER_BYTES:
        raise ValueError(f"a WAV file needs at least {WAV_HEADER_BYTES} bytes, not {size_bytes}")
    data_len = size_bytes - WAV_HEADER_BYTES
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI", b"RIFF", size_bytes - 8, b"WAVE", b"fmt ", 16,
        1, 1, SAMPLE_RATE, BYTES_PER_SECOND, 2, 16, b"data", data_len,
    )
    prefix = (digest * (PREFIX_BYTES // len(digest)))[:data_len]
    period = _tone_period(16 + digest[0] % 64)  # 101..500 Hz
    repeats, rest = divmod(data_len - len(prefix), len(period))
    return b"".join((header, prefix, period * repeats, period[:rest]))


# ---------------------------------------------------------------------------------------
# Content


@dataclasses.dataclass(frozen=True)
class SimRecording:
    """One recording the simulated PBX holds.

    Attributes:
        name: file name, the recording's identifier in the API.
        callid, timestart, callfrom, callto, call_type, status: its CDR fields.
        call_s, talk_s: call and talk durations in whole seconds.
        size_bytes: exact WAV size (header + data).
        stored: False when get_random answers 10023 although CDR and events list it
            (also what ``delete_recording`` sets).
        in_cdr: whether cdr/download lists it (``publish_cdr`` sets it later).
        audio: the bytes served, as given to ``add_recording(audio=...)``; None: the
            deterministic tone WAV of the name (§12.8).
        sha256: hex digest of the original WAV bytes (computed on first use).
    """

    name: str
    callid: str
    timestart: str
    callfrom: str
    callto: str
    call_type: str
    status: str
    call_s: int
    talk_s: int
    size_bytes: int
    stored: bool = True
    in_cdr: bool = True
    audio: Optional[bytes] = dataclasses.field(default=None, repr=False, compare=False)

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.wav_bytes()).hexdigest()

    def wav_bytes(self, generation: int = 0) -> bytes:
        """Build the WAV bytes afresh (``Simulator.recording_bytes`` caches them).

        *generation* 0 is the original; a later one is what the PBX holds after the bytes
        changed (``mutate_bytes_after_downloads``): same size and header, other audio.
        Given *audio* is served as it is; a later generation keeps its first 44 bytes.
        """
        if self.audio is not None and generation == 0:
            return self.audio
        seed = self.name if generation == 0 else f"{self.name}\0generation {generation}"
        tone = wav_bytes(seed, max(self.size_bytes, WAV_HEADER_BYTES))
        if self.audio is None:
            return tone
        return self.audio[:WAV_HEADER_BYTES] + tone[WAV_HEADER_BYTES:self.size_bytes]

    def cdr_row(self, sn: str = SERIAL_NUMBER) -> dict[str, str]:
        """The 14 CSV columns of this call (yeastar-api.md §5.3)."""
        trunk_in = "SimTrunk" if self.call_type == "Inbound" else ""
        trunk_out = "SimTrunk" if self.call_type == "Outbound" else ""
        values = (
            self.callid, self.timestart, self.callfrom, self.callto, str(self.call_s),
            str(self.talk_s), trunk_in, trunk_out, self.status, self.call_type, "",
            self.name, "", sn,
        )
        return dict(zip(CDR_COLUMNS, values))

    def event(self, key: str = "event", sn: str = SERIAL_NUMBER) -> dict[str, str]:
        """The NewCdr event for this call, keyed ``event`` (v2) or ``action`` (v1)."""
        row = self.cdr_row(sn)
        return {
            key: "NewCdr", "callid": self.callid, "timestart": self.timestart,
            "callfrom": self.callfrom, "callto": self.callto,
            "callduraction": row["callduraction"], "talkduraction": row["talkduraction"],
            "srctrunkname": row["srctrunkname"], "dsttrcunkname": row["dsttrunkname"],
            "pincode": "", "status": self.status, "type": self.call_type,
            "recording": self.name, "didnumber": "", "agentringtime": "0", "sn": sn,
        }


def _is_aware(moment: datetime.datetime) -> bool:
    return moment.tzinfo is not None and moment.utcoffset() is not None


def _parse_time(text: Any) -> Optional[datetime.datetime]:
    """``yyyy-mm-dd hh:mm:ss`` as a naive datetime, or None."""
    try:
        return datetime.datetime.strptime(str(text).strip(), TIME_FORMAT)
    except ValueError:
        return None


def _csv_cell(value: Any) -> str:
    return "" if value is None else str(value)


# ---------------------------------------------------------------------------------------
# Sessions, replies


@dataclasses.dataclass(frozen=True)
class _EventTarget:
    """Where HTTP events for one token go, and under which key."""

    host: str
    port: int
    path: str
    key: str


@dataclasses.dataclass
class _Session:
    token: str
    client_ip: str
    last_used: float
    target: Optional[_EventTarget] = None


@dataclasses.dataclass(frozen=True)
class _Random:
    subject: tuple
    expires: float


@dataclasses.dataclass
class _Request:
    method: str
    endpoint: str
    query: dict[str, str]
    body: Optional[dict]  # None: the body is not a JSON object
    client_ip: str
    range_header: Optional[str]


class _ApiFailure(Exception):
    """Raised by endpoint handlers; becomes ``{"status":"Failed","errno":...}``."""

    def __init__(self, errno: str) -> None:
        super().__init__(errno)
        self.errno = errno


def _failed(errno: str) -> Reply:
    return json_reply({"status": "Failed", "errno": errno})


def _event_target(body: dict, client_ip: str) -> Optional[_EventTarget]:
    """The HTTP event target a login/heartbeat body asks for (yeastar-api.md §2.1, §12.6)."""
    port_field = body.get("port")
    if port_field in (None, ""):
        return None
    key = "event" if str(body.get("version", "")) == "2.0.0" else "action"
    url = str(body.get("url") or "")
    try:
        port = int(port_field)
    except (TypeError, ValueError):
        log.warning("event target: ignoring non-numeric port %r", port_field)
        return None
    if str(body.get("urltag", "0")) == "1" and url:
        # Absolute form "host:port/path".
        parts = urlsplit(url if "://" in url else "http://" + url)
        if not parts.hostname:
            return None
        return _EventTarget(parts.hostname, parts.port or port, parts.path or "/", key)
    if not 0 < port < 65536:
        log.warning("event target: ignoring out-of-range port %d", port)
        return None
    return _EventTarget(client_ip, port, "/" + url.lstrip("/"), key)


# ---------------------------------------------------------------------------------------
# The simulator


class Simulator(SimulatorBase):
    """A Yeastar S-Series PBX on localhost.

    Attributes:
        base_url: ``http://host:port`` (valid after ``start``).
        tcp_port: the TCP event port (transport TCP only; real port after ``start``).
        password_md5: what the HTTP login must send as ``password``.
        recordings: every recording by name. Read it freely; change it only via methods.
        counters: requests per endpoint, plus ``event_push`` (HTTP event attempts),
            ``tcp_login`` (TCP login attempts) and ``refused`` (refused connections).
        requests_log: the last 10000 requests as dicts (endpoint, method, client_ip,
            query, body, time), for test assertions only.
        fault switches: see the module docstring.

    Multithreading: one lock (``_lock``) guards every shared field; see the module docstring.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, username: str = "api",
                 password: str = "secret", transport: str = "HTTP",
                 tcp_port: Optional[int] = None, token_idle_s: float = 1800.0,
                 random_ttl_s: float = 30.0, lockout_failures: int = 5,
                 lockout_s: float = 600.0, lockout_window_s: float = 600.0,
                 event_retry_s: float = 5.0, sn: str = SERIAL_NUMBER,
                 certfile: Optional[str] = None, keyfile: Optional[str] = None,
                 tz: Optional[datetime.tzinfo] = None) -> None:
        if transport not in ("HTTP", "TCP"):
            raise ValueError(f"transport must be 'HTTP' or 'TCP', not {transport!r}")
        super().__init__()
        self.host, self.port = host, port
        self.username, self.password = username, password
        self.transport = transport
        self.tcp_port = (tcp_port or 0) if transport == "TCP" else None
        self.token_idle_s, self.random_ttl_s = token_idle_s, random_ttl_s
        self.lockout_failures, self.lockout_s = lockout_failures, lockout_s
        self.lockout_window_s = lockout_window_s
        self.event_retry_s = event_retry_s
        self.sn = sn
        self.tz = tz  # the PBX's zone; None: this machine's (see Clocks in the module docstring)
        # HTTPS like a real PBX on port 8088 (self-signed there) when a certificate is given.
        self.certfile, self.keyfile = certfile, keyfile
        self.recordings: dict[str, SimRecording] = {}
        self._sequence = itertools.count(1)
        self._extra_rows: list[dict] = []
        self._sessions: dict[str, _Session] = {}
        self._randoms: dict[str, _Random] = {}
        self._guard = LoginGuard(lockout_failures, lockout_window_s, lockout_s)
        self._audio_cache = AudioCache(AUDIO_CACHE_BYTES)  # keyed "generation:name"
        self._clock = SimClock()
        self._ready_at: dict[str, float] = {}  # not written until then (simulator clock)
        self._http: Any = None
        self._http_thread: Optional[threading.Thread] = None
        self._pusher: Optional[RetryingPusher] = None
        self._tcp: Optional[_TcpEventServer] = None
        self._set_default_faults()

    def _set_default_faults(self) -> None:
        self.latency_s: float = 0.0
        self.cdr_latency_s: float = 0.0
        self.first_byte_delay_s: float = 0.0
        self.bandwidth_bps: Optional[int] = None
        self.range_mode = "ignore"
        self.announce_size_bytes: Optional[int] = None
        self.mutate_bytes_after_downloads: Optional[int] = None
        self.reset_after_bytes: Optional[int] = None
        self.reset_downloads = 0
        self.fail_downloads = 0
        self.fail_mode = "json"
        self.fail_get_random = 0
        self.fail_logins = 0
        self.refuse_connections = False
        self.success_status = "Success"
        self.token_errno = E_TOKEN
        self.audio_content_type = "audio/x-wav"
        self.omit_content_length = False
        self.cdr_gzip = False
        self.cdr_raw_body: Optional[bytes] = None
        self.api_raw_reply: dict[str, bytes] = {}
        self.clock_offset_s: float = 0.0
        self.not_found_errno = E_NO_AUDIO
        self.not_found_at = "get_random"
        self.not_ready_s: float = 0.0
        self.chaos = 0.0
        self._chaos_rng = random.Random(1)

    # -- clocks (see "Clocks" in the module docstring) -------------------------------------

    def _now_s(self) -> float:
        """The simulator clock: monotonic seconds, moved forward by ``advance_clock``."""
        return self._clock.now()

    def advance_clock(self, seconds: float) -> None:
        """Move the simulator clock *seconds* forward: tokens, randoms, lockouts and
        not-written-yet periods age at once. Raises ValueError for a negative value."""
        self._clock.advance(seconds)

    def pbx_time(self) -> float:
        """The PBX clock as Unix seconds: true time plus ``clock_offset_s``."""
        return time.time() + self.clock_offset_s

    def now_local(self) -> datetime.datetime:
        """The PBX's current local wall time, naive, to the second."""
        return self._wall(datetime.datetime.now(datetime.timezone.utc)).replace(microsecond=0)

    def _wall(self, instant: datetime.datetime) -> datetime.datetime:
        """The naive PBX-local wall time at which the PBX's clock shows the aware *instant*."""
        shown = instant.astimezone(datetime.timezone.utc) + datetime.timedelta(
            seconds=self.clock_offset_s)
        return shown.astimezone(self.tz).replace(tzinfo=None)

    def _instant_s(self, wall: datetime.datetime) -> int:
        """Unix seconds of the true instant the PBX shows as the naive *wall* time."""
        if self.tz is None:
            # Compatibility: the wall digits read as UTC keep callids machine-independent.
            return calendar.timegm(wall.timetuple())
        return int(wall.replace(tzinfo=self.tz).timestamp() - self.clock_offset_s)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> "Simulator":
        """Bind the sockets and serve on daemon threads; returns self."""
        if self._http is not None:
            return self
        self._stopping.clear()
        self._http, self._http_thread = serve_http(self, _Handler, self.host, self.port,
                                                   self.certfile, self.keyfile)
        self.port = self._http.server_address[1]
        self._pusher = RetryingPusher(self._deliver_event, lambda: self.event_retry_s,
                                      EVENT_RESENDS, "pbxsim-events")
        self._pusher.start()
        if self.transport == "TCP":
            self._tcp = _TcpEventServer(self, self.host, self.tcp_port or 0)
            self.tcp_port = self._tcp.port
            self._tcp.start()
        log.info("simulator: serving %s (transport %s)", self.base_url, self.transport)
        return self

    def stop(self) -> None:
        """Close every socket and let the threads go; returns within about a second."""
        if self._http is None:
            return
        self._stopping.set()  # aborts paced downloads, latency sleeps and event retries
        self._http.shutdown()
        self._http.server_close()
        self._http_thread.join(timeout=1.0)
        self._pusher.stop()
        if self._tcp is not None:
            self._tcp.stop()
        self._http = self._http_thread = self._pusher = self._tcp = None
        log.info("simulator: stopped")

    @property
    def password_md5(self) -> str:
        return hashlib.md5(self.password.encode("utf-8")).hexdigest()

    # -- content --------------------------------------------------------------------------

    def add_recording(self, *, start: Optional[datetime.datetime] = None, duration_s: float,
                      callfrom: str = "1001", callto: str = "2002", call_type: str = "Inbound",
                      callid: Optional[str] = None, status: str = "ANSWERED", ring_s: float = 5,
                      name: Optional[str] = None, size_bytes: Optional[int] = None,
                      in_cdr: bool = True, announce: bool = True,
                      stored: bool = True,
                      ready_after_s: Optional[float] = None,
                      audio: Optional[bytes] = None) -> SimRecording:
        """Add one recorded call; with *announce*, push its NewCdr to every event listener.

        *start*: naive = PBX-local wall time, aware = true instant, None = the call ends now
        (see Clocks in the module docstring). *ready_after_s*: the audio does not exist until
        this long from now (simulator clock); None takes ``not_ready_s``. *audio*: serve
        these bytes (e.g. speech, 8 kHz 16-bit mono WAV as a PBX writes it) instead of the
        name's tone; its length is the size, and *duration_s* still gives the CDR durations.
        Raises ValueError if a recording of that name exists already, or if *size_bytes*
        disagrees with *audio*.
        """
        with self._lock:
            sequence = next(self._sequence)
        if start is None:
            start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
                seconds=ring_s + duration_s)
        if _is_aware(start):
            instant_s, start = int(start.timestamp()), self._wall(start)
        else:
            instant_s = self._instant_s(start)
        if callid is None:
            callid = f"{instant_s}.{sequence}"
        if name is None:
            # The name's timestamp is when recording began: at answer, ring_s after timestart.
            stamp = (start + datetime.timedelta(seconds=ring_s)).strftime("%Y%m%d%H%M%S")
            name = f"{stamp}-{callid}-{callfrom}-{callto}-{call_type}.wav"
        if audio is not None:
            audio = bytes(audio)
            if size_bytes not in (None, len(audio)):
                raise ValueError(f"size_bytes {size_bytes} but audio has {len(audio)} bytes")
            size_bytes = len(audio)
        elif size_bytes is None:
            size_bytes = WAV_HEADER_BYTES + wav_data_bytes(duration_s)
        if size_bytes < WAV_HEADER_BYTES and audio is None:
            raise ValueError(f"size_bytes must be at least {WAV_HEADER_BYTES}")
        talk_s = round(duration_s)
        rec = SimRecording(
            name=name, callid=callid, timestart=start.strftime(TIME_FORMAT), callfrom=callfrom,
            callto=callto, call_type=call_type, status=status, call_s=talk_s + round(ring_s),
            talk_s=talk_s, size_bytes=size_bytes, stored=stored, in_cdr=in_cdr, audio=audio)
        not_ready_s = self.not_ready_s if ready_after_s is None else ready_after_s
        with self._lock:
            if name in self.recordings:
                raise ValueError(f"recording {name!r} exists already")
            self.recordings[name] = rec
            if not_ready_s > 0:
                self._ready_at[name] = self._now_s() + not_ready_s
        if announce:
            self._announce(rec)
        return rec

    def populate(self, count: int, *, days: float = 7, now: Optional[datetime.datetime] = None,
                 seed: int = 1, min_s: int = 5, max_s: int = 120) -> list[SimRecording]:
        """Add *count* deterministic, unannounced, ready recordings spread over the last *days*
        days before *now* (naive = PBX-local, aware = true instant, None = the PBX's now)."""
        rng = random.Random(seed)
        if now is None:
            now = self.now_local()
        elif _is_aware(now):
            now = self._wall(now)
        # Calls end before *now*: start at least one longest call (plus ringing) earlier.
        earliest = max_s + 60
        span = max(earliest + 1, int(days * 86400))
        offsets = sorted((rng.randrange(earliest, span) for _ in range(count)), reverse=True)
        added = []
        for offset in offsets:
            call_type = rng.choice(("Inbound", "Outbound", "Internal"))
            callfrom, callto = _numbers_for(call_type, rng)
            added.append(self.add_recording(
                start=now - datetime.timedelta(seconds=offset),
                duration_s=rng.randint(min_s, max_s), callfrom=callfrom, callto=callto,
                call_type=call_type, ring_s=rng.randint(2, 20), announce=False,
                ready_after_s=0))
        return added

    def publish_cdr(self, name: str, *, announce: bool = False) -> SimRecording:
        """Make recording *name*'s CDR row appear now (a row exported late); with *announce*,
        push its NewCdr too. Returns the updated recording; raises KeyError for an unknown name.
        """
        rec = self._replace_recording(name, in_cdr=True)
        if announce:
            self._announce(rec)
        return rec

    def delete_recording(self, name: str, *, keep_cdr: bool = True) -> SimRecording:
        """The PBX's auto-cleanup deletes *name*'s audio: get_random and download answer
        ``not_found_errno``; its CDR row stays unless *keep_cdr* is False. Returns the updated
        recording; raises KeyError for an unknown name."""
        with self._lock:  # one critical section: a concurrent publish_cdr is not lost
            old = self.recordings[name]
            rec = dataclasses.replace(old, stored=False, in_cdr=old.in_cdr and keep_cdr)
            self.recordings[name] = rec
        return rec

    def _replace_recording(self, name: str, **changes: Any) -> SimRecording:
        with self._lock:
            rec = dataclasses.replace(self.recordings[name], **changes)
            self.recordings[name] = rec
        return rec

    def add_cdr_row(self, row: dict) -> None:
        """Add a raw CDR row: a call without recording, or a hostile row. Missing columns are "".

        Raises ValueError for keys that are not CDR columns (usually a typo).
        """
        unknown = set(row) - set(CDR_COLUMNS)
        if unknown:
            raise ValueError(f"not CDR columns: {sorted(unknown)}")
        with self._lock:
            self._extra_rows.append(dict(row))

    def recording_bytes(self, name: str) -> bytes:
        """The WAV bytes recording *name* has now (the next download sends them, unless
        ``mutate_bytes_after_downloads`` changes them first). KeyError for an unknown name."""
        with self._lock:
            generation = self._generations.get(name, 0)
        return self._audio(name, generation)

    def _audio(self, name: str, generation: int) -> bytes:
        with self._lock:
            rec = self.recordings[name]
        # Built outside the lock: it may take milliseconds.
        return self._audio_cache.get(f"{generation}:{name}", lambda: rec.wav_bytes(generation))

    # -- observation and faults ------------------------------------------------------------

    def reset(self) -> None:
        """Clear counters, the log and every fault (lockouts included); keep content and tokens."""
        with self._lock:
            self._clear_observations_locked()
            self._guard.clear()
            self._set_default_faults()

    def expire_all_tokens(self) -> None:
        """Invalidate every token, as a PBX reboot does."""
        with self._lock:
            self._sessions.clear()

    def lock_ip(self, ip: str = "127.0.0.1") -> None:
        """Lock *ip* out of login for ``lockout_s``, as 5 failed logins would."""
        with self._lock:
            self._guard.lock(ip, self._now_s())

    def unlock_all(self) -> None:
        """Lift every lockout and forget failed logins (an admin deleted the entries)."""
        with self._lock:
            self._guard.clear()

    def disconnect_tcp_clients(self) -> None:
        """Drop every TCP event connection (clients must reconnect and log in again)."""
        if self._tcp is not None:
            self._tcp.disconnect_all()

    # -- request dispatch (called on handler threads) ------------------------------------

    def _pause(self, target: str) -> None:
        """Apply ``latency_s`` (plus ``cdr_latency_s`` for the CDR endpoints) before answering
        the request for *target*; wakes early when the simulator stops."""
        delay = self.latency_s
        match = API_PATH_RE.match(urlsplit(target).path)
        if match and match.group("endpoint").startswith("cdr/"):
            delay += self.cdr_latency_s
        if delay > 0:
            self._stopping.wait(delay)

    def _dispatch(self, method: str, target: str, raw_body: bytes, client_ip: str,
                  range_header: Optional[str]) -> Reply:
        split = urlsplit(target)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        match = API_PATH_RE.match(split.path)
        endpoint = match.group("endpoint") if match else split.path
        req = _Request(method, endpoint, query, parse_json_object(raw_body), client_ip,
                       range_header)
        self._record(req, has_body=bool(raw_body.strip()))
        if match is None:
            return html_reply(404, "404 Not Found")
        raw = self.api_raw_reply.get(endpoint)
        if raw is not None:
            return Reply(body=bytes(raw))
        route = _ROUTES.get(endpoint)
        if route is None:
            return _failed(E_ENDPOINT)
        handler_name, methods = route
        if method not in methods:
            return _failed(E_POST)
        try:
            reply = getattr(self, handler_name)(req)
        except _ApiFailure as failure:
            log.debug("simulator: %s from %s failed with errno %s", endpoint, client_ip,
                      failure.errno)
            return _failed(failure.errno)
        return self._spell_success(reply)

    def _spell_success(self, reply: Reply) -> Reply:
        """Apply ``success_status`` to a JSON success reply."""
        word = self.success_status
        if word == "Success" or reply.content_type != "application/json" or not reply.body:
            return reply
        payload = json.loads(reply.body)
        if payload.get("status") == "Success":
            payload["status"] = word
            reply.body = json.dumps(payload).encode("utf-8")
        return reply

    def _record(self, req: _Request, has_body: bool) -> None:
        entry = {
            "endpoint": req.endpoint, "method": req.method, "client_ip": req.client_ip,
            "query": dict(req.query), "body": req.body if has_body else None,
            "time": time.time(),
        }
        self._log_request(req.endpoint, entry)

    @staticmethod
    def _json_body(req: _Request) -> dict:
        if req.body is None:
            raise _ApiFailure(E_JSON)
        return req.body

    # -- sessions -------------------------------------------------------------------------

    def _live_session_locked(self, token: str, now: float) -> Optional[_Session]:
        session = self._sessions.get(token)
        if session is not None and now - session.last_used > self.token_idle_s:
            del self._sessions[token]
            return None
        return session

    def _authenticate(self, req: _Request) -> _Session:
        """The session of the request's token, renewed. Raises _ApiFailure 20005/20004."""
        token = req.query.get("token", "")
        if not token:
            raise _ApiFailure(E_NO_TOKEN)
        now = self._now_s()
        with self._lock:
            session = self._live_session_locked(token, now)
            if session is None:
                raise _ApiFailure(self.token_errno)
            session.last_used = now
            return session

    def _token_alive(self, token: str) -> bool:
        with self._lock:
            return self._live_session_locked(token, self._now_s()) is not None

    def _login(self, req: _Request) -> Reply:
        body = self._json_body(req)
        ip, now = req.client_ip, self._now_s()
        with self._lock:
            if self._guard.is_locked(ip, now):
                raise _ApiFailure(E_LOCKED)
            if self.fail_logins > 0:
                self.fail_logins -= 1
                raise _ApiFailure(E_CREDENTIALS)
            if body.get("username") != self.username or body.get("password") != self.password_md5:
                if self._guard.note_failure(ip, now):
                    log.info("simulator: %s locked out after %d failed logins", ip, self._guard.failures)
                raise _ApiFailure(E_CREDENTIALS)
            self._guard.note_success(ip)
            for stale in [t for t in self._sessions if self._live_session_locked(t, now) is None]:
                self._sessions.pop(stale, None)
            token = secrets.token_hex(16)
            target = _event_target(body, ip) if self.transport == "HTTP" else None
            self._sessions[token] = _Session(token, ip, now, target)
        log.info("simulator: login from %s", ip)
        return json_reply({"status": "Success", "token": token, "transport": self.transport})

    def _heartbeat(self, req: _Request) -> Reply:
        session = self._authenticate(req)
        body = req.body or {}  # GET or no body at all: real clients do both
        if self.transport == "HTTP" and body.get("port") not in (None, ""):
            target = _event_target(body, session.client_ip)
            with self._lock:
                session.target = target
        return json_reply({"status": "Success"})

    def _logout(self, req: _Request) -> Reply:
        session = self._authenticate(req)
        with self._lock:
            self._sessions.pop(session.token, None)
        return json_reply({"status": "Success"})

    # -- randoms --------------------------------------------------------------------------

    def _mint_random(self, subject: tuple) -> str:
        value = secrets.token_hex(16)
        now = self._now_s()
        with self._lock:
            if len(self._randoms) > 1024:  # keep the table small: drop the expired ones
                for old in [r for r, v in self._randoms.items() if v.expires < now]:
                    del self._randoms[old]
            self._randoms[value] = _Random(subject, now + self.random_ttl_s)
        return value

    def _take_random(self, value: str, subject: tuple) -> _Random:
        """Consume *value*; raises _ApiFailure 10004 unless it is live and for *subject*."""
        with self._lock:
            entry = self._randoms.pop(value, None)
        if entry is None or entry.expires < self._now_s() or entry.subject[0] != subject[0]:
            raise _ApiFailure(E_PARAM)
        if subject[0] == "recording" and entry.subject != subject:
            raise _ApiFailure(E_PARAM)
        return entry

    # -- recordings -----------------------------------------------------------------------

    def _recording_random(self, req: _Request) -> Reply:
        self._authenticate(req)
        body = self._json_body(req)
        with self._lock:
            if self.fail_get_random > 0:
                self.fail_get_random -= 1
                raise _ApiFailure(E_PARAM)
        name = body.get("recording")
        if not isinstance(name, str) or not name:
            raise _ApiFailure(E_PARAM)
        if self.not_found_at != "download" and self._audio_absent(name):
            raise _ApiFailure(self.not_found_errno)
        random_value = self._mint_random(("recording", name))
        return json_reply({"status": "Success", "recording": name, "random": random_value})

    def _recording_download(self, req: _Request) -> Reply:
        self._authenticate(req)
        name, random_value = req.query.get("recording", ""), req.query.get("random", "")
        if not name or not random_value:
            raise _ApiFailure(E_PARAM)
        self._take_random(random_value, ("recording", name))
        if self._audio_absent(name):
            raise _ApiFailure(self.not_found_errno)
        data = memoryview(self._audio(name, self._count_download(name)))
        failure_mode, reset_at = self._download_faults()
        if failure_mode == "latency":
            time.sleep(CHAOS_LATENCY_S)
            failure_mode = None
        if failure_mode is not None:
            return _failed_download(failure_mode, data)
        reply = self._audio_reply(data, req.range_header)
        if reset_at is not None:
            reply.cut_after, reply.cut_with_rst = reset_at, True
        return reply

    def _audio_absent(self, name: str) -> bool:
        """Whether the PBX says "does not exist" for *name* now: unknown, not stored (or
        deleted), or not written yet."""
        with self._lock:
            rec = self.recordings.get(name)
            ready_at = self._ready_at.get(name)
        return rec is None or not rec.stored or (ready_at is not None and self._now_s() < ready_at)

    def _audio_reply(self, data: memoryview, range_header: Optional[str]) -> Reply:
        return audio_reply(data, range_header, range_mode=self.range_mode,
                           announced_size=self.announce_size_bytes,
                           content_type=self.audio_content_type,
                           omit_length=self.omit_content_length)

    # -- CDR ------------------------------------------------------------------------------

    def _cdr_random(self, req: _Request) -> Reply:
        self._authenticate(req)
        body = self._json_body(req)
        number_key = "number" if "number" in body else "extid"
        number = body.get(number_key)
        start, end = _parse_time(body.get("starttime")), _parse_time(body.get("endtime"))
        if not isinstance(number, str) or not number.strip() or start is None or end is None:
            raise _ApiFailure(E_PARAM)
        random_value = self._mint_random(("cdr", number, start, end))
        return json_reply({
            "status": "Success", number_key: number, "starttime": body["starttime"],
            "endtime": body["endtime"], "random": random_value})

    def _cdr_download(self, req: _Request) -> Reply:
        self._authenticate(req)
        random_value = req.query.get("random", "")
        if not random_value:
            raise _ApiFailure(E_PARAM)
        _, number, start, end = self._take_random(random_value, ("cdr",)).subject
        given_number = req.query.get("number", req.query.get("extid"))
        if given_number is not None and given_number != number:
            raise _ApiFailure(E_PARAM)
        for key, stored in (("starttime", start), ("endtime", end)):
            if key in req.query and _parse_time(req.query[key]) != stored:
                raise _ApiFailure(E_PARAM)
        raw, compress = self.cdr_raw_body, self.cdr_gzip
        body = self._cdr_csv(number, start, end) if raw is None else bytes(raw)
        headers = {"Content-Disposition": "attachment; filename=cdr.csv"}
        if compress:
            headers["Content-Encoding"] = "gzip"
            if raw is None:  # a raw body goes out verbatim: it may be a ready-made gzip bomb
                body = gzip.compress(body)
        return Reply(content_type="text/csv", body=body, headers=headers)

    def _cdr_csv(self, number: str, start: datetime.datetime, end: datetime.datetime) -> bytes:
        """The CSV of §12.5: header, then matching rows by timestart; LF, no BOM, no quoting."""
        with self._lock:
            rows = [r.cdr_row(self.sn) for r in self.recordings.values() if r.in_cdr]
            rows += [dict(r) for r in self._extra_rows]
        wanted = None
        if number.strip().lower() != "all":
            wanted = {n.strip() for n in number.split(",") if n.strip()}

        def selected(row: dict) -> bool:
            when = _parse_time(row.get("timestart", ""))
            if when is not None and not start <= when <= end:
                return False
            return wanted is None or row.get("callfrom") in wanted or row.get("callto") in wanted

        chosen = sorted((r for r in rows if selected(r)),
                        key=lambda r: _csv_cell(r.get("timestart")))
        lines = [",".join(CDR_COLUMNS)]
        lines += [",".join(_csv_cell(r.get(c)) for c in CDR_COLUMNS) for r in chosen]
        return ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")

    # -- events ---------------------------------------------------------------------------

    def _announce(self, rec: SimRecording) -> None:
        """Queue the NewCdr of *rec* for every live HTTP target and every TCP client."""
        now = self._now_s()
        with self._lock:
            targets = [(s.token, s.target) for s in list(self._sessions.values())
                       if s.target is not None and self._live_session_locked(s.token, now)]
        pusher, tcp = self._pusher, self._tcp
        if pusher is None:
            log.debug("simulator: not started, NewCdr for %s not announced", rec.name)
            return
        for token, target in targets:
            body = json.dumps(rec.event(target.key, self.sn)).encode("utf-8")
            pusher.submit((token, target, body))
        if tcp is not None:
            tcp.broadcast(rec)


    def _deliver_event(self, job: tuple) -> bool:
        """One HTTP event attempt (pusher thread); True once answered 200, or no longer
        wanted because its token has died."""
        token, target, body = job
        if not self._token_alive(token):
            log.debug("simulator: event for %s:%d dropped, token gone", target.host, target.port)
            return True
        self._count("event_push")
        return _post_event(target, body, self.host) == 200


_ROUTES = {
    "login": ("_login", {"POST"}),
    "heartbeat": ("_heartbeat", {"POST", "GET"}),
    "logout": ("_logout", {"POST", "GET"}),
    "recording/get_random": ("_recording_random", {"POST"}),
    "recording/download": ("_recording_download", {"GET", "POST"}),
    "cdr/get_random": ("_cdr_random", {"POST"}),
    "cdr/download": ("_cdr_download", {"GET", "POST"}),
}


CHAOS_LATENCY_S = 0.3


def _failed_download(mode: str, data: memoryview) -> Reply:
    """A recording download that fails in the shape *mode* names (see ``fail_mode``)."""
    if mode == "http500":
        return html_reply(500, "500 Internal Server Error")
    if mode == "html":
        return html_reply(200, "Yeastar S-Series login")
    if mode == "truncate":
        return Reply(content_type="audio/x-wav", stream=data, cut_after=len(data) // 2)
    if mode == "overlong":
        return Reply(content_type="audio/x-wav", stream=data, content_length=len(data) // 2)
    if mode != "json":
        log.warning("simulator: unknown fail_mode %r, answering json", mode)
    return _failed(E_PARAM)


def _numbers_for(call_type: str, rng: random.Random) -> tuple[str, str]:
    """Plausible (callfrom, callto) for *call_type*: extensions 1000-1019, 10-digit externals."""
    extension = str(rng.randint(1000, 1019))
    external = "0" + "".join(str(rng.randint(0, 9)) for _ in range(9))
    if call_type == "Inbound":
        return external, extension
    if call_type == "Outbound":
        return extension, external
    return extension, str(rng.randint(1000, 1019))


# ---------------------------------------------------------------------------------------
# HTTP transport


class _Handler(StreamingHandler):
    """Turns one HTTP request into a ``Simulator._dispatch`` call and sends its reply."""

    common_headers = COMMON_HEADERS

    def version_string(self) -> str:
        return SERVER_HEADER

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_OPTIONS(self) -> None:
        self.send_reply(Reply(content_type="text/plain"))

    def _serve(self, method: str) -> None:
        raw_body = self.read_body(MAX_BODY_BYTES)
        sim = self.server.simulator
        sim._pause(self.path)
        self.send_reply(sim._dispatch(method, self.path, raw_body, self.client_address[0],
                                      self.headers.get("Range")))


# ---------------------------------------------------------------------------------------
# HTTP events


def _post_event(target: _EventTarget, body: bytes, pbx_host: str) -> Optional[int]:
    """POST one event with the §7.1 header set; the HTTP status, or None if it failed."""
    conn = http.client.HTTPConnection(target.host, target.port, timeout=EVENT_TIMEOUT_S)
    try:
        conn.putrequest("POST", target.path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", f"{pbx_host}: {target.port}")  # sic: the PBX's odd space
        conn.putheader("Accept", "application/json")
        conn.putheader("User-Agent", "WebAPI")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException, ValueError) as exc:
        log.debug("simulator: event to %s:%d failed: %s", target.host, target.port, exc)
        return None
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------
# TCP events


@dataclasses.dataclass
class _TcpClient:
    conn: socket.socket
    key: str
    outbox: "queue.Queue[dict]" = dataclasses.field(default_factory=queue.Queue)


class _TcpEventServer:
    """The PBX side of TCP events (§12.7): an accept loop and one thread per client.

    The client list is guarded by the simulator's lock. A client's thread owns its socket:
    it sends queued events and notices when the peer goes away.
    """

    def __init__(self, sim: Simulator, host: str, port: int) -> None:
        self._sim = sim
        self._listener = socket.create_server((host, port))
        self.port: int = self._listener.getsockname()[1]
        self._clients: list[_TcpClient] = []
        self._thread = threading.Thread(target=self._accept_loop, name="pbxsim-tcp", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._thread.join(timeout=0.5)  # the accept loop watches sim._stopping
        self._listener.close()
        self.disconnect_all()

    def broadcast(self, rec: SimRecording) -> None:
        with self._sim._lock:
            clients = list(self._clients)
        for client in clients:
            client.outbox.put(rec.event(client.key, self._sim.sn))

    def disconnect_all(self) -> None:
        with self._sim._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept_loop(self) -> None:
        while not self._sim._stopping.is_set():
            if not _readable(self._listener, POLL_S):
                continue
            try:
                conn, addr = self._listener.accept()
            except OSError:
                return
            if self._sim.refuse_connections:
                self._sim._count("refused")
                conn.close()
                continue
            threading.Thread(target=self._serve_client, args=(conn, addr[0]),
                             name="pbxsim-tcp-client", daemon=True).start()

    def _serve_client(self, conn: socket.socket, ip: str) -> None:
        client = None
        try:
            key = self._check_login(conn, ip)
            conn.settimeout(TCP_SEND_TIMEOUT_S)
            if key is None:
                conn.sendall(b"Response: Failed\r\n\r\n")
                return
            # Registered before the reply: an event announced as soon as the client has
            # read "Success" must reach it (it is queued and sent after the reply).
            client = _TcpClient(conn, key)
            with self._sim._lock:
                self._clients.append(client)
            conn.sendall(b"Response: Success\r\n\r\n")
            self._pump(client)
        except OSError as exc:
            log.debug("simulator: TCP event client %s: %s", ip, exc)
        finally:
            with self._sim._lock:
                if client in self._clients:
                    self._clients.remove(client)
            conn.close()

    def _check_login(self, conn: socket.socket, ip: str) -> Optional[str]:
        """Read and check the login block: the event key, or None on failure."""
        block = _read_login_block(conn, self._sim._stopping)
        if block is None:
            return None
        self._sim._count("tcp_login")
        fields = {}
        for line in block.decode("utf-8", "replace").splitlines():
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        ok = (fields.get("action", "").lower() == "login"
              and fields.get("username") == self._sim.username
              and fields.get("secret") == self._sim.password)
        log.info("simulator: TCP event login from %s %s", ip, "succeeded" if ok else "failed")
        if not ok:
            return None
        return "event" if fields.get("version") == "2.0.0" else "action"

    def _pump(self, client: _TcpClient) -> None:
        """Send queued events until the peer closes or the simulator stops."""
        while not self._sim._stopping.is_set():
            try:
                event = client.outbox.get(timeout=POLL_S)
            except queue.Empty:
                event = None
            if event is not None:
                client.conn.sendall(json.dumps(event).encode("utf-8") + b"\r\n")
            if _peer_closed(client.conn):
                return


def _read_login_block(conn: socket.socket, stopping: threading.Event) -> Optional[bytes]:
    """Bytes up to the blank line ending the login block, or None (timeout, EOF, too long)."""
    conn.settimeout(POLL_S)
    deadline = time.monotonic() + TCP_LOGIN_TIMEOUT_S
    buffer = b""
    while time.monotonic() < deadline and not stopping.is_set():
        for end in (b"\r\n\r\n", b"\n\n"):
            if end in buffer:
                return buffer[:buffer.index(end)]
        try:
            data = conn.recv(1024)
        except socket.timeout:
            continue
        if not data or len(buffer) > 8192:
            return None
        buffer += data
    return None


def _readable(sock: socket.socket, timeout_s: float) -> bool:
    """Whether *sock* has something to read within *timeout_s* (poll: select.select fails on
    descriptors over 1,023, which a test process running the simulator may reach)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


def _peer_closed(conn: socket.socket) -> bool:
    """True once the peer has closed; anything it sends after login is read and ignored."""
    if not _readable(conn, 0):
        return False
    try:
        return conn.recv(4096) == b""
    except (BlockingIOError, socket.timeout):
        return False
    except OSError:
        return True
