"""The project's exception tree, and the one place secrets are scrubbed from messages.

Every failure below the FUSE adapter is raised as one of these types; ``fs.py`` maps
them to errnos in a single table, ``app/cli.py`` maps them to exit codes.

    YeastarfsError
     ├── ConfigError                bad option, unusable path, mountpoint busy
     ├── PbxError                   anything the PBX did, or failed to do
     │    ├── PbxUnavailableError   refused, reset, timed out, HTTP 5xx, not the PBX's API
     │    │    └── DownloadStalledError   a download made no progress for too long
     │    ├── AuthError             login rejected (wrong user or password)
     │    │    └── LockedOutError   the PBX locked this IP after failed logins
     │    ├── TokenError            token refused even after a fresh login
     │    ├── ApiError              a JSON ``Failed`` reply (``api_errno`` says which)
     │    │    └── RecordingNotFoundError   errno 10023: no such recording on the PBX
     │    └── DownloadError         body is not a recording: JSON, HTML, short, too long
     ├── CacheError                 the disk cache could not store or serve bytes
     │    └── CacheFullError        nothing left to evict: every entry is in use
     └── TreeError                  what the core (``core.py``) refuses, whatever the binding
          ├── NoSuchPathError       no file or folder at that path
          ├── NoSuchAttributeError  no such extended attribute
          ├── BadHandleError        an unknown open-file handle
          ├── IsADirError           a file operation on a folder
          ├── ReadOnlyError         anything that would write
          └── BackgroundReaderError a thumbnailer or indexer asked for an uncached recording

This module imports nothing from yeastarfs.
"""

from __future__ import annotations

import logging
import re

# `token=…` and `random=…` in URLs, JSON bodies and reprs; and the values themselves when
# they were registered with `register_secret`. Tokens and randoms are 32 hex characters on
# every PBX seen so far, but the pattern does not rely on that.
_SECRET_PARAM = re.compile(
    r"""(?P<key>\b(?:token|random|password|secret)="""            # URL and form parameters
    r"""|["'](?:token|random|password|secret)["']\s*:\s*["']?"""  # JSON and Python reprs
    r"""|\bSecret:[ \t]*)"""                                       # the TCP event login block
    r"""(?P<value>[^&\s"',;)}\]]+)""",
    re.IGNORECASE,
)
# The secrets `redact` removes by value: the password, its MD5 and the live session tokens,
# a handful at any time. Randoms are single-use and never registered (the pattern above masks
# them where they are quoted), so that the set, and the cost of every log line, stays flat
# however long the daemon runs. A plain set: add, discard and copy are atomic under the GIL.
_known_secrets: set[str] = set()


def register_secret(value: str) -> None:
    """Remember *value* so that `redact` removes it wherever it appears, until `forget_secret`.

    For long-lived secrets only (password, password hash, session token): every log line
    scans them all.
    """
    if value and len(value) >= 6:
        _known_secrets.add(value)


def forget_secret(value: str) -> None:
    """Stop redacting *value* by value (a token that was replaced); unknown values are ignored."""
    _known_secrets.discard(value)


def known_secret_count() -> int:
    """How many secrets `redact` scans for (for tests and statistics)."""
    return len(_known_secrets)


def redact(text: str) -> str:
    """Return *text* with tokens, randoms and passwords replaced by ``***``."""
    text = _SECRET_PARAM.sub(lambda m: m.group("key") + "***", text)
    for secret in tuple(_known_secrets):
        if secret in text:
            text = text.replace(secret, "***")
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs secrets from a record's message and traceback.

    The CLI puts it on its handler (every line the daemon writes); ``api`` puts it on
    urllib3's loggers, which quote every URL, for callers that configure logging themselves.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


class YeastarfsError(Exception):
    """Base of every error yeastarfs raises on purpose. Messages are always redacted."""

    def __init__(self, message: str = "") -> None:
        super().__init__(redact(message))


class ConfigError(YeastarfsError):
    """An option or a local path is unusable; the message says which and why."""


class PbxError(YeastarfsError):
    """Something went wrong talking to the PBX."""


class PbxUnavailableError(PbxError):
    """The PBX could not be reached or did not answer like the Yeastar API."""


class DownloadStalledError(PbxUnavailableError):
    """A download received no bytes for longer than the stall timeout."""


class AuthError(PbxError):
    """The PBX rejected the username or password."""


class LockedOutError(AuthError):
    """The PBX locked this client's IP (5 failed logins lock it for 10 minutes)."""


class TokenError(PbxError):
    """The PBX refused the session token even after logging in again."""


class ApiError(PbxError):
    """The PBX answered ``{"status": "Failed", "errno": ...}``.

    Attributes:
        api_errno: the errno string from the reply ("" when the reply had none).
        endpoint: the API endpoint that failed, e.g. ``recording/get_random``.
    """

    def __init__(self, endpoint: str, api_errno: str) -> None:
        self.endpoint = endpoint
        self.api_errno = api_errno
        super().__init__(f"PBX refused {endpoint}: errno {api_errno or '(none)'}")


class RecordingNotFoundError(ApiError):
    """The PBX says the recording does not exist (errno 10023)."""


class DownloadError(PbxError):
    """A download's body was not the recording: an error page, too short or too long."""


class CacheError(YeastarfsError):
    """The disk cache failed (disk full, permission, I/O error)."""


class CacheFullError(CacheError):
    """The cache budget is used up by entries that are open or downloading."""


class TreeError(YeastarfsError):
    """The tree of recordings refuses a request (the core raises these; fs.py maps them)."""


class NoSuchPathError(TreeError):
    """No file or folder at this path."""


class NoSuchAttributeError(TreeError):
    """The file or folder has no extended attribute of this name."""


class BadHandleError(TreeError):
    """No open file has this handle."""


class IsADirError(TreeError):
    """A file operation (open) on a folder."""


class ReadOnlyError(TreeError):
    """The tree is read-only: nothing can be written, created, renamed or deleted."""


class BackgroundReaderError(TreeError):
    """A background reader (thumbnailer, indexer) asked for a recording that is not cached."""
