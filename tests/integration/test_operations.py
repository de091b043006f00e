"""Running it for real: status, signals, metadata as extended attributes."""

from __future__ import annotations

import csv
import datetime as dt
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess

import pytest
import requests

from harness import date_path, download_requests, wait_until, write_password_file, yeastarfs_command
from test_streaming import ONE_MB, add

pytestmark = pytest.mark.fuse


def yeastarfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(yeastarfs_command(*args), capture_output=True, text=True, timeout=60)


def test_cdr_fields_as_extended_attributes_without_pbx_requests(pbx, mounted, require):
    rec = add(pbx, size_bytes=ONE_MB, callfrom="0612345678", callto="1001", call_type="Inbound")
    mount = mounted()
    pbx.reset()
    path = mount.path(*date_path(rec.name))
    names = set(os.listxattr(path))
    assert {"user.yeastar.caller", "user.yeastar.callee", "user.yeastar.type", "user.yeastar.status",
            "user.yeastar.start_time", "user.yeastar.talk_seconds", "user.yeastar.callid"} <= names
    assert os.getxattr(path, "user.yeastar.caller") == b"0612345678"
    assert os.getxattr(path, "user.yeastar.callee") == b"1001"
    assert os.getxattr(path, "user.yeastar.type") == b"Inbound"
    assert os.getxattr(path, "user.yeastar.talk_seconds") == str(rec.talk_s).encode()
    assert os.getxattr(path, "user.yeastar.start_time") == rec.timestart.encode()
    for missing, code in (("user.yeastar.nonexistent", errno.ENODATA), ("security.selinux", errno.EOPNOTSUPP),
                          ("system.posix_acl_access", errno.EOPNOTSUPP), ("trusted.x", errno.EOPNOTSUPP)):
        with pytest.raises(OSError) as info:
            os.getxattr(path, missing)
        assert info.value.errno == code, missing
    getfattr = shutil.which("getfattr")
    require(getfattr, "getfattr is not installed (scripts/setup installs attr)")
    listing = subprocess.run([getfattr, "-d", path], capture_output=True, text=True)
    assert 'user.yeastar.caller="0612345678"' in listing.stdout
    assert download_requests(pbx) == (0, 0)


@pytest.mark.families
def test_status_shows_the_running_mount(pbx, mounted):
    recordings = pbx.populate(5, days=2)
    mount = mounted()
    with open(mount.path(*date_path(recordings[0].name)), "rb") as handle:
        handle.read()
    result = yeastarfs("status", mount.mountpoint, "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["recordings_indexed"] == 5
    assert status["pbx_reachable"] is True
    assert status["cache_used_bytes"] == recordings[0].size_bytes
    assert status["pid"] == mount.process.pid
    text = yeastarfs("status", mount.mountpoint)
    assert text.returncode == 0 and "reachable" in text.stdout and "recordings:        5" in text.stdout
    not_mounted = yeastarfs("status", "/tmp")
    assert not_mounted.returncode == 1 and "not a running yeastarfs mount" in not_mounted.stderr


def test_sighup_polls_now_and_sigusr1_logs_statistics(pbx, mounted):
    pbx.populate(1, days=1)
    mount = mounted("--poll-interval", "3600", "--no-events")
    rec = add(pbx, size_bytes=ONE_MB, minutes_ago=3)
    mount.process.send_signal(signal.SIGHUP)
    wait_until(lambda: os.path.exists(mount.path(*date_path(rec.name))), timeout_s=5,
               message="the recording the SIGHUP poll found")
    mount.process.send_signal(signal.SIGUSR1)
    wait_until(lambda: "statistics:" in mount.log(), timeout_s=5, message="statistics in the log")
    assert os.path.ismount(mount.mountpoint)


@pytest.mark.families
def test_prefetch_caches_a_folder_with_progress_and_a_summary(pbx, mounted):
    recordings = [add(pbx, size_bytes=ONE_MB, minutes_ago=10 + i) for i in range(5)]
    mount = mounted()
    day = os.path.dirname(mount.path(*date_path(recordings[0].name)))
    result = yeastarfs("prefetch", day, "--jobs", "3")
    assert result.returncode == 0, result.stderr
    assert "5 fetched, 0 already cached, 0 failed" in result.stderr
    assert download_requests(pbx)[1] == 5
    again = yeastarfs("prefetch", day)
    assert "0 fetched, 5 already cached" in again.stderr
    assert download_requests(pbx)[1] == 5
    for rec in recordings:
        assert os.getxattr(mount.path(*date_path(rec.name)), "user.yeastarfs.cached") == b"1"


@pytest.mark.families
def test_calls_lists_the_index_with_paths(pbx, mounted):
    recordings = pbx.populate(4, days=2)
    mount = mounted()
    pbx.reset()
    result = yeastarfs("calls", mount.mountpoint, "--since", "3d")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["recording"] for row in rows] == [rec.name for rec in recordings]
    assert all(os.path.exists(row["path"]) for row in rows)
    assert rows[0]["caller"] == recordings[0].callfrom
    as_json = [json.loads(line) for line in yeastarfs("calls", mount.mountpoint, "--format", "json").stdout.splitlines()]
    assert [row["recording"] for row in as_json] == [rec.name for rec in recordings]
    assert download_requests(pbx) == (0, 0)


