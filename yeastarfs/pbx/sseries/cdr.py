"""CdrCatalogue: which recordings an S-Series PBX holds, read from its CDR CSV.

The S-Series API has no "list recordings" call (yeastar-api.md §6): the CDR is the only
complete source (NewCdr events, ``events.py``, are the fast one). This module turns the
discovery loop's requests (backfill, poll) into CDR time windows and asks
``client.PbxClient.fetch_cdr`` for them; `discovery.Discovery` schedules it.

Windows: the backfill walks ``since_s`` in one-day slices (bounded memory however busy the
PBX). A poll asks for the last ``POLL_LOOKBACK_S``, because a call's row appears when the
call *ends* but carries its *start* time: a poll of only the last interval would miss
every call longer than the interval.

Threading: called from the discovery thread only; ``stats`` may be read from any thread.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Callable, Iterator

from yeastarfs.models import Recording

log = logging.getLogger(__name__)

# Calls longer than this that no event announced are found by the next resync.
POLL_LOOKBACK_S = 3 * 3600
# The PBX's clock may run ahead of ours; ask a little into the future.
CLOCK_SKEW_S = 300
BACKFILL_SLICE = dt.timedelta(days=1)


class CdrCatalogue:
    """The S-Series catalogue (`pbx.Catalogue`): CDR windows in the PBX's local time.

    Attributes:
        stats: "bad_rows" (malformed CDR rows skipped so far).
    """

    def __init__(self, client, *, now: Callable[[], dt.datetime] = dt.datetime.now) -> None:
        self._client = client
        self._now = now
        self.stats = {"bad_rows": 0}

    def backfill(self, since_s: float) -> Iterator[list[Recording]]:
        """One batch per day of the last *since_s* seconds. Raises PbxError."""
        end = self._now() + dt.timedelta(seconds=CLOCK_SKEW_S)
        start = end - dt.timedelta(seconds=since_s + CLOCK_SKEW_S)
        while start < end:
            slice_end = min(end, start + BACKFILL_SLICE)
            yield self._fetch(start, slice_end)
            start = slice_end + dt.timedelta(seconds=1)  # the PBX's window is inclusive

    def poll(self) -> list[Recording]:
        """The recordings of the recent window. Raises PbxError."""
        end = self._now() + dt.timedelta(seconds=CLOCK_SKEW_S)
        start = end - dt.timedelta(seconds=POLL_LOOKBACK_S + CLOCK_SKEW_S)
        return self._fetch(start, end)

    def status(self) -> dict:
        return {"cdr_bad_rows": self.stats["bad_rows"]}

    def _fetch(self, start: dt.datetime, end: dt.datetime) -> list[Recording]:
        result = self._client.fetch_cdr(start, end)
        if result.bad_rows:
            self.stats["bad_rows"] += result.bad_rows
            log.warning("cdr: skipped %d malformed rows of %d between %s and %s",
                        result.bad_rows, result.rows, start, end)
        return result.recordings
