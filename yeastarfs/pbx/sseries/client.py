"""PbxClient: every HTTP conversation with the Yeastar S-Series API (yeastar-api.md).

Owns the session (MD5 login, token, heartbeat, one re-login on a token failure), the
single-use ``random`` per download, streaming recording downloads and the CDR CSV, over
the family-neutral `transport.HttpTransport` (TLS, proxy, transport errors, checked
bodies). Every failure leaves it as an ``errors`` type (a reply that is not decodable JSON,
however deeply nested, is a PbxUnavailableError), with tokens and randoms redacted. A
download's body is checked against its Content-Length both ways (`RecordingStream.chunks`).
Every reply's ``Date`` header goes to the `clock.PbxClock` (the PBX clock's skew); every
login and heartbeat is counted as ``metrics`` asks of a family (requests and recording
bodies by the transport). It knows
nothing of paths, the cache or FUSE, and it never retries a download by itself: a retry
needs a fresh random, which the caller asks for.

Secrets registered for redaction by value: the password, its MD5 and the live token (the
one it replaces is dropped). Randoms are single-use and never registered: the ``random=``
pattern of `errors.redact` masks them wherever they are quoted, and registering one per
download and per CDR poll would grow memory and the cost of every log line for ever.

Threading: all methods may be called from any thread. ``_state_lock`` guards the token and
timestamps and is never held during I/O. ``_login_lock`` serialises logins *on purpose*
(it is held during the login request): five failed logins lock the PBX out for ten
minutes, so concurrent threads that find the token dead must share one login, not race.
Lock order: ``_login_lock`` before ``_state_lock``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import socket
import threading
import time
import urllib.parse
from typing import Callable, Optional, Union

import requests

from yeastarfs import errors, metrics
from yeastarfs.pbx.clock import PbxClock
from yeastarfs.pbx.sseries.events import DEFAULT_HTTP_PORT
from yeastarfs.pbx.sseries.records import CdrParseResult, parse_cdr_csv
from yeastarfs.pbx.transport import (MAX_ERROR_BODY_BYTES, ClientStats, HttpTransport, RecordingStream,
                                     open_body, read_capped)

log = logging.getLogger(__name__)

API_PATH = "api/v2.0.0"
# errnos that mean "this token is no good": missing, unknown, timed out (yeastar-api.md §3).
TOKEN_ERRNOS = {"20004", "20005", "20006"}
# errnos after which a fresh login cannot help, so none is attempted: missing parameter,
# no such recording, bad credentials, locked out.
NO_RELOGIN_ERRNOS = {"10004", "10023", "20002", "20003"}
LOCKED_ERRNO = "20002"
NOT_FOUND_ERRNO = "10023"
# The PBX deletes a token after 30 idle minutes; a heartbeat every 10 keeps it with margin
# even when one heartbeat is lost.
HEARTBEAT_INTERVAL_S = 600.0
# After a rejected login, refuse to try again for this long (the PBX locks the IP after 5
# failures; a daemon retrying every request would get there in seconds).
AUTH_RETRY_AFTER_S = 300.0
LOCKOUT_RETRY_AFTER_S = 600.0
# One CDR request covers at most a day; even 100,000 calls a day are ~20 MB of CSV.
MAX_CDR_BYTES = 32 << 20
CDR_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


class PbxClient:
    """A logged-in session with one PBX.

    Attributes:
        base_url: ``scheme://host:port`` of the PBX's web/API server.
        transport: ``"HTTP"`` or ``"TCP"``, how the PBX reports events (from login).
        stats: counters of what this client did.
        clock: the `PbxClock` that every reply's Date header feeds.

    Multithreading: see the module docstring.
    """

    def __init__(self, base_url: str, username: str, password: str, *,
                 verify: Union[bool, str] = True, events_port: Optional[int] = DEFAULT_HTTP_PORT,
                 event_version: str = "2.0.0", connect_timeout_s: float = 10.0,
                 read_timeout_s: float = 60.0, heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
                 pin_sha256: Optional[str] = None, proxy: Optional[str] = None,
                 clock: Optional[PbxClock] = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.base_url = base_url.rstrip("/")
        # Seconds for the login pauses and the heartbeat's idleness (a test seam: tests pass
        # a clock they move forward instead of waiting five minutes).
        self._monotonic = monotonic
        self.clock = clock if clock is not None else PbxClock()
        self._username = username
        self._password_md5 = hashlib.md5(password.encode("utf-8")).hexdigest()
        errors.register_secret(password)
        errors.register_secret(self._password_md5)  # the HTTP login needs nothing else
        self._events_port = events_port
        self._event_version = event_version
        self._timeouts = (connect_timeout_s, read_timeout_s)
        self._heartbeat_interval_s = heartbeat_interval_s
        self._transport = HttpTransport(self.base_url, verify=verify, pin_sha256=pin_sha256, proxy=proxy,
                                        note_date=self.clock.note_date)
        self._login_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._token: Optional[str] = None
        self._redacted_token: Optional[str] = None  # the token registered with errors
        self._last_call_time = 0.0
        self._refuse_login_until = 0.0
        self._last_auth_error: Optional[errors.AuthError] = None
        self.transport = "HTTP"
        self.stats = ClientStats()
        self._stop = threading.Event()
        self._heartbeat_thread: Optional[threading.Thread] = None

    # -- session ---------------------------------------------------------------------------

    def login(self) -> str:
        """Log in and return the new token. Raises AuthError, LockedOutError, PbxUnavailableError."""
        with self._login_lock:
            return self._login_locked()

    def _login_locked(self) -> str:
        now = self._monotonic()
        if now < self._refuse_login_until and self._last_auth_error is not None:
            raise type(self._last_auth_error)(str(self._last_auth_error))
        body: dict = {"username": self._username, "password": self._password_md5,
                      "version": self._event_version}
        if self._events_port:
            body["port"] = str(self._events_port)
        try:
            reply = self._post("login", body, token=None)
        except errors.PbxUnavailableError as exc:
            metrics.pbx_login("unreachable")
            # A locked IP may look like a refused connection on a real PBX (§2.1).
            raise errors.PbxUnavailableError(f"cannot log in to {self.base_url}: {exc}") from None
        if not _is_success(reply):
            raise self._login_failed(reply)
        token = reply.get("token")
        if not isinstance(token, str) or not token:
            raise errors.PbxUnavailableError("login reply carries no token")
        errors.register_secret(token)  # before anything can quote it
        with self._state_lock:
            self._token = token
            replaced, self._redacted_token = self._redacted_token, token
            self._last_call_time = self._monotonic()
            self._last_auth_error = None
        if replaced is not None and replaced != token:
            errors.forget_secret(replaced)  # dead or dying: the live tokens only
        self.transport = str(reply.get("transport") or "HTTP").upper()
        self.stats.logins += 1
        metrics.pbx_login("ok")
        self.stats.last_login_time = time.time()
        log.info("pbx: logged in to %s as %s (events over %s)", self.base_url, self._username, self.transport)
        return token

    def _login_failed(self, reply: dict) -> errors.AuthError:
        api_errno = str(reply.get("errno", ""))
        self.stats.login_failures += 1
        metrics.pbx_login("rejected")
        if api_errno == LOCKED_ERRNO:
            error: errors.AuthError = errors.LockedOutError(
                f"PBX {self.base_url} has locked out this IP after failed logins (errno 20002); "
                "wait 10 minutes or remove it from the PBX's blocked IP list")
            delay_s = LOCKOUT_RETRY_AFTER_S
        else:
            error = errors.AuthError(
                f"PBX {self.base_url} rejected the login for user {self._username!r} "
                f"(errno {api_errno or 'none'}): check the username, the password and that the API is enabled")
            delay_s = AUTH_RETRY_AFTER_S
        self._refuse_login_until = self._monotonic() + delay_s
        self._last_auth_error = error
        return error

    def _current_token(self) -> str:
        with self._state_lock:
            token = self._token
        if token is not None:
            return token
        with self._login_lock:
            # Threads that found no token queue here; only the first one logs in.
            with self._state_lock:
                token = self._token
            return token if token is not None else self._login_locked()

    def _relogin_after(self, failed_token: str) -> str:
        """Log in again unless another thread already replaced *failed_token*."""
        with self._login_lock:
            with self._state_lock:
                if self._token is not None and self._token != failed_token:
                    return self._token
                self._token = None
            return self._login_locked()

    @property
    def token_age_s(self) -> Optional[float]:
        last = self.stats.last_login_time
        return None if last is None else time.time() - last

    def logout(self) -> None:
        """End the session; failures are only logged (the token dies by itself anyway)."""
        with self._state_lock:
            token, self._token = self._token, None
            redacted, self._redacted_token = self._redacted_token, None
        try:
            if token is not None:
                self._post("logout", None, token=token)
        except errors.PbxError as exc:
            log.debug("pbx: logout failed: %s", exc)
        finally:
            if redacted is not None:
                errors.forget_secret(redacted)

    # -- authenticated calls -----------------------------------------------------------------

    def call(self, endpoint: str, body: Optional[dict]) -> dict:
        """POST an authenticated API call; log in again once and retry once on a token failure.

        Raises ApiError (RecordingNotFoundError for 10023), TokenError, AuthError,
        PbxUnavailableError.
        """
        token = self._current_token()
        reply = self._post(endpoint, body, token=token)
        if _is_success(reply):
            return reply
        api_errno = str(reply.get("errno", ""))
        if api_errno in NO_RELOGIN_ERRNOS:
            raise _api_error(endpoint, api_errno)
        log.info("pbx: %s failed with errno %s; logging in again", endpoint, api_errno or "(none)")
        token = self._relogin_after(token)
        reply = self._post(endpoint, body, token=token)
        if _is_success(reply):
            return reply
        api_errno = str(reply.get("errno", ""))
        if api_errno in TOKEN_ERRNOS:
            raise errors.TokenError(f"PBX refused a fresh token for {endpoint} (errno {api_errno})")
        raise _api_error(endpoint, api_errno)

    def heartbeat(self) -> None:
        """Keep the token alive and re-state where events go. Raises like `call`."""
        body: dict = {"ipaddr": self._local_ip(), "version": self._event_version}
        if self._events_port:
            body["port"] = str(self._events_port)
        self.call("heartbeat", body)

    def recording_random(self, name: str) -> str:
        """Ask for a fresh single-use random for *name*. Raises like `call`."""
        reply = self.call("recording/get_random", {"recording": name})
        random = reply.get("random")
        if not isinstance(random, str) or not random:
            raise errors.PbxUnavailableError("get_random reply carries no random")
        return random

    def open_recording(self, name: str, offset: int = 0) -> RecordingStream:
        """Start downloading *name* with a fresh random, asking for bytes from *offset*.

        The reply may start at 0 even when *offset* > 0 (the PBX may ignore Range):
        check ``start_offset``. Raises DownloadError, ApiError, PbxUnavailableError.
        """
        random = self.recording_random(name)
        token = self._current_token()
        query = urllib.parse.urlencode({"recording": name, "random": random, "token": token},
                                       quote_via=urllib.parse.quote)
        headers = {"Accept-Encoding": "identity"}  # Content-Length must count the file's bytes
        if offset > 0:
            headers["Range"] = f"bytes={offset}-"
        response = self._request("GET", f"recording/download?{query}", headers=headers, stream=True)
        self.stats.downloads_opened += 1
        try:
            return open_body(response, offset, "recording/download",
                             lambda body: self._json_failure(body, "recording/download", token))
        except BaseException:
            response.close()
            raise

    def _json_failure(self, body: bytes, endpoint: str, token: str) -> errors.PbxError:
        try:
            # utf-8-sig: a refusal after a byte order mark (fetch_cdr lets one precede the JSON)
            reply = json.loads(body.decode("utf-8-sig", "replace"))
        except (ValueError, RecursionError):  # RecursionError: deeply nested (hostile) JSON
            return errors.DownloadError(f"{endpoint} returned malformed JSON instead of a recording")
        api_errno = str(reply.get("errno", "")) if isinstance(reply, dict) else ""
        if api_errno in TOKEN_ERRNOS:
            with self._state_lock:
                if self._token == token:  # unless another thread has logged in since
                    self._token = None  # the next call logs in again
        return _api_error(endpoint, api_errno)

    def fetch_cdr(self, start: dt.datetime, end: dt.datetime) -> CdrParseResult:
        """Download and parse the CDR of calls that started in [*start*, *end*] (PBX local time)."""
        times = {"starttime": start.strftime(CDR_TIME_FORMAT), "endtime": end.strftime(CDR_TIME_FORMAT)}
        reply = self.call("cdr/get_random", {"number": "all", **times})
        random = reply.get("random")
        if not isinstance(random, str) or not random:
            raise errors.PbxUnavailableError("cdr/get_random reply carries no random")
        token = self._current_token()
        query = urllib.parse.urlencode({"number": "all", **times, "token": token,
                                        "random": random}, quote_via=urllib.parse.quote)
        response = self._request("GET", f"cdr/download?{query}", stream=True)
        with response:
            content = read_capped(response, MAX_CDR_BYTES, "cdr/download")
            text = content.decode("utf-8", "replace")
            if text.lstrip("\ufeff \r\n").startswith("{"):
                raise self._json_failure(content, "cdr/download", token)
        try:
            return parse_cdr_csv(text)
        except ValueError as exc:
            raise errors.PbxUnavailableError(f"cdr/download: {exc}") from None

    # -- heartbeat thread --------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        """Start the background thread that keeps the token alive."""
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="pbx-heartbeat", daemon=True)
        self._heartbeat_thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=5)
        self._transport.close()

    def _heartbeat_loop(self) -> None:
        # Heartbeat only when the token has been idle: any call renews it (§2.2).
        check_every_s = min(30.0, self._heartbeat_interval_s / 4)
        while not self._stop.wait(check_every_s):
            with self._state_lock:
                idle_s = self._monotonic() - self._last_call_time
            if idle_s < self._heartbeat_interval_s:
                continue
            try:
                self.heartbeat()
                metrics.token_renewal("ok")
            except errors.PbxError as exc:
                metrics.token_renewal("failed")
                log.warning("pbx: heartbeat failed: %s", exc)
                with self._state_lock:
                    self._last_call_time = self._monotonic()  # retry after one more interval

    # -- transport ---------------------------------------------------------------------------

    def _post(self, endpoint: str, body: Optional[dict], *, token: Optional[str]) -> dict:
        path = endpoint if token is None else f"{endpoint}?token={token}"
        data = json.dumps(body).encode() if body is not None else b""
        response = self._request("POST", path, data=data, stream=True,
                                 headers={"Content-Type": "application/json; charset=utf-8"})
        self.stats.api_calls += 1
        with response:
            if response.status_code != 200:
                raise errors.PbxUnavailableError(f"{endpoint} answered HTTP {response.status_code}")
            content = read_capped(response, MAX_ERROR_BODY_BYTES, endpoint)
        try:
            reply = json.loads(content.decode("utf-8", "replace"))
        except (ValueError, RecursionError):  # RecursionError: deeply nested (hostile) JSON
            raise errors.PbxUnavailableError(f"{endpoint} did not answer JSON (is {self.base_url} a Yeastar PBX?)") from None
        if not isinstance(reply, dict):
            raise errors.PbxUnavailableError(f"{endpoint} answered JSON that is not an object")
        if token is not None:
            with self._state_lock:
                self._last_call_time = self._monotonic()
        self.stats.last_success_time = time.time()
        return reply

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        return self._transport.request(method, f"{self.base_url}/{API_PATH}/{path}", endpoint=path,
                                       timeout=self._timeouts, **kwargs)

    def _local_ip(self) -> str:
        """The address this machine uses towards the PBX (a UDP connect sends no packet)."""
        host = urllib.parse.urlsplit(self.base_url).hostname or "127.0.0.1"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((host, 9))
                return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _is_success(reply: dict) -> bool:
    # The most careful real client compares case-insensitively (yeastar-api.md §10).
    return str(reply.get("status", "")).lower() == "success"


def _api_error(endpoint: str, api_errno: str) -> errors.ApiError:
    if api_errno == NOT_FOUND_ERRNO:
        return errors.RecordingNotFoundError(endpoint, api_errno)
    return errors.ApiError(endpoint, api_errno)
