"""CdrSync: learns which recordings exist from the PBX's CDR CSV (backfill, then polling).

The S-Series API has no "list recordings" call (yeastar-api.md §6): the CDR is the only
complete source, and NewCdr events (``events.py``) are the fast one. This module asks
``api.PbxClient.fetch_cdr`` for time windows and hands what it finds to a callback; it does
not import the index.

Windows: the backfill walks ``since`` in one-day slices (bounded memory however busy the
PBX). A poll asks for the last ``POLL_LOOKBACK_S``, because a call's row appears when the
call *ends* but carries its *start* time: a poll of only the last interval would miss
every call longer than the interval.

Threading: one background thread; ``poll_now`` may be called from any thread (SIGHUP).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Callable, Optional

from yeastarfs import errors
from yeastarfs.models import Recording

log = logging.getLogger(__name__)

# Calls longer than this that were not announced by an event appear at the next start.
POLL_LOOKBACK_S = 3 * 3600
# The PBX's clock may run ahead of ours; ask a little into the future.
CLOCK_SKEW_S = 300
BACKFILL_SLICE = dt.timedelta(days=1)
# After a failed poll, retry sooner than a long poll interval, but not in a tight loop.
RETRY_MIN_S = 5.0


class CdrSync:
    """Backfill and periodic poll of the CDR.

    Attributes:
        stats: "polls", "poll_failures", "last_poll_time", "last_error", "bad_rows".
    """

    def __init__(self, client, on_recordings: Callable[[list[Recording]], None], *,
                 since_s: float, poll_interval_s: float,
                 now: Callable[[], dt.datetime] = dt.datetime.now) -> None:
        self._client = client
        self._on_recordings = on_recordings
        self._since_s = since_s
        self._poll_interval_s = poll_interval_s
        self._now = now
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._backfilled = False
        self._first_pass = threading.Event()
        self.stats: dict = {"polls": 0, "poll_failures": 0, "last_poll_time": None, "last_error": None,
                            "bad_rows": 0}

    def backfill(self) -> int:
        """Fetch the whole ``since`` window now; return the recordings found. Raises PbxError."""
        end = self._now() + dt.timedelta(seconds=CLOCK_SKEW_S)
        start = end - dt.timedelta(seconds=self._since_s + CLOCK_SKEW_S)
        found = 0
        while start < end:
            slice_end = min(end, start + BACKFILL_SLICE)
            found += self._fetch(start, slice_end)
            start = slice_end + dt.timedelta(seconds=1)  # the PBX's window is inclusive
        self._backfilled = True
        log.info("cdr: backfill of the last %.0f h found %d recordings", self._since_s / 3600, found)
        return found

    def poll(self) -> int:
        """Fetch the recent window once; return the recordings found. Raises PbxError."""
        end = self._now() + dt.timedelta(seconds=CLOCK_SKEW_S)
        start = end - dt.timedelta(seconds=POLL_LOOKBACK_S + CLOCK_SKEW_S)
        return self._fetch(start, end)

    def _fetch(self, start: dt.datetime, end: dt.datetime) -> int:
        result = self._client.fetch_cdr(start, end)
        if result.bad_rows:
            self.stats["bad_rows"] += result.bad_rows
            log.warning("cdr: skipped %d malformed rows of %d between %s and %s",
                        result.bad_rows, result.rows, start, end)
        if result.recordings:
            self._on_recordings(result.recordings)
        return len(result.recordings)

    def start(self) -> "CdrSync":
        self._thread = threading.Thread(target=self._loop, name="cdr-sync", daemon=True)
        self._thread.start()
        return self

    def wait_first_pass(self, timeout_s: float) -> bool:
        """Wait for the first backfill attempt (done or failed); False if still running."""
        return self._first_pass.wait(timeout_s)

    def poll_now(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        delay_s = 0.0 if not self._backfilled else self._poll_interval_s
        while not self._stop.is_set():
            self._wake.wait(delay_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            delay_s = self._run_once(delay_s)
            self._first_pass.set()

    def _run_once(self, previous_delay_s: float) -> float:
        """One backfill-or-poll; returns how long to wait before the next."""
        try:
            if self._backfilled:
                self.poll()
            else:
                self.backfill()
        except errors.PbxError as exc:
            self.stats["poll_failures"] += 1
            self.stats["last_error"] = str(exc)
            log.warning("cdr: %s failed: %s", "poll" if self._backfilled else "backfill", exc)
            return min(self._poll_interval_s, max(RETRY_MIN_S, previous_delay_s * 2))
        self.stats["polls"] += 1
        self.stats["last_poll_time"] = time.time()
        return self._poll_interval_s
