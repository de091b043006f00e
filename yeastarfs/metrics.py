"""Metrics: what yeastarfs counts where the work happens, defined once, in Prometheus's terms.

Owns the metrics that count *events*, kept by the code that does the work: FUSE operations
(`fuse_operation`, used by ``fs.py``'s one translation point), and PBX requests, recording
bodies, logins and token renewals (the PBX convention below). They live in `REGISTRY`, one
per process, and a process serves one mount.

Leaves to others: the gauges and counters that mirror a component's state (cache bytes,
hits and evictions, downloads by state, recordings indexed, last poll and resync, the PBX
clock), which ``app/metrics.py`` reads from the components at scrape time; the
``mountpoint`` label, which ``app/metrics.py`` adds to every series; the HTTP endpoint.

The PBX convention. A PBX family (``pbx/<family>/``) reports through these calls, whatever
its API looks like, so a new family gets every ``yeastarfs_pbx_*`` series with a line at
each of these places::

    with metrics.pbx_request(path) as request:      # around every HTTP request to the PBX
        response = session.request(...)
        request.answered(response.status_code)      # no answer (an exception): "unreachable"
    chunks = metrics.recording_body(chunks, sent_s, body_bytes)   # a recording's body
    metrics.pbx_login("ok" | "rejected" | "unreachable")          # every login attempt
    metrics.token_renewal("ok" | "failed")          # keeping a token alive without a login

*path* names the endpoint as the family's API does (``recording/download``); it may carry a
query: only what precedes ``?`` becomes the ``endpoint`` label, so no token or random ever
reaches a label. It must never hold a per-recording value (a download link's file id): every
label value is a series kept for the life of the process.

Cost. A FUSE operation costs one histogram observation (its count is the operation count)
and, when it fails, one counter increment; before `enable` (a mount without
``--metrics-port``) a call of a function that does nothing. The PBX metrics are always kept:
next to a network request they cost nothing.

Threading: everything may be called from any thread; the metric objects lock themselves
(prometheus_client), and this module has no lock. `enable` is called once, before FUSE
serves; until then FUSE operations are not measured.
"""

from __future__ import annotations

import errno
import time
from typing import Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

# Without this every counter and histogram also exports a `_created` timestamp series, which
# doubles what a scrape carries and which Prometheus's text format has no use for.
disable_created_metrics()
# The events of this process; app/metrics.py serves them with the state it reads at scrape time.
REGISTRY = CollectorRegistry(auto_describe=True)

# FUSE answers from memory take tens of microseconds; a read waiting for the PBX, seconds
# (up to --stall-timeout).
FUSE_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                  1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A PBX answers within milliseconds on a LAN and within the client's timeouts at worst.
PBX_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A recording's body: a second at LAN speed, longer while flow control paces it to a reader.
BODY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

FUSE_SECONDS = Histogram("yeastarfs_fuse_operation_seconds",
                         "FUSE operations answered, by operation, and how long each took (its _count counts them)",
                         ["op"], buckets=FUSE_BUCKETS_S, registry=REGISTRY)
FUSE_ERRORS = Counter("yeastarfs_fuse_errors", "FUSE operations that failed, by operation and errno",
                      ["op", "errno"], registry=REGISTRY)
PBX_REQUESTS = Counter("yeastarfs_pbx_requests",
                       "HTTP requests to the PBX by endpoint and outcome (ok: 2xx, http_error: any other "
                       "status, unreachable: no answer)", ["endpoint", "outcome"], registry=REGISTRY)
PBX_REQUEST_SECONDS = Histogram("yeastarfs_pbx_request_seconds",
                                "Time from sending a request to the PBX to its answer's headers, by endpoint",
                                ["endpoint"], buckets=PBX_BUCKETS_S, registry=REGISTRY)
BODY_SECONDS = Histogram("yeastarfs_pbx_download_seconds",
                         "Time from sending a recording download to its last byte (complete), to its failure "
                         "(failed), or to its closing before the end (abandoned); flow control's pauses included",
                         ["outcome"], buckets=BODY_BUCKETS_S, registry=REGISTRY)
BODY_BYTES = Counter("yeastarfs_download_received_bytes", "Recording bytes received from the PBX",
                     registry=REGISTRY)
LOGINS = Counter("yeastarfs_pbx_logins", "Logins to the PBX by outcome (ok, rejected, unreachable)",
                 ["outcome"], registry=REGISTRY)
