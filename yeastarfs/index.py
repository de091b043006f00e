"""The recording index: which recordings exist, and where each one appears in the tree.

Owns:

- the SQLite file that stores every recording known, with its CDR fields, and its exact
  size once the catalogue listed it or a download reported it. It survives restarts;
- the tree the filesystem shows, ``/YYYY/MM/DD/<recording name>``. The date folders come
  from the timestamp that leads the recording name (yeastar-api.md §8.1), not from the
  CDR's ``timestart``, which is some seconds earlier and may even fall on the day before;
- the rule that a recording name failing `models.name_problem` (yeastar-api.md §12.9)
  never becomes a path, and the warning that says so;
- the size shown for a file that has not been downloaded: an estimate from its durations,
  computed when it is read, so that `set_estimate_rate` needs no database rewrite.

Leaves to others: learning about recordings (the CDR backfill, the CDR poll and NewCdr
events call `add`), the recordings' bytes (cache.py, downloads.py) and errnos (fs.py). It
does no network I/O; its only I/O is its own database file.

Built for about a million recordings in a small, constant amount of memory: nothing is
loaded or scanned at open. Rows are clustered by their (day, name) primary key, so a day
listing and a lookup each read a few pages. The ``days`` table (day -> number of
recordings), maintained by `add`, answers the root, year and month levels and `count`
from at most a few thousand rows.

Multithreading: one `threading.Lock` guards the one SQLite connection, which is opened with
``check_same_thread=False`` because FUSE callbacks arrive on several threads. Every public
method that reads or writes the database or the index's settings takes the lock (`path_of`
is pure and needs none). While holding it the index takes no other lock (it does not even
log) and runs no caller code: `add` copies its argument into a list first, and
`recordings_since` releases the lock between pages. Callers may therefore hold their own
locks when they call in. Rows are turned into `Entry` objects after the lock is released,
so a day listing holds it only for the query (about 2 ms for 1,000 recordings).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import hashlib
import logging
import math
import operator
import os
import re
import sqlite3
import threading
import time
import urllib.parse
from typing import Iterable, Iterator, Optional

from yeastarfs.errors import ConfigError
from yeastarfs.models import Recording, name_problem

log = logging.getLogger(__name__)

# Bump when the tables change, and teach `_migrate` the step from the old version.
SCHEMA_VERSION = 2
# The canonical RIFF/WAVE header in front of PCM samples: the part of a recording's size
# that does not grow with its duration.
WAV_HEADER_BYTES = 44
# Distinct bad names remembered so that each is logged only once; the cap bounds memory
# when a broken PBX keeps inventing new ones. Least recently seen are forgotten first.
BAD_NAMES_REMEMBERED = 10_000
# repr() of a bad name is cut to this length so a 64 KiB hostile name cannot flood the log.
BAD_NAME_LOG_CHARS = 80
# Rows that `recordings_since` fetches per lock hold: small enough to keep memory flat and
# FUSE callbacks waiting for at most a few ms, large enough to make the query cost vanish.
SINCE_PAGE_ROWS = 1000
# SQLite page cache per connection, in KiB (see `_open_database`).
PAGE_CACHE_KIB = 8192
NS_PER_S = 1_000_000_000
# No phone call lasts a week; a longer duration is garbage (or hostile) and is ignored.
MAX_CALL_S = 7 * 86_400
# No estimate exceeds what a download may be (pbx families refuse bodies beyond 4 GiB).
MAX_ESTIMATE_BYTES = 4 << 30
SECONDS_PER_DAY = 86_400
# "YYYYMMDD" starts every stored recording name; it is the ``day`` column.
DAY_CHARS = 8

# The CDR fields of `Recording` after ``name``, in its field order, so that a row selected
# as (name, *_CDR_COLUMNS) is `Recording(*row)`. A unit test checks they stay in step.
# Its last field, ``size_bytes`` (a size the catalogue lists), is stored as exact_size_bytes.
_CDR_COLUMNS = (
    "callid", "timestart", "callfrom", "callto", "call_s", "talk_s", "src_trunk",
    "dst_trunk", "status", "call_type", "pincode", "did", "sn",
)
_RECORDING_COLUMNS = ("name",) + _CDR_COLUMNS
# A recording's (name, *CDR fields) in one C call: `add` may run it 100,000 times a batch.
_recording_values = operator.attrgetter(*_RECORDING_COLUMNS)
_INT_COLUMNS = ("call_s", "talk_s")
_DURATION_POSITIONS = tuple(_RECORDING_COLUMNS.index(column) for column in _INT_COLUMNS)
# Where gone_at sits in a row selected by `_SELECT_RECORDING`.
_GONE_AT = len(_RECORDING_COLUMNS) + 1

_SCHEMA = (
    # WITHOUT ROWID keeps each day's recordings together on disk, in name order. ``day`` is
    # name[:8], so the key is as unique as the name alone, which is how `add` dedups.
    "CREATE TABLE IF NOT EXISTS recordings (day TEXT NOT NULL, name TEXT NOT NULL, "
    + ", ".join(
        f"{column} INTEGER" if column in _INT_COLUMNS else f"{column} TEXT NOT NULL"
        for column in _CDR_COLUMNS
    )
    + ", exact_size_bytes INTEGER, PRIMARY KEY (day, name)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS days (day TEXT PRIMARY KEY, recordings INTEGER NOT NULL)"
    " WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
)

# Version 2 columns: when the PBX said the recording no longer exists (NULL: it does), when
# this index first heard of it, the discovery order (the cursor of `yeastarfs watch`), and
# whether a CDR row (the authority on a call's fields) has been merged into it.
_MIGRATION_V2 = (
    "ALTER TABLE recordings ADD COLUMN gone_at REAL",
    "ALTER TABLE recordings ADD COLUMN first_seen REAL",
    "ALTER TABLE recordings ADD COLUMN seq INTEGER",
    "ALTER TABLE recordings ADD COLUMN cdr_seen INTEGER NOT NULL DEFAULT 1",
    # Existing rows get their discovery order from their names (oldest call first).
    "UPDATE recordings SET seq = (SELECT COUNT(*) FROM recordings AS earlier"
    " WHERE (earlier.day, earlier.name) <= (recordings.day, recordings.name))",
    "CREATE UNIQUE INDEX IF NOT EXISTS recordings_by_seq ON recordings (seq)",
)
_STATE_COLUMNS = ("exact_size_bytes", "gone_at", "first_seen", "seq")
_SELECT_RECORDING = f"SELECT {', '.join(_RECORDING_COLUMNS + _STATE_COLUMNS)} FROM recordings"
_FILE_SQL = _SELECT_RECORDING + " WHERE day = ? AND name = ?"
_DAY_FILES_SQL = _SELECT_RECORDING + " WHERE day = ? ORDER BY name"
_DAY_SIZES_SQL = ("SELECT name, exact_size_bytes, talk_s, call_s, gone_at IS NOT NULL FROM recordings"
                  " WHERE day = ? AND name > ? ORDER BY name LIMIT ? OFFSET ?")
_SINCE_SQL = _SELECT_RECORDING + " WHERE (day, name) {op} (?, ?) ORDER BY day, name LIMIT ?"
# Keyset by discovery order through the unique seq index: one short range scan per page.
_AFTER_SQL = (f"SELECT seq, {', '.join(_RECORDING_COLUMNS)}, first_seen FROM recordings"
              " WHERE seq > ? AND gone_at IS NULL ORDER BY seq LIMIT ?")
_INSERT_SQL = (
    f"INSERT INTO recordings (day, {', '.join(_RECORDING_COLUMNS)}, exact_size_bytes, first_seen, seq, cdr_seen)"
    f" VALUES ({', '.join('?' * (len(_RECORDING_COLUMNS) + 5))})"
)
_UPDATE_SQL = (
    f"UPDATE recordings SET {', '.join(f'{column} = ?' for column in _CDR_COLUMNS)}, cdr_seen = ?"
    " WHERE day = ? AND name = ?"
)
_STORED_SQL = (f"SELECT {', '.join(_CDR_COLUMNS)}, cdr_seen, exact_size_bytes FROM recordings"
               " WHERE day = ? AND name = ?")
_SIZE_SQL = "UPDATE recordings SET exact_size_bytes = ? WHERE day = ? AND name = ?"
_COUNT_DAY_SQL = (
    "INSERT INTO days (day, recordings) VALUES (?, ?)"
    " ON CONFLICT (day) DO UPDATE SET recordings = recordings + excluded.recordings"
)
# The children of a directory: ``substr(day, first, length)`` of the days in its range.
_CHILDREN_SQL = (
    "SELECT DISTINCT substr(day, ?, ?) FROM days WHERE day BETWEEN ? AND ? ORDER BY 1"
)
_DIR_EXISTS_SQL = "SELECT 1 FROM days WHERE day BETWEEN ? AND ? LIMIT 1"

# A FUSE path below the root: /YYYY[/MM[/DD[/<name>]]], ASCII digits only.
_PATH_PATTERN = re.compile(r"/([0-9]{4})(?:/([0-9]{2})(?:/([0-9]{2})(?:/([^/]+))?)?)?")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One node of the tree: the root, a year, month or day folder, or a recording's file.

    Attributes:
        kind: "dir" or "file".
        name: the last path component ("/" for the root).
        mtime_ns: file: the recording name's leading timestamp read as the PBX's local time
            (`RecordingIndex.set_timezone`; this machine's zone until told otherwise); dir:
            the start of its year, month or day in that zone; root: 0.
        size_bytes: file: the exact size when known, else the estimate; dir: 0.
        size_exact: file: True once `RecordingIndex.set_size` was called; dir: True.
        recording: the file's recording with its CDR fields; None for a dir.
        gone: file: the PBX said it no longer has the recording (`mark_gone`). The index
            still returns it: whether a cached copy keeps it visible is the core's call.
        first_seen: file: ``time.time()`` when this index first heard of it (None: unknown).
        seq: file: its position in discovery order (`recordings_after`).
    """

    kind: str
    name: str
    mtime_ns: int
    size_bytes: int
    size_exact: bool
    recording: Optional[Recording] = None
    gone: bool = False
    first_seen: Optional[float] = None
    seq: Optional[int] = None


