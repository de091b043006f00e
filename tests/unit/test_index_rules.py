"""RecordingIndex rules, one at a time, against real SQLite files: folders are exact and dated
in the PBX's zone at every level, paged folder listings (after, skip, limit; a day with an
empty page versus a day that does not exist), size estimates from the call's duration, the
discovery-order and time cursors carrying whole recordings, and the read-only index the
tools open (any thread, a refused write, a file that is not an index of this version)."""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading

import pytest

from yeastarfs import index as index_module
from yeastarfs.errors import ConfigError
from yeastarfs.index import RecordingIndex
from yeastarfs.models import Recording

NOV27_A = "20261127101500-1764236100.1-1001-1002-Internal.wav"
NOV27_B = "20261127093000-1764232200.7-0612345678-1001-Inbound.wav"
JAN05 = "20260105080000-1767600000.2-1003-1004-Internal.wav"
DEC31 = "20251231120000-1767182400.3-1005-1006-Internal.wav"
NS = 1_000_000_000
# A zone far from this machine's (UTC in CI), without DST.
KOLKATA = dt.timezone(dt.timedelta(hours=5, minutes=30))


def at(tz: dt.tzinfo, *fields: int) -> int:
    return int(dt.datetime(*fields, tzinfo=tz).timestamp()) * NS


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "index.sqlite3")


@pytest.fixture
def filled(db_path):
    with RecordingIndex(db_path) as index:
        index.add([Recording(name=name) for name in (NOV27_A, NOV27_B, JAN05, DEC31)])
        yield index


# -- folders ---------------------------------------------------------------------------------


def test_folders_have_an_exact_size_of_zero_at_every_level(filled):
    for path in ("/", "/2026", "/2026/11"):
        for entry in filled.list_dir(path):
            assert entry.kind == "dir" and entry.size_bytes == 0 and entry.size_exact is True, entry
    for path in ("/", "/2026", "/2026/11", "/2026/11/27"):
        assert filled.lookup(path).size_exact is True, path


def test_folders_are_dated_at_midnight_in_the_pbx_zone_at_every_level(db_path):
    with RecordingIndex(db_path, tz=KOLKATA) as index:
        index.add([Recording(name=NOV27_A)])
        assert [(e.name, e.mtime_ns) for e in index.list_dir("/")] == [("2026", at(KOLKATA, 2026, 1, 1))]
        assert [(e.name, e.mtime_ns) for e in index.list_dir("/2026")] == [("11", at(KOLKATA, 2026, 11, 1))]
        assert [(e.name, e.mtime_ns) for e in index.list_dir("/2026/11")] == [("27", at(KOLKATA, 2026, 11, 27))]
        assert index.list_dir_sizes("/2026/11") == [("27", True, 0, at(KOLKATA, 2026, 11, 27), False)]


def test_a_zone_set_later_dates_folders_and_files(db_path):
    with RecordingIndex(db_path) as index:                # this machine's zone first
        index.add([Recording(name=NOV27_A)])
        index.set_timezone(KOLKATA)
        assert index.list_dir("/")[0].mtime_ns == at(KOLKATA, 2026, 1, 1)
        assert index.lookup("/2026/11/27").mtime_ns == at(KOLKATA, 2026, 11, 27)
        assert index.get(NOV27_A).mtime_ns == at(KOLKATA, 2026, 11, 27, 10, 15)


# -- paged listings --------------------------------------------------------------------------


def test_a_page_of_years_months_or_days_honours_after_skip_and_limit(filled):
    names = lambda page: [row[0] for row in page]  # noqa: E731
    assert names(filled.list_dir_sizes("/")) == ["2025", "2026"]
    assert names(filled.list_dir_sizes("/", after="2025")) == ["2026"]       # strictly after
    assert names(filled.list_dir_sizes("/", limit=1)) == ["2025"]
    assert filled.list_dir_sizes("/", limit=0) == []
    assert names(filled.list_dir_sizes("/", skip=1, limit=1)) == ["2026"]
    assert names(filled.list_dir_sizes("/2026", after="01")) == ["11"]
    assert filled.list_dir_sizes("/2026", after="11") == []


def test_an_empty_page_of_a_day_is_empty_and_a_missing_day_is_none(filled):
    assert filled.list_dir_sizes("/2026/11/27", after=NOV27_A) == []        # past its last name
    assert filled.list_dir_sizes("/2026/11/27", skip=5) == []
    assert [row[0] for row in filled.list_dir_sizes("/2026/11/27", after=NOV27_B)] == [NOV27_A]
    for kwargs in ({}, {"after": NOV27_A}, {"skip": 5}, {"after": NOV27_A, "skip": 1}):
        assert filled.list_dir_sizes("/2026/11/28", **kwargs) is None, kwargs
        assert filled.list_dir_sizes("/2024/11/27", **kwargs) is None, kwargs


def test_a_listed_estimate_falls_back_to_the_call_duration(db_path):
    with RecordingIndex(db_path, estimate_bytes_per_s=1000) as index:
        index.add([Recording(name=NOV27_A, call_s=30), Recording(name=NOV27_B, talk_s=7, call_s=30)])
        sizes = {row[0]: row[2] for row in index.list_dir_sizes("/2026/11/27")}
        assert sizes == {NOV27_A: 44 + 30 * 1000, NOV27_B: 44 + 7 * 1000}
        assert index.get(NOV27_A).size_bytes == sizes[NOV27_A]


