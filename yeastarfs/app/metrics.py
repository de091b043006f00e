"""A mount's metrics endpoint: Prometheus text format over HTTP (``--metrics-port``).

Owns:
    MountCollector  the series that mirror the components' state (cache, downloads by state,
                    recordings indexed, discovery, the PBX session and clock), read from
                    them when scraped, never kept up to date on the hot path;
    Labelled        every series of the collectors it wraps, with ``mountpoint="…"`` added,
                    so that several mounts on one host can be told apart;
    MetricsServer   the HTTP server: prometheus_client's own WSGI application (text format,
                    content negotiation) behind a server that bounds what a client may cost;
    start           what the composition root calls.

Leaves to others: the counters and histograms of events (``yeastarfs/metrics.py``, kept where
the work happens), what each component knows (their ``status``/``usage``/``stats``).

Not a new attack surface. prometheus_client's ``start_http_server`` listens on every
interface, starts a thread for every connection and waits for a silent client for ever;
`MetricsServer` instead:

- listens on 127.0.0.1 unless ``--metrics-address`` says otherwise;
- answers ``GET /metrics`` only (404 for any other path; the library's 405 for any other
  method) and never reads a request body; one request per connection;
- reads at most ``MAX_HEAD_BYTES`` of request line and headers; the rest is never read;
- runs at most ``MAX_SCRAPERS`` handler threads: a connection beyond them is closed at once,
  without a thread;
- closes any connection not answered within ``CONNECTION_DEADLINE_S`` of its accept, however
  it trickles its bytes or slowly it reads the reply.

No series carries a secret: labels are operation names, errno names, PBX API paths without
their query, states and outcomes, and the mountpoint.

Threading: one serving thread (accepts, and closes connections past their deadline every
``POLL_S``), plus at most ``MAX_SCRAPERS`` handler threads, which run the collectors: those
call the components' thread-safe status methods and hold no lock of ours. ``_lock`` guards
the table of open connections only.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from typing import Any, Iterable, Iterator, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from yeastarfs import errors, metrics
from yeastarfs.downloads import END_STATES, State

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
# A scrape's request line and headers are a few hundred bytes.
MAX_HEAD_BYTES = 8192
# Prometheus scrapes one target at a time; a few more for a person with curl.
MAX_SCRAPERS = 4
# From accept to the last byte of the reply (a scrape takes milliseconds).
CONNECTION_DEADLINE_S = 10.0
# How often the serving thread looks for connections past their deadline (and for `stop`).
POLL_S = 0.5
# How long `stop` waits for scrapes in progress before the components are torn down.
STOP_WAIT_S = 2.0
# Downloads in flight (queued, running, parked, suspended); ended ones are about to leave.
DOWNLOAD_STATES = tuple(state.value for state in State if state not in END_STATES)


# -- what is served ----------------------------------------------------------------------------


class MountCollector:
    """The series that mirror a mount's state, read from its components at each scrape.

    *mount* is an ``app.mount.Mount`` (its ``index``, ``cache``, ``core``, ``discovery`` and
    ``pbx``).
    """

    def __init__(self, mount: Any) -> None:
        self._mount = mount

    def collect(self) -> Iterator[Metric]:
        yield from self._storage()
        yield from self._transfers()
        yield from self._discovery()
        yield from self._pbx()

    def _storage(self) -> Iterator[Metric]:
        cache = self._mount.cache
        usage, stats = cache.usage(), cache.stats
        yield _gauge("yeastarfs_recordings_indexed", "Recordings in the index", self._mount.index.count())
        yield _gauge("yeastarfs_cache_budget_bytes", "The cache's budget (--cache-size)", usage["max_bytes"])
        yield _by("state", GaugeMetricFamily("yeastarfs_cache_bytes", "Bytes the cache holds: idle complete "
                                             "files, and pinned ones (open files, downloads)", labels=["state"]),
                  {"idle": usage["idle_bytes"], "pinned": usage["pinned_bytes"]})
        yield _by("state", GaugeMetricFamily("yeastarfs_cache_files", "Files the cache holds, idle and pinned",
                                             labels=["state"]),
                  {"idle": usage["files"], "pinned": usage["pinned"]})
        yield CounterMetricFamily("yeastarfs_cache_hits", "Opens served from a complete cached file", stats.hits)
        yield CounterMetricFamily("yeastarfs_cache_misses", "Opens of a recording not cached", stats.misses)
        yield CounterMetricFamily("yeastarfs_cache_evictions", "Cached files evicted for room", stats.evictions)
        yield CounterMetricFamily("yeastarfs_cache_evicted_bytes", "Bytes of the files evicted",
                                  stats.evicted_bytes)

    def _transfers(self) -> Iterator[Metric]:
        transfers = self._mount.core.transfer_stats()
        states = dict.fromkeys(DOWNLOAD_STATES, 0)
        for download in transfers["downloads_in_flight"]:
            if download["state"] in states:
                states[download["state"]] += 1
        yield _by("state", GaugeMetricFamily("yeastarfs_downloads", "Downloads by state", labels=["state"]), states)
        yield _by("served", CounterMetricFamily("yeastarfs_opens", "Opens of a recording by how they were served "
                                                "(cached, joined a download, downloaded, refused)",
                                                labels=["served"]), transfers["opens"])

    def _discovery(self) -> Iterator[Metric]:
        status = self._mount.discovery.status()
        yield _gauge("yeastarfs_discovery_last_success_timestamp_seconds",
                     "When the catalogue was last read successfully (poll, backfill or resync)",
                     status["last_poll_time"])
        yield _gauge("yeastarfs_discovery_last_resync_timestamp_seconds",
                     "When the whole --since window was last read successfully (backfill or resync)",
                     status["last_resync_time"])
        yield _gauge("yeastarfs_discovery_last_failure_timestamp_seconds", "When reading the catalogue last failed",
                     status["last_error_time"])
        outcomes = {kind: status[f"last_{kind}_ok"] for kind in ("poll", "resync")}
        yield _by("kind", GaugeMetricFamily("yeastarfs_discovery_last_outcome", "Whether the last poll and the last "
                                            "resync (or backfill) succeeded: 1 yes, 0 no", labels=["kind"]),
                  {kind: int(ok) for kind, ok in outcomes.items() if ok is not None})
        yield _gauge("yeastarfs_discovery_consecutive_failures", "Failed catalogue reads since the last success",
                     status["consecutive_failures"])
        yield CounterMetricFamily("yeastarfs_discovery_failures", "Failed catalogue reads", status["failures"])
        yield CounterMetricFamily("yeastarfs_discovery_passes", "Successful catalogue reads (polls, backfills, "
                                  "resyncs)", status["polls"])

    def _pbx(self) -> Iterator[Metric]:
        status = self._mount.pbx.status()
        yield _gauge("yeastarfs_pbx_reachable", "Whether the PBX answered recently: 1 yes, 0 no",
                     int(bool(status.get("pbx_reachable"))))
        yield _gauge("yeastarfs_pbx_last_event_timestamp_seconds", "When the PBX last announced a recording",
                     status.get("last_event_time"))
        yield _gauge("yeastarfs_pbx_token_age_seconds", "Age of the session token (since the last login)",
                     status.get("token_age_s"))
        yield _gauge("yeastarfs_pbx_clock_skew_seconds", "How far the PBX's clock runs ahead of this machine's",
                     status.get("pbx_clock_skew_s"))
        yield _gauge("yeastarfs_pbx_utc_offset_seconds", "The UTC offset of the PBX's time zone now",
                     status.get("pbx_utc_offset_s"))


def _gauge(name: str, documentation: str, value: Optional[float]) -> Metric:
    """A gauge; without a sample when *value* is None (not known yet)."""
    family = GaugeMetricFamily(name, documentation)
    if value is not None:
        family.add_metric([], value)
    return family


def _by(label: str, family: Metric, values: dict) -> Metric:
    for label_value, value in values.items():
        family.add_metric([label_value], value)
    return family


class Labelled:
    """The series of *collectors*, each with *labels* added (the mountpoint)."""

    def __init__(self, collectors: Iterable[Any], labels: dict[str, str]) -> None:
        self._collectors = list(collectors)
        self._labels = labels

    def collect(self) -> Iterator[Metric]:
        for collector in self._collectors:
            for family in collector.collect():
                labelled = Metric(family.name, family.documentation, family.type, family.unit)
                labelled.samples = [sample._replace(labels={**sample.labels, **self._labels})
                                    for sample in family.samples]
                yield labelled


def registry_for(mount: Any) -> CollectorRegistry:
    """Everything a mount serves: the event metrics, its state and the process's own
    (CPU, memory, file descriptors), each series labelled with its mountpoint."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Labelled([metrics.REGISTRY, MountCollector(mount), ProcessCollector(registry=None)],
                               {"mountpoint": mount.mountpoint}))
    return registry