_ROOT = Entry(kind="dir", name="/", mtime_ns=0, size_bytes=0, size_exact=True)


class RecordingIndex:
    """The persistent index of recordings, and the tree of date folders built from it.

    Attributes:
        db_path: the SQLite file.

    Multithreading:
        Every method may be called from any thread. ``_lock`` guards ``_conn``, the
        estimate rate and the bad-name memory; methods ending in ``_locked`` expect the
        caller to hold it. No other lock is taken and no caller code runs while it is
        held, and nothing here ever does network I/O.
    """

    def __init__(
        self,
        db_path: str,
        *,
        estimate_bytes_per_s: float = 16000.0,
        default_estimate_bytes: int = 1_048_576,
        tz: Optional[dt.tzinfo] = None,
        read_only: bool = False,
    ) -> None:
        """Open *db_path*, creating it (mode 0600) and its folder when missing.

        *tz* is the PBX's time zone, in which recording names' timestamps are read (None:
        this machine's). With *read_only* nothing is created or changed: the file must
        exist and have the current schema (tools reading a mount's index use this).

        Raises ConfigError when the file cannot be created or opened, is not an index,
        or was written by a newer yeastarfs.
        """
        self.db_path = db_path
        self._lock = threading.Lock()
        self._estimate_bytes_per_s = _checked_rate(estimate_bytes_per_s)
        self._default_estimate_bytes = default_estimate_bytes
        self._tz = tz
        self._bad_names: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._closed = False
        self._conn = _open_database(db_path, read_only=read_only)
        self._next_seq = 1 if read_only else self._stored_next_seq()

    def __enter__(self) -> RecordingIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database; calling it again does nothing.

        Any other method called afterwards raises sqlite3.ProgrammingError.
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    # -- feeding ---------------------------------------------------------------------------

    def add(self, recordings: Iterable[Recording], *, authoritative: bool = True) -> list[Recording]:
        """Store *recordings* in one transaction and return those that were new.

        A recording already known keeps its row. *authoritative* says the fields come from
        the PBX's catalogue (its CDR): each non-empty one replaces the stored value. Fields
        from an event (``authoritative=False``) only fill fields that are still empty: an
        event may add a recording, never overwrite what the catalogue said (a forged event
        must not rename a call's parties). A recording marked gone stays gone. A size the
        catalogue lists (``size_bytes``) is stored as the exact size unless one is known.
        Recordings with unsafe names are skipped, and each distinct bad name is logged once.
        """
        batch = list(recordings)  # run the caller's iterator before taking the lock
        # name_problem is pure and the costliest step per recording: keep it out of the
        # lock, so FUSE callbacks wait less while a large batch is stored.
        problems = [name_problem(recording.name) for recording in batch]
        added: list[Recording] = []
        rejected: list[tuple[str, str]] = []
        with self._lock:
            new_per_day: dict[str, int] = {}
            with self._transaction_locked():
                for recording, problem in zip(batch, problems):
                    if problem is not None:
                        if self._first_sighting_locked(recording.name):
                            rejected.append((recording.name, problem))
                    elif self._store_locked(recording, authoritative):
                        added.append(recording)
                        day = recording.name[:DAY_CHARS]
                        new_per_day[day] = new_per_day.get(day, 0) + 1
                self._conn.executemany(_COUNT_DAY_SQL, new_per_day.items())
        # Logged after the lock is released: logging takes its handlers' locks.
        for name, problem in rejected:
            log.warning("recording name %s rejected (%s); it will not appear",
                        _shown(name), problem)
        log.debug("index: %d of %d recordings were new", len(added), len(batch))
        return added

    def mark_gone(self, name: str) -> bool:
        """Note that the PBX no longer has recording *name*; True if it was present before."""
        with self._lock:
            cursor = self._conn.execute(
                "UPDATE recordings SET gone_at = ? WHERE day = ? AND name = ? AND gone_at IS NULL",
                (time.time(), name[:DAY_CHARS], name))
        return cursor.rowcount > 0

    def set_timezone(self, tz: Optional[dt.tzinfo]) -> None:
        """Read recording names' timestamps in *tz* from now on (None: this machine's zone)."""
        with self._lock:
            self._tz = tz

    def set_size(self, name: str, size_bytes: int) -> None:
        """Record the exact size of recording *name*; unknown names are ignored.

        Raises ValueError when *size_bytes* is negative.
        """
        if size_bytes < 0:
            raise ValueError(f"size_bytes must be >= 0, got {size_bytes}")
        with self._lock:
            self._conn.execute(_SIZE_SQL, (int(size_bytes), name[:DAY_CHARS], name))

    def set_estimate_rate(self, bytes_per_s: float) -> None:
        """Use *bytes_per_s* for the size estimates from now on. Raises ValueError if <= 0."""
        rate = _checked_rate(bytes_per_s)
        with self._lock:
            self._estimate_bytes_per_s = rate

    def set_meta(self, key: str, value: str) -> None:
        """Store *value* under *key* in the small key/value table."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- reading -----------------------------------------------------------------------------

    def lookup(self, path: str) -> Optional[Entry]:
        """Return the entry at FUSE *path*, or None when there is none."""
        parts = _split_path(path)
        if parts is None:
            return None
        year, month, day, name = parts
        if year is None:
            return _ROOT
        if name is not None:
            return self.get(name) if name[:DAY_CHARS] == year + month + day else None
        with self._lock:
            row = self._conn.execute(_DIR_EXISTS_SQL, _day_range(year, month, day)).fetchone()
            tz = self._tz
        if row is None:
            return None
        return _dir_entry(year, month, day, tz)

    def list_dir(self, path: str) -> Optional[list[Entry]]:
        """Return the entries of the directory at *path*, sorted by name.

        None when *path* is a file or does not exist. The root always exists.
        """
        parts = _split_path(path)
        if parts is None or parts[3] is not None:
            return None
        year, month, day, _ = parts
        if day is not None:
            entries = self._files_of_day(year + month + day)
        else:
            entries = self._child_dirs(year, month)
        if not entries and year is not None:
            return None
        return entries

    def list_dir_sizes(self, path: str, after: str = "", skip: int = 0,
                       limit: int = -1) -> Optional[list[tuple[str, bool, int, int, bool]]]:
        """``(name, is_dir, size_bytes, mtime_ns, gone)`` of each entry of the folder at *path*.

        A page of a large folder: the entries named after *after*, *skip* of them left out,
        at most *limit* (-1: all), so that a day of a million recordings is listed in bounded
        memory. A day folder whose page is empty gives [] (None only when it does not exist).

        What a listing with attributes needs, and nothing else: a walk lists every folder,
        and building full entries (with their Recording) costs most of its time.
        """
        parts = _split_path(path)
        if parts is None or parts[3] is not None:
            return None
        year, month, day, _ = parts
        if day is None:  # at most a few dozen years, months or days: paged in memory
            entries = self.list_dir(path)
            if entries is None:
                return None
            page = [(e.name, True, 0, e.mtime_ns, False) for e in entries if e.name > after][skip:]
            return page if limit < 0 else page[:limit]
        with self._lock:
            rows = self._conn.execute(_DAY_SIZES_SQL, (year + month + day, after, limit, skip)).fetchall()
            rate, tz = self._estimate_bytes_per_s, self._tz
        if not rows:  # a day folder exists only with recordings: an empty first page means none
            return [] if (after or skip) and self.lookup(path) is not None else None
        mtimes_ns = _mtimes_in_day_ns(year + month + day, [row[0] for row in rows], tz)
        return [(name, False, exact if exact is not None else self._estimate_from(talk_s, call_s, rate), mtime_ns,
                 bool(gone))
                for (name, exact, talk_s, call_s, gone), mtime_ns in zip(rows, mtimes_ns)]

    def get(self, name: str) -> Optional[Entry]:
        """Return the file entry of recording *name*, or None when it is not stored."""
        if not isinstance(name, str):
            return None
        with self._lock:
            row = self._conn.execute(_FILE_SQL, (name[:DAY_CHARS], name)).fetchone()
            rate, tz = self._estimate_bytes_per_s, self._tz
        return None if row is None else self._file_entry(row, rate, _name_mtime_ns(name, tz))

    def path_of(self, name: str) -> str:
        """Return ``/YYYY/MM/DD/<name>``, where *name* appears, stored or not.

        Raises ValueError when *name* is unsafe and so could never appear.
        """
        problem = name_problem(name)
        if problem is not None:
            raise ValueError(f"recording name {_shown(name)} {problem}")
        return f"/{name[0:4]}/{name[4:6]}/{name[6:8]}/{name}"

    def count(self) -> int:
        """Return the number of recordings stored."""
        with self._lock:
            row = self._conn.execute("SELECT COALESCE(SUM(recordings), 0) FROM days").fetchone()
        return row[0]

    def get_meta(self, key: str) -> Optional[str]:
        """Return the value stored under *key*, or None."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def recordings_since(self, start: dt.datetime) -> Iterator[Recording]:
        """Yield the recordings whose name timestamp is at or after *start*, oldest first.

        A naive *start* is compared with the names as it is; an aware one is first
        converted to the PBX's local time (`set_timezone`). Pages are read under the lock
        and yielded without it, so recordings added meanwhile may or may not be seen.
        Recordings marked gone are left out.
        """
        if start.tzinfo is not None:
            start = start.astimezone(self._tz).replace(tzinfo=None)
        stamp = (
            f"{start.year:04d}{start.month:02d}{start.day:02d}"
            f"{start.hour:02d}{start.minute:02d}{start.second:02d}"
        )
        # Keyset pagination: each page continues after the last key seen.
        sql, key = _SINCE_SQL.format(op=">="), (stamp[:DAY_CHARS], stamp)
        while True:
            with self._lock:
                rows = self._conn.execute(sql, key + (SINCE_PAGE_ROWS,)).fetchall()
            for row in rows:
                if row[_GONE_AT] is None:
                    yield Recording(*row[: len(_RECORDING_COLUMNS)])
            if len(rows) < SINCE_PAGE_ROWS:
                return
            sql, key = _SINCE_SQL.format(op=">"), (rows[-1][0][:DAY_CHARS], rows[-1][0])

    def recordings_after(self, seq: int,
                         limit: int = SINCE_PAGE_ROWS) -> list[tuple[int, Recording, Optional[float]]]:
        """``(seq, recording, first_seen)`` of up to *limit* recordings discovered after *seq*, in
        discovery order; recordings marked gone are left out.

        The cursor of `yeastarfs watch`: `add` hands out seqs in commit order, so a reader
        that has seen seq N will never later find a recording below N (gaps may exist).
        """
        with self._lock:
            rows = self._conn.execute(_AFTER_SQL, (seq, limit)).fetchall()
        return [(row[0], Recording(*row[1:-1]), row[-1]) for row in rows]

    # -- helpers ---------------------------------------------------------------------------

    def _files_of_day(self, day: str) -> list[Entry]:
        """The file entries of *day* ("YYYYMMDD"), in name order."""
        with self._lock:
            rows = self._conn.execute(_DAY_FILES_SQL, (day,)).fetchall()
            rate, tz = self._estimate_bytes_per_s, self._tz
        mtimes_ns = _mtimes_in_day_ns(day, [row[0] for row in rows], tz)
        return [self._file_entry(row, rate, mtime_ns) for row, mtime_ns in zip(rows, mtimes_ns)]

    def _child_dirs(self, year: Optional[str], month: Optional[str]) -> list[Entry]:
        """The folders below the root (years), *year* (months) or *year*/*month* (days)."""
        prefix = (year or "") + (month or "")
        # Characters of ``day`` that name the child: 1-4 year, 5-6 month, 7-8 day.
        first, length = len(prefix) + 1, 4 if year is None else 2
        low, high = _day_range(year, month, None) if year else ("0" * 8, "9" * 8)
        with self._lock:
            rows = self._conn.execute(_CHILDREN_SQL, (first, length, low, high)).fetchall()
            tz = self._tz
        children = [row[0] for row in rows]
        if year is None:
            return [_dir_entry(child, None, None, tz) for child in children]
        if month is None:
            return [_dir_entry(year, child, None, tz) for child in children]
        return [_dir_entry(year, month, child, tz) for child in children]

    def _file_entry(self, row: tuple, rate_bytes_per_s: float, mtime_ns: int) -> Entry:
        """The entry of a row selected by `_SELECT_RECORDING`."""
        recording = Recording(*row[: len(_RECORDING_COLUMNS)])
        exact_size_bytes, gone_at, first_seen, seq = row[len(_RECORDING_COLUMNS):]
        if exact_size_bytes is None:
            size_bytes = self._estimate_bytes(recording, rate_bytes_per_s)
        else:
            size_bytes = exact_size_bytes
        return Entry(
            kind="file",
            name=recording.name,
            mtime_ns=mtime_ns,
            size_bytes=size_bytes,
            size_exact=exact_size_bytes is not None,
            recording=recording,
            gone=gone_at is not None,
            first_seen=first_seen,
            seq=seq,
        )

    def _estimate_bytes(self, recording: Recording, rate_bytes_per_s: float) -> int:
        """The likely size of a recording not downloaded yet: header + duration x rate."""
        return self._estimate_from(recording.talk_s, recording.call_s, rate_bytes_per_s)

    def _estimate_from(self, talk_s: Optional[int], call_s: Optional[int], rate_bytes_per_s: float) -> int:
        # talk_s first: the recording covers the talk, while call_s also counts ringing.
        for seconds in (talk_s, call_s):
            if seconds is not None and 0 < seconds <= MAX_CALL_S:
                return min(MAX_ESTIMATE_BYTES, WAV_HEADER_BYTES + round(seconds * rate_bytes_per_s))
        return self._default_estimate_bytes

    def _store_locked(self, recording: Recording, authoritative: bool) -> bool:
        """Insert *recording*, or merge its CDR fields into its row. True if it was new."""
        values = _checked_values(_recording_values(recording))
        size_bytes = _listed_size(recording) if authoritative else None  # an event's size is no one's word
        day = recording.name[:DAY_CHARS]
        stored = self._conn.execute(_STORED_SQL, (day, recording.name)).fetchone()
        if stored is None:
            self._conn.execute(_INSERT_SQL, (day,) + values + (size_bytes, time.time(), self._next_seq,
                                                               int(authoritative)))
            self._next_seq += 1
            return True
        *fields, cdr_seen, exact_size_bytes = stored
        if size_bytes is not None and exact_size_bytes is None:
            self._conn.execute(_SIZE_SQL, (size_bytes, day, recording.name))
        if authoritative:
            merged = [old if new is None or new == "" else new for old, new in zip(fields, values[1:])]
        else:  # an event fills gaps only (see `add`)
            merged = [new if old is None or old == "" else old for old, new in zip(fields, values[1:])]
        # Re-adding an unchanged recording is the common case (every poll overlaps the
        # previous one), so write only when something changed.
        now_seen = int(cdr_seen or authoritative)
        if merged != fields or now_seen != cdr_seen:
            self._conn.execute(_UPDATE_SQL, (*merged, now_seen, day, recording.name))
        return False

    def _stored_next_seq(self) -> int:
        with self._lock:
            row = self._conn.execute("SELECT MAX(seq) FROM recordings").fetchone()
        return (row[0] or 0) + 1

    def _first_sighting_locked(self, name: object) -> bool:
        """Remember bad *name*; True the first time (within the memory's bound)."""
        # A digest, not the name: 10,000 hostile names of 64 KiB each would be 640 MiB.
        text = repr(name).encode("utf-8", "backslashreplace")
        key = hashlib.blake2b(text, digest_size=16).digest()
        if key in self._bad_names:
            self._bad_names.move_to_end(key)
            return False
        self._bad_names[key] = None
        if len(self._bad_names) > BAD_NAMES_REMEMBERED:
            self._bad_names.popitem(last=False)
        return True

    @contextlib.contextmanager
    def _transaction_locked(self) -> Iterator[None]:
        """Run the block in one write transaction; roll back if it raises."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            # SQLite has already rolled back by itself after some errors (disk full).
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")


def _open_database(db_path: str, read_only: bool = False) -> sqlite3.Connection:
    """Create (0600) and open the index file, and bring its schema up to date.

    Read-only: open an existing file without creating or changing anything.
    Raises ConfigError when it cannot be opened or used.
    """
    if read_only:
        return _open_read_only(db_path)
    try:
        folder = os.path.dirname(os.path.abspath(db_path))
        os.makedirs(folder, mode=0o700, exist_ok=True)
        # The file lists who called whom: create it private before sqlite3 creates it with
        # the umask's mode. SQLite gives the -wal and -shm files the same mode.
        os.close(os.open(db_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        # isolation_level=None: no implicit transactions; `add` opens its own.
        conn = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"index {db_path}: cannot open: {exc}") from exc
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL cannot corrupt the file; a power cut may lose the last
        # commits, which the next CDR poll brings back.
        conn.execute("PRAGMA synchronous=NORMAL")
        # 8 MiB of page cache (SQLite's default is 2 MiB) holds the B-tree's inner pages of
        # a million recordings, so a lookup or an insert reads about one leaf page.
        conn.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
        _migrate(conn, db_path)
    except BaseException as exc:
        conn.close()
        if isinstance(exc, sqlite3.Error):
            raise ConfigError(f"index {db_path}: unusable: {exc}") from exc
        raise
    return conn


def _open_read_only(db_path: str) -> sqlite3.Connection:
    uri = "file:" + urllib.parse.quote(os.path.abspath(db_path)) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as exc:
        raise ConfigError(f"index {db_path}: cannot open read-only: {exc}") from None
    if version != SCHEMA_VERSION:
        conn.close()
        raise ConfigError(f"index {db_path}: schema version {version}, expected {SCHEMA_VERSION}"
                          " (written by another yeastarfs version, or not an index)")
    return conn


def _migrate(conn: sqlite3.Connection, db_path: str) -> None:
    """Create the tables in a new file. Raises ConfigError for a newer schema."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"index {db_path}: schema version {version} is newer than {SCHEMA_VERSION};"
            " it was written by a newer yeastarfs"
        )
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in (_SCHEMA if version == 0 else ()) + _MIGRATION_V2:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _checked_rate(bytes_per_s: float) -> float:
    """*bytes_per_s* as a float. Raises ValueError unless it is finite and > 0."""
    rate = float(bytes_per_s)
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"estimate rate must be a positive number of bytes/s, got {bytes_per_s!r}")
    return rate


