"""Everything that speaks to a Yeastar P-Series PBX (OpenAPI v1.0, yeastar-p-series-api.md).

    client.py     PSeriesClient: tokens (get, renew, refresh, one per mount), API calls,
                  two-step downloads with reusable resource URLs, one mp3 at a time
    records.py    Recordings out of list rows and 30012 events; the PBX's display format
    catalogue.py  SearchCatalogue: backfill, poll and resync as recording/search windows
    websocket.py  EventSubscription: New CDR events over the PBX's WebSocket

Shared with the S-Series: ``../transport.py`` (TLS, proxy, checked bodies), ``../clock.py``
(skew and zone), ``../events.py`` (the hardened webhook receiver and the event sink).

`PSeriesPbx` puts them behind the seam in ``pbx/__init__.py``. It owns the one `PbxClock`
and the one `records.DisplayTimes` that the client, the catalogue and the events share, and
passes each announced call through the clock (a vote for the zone) before handing it on.

Events come over the WebSocket, and, when the PBX is set to push (a webhook to this host's
``--events-port``), over HTTP as well: both feed the index, which keeps one row per name.

Order at start: the webhook receiver binds first (a port in use is a ConfigError before
anything else), then the token, its renewal thread, ``system/information`` (the zone and
display format) and the WebSocket. `stop` undoes them in reverse.

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
from yeastarfs.pbx import session_status
from yeastarfs.pbx.clock import PbxClock
from yeastarfs.pbx.events import EventReceiver, allowed_sources
from yeastarfs.pbx.pseries.catalogue import SearchCatalogue
from yeastarfs.pbx.pseries.client import PSeriesClient
from yeastarfs.pbx.pseries.records import DisplayTimes, new_cdr_format
from yeastarfs.pbx.pseries.websocket import EventSubscription
from yeastarfs.pbx.transport import RecordingStream

log = logging.getLogger(__name__)

# The PBX counts as reachable while something it answered is this recent: the catalogue
# polls every poll interval, the token is renewed every 25 minutes.
REACHABLE_WITHIN_S = 1800.0


class PSeriesPbx:
    """A P-Series PBX behind the `pbx.Pbx` seam.

    Attributes:
        family: "p-series".
        client: the PSeriesClient (exists from `start`).
        catalogue: the SearchCatalogue (exists from `start`).
        clock: the PbxClock (skew and zone).
        subscription: the WebSocket EventSubscription (None with events off).
    """

    family = "p-series"

    def __init__(self, config: Config) -> None:
        self._config = config
        self.clock = PbxClock(config.pbx_timezone)
        self.times = DisplayTimes()
        self.client: Optional[PSeriesClient] = None
        self.catalogue: Optional[SearchCatalogue] = None
        self.subscription: Optional[EventSubscription] = None
        self._receiver: Optional[EventReceiver] = None

    def start(self, on_recording: Callable[[Recording], None],
              on_timezone: Optional[Callable[[Optional[dt.tzinfo]], None]] = None) -> None:
        """See `pbx.Pbx.start`."""
        config = self._config
        self.clock.set_listener(on_timezone)
        on_recording = self.clock.voting(on_recording)
        event_format = new_cdr_format(self.times)
        if config.events_enabled:
            self._receiver = EventReceiver(on_recording, event_format=event_format, host=config.events_host,
                                           port=config.events_port, allowed_ips=allowed_sources(config)).start()
        self.client = PSeriesClient(config.pbx_url, config.username, config.password, verify=config.verify,
                                    pin_sha256=config.pin_sha256, proxy=config.proxy, clock=self.clock)
        self.catalogue = SearchCatalogue(self.client, self.clock, self.times)
        try:
            self.client.login()
        except errors.AuthError:
            raise
        except errors.PbxError:
            self.client.start_renewal()  # logs in by itself once the PBX answers
            self._subscribe(on_recording, event_format)
            raise
        self.client.start_renewal()
        self.catalogue.read_system_information()  # logs the zone the PBX states
        self._subscribe(on_recording, event_format)

    def _subscribe(self, on_recording: Callable[[Recording], None], event_format) -> None:
        config = self._config
        if config.events_enabled:
            self.subscription = EventSubscription(self.client, on_recording, event_format, verify=config.verify,
                                                  pin_sha256=config.pin_sha256, proxy=config.proxy).start()

    def open_stream(self, name: str, offset: int = 0) -> RecordingStream:
        if self.client is None:
            raise errors.PbxUnavailableError("not connected to the PBX yet")
        return self.client.open_recording(name, offset=offset)

    def status(self) -> dict:
        client = self.client
        stats = client.stats if client is not None else None
        event_times = [source.stats.get("last_event_time") for source in (self.subscription, self._receiver)
                       if source is not None]
        return {
            **session_status(self._config, self.family, last_success_time=stats.last_success_time if stats else None,
                             reachable_within_s=REACHABLE_WITHIN_S,
                             token_age_s=client.token_age_s if client is not None else None,
                             logins=stats.logins if stats else 0,
                             last_event_time=max((t for t in event_times if t is not None), default=None)),
            "token_renewals": stats.renewals if stats else 0,
            "websocket_connected": bool(self.subscription and self.subscription.stats["connected"]),
            "resource_urls_reused": None if client is None else client.links_reusable,
            **self.clock.status(),
            **(self.catalogue.status() if self.catalogue else {}),
        }

    def stop(self) -> None:
        for stop in (self.subscription and self.subscription.stop, self.client and self.client.logout,
                     self.client and self.client.stop, self._receiver and self._receiver.stop):
            if stop:
                stop()
        self.subscription = self._receiver = None
