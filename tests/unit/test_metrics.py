"""The metrics: what the event counters count, the mountpoint label, and an endpoint that no
client can hold (app/metrics.py's promises), over real sockets on loopback."""

from __future__ import annotations

import errno
import io
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from harness import wait_until
from yeastarfs import errors, metrics
from yeastarfs.app import metrics as endpoint
from yeastarfs.config import Config


def samples_of(collector) -> dict:
    """{(name, labels as sorted tuples): value} of everything *collector* yields."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in collector.collect() for sample in family.samples}


def value(name: str, **labels: str) -> float:
    return samples_of(metrics.REGISTRY).get((name, tuple(sorted(labels.items()))), 0.0)


# -- the event counters ----------------------------------------------------------------------------


def test_fuse_operations_are_measured_only_once_enabled():
    # A name of its own: the operations live as long as the process, and a runner (mutmut)
    # may run this test twice in one.
    op = f"unit_op_{time.monotonic_ns()}"
    operation = metrics.fuse_operation(op)
    assert metrics.fuse_operation(op) is operation
    operation.observe(0.001)
    operation.failed(errno.ENOENT)
    assert value("yeastarfs_fuse_operation_seconds_count", op=op) == 0
    assert value("yeastarfs_fuse_errors_total", op=op, errno="ENOENT") == 0
    metrics.enable()
    operation.observe(0.0002)
    operation.failed(errno.ENOENT)
    operation.failed(errno.EIO)
    assert value("yeastarfs_fuse_operation_seconds_count", op=op) == 1
    assert value("yeastarfs_fuse_operation_seconds_bucket", op=op, le="0.00025") == 1
    assert value("yeastarfs_fuse_operation_seconds_bucket", op=op, le="0.0001") == 0
    assert value("yeastarfs_fuse_errors_total", op=op, errno="ENOENT") == 1
    assert value("yeastarfs_fuse_errors_total", op=op, errno="EIO") == 1


def test_a_pbx_request_is_labelled_by_its_path_without_the_query_and_counted_by_outcome():
    before = {outcome: value("yeastarfs_pbx_requests_total", endpoint="unit/path", outcome=outcome)
              for outcome in ("ok", "http_error", "unreachable")}
    with metrics.pbx_request("unit/path?token=SECRET&random=R") as request:
        request.answered(206)
    with metrics.pbx_request("unit/path?token=SECRET") as request:
        request.answered(500)
    with pytest.raises(ConnectionError):
        with metrics.pbx_request("unit/path"):
            raise ConnectionError("refused")
    moved = {outcome: value("yeastarfs_pbx_requests_total", endpoint="unit/path", outcome=outcome) - count
             for outcome, count in before.items()}
    assert moved == {"ok": 1, "http_error": 1, "unreachable": 1}
    assert not any("SECRET" in str(key) for key in samples_of(metrics.REGISTRY))


def _body(parts, error=None):
    yield from parts
    if error is not None:
        raise error


@pytest.mark.parametrize("parts, body_bytes, error, read, outcome", [
    ([b"ab", b"cd"], 4, None, 1, "complete"),     # complete at the announced length: the caller stops there
    ([b"ab", b"cd"], None, None, 3, "complete"),  # no length: complete when the body ends
    ([b"ab"], 4, OSError("reset"), 2, "failed"),
    ([b"ab", b"cd"], 4, None, 0, "abandoned"),    # closed after the first chunk
])
def test_a_recording_body_counts_its_bytes_and_ends_once_with_its_outcome(parts, body_bytes, error, read, outcome):
    def counts():
        return (value("yeastarfs_download_received_bytes_total"),
                {name: value("yeastarfs_pbx_download_seconds_count", outcome=name)
                 for name in ("complete", "failed", "abandoned")})

    bytes_before, ends_before = counts()
    body = metrics.recording_body(_body(parts, error), time.monotonic(), body_bytes)
    got = [next(body)]
    try:
        for _ in range(read):
            got.append(next(body))
    except (StopIteration, OSError):
        pass
    body.close()
    bytes_after, ends_after = counts()
    assert bytes_after - bytes_before == sum(len(chunk) for chunk in got if chunk)
    assert {name: ends_after[name] - ends_before[name] for name in ends_after} == \
        {name: int(name == outcome) for name in ends_after}


# -- the mountpoint label --------------------------------------------------------------------------


def test_every_series_gets_the_mountpoint_and_keeps_its_own_labels():
    registry = CollectorRegistry()
    Counter("unit_things", "things", ["kind"], registry=registry).labels("a").inc(3)
    labelled = endpoint.Labelled([registry], {"mountpoint": "/mnt/one"})
    assert samples_of(labelled)[("unit_things_total", (("kind", "a"), ("mountpoint", "/mnt/one")))] == 3


# -- the endpoint ----------------------------------------------------------------------------------


def test_the_endpoint_listens_on_loopback_unless_told_otherwise():
    config = Config(mountpoint="/mnt", pbx_url="https://pbx:8088", username="api", password="x")
    assert (config.metrics_port, config.metrics_address) == (None, "127.0.0.1")


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(endpoint, "CONNECTION_DEADLINE_S", 1.0)
    monkeypatch.setattr(endpoint, "POLL_S", 0.05)
    registry = CollectorRegistry()
    Counter("unit_scrapes", "a counter to serve", registry=registry).inc()
    started = endpoint.MetricsServer(registry, "127.0.0.1", 0).start()
    yield started
    started.stop()


def get(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed *sock* (a read returns the end or a reset)."""
    sock.settimeout(0.01)
    try:
        return sock.recv(65536) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def test_it_serves_the_text_format_at_metrics_only(server):
    status, text = get(server.port)
    assert status == 200
    assert [family.name for family in text_string_to_metric_families(text)] == ["unit_scrapes"]
    assert get(server.port, "/")[0] == get(server.port, "/metrics/x")[0] == 404


