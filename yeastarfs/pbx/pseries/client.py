"""PSeriesClient: every HTTP conversation with the Yeastar P-Series OpenAPI
(yeastar-p-series-api.md; the simulator's contract fixes what the guides leave open).

Owns:
    the session   ``get_token`` (the API application's Client ID and Secret), renewal with
                  ``refresh_token`` before the access token runs out (a thread), a fresh
                  ``get_token`` only when the refresh token is refused or expired, and
                  ``del_token`` of every access token it replaces and at the end, so that a
                  mount never holds more than one valid token (the Cloud Edition revokes
                  the oldest past 8 per application). A rejected login stops logins for 5
                  minutes, a lockout for 10, as for the S-Series: the PBX blocks an IP after
                  a few failures. An expired or refused token is recognised by its errcode
                  (20003, 20004) *or* an ``errmsg`` saying ``TOKEN EXPIRED`` / ``INVALID
                  TOKEN``; the call is then made once more with a renewed token.
    calls         GET ``/openapi/v1.0/<endpoint>?access_token=…`` answered by JSON with
                  ``errcode``; every failure leaves as an ``errors`` type.
    downloads     two steps: ``recording/download?file=`` for a resource URL, then GET of
                  that URL. A URL is kept for reuse within its lifetime (a resumed or
                  repeated download skips the first step) until the PBX refuses a reused
                  one: from then on every download asks afresh (`links_reusable`). A URL
                  must be a path on the PBX itself: the token is never sent elsewhere.
                  ``Range`` is asked for; a 200 instead of 206 is the caller's to verify
                  (downloads.py does). Recordings stored as mp3 are downloaded one at a
                  time (the guide says the PBX allows no more).

Leaves to others: which windows to list (``catalogue``), events (``websocket``, and the
shared webhook receiver), the body checks and the TLS/proxy rules (``pbx/transport``), what
the rows mean (``records``).

Secrets: the client secret and the live access and refresh tokens are registered with
`errors.register_secret` (replaced ones are forgotten); ``errors.redact`` also masks
``access_token=`` wherever it is quoted. Resource URLs are not secrets (they need a token).

Threading: every method may be called from any thread. ``_state_lock`` guards the tokens,
their times and the URL table and is never held during I/O. ``_login_lock`` serialises
renewals and logins *on purpose* (held during those requests): threads that find the
token dead share one renewal instead of racing to several tokens. Lock order:
``_login_lock`` before ``_state_lock``. The renewal thread runs between `start_renewal` and
`stop`. Token listeners (`on_token`) are called on whichever thread renewed, holding
``_login_lock`` only: they must be quick and call nothing of the client.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading
import time
import urllib.parse
from typing import Callable, Optional, Union

from yeastarfs import errors, metrics
from yeastarfs.pbx.clock import PbxClock
from yeastarfs.pbx.transport import (MAX_ERROR_BODY_BYTES, ClientStats, HttpTransport, RecordingStream, open_body,
                                     read_capped)

log = logging.getLogger(__name__)

API_PATH = "openapi/v1.0"
# Every request must carry a User-Agent (the guide's examples send this one).
USER_AGENT = "OpenAPI"
TOKEN_ERRCODES = {20003, 20004}
REFRESH_REFUSED_ERRCODES = {20005, 20006}
AUTH_FAILED_ERRCODE = 20001
BLOCKED_ERRCODE = 20002
NOT_FOUND_ERRCODE = 30001
RESOURCE_GONE_ERRCODE = 30002
BUSY_ERRCODE = 30003
# What an errmsg says when the token is the trouble, whatever the errcode.
TOKEN_MESSAGES = ("TOKEN EXPIRED", "INVALID TOKEN")
ACCESS_TOKEN_TTL_S = 1800.0   # the guide's lifetimes, used when a reply does not say
REFRESH_TOKEN_TTL_S = 86400.0
MAX_TOKEN_TTL_S = 7 * 86400.0
# Renew this long before the access token runs out (at most a fifth of its lifetime).
RENEW_MARGIN_S = 300.0
AUTH_RETRY_AFTER_S = 300.0
LOCKOUT_RETRY_AFTER_S = 600.0
# A resource URL lives 30 minutes (the guide); reuse it only well within that.
LINK_REUSE_S = 25 * 60.0
LINKS_REMEMBERED = 1000
# How long a download waits for the one mp3 slot before it fails (and downloads.py retries).
MP3_SLOT_WAIT_S = 30.0
# A page of 1000 rows is about 250 KB of JSON.
MAX_REPLY_BYTES = 8 << 20


@dataclasses.dataclass
class PSeriesStats(ClientStats):
    """Every family's counters, and the P-Series' own: token renewals, download links."""

    renewals: int = 0
    links_asked: int = 0
    links_reused: int = 0


@dataclasses.dataclass
class _Tokens:
    access: str
    refresh: str
    access_until: float    # time.monotonic()
    refresh_until: float
    issued_at: float       # time.time()
    lifetime_s: float


class _TokenRefused(errors.PbxError):
    """Internal: the PBX refused the token a request carried."""


class _LinkRefused(errors.PbxError):
    """Internal: the PBX refused a resource URL (30002)."""


class PSeriesClient:
    """A session with one P-Series PBX.

    Attributes:
        base_url: ``scheme://host:port`` of the PBX's web server.
        stats: counters of what this client did.
        clock: the `PbxClock` that every reply's Date header feeds.
        links_reusable: None until a reused resource URL worked (True) or was refused (False).

    Multithreading: see the module docstring.
    """

    def __init__(self, base_url: str, client_id: str, secret: str, *, verify: Union[bool, str] = True,
                 pin_sha256: Optional[str] = None, proxy: Optional[str] = None,
                 clock: Optional[PbxClock] = None, connect_timeout_s: float = 10.0,
                 read_timeout_s: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.clock = clock if clock is not None else PbxClock()
        self._client_id = client_id
        self._secret = secret
        errors.register_secret(secret)
        self._timeouts = (connect_timeout_s, read_timeout_s)
        self._transport = HttpTransport(self.base_url, verify=verify, pin_sha256=pin_sha256, proxy=proxy,
                                        note_date=self.clock.note_date, user_agent=USER_AGENT)
        self._login_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._tokens: Optional[_Tokens] = None
        self._refuse_login_until = 0.0
        self._last_auth_error: Optional[errors.AuthError] = None
        self._ended = False  # after logout: no new token (downloads still ending must not get one)
        self._links: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()
        self.links_reusable: Optional[bool] = None
        self._mp3_slot = threading.BoundedSemaphore(1)
        self._listeners: list[Callable[[str], None]] = []
        self.stats = PSeriesStats()
        self._stop = threading.Event()
        self._renewal_thread: Optional[threading.Thread] = None

    # -- the session ---------------------------------------------------------------------------

    def login(self) -> str:
        """Get a token pair unless a valid one is held; return the access token.

        Raises AuthError, LockedOutError, PbxUnavailableError.
        """
        with self._login_lock:
            tokens = self._valid_tokens()
            return tokens.access if tokens is not None else self._get_token_locked()

    def current_token(self) -> str:
        """A valid access token, renewed first when it is about to run out. Raises like `login`."""
        tokens = self._valid_tokens()
        if tokens is not None and time.monotonic() < self._renew_at(tokens):
            return tokens.access
        with self._login_lock:
            tokens = self._valid_tokens()
            if tokens is not None and time.monotonic() < self._renew_at(tokens):
                return tokens.access  # another thread renewed it meanwhile
            return self._renew_locked()

    def token_failed(self, token: str) -> str:
        """The PBX refused *token*: return a renewed one (unless another thread renewed already)."""
        with self._login_lock:
            with self._state_lock:
                tokens = self._tokens
                if tokens is not None and tokens.access != token:
                    return tokens.access
                if tokens is not None:
                    tokens.access_until = 0.0  # dead; its refresh token may still work
            return self._renew_locked()

    def on_token(self, listener: Callable[[str], None]) -> None:
        """Call *listener* with every new access token (the WebSocket resubscribes with it)."""
        self._listeners.append(listener)

    @property
    def token_age_s(self) -> Optional[float]:
        with self._state_lock:
            tokens = self._tokens
        return None if tokens is None else time.time() - tokens.issued_at

    def _valid_tokens(self) -> Optional[_Tokens]:
        with self._state_lock:
            tokens = self._tokens
        return tokens if tokens is not None and time.monotonic() < tokens.access_until else None

    @staticmethod
    def _renew_at(tokens: _Tokens) -> float:
        return tokens.access_until - min(RENEW_MARGIN_S, tokens.lifetime_s / 5)

    def _renew_locked(self) -> str:
        """Refresh the pair, or log in when there is no usable refresh token (holding _login_lock)."""
        with self._state_lock:
            tokens = self._tokens
        if tokens is not None and time.monotonic() < tokens.refresh_until:
            try:
                return self._refresh_locked(tokens)
            except _TokenRefused as exc:
                log.info("pbx: the PBX refused the refresh token (%s); getting a new token", exc)
        return self._get_token_locked()

    def _get_token_locked(self) -> str:
        if self._ended:
            raise errors.PbxUnavailableError("the session with the PBX has ended")
        if time.monotonic() < self._refuse_login_until and self._last_auth_error is not None:
            raise type(self._last_auth_error)(str(self._last_auth_error))
        try:
            reply = self._exchange("POST", "get_token", json_body={"username": self._client_id,
                                                                   "password": self._secret})
        except errors.PbxUnavailableError as exc:
            metrics.pbx_login("unreachable")
            raise errors.PbxUnavailableError(f"cannot log in to {self.base_url}: {exc}") from None
        errcode = _errcode(reply)
        if errcode != 0:
            raise self._login_failed(errcode, reply)
        tokens = self._adopt(reply, "get_token")
        self.stats.logins += 1
        metrics.pbx_login("ok")
        self.stats.last_login_time = time.time()
        log.info("pbx: got a P-Series API token from %s for client ID %s", self.base_url, self._client_id)
        return tokens.access

    def _refresh_locked(self, old: _Tokens) -> str:
        try:
            reply = self._exchange("POST", "refresh_token", json_body={"refresh_token": old.refresh})
        except errors.PbxError:
            metrics.token_renewal("failed")
            raise
        errcode = _errcode(reply)
        if errcode != 0:
            metrics.token_renewal("failed")
        if errcode in REFRESH_REFUSED_ERRCODES or (errcode != 0 and _says_token(reply)):
            raise _TokenRefused(f"errcode {errcode}")
        if errcode != 0:
            raise _api_error("refresh_token", errcode)
        tokens = self._adopt(reply, "refresh_token")
        self.stats.renewals += 1
        metrics.token_renewal("ok")
        log.debug("pbx: access token renewed")
        self._revoke(old.access)  # in case the PBX keeps it valid: one token per mount
        return tokens.access

    def _adopt(self, reply: dict, endpoint: str) -> _Tokens:
        """Take the token pair of a get_token or refresh_token reply, and tell the listeners."""
        access, refresh = reply.get("access_token"), reply.get("refresh_token")
        if not isinstance(access, str) or not access or not isinstance(refresh, str) or not refresh:
            raise errors.PbxUnavailableError(f"{endpoint} reply carries no token pair")
        errors.register_secret(access)  # before anything can quote them
        errors.register_secret(refresh)
        now = time.monotonic()
        lifetime_s = _lifetime(reply.get("access_token_expire_time"), ACCESS_TOKEN_TTL_S)
        tokens = _Tokens(access, refresh, now + lifetime_s,
                         now + _lifetime(reply.get("refresh_token_expire_time"), REFRESH_TOKEN_TTL_S),
                         time.time(), lifetime_s)
        with self._state_lock:
            old, self._tokens = self._tokens, tokens
            self._last_auth_error = None
        if old is not None:
            errors.forget_secret(old.access)  # dead or dying: the live tokens only
            errors.forget_secret(old.refresh)
        for listener in list(self._listeners):
            listener(access)
        return tokens

    def _login_failed(self, errcode: Optional[int], reply: dict) -> errors.AuthError:
        self.stats.login_failures += 1
        metrics.pbx_login("rejected")
        message = _errmsg(reply)
        if errcode == BLOCKED_ERRCODE or "BLOCK" in message.upper():
            error: errors.AuthError = errors.LockedOutError(
                f"PBX {self.base_url} has blocked this IP after failed logins (errcode {errcode}); "
                "wait, or remove it from the PBX's blocked IP list")
            delay_s = LOCKOUT_RETRY_AFTER_S
        else:
            error = errors.AuthError(
                f"PBX {self.base_url} rejected the login for client ID {self._client_id!r} (errcode {errcode}"
                f"{', ' + message if message else ''}): check the API application's Client ID (--user) "
                "and Client Secret (the password) and that the application is enabled")
            delay_s = AUTH_RETRY_AFTER_S
        self._refuse_login_until = time.monotonic() + delay_s
        self._last_auth_error = error
        return error

    def _revoke(self, access: str) -> None:
        try:
            self._exchange("GET", "del_token", token=access)
        except errors.PbxError as exc:
            log.debug("pbx: del_token failed: %s", exc)

    def logout(self) -> None:
        """End the session (del_token); failures are only logged (the token dies by itself).
        No token is got after this."""
        with self._login_lock:  # a renewal under way finishes first, and none starts after
            self._ended = True
            with self._state_lock:
                tokens, self._tokens = self._tokens, None
        if tokens is not None and time.monotonic() < tokens.access_until:
            self._revoke(tokens.access)
        if tokens is not None:
            errors.forget_secret(tokens.access)
            errors.forget_secret(tokens.refresh)

    # -- the renewal thread ----------------------------------------------------------------------

    def start_renewal(self) -> None:
        """Start the thread that renews the token before it runs out (and logs in again after
        the PBX was unreachable)."""
        self._renewal_thread = threading.Thread(target=self._renewal_loop, name="pbx-token", daemon=True)
        self._renewal_thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._renewal_thread is not None:
            self._renewal_thread.join(timeout=5)
        self._transport.close()

    def _renewal_loop(self) -> None:
        delay_s = 1.0
        while not self._stop.wait(self._until_renewal(delay_s)):
            try:
                self.current_token()
                delay_s = 1.0
            except errors.AuthError as exc:
                log.warning("pbx: %s", exc)
                delay_s = AUTH_RETRY_AFTER_S
            except errors.PbxError as exc:
                log.warning("pbx: renewing the API token failed: %s", exc)
                delay_s = min(60.0, delay_s * 2)

    def _until_renewal(self, retry_s: float) -> float:
        tokens = self._valid_tokens()
        if tokens is None:
            return retry_s
        return max(0.05, self._renew_at(tokens) - time.monotonic())

    # -- API calls ---------------------------------------------------------------------------

    def call(self, endpoint: str, params: Optional[dict] = None) -> dict:
        """GET an authenticated API call; renew the token once and retry once when it is refused.

        Raises ApiError (RecordingNotFoundError for 30001), TokenError, AuthError,
        PbxUnavailableError.
        """
        token = self.current_token()
        reply = self._exchange("GET", endpoint, token=token, params=params)
        if _is_token_failure(reply):
            log.info("pbx: %s refused the token (errcode %s); renewing it", endpoint, _errcode(reply))
            reply = self._exchange("GET", endpoint, token=self.token_failed(token), params=params)
            if _is_token_failure(reply):
                raise errors.TokenError(f"PBX refused a fresh token for {endpoint} (errcode {_errcode(reply)})")
        errcode = _errcode(reply)
        if errcode != 0:
            raise _api_error(endpoint, errcode)
        return reply

    def system_information(self) -> dict:
        """``system/information``'s ``data`` object. Raises like `call`."""
        data = self.call("system/information").get("data")
        if not isinstance(data, dict):
            raise errors.PbxUnavailableError("system/information carries no data object")
        return data

    def search(self, params: dict) -> dict:
        """One page of ``recording/search`` (the reply; its rows are the caller's to read)."""
        return self.call("recording/search", params)

    def subscribe_url(self, token: str) -> str:
        """The WebSocket address of the event subscription for *token*."""
        parts = urllib.parse.urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}/{API_PATH}/subscribe?access_token={urllib.parse.quote(token)}"

    # -- downloads ---------------------------------------------------------------------------

    def open_recording(self, name: str, offset: int = 0) -> RecordingStream:
        """Start downloading *name* from *offset* (``start_offset`` says where the reply
        really starts). Raises RecordingNotFoundError, DownloadError, ApiError,
        PbxUnavailableError."""
        release = self._take_mp3_slot() if name.lower().endswith(".mp3") else None
        try:
            stream = self._open_with_link(name, offset)
        except BaseException:
            if release is not None:
                release()
            raise
        if release is not None:
            stream.call_on_close(release)  # the slot is held for as long as the transfer runs
        return stream

    def _open_with_link(self, name: str, offset: int) -> RecordingStream:
        link, reused = self._kept_link(name), True
        if link is None:
            link, reused = self._ask_link(name), False
        token = self.current_token()
        for attempt in range(3):  # a refused reused URL, then a refused token: ask once more for each
            try:
                stream = self._download(link, offset, token)
            except _LinkRefused:
                self._forget_link(name)
                if not reused:
                    raise errors.RecordingNotFoundError("recording/download", str(RESOURCE_GONE_ERRCODE)) from None
                if self.links_reusable is None:
                    log.info("pbx: the PBX refuses a resource URL used again; each download asks for its own")
                self.links_reusable, reused = False, False
                link = self._ask_link(name)
                continue
            except _TokenRefused:
                if attempt == 2:
                    raise errors.TokenError("PBX refused a fresh token for a recording download") from None
                token = self.token_failed(token)
                continue
            if reused:
                self.links_reusable = True
                self.stats.links_reused += 1
            return stream
        raise errors.PbxUnavailableError(f"the PBX refused every resource URL for {name}")

    def _ask_link(self, name: str) -> str:
        reply = self.call("recording/download", {"file": name})
        self.stats.links_asked += 1
        link = reply.get("download_resource_url")
        if not isinstance(link, str) or not link.startswith("/") or link.startswith("//") or "\\" in link:
            # A full URL could send the token to another host: only a path on the PBX is taken.
            raise errors.PbxUnavailableError("recording/download reply carries no resource path on the PBX")
        if self.links_reusable is not False:
            with self._state_lock:
                self._links[name] = (link, time.monotonic())
                self._links.move_to_end(name)
                while len(self._links) > LINKS_REMEMBERED:
                    self._links.popitem(last=False)
        return link

    def _kept_link(self, name: str) -> Optional[str]:
        if self.links_reusable is False:
            return None
        with self._state_lock:
            kept = self._links.get(name)
        return kept[0] if kept is not None and time.monotonic() - kept[1] < LINK_REUSE_S else None

    def _forget_link(self, name: str) -> None:
        with self._state_lock:
            self._links.pop(name, None)

    def _download(self, link: str, offset: int, token: str) -> RecordingStream:
        separator = "&" if "?" in link else "?"
        url = f"{self.base_url}{link}{separator}access_token={urllib.parse.quote(token)}"
        headers = {"Range": f"bytes={offset}-"} if offset > 0 else {}
        # Counted as "download": a resource URL is a per-recording value, never a label.
        response = self._transport.request("GET", url, endpoint="download", timeout=self._timeouts,
                                           headers=headers, stream=True)
        self.stats.downloads_opened += 1
        try:
            stream = open_body(response, offset, "recording download", self._download_failure)
        except BaseException:
            response.close()
            raise
        self.stats.last_success_time = time.time()
        return stream

    def _download_failure(self, body: bytes) -> errors.PbxError:
        """What a JSON reply that came instead of audio means."""
        try:
            reply = json.loads(body.decode("utf-8", "replace"))
        except (ValueError, RecursionError):  # RecursionError: deeply nested (hostile) JSON
            return errors.DownloadError("recording download returned malformed JSON instead of a recording")
        if not isinstance(reply, dict):
            return errors.DownloadError("recording download returned JSON instead of a recording")
        if _is_token_failure(reply):
            return _TokenRefused(f"errcode {_errcode(reply)}")
        errcode = _errcode(reply)
        if errcode == RESOURCE_GONE_ERRCODE:
            return _LinkRefused(f"errcode {errcode}")
        return _api_error("recording download", errcode)

    def _take_mp3_slot(self) -> Callable[[], None]:
        if not self._mp3_slot.acquire(timeout=MP3_SLOT_WAIT_S):
            raise errors.PbxUnavailableError("another mp3 download is still running (the PBX allows one at a time)")
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                self._mp3_slot.release()

        return release

    # -- transport ---------------------------------------------------------------------------

    def _exchange(self, method: str, endpoint: str, *, token: Optional[str] = None,
                  params: Optional[dict] = None, json_body: Optional[dict] = None) -> dict:
        """One request to *endpoint*; its JSON object reply, whatever its errcode."""
        query = dict(params or {})
        if token is not None:
            query["access_token"] = token
        url = f"{self.base_url}/{API_PATH}/{endpoint}"
        if query:
            url += "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
        kwargs: dict = {"stream": True}
        if json_body is not None:
            kwargs["data"] = json.dumps(json_body).encode()
            kwargs["headers"] = {"Content-Type": "application/json; charset=utf-8"}
        response = self._transport.request(method, url, endpoint=endpoint, timeout=self._timeouts, **kwargs)
        self.stats.api_calls += 1
        with response:
            if response.status_code != 200:
                raise errors.PbxUnavailableError(f"{endpoint} answered HTTP {response.status_code}")
            content = read_capped(response, MAX_REPLY_BYTES if endpoint.startswith("recording/")
                                  else MAX_ERROR_BODY_BYTES, endpoint)
        try:
            reply = json.loads(content.decode("utf-8", "replace"))
        except (ValueError, RecursionError):  # RecursionError: deeply nested (hostile) JSON
            raise errors.PbxUnavailableError(
                f"{endpoint} did not answer JSON (is {self.base_url} a Yeastar P-Series PBX?)") from None
        if not isinstance(reply, dict) or _errcode(reply) is None:
            raise errors.PbxUnavailableError(f"{endpoint} answered JSON without an errcode")
        self.stats.last_success_time = time.time()
        return reply


