"""Commands that work on a mount or its cache from outside: status, prefetch, calls, cache,
and fingerprint.

The first four talk to the daemon only through the filesystem itself (an extended
attribute of the root for status, plain reads for prefetch) or read its cache directory,
so they need no socket, no credentials and no PBX access. fingerprint alone connects to
the PBX, to show the certificate to pin. The xattr names repeat fs.py's on purpose: this
module must not import the FUSE binding.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import os
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from typing import Optional

from yeastarfs.cache import COMPLETE_DIR, CacheDir
from yeastarfs.errors import ConfigError

STATUS_XATTR = "user.yeastarfs.status"


def read_status(mountpoint: str) -> dict:
    """The daemon's statistics. Raises ConfigError when *mountpoint* is not a yeastarfs mount."""
    try:
        return json.loads(os.getxattr(mountpoint, STATUS_XATTR))
    except OSError as exc:
        raise ConfigError(f"{mountpoint} is not a running yeastarfs mount ({exc.strerror})") from None


def _ago(timestamp) -> str:
    if not timestamp:
        return "never"
    return f"{dt.datetime.fromtimestamp(timestamp):%Y-%m-%d %H:%M:%S} ({time.time() - timestamp:.0f} s ago)"


def _bytes(count) -> str:
    value = float(count or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} TiB"


def print_status(mountpoint: str, as_json: bool = False) -> int:
    status = read_status(mountpoint)
    if as_json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    hit_rate = status.get("cache_hit_rate")
    token_age_s = status.get("token_age_s")
    lines = [
        f"mountpoint:        {status['mountpoint']} (pid {status['pid']}, up {status['uptime_s']:.0f} s)",
        f"PBX:               {status['pbx']} ({'reachable' if status['pbx_reachable'] else 'NOT reachable'})",
        f"token age:         {'no token' if token_age_s is None else f'{token_age_s:.0f} s'}",
        f"last event:        {_ago(status.get('last_event_time'))}",
        f"last CDR poll:     {_ago(status.get('last_poll_time'))}"
        + (f"  last error: {status['last_poll_error']}" if status.get("last_poll_error") else ""),
        f"recordings:        {status['recordings_indexed']}",
        f"cache:             {_bytes(status['cache_used_bytes'])} held of {_bytes(status['cache_limit_bytes'])}, "
        f"{status['cache_files']} idle files, hit rate {'n/a' if hit_rate is None else f'{hit_rate:.0%}'}",
        f"opens:             {_opens(status.get('opens') or {})}",
        f"downloads:         {_download_states(status['downloads_in_flight'])}",
    ]
    for item in status["downloads_in_flight"]:
        total = item["total_bytes"]
        share = f"{item['received_bytes'] / total:.0%}" if total else "?"
        lines.append(f"  {item['recording']}: {item.get('state', '?')}, {_bytes(item['received_bytes'])} "
                     f"of {_bytes(total)} ({share}), {item.get('readers', 0)} readers")
    print("\n".join(lines))
    return 0


def _opens(opens: dict) -> str:
    """How opens were served: a joined download is one download with several readers."""
    return (f"{opens.get('cached', 0)} from the cache, {opens.get('downloaded', 0)} started a download, "
            f"{opens.get('joined', 0)} joined one, {opens.get('refused', 0)} refused (background readers)")


def _download_states(downloads: list) -> str:
    """``2 running, 1 parked`` (suspended and parked downloads hold no connection slot)."""
    counts: dict = {}
    for item in downloads:
        counts[item.get("state", "running")] = counts.get(item.get("state", "running"), 0) + 1
    return ", ".join(f"{count} {state}" for state, count in sorted(counts.items())) or "none"


# -- prefetch ----------------------------------------------------------------------------

CACHED_XATTR = "user.yeastarfs.cached"
READ_BLOCK_BYTES = 1 << 20
PROGRESS_INTERVAL_S = 0.5


def _is_cached(path: str) -> bool:
    try:
        return os.getxattr(path, CACHED_XATTR) == b"1"
    except OSError:
        return False


