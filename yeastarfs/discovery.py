"""Discovery: the loop that keeps the index complete from a PBX's catalogue.

It hands every batch to ``on_recordings(batch, kind)``, *kind* being "backfill", "poll"
or "resync" (the mount prefetches only what polls and events announce, never a backfill);
the callback may return how many of the batch were new, which `status` reports for the last
backfill or resync.

At start it runs the catalogue's backfill of the last ``since_s`` seconds; then it polls
every ``poll_interval_s`` for recordings no event announced, and every
``resync_interval_s`` (and on `resync_now`, i.e. SIGHUP) it re-reads the whole ``since_s``
window, so that rows the PBX produced late are found without a restart. What each of these
asks the PBX is the catalogue's business (``pbx/<family>``); this module only schedules.

Nothing the PBX sends may end this loop: any exception from the catalogue or the callback
is logged (with a traceback for the unexpected ones), counted, and followed by a retry
with backoff (``RETRY_MIN_S`` doubling up to the poll interval). `status` says when
discovery is failing, since when, and why, and whether the last poll and the last resync
succeeded.

Threading: one daemon thread between `start` and `stop`; `resync_now`, `poll_now`, `status`
and `wait_first_pass` may be called from any thread. ``_lock`` guards the statistics only.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from yeastarfs import errors
from yeastarfs.models import Recording

log = logging.getLogger(__name__)

# After a failure, retry sooner than a long poll interval, but never in a tight loop.
RETRY_MIN_S = 5.0


class Discovery:
    """Backfill, periodic poll and periodic resync of one PBX's catalogue.

    Attributes:
        since_s: how far back the backfill and every resync reach.
        poll_interval_s, resync_interval_s: the schedule (resync 0: never, but on demand).

    Multithreading: see the module docstring.
    """

    def __init__(self, catalogue, on_recordings: Callable[[list[Recording], str], Optional[int]], *,
                 since_s: float, poll_interval_s: float, resync_interval_s: float = 0.0) -> None:
        self._catalogue = catalogue
        self._on_recordings = on_recordings
        self.since_s = since_s
        self.poll_interval_s = poll_interval_s
        self.resync_interval_s = resync_interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._resync_wanted = threading.Event()
        self._first_pass = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._backfilled = False
        self._next_resync = 0.0
        self._stats: dict = {
            "polls": 0, "last_poll_time": None, "last_resync_time": None, "last_resync_found": None,
            "last_resync_new": None, "resync_interval_s": resync_interval_s,
            "failures": 0, "consecutive_failures": 0, "failing_since": None, "last_error": None,
            "last_error_time": None,
            # Whether the last poll, and the last backfill or resync, succeeded (None: none yet).
            "last_poll_ok": None, "last_resync_ok": None,
        }

    # -- control -------------------------------------------------------------------------------

    def start(self) -> "Discovery":
        self._thread = threading.Thread(target=self._loop, name="discovery", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def wait_first_pass(self, timeout_s: float) -> bool:
        """Wait for the first backfill attempt (done or failed); False if still running."""
        return self._first_pass.wait(timeout_s)

    def poll_now(self) -> None:
        self._wake.set()

    def resync_now(self) -> None:
        """Re-read the whole ``since_s`` window at once (SIGHUP)."""
        self._resync_wanted.set()
        self._wake.set()

    def status(self) -> dict:
        with self._lock:
            return dict(self._stats)

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        delay_s = 0.0
        while not self._stop.is_set():
            self._wake.wait(delay_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            delay_s = self._run_once(delay_s)
            self._first_pass.set()

    def _run_once(self, previous_delay_s: float) -> float:
        """One backfill, resync or poll; returns how long to wait before the next pass."""
        kind = self._next_kind()
        try:
            found, new = self._backfill() if kind in ("backfill", "resync") else self._poll()
        except Exception as exc:  # noqa: BLE001 - nothing from the PBX may end discovery
            self._note_failure(kind, exc)
            if kind == "resync":
                self._resync_wanted.set()  # try the resync again, after the backoff
            return min(self.poll_interval_s, max(RETRY_MIN_S, previous_delay_s * 2))
        self._note_success(kind, found, new)
        return self.poll_interval_s

    def _next_kind(self) -> str:
        if not self._backfilled:
            return "backfill"
        now = time.monotonic()
        due = self.resync_interval_s > 0 and now >= self._next_resync
        if self._resync_wanted.is_set() or due:
            self._resync_wanted.clear()
            return "resync"
        return "poll"

    def _backfill(self) -> tuple[int, Optional[int]]:
        """(recordings found, how many were new or None when the callback does not say)."""
        found, new = 0, 0
        kind = "resync" if self._backfilled else "backfill"
        for batch in self._catalogue.backfill(self.since_s):
            added = self._deliver(batch, kind)
            found += len(batch)
            new = None if new is None or added is None else new + added
        return found, new

    def _poll(self) -> tuple[int, Optional[int]]:
        batch = self._catalogue.poll()
        return len(batch), self._deliver(batch, "poll")

    def _deliver(self, batch: list[Recording], kind: str) -> Optional[int]:
        if not batch:
            return 0
        added = self._on_recordings(batch, kind)
        return added if isinstance(added, int) else None

    # -- statistics ----------------------------------------------------------------------------

    def _note_success(self, kind: str, found: int, new: Optional[int]) -> None:
        now = time.time()
        with self._lock:
            recovered = self._stats["consecutive_failures"]
            self._stats.update(consecutive_failures=0, failing_since=None, last_poll_time=now)
            self._stats[_outcome_key(kind)] = True
            self._stats["polls"] += 1
            if kind in ("backfill", "resync"):
                self._stats.update(last_resync_time=now, last_resync_found=found, last_resync_new=new)
        if kind in ("backfill", "resync"):
            self._backfilled = True
            self._next_resync = time.monotonic() + self.resync_interval_s
            log.info("discovery: %s of the last %.0f h found %d recordings (%s new)", kind, self.since_s / 3600,
                     found, "?" if new is None else new)
        if recovered:
            log.info("discovery: %s succeeded after %d failures", kind, recovered)

    def _note_failure(self, kind: str, exc: Exception) -> None:
        expected = isinstance(exc, errors.YeastarfsError)
        message = str(exc) if expected else f"{type(exc).__name__}: {errors.redact(str(exc))[:300]}"
        now = time.time()
        with self._lock:
            self._stats["failures"] += 1
            self._stats["consecutive_failures"] += 1
            self._stats["failing_since"] = self._stats["failing_since"] or now
            self._stats.update(last_error=message, last_error_time=now)
            self._stats[_outcome_key(kind)] = False
        # Expected failures (PBX down, refused) are one line; anything else carries a traceback,
        # because it is a bug or a reply nobody foresaw, and the loop goes on either way.
        log.warning("discovery: %s failed: %s", kind, message, exc_info=None if expected else exc)


def _outcome_key(kind: str) -> str:
    """The status key of *kind*'s last outcome: a backfill reads what a resync reads."""
    return "last_poll_ok" if kind == "poll" else "last_resync_ok"
