"""PbxClock's rules that the CDR and API tests leave open: the PBX's UTC and wall time in a
machine whose own zone is not UTC, the zone a PBX states (`note_offset`), when the listener
is told, what the log says about where a zone came from, and ``status`` for a machine whose
zone has no name.

Every test that depends on this machine's zone sets it itself (``TZ`` and ``time.tzset``,
undone afterwards), so the results do not depend on where the suite runs.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import os
import time
import zoneinfo

import pytest

from yeastarfs.pbx.clock import PbxClock, describe_skew, local_zone

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
KOLKATA = zoneinfo.ZoneInfo("Asia/Kolkata")


@pytest.fixture
def machine_zone(monkeypatch):
    """``machine_zone("America/Bogota")``: this machine's zone for the rest of the test."""
    def set_zone(name):
        monkeypatch.setenv("TZ", name)
        time.tzset()

    yield set_zone
    monkeypatch.undo()
    time.tzset()


def utc_now():
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def call_ending_now(clock, offset_s, call_s=60):
    """A call that ended now on a PBX *offset_s* ahead of UTC: one vote for that zone."""
    reported_s = time.time()
    start = dt.datetime.fromtimestamp(reported_s + offset_s - call_s, dt.timezone.utc).replace(tzinfo=None)
    clock.note_call_end(start.strftime(TIME_FORMAT), call_s, reported_s)


def zone_messages(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "yeastarfs.pbx.clock" and "time zone is" in r.getMessage()]


# -- the PBX's time, whatever this machine's zone -------------------------------------------


def test_without_a_date_header_the_pbx_utc_time_is_ours_exactly(machine_zone):
    """No skew known: the PBX's UTC time is this machine's UTC time (not a second off, and
    not this machine's local time, here five hours behind UTC)."""
    machine_zone("America/Bogota")
    clock = PbxClock()
    assert clock.skew_s is None
    before = utc_now()
    seen = clock.utc_now()
    after = utc_now()
    assert seen.tzinfo is None
    assert before <= seen <= after


