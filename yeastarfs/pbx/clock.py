"""PbxClock: what time it is on the PBX, and in which zone its call times are written.

Both families write call times (S-Series CDR ``timestart``, NewCdr events; P-Series list
``time``, New CDR ``time_start``) and recording names as naive local wall times of the
PBX's own clock (yeastar-api.md §5.3, §7.4): no zone, and a clock that may drift away
from ours. Catalogue windows must be asked in that time (or, for the P-Series, in Unix
seconds of that clock), and file times must be read in that zone, whatever this machine's
zone and clock say.

Owns:
    skew    how far the PBX's clock runs ahead of ours, from the ``Date`` header of its HTTP
            replies (`note_date`; the median of the last ``SKEW_SAMPLES``, so one odd header
            moves nothing). A median that moves by more than ``CLOCK_JUMP_S`` counts as a jump
            (``jumps``): someone set the PBX's clock.
    zone    configured (``--pbx-timezone``), else detected, else assumed (this machine's).
            Detection (`note_call_end`): a call is reported (its NewCdr arrives, or its CDR
            row appears between two polls) when it ends, so its start plus its duration,
            minus the PBX's UTC clock at that moment, is the zone's offset; rounded to
            ``ZONE_STEP_S`` (every zone is a multiple of 15 minutes) and kept within
            -12 h..+14 h. The most common of the last ``ZONE_VOTES`` such offsets is the
            detected zone, so a row exported late or a garbage time cannot flip it alone.
            A detected zone is a fixed offset: across a DST change it follows only once
            the calls after it outnumber those before (configure the zone to avoid that).
            A PBX that states its offset (`note_offset`: the P-Series shows its local time
            beside its Unix time) is believed over the votes.
    telling a listener (the index, through the mount) which zone is in use, and when it
    changes.

Leaves to others: requests (``client`` feeds `note_date`), CDR windows (``cdr``), events
(``__init__`` feeds `note_call_end` from them).

Threading: every method may be called from any thread. ``_lock`` guards the samples and
votes and is never held while the listener runs or while logging.
"""

from __future__ import annotations

import collections
import datetime as dt
import email.utils
import logging
import os
import statistics
import threading
import time
import zoneinfo
from typing import Callable, Optional

from yeastarfs.models import Recording

log = logging.getLogger(__name__)

# The zones of the world lie between UTC-12 and UTC+14, each a multiple of 15 minutes.
ZONE_MIN_S = -12 * 3600
ZONE_MAX_S = 14 * 3600
ZONE_STEP_S = 900
# Date headers kept for the skew (each is truncated to the second and taken mid-request).
SKEW_SAMPLES = 5
# A skew that moves this far at once means the PBX's clock was set, not that it drifted.
CLOCK_JUMP_S = 300.0
# A Date header further off than this is garbage, not a clock.
MAX_SKEW_S = 100 * 365 * 86400.0
# Offsets remembered for detecting the zone.
ZONE_VOTES = 20
# The most common detected offset must have this many votes before it is called a
# disagreement with the configured zone.
DISAGREE_VOTES = 3
CALL_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

ZoneListener = Callable[[Optional[dt.tzinfo]], None]


