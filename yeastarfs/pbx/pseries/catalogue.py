"""SearchCatalogue: which recordings a P-Series PBX holds, read from its recording list.

The P-Series has a real list endpoint (yeastar-p-series-api.md, "Catalogue"): every
backfill, poll and resync pages through ``recording/search`` by a window of Unix seconds
(``start_time``, ``end_time``, both ends inclusive), sorted by time, oldest first, so that
rows the PBX adds while we page land after the page being read. Each row carries the
recording's exact size: the index shows true sizes before any download.

Windows are Unix seconds *on the PBX's clock* (our clock plus the skew its ``Date`` headers
show, `clock.PbxClock`): no zone enters them. The PBX's zone still names file times (the
names lead with a local wall time), and its display format decides how the rows' ``time``
reads: both come from ``system/information`` (its local time beside its Unix time gives
the zone's offset; `PbxClock.note_offset`), read at every backfill and resync.

- **Backfill and resync** cover ``since_s`` before the PBX's now (with ``MARGIN_S`` of
  slack) to no end at all, in one-day windows, one batch per page of ``PAGE_SIZE`` rows
  (bounded memory however busy the PBX).
- **A poll** covers ``POLL_LOOKBACK_S`` before the PBX's now to no end: a recording is
  listed once its call has ended but carries the time it began, so the lookback is the
  longest call a poll finds by itself (events announce the others at once; a resync finds
  anything else). A poll never starts after the start of the last poll that succeeded, so
  the first poll that succeeds after failures covers everything since the last good one.

Rows are read by `records.recording_from_row`; a row without a usable ``file`` is counted
(``bad_rows``) and skipped, and a name that is not safe is refused by the index.

Threading: `backfill` and `poll` are called from the discovery thread only; `status` may be
called from any thread (it reads a dict that is replaced, never changed in place).
"""

from __future__ import annotations

import calendar
import datetime as dt
import logging
from typing import Iterator, Optional

from yeastarfs import errors
from yeastarfs.models import Recording
from yeastarfs.pbx.clock import PbxClock
from yeastarfs.pbx.pseries.client import PSeriesClient
from yeastarfs.pbx.pseries.records import DisplayTimes, display_pattern, recording_from_row

log = logging.getLogger(__name__)

PAGE_SIZE = 1000
POLL_LOOKBACK_S = 3 * 3600
# Slack on every reading of the PBX's clock (Date headers are truncated to the second).
MARGIN_S = 600
WINDOW_S = 86400
# A window of more pages than this (10 million recordings in a day) is cut short: a PBX
# that keeps saying "more" must not keep discovery paging for ever.
MAX_PAGES = 10_000


class SearchCatalogue:
    """The P-Series catalogue (`pbx.Catalogue`): ``recording/search`` in windows of Unix seconds.

    Attributes:
        stats: "bad_rows" (rows skipped so far).
        times: the PBX's display format, shared with the event format.

    Multithreading: see the module docstring.
    """

    def __init__(self, client: PSeriesClient, clock: PbxClock, times: DisplayTimes) -> None:
        self._client = client
        self._clock = clock
        self.times = times
        self._last_good_start: Optional[int] = None
        self.stats = {"bad_rows": 0}
        self._shown: dict = {"catalogue_last_window": None, "pbx_display_format": None}

    def backfill(self, since_s: float) -> Iterator[list[Recording]]:
        """One batch per page, window after window, from *since_s* before the PBX's now. Raises PbxError."""
        self.read_system_information()
        now = self._pbx_now()
        start = now - int(since_s) - MARGIN_S
        while True:
            end = start + WINDOW_S - 1
            last = end >= now + MARGIN_S
            yield from self._pages(start, None if last else end)
            if last:
                return
            start = end + 1

    def poll(self) -> list[Recording]:
        """The recordings listed from the lookback before the PBX's now. Raises PbxError."""
        rule_start = self._pbx_now() - POLL_LOOKBACK_S - MARGIN_S
        start = rule_start if self._last_good_start is None else min(rule_start, self._last_good_start)
        found = [recording for batch in self._pages(start, None) for recording in batch]
        self._last_good_start = rule_start
        return found

    def status(self) -> dict:
        return {"catalogue_bad_rows": self.stats["bad_rows"], **self._shown}

    def read_system_information(self) -> None:
        """Learn the PBX's display format and zone offset; a failure is only logged (file
        times then keep the zone known so far, and row times fall back to the names')."""
        try:
            data = self._client.system_information()
        except errors.PbxError as exc:
            log.warning("pbx: system/information failed (%s); keeping the zone and time format known so far", exc)
            return
        pattern = display_pattern(data.get("system_date_format"), data.get("system_time_format"))
        if pattern is None:
            log.warning("pbx: unknown time display format %r %r; call times are read from recording names",
                        data.get("system_date_format"), data.get("system_time_format"))
        else:
            self.times.learn(pattern)
            self._shown = {**self._shown, "pbx_display_format": pattern}
        local = self.times.parse(data.get("system_time")) if pattern is not None else None
        stamp = data.get("timestamp")
        if local is not None and isinstance(stamp, int) and not isinstance(stamp, bool):
            utc = dt.datetime.fromtimestamp(stamp, dt.timezone.utc).replace(tzinfo=None)
            self._clock.note_offset((local - utc).total_seconds())

    # -- pages -------------------------------------------------------------------------------------

    def _pbx_now(self) -> int:
        """Unix seconds on the PBX's clock now."""
        return calendar.timegm(self._clock.utc_now().timetuple())

    def _pages(self, start: int, end: Optional[int]) -> Iterator[list[Recording]]:
        params = {"start_time": max(0, start), "page_size": PAGE_SIZE, "sort_by": "time", "order_by": "asc"}
        if end is not None:
            params["end_time"] = end
        self._shown = {**self._shown, "catalogue_last_window": [_iso(start), None if end is None else _iso(end)]}
        for page in range(1, MAX_PAGES + 1):
            reply = self._client.search({**params, "page": page})
            rows, total = reply.get("data"), reply.get("total_number")
            if not isinstance(rows, list):
                raise errors.PbxUnavailableError("recording/search answered without a data list")
            batch = [recording for recording in (recording_from_row(row, self.times) for row in rows) if recording]
            if len(batch) < len(rows):
                self.stats["bad_rows"] += len(rows) - len(batch)
                log.warning("pbx: skipped %d recording/search rows without a usable file name", len(rows) - len(batch))
            yield batch
            counted = isinstance(total, int) and not isinstance(total, bool)
            if len(rows) < PAGE_SIZE or (counted and page * PAGE_SIZE >= total):
                return
        log.warning("pbx: recording/search still said 'more' after %d pages; the rest waits for the next pass",
                    MAX_PAGES)


def _iso(epoch_s: int) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
