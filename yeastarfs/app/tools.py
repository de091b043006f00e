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
import re
import socket
import ssl
import sys
import threading
import time
import urllib.parse
import zoneinfo
from typing import Optional

from tqdm import tqdm

from yeastarfs.cache import COMPLETE_DIR, INDEX_FILE, CacheDir
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


def print_status(path: str, as_json: bool = False) -> int:
    """The daemon's state for a mount's root; what is cached of a file or a folder's files."""
    root = mount_root(path)
    if os.path.samefile(root, path):
        return _print_daemon_status(path, as_json)
    summary = cache_summary(path)
    if as_json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(_summary_line(summary))
    return 0


def _print_daemon_status(mountpoint: str, as_json: bool) -> int:
    status = read_status(mountpoint)
    if as_json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    hit_rate = status.get("cache_hit_rate")
    token_age_s = status.get("token_age_s")
    lines = [
        f"mountpoint:        {status['mountpoint']} (pid {status['pid']}, up {status['uptime_s']:.0f} s)",
        f"PBX:               {status['pbx']} ({'reachable' if status['pbx_reachable'] else 'NOT reachable'})",
        f"PBX time:          {_pbx_time(status)}",
        f"token age:         {'no token' if token_age_s is None else f'{token_age_s:.0f} s'}",
        f"last event:        {_ago(status.get('last_event_time'))}",
        f"discovery:         {_discovery_state(status.get('discovery') or {})}",
        f"last CDR poll:     {_ago(status.get('last_poll_time'))}",
        f"last resync:       {_last_resync(status.get('discovery') or {})}",
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


def _pbx_time(status: dict) -> str:
    """``Asia/Kolkata (configured, UTC+05:30), clock 420 s ahead of ours``."""
    zone = status.get("pbx_timezone") or "?"
    details = [status.get("pbx_timezone_source") or "?"]
    offset_s = status.get("pbx_utc_offset_s")
    if offset_s is not None and not zone.startswith("UTC"):
        minutes = abs(offset_s) // 60
        details.append(f"UTC{'-' if offset_s < 0 else '+'}{minutes // 60:02d}:{minutes % 60:02d}")
    skew_s = status.get("pbx_clock_skew_s")
    clock = "unknown" if skew_s is None else f"{abs(skew_s):.0f} s {'ahead of' if skew_s >= 0 else 'behind'} ours"
    return f"{zone} ({', '.join(details)}), clock {clock}"


def _discovery_state(discovery: dict) -> str:
    failures = discovery.get("consecutive_failures")
    if not failures:
        return "ok"
    return (f"FAILING since {_ago(discovery.get('failing_since'))}, {failures} attempts; "
            f"last error: {discovery.get('last_error')}")


def _last_resync(discovery: dict) -> str:
    when = discovery.get("last_resync_time")
    if not when:
        return "never"
    new = discovery.get("last_resync_new")
    interval_s = discovery.get("resync_interval_s")
    every = f"; every {_duration(interval_s)}" if interval_s else "; only on SIGHUP"
    return (f"{_ago(when)}, {discovery.get('last_resync_found')} recordings"
            f"{'' if new is None else f' ({new} new)'}{every}")


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


# -- what is cached of files and folders ---------------------------------------------------

CACHE_XATTR = "user.yeastarfs.cache"


def mount_root(path: str) -> str:
    """The root of the yeastarfs mount holding *path*. Raises ConfigError if none does."""
    try:
        current = os.path.realpath(path)
        device = os.stat(current).st_dev
        while current != "/" and os.stat(os.path.dirname(current)).st_dev == device:
            current = os.path.dirname(current)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    read_status(current)  # raises unless it is a running yeastarfs mount
    return current


def cache_state(path: str) -> tuple[str, int, Optional[int]]:
    """(state, bytes held, total bytes or None) of one recording, from its cache xattr."""
    try:
        words = os.getxattr(path, CACHE_XATTR).decode().split()
    except OSError as exc:
        raise ConfigError(f"{path}: no cache state ({exc.strerror})") from None
    if words[0] == "partial":  # "partial <held> of <total or ?>"
        return "partial", int(words[1]), None if words[3] == "?" else int(words[3])
    size_bytes = os.stat(path).st_size  # complete: exact; none: maybe the index's estimate
    return words[0], size_bytes if words[0] == "complete" else 0, size_bytes


def cache_summary(path: str) -> dict:
    """How much of the recordings under *path* (a file or a folder) this machine holds.

    Asks the daemon only (listings and extended attributes): never downloads anything.
    """
    counts = {"complete": 0, "partial": 0, "none": 0}
    held_bytes = total_bytes = 0
    files = collect_files([path])
    for file_path in files:
        state, held, total = cache_state(file_path)
        counts[state] = counts.get(state, 0) + 1
        held_bytes += held
        total_bytes += total if total is not None else held
    summary = {"path": path, "recordings": len(files), **counts, "held_bytes": held_bytes,
               "total_bytes": total_bytes}
    if not os.path.isdir(path):
        summary["state"] = cache_state(path)[0]
    return summary


def _summary_line(summary: dict) -> str:
    held, total = summary["held_bytes"], summary["total_bytes"]
    share = f" ({held / total:.0%})" if total else ""
    amounts = f"{_bytes(held)} of ~{_bytes(total)} held{share}"
    if "state" in summary:
        return f"{summary['path']}: {summary['state']}, {amounts}"
    return (f"{summary['path']}: {summary['recordings']} recordings: {summary['complete']} complete, "
            f"{summary['partial']} partial, {summary['none']} not cached; {amounts}")


# -- prefetch ----------------------------------------------------------------------------

CACHED_XATTR = "user.yeastarfs.cached"
READ_BLOCK_BYTES = 1 << 20


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


# A log or the journal has no carriage return: there, one line every PLAIN_INTERVAL_S.
PLAIN_INTERVAL_S = 5.0
PLAIN_FORMAT = "{desc}: {n_fmt}B of ~{total_fmt}B ({percentage:.0f}%), {rate_fmt}, ETA {remaining}{postfix}"


class Progress:
    """Bytes done of an (estimated) total with rate and ETA, drawn by tqdm: a redrawn bar on
    a terminal; on anything else (a log, the journal) a plain line every ``PLAIN_INTERVAL_S``.

    For prefetch and for any command that moves many recordings (watch's non-follow runs):
    `add` bytes as they arrive, `file_done` per recording, `message` for a line that must not
    garble the bar, `close` at the end (it draws the final state). Thread-safe.
    """

    def __init__(self, total_bytes: int, files: int, desc: str = "prefetch", stream=None) -> None:
        stream = sys.stderr if stream is None else stream
        self.total_bytes, self.files = total_bytes, files
        self.done_bytes = self.done_files = self.failed = self.skipped = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        terminal = stream.isatty()
        # A terminal that reports no size (a bare pty) would get no bar at all: assume 80x24.
        sized = terminal and _columns(stream) > 0
        self._stream = stream
        # unit_divisor 1000: tqdm labels its multiples kB, MB, GB (a divisor of 1024 would mislabel them).
        self._bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                         file=stream if terminal else _Lines(stream), dynamic_ncols=sized,
                         ncols=None if sized or not terminal else 80, nrows=None if sized or not terminal else 24,
                         mininterval=0.5 if terminal else PLAIN_INTERVAL_S,
                         maxinterval=PLAIN_INTERVAL_S, bar_format=None if terminal else PLAIN_FORMAT)
        self._bar.set_postfix_str(f"0/{files} files", refresh=False)

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.done_bytes += nbytes
            self._bar.update(nbytes)

    def file_done(self, ok: bool, skipped: bool = False) -> None:
        with self._lock:
            self.done_files += 1
            self.failed += 0 if ok else 1
            self.skipped += 1 if skipped else 0
            self._bar.set_postfix_str(f"{self.done_files}/{self.files} files", refresh=False)

    def message(self, text: str) -> None:
        with self._lock:
            self._bar.write(text, file=self._stream)

    def close(self) -> None:
        with self._lock:
            if self.done_bytes > self.total_bytes:  # the total was partly estimated
                self._bar.total = self.done_bytes
            self._bar.close()