def _errcode(reply: dict) -> Optional[int]:
    code = reply.get("errcode")
    if isinstance(code, bool):
        return None
    if isinstance(code, int):
        return code
    if isinstance(code, str) and code.strip().lstrip("-").isdigit():
        return int(code.strip())
    return None


def _errmsg(reply: dict) -> str:
    message = reply.get("errmsg")
    return message[:200] if isinstance(message, str) else ""


def _says_token(reply: dict) -> bool:
    message = _errmsg(reply).upper()
    return any(words in message for words in TOKEN_MESSAGES)


def _is_token_failure(reply: dict) -> bool:
    errcode = _errcode(reply)
    return errcode in TOKEN_ERRCODES or (errcode != 0 and _says_token(reply))


def _api_error(endpoint: str, errcode: Optional[int]) -> errors.PbxError:
    code = "" if errcode is None else str(errcode)
    if errcode == NOT_FOUND_ERRCODE:
        return errors.RecordingNotFoundError(endpoint, code)
    if errcode == BUSY_ERRCODE:  # another download runs (mp3): worth trying again
        return errors.PbxUnavailableError(f"{endpoint}: the PBX is busy with another download (errcode {code})")
    return errors.ApiError(endpoint, code)


def _lifetime(value: object, default_s: float) -> float:
    """A token lifetime in seconds from a reply; *default_s* when absent or absurd."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TOKEN_TTL_S:
        return default_s
    return float(value)

