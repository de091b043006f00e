"""``yeastarfs install-system``: put this installation where mount(8), systemd and man look.

What it puts, under an optional staging root (``--dest``, like make's DESTDIR):

- ``PREFIX/bin/yeastarfs``: a symbolic link to this environment's console script. mount(8)
  runs ``mount.fuse3``, which runs ``yeastarfs`` through ``/bin/sh -c`` with mount(8)'s own
  PATH: at boot systemd's (``/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin``),
  so the default prefix ``/usr/local`` is found there and never collides with the
  distribution's ``/usr``;
- ``PREFIX/share/man/man1/yeastarfs.1``: the man page (``yeastarfs man``);
- ``PREFIX/share/doc/yeastarfs/``: the README (from the installed package's metadata) and
  the example ``.mount``/``.automount`` pair;
- ``UNIT_DIR/yeastarfs@.service``: the service template, its ``/usr/local`` paths rewritten
  to PREFIX.

Idempotent: a file whose content is already right is left alone, and every path is
reported as written, linked or unchanged. Runs no systemctl (it prints what to run).

Threading: none; a command-line tool.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import sysconfig
from typing import Callable, Optional

from yeastarfs.errors import ConfigError

DEFAULT_PREFIX = "/usr/local"
DEFAULT_UNIT_DIR = "/etc/systemd/system"
# The units as shipped name this prefix; install-system rewrites it to --prefix.
SHIPPED_PREFIX = "/usr/local/"
UNITS_DIR = os.path.join(os.path.dirname(__file__), "systemd")
SERVICE_TEMPLATE = "yeastarfs@.service"
# Installed beside it, but its ExecStart names a command of yours: edit it before enabling.
WATCH_TEMPLATE = "yeastarfs-watch@.service"
EXAMPLE_UNITS = ("mnt-recordings.mount", "mnt-recordings.automount")


def install_system(prefix: str = DEFAULT_PREFIX, dest: str = "/", unit_dir: str = DEFAULT_UNIT_DIR,
                   man_page: Optional[Callable[[], str]] = None, out=None) -> int:
    """Install as the module docstring says; print one line per path to *out*. Returns 0."""
    out = sys.stdout if out is None else out
    prefix = os.path.abspath(prefix)
    doc_dir = os.path.join(prefix, "share", "doc", "yeastarfs")

    def report(action: str, path: str) -> None:
        print(f"{action:9} {path}", file=out)

    report(_link(_staged(dest, os.path.join(prefix, "bin", "yeastarfs")), console_script()),
           os.path.join(prefix, "bin", "yeastarfs"))
    if man_page is not None:
        path = os.path.join(prefix, "share", "man", "man1", "yeastarfs.1")
        report(_write(_staged(dest, path), man_page()), path)
    report(_write(_staged(dest, os.path.join(doc_dir, "README.md")), readme()), os.path.join(doc_dir, "README.md"))
    for name in EXAMPLE_UNITS:
        path = os.path.join(doc_dir, name)
        report(_write(_staged(dest, path), _unit_text(name, prefix)), path)
    for name in (WATCH_TEMPLATE, SERVICE_TEMPLATE):  # the mount's template last: its action decides the hint
        path = os.path.join(unit_dir, name)
        action = _write(_staged(dest, path), _unit_text(name, prefix))
        report(action, path)
    if action != "unchanged" and os.path.abspath(dest) == "/":
        print("next: systemctl daemon-reload, then systemctl enable --now yeastarfs@mnt-recordings.service "
              "(for /mnt/recordings; see yeastarfs(1))", file=out)
    return 0


def console_script() -> str:
    """This environment's ``yeastarfs`` console script (where pip put it)."""
    candidates = [os.path.join(os.path.dirname(sys.executable), "yeastarfs"),
                  os.path.join(sysconfig.get_path("scripts"), "yeastarfs")]
    if sys.argv and os.path.basename(sys.argv[0]) == "yeastarfs":
        candidates.insert(0, sys.argv[0])
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    raise ConfigError("no yeastarfs command found next to this Python "
                      f"({', '.join(candidates)}); install the package with pip first")


def readme() -> str:
    """The README, as the installed package's metadata carries it."""
    try:
        text = importlib.metadata.metadata("yeastarfs").get_payload()
    except importlib.metadata.PackageNotFoundError:
        text = None
    if not text:
        raise ConfigError("the yeastarfs package metadata has no README; reinstall it with pip")
    return text


def _unit_text(name: str, prefix: str) -> str:
    with open(os.path.join(UNITS_DIR, name), encoding="utf-8") as handle:
        return handle.read().replace(SHIPPED_PREFIX, prefix.rstrip("/") + "/")


def _staged(dest: str, path: str) -> str:
    return os.path.join(os.path.abspath(dest), path.lstrip("/"))


def _write(path: str, text: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            if handle.read() == text:
                return "unchanged"
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)  # never a half-written unit or page
    return "wrote"


def _link(path: str, target: str) -> str:
    if os.path.islink(path) and os.readlink(path) == target:
        return "unchanged"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    action = "replaced" if os.path.lexists(path) else "linked"
    temporary = f"{path}.tmp.{os.getpid()}"
    os.symlink(target, temporary)
    os.replace(temporary, path)
    return action
