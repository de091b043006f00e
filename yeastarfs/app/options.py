"""Where mount options come from besides the command line: mount(8) ``-o`` lists, the
environment, and a TOML config file. Precedence: command line, then environment, then file.

Every spelling comes from the option's declaration in ``config.OPTIONS``:

* ``yeastarfs URL MOUNTPOINT -o key=value,flag,…`` is the form ``mount -t fuse.yeastarfs``
  and ``/etc/fstab`` use (mount.fuse3 runs it). Every option has an ``-o`` spelling: its
  name with ``_`` for ``-`` (``cache_size=10G``, ``allow_other``), except the PBX user,
  which is ``username=`` because mount(8) reserves ``user`` and ``users``. Options that
  belong to mount(8) itself (``_netdev``, ``noauto``, ``nofail``…) are ignored.
* ``YEASTARFS_<NAME>`` environment variables (``YEASTARFS_CACHE_SIZE=10G``,
  ``YEASTARFS_ALLOW_OTHER=true``); ``YEASTARFS_CONFIG`` also chooses the config file.
* ``--config PATH``, else ``/etc/yeastarfs/config.toml``, else
  ``$XDG_CONFIG_HOME/yeastarfs/config.toml``: the ``-o`` keys (``cache_size = "10G"``,
  ``username = "api"``; ``user`` too, as mount(8) has no say there), plus ``password`` if
  you choose to keep it there.

Values from the environment and the file are checked here, so that an error names where
the bad value came from; they are handed on as text (flags as bools), like the command line's.

Stdlib only; no yeastarfs imports but ``errors`` and ``config``.
"""

from __future__ import annotations

import os
import stat
from typing import Any, Optional

from yeastarfs.config import OPTIONS, Option, parse_flag
from yeastarfs.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: the same parser, packaged separately
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

SYSTEM_CONFIG = "/etc/yeastarfs/config.toml"
# mount(8) and mount.fuse3 handle these themselves, or they are implied (we always mount
# read-only, nosuid, nodev): accepted and ignored in an -o list.
IGNORED_MOUNT_OPTIONS = {
    "defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group", "_netdev", "nofail",
    "rw", "ro", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "atime", "noatime", "relatime",
    "nodiratime", "strictatime", "lazytime", "sync", "async", "default_permissions",
}
IGNORED_PREFIXES = ("x-", "comment=", "fsname=", "subtype=", "context=")
# Keys a config file may hold that are no option: the password stays out of argv and -o.
FILE_ONLY_KEYS = {"password"}

BY_O_KEY = {option.o_key: option for option in OPTIONS}
BY_FILE_KEY = {key: option for option in OPTIONS for key in option.file_keys}
CONFIG_OPTION = next(option for option in OPTIONS if option.name == "config")


def user_config_path() -> Optional[str]:
    base = os.environ.get("XDG_CONFIG_HOME") or (
        os.path.join(os.environ["HOME"], ".config") if os.environ.get("HOME") else None)
    return os.path.join(base, "yeastarfs", "config.toml") if base else None


def is_fstab_form(argv: list[str]) -> bool:
    return len(argv) >= 2 and "://" in argv[0] and not argv[0].startswith("-")


def translate_fstab_argv(argv: list[str]) -> list[str]:
    """``URL MOUNTPOINT -o a=b,c`` → ``mount MOUNTPOINT --pbx URL --a b --c``."""
    source, mountpoint, rest = argv[0], argv[1], argv[2:]
    translated = ["mount", mountpoint, "--pbx", source]
    index = 0
    while index < len(rest):
        arg = rest[index]
        if arg == "-o" and index + 1 < len(rest):
            translated += translate_option_list(rest[index + 1])
            index += 2
            continue
        if arg.startswith("-o") and len(arg) > 2:
            translated += translate_option_list(arg[2:])
        elif arg in ("-f", "--foreground"):
            translated.append("--foreground")
        elif arg not in ("-n", "-s", "-v"):  # mount(8)'s no-mtab, sloppy, verbose
            raise ConfigError(f"unexpected argument {arg!r} in the mount(8) form")
        index += 1
    return translated


def translate_option_list(text: str) -> list[str]:
    """``username=api,allow_other`` → ``["--user", "api", "--allow-other"]``."""
    out: list[str] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, has_value, value = item.partition("=")
        if key == "user" and has_value:
            raise ConfigError(f"mount option {item!r}: the PBX user is username= (mount(8) reserves user)")
        if key in IGNORED_MOUNT_OPTIONS or item.startswith(IGNORED_PREFIXES):
            continue
        option = BY_O_KEY.get(key)
        if option is None or option.takes_value != bool(has_value):
            raise ConfigError(f"unknown or malformed mount option {item!r}")
        out += [option.flag, value] if option.takes_value else [option.flag]
    return out


def layered_defaults(config_path: Optional[str]) -> dict[str, Any]:
    """Option values (by option name) from the config file, overridden by the environment;
    the command line overrides both. *config_path* None: ``$YEASTARFS_CONFIG``, else the
    first of the default files that exists."""
    values = _from_file(config_path or os.environ.get(CONFIG_OPTION.env))
    for option in OPTIONS:
        text = os.environ.get(option.env)
        if text is not None:
            values[option.name] = _checked(option, text, option.env)
    return values


def _from_file(config_path: Optional[str]) -> dict[str, Any]:
    path = config_path or next((p for p in (SYSTEM_CONFIG, user_config_path()) if p and os.path.isfile(p)), None)
    if path is None:
        return {}
    if tomllib is None:
        raise ConfigError("config files need Python 3.11 or newer, or the tomli package")
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in FILE_ONLY_KEYS:
            values[key] = value
            continue
        option = BY_FILE_KEY.get(key)
        if option is None:
            raise ConfigError(f"config file {path}: unknown key {key!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # events_port = 0 is as good as "0"
        values[option.name] = _checked(option, value, f"config file {path}: {key}")
    if "password" in values and mode & (stat.S_IRGRP | stat.S_IROTH):
        raise ConfigError(f"config file {path} holds a password but is readable by others: chmod 600 it")
    return values


def _checked(option: Option, raw: Any, where: str) -> Any:
    """*raw* as the command line would give it (a flag as a bool), once it parses."""
    try:
        if not option.takes_value:
            return parse_flag(raw)
        option.value(raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return raw