class PbxClock:
    """The PBX's clock as seen through its replies and reports.

    Attributes:
        jumps: how many times the skew jumped (see the module docstring).

    Multithreading: see the module docstring.
    """

    def __init__(self, zone_name: Optional[str] = None, *, on_zone: Optional[ZoneListener] = None) -> None:
        self._configured: Optional[dt.tzinfo] = zoneinfo.ZoneInfo(zone_name) if zone_name else None
        self._assumed = local_zone()
        self._on_zone = on_zone
        self._lock = threading.Lock()
        self._skew_samples: collections.deque[float] = collections.deque(maxlen=SKEW_SAMPLES)
        self._skew_s: Optional[float] = None
        self._votes: collections.deque[int] = collections.deque(maxlen=ZONE_VOTES)
        self._detected_s: Optional[int] = None
        self._stated_s: Optional[int] = None  # the offset the PBX itself says (note_offset)
        self._disagreement_told: Optional[int] = None
        self.jumps = 0

    # -- feeding -----------------------------------------------------------------------------

    def set_listener(self, on_zone: Optional[ZoneListener]) -> None:
        """Call *on_zone* with the zone in use now and whenever it changes."""
        self._on_zone = on_zone
        if on_zone is not None:
            on_zone(self.zone()[0])

    def note_date(self, header: Optional[str], sent_s: float, received_s: float) -> None:
        """A reply's ``Date`` header, for a request sent at *sent_s* and answered at
        *received_s* (both ``time.time()``). A missing or unreadable header is ignored."""
        try:
            stamped_s = email.utils.parsedate_to_datetime(header).timestamp() if header else None
        except (TypeError, ValueError, IndexError, OverflowError):
            stamped_s = None
        if stamped_s is None:
            return
        # The header is truncated to the second: the PBX's time was in [stamp, stamp + 1).
        sample_s = stamped_s + 0.5 - (sent_s + received_s) / 2
        if abs(sample_s) > MAX_SKEW_S:
            return
        with self._lock:
            before = self._skew_s
            self._skew_samples.append(sample_s)
            self._skew_s = statistics.median(self._skew_samples)
            jumped = before is not None and abs(self._skew_s - before) > CLOCK_JUMP_S
            if jumped:
                self.jumps += 1
            after = self._skew_s
        if before is None or jumped:
            log.info("pbx: the PBX's clock is %s", describe_skew(after))

    def note_call_end(self, timestart: str, call_s: Optional[int], reported_s: float) -> None:
        """A call that started at *timestart* (PBX wall time) and lasted *call_s* was reported
        at *reported_s* (our ``time.time()``): one vote for the zone. Unusable values are ignored."""
        if call_s is None:
            return
        try:
            start = dt.datetime.strptime(timestart.strip(), CALL_TIME_FORMAT)
            end = start + dt.timedelta(seconds=call_s)
        except (ValueError, OverflowError, AttributeError):
            return
        pbx_utc = self._utc_at(reported_s)
        offset_s = round((end - pbx_utc).total_seconds() / ZONE_STEP_S) * ZONE_STEP_S
        if not ZONE_MIN_S <= offset_s <= ZONE_MAX_S:
            return
        with self._lock:
            self._votes.append(offset_s)
            mode_s, count = _mode(self._votes)
            changed = mode_s != self._detected_s and self._stated_s is None  # a stated zone wins
            self._detected_s = mode_s
        self._detected(mode_s, count, changed, "detected from its call times")

    def note_offset(self, offset_s: float) -> None:
        """The PBX says its wall time runs *offset_s* ahead of UTC (rounded to a whole zone
        step; outside -12 h..+14 h it is ignored). Believed over the call-time votes."""
        offset_s = round(offset_s / ZONE_STEP_S) * ZONE_STEP_S
        if not ZONE_MIN_S <= offset_s <= ZONE_MAX_S:
            return
        with self._lock:
            changed = offset_s != self._stated_s
            self._stated_s = offset_s
        self._detected(offset_s, DISAGREE_VOTES, changed, "as the PBX says")

    def _detected(self, offset_s: int, count: int, changed: bool, how: str) -> None:
        """A zone found from the PBX (*count* agreeing readings): checked against the
        configured one, or logged and told to the listener when it *changed*."""
        configured = self._configured
        if configured is not None:
            self._check_configured(configured, offset_s, count)
        elif changed:
            log.info("pbx: the PBX's time zone is %s (%s)", offset_label(offset_s), how)
            if self._on_zone is not None:
                self._on_zone(self.zone()[0])

    def voting(self, on_recording: Callable[[Recording], None]) -> Callable[[Recording], None]:
        """*on_recording*, after each announced call votes for the zone (`note_call_end`):
        an event arrives when its call ends."""
        def deliver(recording: Recording) -> None:
            self.note_call_end(recording.timestart, recording.call_s, time.time())
            on_recording(recording)

        return deliver

    # -- reading -----------------------------------------------------------------------------

    @property
    def skew_s(self) -> Optional[float]:
        """Seconds the PBX's clock runs ahead of ours (negative: behind); None until a reply
        carried a Date header."""
        with self._lock:
            return self._skew_s

    def utc_now(self) -> dt.datetime:
        """The PBX clock's present time in UTC, naive (ours while the skew is unknown)."""
        return self._utc_at(time.time())

    def wall_now(self) -> Optional[dt.datetime]:
        """The PBX's present local wall time, naive; None while its zone is only assumed."""
        zone, source = self.zone()
        if source == "assumed":
            return None
        return self.utc_now().replace(tzinfo=dt.timezone.utc).astimezone(zone).replace(tzinfo=None)

    def zone(self) -> tuple[Optional[dt.tzinfo], str]:
        """(the zone in use, "configured" | "detected" | "assumed"); an assumed zone may be
        None: this machine's, as its C library knows it."""
        if self._configured is not None:
            return self._configured, "configured"
        with self._lock:
            detected_s = self._stated_s if self._stated_s is not None else self._detected_s
        if detected_s is not None:
            return dt.timezone(dt.timedelta(seconds=detected_s)), "detected"
        return self._assumed, "assumed"

    def status(self) -> dict:
        """The zone and skew for ``yeastarfs status`` (JSON-able)."""
        zone, source = self.zone()
        offset = dt.datetime.now(zone).utcoffset() if zone is not None else _local_offset()
        skew_s = self.skew_s
        return {
            "pbx_timezone": zone_label(zone, offset), "pbx_timezone_source": source,
            "pbx_utc_offset_s": int(offset.total_seconds()),
            "pbx_clock_skew_s": None if skew_s is None else round(skew_s, 1),
        }

    def _utc_at(self, our_s: float) -> dt.datetime:
        skew_s = self.skew_s or 0.0
        return dt.datetime.fromtimestamp(our_s + skew_s, dt.timezone.utc).replace(tzinfo=None)

    def _check_configured(self, configured: dt.tzinfo, mode_s: int, count: int) -> None:
        offset = dt.datetime.now(configured).utcoffset()
        configured_s = int(offset.total_seconds()) if offset is not None else 0
        if count < DISAGREE_VOTES or mode_s == configured_s or self._disagreement_told == mode_s:
            return
        self._disagreement_told = mode_s
        log.warning("pbx: --pbx-timezone %s (%s now) disagrees with the PBX's call times (%s); file times "
                    "follow the option, discovery does not depend on it", zone_label(configured, offset),
                    offset_label(configured_s), offset_label(mode_s))


