"""Faults survived and hostile input refused, through a real mount (issue: reliability and security)."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import signal
import socket
import stat
import subprocess
import time

import pytest

from harness import date_path, holds_for, mount_command, sha256_of, wait_until
from test_streaming import ONE_MB, add

pytestmark = pytest.mark.fuse


def read_errno(path: str) -> int:
    try:
        sha256_of(path)
    except OSError as exc:
        return exc.errno
    return 0


@pytest.mark.families(s_series={"token_idle_s": 2.0}, p_series={"access_token_ttl_s": 2.0})
def test_the_token_is_kept_alive_across_a_long_download_and_idle_time(pbx, pbx_view, mounted):
    # S-Series: the PBX drops a token idle for 2 s, the heartbeat keeps it. P-Series: the
    # access token lives 2 s, it is refreshed (and the WebSocket resubscribed) before it ends.
    slow, later = add(pbx, size_bytes=ONE_MB), add(pbx, size_bytes=ONE_MB, minutes_ago=31)
    mount = mounted("--poll-interval", "3600", *pbx_view.token_keeping_args(2.0))
    logins = pbx_view.logins()
    pbx.bandwidth_bps = 200_000  # a 5 s stream: two token lifetimes
    assert sha256_of(mount.path(*date_path(slow.name))) == slow.sha256
    pbx.bandwidth_bps = None
    time.sleep(2.5)  # and idle for longer than a token lives
    assert sha256_of(mount.path(*date_path(later.name))) == later.sha256
    assert pbx_view.logins() == logins
    assert pbx_view.keepalives() >= 2


@pytest.mark.families
def test_expired_tokens_are_renewed_transparently(pbx, pbx_view, mounted):
    # S-Series: the PBX rebooted. P-Series: the refresh token has expired too, so the only way
    # back is a new login (exactly one).
    recordings = [add(pbx, size_bytes=ONE_MB, minutes_ago=20 + i) for i in range(2)]
    mount = mounted()
    pbx.reset()
    pbx.expire_all_tokens()
    assert sha256_of(mount.path(*date_path(recordings[0].name))) == recordings[0].sha256
    assert pbx_view.logins() == 1
    assert sha256_of(mount.path(*date_path(recordings[1].name))) == recordings[1].sha256
    assert pbx_view.logins() == 1


def test_pbx_down_mid_session(pbx, mounted):
    cached, uncached = add(pbx, size_bytes=ONE_MB, minutes_ago=30), add(pbx, size_bytes=ONE_MB, minutes_ago=31)
    mount = mounted("--poll-interval", "1")
    mount.errors_expected = True
    assert sha256_of(mount.path(*date_path(cached.name))) == cached.sha256
    pbx.refuse_connections = True
    assert sha256_of(mount.path(*date_path(cached.name))) == cached.sha256
    assert uncached.name in os.listdir(os.path.dirname(mount.path(*date_path(uncached.name))))
    started = time.monotonic()
    assert read_errno(mount.path(*date_path(uncached.name))) == errno.EIO
    # README (Failures): four consecutive failures, 0.5 + 1 + 2 s of backoff between them.
    failed_after_s = time.monotonic() - started
    assert 3.5 <= failed_after_s < 4.5, failed_after_s
    pbx.refuse_connections = False
    assert sha256_of(mount.path(*date_path(uncached.name))) == uncached.sha256


@pytest.mark.families
def test_mount_comes_up_from_the_index_when_the_pbx_is_down(pbx, mounted):
    cached = add(pbx, size_bytes=ONE_MB, minutes_ago=30)
    first = mounted()
    assert sha256_of(first.path(*date_path(cached.name))) == cached.sha256
    assert first.unmount() == 0
    pbx.refuse_connections = True
    second = mounted("--poll-interval", "1", cache_root=first.cache_root)
    second.errors_expected = True
    assert sha256_of(second.path(*date_path(cached.name))) == cached.sha256
    pbx.refuse_connections = False
    later = add(pbx, size_bytes=ONE_MB, minutes_ago=5)
    wait_until(lambda: os.path.exists(second.path(*date_path(later.name))), timeout_s=15,
               message="the recording added once the PBX was back")
    assert sha256_of(second.path(*date_path(later.name))) == later.sha256


@pytest.mark.parametrize("pbx, mode", [({"family": "s-series"}, mode) for mode in
                                       ("json", "http500", "html", "truncate", "overlong")]
                         + [({"family": "p-series"}, mode) for mode in ("json", "truncate")],
                         indirect=["pbx"], ids=lambda value: value["family"] if isinstance(value, dict) else value)
def test_failing_downloads_give_eio_and_are_never_cached(pbx, mounted, mode):
    rec = add(pbx, size_bytes=ONE_MB)
    mount = mounted()
    mount.errors_expected = True
    pbx.fail_mode = mode
    pbx.fail_downloads = 100
    assert read_errno(mount.path(*date_path(rec.name))) == errno.EIO
    assert os.listdir(mount.complete_dir) == []
    wait_until(lambda: os.listdir(mount.partial_dir) == [], timeout_s=5, message="the partial file to go")
    pbx.fail_downloads = 0
    assert sha256_of(mount.path(*date_path(rec.name))) == rec.sha256


def test_locked_out_start_says_so(pbx, password_file, tmp_path):
    pbx.lock_ip("127.0.0.1")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = subprocess.run(mount_command(mountpoint, pbx.base_url, tmp_path / "cache", password_file),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "locked" in result.stderr
    assert pbx.counters["login"] == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_unmount_cleanly(pbx, mounted, signum):
    pbx.populate(2, days=1)
    mount = mounted()
    mount.process.send_signal(signum)
    assert mount.process.wait(timeout=20) == 0
    assert not os.path.ismount(mount.mountpoint)


def test_disk_full_fails_the_read_cleanly_and_the_mount_stays_up(pbx, mounted, tmp_path):
    small, big = add(pbx, size_bytes=ONE_MB, minutes_ago=30), add(pbx, size_bytes=6 * ONE_MB, minutes_ago=31)
    cache_root = tmp_path / "small-cache"
    cache_root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(cache_root)], check=True)
    try:
        mount = mounted("--cache-size", "100M", cache_root=cache_root)
        mount.errors_expected = True
        assert read_errno(mount.path(*date_path(big.name))) == errno.EIO
        assert big.name not in os.listdir(mount.complete_dir)
        wait_until(lambda: os.listdir(mount.partial_dir) == [], timeout_s=5, message="the partial file to go")
        assert sha256_of(mount.path(*date_path(small.name))) == small.sha256
        assert os.listdir(mount.mountpoint)
        assert mount.unmount() == 0
    finally:
        subprocess.run(["umount", str(cache_root)], check=False)


def test_hostile_names_and_broken_rows_are_never_exposed(pbx, mounted):
    good = add(pbx, size_bytes=50_044)
    start = dt.datetime.now() - dt.timedelta(hours=1)
    hostile = ["../20261127093012-1.1-1-2-Inbound.wav", "20261127093012-1.2-1-2-x/y.wav",
               "20261127093012-1.3-1\\2-Inbound.wav", "..", "20261127093012-1.4-1-2-\x01.wav",
               "2026112709301" + "9" * 250 + ".wav", "not-a-date.wav", "20261399093012-1.5-1-2-Inbound.wav"]
    for index, name in enumerate(hostile):
        pbx.add_recording(start=start + dt.timedelta(seconds=index), duration_s=3, name=name, announce=False)
    pbx.add_cdr_row({"callid": "broken", "timestart": start.strftime("%Y-%m-%d %H:%M:%S"),
                     "recording": "20261127093012-9.9-1-2-Inbound.wav,extra,\"unterminated"})
    mount = mounted()
    files = [os.path.join(root, f) for root, _, fs in os.walk(mount.mountpoint) for f in fs]
    assert [os.path.basename(f) for f in files] == [good.name]
    log = mount.log()
    assert log.count("rejected") >= 6
    assert sha256_of(files[0]) == good.sha256


def test_events_from_other_addresses_are_refused(pbx, mounted):
    pbx.populate(1, days=1)
    mount = mounted()
    start = dt.datetime.now() - dt.timedelta(minutes=2)
    name = start.strftime("%Y%m%d%H%M%S") + "-1795000000.77-1001-2002-Inbound.wav"
    event = json.dumps({"event": "NewCdr", "callid": "1795000000.77", "recording": name}).encode()
    request = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
               + str(len(event)).encode() + b"\r\nConnection: close\r\n\r\n" + event)
    with socket.create_connection(("127.0.0.1", mount.events_port), timeout=5,
                                  source_address=("127.0.0.2", 0)) as conn:
        conn.sendall(request)
        reply = conn.recv(200)
    assert b" 403 " in reply.split(b"\r\n", 1)[0]
    holds_for(lambda: not os.path.exists(mount.path(*date_path(name))), duration_s=0.5,
              message="the refused event's recording staying unknown")


@pytest.mark.families
def test_secrets_never_reach_logs_argv_or_files(pbx, pbx_view, mounted, password_file):
    rec, failing = add(pbx, size_bytes=ONE_MB), add(pbx, size_bytes=ONE_MB, minutes_ago=7)
    mount = mounted()
    mount.errors_expected = True
    pbx.reset_after_bytes, pbx.reset_downloads = 300_000, 1
    assert sha256_of(mount.path(*date_path(rec.name))) == rec.sha256
    pbx.expire_all_tokens()
    pbx.fail_downloads, pbx.fail_mode = 100, "json"
    assert read_errno(mount.path(*date_path(failing.name))) == errno.EIO  # a new token, then failures
    with open(password_file) as handle:
        secrets = {handle.read().strip()} | pbx_view.secrets()
    assert len(secrets) > 3
    with open(f"/proc/{mount.process.pid}/cmdline", "rb") as handle:
        argv = handle.read().decode()
    pbx_dir = mount.pbx_dir
    texts = {"log": mount.log(), "argv": argv}
    for root, _, files in os.walk(pbx_dir):  # index, lock, cached files: every byte
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                texts[os.path.join(root, name)] = handle.read().decode("latin-1")
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"a secret leaked into {where}"
    assert stat.S_IMODE(os.stat(mount.cache_root).st_mode) == 0o700  # created new by the daemon: private
    assert stat.S_IMODE(os.stat(pbx_dir).st_mode) == 0o700
    for root, dirs, files in os.walk(pbx_dir):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o700
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) == 0o600, f
