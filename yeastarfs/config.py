"""Config: the mount options, each declared once, and the validated, immutable Config they fill.

An option is one `Option` in `OPTIONS`: its long flag (the ``-o``, ``YEASTARFS_<NAME>`` and
TOML spellings follow from its name), its default, the parser that turns the text a user
types into the unit its Config field names (bytes, seconds…), the check on that value, and
its help. Everything else is built from that table: Config's option fields (below), the
mount command's arguments (``app/cli.py``), the ``-o`` / environment / config-file layering
(``app/options.py``), the README's options table (`options_markdown`, kept equal by a test)
and the man page (``yeastarfs man``). Adding an option is adding one `Option`.

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
import zoneinfo
from typing import Any, Callable, Optional, Union

from yeastarfs.errors import ConfigError

log = logging.getLogger(__name__)

ENV_PREFIX = "YEASTARFS_"
PASSWORD_ENV = ENV_PREFIX + "PASSWORD"

_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_FLAG_WORDS = {"1": True, "true": True, "yes": True, "on": True,
               "0": False, "false": False, "no": False, "off": False, "": False}


# -- parsers: the text a user types -> a value in the unit of its Config field ---------------
# Each raises ConfigError saying what was wrong; the field's type is the parser's return type.

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


def parse_flag(value: Union[bool, str]) -> bool:
    """A flag's state: a bool as it is (command line, TOML), or true/false, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    try:
        return _FLAG_WORDS[str(value).strip().lower()]
    except KeyError:
        raise ConfigError(f"expected true or false, got {value!r}") from None


def _flag_off(value: Union[bool, str]) -> bool:
    """For a --no-X flag that fills an X_enabled field."""
    return not parse_flag(value)


def _text(text: str) -> str:
    return str(text)


def _absolute_path(text: str) -> str:
    return os.path.abspath(str(text))


def _whole_number(text: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise ConfigError(f"invalid number {text!r}: expected a whole number such as 8") from None


def _seconds(text: str) -> float:
    try:
        return float(str(text).strip())
    except ValueError:
        raise ConfigError(f"invalid number of seconds {text!r}: expected a number such as 60 or 0.5") from None


def _octal(text: str) -> int:
    try:
        value = int(str(text), 8)
    except ValueError:
        raise ConfigError(f"invalid --umask {text!r}: expected octal digits like 027") from None
    if not 0 <= value <= 0o777:
        raise ConfigError(f"invalid --umask {text!r}")
    return value


def _address_list(text: str) -> Optional[tuple[str, ...]]:
    """``10.0.0.1,10.0.0.2`` → a tuple; ``any`` → None (the caller records "any" itself)."""
    if not text or str(text).strip().lower() == "any":
        return None
    return tuple(part.strip() for part in str(text).split(",") if part.strip())


def _proxy(text: str) -> str:
    """A proxy URL (``http://proxy:3128``) or ``environment``."""
    text = str(text).strip()
    if text.lower() == "environment":
        return "environment"
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https", "socks5", "socks5h") or not parts.hostname:
        raise ConfigError(f"invalid proxy {text!r}: expected http://HOST:PORT or 'environment'")
    return text


def _is_new(text: str) -> bool:
    return text == "new"


# Thumbnailers and indexers (README "File managers"): by default served from the cache only.
STANDARD_BACKGROUND_READERS = (
    "tumblerd", "totem-video-thumbnailer", "ffmpegthumbnailer", "thumbnail", "tracker-extract",
    "tracker-extract-3", "localsearch-extractor-3", "baloo_file", "baloo_file_extractor",
)


def _reader_names(text: str) -> tuple[str, ...]:
    """``standard,myindexer`` → process names (``standard``: `STANDARD_BACKGROUND_READERS`);
    ``none`` (or nothing) → ()."""
    if not text or str(text).strip().lower() == "none":
        return ()
    names: list[str] = []
    for part in (part.strip() for part in str(text).split(",")):
        if part == "standard":
            names.extend(STANDARD_BACKGROUND_READERS)
        elif part:
            if "/" in part or "\0" in part:
                raise ConfigError(f"invalid process name {part!r}: give names, not paths")
            names.append(part)
    return tuple(dict.fromkeys(names))


def _time_zone(text: str) -> str:
    """An IANA zone name (``Europe/Berlin``) this machine's zone database knows."""
    try:
        zoneinfo.ZoneInfo(str(text))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"unknown time zone {text!r}: use an IANA name such as Europe/Berlin") from None
    return str(text)


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


