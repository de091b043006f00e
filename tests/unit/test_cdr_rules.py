"""CdrCatalogue's rules that test_cdr.py leaves open, against the real simulator: the anchor
with a configured zone (never later than the PBX's "now"), the latest plausible start to the
second, a recording listed twice, how far the anchor search looks past starts that are not
times, backfill slices, a clock jump forgotten once, and which rows vote for the zone.

Most tests give the catalogue a PBX clock stopped at one instant (`FrozenClock`, the real
PbxClock with its "now" fixed), so every window and bound is exact to the second. What a
window was is read from the simulator's request log, as in test_cdr.py.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import types
import zoneinfo

import pytest

from harness import factory, new_simulator
from test_cdr import at, csv_body, windows
from yeastarfs.pbx.clock import PbxClock
from yeastarfs.pbx.sseries import cdr as cdr_module
from yeastarfs.pbx.sseries.cdr import CdrCatalogue

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
# The documented rules (README, cdr.py's docstring), written here rather than imported.
POLL_LOOKBACK_S = 3 * 3600
MARGIN_S = 600
KOLKATA = zoneinfo.ZoneInfo("Asia/Kolkata")
HOUR = dt.timedelta(hours=1)
MINUTE = dt.timedelta(minutes=1)
# The frozen instant: 06:30 UTC is 12:00 in Kolkata.
FROZEN_UTC = dt.datetime(2026, 11, 30, 6, 30, 0)
WALL = dt.datetime(2026, 11, 30, 12, 0, 0)


class FrozenClock(PbxClock):
    """A PbxClock whose present is *utc* (naive UTC) for ever: bounds exact to the second."""

    def __init__(self, zone_name, utc):
        super().__init__(zone_name)
        self.frozen_utc = utc

    def utc_now(self):
        return self.frozen_utc


@pytest.fixture
def make_sim():
    yield from factory(lambda **options: new_simulator(**options).start())


@pytest.fixture
def sim(make_sim):
    return make_sim()


@pytest.fixture
def frozen_catalogue(make_client):
    """``frozen_catalogue(sim, zone=None)``: a catalogue whose PBX clock is stopped at
    FROZEN_UTC (its client keeps a clock of its own)."""
    def build(sim, zone=None):
        return CdrCatalogue(make_client(sim), FrozenClock(zone, FROZEN_UTC))

    return build


def text(moment):
    return moment.strftime(TIME_FORMAT)


def row_at(sim, wall, **kwargs):
    """The CDR row of a call that started at *wall*, not added to the simulator's own CDR."""
    return at(sim, wall, in_cdr=False, **kwargs).cdr_row()


def cdr_messages(caplog, words):
    return [r.getMessage() for r in caplog.records if r.name == "yeastarfs.pbx.sseries.cdr" and words in r.getMessage()]


# -- a configured zone ---------------------------------------------------------------------


def test_with_a_configured_zone_calls_of_the_last_minutes_anchor_and_the_poll_starts_before_now(
        sim, frozen_catalogue):
    """Calls that started minutes ago are plausible starts (up to ten minutes past the PBX's
    wall time); the poll starts the lookback before the earlier of the anchor and the PBX's
    "now" minus the margin, never after it."""
    for minutes in (5, 4, 3):
        at(sim, WALL - minutes * MINUTE)
    at(sim, WALL - HOUR)
    catalogue = frozen_catalogue(sim, "Asia/Kolkata")
    list(catalogue.backfill(3600))
    assert catalogue.status()["cdr_anchor"] == text(WALL - 5 * MINUTE)
    sim.reset()
    catalogue.poll()
    low = WALL - dt.timedelta(seconds=MARGIN_S)
    end = FROZEN_UTC + dt.timedelta(hours=14, seconds=MARGIN_S)
    assert windows(sim) == [(low - dt.timedelta(seconds=POLL_LOOKBACK_S), end)]


def test_a_catalogue_follows_the_clock_it_is_given(sim, frozen_catalogue):
    """The clock passed to the catalogue decides its windows, not its client's clock."""
    catalogue = frozen_catalogue(sim, "Asia/Kolkata")
    catalogue.poll()
    assert windows(sim) == [(WALL - dt.timedelta(seconds=MARGIN_S + POLL_LOOKBACK_S),
                             FROZEN_UTC + dt.timedelta(hours=14, seconds=MARGIN_S))]


def test_a_start_ten_minutes_past_the_wall_time_is_plausible_and_kept(sim, frozen_catalogue):
    """The latest plausible start is the PBX's wall time plus the margin, that second
    included: a call dated then ranks among the anchors, one second later does not; and an
    anchor stays one when its row is gone from the next reply."""
    edge = at(sim, WALL + dt.timedelta(seconds=MARGIN_S))
    at(sim, WALL + dt.timedelta(seconds=MARGIN_S + 1))
    for minutes in (10, 20, 30):
        at(sim, WALL - minutes * MINUTE)
    catalogue = frozen_catalogue(sim, "Asia/Kolkata")
    catalogue.poll()
    assert catalogue.status()["cdr_anchor"] == text(WALL - 20 * MINUTE)  # edge, -10, -20
    sim.delete_recording(edge.name, keep_cdr=False)
    catalogue.poll()
    assert catalogue.status()["cdr_anchor"] == text(WALL - 20 * MINUTE)


# -- what ranks ----------------------------------------------------------------------------