# -- the HTTP server -----------------------------------------------------------------------------


class _HeadBudget:
    """A connection's input as the request handler reads it: lines only, at most *max_bytes*
    in all; past that it reads as ended (the request is answered from what arrived)."""

    def __init__(self, raw: Any, max_bytes: int) -> None:
        self._raw = raw
        self._left = max_bytes

    def readline(self, limit: int = -1) -> bytes:
        allowed = self._left if limit is None or limit < 0 else min(limit, self._left)
        if allowed <= 0:
            return b""
        line = self._raw.readline(allowed)
        self._left -= len(line)
        return line

    def read(self, size: int = -1) -> bytes:
        return b""  # a body is never read

    def close(self) -> None:
        self._raw.close()


class _LogStream:
    """wsgiref's error stream (tracebacks of a failed scrape), into our log."""

    def write(self, text: str) -> None:
        if text.strip():
            log.error("metrics: %s", text.rstrip())

    def flush(self) -> None:
        pass


class _Handler(WSGIRequestHandler):
    timeout = CONNECTION_DEADLINE_S  # per socket operation; the server enforces the total

    def setup(self) -> None:
        super().setup()
        self.rfile = _HeadBudget(self.rfile, MAX_HEAD_BYTES)

    def get_stderr(self) -> _LogStream:
        return _LogStream()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base signature)
        log.debug("metrics: %s %s", self.address_string(), format % args)


