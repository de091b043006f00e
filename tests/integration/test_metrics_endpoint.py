"""--metrics-port on a real mount: what a Prometheus scrape sees, read with the Prometheus
client's own parser, against what the simulator counted and what the reads did."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import date_path, free_port, sha256_of, wait_until

pytestmark = pytest.mark.fuse

REQUESTS = "yeastarfs_pbx_requests_total"
RECEIVED = "yeastarfs_download_received_bytes_total"
FUSE_COUNT = "yeastarfs_fuse_operation_seconds_count"
FUSE_ERRORS = "yeastarfs_fuse_errors_total"
HEAD_BYTES = 64 * 1024


def scrape(port: int) -> list:
    """Every sample a scrape of the mount's endpoint returns, as the Prometheus client parses it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode("utf-8")
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(samples: list, name: str, **labels: str) -> float:
    """The sum of the samples called *name* that carry *labels* (among others)."""
    return sum(sample.value for sample in samples if sample.name == name and labels.items() <= sample.labels.items())


def status_port(mount) -> int:
    return json.loads(os.getxattr(mount.mountpoint, "user.yeastarfs.status"))["metrics_port"]


def test_a_scrape_counts_exactly_the_requests_bytes_and_operations_of_the_reads(pbx, mounted):
    recordings = pbx.populate(3, days=1)
    port = free_port()
    mount = mounted("--metrics-port", str(port), "--poll-interval", "3600")
    before = scrape(port)
    assert pbx.downloaded_bytes() == 0

    with open(mount.recording_path(recordings[0].name), "rb", buffering=0) as handle:
        head = handle.read(HEAD_BYTES)
        during = scrape(port)  # the reader holds the file open, its download in flight
        rest = handle.read()
    assert hashlib.sha256(head + rest).hexdigest() == recordings[0].sha256
    assert value(during, "yeastarfs_downloads") == 1 and value(during, "yeastarfs_cache_bytes", state="pinned") > 0
    assert value(during, FUSE_COUNT, op="open") - value(before, FUSE_COUNT, op="open") == 1
    for rec in recordings[1:]:
        assert sha256_of(mount.recording_path(rec.name)) == rec.sha256
    assert sha256_of(mount.recording_path(recordings[0].name)) == recordings[0].sha256  # from the cache
    with pytest.raises(FileNotFoundError):
        os.stat(mount.path(*date_path(recordings[0].name)[:3], "no-such-recording.wav"))

    sent_bytes = pbx.downloaded_bytes()
    assert sent_bytes == sum(rec.size_bytes for rec in recordings)
    after = wait_until(lambda: (samples := scrape(port)) and value(samples, RECEIVED) == sent_bytes and samples,
                       10, message=lambda: f"{sent_bytes} bytes received in the metrics")

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Every request the simulator answered, by endpoint, and nothing else; each one answered.
    endpoints = {sample.labels["endpoint"] for sample in after if sample.name == REQUESTS}
    assert {"login", "recording/get_random", "recording/download"} <= endpoints
    assert {endpoint: value(after, REQUESTS, endpoint=endpoint) for endpoint in endpoints} == \
        {endpoint: pbx.counters[endpoint] for endpoint in endpoints}
    assert value(after, REQUESTS, outcome="ok") == value(after, REQUESTS)
    assert moved(REQUESTS, endpoint="recording/get_random") == moved(REQUESTS, endpoint="recording/download") == 3
    assert moved("yeastarfs_pbx_request_seconds_count", endpoint="recording/download") == 3
    assert moved("yeastarfs_pbx_download_seconds_count", outcome="complete") == 3
    assert value(after, "yeastarfs_pbx_logins_total", outcome="ok") == pbx.counters["login"] == 1

    # FUSE: four opens (one from the cache), reads, and the stat of a missing name by its errno.
    assert moved(FUSE_COUNT, op="open") == 4
    assert moved(FUSE_COUNT, op="read") >= 4
    assert moved(FUSE_ERRORS, op="getattr", errno="ENOENT") == 1
    assert value(after, FUSE_ERRORS) == value(after, FUSE_ERRORS, errno="ENOENT")

    # The state read at scrape time.
    assert moved("yeastarfs_cache_misses_total") == 3 and moved("yeastarfs_cache_hits_total") == 1
    assert value(after, "yeastarfs_cache_bytes") == sent_bytes
    assert value(after, "yeastarfs_recordings_indexed") == 3
    assert value(after, "yeastarfs_discovery_last_outcome", kind="resync") == 1
    assert value(after, "yeastarfs_pbx_reachable") == 1
    assert {sample.labels["state"] for sample in after if sample.name == "yeastarfs_downloads"} == \
        {"queued", "running", "parked", "suspended"}
    assert all(sample.labels.get("mountpoint") == mount.mountpoint for sample in after)


def test_two_mounts_on_one_host_are_told_apart_by_their_mountpoint(pbx, mounted, tmp_path):
    pbx.populate(2, days=1)
    first = mounted("--metrics-port", "0")
    second = mounted("--metrics-port", "0", cache_root=tmp_path / "other-cache")
    ports = status_port(first), status_port(second)
    assert ports[0] != ports[1] and 0 not in ports
    labels = [{sample.labels["mountpoint"] for sample in scrape(port)} for port in ports]
    assert labels == [{first.mountpoint}, {second.mountpoint}]