def collect_files(paths: list[str], start: Optional[dt.date] = None, end: Optional[dt.date] = None) -> list[str]:
    """Every recording under *paths* (files or folders), optionally within [start, end]."""
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs.sort()
                files.extend(os.path.join(root, name) for name in sorted(names))
        elif os.path.exists(path):
            files.append(path)
        else:
            raise ConfigError(f"{path}: no such file or folder")
    if start or end:
        files = [f for f in files if _within(os.path.basename(f), start, end)]
    return files


def _within(name: str, start: Optional[dt.date], end: Optional[dt.date]) -> bool:
    try:
        day = dt.datetime.strptime(name[:8], "%Y%m%d").date()
    except ValueError:
        return False
    return (start is None or day >= start) and (end is None or day <= end)


class _Progress:
    """Bytes, rate and ETA on one line (a terminal) or a line every few seconds (a log)."""

    def __init__(self, total_bytes: int, files: int) -> None:
        self.total_bytes, self.files = total_bytes, files
        self.done_bytes = self.done_files = self.failed = self.skipped = 0
        self.started = time.monotonic()
        self._last_print = 0.0
        self._lock = threading.Lock()
        self._tty = sys.stderr.isatty()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.done_bytes += nbytes
        self.show()

    def file_done(self, ok: bool, skipped: bool = False) -> None:
        with self._lock:
            self.done_files += 1
            self.failed += 0 if ok else 1
            self.skipped += 1 if skipped else 0
        self.show()

    def show(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last_print < (PROGRESS_INTERVAL_S if self._tty else 5.0):
            return
        self._last_print = now
        elapsed_s = max(now - self.started, 1e-6)
        rate = self.done_bytes / elapsed_s
        left = max(0, self.total_bytes - self.done_bytes)
        eta = f"{left / rate:.0f} s" if rate > 0 and not final else "-"
        line = (f"prefetch: {self.done_files}/{self.files} files, {_bytes(self.done_bytes)} of ~{_bytes(self.total_bytes)}"
                f", {_bytes(rate)}/s, ETA {eta}")
        print(("\r" + line + "\033[K") if self._tty else line, end="" if self._tty and not final else "\n",
              file=sys.stderr, flush=True)


def prefetch(paths: list[str], jobs: int = 4, start: Optional[dt.date] = None, end: Optional[dt.date] = None) -> int:
    """Read recordings through the mount so the daemon caches them. Ctrl-C stops cleanly."""
    files = collect_files(paths, start, end)
    progress = _Progress(sum(os.stat(f).st_size for f in files), len(files))
    stop = threading.Event()
    pending = iter(files)
    lock = threading.Lock()

    def worker() -> None:
        while not stop.is_set():
            with lock:
                path = next(pending, None)
            if path is None:
                return
            _prefetch_one(path, progress, stop)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, jobs))]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    except KeyboardInterrupt:
        stop.set()
        progress.show(final=True)
        print("prefetch: interrupted; recordings read to the end are cached", file=sys.stderr)
        return 130
    progress.show(final=True)
    fetched = progress.done_files - progress.failed - progress.skipped
    print(f"prefetch: {fetched} fetched, {progress.skipped} already cached, {progress.failed} failed, "
          f"{_bytes(progress.done_bytes)} in {time.monotonic() - progress.started:.1f} s", file=sys.stderr)
    return 1 if progress.failed else 0


def _prefetch_one(path: str, progress: _Progress, stop: threading.Event) -> None:
    if _is_cached(path):
        progress.add(os.stat(path).st_size)
        progress.file_done(True, skipped=True)
        return
    try:
        with open(path, "rb", buffering=0) as handle:
            while not stop.is_set():
                block = handle.read(READ_BLOCK_BYTES)
                if not block:
                    break
                progress.add(len(block))
    except OSError as exc:
        print(f"\nprefetch: {path}: {exc.strerror}", file=sys.stderr)
        progress.file_done(False)
        return
    progress.file_done(True)


# -- calls -------------------------------------------------------------------------------

CALL_COLUMNS = ("path", "start_time", "caller", "callee", "type", "status", "call_seconds", "talk_seconds",
                "src_trunk", "dst_trunk", "did", "callid", "recording")


def list_calls(mountpoint: str, since_s: float, output_format: str = "csv") -> int:
    """Print the indexed calls with recordings since *since_s* ago, with their paths."""
    from yeastarfs.index import RecordingIndex  # only this command needs the database

    status = read_status(mountpoint)
    index = RecordingIndex(os.path.join(status["cache_dir"], "index.sqlite3"))
    try:
        start = dt.datetime.now() - dt.timedelta(seconds=since_s)
        rows = (_call_row(mountpoint, index.path_of(rec.name), rec) for rec in index.recordings_since(start))
        _write_rows(rows, output_format)
    finally:
        index.close()
    return 0