def test_a_body_is_never_read(server):
    sock = connect(server.port)
    sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
    sock.settimeout(5)
    reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.0 405"), reply  # answered at once, without waiting for the body
    sock.close()


def test_the_head_is_read_up_to_its_budget_only():
    raw = io.BytesIO(b"GET /metrics HTTP/1.1\r\n" + b"X-Long: " + b"a" * 50_000 + b"\r\n\r\n")
    budget = endpoint._HeadBudget(raw, 8192)
    lines = [budget.readline(65537) for _ in range(5)]
    assert sum(len(line) for line in lines) == 8192 == raw.tell()
    assert lines[-1] == b"" and budget.read() == b""


def test_silent_clients_take_only_the_bounded_slots_and_lose_them_at_their_deadline(server):
    silent = [connect(server.port) for _ in range(endpoint.MAX_SCRAPERS)]
    time.sleep(0.2)  # let the server accept them all
    extra = connect(server.port)
    wait_until(lambda: closed_by_server(extra), 0.5, message="a connection beyond the slots to be closed at once")
    started = time.monotonic()
    for sock in silent:
        wait_until(lambda: closed_by_server(sock), 3.0, message="a silent connection to be closed at its deadline")
    assert time.monotonic() - started < endpoint.CONNECTION_DEADLINE_S + 1.0
    assert get(server.port)[0] == 200  # the slots are free again
    for sock in silent + [extra]:
        sock.close()


def test_a_client_trickling_its_request_is_closed_at_the_deadline(server):
    sock = connect(server.port)
    started = time.monotonic()
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 1000
    closed = False
    for byte in request:
        try:
            sock.send(bytes([byte]))
        except OSError:
            closed = True
            break
        if closed_by_server(sock):
            closed = True
            break
        time.sleep(0.02)
    assert closed
    assert time.monotonic() - started < endpoint.CONNECTION_DEADLINE_S + 1.0
    sock.close()


def test_a_port_in_use_is_a_clear_configuration_error(server):
    with pytest.raises(errors.ConfigError, match=f"--metrics-port {server.port}: cannot listen"):
        endpoint.MetricsServer(CollectorRegistry(), "127.0.0.1", server.port)
