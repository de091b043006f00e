"""The download engine through a real mount: sharing, waiting, faults, early leavers, LRU, crashes."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
import time

import pytest

from harness import CLEAN_STOP_MARKER, date_path, download_requests, holds_for, sha256_of, wait_stable, wait_until

pytestmark = pytest.mark.fuse

ONE_MB = 1_000_044  # 62.5 s of 8 kHz 16-bit audio plus the 44-byte header


def add(pbx, *, size_bytes: int, minutes_ago: int = 30, **kwargs):
    start = dt.datetime.now().replace(microsecond=0) - dt.timedelta(minutes=minutes_ago)
    return pbx.add_recording(start=start, duration_s=max(1, (size_bytes - 44) / 16000), size_bytes=size_bytes,
                             announce=False, **kwargs)


@pytest.mark.families
def test_eight_concurrent_readers_share_one_download(pbx, mounted):
    rec = add(pbx, size_bytes=3 * ONE_MB)
    pbx.bandwidth_bps = 4_000_000  # slow enough that all readers overlap the download
    mount = mounted()
    path = mount.path(*date_path(rec.name))
    pbx.reset()
    pbx.bandwidth_bps = 4_000_000
    barrier = threading.Barrier(8)

    def reader(_: int) -> str:
        barrier.wait()
        return sha256_of(path)

    with ThreadPoolExecutor(8) as pool:
        digests = list(pool.map(reader, range(8), timeout=60))
    assert digests == [rec.sha256] * 8
    assert download_requests(pbx) == (1, 1)


def test_first_64k_of_a_slow_download_arrives_early(pbx, mounted):
    rec = add(pbx, size_bytes=2_000_044)
    mount = mounted()
    path = mount.path(*date_path(rec.name))
    pbx.bandwidth_bps = 200_000
    started = time.monotonic()
    with open(path, "rb", buffering=0) as handle:
        head = handle.read(65536)
        took_s = time.monotonic() - started
    assert head == pbx.recording_bytes(rec.name)[:65536]
    assert took_s < 2.0


@pytest.mark.families
@pytest.mark.parametrize("honour_range", [True, False])
def test_reset_mid_download_is_recovered(pbx, pbx_view, mounted, honour_range):
    rec = add(pbx, size_bytes=2 * ONE_MB)
    mount = mounted()
    pbx.reset()
    pbx.honour_range = honour_range
    pbx.reset_after_bytes = 700_000
    pbx.reset_downloads = 1
    assert sha256_of(mount.path(*date_path(rec.name))) == rec.sha256
    first_steps, downloads = download_requests(pbx)
    assert downloads == 2  # the attempt cut short, and the one that resumed or verified it
    assert first_steps == pbx_view.first_steps_for(2)  # a fresh random each, or one resource URL
    assert os.path.getsize(mount.cache_file(rec.name)) == rec.size_bytes


def test_sniffing_readers_pull_less_than_half(pbx, mounted):
    recordings = [add(pbx, size_bytes=ONE_MB, minutes_ago=30 + i) for i in range(6)]
    mount = mounted()
    pbx.reset()
    # A small PBX's uplink: with loopback speed the PBX would push a whole 1 MB file into
    # socket buffers before any client could react, which no client can prevent.
    pbx.bandwidth_bps = 2_000_000
    for rec in recordings:
        with open(mount.path(*date_path(rec.name)), "rb") as handle:
            assert handle.read(4096) == pbx.recording_bytes(rec.name)[:4096]
    pulled = wait_stable(pbx.downloaded_bytes, quiet_s=0.3, timeout_s=5, message="the PBX to stop sending")
    assert pulled < 0.5 * 6 * ONE_MB, f"pulled {pulled} bytes"
    holds_for(lambda: pbx.downloaded_bytes() == pulled, duration_s=1.0,
              message="suspended: the PBX is not sending any more")
    assert os.listdir(mount.complete_dir) == []
    # Reopening a sniffed file resumes its download and gets the right bytes.
    assert sha256_of(mount.path(*date_path(recordings[0].name))) == recordings[0].sha256


def test_a_recording_read_to_the_end_is_cached_whole(pbx, mounted):
    rec = add(pbx, size_bytes=ONE_MB)
    mount = mounted()
    assert sha256_of(mount.path(*date_path(rec.name))) == rec.sha256
    mount.wait_cached(rec.name, timeout_s=5)
    assert os.path.getsize(mount.cache_file(rec.name)) == rec.size_bytes


def test_lru_keeps_the_cache_within_its_budget_across_remount(pbx, mounted):
    recordings = [add(pbx, size_bytes=2_000_044, minutes_ago=40 - i) for i in range(3)]
    mount = mounted("--cache-size", "2M")
    for rec in recordings:
        assert sha256_of(mount.path(*date_path(rec.name))) == rec.sha256
    complete_dir = mount.complete_dir
    wait_until(lambda: os.listdir(complete_dir) == [recordings[-1].name], timeout_s=5,
               message=lambda: f"only the newest cached, not {os.listdir(complete_dir)}")
    on_disk = sum(os.path.getsize(os.path.join(complete_dir, n)) for n in os.listdir(complete_dir))
    assert on_disk <= 2 * 1024 * 1024
    assert mount.unmount() == 0
    pbx.reset()
    assert os.path.exists(os.path.join(mount.pbx_dir, CLEAN_STOP_MARKER))
    again = mounted("--cache-size", "2M", cache_root=mount.cache_root)
    assert "did not stop cleanly" not in again.log()
    assert sha256_of(again.path(*date_path(recordings[-1].name))) == recordings[-1].sha256
    assert download_requests(pbx) == (0, 0)


def test_kill_9_during_download_then_remount_reads_correct_bytes(pbx, mounted):
    rec = add(pbx, size_bytes=2 * ONE_MB)
    mount = mounted()
    mount.errors_expected = True
    pbx.bandwidth_bps = 300_000
    path = mount.path(*date_path(rec.name))
    handle = open(path, "rb", buffering=0)
    assert handle.read(100_000) == pbx.recording_bytes(rec.name)[:100_000]
    mount.process.send_signal(signal.SIGKILL)
    mount.process.wait(timeout=10)
    pbx.bandwidth_bps = None
    pbx.reset()
    # The dead mountpoint answers ENOTCONN; the next start must recover it by itself.
    again = mounted(cache_root=mount.cache_root, mountpoint=mount.mountpoint)
    assert "did not stop cleanly" in again.log()  # so cached sizes are checked
    assert sha256_of(again.path(*date_path(rec.name))) == rec.sha256
    assert download_requests(pbx) == (1, 1)
    with pytest.raises(OSError):
        handle.close()  # the old handle belonged to the dead mount


def test_a_short_cached_file_is_deleted_after_an_unclean_stop_and_fetched_again(pbx, mounted):
    """README (Failures): after a stop that was not clean, every cached file is compared with
    the size the PBX announced, and a short one (renamed but not yet fsynced) is deleted."""
    short, whole = add(pbx, size_bytes=ONE_MB, minutes_ago=30), add(pbx, size_bytes=ONE_MB, minutes_ago=31)
    mount = mounted()
    mount.errors_expected = True
    for rec in (short, whole):
        assert sha256_of(mount.recording_path(rec.name)) == rec.sha256
        mount.wait_cached(rec.name, timeout_s=5)
    mount.process.send_signal(signal.SIGKILL)
    mount.process.wait(timeout=10)
    os.truncate(mount.cache_file(short.name), ONE_MB // 2)  # what a power loss leaves of an unsynced file
    pbx.reset()
    again = mounted(cache_root=mount.cache_root, mountpoint=mount.mountpoint)
    assert "did not stop cleanly" in again.log()
    assert not os.path.exists(again.cache_file(short.name))  # deleted at start, before anyone reads it
    assert os.path.getsize(again.cache_file(whole.name)) == whole.size_bytes
    assert sha256_of(again.recording_path(whole.name)) == whole.sha256
    assert download_requests(pbx) == (0, 0)                # the whole one is served from the cache
    assert sha256_of(again.recording_path(short.name)) == short.sha256
    assert download_requests(pbx) == (1, 1)                # the short one is a fresh download
    again.wait_cached(short.name, timeout_s=5)
    assert os.path.getsize(again.cache_file(short.name)) == short.size_bytes


def test_seeking_to_the_end_of_an_uncached_recording(pbx, mounted):
    rec = add(pbx, size_bytes=3 * ONE_MB)
    mount = mounted()
    pbx.bandwidth_bps = 2_000_000
    data = pbx.recording_bytes(rec.name)
    with open(mount.path(*date_path(rec.name)), "rb") as handle:
        header = handle.read(44)
        handle.seek(-4096, os.SEEK_END)
        tail = handle.read()
        handle.seek(1_000_000)
        middle = handle.read(8192)
    assert header == data[:44]
    assert tail == data[-4096:]
    assert middle == data[1_000_000:1_008_192]


def test_fstat_right_after_open_gives_the_exact_size(pbx, mounted):
    rec = add(pbx, size_bytes=ONE_MB + 123_456)  # talk seconds estimate differs from the truth
    mount = mounted()
    pbx.bandwidth_bps = 500_000
    path = mount.path(*date_path(rec.name))
    estimate = os.stat(path).st_size
    assert estimate != rec.size_bytes
    with open(path, "rb") as handle:
        assert os.fstat(handle.fileno()).st_size == rec.size_bytes
        assert os.stat(path).st_size == rec.size_bytes  # mid-download, without a handle too
        handle.seek(-100, os.SEEK_END)
        assert handle.read() == pbx.recording_bytes(rec.name)[-100:]


def test_opening_a_recording_the_pbx_lost_is_enoent(pbx, mounted):
    rec = pbx.add_recording(start=dt.datetime.now() - dt.timedelta(hours=1), duration_s=5, stored=False,
                            announce=False)
    mount = mounted()
    mount.errors_expected = True
    with pytest.raises(FileNotFoundError):
        open(mount.path(*date_path(rec.name)), "rb")


def test_repeated_reads_of_a_cached_recording_are_served_by_the_kernel(pbx, mounted):
    rec = add(pbx, size_bytes=ONE_MB)
    mount = mounted()
    path = mount.path(*date_path(rec.name))
    assert sha256_of(path) == rec.sha256          # downloads and caches
    wait_until(lambda: os.stat(path).st_size == rec.size_bytes, timeout_s=2.5,
               message="the kernel's attributes to hold the exact size")
    assert sha256_of(path) == rec.sha256          # from the cache file, into the page cache
    reads_before = _status(mount)["fuse_reads"]
    for _ in range(3):
        assert sha256_of(path) == rec.sha256      # from the page cache: Python is not asked
    assert _status(mount)["fuse_reads"] == reads_before


def _status(mount) -> dict:
    return json.loads(os.getxattr(mount.mountpoint, "user.yeastarfs.status"))


def test_many_parallel_readers_get_their_bytes_without_warnings(pbx, mounted):
    recordings = [add(pbx, size_bytes=300_044, minutes_ago=20 + i) for i in range(24)]
    mount = mounted("--max-downloads", "24")
    with ThreadPoolExecutor(len(recordings)) as pool:
        hashes = pool.map(lambda rec: sha256_of(mount.path(*date_path(rec.name))), recordings, timeout=60)
        digests = {rec.name: digest for rec, digest in zip(recordings, hashes)}
    assert digests == {rec.name: rec.sha256 for rec in recordings}
    assert download_requests(pbx) == (24, 24)
    assert " WARNING " not in mount.log()
