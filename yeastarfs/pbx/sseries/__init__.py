"""Everything that speaks to a Yeastar S-Series PBX (API v2.0.0, yeastar-api.md).

    client.py     PbxClient: login, heartbeat, single-use randoms, downloads, the CDR CSV
    records.py    Recordings out of CDR CSV rows and NewCdr events (the PBX's spellings)
    ../clock.py   PbxClock (shared by both families): the PBX clock's skew (Date headers)
                  and its zone (configured, detected from its call times, or assumed)
    cdr.py        CdrCatalogue: backfill and poll as CDR time windows in the PBX's time
    events.py     EventReceiver: the HTTP server the PBX pushes NewCdr events to
    tcpevents.py  TcpEventClient: the PBX's TCP event port, when its report method is TCP

`SSeriesPbx` puts them behind the seam in ``pbx/__init__.py``; it is the only class the
rest of yeastarfs uses (through `pbx.open_pbx`). It owns the one `PbxClock` the client,
the catalogue and the events feed, and passes each NewCdr through it (a vote for the zone)
before handing it on.

Order at start: the event receiver binds first (login tells the PBX which port to push
to, and port 0 picks one), then the login, the heartbeat, and, when the login reply says
the PBX reports events over TCP, the TCP event client. `stop` undoes them in reverse.

Threading: `start` and `stop` are called by the mount's main thread; `open_stream` from
download workers; `status` from any thread. The components own their threads and locks.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Callable, Optional

from yeastarfs import errors
from yeastarfs.config import Config
from yeastarfs.models import Recording
from yeastarfs.pbx.sseries.cdr import CdrCatalogue
from yeastarfs.pbx.sseries.client import PbxClient, RecordingStream
from yeastarfs.pbx import session_status
from yeastarfs.pbx.clock import PbxClock
from yeastarfs.pbx.events import allowed_sources
from yeastarfs.pbx.sseries.events import EventReceiver
from yeastarfs.pbx.sseries.tcpevents import TcpEventClient

log = logging.getLogger(__name__)

# The PBX counts as reachable while something it answered is this recent: the CDR poll talks
# to it every poll interval, the heartbeat every 10 minutes.
REACHABLE_WITHIN_S = 900.0


class SSeriesPbx:
    """An S-Series PBX behind the `pbx.Pbx` seam.

    Attributes:
        family: "s-series".
        client: the PbxClient (exists from `start`; logged in by it).
        catalogue: the CdrCatalogue.
        clock: the PbxClock (skew and zone).
    """

    family = "s-series"

    def __init__(self, config: Config) -> None:
        self._config = config
        self._receiver: Optional[EventReceiver] = None
        self._tcp_events: Optional[TcpEventClient] = None
        self.client: Optional[PbxClient] = None
        self.catalogue: Optional[CdrCatalogue] = None
        self.clock = PbxClock(config.pbx_timezone)

    def start(self, on_recording: Callable[[Recording], None],
              on_timezone: Optional[Callable[[Optional[dt.tzinfo]], None]] = None) -> None:
        """See `pbx.Pbx.start`."""
        config = self._config
        self.clock.set_listener(on_timezone)
        zone = self.clock.status()
        log.info("pbx: the PBX's time zone is %s (%s)%s", zone["pbx_timezone"], zone["pbx_timezone_source"],
                 ", until its call times show its own" if zone["pbx_timezone_source"] == "assumed" else "")
        on_recording = self.clock.voting(on_recording)
        if config.events_enabled:
            self._receiver = EventReceiver(on_recording, host=config.events_host, port=config.events_port,
                                           allowed_ips=allowed_sources(config)).start()
        self.client = PbxClient(config.pbx_url, config.username, config.password, verify=config.verify,
                                events_port=self._receiver.port if self._receiver else None,
                                heartbeat_interval_s=config.heartbeat_interval_s, pin_sha256=config.pin_sha256,
                                proxy=config.proxy, clock=self.clock)
        self.catalogue = CdrCatalogue(self.client, self.clock)
        try:
            self.client.login()
        except errors.AuthError:
            raise
        except errors.PbxError:
            self.client.start_heartbeat()  # calls log in again by themselves once it answers
            raise
        self.client.start_heartbeat()
        if self.client.transport == "TCP" and config.events_enabled:
            self._tcp_events = TcpEventClient(config.pbx_host, config.tcp_events_port, config.username,
                                              config.password, on_recording).start()
            log.info("pbx: receiving events over TCP from %s:%d", config.pbx_host, config.tcp_events_port)

    def open_stream(self, name: str, offset: int = 0) -> RecordingStream:
        if self.client is None:
            raise errors.PbxUnavailableError("not connected to the PBX yet")
        return self.client.open_recording(name, offset=offset)

    def status(self) -> dict:
        stats = self.client.stats if self.client is not None else None
        event_stats = self._receiver.stats if self._receiver else (
            self._tcp_events.stats if self._tcp_events else {})
        return {
            **session_status(self._config, self.family, last_success_time=stats.last_success_time if stats else None,
                             reachable_within_s=REACHABLE_WITHIN_S,
                             token_age_s=self.client.token_age_s if self.client is not None else None,
                             logins=stats.logins if stats else 0, last_event_time=event_stats.get("last_event_time")),
            **self.clock.status(),
            **(self.catalogue.status() if self.catalogue else {}),
        }

    def stop(self) -> None:
        for stop in (self._tcp_events and self._tcp_events.stop, self.client and self.client.logout,
                     self.client and self.client.stop, self._receiver and self._receiver.stop):
            if stop:
                stop()
        self._tcp_events = self._receiver = None
