"""The PBX seam: what the rest of yeastarfs needs from a PBX, whatever its family.

A PBX family is a package beside this module (``pbx/sseries``: the S-Series API v2.0.0;
``pbx/pseries``: the P-Series OpenAPI) with one class that has the shape of `Pbx`; what
both share lives beside them (``transport``, ``clock``, ``events``). Everything else (index, cache, downloads,
core, the application) uses only the four things below, so that none of it knows which
family it talks to, which endpoints it calls or how that family spells its errors:

    session     `Pbx.start` logs in (and keeps the session alive), `Pbx.stop` ends it;
    catalogue   `Pbx.catalogue`: which recordings exist, in batches, for the discovery loop
                (backfill of the last ``since_s`` seconds, poll for new ones, full resync);
                its windows are the family's business, in the PBX's own time;
    events      `Pbx.start` also starts whatever pushes new recordings (``on_recording``);
    time zone   `Pbx.start` tells ``on_timezone`` the zone in which recording names'
                timestamps are written (configured, detected or assumed), and again
                whenever it changes, so the index reads file times as real instants;
    bytes       `Pbx.open_stream(name, offset)`: one recording's bytes from an offset.

Every failure leaves a family as an ``errors`` type: ``AuthError``/``LockedOutError`` for a
rejected login, ``RecordingNotFoundError`` when the PBX says the recording does not exist,
``PbxUnavailableError`` (and ``DownloadStalledError``) for a PBX that cannot be reached or
does not answer as it should, ``DownloadError`` for a body that is not the recording.

`open_pbx` picks the family for a `Config` (``--api``; ``auto`` asks the PBX once at
start, ``pbx/auto.py``). This module imports no family at import time, so a layer that
only needs the interface never loads ``requests``.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Protocol

from yeastarfs.models import Recording

if TYPE_CHECKING:
    from yeastarfs.config import Config


class RecordingStream(Protocol):
    """One open transfer of a recording's bytes.

    Attributes:
        start_offset: the file offset of the first byte `chunks` yields (the offset asked
            for, or 0 when the PBX ignored the request to start elsewhere).
        total_bytes: the whole recording's size as the PBX announced it, or None.
        read_size_bytes: at most this many bytes per read of the network (the caller lowers
            it to what flow control allows, so that unread bytes stay in the network's
            buffers, where TCP stops the PBX, rather than in this process).
    """

    start_offset: int
    total_bytes: Optional[int]
    read_size_bytes: int

    def chunks(self) -> Iterator[bytes]:
        """Yield the bytes as they arrive; raise a PbxError when the transfer breaks or the
        body is not exactly what was announced."""

    def close(self) -> None: ...

    def __enter__(self) -> "RecordingStream": ...

    def __exit__(self, *exc_info: object) -> None: ...


class Catalogue(Protocol):
    """Which recordings the PBX holds. Every method may raise a PbxError; none keeps a
    thread of its own (`discovery.Discovery` schedules them)."""

    def backfill(self, since_s: float) -> Iterable[list[Recording]]:
        """The recordings of the last *since_s* seconds, in batches of bounded size (a
        resync calls this again: it must find rows the PBX added late)."""

    def poll(self) -> list[Recording]:
        """The recordings that may have appeared since the last successful poll (the first
        poll that succeeds after failures covers everything since the last good one)."""

    def status(self) -> dict:
        """What the catalogue knows about its own progress (JSON-able, no I/O)."""


class Pbx(Protocol):
    """A session with one PBX of some family."""

    family: str
    catalogue: Catalogue

    def start(self, on_recording: Callable[[Recording], None],
              on_timezone: Optional[Callable[[Optional[dt.tzinfo]], None]] = None) -> None:
        """Log in, keep the session alive, and start the event sources, which call
        *on_recording* (on their own threads) for each recording they announce.

        *on_timezone* is called at once with the zone recording names' timestamps are
        written in (None: this machine's), and again from any thread when that changes
        (a zone detected from the PBX's answers). It must be quick and thread-safe.

        Raises AuthError/LockedOutError for a rejected login (never retried at once: PBXs
        lock an IP out after a few failures), PbxUnavailableError when the PBX cannot be
        reached (the session then keeps retrying in the background), ConfigError when a
        local resource (an event port) cannot be used.
        """

    def open_stream(self, name: str, offset: int = 0) -> RecordingStream:
        """Start a transfer of recording *name* from *offset*. Raises a PbxError."""

    def status(self) -> dict:
        """Session and event statistics for ``yeastarfs status`` (JSON-able, no I/O),
        among them ``pbx_timezone`` (an IANA name, or ``UTC+05:30``),
        ``pbx_timezone_source`` ("configured", "detected" or "assumed"),
        ``pbx_utc_offset_s`` (that zone's offset now) and ``pbx_clock_skew_s`` (how far the
        PBX's clock runs ahead of ours; None when unknown), and the catalogue's status."""

    def stop(self) -> None:
        """End the session and stop every thread; safe to call more than once."""


def session_status(config: "Config", family: str, *, last_success_time: Optional[float],
                   reachable_within_s: float, token_age_s: Optional[float], logins: int,
                   last_event_time: Optional[float]) -> dict:
    """The `Pbx.status` keys every family shares: the PBX counts as reachable while its last
    answer is more recent than *reachable_within_s* (or three poll intervals)."""
    reachable_s = max(reachable_within_s, 3 * config.poll_interval_s)
    return {
        "pbx": config.pbx_url, "pbx_family": family,
        "pbx_reachable": last_success_time is not None and time.time() - last_success_time < reachable_s,
        "token_age_s": None if token_age_s is None else round(token_age_s, 1),
        "logins": logins, "last_event_time": last_event_time,
    }


def open_pbx(config: "Config") -> Pbx:
    """The `Pbx` for *config*'s PBX (not started), of the family ``--api`` names; for
    ``auto``, one that asks the PBX which family it is when it starts."""
    if config.api == "s-series":
        from yeastarfs.pbx.sseries import SSeriesPbx
        return SSeriesPbx(config)
    if config.api == "p-series":
        from yeastarfs.pbx.pseries import PSeriesPbx
        return PSeriesPbx(config)
    from yeastarfs.pbx.auto import AutoPbx
    return AutoPbx(config)
