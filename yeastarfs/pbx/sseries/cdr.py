"""CdrCatalogue: which recordings an S-Series PBX holds, read from its CDR CSV.

The S-Series API has no "list recordings" call (yeastar-api.md §6): the CDR is the only
complete source (NewCdr events, ``events.py``, are the fast one). This module turns the
discovery loop's requests (backfill, poll; a resync is a backfill) into CDR time windows
and asks ``client.PbxClient.fetch_cdr`` for them; `discovery.Discovery` schedules it.

Windows are in the PBX's own time. CDR times are naive wall times of the PBX's clock in its
zone (§5.3), so they are decided from what the PBX says: the start times its CDR shows, and
its clock as its ``Date`` headers tell it (`clock.PbxClock`); this machine's clock enters
only through that skew, and its zone not at all.

- **Every window ends** at the PBX clock's UTC time + 14 h + ``MARGIN_S``: later than its
  wall time can be in any zone, so a row written just now is always inside. Rows in the
  future cost nothing: there are none (and a garbage one is ignored, below).
- **"Now" on the PBX** lies between its UTC time - 12 h and + 14 h, or at its wall time when
  ``--pbx-timezone`` says which zone it is in (a *detected* zone only names file times: a
  forged event must not be able to narrow a window).
- **Backfill and resync** start ``since_s`` before the earliest that now can be, and walk
  to the end in one-day slices (bounded memory however busy the PBX).
- **A poll** starts ``POLL_LOOKBACK_S`` before its *anchor*: the ``ANCHOR_RANK``-th newest
  call start the CDR has shown, counting only starts the PBX's clock allows (not after the
  latest its wall time can be now). A call's row appears when it *ends* but carries its
  *start*, so the lookback is the longest call a poll finds; the ranking means one or two
  garbage rows (dated 2099, or tomorrow) cannot move the anchor. Before any row is known, a
  poll starts the lookback before the earliest that now can be (the ±14 h widening); with a
  configured zone, never after its wall time minus the lookback (a clock set back). A poll
  never starts after the start of the last poll that succeeded: the first poll that
  succeeds after failures covers everything since the last good one. A jump of the PBX's
  clock (`PbxClock.jumps`) forgets the anchor.
- Calls longer than the lookback that no event announced, and rows the PBX exports late,
  are found by the next resync (`discovery`'s resync interval, or SIGHUP).

Zone detection: a row that a poll finds, that the previous poll (at most ``FRESH_GAP_S``
earlier, with a window reaching back to the row's start) did not have, ended between the
two: it is one vote for the zone (`PbxClock.note_call_end`, at the midpoint).

Threading: `backfill` and `poll` are called from the discovery thread only; `status` may
be called from any thread (it reads a dict that is replaced, never changed in place).
"""

from __future__ import annotations

import datetime as dt
import heapq
import logging
import re
import time
from typing import Iterator, Optional

from yeastarfs.models import Recording
from yeastarfs.pbx.clock import CALL_TIME_FORMAT, ZONE_MAX_S, ZONE_MIN_S, PbxClock

log = logging.getLogger(__name__)

# The longest call a poll finds by itself; longer ones wait for the resync (or an event).
POLL_LOOKBACK_S = 3 * 3600
# Slack on every reading of the PBX's clock: the Date header is truncated to the second,
# read mid-request, and the clock drifts between readings.
MARGIN_S = 600
# The anchor is the start of the ANCHOR_RANK-th newest call (see the module docstring).
ANCHOR_RANK = 3
BACKFILL_SLICE = dt.timedelta(days=1)
# Two polls further apart than this say too little about when a row appeared.
FRESH_GAP_S = 600.0
_CALL_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