def _call_row(mountpoint: str, path: str, rec) -> dict:
    return {"path": os.path.join(mountpoint, path.lstrip("/")), "start_time": rec.timestart,
            "caller": rec.callfrom, "callee": rec.callto, "type": rec.call_type, "status": rec.status,
            "call_seconds": rec.call_s, "talk_seconds": rec.talk_s, "src_trunk": rec.src_trunk,
            "dst_trunk": rec.dst_trunk, "did": rec.did, "callid": rec.callid, "recording": rec.name}


def _write_rows(rows, output_format: str) -> None:
    if output_format == "json":
        for row in rows:  # JSON lines: streamable, one call per line
            print(json.dumps(row))
        return
    writer = csv.DictWriter(sys.stdout, fieldnames=CALL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)


# -- cache maintenance -----------------------------------------------------------------
# The folder's layout, its lock and what makes a cached file whole are cache.py's (CacheDir).

def _pbx_folders(cache_root: str, *, lock: bool = False):
    """Each per-PBX folder under *cache_root* in turn (with its lock: refused while a mount
    uses it), checked like a mount checks it."""
    for name in CacheDir.names(cache_root):
        with CacheDir(cache_root, name, lock=lock, create=False) as folder:
            yield folder


def cache_stats(cache_root: str) -> int:
    from yeastarfs.index import RecordingIndex
    for folder in _pbx_folders(cache_root):
        files = folder.complete_files()
        index = RecordingIndex(folder.index_path)
        try:
            indexed = index.count()
        finally:
            index.close()
        total = sum(size_bytes for _, size_bytes in files)
        print(f"{folder.path}: {len(files)} cached recordings, {_bytes(total)}; {indexed} recordings indexed")
    return 0


def cache_clear(cache_root: str) -> int:
    """Delete every cached recording (not the index). Refuses while a mount uses the cache."""
    for folder in _pbx_folders(cache_root, lock=True):
        count, freed = folder.remove_complete()
        print(f"{folder.path}: deleted {count} cached recordings, {_bytes(freed)}")
    return 0


def cache_verify(cache_root: str, delete_bad: bool = False) -> int:
    """Check every cached file is complete: its size equals the size the PBX announced
    (recorded in the index) and, for WAV files, the size in its RIFF header."""
    from yeastarfs.index import RecordingIndex
    bad = checked = 0
    for folder in _pbx_folders(cache_root, lock=delete_bad):
        index = RecordingIndex(folder.index_path)
        try:
            bad_names = []
            for name, _ in folder.complete_files():
                checked += 1
                indexed = index.get(name)
                problem = "not in the index" if indexed is None else folder.problem_with(
                    name, indexed.size_bytes if indexed.size_exact else None)
                if problem:
                    bad_names.append(name)
                    print(f"BAD {os.path.join(folder.path, COMPLETE_DIR, name)}: {problem}")
            bad += len(bad_names)
            if delete_bad and bad_names:
                folder.remove_complete(bad_names)
        finally:
            index.close()
    print(f"verified {checked} cached recordings: {checked - bad} good, {bad} bad"
          + (" (deleted)" if delete_bad and bad else ""))
    return 1 if bad else 0


# -- TLS fingerprint -----------------------------------------------------------------------

def certificate_sha256(url: str, timeout_s: float = 10.0) -> str:
    """The SHA-256 of the certificate *url* presents, as colon-separated hex (not verified)."""

    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https":
        raise ConfigError(f"{url} is not an https:// address: there is no certificate to pin")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we only read the certificate, to show it
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=parts.hostname) as tls:
                der = tls.getpeercert(binary_form=True)
    except OSError as exc:
        raise ConfigError(f"cannot read the certificate of {url}: {exc}") from None
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def print_fingerprint(url: str) -> int:
    fingerprint = certificate_sha256(url)
    print(fingerprint)
    print(f"pin it with: --pin-sha256 {fingerprint.replace(':', '').lower()}", file=sys.stderr)
    return 0