def test_a_recording_listed_twice_ranks_by_its_newest_start(sim, frozen_catalogue):
    rows = [row_at(sim, WALL - hours * HOUR) for hours in (1, 2, 3, 4)]
    again = dict(rows[2], timestart=text(WALL - 5 * HOUR), callid="9.9")  # the third, listed again earlier
    sim.cdr_raw_body = csv_body(rows + [again])
    catalogue = frozen_catalogue(sim)
    catalogue.poll()
    assert catalogue.status()["cdr_anchor"] == text(WALL - 3 * HOUR)


@pytest.mark.parametrize("garbage, anchor", [(9, WALL - 4 * HOUR), (12, None)])
def test_the_anchor_search_looks_past_at_most_twelve_starts_that_are_not_times(
        sim, frozen_catalogue, garbage, anchor):
    """Starts shaped like times that are none (minute 99) and newer than every real one:
    nine still leave the three real starts to rank; past twelve the search stops (a bounded
    cost), there is no anchor, and polls keep the widest window."""
    real = [row_at(sim, WALL - hours * HOUR) for hours in (2, 3, 4)]
    fake = [dict(real[0], timestart=f"{WALL:%Y-%m-%d} 11:99:{n:02d}", callid=f"8.{n}",
                 recording=f"{WALL:%Y%m%d}115900-8.{n}-1-2-Inbound.wav") for n in range(garbage)]
    sim.cdr_raw_body = csv_body(real + fake)
    catalogue = frozen_catalogue(sim)
    catalogue.poll()
    assert catalogue.status()["cdr_anchor"] == (None if anchor is None else text(anchor))


# -- backfill --------------------------------------------------------------------------------


def test_backfill_slices_are_contiguous_days_with_no_empty_one_at_the_end(sim, frozen_catalogue):
    """Each slice starts one second after the last one ended (windows are inclusive); here
    the span is two days and two seconds, so two slices reach the end and no third
    one-second window is asked."""
    catalogue = frozen_catalogue(sim)
    low = FROZEN_UTC - dt.timedelta(hours=12, seconds=MARGIN_S)
    end = FROZEN_UTC + dt.timedelta(hours=14, seconds=MARGIN_S)
    since_s = (2 * 86400 + 2) - int((end - low).total_seconds())
    list(catalogue.backfill(since_s))
    start = low - dt.timedelta(seconds=since_s)
    day, second = dt.timedelta(days=1), dt.timedelta(seconds=1)
    assert windows(sim) == [(start, start + day), (start + day + second, start + 2 * day + second)]


# -- a clock jump ----------------------------------------------------------------------------


def test_a_clock_jump_forgets_the_anchor_once(make_sim, make_client, caplog):
    """After the PBX's clock is set, the next poll is wide and learns the anchor again; the
    polls after it start from that anchor, and the jump is told once."""
    sim = make_sim(tz=KOLKATA)
    now = sim.now_local()
    starts = [at(sim, now - hours * HOUR).timestart for hours in (3, 2, 1)]
    client = make_client(sim)
    catalogue = CdrCatalogue(client)
    with caplog.at_level(logging.INFO, logger="yeastarfs.pbx.sseries.cdr"):
        list(catalogue.backfill(86400))
        assert cdr_messages(caplog, "clock was set") == []
        sim.clock_offset_s = 3600
        for _ in range(3):
            client.heartbeat()
        assert client.clock.jumps == 1
        for _ in range(3):
            catalogue.poll()
    assert len(cdr_messages(caplog, "clock was set")) == 1
    last_start = windows(sim)[-1][0]
    assert last_start == dt.datetime.strptime(starts[0], TIME_FORMAT) - dt.timedelta(seconds=POLL_LOOKBACK_S)


# -- which rows vote for the zone ------------------------------------------------------------


def test_rows_a_poll_had_already_do_not_vote(make_sim, make_client):
    sim = make_sim(tz=KOLKATA)
    at(sim, sim.now_local() - HOUR)
    catalogue = CdrCatalogue(make_client(sim))
    catalogue.poll()
    catalogue.poll()
    assert catalogue._clock.zone()[1] == "assumed"


def test_a_new_row_dated_the_previous_polls_first_second_votes(make_sim, make_client):
    """A row that appears between two polls with its start at the very first second of the
    previous poll's window was inside that window: it ended in between, and votes."""
    sim = make_sim(tz=KOLKATA)
    catalogue = CdrCatalogue(make_client(sim))
    catalogue.poll()
    [(start, _)] = windows(sim)
    call_s = int((sim.now_local() - start).total_seconds())  # it ends now on the PBX
    sim.add_recording(start=start, duration_s=call_s, ring_s=0, announce=False)
    catalogue.poll()
    zone, source = catalogue._clock.zone()
    assert source == "detected" and zone.utcoffset(None) == dt.timedelta(hours=5, minutes=30)


def test_polls_exactly_ten_minutes_apart_still_vote(make_sim, make_client, monkeypatch):
    """Two polls further apart than ten minutes say too little about when a row appeared;
    ten minutes to the tick is not further apart."""
    sim = make_sim(tz=KOLKATA)
    catalogue = CdrCatalogue(make_client(sim))
    now_s = float(int(time.time()))
    moments = iter([now_s - 600.0, now_s])
    monkeypatch.setattr(cdr_module, "time", types.SimpleNamespace(time=lambda: next(moments)))
    catalogue.poll()
    sim.add_recording(duration_s=20, ring_s=2, announce=False)  # ends now
    catalogue.poll()
    zone, source = catalogue._clock.zone()
    assert source == "detected" and zone.utcoffset(None) == dt.timedelta(hours=5, minutes=30)