# -- names -----------------------------------------------------------------------------------


def test_path_of_an_unsafe_name_says_which_name_and_why(filled):
    with pytest.raises(ValueError) as caught:
        filled.path_of("../20261127101500-x.wav")
    message = str(caught.value)
    assert repr("../20261127101500-x.wav") in message and "slash" in message


# -- cursors ---------------------------------------------------------------------------------


def test_the_discovery_cursor_returns_every_field_of_a_recording(db_path):
    whole = Recording(name=NOV27_A, callid="1764236100.1", timestart="2026-11-27 10:14:50",
                      callfrom="1001", callto="1002", call_s=40, talk_s=30, src_trunk="t-in",
                      dst_trunk="t-out", status="ANSWERED", call_type="Internal", pincode="77",
                      did="0612", sn="SN-9")
    with RecordingIndex(db_path) as index:
        index.add([whole])
        [(seq, recording, first_seen)] = index.recordings_after(0)
    assert seq == 1 and first_seen is not None
    assert recording == whole


def test_the_time_cursor_continues_a_page_that_ends_on_a_later_day(db_path, monkeypatch):
    monkeypatch.setattr(index_module, "SINCE_PAGE_ROWS", 3)
    names = ([f"20261126{h:02d}0000-1.{h}-1-2-Internal.wav" for h in (8, 9)]
             + [f"20261127{h:02d}0000-2.{h}-1-2-Internal.wav" for h in (8, 9, 10, 11)])
    with RecordingIndex(db_path) as index:
        index.add([Recording(name=name) for name in names])
        assert [r.name for r in index.recordings_since(dt.datetime(2026, 11, 26))] == names


def test_an_aware_start_is_read_in_the_pbx_zone(db_path):
    with RecordingIndex(db_path, tz=KOLKATA) as index:
        index.add([Recording(name=NOV27_B), Recording(name=NOV27_A)])  # 09:30 and 10:15 in Kolkata
        start = dt.datetime(2026, 11, 27, 4, 0, tzinfo=dt.timezone.utc)  # 09:30 in Kolkata
        assert [r.name for r in index.recordings_since(start)] == [NOV27_B, NOV27_A]
        start = dt.datetime(2026, 11, 27, 4, 1, tzinfo=dt.timezone.utc)  # 09:31
        assert [r.name for r in index.recordings_since(start)] == [NOV27_A]


# -- the read-only index of the tools --------------------------------------------------------


def test_a_read_only_index_answers_from_any_thread(db_path, filled):
    with RecordingIndex(db_path, read_only=True) as reader:
        seen = []
        thread = threading.Thread(target=lambda: seen.append((reader.count(), reader.get(NOV27_A) is not None)))
        thread.start()
        thread.join(5)
        assert seen == [(4, True)]


def test_a_refused_write_does_not_freeze_what_a_read_only_index_sees(db_path, filled):
    with RecordingIndex(db_path, read_only=True) as reader:
        with pytest.raises(sqlite3.OperationalError):
            reader.mark_gone(NOV27_A)
        assert reader.count() == 4
        later = "20261128080000-1.9-1-2-Internal.wav"
        filled.add([Recording(name=later)])               # the mount goes on adding
        assert reader.count() == 5 and reader.get(later) is not None


@pytest.mark.parametrize("version", [0, 1, 3])
def test_a_read_only_open_of_another_schema_names_the_file_the_versions_and_why(tmp_path, version):
    path = str(tmp_path / "other.sqlite3")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError) as caught:
        RecordingIndex(path, read_only=True)
    message = str(caught.value)
    assert path in message and f"schema version {version}" in message
    assert "expected 2 (written by another yeastarfs version" in message and "not an index" in message


# -- estimates and times ---------------------------------------------------------------------


def test_any_positive_rate_is_a_rate_and_a_refusal_says_what_it_got(db_path):
    with RecordingIndex(db_path) as index:
        index.add([Recording(name=NOV27_A, talk_s=10)])
        index.set_estimate_rate(0.5)                     # half a byte a second is still positive
        assert index.get(NOV27_A).size_bytes == 44 + 5
        for bad in (0, -3, float("nan")):
            with pytest.raises(ValueError) as caught:
                index.set_estimate_rate(bad)
            assert "positive" in str(caught.value) and repr(bad) in str(caught.value)
        assert index.get(NOV27_A).size_bytes == 44 + 5


def test_a_files_time_keeps_its_seconds_in_the_pbx_zone(db_path):
    name = "20261127101507-1764236100.1-1001-1002-Internal.wav"
    with RecordingIndex(db_path, tz=KOLKATA) as index:
        index.add([Recording(name=name)])
        assert index.get(name).mtime_ns == at(KOLKATA, 2026, 11, 27, 10, 15, 7)


class _BrokenZone(dt.tzinfo):
    """A zone whose offset no datetime accepts (more than a day)."""

    def utcoffset(self, when):
        return dt.timedelta(hours=30)

    def dst(self, when):
        return dt.timedelta(0)


def test_a_time_that_cannot_be_converted_shows_as_the_epoch(db_path):
    with RecordingIndex(db_path, tz=_BrokenZone()) as index:
        index.add([Recording(name=NOV27_A)])
        assert index.lookup("/2026").mtime_ns == 0
        assert index.get(NOV27_A).mtime_ns == 0
