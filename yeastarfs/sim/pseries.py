"""A fake Yeastar P-Series PBX (OpenAPI v1.0) for the tests, the benchmark and ``yeastarfs demo``.

What it owns: an HTTP(S) server that answers get_token, refresh_token, del_token,
recording/list, recording/search, recording/download (the download link), the link itself
(``/api/download/...``, the audio) and system/information as the contract below fixes them;
WebSocket event subscriptions (RFC 6455, on the same port: ws, or wss under TLS) and
webhook delivery of New CDR (30012) events; per-endpoint counters, a request log, a clock
tests can move, and fault switches named as in the S-Series simulator.

What it leaves to others: everything about the client. Its sources of truth are
``yeastar-p-series-api.md`` (what Yeastar's guides say) and the contract section below
(what they leave open). It imports only the standard library and ``yeastarfs.sim``: the
audio generator and a few constants come from ``sseries`` (the same WAV bytes for the same
name, whatever the family) and the transport pieces from ``common``.

Threading contract:

- The HTTP server is a ``ThreadingHTTPServer``: one daemon thread per connection. A
  WebSocket subscription keeps its connection's thread for its whole life: that thread alone
  writes to its socket (events are queued to it). One webhook-pusher thread delivers events
  in announcement order when ``webhook_url`` is set.
- All shared state (tokens, download links, lockouts, recordings, subscriptions, counters,
  log) is guarded by the single ``_lock`` (made by ``SimulatorBase``). It is never held
  while sleeping, building audio or doing network I/O. The clock and the audio cache have
  their own leaf locks (common.py), taken after ``_lock`` when both are needed.
- Fault switches are plain attributes: a test thread may set them at any time. Each
  download reads them once when it starts (the bandwidth cap is re-read for every chunk).

Clocks (the same rules as the S-Series simulator's):

- True time is this machine's ``time.time()``. The PBX's wall clock runs ``clock_offset_s``
  ahead of it and shows its zone ``tz`` (None: this machine's). Everything the PBX says in
  local time or Unix seconds uses that clock: ``time`` in lists, ``time_start`` in events,
  names' leading timestamps, search windows, system/information, ``now_local()``,
  ``pbx_time()`` and the ``Date`` header (GMT). A recording's ``start_epoch`` and
  ``record_epoch`` are Unix seconds on the PBX's clock, fixed when it is added.
- Times given to ``add_recording``/``populate``: a naive datetime is a PBX-local wall time;
  an aware one is a true instant (shown on the skewed clock); none means now. Callids are
  Unix seconds of the true instant.
- The simulator clock is ``time.monotonic()`` plus every ``advance_clock(s)``: it times token
  and link lifetimes, lockouts, WebSocket idleness and not-written-yet periods, so tests move
  it instead of sleeping. ``reset()`` does not undo it; it does not move the wall clock.

Constructor options (``reset()`` leaves them): ``username``/``password`` (the API
application's Client ID and Client Secret), ``access_token_ttl_s = 1800``,
``refresh_token_ttl_s = 86400``, ``resource_ttl_s = 1800``, ``max_valid_tokens = 8`` (None:
no limit), ``lockout_failures = 5``, ``lockout_s = 600``, ``lockout_window_s = 600``,
``ws_idle_timeout_s = 60``, ``time_format = "%d/%m/%Y %H:%M:%S"``, ``tz = None``,
``webhook_url = None``, ``event_retry_s = 5``, ``sn``, ``certfile``/``keyfile`` (HTTPS and wss).

Fault switches (``reset()`` puts them back to these defaults and unlocks every IP; the names
are the S-Series simulator's wherever the meaning carries over):

- ``latency_s = 0.0``          sleep this long before answering every HTTP request (upgrades too)
- ``cdr_latency_s = 0.0``      ...and this much longer before the catalogue (recording/list,
                               recording/search: the P-Series counterpart of the CDR endpoints)
- ``first_byte_delay_s = 0.0`` every reply sends its headers at once and its body this much later
- ``bandwidth_bps = None``     cap the audio body rate, sleep-paced per chunk
- ``range_mode = "ignore"``    "ignore" (200, whole file) | "honour" (206 + Content-Range, 416
                               past the end) | "wrong_offset" (206 starting elsewhere, truthfully
                               labelled). ``honour_range`` (bool) is the S-Series alias.
- ``announce_size_bytes = None`` audio downloads announce this size while sending the real bytes
- ``mutate_bytes_after_downloads = None`` after N audio downloads of a recording its bytes change
                               once (same size and header, other audio); sticky
- ``reset_after_bytes = None`` audio downloads send this many body bytes, then a TCP RST
- ``reset_downloads = 0``      ...for the next N downloads only (0 = every download)
- ``fail_downloads = 0``       the next N audio downloads fail in the shape of ``fail_mode``
- ``fail_mode = "json"``       "json" (errcode 30004) | "http500" | "html" | "truncate" | "overlong"
- ``fail_download_urls = 0``   the next N recording/download calls answer 30004 (the S-Series
                               ``fail_get_random``: the first of the two steps fails)
- ``fail_logins = 0``          the next N get_token calls answer 20001 (not counted towards lockout)
- ``refuse_connections = False`` accepted connections are closed unanswered
- ``api_raw_reply = {}``       ``{endpoint: bytes}``: that endpoint answers HTTP 200 JSON with these
                               bytes before any check (``"download"``: the audio links)
- ``chaos = 0.0``              each audio download fails at random with this probability (reset
                               part-way, HTTP 500, JSON 30004, truncated, or 0.3 s late; seeded)

Variant switches (also reset): what a real PBX may do differently.

- ``clock_offset_s = 0.0``     the PBX's clock runs this far ahead of true time (negative: behind)
- ``not_ready_s = 0.0``        a recording added from now on is not written yet: unlisted and
                               "not found" until this long after it is added (simulator clock);
                               ``add_recording(ready_after_s=...)`` overrides it per recording
- ``resource_single_use = False``  a download link works once (default: any number of times
                               within its lifetime)
- ``mp3_single_download = False``  the PBX stores mp3: an audio download while another is
                               running answers 30003
- ``refresh_revokes_access = True``  refresh_token revokes the access token of the pair whose
                               refresh token it consumed
- ``audio_content_type = "audio/x-wav"``, ``omit_content_length = False``

Methods that change the PBX (``reset()`` does not undo them): ``advance_clock(s)``,
``publish_cdr(name, announce=False)`` (a recording added with ``in_cdr=False`` is listed from
now on), ``delete_recording(name, keep_cdr=True)`` (the audio is gone: recording/download
answers 30001, its links 30002; it stays listed unless ``keep_cdr=False``, as a row whose
file has gone; the name stays in ``recordings`` with ``stored=False``), ``make_ready(name)``,
``expire_all_tokens()``, ``lock_ip(ip)``, ``unlock_all()``, ``drop_websockets()``.

Contract: what this simulator does where the P-Series guides are silent. Every point marked
*assumption* is unconfirmed on a real PBX; a client must not rely on more than the guides
say (``yeastar-p-series-api.md``), and should fail loudly where these differ.

1. Transport. The API lives under ``/openapi/{any version}/``; download links under
   ``/api/download/``. Answers are HTTP 200 with a JSON body ``{"errcode": N, "errmsg": M}``
   for success (0, "SUCCESS") **and** failure (assumption: failures are not 4xx/5xx).
   Every reply carries ``Connection: close`` (assumption; a real PBX may keep connections
   alive). A path outside those two prefixes gets an HTML 404.
2. Error codes (assumption: all of them; the guides' own table was not available). A client
   must decide token expiry from ``errmsg`` containing ``TOKEN EXPIRED`` as well as from
   the code, and treat any other non-zero errcode as a failure of that call:

   ======  ======================  ==========================================================
   10001   INTERFACE NOT EXISTED   unknown endpoint under /openapi/
   10002   PARAMETER ERROR         missing or invalid parameter; body not a JSON object;
                                   subscribe without a WebSocket upgrade; bad WS message
   10003   METHOD NOT ALLOWED      get_token/refresh_token need POST, the rest GET
                                   (del_token takes both: the guide shows GET)
   10004   USER AGENT REQUIRED     a request (any, the upgrade too) without a User-Agent
   20001   AUTHENTICATION FAILED   wrong username (Client ID) or password (Client Secret)
   20002   IP BLOCKED              get_token from a locked IP
   20003   TOKEN EXPIRED           an access token past its lifetime
   20004   INVALID TOKEN           an access token missing, unknown or revoked
   20005   REFRESH TOKEN EXPIRED   a refresh token past its lifetime
   20006   INVALID REFRESH TOKEN   a refresh token unknown, already used, or revoked
   30001   RECORDING NOT FOUND     recording/download: no such id/file, deleted, not stored,
                                   or not ready yet
   30002   RESOURCE NOT FOUND      a download link unknown, expired, used up, or whose
                                   recording has gone
   30003   DOWNLOAD BUSY           ``mp3_single_download``: another audio download is running
   30004   DOWNLOAD FAILED         a fault switch (``fail_mode="json"``, ``fail_download_urls``)
   ======  ======================  ==========================================================

3. Tokens. Access and refresh tokens are 32 random letters and digits. Lifetimes are fixed
   from issue (``access_token_ttl_s`` 1800, ``refresh_token_ttl_s`` 86400); using a token
   does not extend it (assumption). get_token returns exactly the fields of the guide's
   example. A refresh token works once (assumption): refresh_token returns a new pair and,
   with ``refresh_revokes_access`` (default, assumption), revokes the old pair's access
   token. At most ``max_valid_tokens`` (8) access tokens are valid at once (the Cloud
   Edition's rule, applied to every edition here): issuing one more revokes the oldest
   valid one, and its refresh token with it (assumption). del_token revokes the calling
   access token and its refresh token. A revoked token answers 20004, an expired one 20003
   (until a day after its pair's refresh token has ended; then it is just unknown, 20004).
   ``expire_all_tokens()`` makes every issued token expire now.
4. Lockout (the third-party summary's rule): 5 failed get_token calls from one IP within
   ``lockout_window_s`` (600 s) lock that IP for ``lockout_s`` (600 s; a real PBX keeps it
   blocked until an admin removes it). While locked, get_token answers 20002 even with the
   right credentials; calls with a valid access token keep working (assumption). A success
   clears the IP's failure count. A missing User-Agent or a bad refresh token is not a
   failed login.
5. recording/list and recording/search: ``page`` (default 1), ``page_size`` (default 20,
   1..10000; more is 10002), ``sort_by`` ``id`` (default) or ``time``, ``order_by``
   ``desc`` (default) or ``asc`` (assumption: defaults; a client should always send all
   four). Reply ``{"errcode":0,"errmsg":"SUCCESS","total_number":N,"data":[...]}`` with
   ``id`` (assigned 1, 2, ... in the order recordings are added), ``time`` (when the
   recording starts, i.e. the call was answered: the same instant as the file name's stamp),
   ``uid`` (the call id, assumption), ``call_from``, ``call_to``, ``duration`` (talk
   seconds), ``size`` (exact bytes of the download), ``call_type``, ``file``. A page past
   the end has an empty ``data`` and the true ``total_number``. search also takes
   ``start_time``/``end_time`` (Unix seconds, both ends inclusive, either may be left out),
   ``caller``/``callee`` (exact numbers) and ``ids`` (comma-separated), and filters on the
   recording's ``time`` (PBX clock). Recordings not yet written, added with
   ``in_cdr=False``, or deleted with ``keep_cdr=False`` are not listed.
6. Times. ``time`` in lists and ``time_start`` in events are written with the PBX's display
   format (``time_format``, a strftime pattern "<date> <time>", default
   ``%d/%m/%Y %H:%M:%S``) in the PBX's zone, on the PBX's clock (see Clocks). File names
   lead with the recording's start in the PBX's zone,
   ``YYYYMMDDhhmmss-<callid>-<from>-<to>-<Type>.wav`` (S-Series shape).
   system/information answers ``{"errcode":0,"errmsg":"SUCCESS","data":{...}}`` with
   ``device_name``, ``model_name``, ``sn``, ``firmware_version``, ``system_time`` (now, in
   the display format), ``system_date_format`` and ``system_time_format`` (the display
   format in Yeastar's tokens, e.g. ``DD/MM/YYYY`` and ``HH:mm:ss``), ``timestamp`` (now,
   Unix seconds) and ``up_time`` (assumption: field names and token spelling follow the
   third-party client's fixture).
7. Downloads. recording/download takes ``id`` or ``file`` (both: they must name the same
   recording, else 10002) and answers ``{"errcode":0,"errmsg":"SUCCESS","file":NAME,
   "download_resource_url":"/api/download/Recording-X.7.0.6-1-download-<stamp>-<16
   random>.wav"}``. The link is valid ``resource_ttl_s`` (1800 s) for any valid access token
   (assumption: not bound to the token that asked), reusable unless
   ``resource_single_use``. ``GET {base}{link}?access_token=T`` answers 200,
   ``Content-Type: audio/x-wav``, ``Content-Length`` and the bytes; a bad token is checked
   before the link (it does not use up a single-use link). Range is ignored by default
   (assumption: undocumented); ``range_mode`` switches it (see the fault switches). Errors
   on the link are JSON bodies as everywhere (HTTP 200).
8. WebSocket. ``GET /openapi/v1.0/subscribe?access_token=T`` with a valid RFC 6455 upgrade
   (and a User-Agent) switches protocols (101); a refused upgrade is an ordinary HTTP 200
   JSON error (assumption). Then the client sends ``{"topic_list":[...]}`` and gets the
   guide's ``{"errcode":0,"errmsg":"SUCCESS"}``; a new list replaces the old one; any other
   text gets ``{"errcode":10002,"errmsg":"PARAMETER ERROR"}``; binary messages are ignored;
   fragmented messages are reassembled. Frames sent before the 101 has been read are not
   supported (RFC 6455 §4.1 forbids them). Events are text frames
   ``{"type":30012,"sn":SN,"msg":"<JSON string>"}`` for subscribed topics only; ``msg``
   decodes to ``call_id, time_start, call_from, call_to, call_duration, talk_duration``
   (integers), ``status, type, recording`` (the file name), ``did_number``,
   ``src_trunk_name, dst_trunk_name``. Heartbeat: the text ``heartbeat`` is answered
   ``heartbeat response`` (as the guide shows); a ping gets a pong. Any client frame resets
   the idle timer; after ``ws_idle_timeout_s`` (60 s) without one the PBX sends close 1000
   "IDLE TIMEOUT" and drops the connection (assumption: the close frame). When the
   subscription's access token expires or is revoked the PBX sends close 1008 with the
   errmsg ("TOKEN EXPIRED" / "INVALID TOKEN") and drops it (assumption): a client
   reconnects with its new token and subscribes again. ``drop_websockets()`` cuts every
   connection without a close frame (a network drop); stopping sends close 1001. Client
   frames must be masked (else close 1002). Events announced while nobody is subscribed are
   lost, as on a real PBX: the catalogue must come from the list endpoints.
9. Webhook (``webhook_url``): each event is POSTed as its JSON object (the WebSocket text)
   with ``Content-Type: application/json`` and ``User-Agent: Yeastar-PBX-Webhook``
   (assumption); until a 2xx it is re-sent up to 3 times, ``event_retry_s`` (5 s) apart.
   Webhook events do not depend on any token.
10. Audio: the S-Series simulator's WAV bytes (PCM 16-bit 8 kHz mono) for the same name.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import queue
import random
import re
import secrets
import socket
import string
import threading
import time
from typing import Any, Callable, Optional
from urllib.parse import parse_qsl, urlsplit

from yeastarfs.sim.common import (
    CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_POLICY, CLOSE_PROTOCOL_ERROR, OP_BINARY, OP_CLOSE,
    OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, POLL_S, AudioCache, Frame, LoginGuard, Reply,
    RetryingPusher, SimClock, SimulatorBase, StreamingHandler, WebSocketError, audio_reply,
    close_payload, decode_frame, encode_frame, html_reply, json_reply, parse_close,
    parse_json_object, post_json, serve_http, ws_accept, ws_key_is_valid)
from yeastarfs.sim.sseries import (
    AUDIO_CACHE_BYTES, EVENT_RESENDS, MAX_BODY_BYTES, TCP_SEND_TIMEOUT_S,
    WAV_HEADER_BYTES, Simulator, wav_bytes, wav_data_bytes)

log = logging.getLogger(__name__)

SERIAL_NUMBER = "3631A0000001"
MODEL_NAME = "P-Series Software Edition"
FIRMWARE_VERSION = "83.23.0.123"
DEFAULT_TIME_FORMAT = "%d/%m/%Y %H:%M:%S"
NAME_STAMP_FORMAT = "%Y%m%d%H%M%S"
TIMESTART_FORMAT = "%Y-%m-%d %H:%M:%S"
API_PATH_RE = re.compile(r"^/openapi/[^/]+/(?P<endpoint>.+?)/?$")
RESOURCE_PREFIX = "/api/download/"
RESOURCE_ENDPOINT = "download"  # the counter and log name of link (audio) requests
TOKEN_ALPHABET = string.ascii_letters + string.digits
TOKEN_CHARS = 32
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 10000
TOPIC_NEW_CDR = 30012
CATALOGUE_ENDPOINTS = ("recording/list", "recording/search")
CHAOS_LATENCY_S = 0.3
WEBHOOK_USER_AGENT = "Yeastar-PBX-Webhook"
# Expired tokens are still recognised as expired (not unknown) for this long.
GRANT_MEMORY_S = 86400.0

# (errcode, errmsg): see the contract's table.
E_ENDPOINT = (10001, "INTERFACE NOT EXISTED")
E_PARAM = (10002, "PARAMETER ERROR")
E_METHOD = (10003, "METHOD NOT ALLOWED")
E_USER_AGENT = (10004, "USER AGENT REQUIRED")
E_CREDENTIALS = (20001, "AUTHENTICATION FAILED")
E_BLOCKED = (20002, "IP BLOCKED")
E_TOKEN_EXPIRED = (20003, "TOKEN EXPIRED")
E_TOKEN_INVALID = (20004, "INVALID TOKEN")
E_REFRESH_EXPIRED = (20005, "REFRESH TOKEN EXPIRED")
E_REFRESH_INVALID = (20006, "INVALID REFRESH TOKEN")
E_NO_RECORDING = (30001, "RECORDING NOT FOUND")
E_NO_RESOURCE = (30002, "RESOURCE NOT FOUND")
E_BUSY = (30003, "DOWNLOAD BUSY")
E_DOWNLOAD = (30004, "DOWNLOAD FAILED")

# strftime directives and how Yeastar's display settings spell them.
_DISPLAY_TOKENS = {"%Y": "YYYY", "%y": "YY", "%m": "MM", "%d": "DD", "%H": "HH", "%I": "hh",
                   "%M": "mm", "%S": "ss", "%p": "A"}


# ---------------------------------------------------------------------------------------
# Content


@dataclasses.dataclass(frozen=True)
class PSeriesRecording:
    """One recording the simulated PBX holds (attribute names shared with the S-Series one).

    Attributes:
        id: the list endpoint's id (1, 2, ... in the order recordings were added).
        name: the file name (``file`` in the API).
        callid: the call id (``uid`` in lists, ``call_id`` in events).
        start_epoch, record_epoch: Unix seconds on the PBX's clock when the call started /
            was answered (the recording's ``time``).
        timestart: the call's start, PBX-local ``yyyy-mm-dd hh:mm:ss`` (as S-Series).
        callfrom, callto, call_type, status, did_number: its CDR fields.
        call_s, talk_s: call and talk durations in whole seconds.
        size_bytes: exact WAV size (header + data), the list's ``size``.
        stored: False when recording/download answers 30001 although lists show it
            (also what ``delete_recording`` sets).
        in_cdr: whether recording/list and recording/search show it (``publish_cdr`` sets it).
        sha256: hex digest of the original WAV bytes (computed on first use).
    """

    id: int
    name: str
    callid: str
    start_epoch: float
    record_epoch: float
    timestart: str
    callfrom: str
    callto: str
    call_type: str
    status: str
    call_s: int
    talk_s: int
    size_bytes: int
    did_number: str = ""
    stored: bool = True
    in_cdr: bool = True

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.wav_bytes()).hexdigest()

    def wav_bytes(self, generation: int = 0) -> bytes:
        """Build the WAV bytes afresh (``PSeriesSimulator.recording_bytes`` caches them).

        *generation* 0 is the original; a later one is what the PBX holds after the bytes
        changed (``mutate_bytes_after_downloads``). The S-Series simulator's seeds: both
        families serve the same bytes for the same name.
        """
        seed = self.name if generation == 0 else f"{self.name}\0generation {generation}"
        return wav_bytes(seed, self.size_bytes)


def display_tokens(time_format: str) -> tuple[str, str]:
    """(date format, time format) of strftime pattern *time_format* in Yeastar's tokens.

    Raises ValueError unless it is "<date part> <time part>" made of known directives.
    """
    date_part, _, time_part = time_format.partition(" ")
    spelled = []
    for part in (date_part, time_part):
        unknown = set(re.findall(r"%.", part)) - set(_DISPLAY_TOKENS)
        if not part or unknown:
            raise ValueError(f"time_format {time_format!r}: need '<date> <time>' made of "
                             f"{' '.join(sorted(_DISPLAY_TOKENS))}")
        spelled.append(re.sub(r"%.", lambda m: _DISPLAY_TOKENS[m.group(0)], part))
    return spelled[0], spelled[1]


def _new_token() -> str:
    return "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(TOKEN_CHARS))


# ---------------------------------------------------------------------------------------
# Tokens, links, requests


@dataclasses.dataclass
class _Grant:
    """One pair of tokens, as get_token or refresh_token issued it (times on the sim clock)."""

    sequence: int
    access_token: str
    refresh_token: str
    access_expires: float
    refresh_expires: float
    access_revoked: bool = False
    refresh_spent: bool = False  # used by refresh_token, or revoked with its access token


@dataclasses.dataclass
class _Resource:
    """A download link handed out by recording/download."""

    name: str
    expires: float
    used: bool = False


@dataclasses.dataclass
class _Request:
    method: str
    path: str
    endpoint: str  # API endpoint, RESOURCE_ENDPOINT, or the raw path for anything else
    known: bool  # under /openapi/ or /api/download/
    query: dict[str, str]
    body: Optional[dict]  # None: the body is not a JSON object
    client_ip: str
    headers: Any  # email.message.Message from http.server

    @property
    def user_agent(self) -> str:
        return (self.headers.get("User-Agent") or "").strip()

    @property
    def is_upgrade(self) -> bool:
        connection = (self.headers.get("Connection") or "").lower()
        return ((self.headers.get("Upgrade") or "").lower() == "websocket"
                and "upgrade" in {part.strip() for part in connection.split(",")})


class _ApiError(Exception):
    """Raised by endpoint handlers; becomes ``{"errcode": ..., "errmsg": ...}``."""

    def __init__(self, error: tuple[int, str]) -> None:
        super().__init__(f"{error[0]} {error[1]}")
        self.errcode, self.errmsg = error


def _error_reply(error: tuple[int, str]) -> Reply:
    return json_reply({"errcode": error[0], "errmsg": error[1]})


def _success(**fields: Any) -> Reply:
    return json_reply({"errcode": 0, "errmsg": "SUCCESS", **fields})


def _int_param(query: dict[str, str], key: str, default: Optional[int], low: int,
               high: Optional[int] = None) -> Optional[int]:
    """Query parameter *key* as an int in [low, high]; *default* when absent. Raises 10002."""
    text = query.get(key, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise _ApiError(E_PARAM) from None
    if value < low or (high is not None and value > high):
        raise _ApiError(E_PARAM)
    return value


# ---------------------------------------------------------------------------------------
# The simulator


class PSeriesSimulator(SimulatorBase):
    """A Yeastar P-Series PBX on localhost.

    Attributes:
        base_url: ``http(s)://host:port`` (valid after ``start``).
        recordings: every recording by name. Read it freely; change it only via methods.
        counters: requests per endpoint (``get_token``, ``recording/list``, ...,
            ``download`` for the audio links, ``subscribe`` for upgrade requests), plus
            ``ws_subscribe`` (topic lists accepted), ``ws_push`` (events sent on
            WebSockets), ``event_push`` (webhook attempts) and ``refused``.
        requests_log: the last 10000 HTTP requests as dicts (endpoint, method, client_ip,
            query, body, user_agent, time), for test assertions only.
        fault and variant switches: see the module docstring.

    Multithreading: one lock (``_lock``) guards every shared field; see the module docstring.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, username: str = "api",
                 password: str = "secret", access_token_ttl_s: float = 1800.0,
                 refresh_token_ttl_s: float = 86400.0, resource_ttl_s: float = 1800.0,
                 max_valid_tokens: Optional[int] = 8, lockout_failures: int = 5,
                 lockout_s: float = 600.0, lockout_window_s: float = 600.0,
                 ws_idle_timeout_s: float = 60.0, time_format: str = DEFAULT_TIME_FORMAT,
                 tz: Optional[datetime.tzinfo] = None, webhook_url: Optional[str] = None,
                 event_retry_s: float = 5.0, sn: str = SERIAL_NUMBER,
                 certfile: Optional[str] = None, keyfile: Optional[str] = None) -> None:
        super().__init__()
        self.host, self.port = host, port
        # The API application's Client ID and Client Secret: get_token's username/password.
        self.username, self.password = username, password
        self.access_token_ttl_s, self.refresh_token_ttl_s = access_token_ttl_s, refresh_token_ttl_s
        self.resource_ttl_s = resource_ttl_s
        self.max_valid_tokens = max_valid_tokens
        self.ws_idle_timeout_s = ws_idle_timeout_s
        self.date_display, self.time_display = display_tokens(time_format)
        self.time_format, self.tz = time_format, tz
        self.webhook_url, self.event_retry_s = webhook_url, event_retry_s
        self.sn = sn
        self.certfile, self.keyfile = certfile, keyfile
        self.recordings: dict[str, PSeriesRecording] = {}
        self._clock = SimClock()
        self._guard = LoginGuard(lockout_failures, lockout_window_s, lockout_s)
        self._audio = AudioCache(AUDIO_CACHE_BYTES)
        self._next_id = 1
        self._by_id: dict[int, str] = {}
        self._ready_at: dict[str, float] = {}  # not written until then (simulator clock)
        self._grant_sequence = 0
        self._by_access: dict[str, _Grant] = {}
        self._by_refresh: dict[str, _Grant] = {}
        self._resources: dict[str, _Resource] = {}
        self._active_downloads = 0
        self._ws_clients: list[_WsClient] = []
        self._started_at = 0.0
        self._http: Any = None
        self._http_thread: Optional[threading.Thread] = None
        self._pusher: Optional[RetryingPusher] = None
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
        self.fail_download_urls = 0
        self.fail_logins = 0
        self.refuse_connections = False
        self.api_raw_reply: dict[str, bytes] = {}
        self.chaos = 0.0
        self._chaos_rng = random.Random(1)
        self.clock_offset_s = 0.0
        self.not_ready_s = 0.0
        self.resource_single_use = False
        self.mp3_single_download = False
        self.refresh_revokes_access = True
        self.audio_content_type = "audio/x-wav"
        self.omit_content_length = False

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> "PSeriesSimulator":
        """Bind the socket and serve on daemon threads; returns self."""
        if self._http is not None:
            return self
        self._stopping.clear()
        self._http, self._http_thread = serve_http(self, _Handler, self.host, self.port,
                                                   self.certfile, self.keyfile)
        self.port = self._http.server_address[1]
        self._started_at = self._clock.now()
        if self.webhook_url:
            self._pusher = RetryingPusher(self._deliver_webhook, lambda: self.event_retry_s,
                                          EVENT_RESENDS, "pbxsim-webhook")
            self._pusher.start()
        log.info("simulator: P-Series serving %s", self.base_url)
        return self

    def stop(self) -> None:
        """Close every socket and let the threads go; returns within about a second."""
        if self._http is None:
            return
        self._stopping.set()  # ends paced downloads, latency sleeps and WebSocket sessions
        self._http.shutdown()
        self._http.server_close()
        self._http_thread.join(timeout=1.0)
        if self._pusher is not None:
            self._pusher.stop()
        self._http = self._http_thread = self._pusher = None
        log.info("simulator: P-Series stopped")

    def subscribe_url(self, access_token: str) -> str:
        """The WebSocket URL for *access_token* (wss under TLS)."""
        scheme = "wss" if self.certfile else "ws"
        return (f"{scheme}://{self.host}:{self.port}/openapi/v1.0/subscribe"
                f"?access_token={access_token}")

    # -- clocks (see "Clocks" in the module docstring) -------------------------------------

    def advance_clock(self, seconds: float) -> None:
        """Move the simulator clock *seconds* forward: tokens, links, lockouts, WebSocket
        idleness and not-written-yet periods age at once. Raises ValueError if negative."""
        self._clock.advance(seconds)

    def pbx_time(self) -> float:
        """The PBX clock as Unix seconds: true time plus ``clock_offset_s``."""
        return time.time() + self.clock_offset_s

    def now_local(self) -> datetime.datetime:
        """The PBX's current local wall time, naive, to the second."""
        return self.local_time(int(self.pbx_time()))

    def local_time(self, epoch: float) -> datetime.datetime:
        """PBX-clock Unix seconds *epoch* as a naive wall time in the PBX's zone."""
        if self.tz is None:
            return datetime.datetime.fromtimestamp(epoch)
        return datetime.datetime.fromtimestamp(epoch, self.tz).replace(tzinfo=None)

    def display_time(self, epoch: float) -> str:
        """PBX-clock Unix seconds *epoch* as the PBX displays times (``time_format``)."""
        return self.local_time(epoch).strftime(self.time_format)

    def _pbx_epoch(self, moment: datetime.datetime) -> float:
        """PBX-clock Unix seconds of *moment*: a naive one is a wall time in the PBX's zone
        (this machine's when ``tz`` is None), an aware one a true instant."""
        if moment.tzinfo is not None and moment.utcoffset() is not None:
            return moment.timestamp() + self.clock_offset_s
        if self.tz is not None:
            moment = moment.replace(tzinfo=self.tz)
        return moment.timestamp()

    # -- content --------------------------------------------------------------------------

    def add_recording(self, *, start: Optional[datetime.datetime] = None, duration_s: float,
                      callfrom: str = "1001", callto: str = "2002", call_type: str = "Inbound",
                      callid: Optional[str] = None, status: str = "ANSWERED", ring_s: float = 5,
                      name: Optional[str] = None, size_bytes: Optional[int] = None,
                      in_cdr: bool = True, announce: bool = True, stored: bool = True,
                      ready_after_s: Optional[float] = None,
                      did_number: str = "") -> PSeriesRecording:
        """Add one recorded call; with *announce*, push its New CDR to subscribers and the webhook.

        *start*: naive = PBX-local wall time, aware = true instant, None = the call ends now
        (see Clocks). *ready_after_s*: the audio is not written (unlisted, "not found") until
        this long from now (simulator clock); None takes ``not_ready_s``.
        Raises ValueError if a recording of that name exists already.
        """
        if start is None:
            start_epoch = float(int(self.pbx_time() - ring_s - duration_s))
        else:
            start_epoch = self._pbx_epoch(start)
        if size_bytes is None:
            size_bytes = WAV_HEADER_BYTES + wav_data_bytes(duration_s)
        if size_bytes < WAV_HEADER_BYTES:
            raise ValueError(f"size_bytes must be at least {WAV_HEADER_BYTES}")
        with self._lock:
            rec_id, self._next_id = self._next_id, self._next_id + 1
        if callid is None:
            callid = f"{int(start_epoch - self.clock_offset_s)}.{rec_id}"
        # The recording begins when the call is answered, ring_s after it started.
        record_epoch = start_epoch + ring_s
        if name is None:
            stamp = self.local_time(record_epoch).strftime(NAME_STAMP_FORMAT)
            name = f"{stamp}-{callid}-{callfrom}-{callto}-{call_type}.wav"
        talk_s = round(duration_s)
        rec = PSeriesRecording(
            id=rec_id, name=name, callid=callid, start_epoch=start_epoch,
            record_epoch=record_epoch,
            timestart=self.local_time(start_epoch).strftime(TIMESTART_FORMAT),
            callfrom=callfrom, callto=callto, call_type=call_type, status=status,
            call_s=talk_s + round(ring_s), talk_s=talk_s, size_bytes=size_bytes,
            did_number=did_number, stored=stored, in_cdr=in_cdr)
        not_ready_s = self.not_ready_s if ready_after_s is None else ready_after_s
        with self._lock:
            if name in self.recordings:
                raise ValueError(f"recording {name!r} exists already")
            self.recordings[name] = rec
            self._by_id[rec_id] = name
            if not_ready_s > 0:
                self._ready_at[name] = self._clock.now() + not_ready_s
        if announce:
            self._announce(rec)
        return rec

    def populate(self, count: int, *, days: float = 7, now: Optional[datetime.datetime] = None,
                 seed: int = 1, min_s: int = 5, max_s: int = 120) -> list[PSeriesRecording]:
        """Add *count* deterministic, unannounced, ready recordings spread over the last *days*
        days before *now* (naive = PBX-local, aware = true instant, None = the PBX's now).

        The calls are the S-Series simulator's for the same seed (its populate calls back
        into this ``add_recording``), so the benchmark and the demo compare the two families
        on the same data.
        """
        if now is None:
            now = self.now_local()
        elif now.tzinfo is not None:
            now = self.local_time(self._pbx_epoch(now))
        return Simulator.populate(self, count, days=days, now=now,  # type: ignore[arg-type]
                                  seed=seed, min_s=min_s, max_s=max_s)

    def publish_cdr(self, name: str, *, announce: bool = False) -> PSeriesRecording:
        """List recording *name* from now on (added with ``in_cdr=False``: a late row); with
        *announce*, push its New CDR too. Raises KeyError for an unknown name."""
        rec = self._replace_recording(name, in_cdr=True)
        if announce:
            self._announce(rec)
        return rec

    def delete_recording(self, name: str, *, keep_cdr: bool = True) -> PSeriesRecording:
        """The PBX's auto-cleanup deletes *name*'s audio: recording/download answers 30001 and
        its links 30002; it stays listed unless *keep_cdr* is False. Returns the updated
        recording; raises KeyError for an unknown name."""
        with self._lock:  # one critical section: a concurrent publish_cdr is not lost
            old = self.recordings[name]
            rec = dataclasses.replace(old, stored=False, in_cdr=old.in_cdr and keep_cdr)
            self.recordings[name] = rec
        return rec

    def make_ready(self, name: str) -> None:
        """End *name*'s not-written-yet period now. Raises KeyError for an unknown name."""
        with self._lock:
            if name not in self.recordings:
                raise KeyError(name)
            self._ready_at.pop(name, None)

    def _replace_recording(self, name: str, **changes: Any) -> PSeriesRecording:
        with self._lock:
            rec = dataclasses.replace(self.recordings[name], **changes)
            self.recordings[name] = rec
        return rec

    def recording_bytes(self, name: str) -> bytes:
        """The WAV bytes recording *name* has now (the next download sends them, unless
        ``mutate_bytes_after_downloads`` changes them first). KeyError for an unknown name."""
        with self._lock:
            generation = self._generations.get(name, 0)
        return self._audio_of(name, generation)

    def _audio_of(self, name: str, generation: int) -> bytes:
        with self._lock:
            rec = self.recordings[name]
        return self._audio.get(f"{generation}:{name}", lambda: rec.wav_bytes(generation))

    # -- observation and faults ------------------------------------------------------------

    def reset(self) -> None:
        """Clear counters, the log and every switch (lockouts included); keep content, tokens,
        subscriptions and the clocks."""
        with self._lock:
            self._clear_observations_locked()
            self._guard.clear()
            self._set_default_faults()

    def expire_all_tokens(self) -> None:
        """Make every access and refresh token issued so far expire now (answers 20003/20005)."""
        now = self._clock.now()
        with self._lock:
            for grant in self._by_access.values():
                grant.access_expires = min(grant.access_expires, now)
                grant.refresh_expires = min(grant.refresh_expires, now)

    def lock_ip(self, ip: str = "127.0.0.1") -> None:
        """Lock *ip* out of get_token for ``lockout_s``, as 5 failed logins would."""
        with self._lock:
            self._guard.lock(ip, self._clock.now())

    def unlock_all(self) -> None:
        """Lift every lockout and forget failed logins (an admin removed the blocked IPs)."""
        with self._lock:
            self._guard.clear()

    def drop_websockets(self) -> None:
        """Cut every WebSocket connection without a close frame (clients must reconnect)."""
        with self._lock:
            clients, self._ws_clients = self._ws_clients, []
        for client in clients:
            client.drop()

    def websocket_count(self) -> int:
        """WebSocket connections open now."""
        with self._lock:
            return len(self._ws_clients)

    # -- request dispatch (called on handler threads) ------------------------------------

    def _pause(self, req: _Request) -> None:
        """Apply ``latency_s`` (plus ``cdr_latency_s`` for the catalogue) before answering
        *req*; wakes early when the simulator stops."""
        delay = self.latency_s
        if req.endpoint in CATALOGUE_ENDPOINTS:
            delay += self.cdr_latency_s
        if delay > 0:
            self._stopping.wait(delay)

    def _request(self, method: str, target: str, raw_body: bytes, client_ip: str,
                 headers: Any) -> _Request:
        split = urlsplit(target)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        match = API_PATH_RE.match(split.path)
        if match is not None:
            endpoint, known = match.group("endpoint"), True
        elif split.path.startswith(RESOURCE_PREFIX):
            endpoint, known = RESOURCE_ENDPOINT, True
        else:
            endpoint, known = split.path, False
        req = _Request(method, split.path, endpoint, known, query, parse_json_object(raw_body),
                       client_ip, headers)
        self._record(req, has_body=bool(raw_body.strip()))
        return req

    def _dispatch(self, req: _Request) -> Reply:
        if not req.known:
            return html_reply(404, "404 Not Found")
        raw = self.api_raw_reply.get(req.endpoint)
        if raw is not None:
            return Reply(body=bytes(raw))
        if not req.user_agent:
            return _error_reply(E_USER_AGENT)
        route = _ROUTES.get(req.endpoint)
        if route is None:
            return _error_reply(E_ENDPOINT)
        handler_name, methods = route
        if req.method not in methods:
            return _error_reply(E_METHOD)
        try:
            return getattr(self, handler_name)(req)
        except _ApiError as error:
            log.debug("simulator: %s from %s failed: %s %s", req.endpoint, req.client_ip,
                      error.errcode, error.errmsg)
            return _error_reply((error.errcode, error.errmsg))

    def _record(self, req: _Request, has_body: bool) -> None:
        entry = {
            "endpoint": req.endpoint, "method": req.method, "client_ip": req.client_ip,
            "query": dict(req.query), "body": req.body if has_body else None,
            "user_agent": req.headers.get("User-Agent"), "time": time.time(),
        }
        self._log_request(req.endpoint, entry)

    @staticmethod
    def _json_body(req: _Request) -> dict:
        if req.body is None:
            raise _ApiError(E_PARAM)
        return req.body

    # -- tokens ---------------------------------------------------------------------------

    def _token_problem_locked(self, token: str, now: float) -> Optional[tuple[int, str]]:
        """None if *token* is a valid access token, else the error it deserves."""
        grant = self._by_access.get(token) if token else None
        if grant is None or grant.access_revoked:
            return E_TOKEN_INVALID
        if grant.access_expires <= now:
            return E_TOKEN_EXPIRED
        return None

    def _token_problem(self, token: str) -> Optional[tuple[int, str]]:
        now = self._clock.now()
        with self._lock:
            return self._token_problem_locked(token, now)

    def _authenticate(self, req: _Request) -> str:
        """The request's valid access token. Raises _ApiError 20003/20004."""
        token = req.query.get("access_token", "")
        problem = self._token_problem(token)
        if problem is not None:
            raise _ApiError(problem)
        return token

    def _issue_locked(self, now: float) -> _Grant:
        """A new token pair; revokes the oldest valid access tokens beyond ``max_valid_tokens``."""
        self._forget_old_grants_locked(now)
        if self.max_valid_tokens:
            valid = sorted((g for g in self._by_access.values()
                            if not g.access_revoked and g.access_expires > now),
                           key=lambda g: g.sequence)
            for grant in valid[:max(0, len(valid) - self.max_valid_tokens + 1)]:
                grant.access_revoked = grant.refresh_spent = True
                log.info("simulator: token limit reached, oldest access token revoked")
        self._grant_sequence += 1
        grant = _Grant(self._grant_sequence, _new_token(), _new_token(),
                       now + self.access_token_ttl_s, now + self.refresh_token_ttl_s)
        self._by_access[grant.access_token] = grant
        self._by_refresh[grant.refresh_token] = grant
        return grant

    def _forget_old_grants_locked(self, now: float) -> None:
        stale = [g for g in self._by_access.values()
                 if max(g.access_expires, g.refresh_expires) + GRANT_MEMORY_S < now]
        for grant in stale:
            del self._by_access[grant.access_token]
            self._by_refresh.pop(grant.refresh_token, None)

    def _token_reply(self, grant: _Grant) -> Reply:
        return _success(access_token_expire_time=int(self.access_token_ttl_s),
                        access_token=grant.access_token,
                        refresh_token_expire_time=int(self.refresh_token_ttl_s),
                        refresh_token=grant.refresh_token)

    def _get_token(self, req: _Request) -> Reply:
        body = self._json_body(req)
        ip, now = req.client_ip, self._clock.now()
        with self._lock:
            if self._guard.is_locked(ip, now):
                raise _ApiError(E_BLOCKED)
            if self.fail_logins > 0:
                self.fail_logins -= 1
                raise _ApiError(E_CREDENTIALS)
            if body.get("username") != self.username or body.get("password") != self.password:
                if self._guard.note_failure(ip, now):
                    log.info("simulator: %s blocked after %d failed logins", ip,
                             self._guard.failures)
                raise _ApiError(E_CREDENTIALS)
            self._guard.note_success(ip)
            grant = self._issue_locked(now)
        log.info("simulator: token issued to %s", ip)
        return self._token_reply(grant)

    def _refresh_token(self, req: _Request) -> Reply:
        body = self._json_body(req)
        token = body.get("refresh_token")
        if not isinstance(token, str) or not token:
            raise _ApiError(E_PARAM)
        now = self._clock.now()
        with self._lock:
            old = self._by_refresh.get(token)
            if old is None or old.refresh_spent:
                raise _ApiError(E_REFRESH_INVALID)
            if old.refresh_expires <= now:
                raise _ApiError(E_REFRESH_EXPIRED)
            old.refresh_spent = True
            if self.refresh_revokes_access:
                old.access_revoked = True
            grant = self._issue_locked(now)
        return self._token_reply(grant)

    def _del_token(self, req: _Request) -> Reply:
        token = self._authenticate(req)
        with self._lock:
            grant = self._by_access[token]
            grant.access_revoked = grant.refresh_spent = True
        return _success()

    # -- catalogue ------------------------------------------------------------------------

    def _system_information(self, req: _Request) -> Reply:
        self._authenticate(req)
        now = self.pbx_time()
        return _success(data={
            "device_name": "PBX", "model_name": MODEL_NAME, "sn": self.sn,
            "firmware_version": FIRMWARE_VERSION, "system_time": self.display_time(now),
            "up_time": int(self._clock.now() - self._started_at),
            "system_date_format": self.date_display, "system_time_format": self.time_display,
            "timestamp": int(now)})

    def _recording_list(self, req: _Request) -> Reply:
        self._authenticate(req)
        return self._page(req, lambda rec: True)

    def _recording_search(self, req: _Request) -> Reply:
        self._authenticate(req)
        q = req.query
        first = _int_param(q, "start_time", None, 0)
        last = _int_param(q, "end_time", None, 0)
        ids = None
        if q.get("ids", "").strip():
            try:
                ids = {int(part) for part in q["ids"].split(",") if part.strip()}
            except ValueError:
                raise _ApiError(E_PARAM) from None
        caller, callee = q.get("caller", "").strip(), q.get("callee", "").strip()

        def wanted(rec: PSeriesRecording) -> bool:
            return ((first is None or rec.record_epoch >= first)
                    and (last is None or rec.record_epoch <= last)
                    and (ids is None or rec.id in ids)
                    and (not caller or rec.callfrom == caller)
                    and (not callee or rec.callto == callee))

        return self._page(req, wanted)

    def _page(self, req: _Request, wanted: Callable[[PSeriesRecording], bool]) -> Reply:
        """One page of the listed recordings that *wanted* keeps, sorted as the query says."""
        q = req.query
        page = _int_param(q, "page", 1, 1)
        size = _int_param(q, "page_size", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
        sort_by, order_by = q.get("sort_by", "id") or "id", q.get("order_by", "desc") or "desc"
        if sort_by not in ("id", "time") or order_by not in ("asc", "desc"):
            raise _ApiError(E_PARAM)
        now = self._clock.now()
        with self._lock:
            listed = [r for r in self.recordings.values()
                      if r.in_cdr and self._ready_at.get(r.name, 0.0) <= now and wanted(r)]
        if sort_by == "id":
            listed.sort(key=lambda r: r.id, reverse=order_by == "desc")
        else:
            listed.sort(key=lambda r: (r.record_epoch, r.id), reverse=order_by == "desc")
        chosen = listed[(page - 1) * size:page * size]
        return _success(total_number=len(listed), data=[self._list_entry(r) for r in chosen])

    def _list_entry(self, rec: PSeriesRecording) -> dict:
        return {"id": rec.id, "time": self.display_time(rec.record_epoch), "uid": rec.callid,
                "call_from": rec.callfrom, "call_to": rec.callto, "duration": rec.talk_s,
                "size": rec.size_bytes, "call_type": rec.call_type, "file": rec.name}

    # -- downloads ------------------------------------------------------------------------

    def _find_downloadable_locked(self, req: _Request, now: float) -> PSeriesRecording:
        by_id = _int_param(req.query, "id", None, 0)
        by_file = req.query.get("file", "")
        if by_id is None and not by_file:
            raise _ApiError(E_PARAM)
        name = self._by_id.get(by_id) if by_id is not None else by_file
        if by_id is not None and by_file and name != by_file:
            raise _ApiError(E_PARAM)
        rec = self.recordings.get(name) if name else None
        if rec is None or not rec.stored or self._ready_at.get(rec.name, 0.0) > now:
            raise _ApiError(E_NO_RECORDING)
        return rec

    def _recording_download(self, req: _Request) -> Reply:
        self._authenticate(req)
        now = self._clock.now()
        with self._lock:
            if self.fail_download_urls > 0:
                self.fail_download_urls -= 1
                raise _ApiError(E_DOWNLOAD)
            rec = self._find_downloadable_locked(req, now)
            stamp = self.local_time(self.pbx_time()).strftime(NAME_STAMP_FORMAT)
            ext = rec.name.rsplit(".", 1)[-1] if "." in rec.name else "wav"
            suffix = "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(16))
            link = f"{RESOURCE_PREFIX}Recording-X.7.0.6-1-download-{stamp}-{suffix}.{ext}"
            if len(self._resources) > 1024:  # keep the table small: drop the expired links
                for old in [k for k, v in self._resources.items() if v.expires <= now]:
                    del self._resources[old]
            self._resources[link] = _Resource(rec.name, now + self.resource_ttl_s)
        return _success(file=rec.name, download_resource_url=link)

    def _resource_download(self, req: _Request) -> Reply:
        self._authenticate(req)  # before the link: a bad token must not use it up
        now = self._clock.now()
        with self._lock:
            resource = self._resources.get(req.path)
            if (resource is None or resource.expires <= now
                    or (self.resource_single_use and resource.used)):
                raise _ApiError(E_NO_RESOURCE)
            rec = self.recordings.get(resource.name)
            if rec is None or not rec.stored:
                raise _ApiError(E_NO_RESOURCE)
            if self.mp3_single_download and self._active_downloads > 0:
                raise _ApiError(E_BUSY)
            resource.used = True
            self._active_downloads += 1
        try:
            reply = self._audio_or_fault(rec, req.headers.get("Range"))
        except BaseException:
            self._download_finished()
            raise
        reply.on_done = self._download_finished
        return reply

    def _download_finished(self) -> None:
        with self._lock:
            self._active_downloads -= 1

    def _audio_or_fault(self, rec: PSeriesRecording, range_header: Optional[str]) -> Reply:
        data = memoryview(self._audio_of(rec.name, self._count_download(rec.name)))
        failure_mode, reset_at = self._download_faults()
        if failure_mode == "latency":
            self._stopping.wait(CHAOS_LATENCY_S)
            failure_mode = None
        if failure_mode is not None:
            return _failed_download(failure_mode, data)
        reply = audio_reply(data, range_header, range_mode=self.range_mode,
                            announced_size=self.announce_size_bytes,
                            content_type=self.audio_content_type,
                            omit_length=self.omit_content_length)
        if reset_at is not None:
            reply.cut_after, reply.cut_with_rst = reset_at, True
        return reply

    # -- events ---------------------------------------------------------------------------

    def new_cdr_event(self, rec: PSeriesRecording) -> dict:
        """The 30012 (New CDR) event of *rec*: ``msg`` is a JSON string, as the PBX sends it."""
        trunk_in = "SimTrunk" if rec.call_type == "Inbound" else ""
        trunk_out = "SimTrunk" if rec.call_type == "Outbound" else ""
        msg = {
            "call_id": rec.callid, "time_start": self.display_time(rec.start_epoch),
            "call_from": rec.callfrom, "call_to": rec.callto, "call_duration": rec.call_s,
            "talk_duration": rec.talk_s, "src_trunk_name": trunk_in,
            "dst_trunk_name": trunk_out, "status": rec.status, "type": rec.call_type,
            "recording": rec.name, "did_number": rec.did_number,
        }
        return {"type": TOPIC_NEW_CDR, "sn": self.sn, "msg": json.dumps(msg)}

    def _announce(self, rec: PSeriesRecording) -> None:
        """Queue the New CDR of *rec* for every subscribed WebSocket and the webhook."""
        if self._http is None:
            log.debug("simulator: not started, New CDR for %s not announced", rec.name)
            return
        text = json.dumps(self.new_cdr_event(rec))
        with self._lock:
            clients = [c for c in self._ws_clients if TOPIC_NEW_CDR in c.topics]
        for client in clients:
            client.outbox.put(text)
        if self._pusher is not None:
            self._pusher.submit(text.encode("utf-8"))

    def _deliver_webhook(self, body: bytes) -> bool:
        """One webhook attempt (pusher thread); True once the receiver answered 2xx."""
        self._count("event_push")
        status = post_json(self.webhook_url, body, {"Content-Type": "application/json",
                                                    "User-Agent": WEBHOOK_USER_AGENT})
        return status is not None and 200 <= status < 300

    def _subscribe(self, req: _Request) -> Reply:
        """Check a WebSocket upgrade; the 101 reply (the handler then runs the session)."""
        self._authenticate(req)
        key = (req.headers.get("Sec-WebSocket-Key") or "").strip()
        if (not req.is_upgrade or req.headers.get("Sec-WebSocket-Version", "").strip() != "13"
                or not ws_key_is_valid(key)):
            raise _ApiError(E_PARAM)
        return Reply(status=101, headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                          "Sec-WebSocket-Accept": ws_accept(key)})

    def _register_ws(self, client: "_WsClient") -> None:
        with self._lock:
            self._ws_clients.append(client)

    def _unregister_ws(self, client: "_WsClient") -> None:
        with self._lock:
            if client in self._ws_clients:
                self._ws_clients.remove(client)