def _split_path(path: object) -> Optional[tuple[Optional[str], ...]]:
    """(year, month, day, name) of a FUSE path, None for the parts it lacks.

    The root is (None, None, None, None); a path of any other shape gives None.
    """
    if path == "/":
        return (None, None, None, None)
    if not isinstance(path, str):
        return None
    match = _PATH_PATTERN.fullmatch(path)
    return None if match is None else match.groups()


def _day_range(year: str, month: Optional[str], day: Optional[str]) -> tuple[str, str]:
    """The lowest and highest ``day`` values inside a year, month or day folder."""
    prefix = year + (month or "") + (day or "")
    return prefix.ljust(DAY_CHARS, "0"), prefix.ljust(DAY_CHARS, "9")


def _dir_entry(year: str, month: Optional[str], day: Optional[str], tz: Optional[dt.tzinfo]) -> Entry:
    """The entry of a year, month or day folder."""
    mtime_ns = _local_time_ns(tz, int(year), int(month or 1), int(day or 1), 0, 0, 0)
    return Entry(kind="dir", name=day or month or year, mtime_ns=mtime_ns, size_bytes=0,
                 size_exact=True)


def _name_mtime_ns(name: str, tz: Optional[dt.tzinfo]) -> int:
    """The leading timestamp of a stored (so already validated) recording name, in ns."""
    # Slicing instead of strptime: a day listing computes a thousand of these.
    return _local_time_ns(
        tz, int(name[0:4]), int(name[4:6]), int(name[6:8]),
        int(name[8:10]), int(name[10:12]), int(name[12:14]),
    )