# -- the declaration -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Option:
    """One mount option, declared once.

    *name* gives every spelling: ``--cache-size`` on the command line, ``cache_size=`` in an
    ``-o`` list and as a config-file key, ``YEASTARFS_CACHE_SIZE`` in the environment
    (*o_name* replaces the ``-o`` and file key where mount(8) reserves the name).
    *metavar* names the value; without one the option is a flag, off unless given.
    *default* is written as a user would type it (``"4G"``), so help and README show it as
    written, and is parsed like any value to give the field's default; a callable default
    is called each time a Config is made, and *default_doc* then says what it gives.
    *parse* turns the text (a bool, for a flag) into the value of ``Config.<field>`` in the
    unit the field's name carries (without one: the text as it is, a flag's state as a
    bool), and *valid* / *invalid* check that value in `Config.validate`. *field* None: the
    command line reads the option itself.
    *help* and *default_doc* are Markdown with nothing but `code`: the README shows them as
    they are, and `plain` strips them for the terminal.
    """

    name: str
    help: str
    field: Optional[str] = None
    parse: Optional[Callable[[Any], Any]] = None
    metavar: Optional[str] = None
    default: Any = None
    default_doc: Optional[str] = None
    required: bool = False
    short: Optional[str] = None
    o_name: Optional[str] = None
    choices: tuple[str, ...] = ()
    valid: Optional[Callable[[Any], bool]] = None
    invalid: str = ""
    exclusive: Optional[str] = None  # options naming the same group exclude each other
    in_file: bool = True             # False: not a config-file key (--config itself)
    group: str = ""                  # set by _group

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def o_key(self) -> str:
        """The -o spelling, also the config-file key."""
        return self.o_name or self.name

    @property
    def file_keys(self) -> tuple[str, ...]:
        """Config-file keys: the -o spelling, and the plain name where it differs (``user``)."""
        return tuple(dict.fromkeys((self.o_key, self.name))) if self.in_file else ()

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def takes_value(self) -> bool:
        return self.metavar is not None

    @property
    def parser(self) -> Callable[[Any], Any]:
        return self.parse or (_text if self.takes_value else parse_flag)

    @property
    def usage(self) -> str:
        """``--cache-size SIZE``, ``--foreground, -f`` (Markdown)."""
        first = f"`{self.flag} {self.metavar}`" if self.takes_value else f"`{self.flag}`"
        return first + (f", `{self.short}`" if self.short else "")

    @property
    def default_markdown(self) -> str:
        if self.required:
            return "required"
        if self.default_doc:
            return self.default_doc
        if not self.takes_value:
            return "off"
        return "–" if self.default is None else f"`{self.default}`"

    def value(self, raw: Any) -> Any:
        """*raw* (text as given, or a bool for a flag) as the value of the Config field."""
        if self.choices and raw not in self.choices:
            raise ConfigError(f"invalid {self.flag} {raw!r}: choose {', '.join(self.choices[:-1])} "
                              f"or {self.choices[-1]}")
        try:
            return self.parser(raw)
        except ConfigError as exc:
            message = str(exc)
            raise ConfigError(message if self.flag in message else f"{self.flag}: {message}") from None

    def check(self, value: Any) -> None:
        if self.valid is not None and value is not None and not self.valid(value):
            raise ConfigError(f"{self.flag} {self.invalid}")


def _group(title: str, *options: Option) -> tuple[Option, ...]:
    return tuple(dataclasses.replace(option, group=title) for option in options)