def test_the_skew_moves_the_pbx_utc_time_and_is_shown_to_a_tenth(machine_zone):
    machine_zone("Asia/Tokyo")
    clock = PbxClock()
    now_s = time.time()
    stamp_s = int(now_s) + 12  # the PBX's Date header: 12 s ahead, truncated to the second
    header = dt.datetime.fromtimestamp(stamp_s, dt.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S GMT")
    sent_s = received_s = stamp_s - 12.34  # the sample is the header's second + 0.5 - the midpoint
    clock.note_date(header, sent_s, received_s)
    assert clock.skew_s == pytest.approx(12.84)
    assert clock.status()["pbx_clock_skew_s"] == 12.8
    before = utc_now() + dt.timedelta(seconds=12.84)
    seen = clock.utc_now()
    after = utc_now() + dt.timedelta(seconds=12.84)
    assert before <= seen <= after


def test_the_wall_time_of_a_configured_zone_ignores_this_machines_zone(machine_zone):
    machine_zone("America/Bogota")
    clock = PbxClock("Asia/Kolkata")
    before = dt.datetime.now(KOLKATA).replace(tzinfo=None)
    wall = clock.wall_now()
    after = dt.datetime.now(KOLKATA).replace(tzinfo=None)
    assert before <= wall <= after


def test_an_assumed_zone_gives_no_wall_time(machine_zone):
    """The PBX's wall time is not guessed from this machine's zone: None until the zone is
    configured, detected or stated."""
    machine_zone("Asia/Kolkata")
    clock = PbxClock()
    assert clock.zone() == (KOLKATA, "assumed")
    assert clock.wall_now() is None
    clock.note_offset(-5 * 3600)
    wall = clock.wall_now()
    expected = utc_now() - dt.timedelta(hours=5)
    assert abs(wall - expected) < dt.timedelta(seconds=2)


def test_status_of_a_machine_whose_zone_has_no_name(machine_zone):
    """A ``TZ`` that names no IANA zone (a POSIX rule): the assumed zone is the C library's,
    shown by its offset."""
    machine_zone("XYZ-3")  # POSIX: three hours ahead of UTC
    clock = PbxClock()
    assert clock.zone() == (None, "assumed")
    status = clock.status()
    assert status == {"pbx_timezone": "UTC+03:00", "pbx_timezone_source": "assumed",
                      "pbx_utc_offset_s": 3 * 3600, "pbx_clock_skew_s": None}


# -- a zone the PBX states (note_offset) ----------------------------------------------------


@pytest.mark.parametrize("offset_s, believed", [(-12 * 3600, True), (14 * 3600, True),
                                                (-12 * 3600 - 900, False), (14 * 3600 + 900, False)])
def test_a_stated_offset_from_minus_12_to_plus_14_hours_is_believed(offset_s, believed):
    seen = []
    clock = PbxClock(on_zone=seen.append)
    clock.note_offset(offset_s)
    if believed:
        assert clock.zone() == (dt.timezone(dt.timedelta(seconds=offset_s)), "detected")
        assert seen == [dt.timezone(dt.timedelta(seconds=offset_s))]
    else:
        assert clock.zone()[1] == "assumed" and seen == []


def test_the_listener_hears_a_stated_zone_once_and_each_change(caplog):
    seen = []
    clock = PbxClock(on_zone=seen.append)
    with caplog.at_level(logging.INFO, logger="yeastarfs.pbx.clock"):
        clock.note_offset(19800)
        clock.note_offset(19800 + 100)  # rounds to the same zone step: no change
        assert seen == [dt.timezone(dt.timedelta(hours=5, minutes=30))]
        clock.note_offset(-3 * 3600)
    assert seen == [dt.timezone(dt.timedelta(hours=5, minutes=30)), dt.timezone(dt.timedelta(hours=-3))]
    assert zone_messages(caplog) == ["pbx: the PBX's time zone is UTC+05:30 (as the PBX says)",
                                     "pbx: the PBX's time zone is UTC-03:00 (as the PBX says)"]


def test_a_stated_zone_that_disagrees_with_the_configured_one_is_warned_of(caplog):
    """--pbx-timezone wins over what the PBX says, and the log says so (once)."""
    clock = PbxClock("Asia/Kolkata")
    with caplog.at_level(logging.WARNING, logger="yeastarfs.pbx.clock"):
        clock.note_offset(0)
        clock.note_offset(0)
    warnings = [r.getMessage() for r in caplog.records if "disagrees" in r.getMessage()]
    assert len(warnings) == 1 and "Asia/Kolkata" in warnings[0] and "(UTC+00:00)" in warnings[0]
    assert clock.zone() == (KOLKATA, "configured")


# -- a zone detected from call times ---------------------------------------------------------


def test_votes_for_the_same_zone_tell_the_listener_once_and_say_how(caplog):
    seen = []
    clock = PbxClock(on_zone=seen.append)
    with caplog.at_level(logging.INFO, logger="yeastarfs.pbx.clock"):
        for _ in range(3):
            call_ending_now(clock, 19800)
    assert seen == [dt.timezone(dt.timedelta(hours=5, minutes=30))]
    assert zone_messages(caplog) == ["pbx: the PBX's time zone is UTC+05:30 (detected from its call times)"]


def test_call_times_do_not_tell_the_listener_while_the_pbx_states_its_zone(caplog):
    """A stated zone wins: votes for another zone change neither the zone nor the listener."""
    seen = []
    clock = PbxClock(on_zone=seen.append)
    clock.note_offset(3600)
    for _ in range(3):
        call_ending_now(clock, -7 * 3600)
    assert seen == [dt.timezone(dt.timedelta(hours=1))]
    assert clock.zone() == (dt.timezone(dt.timedelta(hours=1)), "detected")


# -- the skew from Date headers (note_date) -------------------------------------------------

BASE_S = 1_790_000_000  # a whole second in 2026


def note_skew(clock, skew_s, at_s=BASE_S):
    """A reply whose Date header says the PBX runs *skew_s* (whole) ahead: the header's
    second plus half a second, minus the request's midpoint, is exactly *skew_s*."""
    header = email.utils.formatdate(at_s + skew_s, usegmt=True)
    clock.note_date(header, at_s, at_s + 1.0)  # answered within a second: midpoint at_s + 0.5


def skew_messages(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "yeastarfs.pbx.clock" and "clock is" in r.getMessage()]


def test_the_skew_is_the_median_of_the_last_five_headers():
    clock = PbxClock()
    assert clock.jumps == 0
    for _ in range(5):
        note_skew(clock, 0)
    for _ in range(5):
        note_skew(clock, 100)
    assert clock.skew_s == 100
    assert clock.jumps == 0


def test_the_skew_is_logged_when_first_known_and_after_each_jump(caplog):
    clock = PbxClock()
    with caplog.at_level(logging.INFO, logger="yeastarfs.pbx.clock"):
        for _ in range(3):
            note_skew(clock, 200)  # after the first, steady: neither a jump nor news
        assert clock.jumps == 0
        assert skew_messages(caplog) == ["pbx: the PBX's clock is 200 s ahead of ours"]
        for _ in range(3):
            note_skew(clock, -1000)
        assert clock.jumps == 1  # the third moved the median from 200 to -1000
        for _ in range(3):
            note_skew(clock, 5000)
        assert clock.jumps == 2
    assert skew_messages(caplog) == ["pbx: the PBX's clock is 200 s ahead of ours",
                                     "pbx: the PBX's clock is 1000 s behind ours",
                                     "pbx: the PBX's clock is 5000 s ahead of ours"]


@pytest.mark.parametrize("moved_s, jumps", [(300, 0), (301, 1)])
def test_a_skew_that_moves_by_more_than_five_minutes_is_a_jump(moved_s, jumps):
    clock = PbxClock()
    for _ in range(3):
        note_skew(clock, 0)
    for _ in range(3):  # the third makes it the median of the last five
        note_skew(clock, moved_s)
    assert clock.skew_s == moved_s
    assert clock.jumps == jumps


@pytest.mark.parametrize("header", [None, "", "not a date", "Mon, 99 Foo 2026 99:99:99 GMT"])
def test_a_missing_or_unreadable_date_header_is_ignored(header):
    clock = PbxClock()
    clock.note_date(header, time.time(), time.time())
    assert clock.skew_s is None
    assert clock.status()["pbx_clock_skew_s"] is None


def test_a_date_a_hundred_years_off_is_still_a_clock_and_one_second_more_is_garbage():
    century_s = 100 * 365 * 86400
    clock = PbxClock()
    note_skew(clock, century_s)
    assert clock.skew_s == century_s
    later = PbxClock()
    note_skew(later, century_s + 1)
    assert later.skew_s is None


@pytest.mark.parametrize("skew_s, words", [(None, "of unknown offset (no Date header)"), (12.4, "12 s ahead of ours"),
                                           (0.0, "0 s ahead of ours"), (0.5, "0 s ahead of ours"),
                                           (-3.0, "3 s behind ours")])
def test_describe_skew(skew_s, words):
    assert describe_skew(skew_s) == words


# -- detected zones: the last twenty votes ---------------------------------------------------


def test_the_detected_zone_is_the_most_common_of_the_last_twenty_calls():
    clock = PbxClock()
    for _ in range(15):
        call_ending_now(clock, 3600)
    for _ in range(12):  # 15 + 12 calls: of the last 20, 12 say UTC+02:00
        call_ending_now(clock, 7200)
    assert clock.zone() == (dt.timezone(dt.timedelta(hours=2)), "detected")


# -- this machine's zone (local_zone) ----------------------------------------------------------


@pytest.mark.parametrize("tz, expected", [(":Asia/Kolkata", "Asia/Kolkata"), ("Asia/Kolkata", "Asia/Kolkata"),
                                          ("XEurope/Paris", None), ("Nowhere/Atlantis", None), ("", None)])
def test_local_zone_names_the_zone_tz_names(monkeypatch, tz, expected):
    """A ``TZ`` (with or without POSIX's leading colon) that names an IANA zone is that zone;
    anything else, or an empty ``TZ``, names none (and /etc/localtime is not consulted)."""
    monkeypatch.setenv("TZ", tz)
    assert local_zone() == (None if expected is None else zoneinfo.ZoneInfo(expected))


def test_without_tz_local_zone_is_the_zone_etc_localtime_links_to(monkeypatch, require):
    target = os.path.realpath("/etc/localtime")
    require("/zoneinfo/" in target, f"/etc/localtime is not a link into a zoneinfo tree here ({target})")
    monkeypatch.delenv("TZ", raising=False)
    time.tzset()
    try:
        zone = local_zone()
        assert zone is not None and target.endswith("/" + zone.key)
        assert dt.datetime.now(zone).utcoffset() == dt.timedelta(seconds=time.localtime().tm_gmtoff)
    finally:
        monkeypatch.undo()
        time.tzset()
