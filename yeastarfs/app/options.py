"""Where mount options come from besides the command line: mount(8) ``-o`` lists, the
environment, and a TOML config file. Precedence: command line, then environment, then file.

* ``yeastarfs URL MOUNTPOINT -o key=value,flag,…`` is the form ``mount -t fuse.yeastarfs``
  and ``/etc/fstab`` use (mount.fuse3 runs it). Every long option has an ``-o`` spelling:
  its name with ``_`` for ``-`` (``cache_size=10G``, ``allow_other``), except the PBX user,
  which is ``username=`` because mount(8) reserves ``user`` and ``users``. Options that
  belong to mount(8) itself (``_netdev``, ``noauto``, ``nofail``…) are ignored.
* ``YEASTARFS_<OPTION>`` environment variables (``YEASTARFS_CACHE_SIZE=10G``).
* ``--config PATH``, else ``/etc/yeastarfs/config.toml``, else
  ``$XDG_CONFIG_HOME/yeastarfs/config.toml``: the same keys (``cache_size = "10G"``,
  ``user = "api"``), plus ``password`` if you choose to keep it there.

Stdlib only; no yeastarfs imports but ``errors``.
"""

from __future__ import annotations

import argparse
import os
import stat
from typing import Optional

from yeastarfs.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: the same parser, packaged separately
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

SYSTEM_CONFIG = "/etc/yeastarfs/config.toml"
ENV_PREFIX = "YEASTARFS_"
# mount(8) and mount.fuse3 handle these themselves, or they are implied (we always mount
# read-only, nosuid, nodev): accepted and ignored in an -o list.
IGNORED_MOUNT_OPTIONS = {
    "defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group", "_netdev", "nofail",
    "rw", "ro", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "atime", "noatime", "relatime",
    "nodiratime", "strictatime", "lazytime", "sync", "async", "default_permissions",
}
IGNORED_PREFIXES = ("x-", "comment=", "fsname=", "subtype=", "context=")
# -o spellings that differ from the long option's dest.
OPTION_ALIASES = {"username": "user"}
# Keys a config file may hold that have no command-line option.
FILE_ONLY_KEYS = {"password"}


def user_config_path() -> Optional[str]:
    base = os.environ.get("XDG_CONFIG_HOME") or (
        os.path.join(os.environ["HOME"], ".config") if os.environ.get("HOME") else None)
    return os.path.join(base, "yeastarfs", "config.toml") if base else None


def is_fstab_form(argv: list[str]) -> bool:
    return len(argv) >= 2 and "://" in argv[0] and not argv[0].startswith("-")


def translate_fstab_argv(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``URL MOUNTPOINT -o a=b,c`` → ``mount MOUNTPOINT --pbx URL --a b --c``."""
    source, mountpoint, rest = argv[0], argv[1], argv[2:]
    translated = ["mount", mountpoint, "--pbx", source]
    flags, valued = _mount_option_kinds(parser)
    index = 0
    while index < len(rest):
        arg = rest[index]
        if arg == "-o" and index + 1 < len(rest):
            translated += _translate_option_list(rest[index + 1], flags, valued)
            index += 2
            continue
        if arg.startswith("-o") and len(arg) > 2:
            translated += _translate_option_list(arg[2:], flags, valued)
        elif arg in ("-f", "--foreground"):
            translated.append("--foreground")
        elif arg not in ("-n", "-s", "-v"):  # mount(8)'s no-mtab, sloppy, verbose
            raise ConfigError(f"unexpected argument {arg!r} in the mount(8) form")
        index += 1
    return translated


def _translate_option_list(text: str, flags: set[str], valued: set[str]) -> list[str]:
    out: list[str] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, has_value, value = item.partition("=")
        if key == "user" and has_value:
            raise ConfigError(f"mount option {item!r}: the PBX user is username= (mount(8) reserves user)")
        if key in IGNORED_MOUNT_OPTIONS or item.startswith(IGNORED_PREFIXES):
            continue
        dest = OPTION_ALIASES.get(key, key.replace("-", "_"))
        if dest in flags and not has_value:
            out.append("--" + dest.replace("_", "-"))
        elif dest in valued and has_value:
            out += ["--" + dest.replace("_", "-"), value]
        else:
            raise ConfigError(f"unknown or malformed mount option {item!r}")
    return out


def _mount_option_kinds(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    flags, valued = set(), set()
    for action in parser._actions:  # argparse offers no public listing of actions
        if not action.option_strings or action.dest in ("help", "ready_fd"):
            continue
        (flags if action.nargs == 0 else valued).add(action.dest)
    return flags, valued


def layered_defaults(parser: argparse.ArgumentParser, config_path: Optional[str]) -> dict:
    """Defaults from the config file, overridden by the environment (the CLI overrides both)."""
    flags, valued = _mount_option_kinds(parser)
    known = flags | valued | FILE_ONLY_KEYS
    values = _from_file(config_path, known)
    for dest in flags | valued:
        env_value = os.environ.get(ENV_PREFIX + dest.upper())
        if env_value is not None and dest != "password":
            values[dest] = _env_flag(dest, env_value) if dest in flags else env_value
    return values


def _from_file(config_path: Optional[str], known: set[str]) -> dict:
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
    values = {}
    for key, value in raw.items():
        dest = OPTION_ALIASES.get(key, key.replace("-", "_"))
        if dest not in known:
            raise ConfigError(f"config file {path}: unknown key {key!r}")
        values[dest] = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if "password" in values and mode & (stat.S_IRGRP | stat.S_IROTH):
        raise ConfigError(f"config file {path} holds a password but is readable by others: chmod 600 it")
    return values


def _env_flag(dest: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{ENV_PREFIX}{dest.upper()}={text!r}: expected true or false")