_SHA256_HEX = re.compile(r"(?:[0-9a-fA-F]{2}:?){31}[0-9a-fA-F]{2}")

# The mount options, in the order of `yeastarfs mount --help`, the README and the man page.
OPTIONS: tuple[Option, ...] = (
    *_group(
        "PBX",
        Option("pbx", metavar="URL", field="pbx_url", parse=check_pbx_url, required=True,
               help="the PBX's web address, `https://HOST:8088` (the API uses the web GUI's port)"),
        Option("user", metavar="NAME", field="username", o_name="username", required=True,
               help="the API username set on the PBX (`-o username=`: mount(8) reserves `user`)"),
        Option("password_file", metavar="PATH",
               help=f"file holding the API password; otherwise `${PASSWORD_ENV}`. Never on the command line."),
        Option("ca_file", metavar="PATH", exclusive="tls",
               help="verify the PBX's certificate against this file (its self-signed certificate or your CA)"),
        Option("insecure", exclusive="tls", help="do not verify the certificate (warns once)"),
        Option("pin_sha256", metavar="HEX", field="pin_sha256", exclusive="tls",
               help="trust exactly the certificate with this SHA-256 fingerprint "
                    "(`yeastarfs fingerprint URL` prints it)",
               valid=lambda hex_digits: _SHA256_HEX.fullmatch(hex_digits) is not None,
               invalid="must be the certificate's SHA-256 as 64 hex digits (colons allowed); "
                       "get it with: yeastarfs fingerprint URL"),
        Option("proxy", metavar="URL|environment", field="proxy", parse=_proxy,
               default_doc="none: connect directly",
               help="reach the PBX through this HTTP proxy; `environment` honours `HTTPS_PROXY`, "
                    "`HTTP_PROXY` and `NO_PROXY` (ignored otherwise, like `REQUESTS_CA_BUNDLE`)"),
        Option("pbx_timezone", metavar="ZONE", field="pbx_timezone", parse=_time_zone,
               default_doc="detected from the PBX, else this machine's zone",
               help="the PBX's time zone, an IANA name such as `Europe/Berlin`"),
    ),
    *_group(
        "cache and index",
        Option("cache_dir", metavar="DIR", field="cache_root", parse=_absolute_path, default=default_cache_root,
               default_doc="`$XDG_CACHE_HOME/yeastarfs`, `~/.cache/yeastarfs`, or `/var/cache/yeastarfs` "
                           "without a HOME",
               help="where recordings, the index and the log live; one sub-directory per PBX"),
        Option("cache_size", metavar="SIZE", field="cache_max_bytes", parse=parse_size, default="4G",
               help="disk budget for cached recordings (`500M`, `10G`; binary units)",
               valid=lambda size_bytes: size_bytes > 0, invalid="must be positive"),
        Option("cache_min_free", metavar="SIZE", field="cache_min_free_bytes", parse=parse_size, default="1G",
               help="free space always left on the cache's disk"),
        Option("since", metavar="DURATION", field="since_s", parse=parse_duration, default="30d",
               help="how far back the CDR backfill at start reaches (`30d`, `12h`, `2w`)"),
        # A first mount waits this long for the CDR backfill, then comes up and finishes it in
        # the background (mount(8) at boot must not hang on a slow PBX).
        Option("start_timeout", metavar="SECONDS", field="start_timeout_s", parse=_seconds, default="20",
               help="longest wait for the CDR backfill before mounting; the rest of it goes on in the background"),
        Option("poll_interval", metavar="SECONDS", field="poll_interval_s", parse=_seconds, default="60",
               help="how often the recent CDR is polled for recordings no event announced",
               valid=lambda seconds: seconds > 0, invalid="must be positive"),  # > 0 is also false for NaN
        # Finds what polls cannot: rows the PBX exported late, calls longer than a poll's lookback.
        Option("resync_interval", metavar="DURATION", field="resync_interval_s", parse=parse_duration,
               default="6h", help="how often the whole `--since` window is read again for recordings the "
                                  "polls missed (`0`: only on `kill -HUP`)"),
    ),
    *_group(
        "events and downloads",
        # 8260: the PBX's own default for HTTP events (yeastar-api.md §7.1).
        Option("events_port", metavar="PORT", field="events_port", parse=_whole_number, default="8260",
               help="port the PBX pushes `NewCdr` events to (`0`: any free port; the PBX is told which)",
               valid=lambda port: 0 <= port <= 65535,
               invalid="must be 0-65535 (0 picks a free port and tells the PBX)"),
        Option("no_events", field="events_enabled", parse=_flag_off,
               help="do not listen for events; rely on CDR polling"),
        # None: the PBX's own address(es); "any" also sets Config.allow_any_event_source.
        Option("events_allow_from", metavar="IP,…|any", field="events_allow_from", parse=_address_list,
               default_doc="the PBX's addresses", help="who may push events"),
        # The PBX's TCP event port is configurable on the PBX; 8333 is the commonly quoted default.
        Option("tcp_events_port", metavar="PORT", field="tcp_events_port", parse=_whole_number, default="8333",
               help="the PBX's TCP event port, used when its report method is TCP"),
        # The PBX drops a token after 30 idle minutes; a heartbeat after 10 keeps it with margin.
        Option("heartbeat_interval", metavar="SECONDS", field="heartbeat_interval_s", parse=_seconds,
               default="600", help="keep the token alive after this long idle (the PBX drops it after 1800)",
               valid=lambda seconds: 1 <= seconds <= 1500,
               invalid="must be 1-1500 seconds (the PBX drops idle tokens after 1800)"),
        Option("prefetch", metavar="none|new", field="prefetch_new", parse=_is_new, default="none",
               choices=("none", "new"),
               help="`new`: download every newly announced recording into the cache at once"),
        Option("max_downloads", metavar="N", field="max_downloads", parse=_whole_number, default="4",
               help="downloads from the PBX running at once",
               valid=lambda count: 1 <= count <= 100, invalid="must be 1-100 (a PBX is a small box; 4 is the default)"),
        Option("stall_timeout", metavar="SECONDS", field="stall_timeout_s", parse=_seconds, default="60",
               help="a read waiting for bytes fails with EIO after this long without progress",
               valid=lambda seconds: seconds > 0, invalid="must be positive"),  # 0 would fail every waiting read
        Option("background_readers", metavar="NAME,…|none", field="background_readers", parse=_reader_names,
               default="standard",
               help="processes served only from the cache: an uncached recording is refused at once (EACCES); "
                    "`standard`: the thumbnailers and indexers listed under File managers; `none`: serve every "
                    "process"),
    ),
    *_group(
        "running",
        Option("foreground", short="-f", help="stay in the foreground, log to stderr"),
        Option("allow_other", field="allow_other",
               help="let other users read the mount (needs `user_allow_other` in `/etc/fuse.conf` for non-root)"),
        Option("uid", metavar="N", field="uid", parse=_whole_number, default_doc="the mounting user",
               help="owner shown for every file and folder"),
        Option("gid", metavar="N", field="gid", parse=_whole_number, default_doc="the mounting user's group",
               help="group shown for every file and folder"),
        Option("umask", metavar="OCTAL", field="umask", parse=_octal, default="022",
               help="permission bits removed from `r-xr-xr-x` (`027`: nothing for others)"),
        Option("config", metavar="PATH", in_file=False,
               default_doc="`/etc/yeastarfs/config.toml`, then `~/.config/yeastarfs/config.toml`",
               help="TOML file with any of these options; `YEASTARFS_<NAME>` variables and the command line "
                    "override it"),
        Option("log_file", metavar="PATH", field="log_file",
               default_doc="`CACHE_DIR/yeastarfs.log` in the background, else stderr", help="where to log"),
        Option("log_level", metavar="LEVEL", field="log_level", default="INFO",
               choices=("DEBUG", "INFO", "WARNING", "ERROR"),
               help="the least severe messages logged: `DEBUG`, `INFO`, `WARNING` or `ERROR`"),
    ),
)