def _mtimes_in_day_ns(day: str, names: list[str], tz: Optional[dt.tzinfo]) -> list[int]:
    """`_name_mtime_ns` of each of *names*, all on *day*, with two conversions if possible."""
    year, month, mday = int(day[0:4]), int(day[4:6]), int(day[6:8])
    try:
        next_day = dt.date(year, month, mday) + dt.timedelta(days=1)
    except (OverflowError, ValueError):  # 9999-12-31 has no next day
        return [_name_mtime_ns(name, tz) for name in names]
    start_ns = _local_time_ns(tz, year, month, mday, 0, 0, 0)
    end_ns = _local_time_ns(tz, next_day.year, next_day.month, next_day.day, 0, 0, 0)
    if end_ns - start_ns != SECONDS_PER_DAY * NS_PER_S:
        # The clocks change on this day (DST, or the zone moved): local time is not
        # midnight plus the time of day, so convert each name.
        return [_name_mtime_ns(name, tz) for name in names]
    return [
        start_ns
        + (int(name[8:10]) * 3600 + int(name[10:12]) * 60 + int(name[12:14])) * NS_PER_S
        for name in names
    ]


def _local_time_ns(tz: Optional[dt.tzinfo], year: int, month: int, day: int, hour: int, minute: int,
                   second: int) -> int:
    """Nanoseconds since the epoch of a wall time in zone *tz* (None: this machine's zone)."""
    try:
        if tz is None:
            # isdst=-1: let the C library decide whether DST applies on that date.
            seconds = time.mktime((year, month, day, hour, minute, second, 0, 0, -1))
        else:
            seconds = dt.datetime(year, month, day, hour, minute, second, tzinfo=tz).timestamp()
    except (OverflowError, ValueError, OSError):  # a year like 0001 on some C libraries
        return 0
    return int(seconds) * NS_PER_S


def _listed_size(recording: Recording) -> Optional[int]:
    """The size a catalogue lists for *recording*, when it is a plausible one."""
    size_bytes = recording.size_bytes
    if isinstance(size_bytes, int) and not isinstance(size_bytes, bool) and 0 <= size_bytes <= MAX_ESTIMATE_BYTES:
        return size_bytes
    return None


def _checked_values(values: tuple) -> tuple:
    """A recording's (name, *CDR fields) with durations outside 0..MAX_CALL_S dropped (None):
    a hostile or broken value must not overflow SQLite's integers or make absurd estimates."""
    if all(values[i] is None or 0 <= values[i] <= MAX_CALL_S for i in _DURATION_POSITIONS):
        return values
    return tuple(None if i in _DURATION_POSITIONS and not 0 <= value <= MAX_CALL_S else value
                 for i, value in enumerate(values))


def _shown(name: object) -> str:
    """repr() of a name for a log line, cut to BAD_NAME_LOG_CHARS characters."""
    text = repr(name)
    if len(text) > BAD_NAME_LOG_CHARS:
        text = text[: BAD_NAME_LOG_CHARS - 3] + "..."
    return text