_ROUTES = {
    "get_token": ("_get_token", {"POST"}),
    "refresh_token": ("_refresh_token", {"POST"}),
    "del_token": ("_del_token", {"GET", "POST"}),
    "system/information": ("_system_information", {"GET"}),
    "recording/list": ("_recording_list", {"GET"}),
    "recording/search": ("_recording_search", {"GET"}),
    "recording/download": ("_recording_download", {"GET"}),
    "subscribe": ("_subscribe", {"GET"}),
    RESOURCE_ENDPOINT: ("_resource_download", {"GET"}),
}


def _failed_download(mode: str, data: memoryview) -> Reply:
    """An audio download that fails in the shape *mode* names (see ``fail_mode``)."""
    if mode == "http500":
        return html_reply(500, "500 Internal Server Error")
    if mode == "html":
        return html_reply(200, "Yeastar P-Series login")
    if mode == "truncate":
        return Reply(content_type="audio/x-wav", stream=data, cut_after=len(data) // 2)
    if mode == "overlong":
        return Reply(content_type="audio/x-wav", stream=data, content_length=len(data) // 2)
    if mode != "json":
        log.warning("simulator: unknown fail_mode %r, answering json", mode)
    return _error_reply(E_DOWNLOAD)


# ---------------------------------------------------------------------------------------
# HTTP transport


class _Handler(StreamingHandler):
    """Turns one HTTP request into a ``PSeriesSimulator._dispatch`` call, or a WebSocket session."""

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        sim = self.server.simulator
        raw_body = self.read_body(MAX_BODY_BYTES)
        req = sim._request(method, self.path, raw_body, self.client_address[0], self.headers)
        sim._pause(req)
        reply = sim._dispatch(req)
        if reply.status != 101:
            self.send_reply(reply)
            return
        self.send_response(101)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.close_connection = True
        _WsClient(sim, self.connection, req.query["access_token"]).serve()


# ---------------------------------------------------------------------------------------
# WebSocket subscriptions


class _WsClient:
    """One subscribed WebSocket: its handler thread reads frames, answers, and sends events.

    Events arrive through ``outbox`` (any thread); only the session thread writes to the
    socket. ``topics`` is replaced, never mutated, so readers under the simulator's lock
    see a consistent set.
    """

    def __init__(self, sim: PSeriesSimulator, conn: socket.socket, token: str) -> None:
        self._sim, self._conn, self._token = sim, conn, token
        self.topics: frozenset = frozenset()
        self.outbox: "queue.Queue[str]" = queue.Queue()
        self._dropped = threading.Event()
        self._buffer = b""
        self._fragments: Optional[list[bytes]] = None

    def drop(self) -> None:
        """Cut the connection at once (any thread)."""
        self._dropped.set()
        try:
            self._conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def serve(self) -> None:
        sim = self._sim
        sim._register_ws(self)
        try:
            self._loop()
        except WebSocketError as exc:
            log.debug("simulator: WebSocket protocol error: %s", exc)
            self._close(CLOSE_PROTOCOL_ERROR, "PROTOCOL ERROR")
        except OSError as exc:
            log.debug("simulator: WebSocket ended: %s", exc)
        finally:
            sim._unregister_ws(self)

    def _loop(self) -> None:
        sim = self._sim
        last_heard = sim._clock.now()
        while not self._dropped.is_set():
            if sim._stopping.is_set():
                self._close(CLOSE_GOING_AWAY, "PBX STOPPING")
                return
            self._flush_outbox()
            problem = sim._token_problem(self._token)
            if problem is not None:
                self._close(CLOSE_POLICY, problem[1])
                return
            if sim._clock.now() - last_heard >= sim.ws_idle_timeout_s:
                self._close(CLOSE_NORMAL, "IDLE TIMEOUT")
                return
            self._conn.settimeout(POLL_S)
            try:
                data = self._conn.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return
            self._buffer += data
            while True:
                decoded = decode_frame(self._buffer)
                if decoded is None:
                    break
                frame, used = decoded
                self._buffer = self._buffer[used:]
                last_heard = sim._clock.now()
                if not self._handle(frame):
                    return

    def _handle(self, frame: Frame) -> bool:
        """Answer one client frame; False when the session is over."""
        if not frame.masked:
            raise WebSocketError("client frames must be masked")
        if frame.opcode == OP_PING:
            self._send(OP_PONG, frame.payload)
        elif frame.opcode == OP_CLOSE:
            code, _ = parse_close(frame.payload)
            self._send(OP_CLOSE, close_payload(code or CLOSE_NORMAL))
            return False
        elif frame.opcode in (OP_TEXT, OP_BINARY, OP_CONTINUATION):
            self._data_frame(frame)
        return True  # pongs are only heard (they reset the idle timer)

    def _data_frame(self, frame: Frame) -> None:
        """Reassemble fragmented messages; text messages are answered, binary ignored."""
        if frame.opcode == OP_CONTINUATION:
            if self._fragments is None:
                raise WebSocketError("continuation without a message")
            self._fragments.append(frame.payload)
        elif self._fragments is not None:
            raise WebSocketError("new message inside a fragmented one")
        else:
            self._fragments = [bytes([frame.opcode]), frame.payload]
        if not frame.fin:
            return
        parts, self._fragments = self._fragments, None
        if parts[0][0] == OP_TEXT:
            self._text(b"".join(parts[1:]).decode("utf-8", "replace"))

    def _text(self, text: str) -> None:
        if text.strip() == "heartbeat":
            self._send(OP_TEXT, b"heartbeat response")
            return
        try:
            message = json.loads(text)
        except ValueError:
            message = None
        topics = message.get("topic_list") if isinstance(message, dict) else None
        if not isinstance(topics, list) or not all(isinstance(t, int) for t in topics):
            self._send_json({"errcode": E_PARAM[0], "errmsg": E_PARAM[1]})
            return
        with self._sim._lock:
            self.topics = frozenset(topics)
        self._sim._count("ws_subscribe")
        self._send_json({"errcode": 0, "errmsg": "SUCCESS"})

    def _flush_outbox(self) -> None:
        while True:
            try:
                text = self.outbox.get_nowait()
            except queue.Empty:
                return
            self._send(OP_TEXT, text.encode("utf-8"))
            self._sim._count("ws_push")

    def _send_json(self, value: dict) -> None:
        self._send(OP_TEXT, json.dumps(value).encode("utf-8"))

    def _send(self, opcode: int, payload: bytes) -> None:
        # A long timeout for writes: a frame cut by a timeout would corrupt the stream.
        self._conn.settimeout(TCP_SEND_TIMEOUT_S)
        self._conn.sendall(encode_frame(opcode, payload, mask=False))

    def _close(self, code: int, reason: str) -> None:
        """Send a close frame (best effort); the handler closes the socket afterwards."""
        try:
            self._send(OP_CLOSE, close_payload(code, reason))
        except OSError:
            pass