def test_cache_stats_verify_and_clear(pbx, mounted):
    recordings = [add(pbx, size_bytes=ONE_MB, minutes_ago=10 + i) for i in range(3)]
    mount = mounted()
    for rec in recordings:
        with open(mount.path(*date_path(rec.name)), "rb") as handle:
            handle.read()
    cache_root = mount.cache_root
    stats = yeastarfs("cache", "stats", "--cache-dir", cache_root)
    assert stats.returncode == 0 and "3 cached recordings" in stats.stdout
    verify = yeastarfs("cache", "verify", "--cache-dir", cache_root)
    assert verify.returncode == 0 and "3 good, 0 bad" in verify.stdout
    busy = yeastarfs("cache", "clear", "--cache-dir", cache_root)
    assert busy.returncode == 1 and "unmount it first" in busy.stderr
    assert mount.unmount() == 0
    with open(mount.cache_file(recordings[0].name), "r+b") as handle:  # a damaged file: one byte short
        handle.truncate(ONE_MB - 1)
    damaged = yeastarfs("cache", "verify", "--cache-dir", cache_root)
    assert damaged.returncode == 1 and "2 good, 1 bad" in damaged.stdout
    cleared = yeastarfs("cache", "clear", "--cache-dir", cache_root)
    assert cleared.returncode == 0 and "deleted 3 cached recordings" in cleared.stdout


@pytest.mark.families
def test_prefetch_new_caches_announced_recordings(pbx, mounted):
    old = pbx.populate(1, days=1)[0]
    mount = mounted("--prefetch", "new", "--poll-interval", "3600")
    announced = pbx.add_recording(start=dt.datetime.now() - dt.timedelta(minutes=1), duration_s=20, announce=True)
    wait_until(lambda: os.path.exists(mount.path(*date_path(announced.name))), timeout_s=5,
               message="the announced recording")
    wait_until(lambda: os.getxattr(mount.path(*date_path(announced.name)), "user.yeastarfs.cached") == b"1",
               timeout_s=10, message="the announced recording to be prefetched")
    pbx.reset()
    with open(mount.path(*date_path(announced.name)), "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == announced.sha256
    assert download_requests(pbx) == (0, 0)
    assert os.getxattr(mount.path(*date_path(old.name)), "user.yeastarfs.cached") == b"0"  # not announced


@pytest.mark.parametrize("pbx", [{"transport": "TCP"}], indirect=True)
def test_events_over_tcp_when_the_pbx_reports_by_tcp(pbx, mounted):
    pbx.populate(1, days=1)
    mount = mounted("--tcp-events-port", str(pbx.tcp_port), "--poll-interval", "3600")
    wait_until(lambda: pbx.counters["tcp_login"] >= 1, timeout_s=10, message="a TCP login")
    rec = pbx.add_recording(start=dt.datetime.now() - dt.timedelta(minutes=1), duration_s=20, announce=True)
    wait_until(lambda: os.path.exists(mount.path(*date_path(rec.name))), timeout_s=5,
               message="the recording announced over TCP")
    pbx.disconnect_tcp_clients()  # the PBX rebooted: the client reconnects and logs in again
    wait_until(lambda: pbx.counters["tcp_login"] >= 2, timeout_s=15, message="a second TCP login")
    second = pbx.add_recording(start=dt.datetime.now() - dt.timedelta(seconds=50), duration_s=10, announce=True)
    wait_until(lambda: os.path.exists(mount.path(*date_path(second.name))), timeout_s=5,
               message="the recording announced after the reconnection")


def test_prefetch_is_safe_to_interrupt(pbx, mounted):
    recordings = [add(pbx, size_bytes=2 * ONE_MB, minutes_ago=10 + i) for i in range(4)]
    mount = mounted()
    pbx.bandwidth_bps = 1_000_000
    day = os.path.dirname(mount.path(*date_path(recordings[0].name)))
    before = pbx.downloaded_bytes()
    process = subprocess.Popen(yeastarfs_command("prefetch", day, "--jobs", "2"), stderr=subprocess.PIPE, text=True)
    wait_until(lambda: pbx.downloaded_bytes() > before, timeout_s=10, message="the prefetch to start downloading")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "interrupted" in err
    pbx.bandwidth_bps = None
    for rec in recordings:  # nothing half-cached is served: every file still reads right
        with open(mount.path(*date_path(rec.name)), "rb") as handle:
            assert hashlib.sha256(handle.read()).hexdigest() == rec.sha256


@pytest.mark.parametrize("api", ["s-series", "p-series"])
def test_simulator_command_serves_the_api(tmp_path, api):
    password = write_password_file(tmp_path / "pw", "sim-secret")
    process = subprocess.Popen(yeastarfs_command("simulator", "--api", api, "--port", "0", "--recordings", "5",
                                                 "--password-file", password),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        url = line.split(" at ", 1)[1].split()[0]
        if api == "s-series":
            reply = requests.post(f"{url}/api/v2.0.0/login", timeout=10, json={
                "username": "api", "password": hashlib.md5(b"sim-secret").hexdigest()}).json()
            assert reply["status"] == "Success" and len(reply["token"]) == 32
        else:
            reply = requests.post(f"{url}/openapi/v1.0/get_token", timeout=10, headers={"User-Agent": "OpenAPI"},
                                  json={"username": "api", "password": "sim-secret"}).json()
            assert reply["errcode"] == 0 and len(reply["access_token"]) == 32
        assert "sim-secret" not in line
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


@pytest.mark.parametrize("api", ["s-series", "p-series"])
def test_demo_mounts_sample_recordings_and_unmounts_on_ctrl_c(tmp_path, api):
    mountpoint = tmp_path / "demo"
    process = subprocess.Popen(yeastarfs_command("demo", str(mountpoint), "--recordings", "12", "--api", api),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: os.path.ismount(mountpoint), timeout_s=30, message="the demo mount")
        files = [os.path.join(root, name) for root, _, names in os.walk(mountpoint) for name in names]
        assert len(files) == 12
        with open(files[0], "rb") as handle:
            assert handle.read(4) == b"RIFF"
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "Try, in another terminal" in out and "unmounted" in out
    assert not os.path.ismount(mountpoint)