def _columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


class _Lines:
    """What tqdm draws, as lines: it redraws in place with a carriage return and trailing
    spaces, which a log would keep as one ever longer line."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self._stream.write(line + "\n")

    def flush(self) -> None:
        self._stream.flush()


def prefetch(paths: list[str], jobs: int = 4, start: Optional[dt.date] = None, end: Optional[dt.date] = None) -> int:
    """Read recordings through the mount so the daemon caches them. Ctrl-C stops cleanly."""
    files = collect_files(paths, start, end)
    progress = Progress(sum(os.stat(f).st_size for f in files), len(files))
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
        progress.close()
        print("prefetch: interrupted; recordings read to the end are cached", file=sys.stderr)
        return 130
    progress.close()
    fetched = progress.done_files - progress.failed - progress.skipped
    print(f"prefetch: {fetched} fetched, {progress.skipped} already cached, {progress.failed} failed, "
          f"{_bytes(progress.done_bytes)} in {time.monotonic() - progress.started:.1f} s", file=sys.stderr)
    return 1 if progress.failed else 0


def _prefetch_one(path: str, progress: Progress, stop: threading.Event) -> None:
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
        progress.message(f"prefetch: {path}: {exc.strerror}")
        progress.file_done(False)
        return
    progress.file_done(True)


# -- calls -------------------------------------------------------------------------------

CALL_COLUMNS = ("path", "start_time", "caller", "callee", "type", "status", "call_seconds", "talk_seconds",
                "src_trunk", "dst_trunk", "did", "callid", "recording")


MOUNT_FSTYPE = "fuse.yeastarfs"  # what /proc/self/mountinfo says of a yeastarfs mount
_MOUNTINFO_ESCAPE = re.compile(r"\\([0-7]{3})")  # the kernel writes " " as \040, and so on


def mount_fstype(mountpoint: str) -> Optional[str]:
    """The filesystem type mounted at exactly *mountpoint* (the topmost, if stacked); None if none."""
    target = os.path.realpath(mountpoint)
    fstype = None
    with open("/proc/self/mountinfo", encoding=sys.getfilesystemencoding(), errors="surrogateescape") as table:
        for line in table:
            fields, _, rest = line.partition(" - ")
            parts = fields.split()
            if len(parts) > 4 and _MOUNTINFO_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), parts[4]) == target:
                fstype = rest.split()[0] if rest else None  # later lines are mounted on top
    return fstype


def open_mount_index(mountpoint: str):
    """(index, zone): the index of the yeastarfs mount at *mountpoint*, opened read-only (it
    creates nothing) in the zone the daemon reads the PBX's times in (`_pbx_zone`).

    Raises ConfigError unless *mountpoint* itself is a yeastarfs mount: the cache folder is
    taken from its status attribute, which any other filesystem could forge.
    """
    from yeastarfs.index import RecordingIndex  # only the commands that read the index need sqlite3

    fstype = mount_fstype(mountpoint)
    if fstype != MOUNT_FSTYPE:
        raise ConfigError(f"{mountpoint} is not a yeastarfs mount ({fstype or 'not a mountpoint'})")
    status = read_status(mountpoint)
    zone = _pbx_zone(status)
    return RecordingIndex(os.path.join(status["cache_dir"], INDEX_FILE), tz=zone, read_only=True), zone


def list_calls(mountpoint: str, since_s: float, output_format: str = "csv") -> int:
    """Print the indexed calls with recordings since *since_s* ago, with their paths; start
    times carry the PBX's offset (the zone the daemon uses: configured, detected or assumed)."""
    index, zone = open_mount_index(mountpoint)
    try:
        start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=since_s)
        rows = (_call_row(mountpoint, index.path_of(rec.name), rec, zone) for rec in index.recordings_since(start))
        _write_rows(rows, output_format)
    finally:
        index.close()
    return 0


def _pbx_zone(status: dict) -> Optional[dt.tzinfo]:
    """The zone the daemon reads the PBX's times in: its IANA name, else its offset; None
    (this machine's) for a daemon that does not say."""
    name = status.get("pbx_timezone")
    if name and not name.startswith("UTC"):
        try:
            return zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            pass
    offset_s = status.get("pbx_utc_offset_s")
    return None if offset_s is None else dt.timezone(dt.timedelta(seconds=offset_s))


def _instant(pbx_time: str, zone: Optional[dt.tzinfo]) -> str:
    """``2026-11-27 09:29:50`` (PBX wall time) as ``2026-11-27T09:29:50+05:30``; text that
    is not such a time is returned as it is."""
    try:
        naive = dt.datetime.strptime(pbx_time, "%Y-%m-%d %H:%M:%S")
        return (naive.replace(tzinfo=zone) if zone is not None else naive.astimezone()).isoformat()
    except (ValueError, OverflowError, OSError):
        return pbx_time


def _call_row(mountpoint: str, path: str, rec, zone: Optional[dt.tzinfo]) -> dict:
    return {"path": os.path.join(mountpoint, path.lstrip("/")), "start_time": _instant(rec.timestart, zone),
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