TOKEN_RENEWALS = Counter("yeastarfs_pbx_token_renewals",
                         "Renewals of the session token without a login (S-Series: heartbeats), by outcome",
                         ["outcome"], registry=REGISTRY)


def _ignore(seconds: float) -> None:
    """What a FUSE operation's ``observe`` is until `enable`."""


class FuseOperation:
    """The measurements of one FUSE callback, made by ``fs._translated``.

    Attributes:
        op: the callback's name (the ``op`` label).
        observe: ``observe(seconds)`` records one answered operation: the histogram's own
            bound method once enabled (no lookup on the hot path), `_ignore` before.
    """

    __slots__ = ("op", "observe")

    def __init__(self, op: str) -> None:
        self.op = op
        self.observe = _ignore

    def failed(self, code: int) -> None:
        """The operation failed with errno *code*."""
        if self.observe is not _ignore:
            FUSE_ERRORS.labels(self.op, errno.errorcode.get(code, str(code))).inc()

    def _enable(self) -> None:
        self.observe = FUSE_SECONDS.labels(self.op).observe


_FUSE_OPERATIONS: dict[str, FuseOperation] = {}


def fuse_operation(op: str) -> FuseOperation:
    """The `FuseOperation` of callback *op* (one per name; made at import, when fs.py decorates)."""
    return _FUSE_OPERATIONS.setdefault(op, FuseOperation(op))


def enable() -> None:
    """Measure FUSE operations from now on (every operation's series exists at 0 at once)."""
    for operation in list(_FUSE_OPERATIONS.values()):
        operation._enable()


class pbx_request:  # noqa: N801 - used like a function: ``with metrics.pbx_request(path) as request``
    """One HTTP request to the PBX: counted by outcome when the block ends, and timed to its
    headers when it was answered (the PBX convention in the module docstring)."""

    __slots__ = ("endpoint", "_sent_s", "_status")

    def __init__(self, path: str) -> None:
        self.endpoint = path.split("?", 1)[0]
        self._sent_s = 0.0
        self._status: Optional[int] = None

    def __enter__(self) -> "pbx_request":
        self._sent_s = time.monotonic()
        return self

    def answered(self, status_code: int) -> None:
        """The PBX answered with HTTP *status_code* (its headers have arrived)."""
        self._status = status_code
        PBX_REQUEST_SECONDS.labels(self.endpoint).observe(time.monotonic() - self._sent_s)

    def __exit__(self, *exc_info: object) -> None:
        if self._status is None:
            outcome = "unreachable"
        else:
            outcome = "ok" if 200 <= self._status < 300 else "http_error"
        PBX_REQUESTS.labels(self.endpoint, outcome).inc()


def recording_body(chunks: Iterator[bytes], sent_s: float, body_bytes: Optional[int]) -> Iterator[bytes]:
    """*chunks* (a recording download's body, as the family checks it), counted.

    Every byte counts in ``yeastarfs_download_received_bytes_total``; the time from *sent_s*
    (``time.monotonic()`` when the request was sent) is observed once: when the
    *body_bytes* announced have all arrived or the body ended cleanly (complete), when it
    raised (failed), or when the caller closed it before (abandoned).
    """
    received, outcome = 0, None
    try:
        for chunk in chunks:
            received += len(chunk)
            BODY_BYTES.inc(len(chunk))
            if outcome is None and body_bytes is not None and received >= body_bytes:
                outcome = _body_ended("complete", sent_s)  # the caller may stop asking now
            yield chunk
        outcome = outcome or _body_ended("complete", sent_s)
    except GeneratorExit:
        outcome = outcome or _body_ended("abandoned", sent_s)
        raise
    except BaseException:
        outcome = outcome or _body_ended("failed", sent_s)
        raise
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _body_ended(outcome: str, sent_s: float) -> str:
    BODY_SECONDS.labels(outcome).observe(time.monotonic() - sent_s)
    return outcome


def pbx_login(outcome: str) -> None:
    """A login attempt ended: "ok", "rejected" (the PBX refused the credentials) or
    "unreachable"."""
    LOGINS.labels(outcome).inc()


def token_renewal(outcome: str) -> None:
    """An attempt to keep the session token alive without a login ended: "ok" or "failed"."""
    TOKEN_RENEWALS.labels(outcome).inc()
