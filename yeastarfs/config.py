"""Config: one validated, immutable set of mount options, plus the parsers for its units.

Stdlib only; imports nothing else from yeastarfs but ``errors``. The password is read
here from a file or the environment, never from argv, and is kept out of ``repr``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import stat
import urllib.parse
from typing import Optional, Union

from yeastarfs.errors import ConfigError

log = logging.getLogger(__name__)

PASSWORD_ENV = "YEASTARFS_PASSWORD"
DEFAULT_CACHE_SIZE = "4G"
DEFAULT_CACHE_MIN_FREE = "1G"
DEFAULT_SINCE = "30d"
DEFAULT_POLL_INTERVAL_S = 60.0
DEFAULT_EVENTS_PORT = 8260
# The PBX's TCP event port is configurable on the PBX; 8333 is the commonly quoted default.
DEFAULT_TCP_EVENTS_PORT = 8333
DEFAULT_MAX_DOWNLOADS = 4
# The PBX drops a token after 30 idle minutes; a heartbeat after 10 keeps it with margin.
DEFAULT_HEARTBEAT_INTERVAL_S = 600.0
DEFAULT_STALL_TIMEOUT_S = 60.0
# A first mount waits this long for the CDR backfill, then comes up and finishes it in the
# background (mount(8) at boot must not hang on a slow PBX).
DEFAULT_START_TIMEOUT_S = 20.0

_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """Bytes from ``500M``, ``10G``, ``1.5T`` or ``4096`` (binary units: 1K = 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(f"invalid size {text!r}: use a number with an optional K, M, G or T suffix, e.g. 500M")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def parse_duration(text: str) -> float:
    """Seconds from ``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or ``60``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(f"invalid duration {text!r}: use a number with s, m, h, d or w, e.g. 30d")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]


def default_cache_root() -> str:
    """$XDG_CACHE_HOME/yeastarfs, ~/.cache/yeastarfs, or /var/cache/yeastarfs without a HOME."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec: a relative value is invalid and ignored
        return os.path.join(xdg, "yeastarfs")
    home = os.environ.get("HOME")
    if home and os.path.isdir(home):
        return os.path.join(home, ".cache", "yeastarfs")
    return "/var/cache/yeastarfs"


def read_password(password_file: Optional[str]) -> str:
    """The PBX password from *password_file*, else from $YEASTARFS_PASSWORD."""
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as handle:
                password = handle.read().rstrip("\r\n")
            mode = os.stat(password_file).st_mode
        except OSError as exc:
            raise ConfigError(f"cannot read password file {password_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"password file {password_file} is not UTF-8 text") from None
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning("config: password file %s is readable by other users; chmod 600 it", password_file)
    else:
        password = os.environ.get(PASSWORD_ENV, "")
        if not password:
            raise ConfigError(f"no password: give --password-file PATH or set {PASSWORD_ENV}")
    if not password:
        raise ConfigError(f"password file {password_file} is empty")
    return password


def check_pbx_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None or parts.password is not None:
        # Not echoed: the URL holds a password. Credentials come from --user/--password-file.
        raise ConfigError("invalid --pbx: give the user with --user and the password with --password-file, "
                          "not in the URL")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"invalid --pbx {url!r}: expected https://HOST:PORT (e.g. https://192.168.5.150:8088)")
    if parts.path not in ("", "/") or parts.query:
        raise ConfigError(f"invalid --pbx {url!r}: give only scheme, host and port")
    try:
        port = parts.port  # raises ValueError for a port that is not a number in 0-65535
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"invalid --pbx {url!r}: the port must be a number from 1 to 65535")
    return f"{parts.scheme}://{parts.netloc}"


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a mount needs, validated. Sizes in bytes, durations in seconds."""

    mountpoint: str
    pbx_url: str
    username: str
    password: str = dataclasses.field(repr=False)
    cache_root: str = dataclasses.field(default_factory=default_cache_root)
    cache_max_bytes: int = parse_size(DEFAULT_CACHE_SIZE)
    cache_min_free_bytes: int = parse_size(DEFAULT_CACHE_MIN_FREE)
    since_s: float = parse_duration(DEFAULT_SINCE)
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    events_port: int = DEFAULT_EVENTS_PORT
    events_host: str = "0.0.0.0"
    events_enabled: bool = True
    # Source IPs allowed to push events; None: the PBX's own address(es). ("any" in the CLI.)
    events_allow_from: Optional[tuple[str, ...]] = None
    allow_any_event_source: bool = False
    tcp_events_port: int = DEFAULT_TCP_EVENTS_PORT
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S   # longest wait for the CDR backfill at start
    verify: Union[bool, str] = True
    pin_sha256: Optional[str] = None   # trust exactly this certificate (hex SHA-256)
    max_downloads: int = DEFAULT_MAX_DOWNLOADS
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S
    allow_other: bool = False
    log_file: Optional[str] = None
    log_level: str = "INFO"
    uid: Optional[int] = None          # owner shown for every file; None: the mounting user
    gid: Optional[int] = None
    umask: int = 0o022                 # removed from r-xr-xr-x
    prefetch_new: bool = False         # download newly announced recordings at once

    @property
    def pbx_host(self) -> str:
        return urllib.parse.urlsplit(self.pbx_url).hostname or "pbx"

    @property
    def cache_dir(self) -> str:
        """Per-PBX directory under the cache root, so two PBXs never share files."""
        netloc = urllib.parse.urlsplit(self.pbx_url).netloc
        component = re.sub(r"[^A-Za-z0-9.-]", "_", netloc)
        if component.strip(".") == "":  # "", "." or "..": would be the root itself or its parent
            component = component.replace(".", "_") or "_"
        return os.path.join(self.cache_root, component)

    def validate(self) -> "Config":
        if self.cache_max_bytes <= 0:
            raise ConfigError("--cache-size must be positive")
        if not self.poll_interval_s > 0:  # also NaN
            raise ConfigError("--poll-interval must be positive")
        if not 0 <= self.events_port <= 65535:
            raise ConfigError("--events-port must be 0-65535 (0 picks a free port and tells the PBX)")
        if not 1 <= self.heartbeat_interval_s <= 1500:
            raise ConfigError("--heartbeat-interval must be 1-1500 seconds (the PBX drops idle tokens after 1800)")
        if not 1 <= self.max_downloads <= 100:
            raise ConfigError("--max-downloads must be 1-100 (a PBX is a small box; 4 is the default)")
        if not self.stall_timeout_s > 0:  # 0 would fail every read that waits at all
            raise ConfigError("--stall-timeout must be positive")
        if self.pin_sha256 is not None and not re.fullmatch(r"(?:[0-9a-fA-F]{2}:?){31}[0-9a-fA-F]{2}", self.pin_sha256):
            raise ConfigError("--pin-sha256 must be the certificate's SHA-256 as 64 hex digits "
                              "(colons allowed); get it with: yeastarfs fingerprint URL")
        if isinstance(self.verify, str) and not os.path.isfile(self.verify):
            raise ConfigError(f"--ca-file {self.verify}: no such file")
        return self
