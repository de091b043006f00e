"""HTTP to a PBX, whatever its family: the session's TLS and proxy rules, the mapping of
every transport failure to an ``errors`` type, and the checked streaming of a recording's
body.

Owns:
    HttpTransport     one ``requests`` session per PBX: ``--ca-file``, ``--insecure`` or
                      ``--pin-sha256`` (the certificate's SHA-256, checked during the TLS
                      handshake, before a byte of the request is sent), ``--proxy``, a
                      pool as large as the downloads need, ``Accept-Encoding: identity``,
                      each reply's ``Date`` header handed to the family's clock, and every
                      request counted (`metrics.pbx_request`, by the endpoint the family names);
    RecordingStream   one download's body, checked against its Content-Length both ways and
                      counted (`metrics.recording_body`);
    open_body         the decision, from status, headers and first bytes, whether a reply
                      is the recording, and where in the file it starts;
    read_capped       a whole (JSON or CSV) reply, refused past a cap (gzip bombs too);
    ClientStats       the counters every family's client keeps (a family adds its own).

Leaves to others: what the endpoints are and what their JSON means (each family's
``client``), logins and tokens, retries (a retry needs the family's fresh random or
download link, so the caller decides).

The environment (``HTTPS_PROXY``, ``NO_PROXY``, ``REQUESTS_CA_BUNDLE``, ``.netrc``) decides
nothing unless ``--proxy environment`` says so: the session's token must go where the user
said and trust whom the user said.

Threading: an `HttpTransport` may be used from any thread (``requests.Session`` with a
thread-safe connection pool; nothing else is shared). A `RecordingStream` belongs to the
one thread that reads it. No lock anywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import time
import warnings
from typing import Callable, Iterator, Optional, Union

import requests
import requests.adapters
import urllib3

from yeastarfs import errors, metrics
from yeastarfs.errors import redact

log = logging.getLogger(__name__)

# Bytes asked of the socket per read: large for throughput, but `read1` returns whatever
# has arrived, so a slow PBX's first bytes reach readers at once.
DOWNLOAD_READ_BYTES = 1 << 20
# The first read of a download, before its reader asked for anything.
FIRST_READ_BYTES = 64 * 1024
# A JSON reply (and an error reply instead of audio) is tiny: read at most this much of it.
MAX_ERROR_BODY_BYTES = 64 * 1024
# Bytes asked of urllib3 per read of a capped reply (after decompression, if any).
READ_CHUNK_BYTES = 64 * 1024
# Connections kept per PBX: at least --max-downloads plus the catalogue and the session.
POOL_CONNECTIONS = 128
# No call recording is this large (a 24-hour PCM call is 1.4 GB): a longer or endless body
# is refused instead of filling the cache disk.
MAX_RECORDING_BYTES = 4 << 30
USER_AGENT = "yeastarfs"


@dataclasses.dataclass
class ClientStats:
    """Counters a status command or a test can read (plain ints, updated without a lock)."""

    logins: int = 0
    login_failures: int = 0
    api_calls: int = 0
    downloads_opened: int = 0
    last_login_time: Optional[float] = None
    last_success_time: Optional[float] = None


class HttpTransport:
    """A ``requests`` session to one PBX with the user's TLS and proxy rules.

    Attributes:
        base_url: ``scheme://host:port`` of the PBX's web server.
        pinned: whether ``--pin-sha256`` replaces the certificate check.

    Multithreading: see the module docstring.
    """

    def __init__(self, base_url: str, *, verify: Union[bool, str] = True, pin_sha256: Optional[str] = None,
                 proxy: Optional[str] = None, note_date: Optional[Callable[[Optional[str], float, float], None]] = None,
                 user_agent: str = USER_AGENT) -> None:
        self.base_url = base_url.rstrip("/")
        self._note_date = note_date
        self.session = requests.Session()
        self.session.verify = verify
        self.session.headers["User-Agent"] = user_agent
        # Every body is counted as sent: compressed replies could expand without bound.
        self.session.headers["Accept-Encoding"] = "identity"
        # HTTPS_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE and .netrc from the environment do not
        # decide where PBX traffic (tokens, randoms) goes or whom it trusts; --proxy does.
        self.session.trust_env = proxy == "environment"
        if proxy and proxy != "environment":
            self.session.proxies = {"http": proxy, "https": proxy}
        self.pinned = bool(pin_sha256)
        # One pooled connection per concurrent request (downloads, catalogue, session):
        # urllib3's default of 10 logs "pool is full" warnings with --max-downloads above it.
        for prefix in ("http://", "https://"):
            self.session.mount(prefix, requests.adapters.HTTPAdapter(pool_maxsize=POOL_CONNECTIONS))
        if pin_sha256:
            # The PBX's self-signed certificate, pinned: urllib3 compares the fingerprint of
            # the certificate presented with the pin after the handshake, instead of a CA check.
            self.session.verify = False
            self.session.mount("https://", _PinnedAdapter(pin_sha256, pool_maxsize=POOL_CONNECTIONS))
        if self.session.verify is False:
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)

    def request(self, method: str, url: str, *, endpoint: Optional[str], timeout: tuple[float, float],
                **kwargs) -> requests.Response:
        """*method* on *url* (absolute), counted under *endpoint* (the API's name for it, never
        a per-recording value; a query after ``?`` is dropped; None: not an API request, not
        counted: ``--api auto``'s probe); raises PbxUnavailableError for any transport
        failure, saying what to do about a certificate that does not verify."""
        sent_s = time.time()
        try:
            # verify is passed per request: a session's own setting loses to REQUESTS_CA_BUNDLE
            # and CURL_CA_BUNDLE from the environment, which would silently ignore --ca-file.
            with metrics.pbx_request(endpoint) if endpoint is not None else contextlib.nullcontext() as counted:
                response = self.session.request(method, url, timeout=timeout, allow_redirects=False,
                                                verify=self.session.verify, **kwargs)
                if counted is not None:
                    counted.answered(response.status_code)
        except requests.exceptions.SSLError as exc:
            if self.pinned:
                raise errors.PbxUnavailableError(
                    f"the certificate of {self.base_url} does not match --pin-sha256 ({first_line(exc)}); "
                    f"check it with: yeastarfs fingerprint {self.base_url}") from None
            raise errors.PbxUnavailableError(
                f"TLS verification of {self.base_url} failed ({first_line(exc)}); use --ca-file with the "
                "PBX's certificate, --pin-sha256 (see yeastarfs fingerprint), or --insecure") from None
        except requests.exceptions.Timeout:
            raise errors.PbxUnavailableError(f"{self.base_url} did not answer in time") from None
        except requests.exceptions.RequestException as exc:
            raise errors.PbxUnavailableError(f"cannot reach {self.base_url}: {first_line(exc)}") from None
        if self._note_date is not None:
            self._note_date(response.headers.get("Date"), sent_s, time.time())
        return response

    def close(self) -> None:
        self.session.close()


class _PinnedAdapter(requests.adapters.HTTPAdapter):
    """HTTPS that trusts exactly one certificate, named by its SHA-256 fingerprint."""

    def __init__(self, fingerprint: str, **kwargs) -> None:
        self._fingerprint = fingerprint.replace(":", "").lower()
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        kwargs["assert_fingerprint"] = self._fingerprint
        return super().init_poolmanager(*args, **kwargs)


# -- recording bodies --------------------------------------------------------------------------


class RecordingStream:
    """One open recording download: the response, where it starts and how long it is.

    Attributes:
        start_offset: the file offset of the first body byte (0, or N for a 206 reply).
        total_bytes: the whole recording's size, or None when the PBX did not say.
    """

    def __init__(self, response: requests.Response, start_offset: int, total_bytes: Optional[int],
                 first_chunk: bytes, *, body_bytes: Optional[int] = None, reads_to_close: bool = False) -> None:
        self._response = response
        self.start_offset = start_offset
        self.total_bytes = total_bytes
        self._pending = first_chunk
        self._body_bytes = body_bytes          # Content-Length of this reply, if any
        self._reads_to_close = reads_to_close  # the body is read up to the PBX's close
        self._on_close: Optional[Callable[[], None]] = None
        self.read_size_bytes = DOWNLOAD_READ_BYTES  # the caller lowers it to what it may take now
        self._sent_s = time.monotonic() - response.elapsed.total_seconds()  # when the request left

    def chunks(self) -> Iterator[bytes]:
        """The body's bytes as `_checked_chunks` yields them, counted (`metrics.recording_body`)."""
        return metrics.recording_body(self._checked_chunks(), self._sent_s, self._body_bytes)

    def _checked_chunks(self) -> Iterator[bytes]:
        """Yield body bytes as they arrive, exactly the announced body and nothing else.

        Raises PbxUnavailableError on a reset, DownloadStalledError on a stall, and
        DownloadError when a body that the PBX ended cleanly is shorter or longer than its
        Content-Length. The last announced byte is handed out only once the end of the body
        is confirmed, so a caller that stops at ``total_bytes`` never keeps a bad body.
        """
        chunk, self._pending = self._pending, b""
        received, expected = 0, self._body_bytes
        while True:
            if not chunk:
                chunk = self._read()
                if not chunk:
                    break
            received += len(chunk)
            if received > MAX_RECORDING_BYTES:
                raise errors.DownloadError(f"recording body exceeds {MAX_RECORDING_BYTES} bytes; refused")
            if expected is not None and received > expected:
                raise errors.DownloadError(f"recording body is longer than the {expected} bytes announced")
            if expected is not None and received == expected and self._reads_to_close:
                if self._body_continues():
                    raise errors.DownloadError(f"recording body is longer than the {expected} bytes announced")
                yield chunk
                return
            yield chunk
            chunk = b""
        if expected is not None and received < expected:
            raise errors.DownloadError(f"recording body ended after {received} of {expected} bytes")

    def _read(self) -> bytes:
        try:
            return self._response.raw.read1(max(1, min(DOWNLOAD_READ_BYTES, self.read_size_bytes)))
        except Exception as exc:  # urllib3 wraps socket errors in many types
            raise stream_error(exc) from None

    def _body_continues(self) -> bool:
        """After the announced length: do more bytes come before the close?

        A reset or timeout here says nothing against a body whose length already matched.
        """
        try:
            return bool(self._response.raw.read1(DOWNLOAD_READ_BYTES))
        except Exception:  # noqa: BLE001 - see the docstring
            return False

    def call_on_close(self, callback: Callable[[], None]) -> None:
        """Run *callback* once, when the stream is closed (it gives back what the transfer held)."""
        self._on_close = callback

    def close(self) -> None:
        self._response.close()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    def __enter__(self) -> "RecordingStream":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_body(response: requests.Response, offset: int, endpoint: str,
              json_failure: Callable[[bytes], errors.PbxError]) -> RecordingStream:
    """Decide from status, headers and the first bytes whether *response* is the recording.

    A JSON body (the PBX's way of failing) becomes whatever *json_failure* makes of its
    first bytes. Raises PbxUnavailableError, DownloadError or that error; the caller closes
    *response* when this raises.
    """
    if response.status_code not in (200, 206) or (response.status_code == 206 and offset == 0):
        raise errors.PbxUnavailableError(f"{endpoint} answered HTTP {response.status_code}")
    reads_to_close = _read_to_close(response)
    try:
        # Enough to tell audio from a JSON or HTML answer; the rest waits for flow control.
        first = response.raw.read1(FIRST_READ_BYTES)
    except Exception as exc:
        raise stream_error(exc) from None
    content_type = response.headers.get("Content-Type", "").lower()
    if first[:1] in (b"{", b"[") or "json" in content_type:
        raise json_failure(error_body(first, response))
    if first[:1] == b"<" or "text/html" in content_type:
        raise errors.DownloadError(f"{endpoint} returned an HTML page instead of a recording")
    start, total = _body_span(response, offset)
    if total is not None and total > MAX_RECORDING_BYTES:
        raise errors.DownloadError(f"{endpoint} announced {total} bytes, more than any recording; refused")
    return RecordingStream(response, start, total, first, body_bytes=int_header(response, "Content-Length"),
                           reads_to_close=reads_to_close)


def error_body(first: bytes, response: requests.Response) -> bytes:
    """*first* and the rest of a short error reply that came instead of audio (capped)."""
    body = first
    if len(first) < MAX_ERROR_BODY_BYTES and not getattr(response, "_content_consumed", False):
        try:
            body += response.raw.read(MAX_ERROR_BODY_BYTES - len(first))
        except Exception as exc:  # noqa: BLE001 - a reset while reading the error reply
            raise stream_error(exc) from None
    return body


def stream_error(exc: BaseException) -> errors.PbxError:
    if isinstance(exc, (socket.timeout, urllib3.exceptions.ReadTimeoutError, TimeoutError)):
        return errors.DownloadStalledError(f"download stalled: {exc}")
    return errors.PbxUnavailableError(f"download interrupted: {type(exc).__name__}: {exc}")


def _body_span(response: requests.Response, offset: int) -> tuple[int, Optional[int]]:
    """Return (offset of the first body byte, total recording size or None)."""
    length = int_header(response, "Content-Length")
    if response.status_code == 206:
        content_range = response.headers.get("Content-Range", "")
        try:
            span, total = content_range.split(" ", 1)[1].split("/")
            start = int(span.split("-")[0])
            return start, (int(total) if total != "*" else None)
        except (IndexError, ValueError):
            raise errors.DownloadError(f"unusable Content-Range {content_range!r}") from None
    return 0, length


def _read_to_close(response: requests.Response) -> bool:
    """Let a ``Connection: close`` body be read up to the close instead of Content-Length.

    A PBX that closes every connection (the S-Series does, yeastar-api.md §1) ends its body
    where it really ends; `RecordingStream.chunks` then compares the count with
    Content-Length both ways (urllib3 alone would silently drop the bytes of a body longer
    than announced). Returns False, changing nothing, for a keep-alive or chunked reply, or
    when the response is not built on ``http.client`` as expected.
    """
    raw = response.raw
    fp = getattr(raw, "_fp", None)
    if response.headers.get("Connection", "").strip().lower() != "close":
        return False
    if not hasattr(fp, "length") or getattr(fp, "chunked", True) or not hasattr(raw, "length_remaining"):
        return False
    fp.length = None
    raw.length_remaining = None
    return True


def read_capped(response: requests.Response, cap_bytes: int, endpoint: str) -> bytes:
    """The whole body of *response*, decoded as the server says, but at most *cap_bytes*:
    a reply that would be longer (a gzip bomb included) is refused, never held."""
    parts, held = [], 0
    try:
        while True:
            chunk = response.raw.read(READ_CHUNK_BYTES, decode_content=True)
            if not chunk:
                return b"".join(parts)
            held += len(chunk)
            if held > cap_bytes:
                raise errors.PbxUnavailableError(f"{endpoint}: reply is larger than {cap_bytes} bytes; refused")
            parts.append(chunk)
    except errors.PbxError:
        raise
    except Exception as exc:  # noqa: BLE001 - urllib3 wraps resets and decoding errors in many types
        raise stream_error(exc) from None


def int_header(response: requests.Response, name: str) -> Optional[int]:
    value = response.headers.get(name)
    try:
        number = int(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and number >= 0 else None


def first_line(exc: BaseException) -> str:
    return redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:300]


# Logger filters see only records made on that very logger, so each one that may quote a
# URL gets its own. cli.setup_logging also quietens urllib3; this protects other callers.
for _name in ("urllib3.connectionpool", "urllib3.connection", "urllib3.response", "urllib3.util.retry",
              "urllib3.poolmanager"):
    logging.getLogger(_name).addFilter(errors.RedactingFilter())
