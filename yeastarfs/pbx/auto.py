"""AutoPbx: ``--api auto``, the family the PBX itself answers as.

Owns the probe and what stands in for a family until it has answered. The probe is one
request: ``GET /openapi/v1.0/get_token`` (with the P-Series' User-Agent). A P-Series
answers any request under ``/openapi/`` with JSON carrying ``errcode`` (a GET on get_token
is "method not allowed": no login is tried, so nothing counts towards a lockout); an
S-Series has no such path and answers an HTML 404. Whatever is not JSON with an
``errcode`` is taken for an S-Series, whose own login then says whether it is one. The
probe is not an API request of either family and is not counted in the metrics.

When the PBX cannot be reached at start, `start` raises like a family (a first mount
fails; a mount with an index comes up) and a thread probes again, with backoff, until the
PBX answers; the chosen family is then started with the same callbacks. Until then the
catalogue and downloads fail with PbxUnavailableError, as a family's do while its PBX is
down.

Threading: `start` and `stop` on the mount's main thread; the prober thread between them;
``_lock`` guards the chosen family (never held while it starts or stops).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from typing import Callable, Iterable, Optional

from yeastarfs import errors
from yeastarfs.config import Config
from yeastarfs.models import Recording
from yeastarfs.pbx.transport import HttpTransport, RecordingStream, read_capped

log = logging.getLogger(__name__)

PROBE_PATH = "openapi/v1.0/get_token"
PROBE_TIMEOUTS_S = (10.0, 30.0)
PROBE_MAX_BYTES = 64 * 1024
RETRY_INITIAL_S = 5.0
RETRY_MAX_S = 300.0


def probe(config: Config) -> str:
    """"p-series" or "s-series", as the PBX answers. Raises PbxUnavailableError (unreachable,
    or a certificate the TLS options refuse)."""
    transport = HttpTransport(config.pbx_url, verify=config.verify, pin_sha256=config.pin_sha256,
                              proxy=config.proxy, user_agent="OpenAPI")
    try:
        response = transport.request("GET", f"{transport.base_url}/{PROBE_PATH}", endpoint=None,
                                     timeout=PROBE_TIMEOUTS_S, stream=True)
        with response:
            body = read_capped(response, PROBE_MAX_BYTES, PROBE_PATH)
    finally:
        transport.close()
    try:
        reply = json.loads(body.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        reply = None
    return "p-series" if isinstance(reply, dict) and "errcode" in reply else "s-series"


def new_family(config: Config, family: str):
    if family == "p-series":
        from yeastarfs.pbx.pseries import PSeriesPbx
        return PSeriesPbx(config)
    from yeastarfs.pbx.sseries import SSeriesPbx
    return SSeriesPbx(config)


class _Catalogue:
    """The chosen family's catalogue, or PbxUnavailableError while none is chosen."""

    def __init__(self, owner: "AutoPbx") -> None:
        self._owner = owner

    def backfill(self, since_s: float) -> Iterable[list[Recording]]:
        return self._owner.chosen_or_raise().catalogue.backfill(since_s)

    def poll(self) -> list[Recording]:
        return self._owner.chosen_or_raise().catalogue.poll()

    def status(self) -> dict:
        chosen = self._owner.chosen
        return chosen.catalogue.status() if chosen is not None and chosen.catalogue is not None else {}


class AutoPbx:
    """A `pbx.Pbx` whose family is the one the PBX answers as (see the module docstring)."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._chosen = None
        self._callbacks: tuple = (None, None)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.catalogue = _Catalogue(self)

    @property
    def family(self) -> str:
        chosen = self.chosen
        return chosen.family if chosen is not None else "auto"

    @property
    def chosen(self):
        with self._lock:
            return self._chosen

    def chosen_or_raise(self):
        chosen = self.chosen
        if chosen is None:
            raise errors.PbxUnavailableError(f"{self._config.pbx_url} has not answered yet (--api auto)")
        return chosen

    def start(self, on_recording: Callable[[Recording], None],
              on_timezone: Optional[Callable[[Optional[dt.tzinfo]], None]] = None) -> None:
        """See `pbx.Pbx.start`."""
        self._callbacks = (on_recording, on_timezone)
        try:
            family = probe(self._config)
        except errors.PbxUnavailableError:
            self._thread = threading.Thread(target=self._probe_until_answered, name="pbx-probe", daemon=True)
            self._thread.start()
            raise
        self._choose(family)

    def _choose(self, family: str) -> None:
        log.info("pbx: %s answers the %s API (--api auto)", self._config.pbx_url,
                 "P-Series OpenAPI" if family == "p-series" else "S-Series")
        pbx = new_family(self._config, family)
        with self._lock:
            self._chosen = pbx
        pbx.start(*self._callbacks)

    def _probe_until_answered(self) -> None:
        delay_s = RETRY_INITIAL_S
        while not self._stop.wait(delay_s):
            try:
                family = probe(self._config)
            except errors.PbxUnavailableError as exc:
                log.debug("pbx: probe failed: %s", exc)
                delay_s = min(RETRY_MAX_S, delay_s * 2)
                continue
            try:
                self._choose(family)
            except errors.PbxError as exc:  # the family keeps trying by itself
                log.warning("pbx: %s", exc)
            return

    def open_stream(self, name: str, offset: int = 0) -> RecordingStream:
        return self.chosen_or_raise().open_stream(name, offset)

    def status(self) -> dict:
        chosen = self.chosen
        if chosen is not None:
            return chosen.status()
        return {"pbx": self._config.pbx_url, "pbx_family": None, "pbx_reachable": False, "token_age_s": None,
                "logins": 0, "last_event_time": None}

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        chosen = self.chosen
        if chosen is not None:
            chosen.stop()
