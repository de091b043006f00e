"""Readers: which process opened a file, and whether it is a background reader.

Thumbnailers and desktop indexers open every file a file manager shows them, or every file
they crawl, and read much of each; on a mount whose files come from a PBX, every such read
is a download. `BackgroundReaders` recognises them by process name (``--background-readers``)
so that the core can serve them from the cache only (README "File managers").

The FUSE adapter passes a `Reader` (the caller's pid and uid, from the FUSE request). The
kernel reports the calling *thread*, whose own name says nothing (GStreamer's
``typefind:sink``, GLib's ``pool-tumblerd``); its process (thread group) is found in
``/proc/PID/status``. A configured name matches a process when it equals:

- the process's name (``/proc/TGID/comm``; the kernel cuts names to 15 characters, so a
  longer configured name is compared by its first 15);
- the file name of its executable (``/proc/PID/exe``, readable for our own user's or, as
  root, any process);
- the file name of its ``argv[0]``, or of its ``argv[1]`` without ``.so`` (KDE runs its
  thumbnail worker as ``kioworker …/thumbnail.so thumbnail …``).

A process that has gone or cannot be inspected is an ordinary reader: recognising is a
courtesy to the PBX, never a reason to refuse someone.

Owns nothing else and imports nothing from yeastarfs. Threading: stateless after
construction; any thread may ask.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Optional

# What the kernel keeps of a process name (TASK_COMM_LEN - 1).
COMM_CHARS = 15
PROC = "/proc"


@dataclasses.dataclass(frozen=True)
class Reader:
    """Who asked: the calling thread's id and user, as the FUSE request says."""

    pid: int
    uid: int = -1


class BackgroundReaders:
    """The configured background reader names, and the test of a reader against them.

    Attributes:
        names: the configured process names (empty: nobody is a background reader).
    """

    def __init__(self, names: Iterable[str], proc: str = PROC) -> None:
        self.names = tuple(name for name in names if name)
        self._proc = proc
        self._full = frozenset(self.names)
        self._comms = frozenset(name[:COMM_CHARS] for name in self.names)

    def match(self, reader: Optional[Reader]) -> Optional[str]:
        """The configured name *reader*'s process answers to, or None (an ordinary reader)."""
        if not self.names or reader is None or reader.pid <= 0:
            return None
        thread_dir = os.path.join(self._proc, str(reader.pid))
        process_dir = os.path.join(self._proc, _tgid(thread_dir) or str(reader.pid))
        process_comm = _read_text(os.path.join(process_dir, "comm"))
        if process_comm in self._comms:
            return process_comm
        for name in _file_names_of(process_dir):
            if name in self._full:
                return name
        return None


def _file_names_of(process_dir: str) -> list[str]:
    """The file names a process runs as: its executable's, argv[0]'s, argv[1]'s without .so."""
    names = []
    try:
        names.append(os.path.basename(os.readlink(os.path.join(process_dir, "exe"))).removesuffix(" (deleted)"))
    except OSError:
        pass
    argv = _read_text(os.path.join(process_dir, "cmdline")).split("\0")
    if argv and argv[0]:
        names.append(os.path.basename(argv[0]))
    if len(argv) > 1 and argv[1].endswith(".so"):
        names.append(os.path.basename(argv[1])[:-len(".so")])
    return [name for name in names if name]


def _tgid(thread_dir: str) -> Optional[str]:
    """The thread group (process) id of a thread, from its status file."""
    for line in _read_text(os.path.join(thread_dir, "status"), limit=4096).splitlines():
        if line.startswith("Tgid:"):
            return line.split(":", 1)[1].strip() or None
    return None


def _read_text(path: str, limit: int = 4096) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read(limit).decode("utf-8", "replace").strip("\n\0")
    except OSError:
        return ""