class CdrCatalogue:
    """The S-Series catalogue (`pbx.Catalogue`): CDR windows in the PBX's own time.

    Attributes:
        stats: "bad_rows" (malformed CDR rows skipped so far).

    Multithreading: see the module docstring.
    """

    def __init__(self, client, clock: Optional[PbxClock] = None) -> None:
        self._client = client
        self._clock = clock if clock is not None else client.clock
        self._anchors: list[tuple[str, str]] = []  # the newest (timestart, name), newest first
        self._jumps_seen = self._clock.jumps
        self._last_good_start: Optional[dt.datetime] = None  # the rule's start of the last good poll
        self._last_poll: Optional[tuple[float, str, frozenset]] = None  # (time.time(), start, names)
        self.stats = {"bad_rows": 0}
        self._shown: dict = {"cdr_anchor": None, "cdr_last_window": None}

    def backfill(self, since_s: float) -> Iterator[list[Recording]]:
        """One batch per day from *since_s* before the PBX's now to the end. Raises PbxError."""
        self._forget_after_jump()
        low, high, end = self._bounds()
        start = low - dt.timedelta(seconds=since_s)
        while start < end:
            slice_end = min(end, start + BACKFILL_SLICE)
            yield self._fetch(start, slice_end, high)
            start = slice_end + dt.timedelta(seconds=1)  # the PBX's window is inclusive

    def poll(self) -> list[Recording]:
        """The recordings of the window after the anchor (see the module docstring). Raises PbxError."""
        self._forget_after_jump()
        low, high, end = self._bounds()
        lookback = dt.timedelta(seconds=POLL_LOOKBACK_S)
        self._anchors = [entry for entry in self._anchors if entry[0] <= _text(high)]
        anchor = _parse(self._anchors[-1][0]) if self._anchors else None
        if anchor is None:
            rule_start = low - lookback
        elif self._clock.zone()[1] == "configured":
            rule_start = min(anchor, low) - lookback
        else:
            rule_start = anchor - lookback
        start = rule_start if self._last_good_start is None else min(rule_start, self._last_good_start)
        polled_s = time.time()
        recordings = self._fetch(start, end, high)
        self._last_good_start = rule_start
        self._vote_for_fresh(recordings, polled_s, _text(start))
        return recordings

    def status(self) -> dict:
        return {"cdr_bad_rows": self.stats["bad_rows"], **self._shown}

    # -- windows ---------------------------------------------------------------------------------

    def _bounds(self) -> tuple[dt.datetime, dt.datetime, dt.datetime]:
        """(earliest, latest) the PBX's wall time can be now, and where windows end."""
        margin = dt.timedelta(seconds=MARGIN_S)
        utc = self._clock.utc_now()
        end = utc + dt.timedelta(seconds=ZONE_MAX_S) + margin
        if self._clock.zone()[1] == "configured":
            wall = self._clock.wall_now()
            return wall - margin, wall + margin, end
        return utc + dt.timedelta(seconds=ZONE_MIN_S) - margin, end, end

    def _forget_after_jump(self) -> None:
        jumps = self._clock.jumps
        if jumps != self._jumps_seen:
            log.info("cdr: the PBX's clock was set; polls widen until its CDR shows new calls")
            self._jumps_seen = jumps
            self._anchors, self._last_poll = [], None

    def _fetch(self, start: dt.datetime, end: dt.datetime, high: dt.datetime) -> list[Recording]:
        result = self._client.fetch_cdr(start, end)
        if result.bad_rows:
            self.stats["bad_rows"] += result.bad_rows
            log.warning("cdr: skipped %d malformed rows of %d between %s and %s",
                        result.bad_rows, result.rows, start, end)
        self._note_starts(result.recordings, _text(high))
        self._shown = {"cdr_anchor": self._anchors[-1][0] if self._anchors else None,
                       "cdr_last_window": [_text(start), _text(end)]}
        return result.recordings

    def _note_starts(self, recordings: list[Recording], latest: str) -> None:
        """Keep the ANCHOR_RANK newest plausible starts (distinct recordings). The text form
        sorts like the time it spells, so only the few kept are parsed."""
        candidates = {name: start for start, name in self._anchors if start <= latest}
        for recording in recordings:
            start = recording.timestart
            if start <= latest and _CALL_TIME.fullmatch(start) and start > candidates.get(recording.name, ""):
                candidates[recording.name] = start
        # A few more than needed: a start shaped like a time may still not be one (month 13).
        newest = heapq.nlargest(4 * ANCHOR_RANK, ((start, name) for name, start in candidates.items()))
        self._anchors = [entry for entry in newest if _parse(entry[0]) is not None][:ANCHOR_RANK]

    def _vote_for_fresh(self, recordings: list[Recording], polled_s: float, start: str) -> None:
        """Rows this poll found that the previous one would have found had they existed: each
        is one vote for the PBX's zone (see the module docstring)."""
        previous, self._last_poll = self._last_poll, (polled_s, start, frozenset(r.name for r in recordings))
        if previous is None or polled_s - previous[0] > FRESH_GAP_S:
            return
        then_s, then_start, then_names = previous
        for recording in recordings:
            if recording.name not in then_names and recording.timestart >= then_start:
                self._clock.note_call_end(recording.timestart, recording.call_s, (then_s + polled_s) / 2)


def _text(moment: dt.datetime) -> str:
    return moment.strftime(CALL_TIME_FORMAT)


def _parse(text: str) -> Optional[dt.datetime]:
    try:
        return dt.datetime.strptime(text, CALL_TIME_FORMAT)
    except ValueError:
        return None