def plain(markdown: str) -> str:
    """Help or default text for a terminal: the Markdown `code` marks dropped."""
    return markdown.replace("`", "")


# The README's options table stands between these lines (scripts/update_readme_options.py).
OPTIONS_BEGIN = "<!-- options:begin -->"
OPTIONS_END = "<!-- options:end -->"


def options_markdown() -> str:
    """The README's options table, between its OPTIONS_BEGIN and OPTIONS_END lines."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| option | default | meaning |", "|---|---|---|"]
    rows += [f"| {cell(o.usage)} | {cell(o.default_markdown)} | {cell(o.help)} |" for o in OPTIONS]
    return "\n".join(rows) + "\n"


# -- Config ----------------------------------------------------------------------------------

def _option_fields(cls: type) -> type:
    """Add to *cls*, before ``@dataclass`` reads it, one field for each option that fills one.

    Each gets the option's default (parsed) and its parser's return type, and carries the
    option in its metadata (``dataclasses.fields(Config)[i].metadata["option"]``). Fields
    without a default must come first in a dataclass, so those are moved to the front.
    """
    declared = dict(cls.__dict__.get("__annotations__", {}))
    for option in OPTIONS:
        if option.field is None:
            continue
        if option.field in declared:
            raise TypeError(f"Config.{option.field} is declared twice")
        declared[option.field] = _field_type(option)
        setattr(cls, option.field, _field_for(option))

    def has_default(name: str) -> bool:
        value = cls.__dict__.get(name, dataclasses.MISSING)
        if isinstance(value, dataclasses.Field):
            return value.default is not dataclasses.MISSING or value.default_factory is not dataclasses.MISSING
        return value is not dataclasses.MISSING

    cls.__annotations__ = {name: declared[name] for name in sorted(declared, key=has_default)}
    return cls


def _field_type(option: Option) -> str:
    returns = getattr(option.parser, "__annotations__", {}).get("return", "Any")
    optional = option.default is None and option.takes_value and not option.required
    return f"Optional[{returns}]" if optional and not returns.startswith("Optional") else returns


def _field_for(option: Option) -> dataclasses.Field:
    metadata = {"option": option}
    if option.required:
        return dataclasses.field(metadata=metadata)
    if callable(option.default):
        return dataclasses.field(default_factory=option.default, metadata=metadata)
    if option.takes_value and option.default is None:
        return dataclasses.field(default=None, metadata=metadata)
    return dataclasses.field(default=option.value(option.default if option.takes_value else False),
                             metadata=metadata)


@dataclasses.dataclass(frozen=True)
@_option_fields
class Config:
    """Everything a mount needs, validated. Sizes in bytes, durations in seconds.

    The fields below are those no single option fills; every option in `OPTIONS` with a
    *field* adds that field (``cache_max_bytes``, ``since_s``, ``pbx_url``, ``username``…),
    with the option's default.
    """

    mountpoint: str
    password: str = dataclasses.field(repr=False)  # from --password-file, $YEASTARFS_PASSWORD or the file
    events_host: str = "0.0.0.0"                   # where the event receiver listens
    verify: Union[bool, str] = True                # --ca-file PATH, or False for --insecure
    allow_any_event_source: bool = False           # --events-allow-from any

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
        for field in dataclasses.fields(self):
            option = field.metadata.get("option")
            if option is not None:
                option.check(getattr(self, field.name))
        if self.pbx_url.startswith("http://") and (self.pin_sha256 or isinstance(self.verify, str)):
            raise ConfigError("--pin-sha256 and --ca-file secure https:// only; the PBX address "
                              f"{self.pbx_url} is plain http (use https://HOST:8088)")
        if isinstance(self.verify, str) and not os.path.isfile(self.verify):
            raise ConfigError(f"--ca-file {self.verify}: no such file")
        return self
