"""Numbers of policy at their exact boundaries, written here, never imported from the code.

The behaviour behind each is tested elsewhere, often with a smaller value passed in (a 10 s
connection deadline cannot be waited for in the unit layer). These tests pin the values the
daemon runs with, at one past and one short of the boundary where a test can tell them apart:
mutation testing (scripts/mutation.py) moves each module-level number by one or by 20 %.
"""

from __future__ import annotations

import datetime as dt
import time

import pytest
from test_core_rules import FIRST, make_core, young_entry  # noqa: F401 - make_core is a fixture

from yeastarfs.models import Recording
from yeastarfs.pbx.clock import PbxClock
from yeastarfs.pbx import events as events_module
from yeastarfs.pbx.events import Counters, EventSink, Throttle
from yeastarfs.pbx.sseries.cdr import CdrCatalogue
from yeastarfs.pbx.sseries.events import NEW_CDR, EventReceiver

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
A_S, B_S = 3600, 7200  # two zones a PBX may be found in: UTC+01:00 and UTC+02:00


# -- the PBX's zone: the most common of the last 20 calls (README "Dates and times") -------------


def vote(clock: PbxClock, offset_s: int, reported_s: float) -> None:
    """A 60 s call that ended at *reported_s* on a PBX *offset_s* ahead of UTC."""
    start = dt.datetime.fromtimestamp(reported_s + offset_s - 60, dt.timezone.utc).replace(tzinfo=None)
    clock.note_call_end(start.strftime(TIME_FORMAT), 60, reported_s)


def detected_after(*runs: tuple[int, int]) -> dt.tzinfo:
    clock = PbxClock()
    now_s = time.time()
    for offset_s, count in runs:
        for _ in range(count):
            vote(clock, offset_s, now_s)
    zone, how = clock.zone()
    assert how == "detected"
    return zone


@pytest.mark.parametrize("runs", [
    ((A_S, 11), (B_S, 10)),            # the last 20: 10 and 10, a tie goes to the newest (21 would say A)
    ((B_S, 1), (A_S, 10), (B_S, 9)),   # all 20: 10 and 10 again (the last 19 would say A)
])
def test_the_zone_is_the_most_common_of_exactly_the_last_20_calls(runs):
    assert detected_after(*runs) == dt.timezone(dt.timedelta(seconds=B_S))


# -- CDR polls vote for the zone only when the previous poll is under 600 s old -------------------


class Votes(PbxClock):
    """A real clock that also remembers each vote it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, float]] = []

    def note_call_end(self, timestart: str, call_s, reported_s: float) -> None:
        self.calls.append((timestart, call_s, reported_s))
        super().note_call_end(timestart, call_s, reported_s)


@pytest.mark.parametrize("gap_s, votes", [(599.0, 1), (600.0, 1), (650.0, 0), (601.0, 0)])
def test_a_row_found_by_a_poll_votes_only_when_the_previous_poll_is_at_most_600_s_old(gap_s, votes):
    clock = Votes()
    catalogue = CdrCatalogue(client=None, clock=clock)
    start = "2026-11-27 09:00:00"
    catalogue._vote_for_fresh([], 1_000_000.0, start)
    fresh = Recording(name="20261127093012-1795000000.1-1001-2002-Inbound.wav", timestart="2026-11-27 09:30:12",
                      call_s=30)
    catalogue._vote_for_fresh([fresh], 1_000_000.0 + gap_s, start)
    assert len(clock.calls) == votes
    if votes:
        assert clock.calls[0] == ("2026-11-27 09:30:12", 30, 1_000_000.0 + gap_s / 2)


# -- the event listener (README "Event listener") ---------------------------------------------------


def test_the_event_listener_runs_with_the_documented_limits():
    receiver = EventReceiver(lambda recording: None, host="127.0.0.1", port=0)
    assert receiver.connection_deadline_s == 10.0   # "within 10 s of being accepted"
    assert receiver.max_handler_threads == 32       # "At most 32 are served at once"
    assert receiver.slow_connection_s == 1.0        # "one still sending after 1 s" yields to anyone


def test_events_waiting_for_the_index_hold_at_most_8_mib():
    sink = EventSink(lambda recording: None, None, Counters(new_cdr=0, duplicates=0, dropped=0),
                     thread_name="test-sink", event_format=NEW_CDR)
    try:
        assert sink._reserve(8 << 20)                # exactly the budget fits
        assert not sink._reserve(1)                  # one byte more does not
        sink._reserve(-(8 << 20))
        assert sink._reserve((8 << 20) - 1) and sink._reserve(1)
    finally:
        sink.stop(timeout_s=1.0)


# -- a recording is young (a "does not exist" is retried) when first seen under a minute ago -------


def test_a_recording_first_seen_55_s_ago_is_still_young(make_core):
    core = make_core()
    assert core._not_found_grace_s(young_entry(core, FIRST, 5, 10, seen_ago_s=55.0)) == 30.0
    assert core._not_found_grace_s(young_entry(core, FIRST, 5, 10, seen_ago_s=65.0)) == 0.0


# -- repeated warnings (refused sources, dropped events): one line a minute -----------------------


def test_a_throttled_warning_is_logged_once_a_minute_with_the_count_held_back(monkeypatch):
    now_s = [1000.0]
    monkeypatch.setattr(events_module.time, "monotonic", lambda: now_s[0])
    throttle = Throttle()

    def ready_after(elapsed_s: float):
        now_s[0] += elapsed_s
        return throttle.ready()

    assert ready_after(0.0) == 0        # the first: nothing held back
    assert ready_after(59.0) is None    # within the minute: held back
    assert ready_after(1.0) == 1        # a minute after the last line: logged, one held back
    assert ready_after(50.0) is None
    assert ready_after(11.0) == 1
