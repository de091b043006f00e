"""RecordingIndex against real SQLite files: the tree, merging, hostile names, sizes,
persistence, local-time mtimes, threads, and speed at 200,000 recordings."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import sqlite3
import stat
import threading
import time

import pytest

from yeastarfs import index as index_module
from yeastarfs.errors import ConfigError
from yeastarfs.index import WAV_HEADER_BYTES, Entry, RecordingIndex
from yeastarfs.models import Recording, name_timestamp

NOV27_A = "20261127101500-1764236100.1-1001-1002-Internal.wav"
NOV27_B = "20261127093000-1764232200.7-0612345678-1001-Inbound.wav"
NOV27_C = "20261127235959-1764284399.9-1001-91000-Outbound.wav"
JAN05 = "20260105080000-1767600000.2-1003-1004-Internal.wav"
DEC31 = "20251231120000-1767182400.3-1005-1006-Internal.wav"
ALL_NAMES = [NOV27_A, NOV27_B, NOV27_C, JAN05, DEC31]


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "state" / "index.db")


@pytest.fixture
def index(db_path):
    with RecordingIndex(db_path) as opened:
        yield opened


@pytest.fixture
def filled(index):
    index.add(Recording(name=name, callid=name.split("-")[1]) for name in ALL_NAMES)
    return index


@pytest.fixture
def local_zone():
    """Run the test in Central European time (with DST), then restore the zone."""
    saved = os.environ.get("TZ")
    # A POSIX rule needs no tzdata: CET, CEST from the last Sunday of March 02:00 to the
    # last Sunday of October 03:00.
    os.environ["TZ"] = "CET-1CEST,M3.5.0,M10.5.0/3"
    time.tzset()
    yield
    if saved is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = saved
    time.tzset()


def names_of(entries: list[Entry]) -> list[str]:
    return [entry.name for entry in entries]


def local_ns(name: str) -> int:
    return int(time.mktime(name_timestamp(name).timetuple())) * 1_000_000_000


# -- the tree ----------------------------------------------------------------------------


def test_list_dir_at_every_level(filled):
    root = filled.list_dir("/")
    assert names_of(root) == ["2025", "2026"]
    assert {entry.kind for entry in root} == {"dir"}
    assert names_of(filled.list_dir("/2026")) == ["01", "11"]
    assert names_of(filled.list_dir("/2026/11")) == ["27"]
    day = filled.list_dir("/2026/11/27")
    assert names_of(day) == sorted([NOV27_A, NOV27_B, NOV27_C])
    assert all(entry.kind == "file" and entry.recording.name == entry.name for entry in day)
    assert names_of(filled.list_dir("/2025/12/31")) == [DEC31]


def test_lookup_at_every_level(filled):
    root = filled.lookup("/")
    assert (root.kind, root.mtime_ns, root.size_bytes, root.recording) == ("dir", 0, 0, None)
    for path, name in [("/2026", "2026"), ("/2026/11", "11"), ("/2026/11/27", "27")]:
        entry = filled.lookup(path)
        assert (entry.kind, entry.name, entry.size_bytes) == ("dir", name, 0)
    entry = filled.lookup(f"/2026/11/27/{NOV27_A}")
    assert entry.kind == "file" and entry.name == NOV27_A
    assert entry.recording == Recording(name=NOV27_A, callid="1764236100.1")
    assert filled.get(NOV27_A) == entry


def test_empty_index_has_only_an_empty_root(index):
    assert index.list_dir("/") == []
    assert index.lookup("/").kind == "dir"
    assert index.lookup("/2026") is None
    assert index.count() == 0


@pytest.mark.parametrize(
    "path",
    [
        "", "2026", "//", "/abc", "/2026/", "/2027", "/202", "/02026", "/2026/13", "/2026/1",
        "/2026/11/7", "/2026/11/28", "/2026/12/27", "/2026/11/27/missing.wav",
        "/2026/11/27/x/y", "/2026/11/27/", "/2026/11/26/" + NOV27_A, "/2026/11/27/..",
        "/\u0662\u0660\u0662\u0666", "/2026/11/27/" + NOV27_A + "/", "/2026\n",
    ],
)
def test_unknown_paths_are_none(filled, path):
    assert filled.lookup(path) is None
    assert filled.list_dir(path) is None


def test_list_dir_of_a_file_is_none(filled):
    assert filled.list_dir(f"/2026/11/27/{NOV27_A}") is None


def test_folders_come_from_the_name_not_timestart(index):
    # The CDR's timestart is before midnight, the recording name's timestamp after it.
    name = "20260101000010-1767222000.5-1001-1002-Inbound.wav"
    index.add([Recording(name=name, timestart="2025-12-31 23:59:50")])
    assert names_of(index.list_dir("/2026/01/01")) == [name]
    assert index.lookup("/2025") is None


def test_path_of(index):
    assert index.path_of(NOV27_A) == f"/2026/11/27/{NOV27_A}"
    with pytest.raises(ValueError):
        index.path_of("../etc/passwd")


def test_get_unknown_or_bad_name_is_none(filled):
    assert filled.get("20261127101500-nothing.wav") is None
    assert filled.get("") is None
    assert filled.get(None) is None


def test_columns_follow_the_recording_fields():
    # All but the last, size_bytes, which is stored as the exact size (next test).
    assert index_module._RECORDING_COLUMNS + ("size_bytes",) == tuple(
        field.name for field in dataclasses.fields(Recording)
    )


def test_a_size_the_catalogue_lists_is_exact_before_any_download(index):
    index.add([Recording(name=NOV27_A, talk_s=10, size_bytes=123_456), Recording(name=NOV27_B, talk_s=10)])
    listed, estimated = index.get(NOV27_A), index.get(NOV27_B)
    assert (listed.size_bytes, listed.size_exact) == (123_456, True)
    assert (estimated.size_bytes, estimated.size_exact) == (44 + 160_000, False)
    index.add([Recording(name=NOV27_B, size_bytes=99_000)])  # a later listing fills it in
    assert (index.get(NOV27_B).size_bytes, index.get(NOV27_B).size_exact) == (99_000, True)
    index.add([Recording(name=NOV27_A, size_bytes=1)])  # a known exact size is kept
    index.set_size(NOV27_A, 123_000)  # a download has the last word
    assert index.get(NOV27_A).size_bytes == 123_000
    index.add([Recording(name=JAN05, size_bytes=5_000)], authoritative=False)  # events carry no sizes
    index.add([Recording(name=NOV27_C, size_bytes=-5), Recording(name=DEC31, size_bytes=True)])
    assert [index.get(name).size_exact for name in (JAN05, NOV27_C, DEC31)] == [False, False, False]


# -- add: dedup and merging ----------------------------------------------------------------


def test_add_returns_only_new_recordings(index):
    first = [Recording(name=NOV27_A), Recording(name=NOV27_B)]
    assert index.add(first) == first
    again = [Recording(name=NOV27_B), Recording(name=JAN05)]
    assert index.add(again) == [Recording(name=JAN05)]
    assert index.add([]) == []
    assert index.count() == 3


def test_add_dedups_within_one_batch(index):
    batch = [Recording(name=NOV27_A, callfrom="1001"), Recording(name=NOV27_A, talk_s=7)]
    assert index.add(batch) == [batch[0]]
    assert index.count() == 1
    assert index.get(NOV27_A).recording == Recording(name=NOV27_A, callfrom="1001", talk_s=7)


def test_add_accepts_a_generator(index):
    assert len(index.add(Recording(name=name) for name in ALL_NAMES)) == len(ALL_NAMES)


def test_known_recording_gets_non_empty_fields_updated(index):
    index.add([Recording(name=NOV27_A, callid="1.1", callfrom="1001", call_s=30, status="X")])
    update = Recording(name=NOV27_A, callfrom="", callto="1002", talk_s=0, call_s=None,
                       status="ANSWERED")
    assert index.add([update]) == []
    assert index.get(NOV27_A).recording == Recording(
        name=NOV27_A, callid="1.1", callfrom="1001", callto="1002", call_s=30, talk_s=0,
        status="ANSWERED",
    )
    assert index.count() == 1


def test_re_adding_keeps_the_exact_size(index):
    index.add([Recording(name=NOV27_A)])
    index.set_size(NOV27_A, 1234)
    index.add([Recording(name=NOV27_A, talk_s=99)])
    entry = index.get(NOV27_A)
    assert (entry.size_bytes, entry.size_exact, entry.recording.talk_s) == (1234, True, 99)


# -- hostile names -------------------------------------------------------------------------

HOSTILE_NAMES = [
    "/",
    "\\",
    "..",
    ".",
    "",
    "20261127101500-a/b.wav",
    "20261127101500-a\\b.wav",
    "20261127101500-\x00.wav",
    "20261127101500-\x1b[31mred.wav",
    "20261127101500-\x7f.wav",
    "20261127101500-\u0085.wav",
    "20261127101500-" + "\u00e9" * 130 + ".wav",  # 279 bytes in UTF-8
    "20261127101500-" + "x" * 300 + ".wav",
    "call-without-timestamp.wav",
    "20261331101500-1-2-3-Internal.wav",  # month 13
    "2026112710150-short-stamp.wav",
    None,
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=lambda name: repr(name)[:30])
def test_hostile_names_are_never_stored_and_logged_once(index, caplog, name):
    caplog.set_level(logging.WARNING, logger="yeastarfs.index")
    assert index.add([Recording(name=name), Recording(name=NOV27_A)]) == [
        Recording(name=NOV27_A)
    ]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
    assert shown in message and "rejected (" in message
    assert len(message) < 200
    caplog.clear()
    assert index.add([Recording(name=name)]) == []
    assert caplog.records == []
    assert index.count() == 1
    assert names_of(index.list_dir("/2026/11/27")) == [NOV27_A]


def test_bad_name_memory_is_bounded(index, caplog, monkeypatch):
    monkeypatch.setattr(index_module, "BAD_NAMES_REMEMBERED", 3)
    caplog.set_level(logging.WARNING, logger="yeastarfs.index")
    bad = [f"bad-{number}.wav" for number in range(4)]
    index.add(Recording(name=name) for name in bad)
    assert len(caplog.records) == 4
    assert len(index._bad_names) == 3
    caplog.clear()
    index.add([Recording(name=bad[0])])  # forgotten, so logged again
    index.add([Recording(name=bad[3])])  # remembered
    assert [record.getMessage().count("bad-0") for record in caplog.records] == [1]


# -- sizes ---------------------------------------------------------------------------------


def test_size_estimates_and_exact_sizes(db_path):
    names = [f"20261127{hour:02d}0000-{hour}-1-2-Internal.wav" for hour in range(5)]
    with RecordingIndex(db_path, estimate_bytes_per_s=1000.5,
                        default_estimate_bytes=777) as index:
        index.add([
            Recording(name=names[0], talk_s=10, call_s=20),
            Recording(name=names[1], talk_s=0, call_s=20),
            Recording(name=names[2], talk_s=None, call_s=3),
            Recording(name=names[3], talk_s=0, call_s=0),
            Recording(name=names[4]),
        ])
        expected = [WAV_HEADER_BYTES + 10005, WAV_HEADER_BYTES + 20010,
                    WAV_HEADER_BYTES + round(3001.5), 777, 777]
        assert [e.size_bytes for e in index.list_dir("/2026/11/27")] == expected
        assert not any(e.size_exact for e in index.list_dir("/2026/11/27"))

        index.set_size(names[0], 5000)
        index.set_size("20261127000000-unknown.wav", 1)  # ignored
        index.set_estimate_rate(2000)
        sizes = [(e.size_bytes, e.size_exact) for e in index.list_dir("/2026/11/27")]
        assert sizes == [(5000, True), (WAV_HEADER_BYTES + 40000, False),
                         (WAV_HEADER_BYTES + 6000, False), (777, False), (777, False)]
        assert index.get(names[2]).size_bytes == WAV_HEADER_BYTES + 6000
        assert index.count() == 5


@pytest.mark.parametrize("rate", [0, -1, float("nan"), float("inf")])
def test_bad_estimate_rate_is_refused(index, rate):
    with pytest.raises(ValueError):
        index.set_estimate_rate(rate)


def test_negative_size_is_refused(filled):
    with pytest.raises(ValueError):
        filled.set_size(NOV27_A, -1)


def test_directories_have_no_size(filled):
    assert [e.size_bytes for e in filled.list_dir("/")] == [0, 0]


# -- persistence ---------------------------------------------------------------------------


def test_reopen_gives_the_same_content(db_path):
    with RecordingIndex(db_path) as index:
        index.add([Recording(name=name, callfrom="1001", talk_s=5) for name in ALL_NAMES])
        index.set_size(NOV27_B, 4242)
        index.set_meta("last_cdr_poll", "2026-11-27T10:00:00")
        before = {path: index.list_dir(path) for path in ("/", "/2026", "/2026/11/27")}
    with RecordingIndex(db_path) as index:
        assert {path: index.list_dir(path) for path in before} == before
        assert index.count() == len(ALL_NAMES)
        assert index.get(NOV27_B).size_bytes == 4242
        assert index.get_meta("last_cdr_poll") == "2026-11-27T10:00:00"
        assert index.add([Recording(name=NOV27_A)]) == []


def test_file_is_private_and_folder_created(db_path):
    old_umask = os.umask(0o022)
    try:
        with RecordingIndex(db_path) as index:
            index.add([Recording(name=NOV27_A)])
            folder = os.path.dirname(db_path)
            files = os.listdir(folder)  # index.db and, in WAL mode, -wal and -shm
            for name in files:
                mode = stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode)
                assert mode == 0o600, (name, oct(mode))
    finally:
        os.umask(old_umask)
    assert {"index.db", "index.db-wal", "index.db-shm"} <= set(files)


def test_schema_version_and_wal(db_path):
    RecordingIndex(db_path).close()
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == index_module.SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_newer_schema_is_refused(db_path):
    RecordingIndex(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {index_module.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ConfigError, match="newer"):
        RecordingIndex(db_path)


def test_not_a_database_is_refused(tmp_path):
    path = tmp_path / "index.db"
    path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(ConfigError):
        RecordingIndex(str(path))


def test_close_twice_is_harmless(db_path):
    index = RecordingIndex(db_path)
    index.close()
    index.close()


def test_meta(index):
    assert index.get_meta("missing") is None
    index.set_meta("k", "1")
    index.set_meta("k", "2")
    assert index.get_meta("k") == "2"


# -- times ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("local_zone")
def test_mtimes_are_local_time(index):
    names = [
        "20260115120000-a.wav",
        "20260329013000-before-spring-forward.wav",
        "20260329033000-after-spring-forward.wav",
        "20260329235959-end-of-short-day.wav",
        "20260715120000-summer.wav",
        "20261025023000-ambiguous-hour.wav",
        "20261025120000-long-day.wav",
        NOV27_A,
    ]
    index.add(Recording(name=name) for name in names)
    for name in names:
        assert index.get(name).mtime_ns == local_ns(name), name
    for name in names:
        listed = {e.name: e.mtime_ns for e in index.list_dir(index.path_of(name)[:11])}
        assert listed[name] == local_ns(name), name
    # Winter is UTC+1, summer UTC+2.
    utc = dt.timezone.utc
    assert local_ns(names[0]) // 10**9 == dt.datetime(2026, 1, 15, 11, tzinfo=utc).timestamp()
    assert local_ns(names[4]) // 10**9 == dt.datetime(2026, 7, 15, 10, tzinfo=utc).timestamp()


@pytest.mark.usefixtures("local_zone")
def test_directory_mtimes_are_local_midnight(filled):
    start_ns = {path: filled.lookup(path).mtime_ns for path in ("/2026", "/2026/11", "/2026/11/27")}
    assert start_ns == {
        "/2026": int(time.mktime((2026, 1, 1, 0, 0, 0, 0, 0, -1))) * 10**9,
        "/2026/11": int(time.mktime((2026, 11, 1, 0, 0, 0, 0, 0, -1))) * 10**9,
        "/2026/11/27": int(time.mktime((2026, 11, 27, 0, 0, 0, 0, 0, -1))) * 10**9,
    }
    assert [e.mtime_ns for e in filled.list_dir("/2026/11")] == [start_ns["/2026/11/27"]]


def test_recordings_since(filled, monkeypatch):
    monkeypatch.setattr(index_module, "SINCE_PAGE_ROWS", 2)  # force several pages
    since = list(filled.recordings_since(dt.datetime(2026, 1, 5, 8, 0, 0)))
    assert [r.name for r in since] == [JAN05, NOV27_B, NOV27_A, NOV27_C]
    since = list(filled.recordings_since(dt.datetime(2026, 11, 27, 10, 15, 1)))
    assert [r.name for r in since] == [NOV27_C]
    assert list(filled.recordings_since(dt.datetime(2027, 1, 1))) == []
    assert len(list(filled.recordings_since(dt.datetime(1970, 1, 1)))) == len(ALL_NAMES)


@pytest.mark.usefixtures("local_zone")
def test_recordings_since_converts_aware_times_to_local(filled):
    start = dt.datetime(2026, 11, 27, 9, 15, 0, tzinfo=dt.timezone.utc)  # 10:15 CET
    assert [r.name for r in filled.recordings_since(start)] == [NOV27_A, NOV27_C]


# -- threads -------------------------------------------------------------------------------


def test_concurrent_adds_and_listings(index):
    writers, batches, per_batch = 4, 25, 20
    new_counts: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def write(writer: int) -> None:
        try:
            for batch in range(batches):
                names = [f"202611{writer + 10:02d}10{batch:02d}{n:02d}-{writer}.wav"
                         for n in range(per_batch)]
                # Every writer also re-adds a shared batch: only one may count it as new.
                shared = [f"20261101000000-shared-{batch}-{n}.wav" for n in range(per_batch)]
                new_counts.append(len(index.add([Recording(name=x) for x in names + shared])))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def read() -> None:
        try:
            while not done.is_set():
                for day in index.list_dir("/2026/11") or []:
                    for entry in index.list_dir(f"/2026/11/{day.name}") or []:
                        assert index.lookup(index.path_of(entry.name)) == entry
                index.count()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    readers = [threading.Thread(target=read) for _ in range(2)]
    for thread in threads + readers:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    done.set()
    for thread in readers:
        thread.join(timeout=60)
    assert errors == []
    total = writers * batches * per_batch + batches * per_batch
    assert sum(new_counts) == total
    assert index.count() == total
    assert len(index.list_dir("/2026/11/01")) == batches * per_batch


# -- scale ---------------------------------------------------------------------------------


def _many_recordings(total: int, busy_day: dt.date, busy_count: int) -> list[Recording]:
    """*total* recordings over three years in time order, *busy_count* of them on *busy_day*."""
    start = dt.datetime(2023, 1, 1)
    step_s = 3 * 365 * 86400 // (total - busy_count)
    recordings = []
    for number in range(total - busy_count):
        stamp = start + dt.timedelta(seconds=number * step_s)
        recordings.append(Recording(
            name=f"{stamp:%Y%m%d%H%M%S}-{1672531200 + number}.{number % 1000}-1001-2002-Inbound"
            ".wav",
            callid=f"{1672531200 + number}.{number % 1000}", callfrom="1001", callto="2002",
            talk_s=number % 600, call_s=number % 600 + 10, status="ANSWERED", call_type="Inbound",
        ))
    busy_start = dt.datetime.combine(busy_day, dt.time(8, 0))
    for number in range(busy_count):
        stamp = busy_start + dt.timedelta(seconds=number * 30)
        recordings.append(Recording(name=f"{stamp:%Y%m%d%H%M%S}-busy.{number}-1-2-Internal.wav",
                                    talk_s=number))
    return recordings


def _best_s(function, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def test_scale_200k_recordings(db_path, capsys):
    busy_day = dt.date(2024, 6, 12)
    recordings = _many_recordings(200_000, busy_day, 1000)
    timings = {}
    with RecordingIndex(db_path) as index:
        started = time.perf_counter()
        for first in range(0, len(recordings), 100_000):
            assert len(index.add(recordings[first:first + 100_000])) == 100_000
        timings["add 200k (2 calls)"] = time.perf_counter() - started
        started = time.perf_counter()
        assert index.add(recordings[:100_000]) == []
        timings["re-add 100k known"] = time.perf_counter() - started

    started = time.perf_counter()
    index = RecordingIndex(db_path)
    assert index.count() == 200_000
    timings["reopen + count"] = time.perf_counter() - started
    try:
        busy_path = f"/{busy_day:%Y/%m/%d}"
        listing = index.list_dir(busy_path)
        assert len(listing) >= 1000 and names_of(listing) == sorted(names_of(listing))
        timings["list_dir busy day"] = _best_s(lambda: index.list_dir(busy_path))
        timings["list_dir root/year/month"] = _best_s(
            lambda: (index.list_dir("/"), index.list_dir("/2024"), index.list_dir("/2024/06")))
        paths = [index.path_of(r.name) for r in recordings[::200]]
        timings["lookup file (each)"] = _best_s(
            lambda: [index.lookup(path) for path in paths]) / len(paths)
        timings["lookup day dir (each)"] = _best_s(
            lambda: [index.lookup(path[:11]) for path in paths]) / len(paths)
        assert all(index.lookup(path) is not None for path in paths)
        assert names_of(index.list_dir("/")) == ["2023", "2024", "2025"]
    finally:
        index.close()
    with capsys.disabled():
        print("\nRecordingIndex at 200k:", ", ".join(
            f"{label} {seconds * 1000:.2f} ms" for label, seconds in timings.items()))
    assert timings["reopen + count"] < 1.0
    assert timings["list_dir busy day"] < 0.050
    assert timings["list_dir root/year/month"] < 0.050
    assert timings["lookup file (each)"] < 0.001
    assert timings["lookup day dir (each)"] < 0.001


@pytest.mark.parametrize("path", ["/", "/2026", "/2026/11", "/2026/11/27", "/2026/11/27/x", "/1999", "/2026/13"])
def test_list_dir_sizes_agrees_with_list_dir(filled, path):
    filled.set_size(ALL_NAMES[0], 12345)
    entries = filled.list_dir(path)
    fast = filled.list_dir_sizes(path)
    if entries is None:
        assert fast is None
        return
    assert fast == [(e.name, e.kind == "dir", e.size_bytes, e.mtime_ns, e.gone) for e in entries]


# -- schema version 2: gone recordings, discovery order, authority of the catalogue, zones ----


def test_an_event_fills_gaps_but_never_overwrites_what_the_catalogue_said(index):
    index.add([Recording(name=NOV27_A, callfrom="1001", callto="1002", talk_s=30)])
    forged = Recording(name=NOV27_A, callfrom="6666", callto="7777", talk_s=1, status="ANSWERED")
    assert index.add([forged], authoritative=False) == []
    stored = index.get(NOV27_A).recording
    assert (stored.callfrom, stored.callto, stored.talk_s) == ("1001", "1002", 30)
    assert stored.status == "ANSWERED"  # was empty: an event may fill it
    index.add([Recording(name=NOV27_A, callfrom="1009")])  # the catalogue is the authority
    assert index.get(NOV27_A).recording.callfrom == "1009"


def test_an_event_first_then_the_catalogue_corrects_it(index):
    index.add([Recording(name=NOV27_A, callfrom="6666")], authoritative=False)
    index.add([Recording(name=NOV27_A, callfrom="1001")])
    assert index.get(NOV27_A).recording.callfrom == "1001"


@pytest.mark.parametrize("seconds", [99999999999999999999, 9 * 10**18, -5, 7 * 86400 + 1])
def test_hostile_durations_are_dropped_not_stored(index, seconds):
    # 99999999999999999999 overflowed SQLite's integers and killed the CDR thread (issue 9).
    index.add([Recording(name=NOV27_A, talk_s=seconds, call_s=seconds)])
    entry = index.get(NOV27_A)
    assert entry.recording.talk_s is None and entry.recording.call_s is None
    assert entry.size_bytes == 1_048_576  # the default estimate, not an absurd one


def test_estimates_never_exceed_what_a_download_may_be(db_path):
    with RecordingIndex(db_path, estimate_bytes_per_s=10**9) as index:
        index.add([Recording(name=NOV27_A, talk_s=7 * 86400)])
        assert index.get(NOV27_A).size_bytes == index_module.MAX_ESTIMATE_BYTES


def test_gone_recordings_are_flagged_not_forgotten(filled):
    assert filled.mark_gone(NOV27_A) is True
    assert filled.mark_gone(NOV27_A) is False  # already gone
    assert filled.mark_gone("20261127000000-x-1-2-Internal.wav") is False  # unknown
    assert filled.get(NOV27_A).gone and not filled.get(NOV27_B).gone
    sizes = {row[0]: row[4] for row in filled.list_dir_sizes("/2026/11/27")}
    assert sizes[NOV27_A] is True and sizes[NOV27_B] is False
    assert NOV27_A not in {r.name for r in filled.recordings_since(dt.datetime(2026, 1, 1))}
    # A later catalogue row does not bring it back (the PBX keeps CDR rows of deleted audio).
    assert filled.add([Recording(name=NOV27_A, callfrom="1001")]) == []
    assert filled.get(NOV27_A).gone


def test_discovery_order_and_first_seen_survive_a_restart(db_path):
    before = time.time()
    with RecordingIndex(db_path) as index:
        index.add([Recording(name=NOV27_B), Recording(name=JAN05)])
        index.add([Recording(name=DEC31)])
    with RecordingIndex(db_path) as index:
        index.add([Recording(name=NOV27_A)])
        seqs = {name: index.get(name).seq for name in (NOV27_B, JAN05, DEC31, NOV27_A)}
        assert seqs == {NOV27_B: 1, JAN05: 2, DEC31: 3, NOV27_A: 4}
        assert before <= index.get(DEC31).first_seen <= time.time()


def test_a_version_1_index_is_migrated_in_place(db_path):
    os.makedirs(os.path.dirname(db_path))
    conn = sqlite3.connect(db_path)
    for statement in index_module._SCHEMA:
        conn.execute(statement)
    conn.execute("INSERT INTO recordings (day, name, callid, timestart, callfrom, callto, src_trunk, dst_trunk,"
                 " status, call_type, pincode, did, sn) VALUES (?, ?, '', '', '1001', '', '', '', '', '', '', '', '')",
                 (NOV27_B[:8], NOV27_B))
    conn.execute("INSERT INTO recordings (day, name, callid, timestart, callfrom, callto, src_trunk, dst_trunk,"
                 " status, call_type, pincode, did, sn) VALUES (?, ?, '', '', '', '', '', '', '', '', '', '', '')",
                 (JAN05[:8], JAN05))
    conn.execute("INSERT INTO days VALUES (?, 1), (?, 1)", (NOV27_B[:8], JAN05[:8]))
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with RecordingIndex(db_path) as index:
        assert index.get(NOV27_B).recording.callfrom == "1001"
        assert (index.get(JAN05).seq, index.get(NOV27_B).seq) == (1, 2)  # name order
        assert not index.get(NOV27_B).gone
        index.add([Recording(name=NOV27_A)])
        assert index.get(NOV27_A).seq == 3
    assert sqlite3.connect(db_path).execute("PRAGMA user_version").fetchone()[0] == index_module.SCHEMA_VERSION


def test_read_only_opening_changes_nothing(db_path, filled):
    size_before = os.path.getsize(db_path)
    with RecordingIndex(db_path, read_only=True) as reader:
        assert reader.get(NOV27_A) is not None
        with pytest.raises(sqlite3.OperationalError):
            reader.add([Recording(name=JAN05.replace("080000", "090000"))])
    assert os.path.getsize(db_path) == size_before
    with pytest.raises(ConfigError, match="read-only"):
        RecordingIndex(db_path + ".missing", read_only=True)
    assert not os.path.exists(db_path + ".missing")


def test_times_are_read_in_the_pbx_zone(db_path):
    kolkata = dt.timezone(dt.timedelta(hours=5, minutes=30))
    with RecordingIndex(db_path, tz=kolkata) as index:
        index.add([Recording(name=NOV27_B)])  # 2026-11-27 09:30:00 in Kolkata
        instant = dt.datetime(2026, 11, 27, 4, 0, 0, tzinfo=dt.timezone.utc)
        assert index.get(NOV27_B).mtime_ns == int(instant.timestamp()) * 1_000_000_000
        assert index.list_dir_sizes("/2026/11/27")[0][3] == int(instant.timestamp()) * 1_000_000_000
        day = index.lookup("/2026/11/27")
        assert day.mtime_ns == int(dt.datetime(2026, 11, 26, 18, 30, tzinfo=dt.timezone.utc).timestamp()) * 10**9
        index.set_timezone(dt.timezone.utc)
        assert index.get(NOV27_B).mtime_ns == int(dt.datetime(2026, 11, 27, 9, 30, tzinfo=dt.timezone.utc)
                                                  .timestamp()) * 1_000_000_000


def test_recordings_after_pages_in_discovery_order_and_skips_gone(db_path):
    with RecordingIndex(db_path) as index:
        index.add([Recording(name=NOV27_A), Recording(name=DEC31)])
        index.add([Recording(name=JAN05), Recording(name=NOV27_B)])  # found later, older calls
        index.mark_gone(DEC31)
    with RecordingIndex(db_path, read_only=True) as reader:
        first = reader.recordings_after(0, limit=2)
        assert [(seq, rec.name) for seq, rec, _ in first] == [(1, NOV27_A), (3, JAN05)]
        rest = reader.recordings_after(first[-1][0], limit=2)
        assert [(seq, rec.name) for seq, rec, _ in rest] == [(4, NOV27_B)]
        assert all(first_seen is not None for _, _, first_seen in first + rest)
        assert reader.recordings_after(4) == []


def test_sizes_of_zero_are_exact_and_negative_ones_refused(tmp_path):
    with RecordingIndex(str(tmp_path / "index.sqlite3")) as index:
        name = "20261127093012-1.1-1001-1002-Internal.wav"
        index.add([Recording(name=name, talk_s=10)])
        index.set_size(name, 0)
        assert index.get(name).size_exact and index.get(name).size_bytes == 0
        with pytest.raises(ValueError, match="size_bytes must be >= 0, got -1"):
            index.set_size(name, -1)
        assert index.mark_gone(name) is True and index.mark_gone(name) is False


def test_discovery_order_pages_carry_each_recording_and_when_it_was_first_seen(tmp_path):
    names = [f"2026112709{minute:02d}00-1.{minute}-1001-1002-Internal.wav" for minute in range(7)]
    with RecordingIndex(str(tmp_path / "index.sqlite3")) as index:
        before = time.time()
        index.add([Recording(name=name, callid=f"1.{i}", talk_s=i + 1) for i, name in enumerate(names)])
        rows = index.recordings_after(0, limit=3)
        assert [rec.name for _, rec, _ in rows] == names[:3]
        assert [rec.talk_s for _, rec, _ in rows] == [1, 2, 3] and [rec.callid for _, rec, _ in rows] == ["1.0", "1.1", "1.2"]
        assert all(before <= seen <= time.time() for _, _, seen in rows)
        rest = index.recordings_after(rows[-1][0])
        assert [rec.name for _, rec, _ in rest] == names[3:]
        since = list(index.recordings_since(dt.datetime(2026, 11, 27, 9, 2)))
        assert [rec.name for rec in since] == names[2:]


def test_recordings_since_reads_every_page_of_a_busy_day(tmp_path):
    day = dt.datetime(2026, 11, 27)
    names = [(day + dt.timedelta(seconds=20 * i)).strftime("%Y%m%d%H%M%S") + f"-1.{i}-1-2-Internal.wav"
             for i in range(2_100)]  # more than two pages of a thousand rows
    with RecordingIndex(str(tmp_path / "index.sqlite3")) as index:
        index.add([Recording(name=name) for name in reversed(names)])
        assert [rec.name for rec in index.recordings_since(day)] == names
        assert [rec.name for rec in index.recordings_since(day + dt.timedelta(seconds=20 * 1_500))] == names[1_500:]


def test_an_estimate_never_exceeds_4_gib(tmp_path):
    with RecordingIndex(str(tmp_path / "index.sqlite3")) as index:
        long_call = "20261127093012-1.1-1001-1002-Internal.wav"
        index.add([Recording(name=long_call, talk_s=300_000)])  # 3.5 days at 16,000 B/s: 4.8 GB
        assert index.get(long_call).size_bytes == 4 * 1024 ** 3
        assert not index.get(long_call).size_exact