class MetricsServer(socketserver.ThreadingMixIn, WSGIServer):
    """The metrics endpoint, bounded as the module docstring says.

    Attributes:
        port: the port it listens on (the one asked, or the one picked for 0).
    """

    daemon_threads = True

    def __init__(self, registry: CollectorRegistry, address: str, port: int) -> None:
        try:
            self.address_family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                                     flags=socket.AI_PASSIVE)[0][0]
            super().__init__((address, port), _Handler)
        except OSError as exc:
            raise errors.ConfigError(f"--metrics-port {port}: cannot listen on {address}: "
                                     f"{exc.strerror or exc}") from None
        self.port = self.server_address[1]
        self._lock = threading.Lock()
        self._deadlines: dict[socket.socket, float] = {}
        self._slots = threading.BoundedSemaphore(MAX_SCRAPERS)
        self._thread: Optional[threading.Thread] = None
        served = make_wsgi_app(registry)

        def app(environ: dict, start_response: Any) -> list[bytes]:
            if environ.get("PATH_INFO") != METRICS_PATH:
                start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
                return [f"the metrics are at {METRICS_PATH}\n".encode()]
            return served(environ, start_response)

        self.set_app(app)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for the address's name (socket.getfqdn): at every start.
        socketserver.TCPServer.server_bind(self)
        host, self.server_port = self.server_address[:2]
        self.server_name = str(host)
        self.setup_environ()

    def start(self) -> "MetricsServer":
        self._thread = threading.Thread(target=self.serve_forever, args=(POLL_S,), name="metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; wait up to ``STOP_WAIT_S`` for scrapes in progress (closed first)."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
        self.server_close()
        with self._lock:
            for sock in self._deadlines:
                _shutdown(sock)
        deadline_s = time.monotonic() + STOP_WAIT_S
        for _ in range(MAX_SCRAPERS):  # every slot back: no handler is running any more
            if not self._slots.acquire(timeout=max(0.0, deadline_s - time.monotonic())):
                log.warning("metrics: a scrape still running after %.0f s at stop", STOP_WAIT_S)
                return

    # -- socketserver's hooks ------------------------------------------------------------------

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # every handler busy: closed at once, no thread
            return
        with self._lock:
            self._deadlines[request] = time.monotonic() + CONNECTION_DEADLINE_S
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done(request)
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def service_actions(self) -> None:
        """Every ``POLL_S`` on the serving thread: end connections past their deadline (their
        handler's blocked read or write then returns at once)."""
        now = time.monotonic()
        with self._lock:
            late = [sock for sock, deadline_s in self._deadlines.items() if now >= deadline_s]
        for sock in late:
            log.debug("metrics: closing a connection past its %.0f s deadline", CONNECTION_DEADLINE_S)
            _shutdown(sock)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: connection from %s ended badly", client_address, exc_info=True)

    def _done(self, request: socket.socket) -> None:
        with self._lock:
            self._deadlines.pop(request, None)
        self._slots.release()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by its handler


def start(mount: Any, address: str, port: int) -> MetricsServer:
    """Measure FUSE operations from now on and serve *mount*'s metrics on *address*:*port*
    (0: a free port). Raises ConfigError when it cannot listen."""
    server = MetricsServer(registry_for(mount), address, port).start()
    metrics.enable()
    log.info("metrics: serving http://%s%s", _host_port(address, server.port), METRICS_PATH)
    return server


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