def _mode(votes: collections.deque) -> tuple[int, int]:
    """The most common value and its count; a tie goes to the most recent value."""
    counts = collections.Counter(votes)
    best = max(counts.values())
    for value in reversed(votes):
        if counts[value] == best:
            return value, best
    raise ValueError("no votes")  # unreachable: callers pass a non-empty deque


def local_zone() -> Optional[dt.tzinfo]:
    """This machine's zone as a ZoneInfo when it can be named (``TZ``, else /etc/localtime),
    else None (the C library's local time)."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    if "TZ" not in os.environ:
        target = os.path.realpath("/etc/localtime")
        if "/zoneinfo/" in target:
            candidates.append(target.split("/zoneinfo/", 1)[1])
    for name in candidates:
        if not name:
            continue
        try:
            return zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            continue
    return None


def _local_offset() -> dt.timedelta:
    return dt.timedelta(seconds=time.localtime().tm_gmtoff)


def offset_label(offset_s: int) -> str:
    """``UTC+05:30`` for 19800."""
    sign = "-" if offset_s < 0 else "+"
    hours, minutes = divmod(abs(offset_s) // 60, 60)
    return f"UTC{sign}{hours:02d}:{minutes:02d}"


def zone_label(zone: Optional[dt.tzinfo], offset: Optional[dt.timedelta]) -> str:
    """An IANA name when the zone has one, else its offset now (``UTC+05:30``)."""
    key = getattr(zone, "key", None)
    if key:
        return key
    return offset_label(int(offset.total_seconds()) if offset is not None else 0)


def describe_skew(skew_s: Optional[float]) -> str:
    """``12 s ahead of ours`` / ``3 s behind ours`` / ``of unknown offset``."""
    if skew_s is None:
        return "of unknown offset (no Date header)"
    return f"{abs(skew_s):.0f} s {'ahead of' if skew_s >= 0 else 'behind'} ours"
