"""What transfers cost the PBX and the cache, through a real mount (issues 9, 10, 11, 18):
accounting by bytes held, repeated opens, background readers, recordings not written yet
or deleted, and what ``df`` and ``status`` say."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import download_requests, sha256_of, wait_until
from test_streaming import ONE_MB, add

pytestmark = pytest.mark.fuse

KIB = 1024
MIB = 1 << 20


def status(mount) -> dict:
    return json.loads(os.getxattr(mount.mountpoint, "user.yeastarfs.status"))


def sniff(path: str) -> bytes:
    """What a file manager does: open, read 4 KiB, close."""
    with open(path, "rb") as handle:
        return handle.read(4 * KIB)


def read_all(mount, recordings) -> None:
    for rec in recordings:
        assert sha256_of(mount.recording_path(rec.name)) == rec.sha256
    for rec in recordings:
        mount.wait_cached(rec.name, timeout_s=10)


def bytes_on_disk(mount) -> int:
    total = 0
    for folder in (mount.complete_dir, mount.partial_dir):
        for entry in os.scandir(folder):
            total += entry.stat().st_size
    return total


# -- accounting by bytes held ------------------------------------------------------------------


def test_sniffing_never_evicts_what_was_read(pbx, mounted):
    small = [add(pbx, size_bytes=400_044, minutes_ago=30 + i) for i in range(6)]
    large = [add(pbx, size_bytes=1_900_044, minutes_ago=40 + i) for i in range(2)]
    mount = mounted("--cache-size", "4M")
    read_all(mount, small)
    for rec in large:
        assert sniff(mount.recording_path(rec.name)) == pbx.recording_bytes(rec.name)[:4 * KIB]
    mount.wait_settled()
    wait_until(lambda: os.listdir(mount.partial_dir) == [], 10, message="the sniffed downloads to be dropped")
    pbx.reset()
    read_all(mount, small)
    assert download_requests(pbx) == (0, 0)
    assert sorted(os.listdir(mount.complete_dir)) == sorted(rec.name for rec in small)


def test_a_recording_larger_than_the_cache_evicts_nothing_and_stays_readable(pbx, mounted):
    cached = [add(pbx, size_bytes=2_000_044, minutes_ago=30 + i) for i in range(10)]
    huge = add(pbx, size_bytes=24 * 1_000_000 + 44, minutes_ago=50)
    mount = mounted("--cache-size", "20M")
    read_all(mount, cached)
    assert sniff(mount.recording_path(huge.name)) == pbx.recording_bytes(huge.name)[:4 * KIB]
    mount.wait_settled()
    assert sorted(os.listdir(mount.complete_dir)) == sorted(rec.name for rec in cached)
    assert sha256_of(mount.recording_path(huge.name)) == huge.sha256     # read whole: right bytes
    wait_until(lambda: os.listdir(mount.partial_dir) == [], 10, message="the large download to finish")
    assert sorted(os.listdir(mount.complete_dir)) == sorted(rec.name for rec in cached)  # and not kept
    pbx.reset()
    read_all(mount, cached)
    assert download_requests(pbx) == (0, 0)


def test_a_hostile_duration_never_empties_the_cache(pbx, mounted):
    cached = [add(pbx, size_bytes=600_044, minutes_ago=30 + i) for i in range(6)]
    start = dt.datetime.now().replace(microsecond=0) - dt.timedelta(minutes=20)
    hostile = pbx.add_recording(start=start, duration_s=60, size_bytes=1_000_044, in_cdr=False, announce=False)
    pbx.add_cdr_row({"callid": hostile.callid, "timestart": hostile.timestart, "callfrom": "1001", "callto": "2002",
                     "callduraction": "9e18", "talkduraction": "9e18", "status": "ANSWERED", "type": "Inbound",
                     "recording": hostile.name})
    mount = mounted("--cache-size", "4M")
    read_all(mount, cached)
    path = mount.recording_path(hostile.name)
    assert 0 < os.stat(path).st_size <= 4 << 30                          # an estimate, not 1.4e23
    assert sniff(path) == pbx.recording_bytes(hostile.name)[:4 * KIB]
    mount.wait_settled()
    assert sorted(os.listdir(mount.complete_dir)) == sorted(rec.name for rec in cached)
    assert sha256_of(path) == hostile.sha256


# -- repeated opens ------------------------------------------------------------------------------


@pytest.mark.parametrize("range_mode", ["ignore", "honour"])
def test_a_thumbnailers_repeated_opens_cost_one_download_per_recording(pbx, mounted, range_mode):
    # The pattern tumbler showed: every file of a folder opened about 32 times, a little read
    # each time, from several threads.
    recordings = [add(pbx, size_bytes=1_200_044, minutes_ago=30 + i) for i in range(6)]
    mount = mounted()
    pbx.reset()
    pbx.range_mode = range_mode
    pbx.bandwidth_bps = 20_000_000

    def thumbnail_probe(job: int) -> None:
        rec = recordings[job % len(recordings)]
        path = mount.recording_path(rec.name)
        data = pbx.recording_bytes(rec.name)
        with open(path, "rb") as handle:
            assert handle.read(4 * KIB) == data[:4 * KIB]
            offset = (job * 91_000) % (rec.size_bytes - 8 * KIB)
            handle.seek(offset)
            assert handle.read(8 * KIB) == data[offset:offset + 8 * KIB]

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(thumbnail_probe, range(32 * len(recordings))))
    for rec in recordings:
        mount.wait_cached(rec.name, timeout_s=20)
    randoms = [e["body"]["recording"] for e in pbx.requests_log if e["endpoint"] == "recording/get_random"]
    assert sorted(randoms) == sorted(rec.name for rec in recordings)    # one transfer each, never restarted
    assert pbx.counters["recording/download"] == len(recordings)
    assert pbx.downloaded_bytes() <= sum(rec.size_bytes for rec in recordings)
    pbx.reset()
    with ThreadPoolExecutor(4) as pool:                                  # the folder viewed again
        list(pool.map(thumbnail_probe, range(32 * len(recordings))))
    assert download_requests(pbx) == (0, 0) and pbx.downloaded_bytes() == 0


# -- background readers ---------------------------------------------------------------------------


READ_AS = """
import ctypes, errno, sys, time
name = sys.argv[1].encode()
if name:
    ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME: what /proc/PID/comm says
began = time.monotonic()
try:
    with open(sys.argv[2], "rb") as handle:
        data = handle.read()
    print(len(data), round(time.monotonic() - began, 3))
except OSError as exc:
    print(errno.errorcode[exc.errno], round(time.monotonic() - began, 3))
"""


def read_as(process_name: str, path: str) -> tuple[str, float]:
    """Read *path* from a child process named *process_name*: (bytes read or errno name, seconds)."""
    result = subprocess.run([sys.executable, "-c", READ_AS, process_name, path], capture_output=True, text=True,
                            timeout=60, check=True)
    what, seconds = result.stdout.split()
    return what, float(seconds)


def test_a_thumbnailer_gets_cached_recordings_only_and_a_person_gets_everything(pbx, mounted):
    cached, uncached = add(pbx, size_bytes=ONE_MB, minutes_ago=30), add(pbx, size_bytes=ONE_MB, minutes_ago=31)
    mount = mounted()
    mount.errors_expected = True  # mfusepy logs every refused call with a traceback (at DEBUG)
    read_all(mount, [cached])
    pbx.reset()
    refused, seconds = read_as("tumblerd", mount.recording_path(uncached.name))
    assert refused == "EACCES" and seconds < 0.5, seconds
    assert read_as("tumblerd", mount.recording_path(cached.name))[0] == str(cached.size_bytes)
    assert download_requests(pbx) == (0, 0) and pbx.downloaded_bytes() == 0
    assert read_as("", mount.recording_path(uncached.name))[0] == str(uncached.size_bytes)  # an ordinary reader
    assert status(mount)["opens"]["refused"] == 1


def test_background_readers_can_be_named_or_turned_off(pbx, mounted):
    rec = add(pbx, size_bytes=200_044)
    mount = mounted("--background-readers", "my-indexer")
    mount.errors_expected = True
    assert read_as("my-indexer", mount.recording_path(rec.name))[0] == "EACCES"
    assert read_as("tumblerd", mount.recording_path(rec.name))[0] == str(rec.size_bytes)


# -- not written yet, deleted ---------------------------------------------------------------------


def test_a_recording_not_written_yet_reads_right_after_its_event(pbx, mounted):
    mount = mounted()
    rec = pbx.add_recording(duration_s=30, announce=True, ready_after_s=4)
    path = mount.recording_path(rec.name)
    wait_until(lambda: os.path.exists(path), 5, message="the event's recording to appear")
    began = time.monotonic()
    assert sha256_of(path) == rec.sha256
    assert time.monotonic() - began < 15
    assert pbx.counters["recording/get_random"] >= 2          # asked again until it was there


def test_a_recording_deleted_on_the_pbx_leaves_its_folder_unless_cached(pbx, mounted):
    kept, lost = add(pbx, size_bytes=200_044, minutes_ago=30), add(pbx, size_bytes=200_044, minutes_ago=31)
    mount = mounted()
    mount.errors_expected = True
    read_all(mount, [kept])
    folder = os.path.dirname(mount.recording_path(lost.name))
    assert lost.name in os.listdir(folder)
    for rec in (kept, lost):
        pbx.delete_recording(rec.name)
    with pytest.raises(FileNotFoundError):
        sha256_of(mount.recording_path(lost.name))
    wait_until(lambda: lost.name not in os.listdir(folder), 5, message="the deleted recording to leave its folder")
    assert kept.name in os.listdir(folder)
    assert sha256_of(mount.recording_path(kept.name)) == kept.sha256


# -- df and status --------------------------------------------------------------------------------


def df_use_percent(mountpoint: str) -> int:
    lines = subprocess.run(["df", "-P", mountpoint], capture_output=True, text=True, check=True).stdout.splitlines()
    return int(lines[-1].split()[4].rstrip("%"))


def test_df_shows_the_budget_and_an_idle_mount_is_never_full(pbx, mounted):
    recordings = [add(pbx, size_bytes=ONE_MB, minutes_ago=30 + i) for i in range(2)]
    mount = mounted("--cache-size", "2M")
    fresh = os.statvfs(mount.mountpoint)
    assert fresh.f_blocks * fresh.f_frsize == 2 * MIB
    assert fresh.f_bavail == fresh.f_bfree == fresh.f_blocks and df_use_percent(mount.mountpoint) == 0
    read_all(mount, recordings)                                 # the cache is now full, and idle
    # (once the kernel's asynchronous releases of the files have reached the daemon)
    full = wait_until(lambda: (lambda st: st if st.f_bavail == st.f_blocks else None)(os.statvfs(mount.mountpoint)),
                      5, message="the read files to be released")
    used = (full.f_blocks - full.f_bfree) * full.f_frsize
    assert abs(used - 2 * ONE_MB) < full.f_frsize               # what the cache holds
    assert full.f_bavail == full.f_blocks                      # idle files make room on demand
    assert df_use_percent(mount.mountpoint) < 100
    assert status(mount)["cache_used_bytes"] == bytes_on_disk(mount) == 2 * ONE_MB


def test_status_shows_joined_and_idle_downloads_and_the_bytes_held(pbx, mounted):
    shared, paused = add(pbx, size_bytes=3 * ONE_MB, minutes_ago=30), add(pbx, size_bytes=3 * ONE_MB, minutes_ago=31)
    mount = mounted()
    pbx.bandwidth_bps = 3_000_000
    with ThreadPoolExecutor(4) as pool:
        digests = list(pool.map(lambda _: sha256_of(mount.recording_path(shared.name)), range(4)))
    assert digests == [shared.sha256] * 4
    opens = status(mount)["opens"]
    assert opens["downloaded"] == 1 and opens["joined"] == 3 and status(mount)["cache_hit_rate"] == 0.0
    with open(mount.recording_path(paused.name), "rb") as handle:       # a reader that stops reading
        handle.read(4 * KIB)
        mount.wait_settled()
        [shown] = status(mount)["downloads_in_flight"]
        assert shown["recording"] == paused.name and shown["readers"] == 1
        assert shown["state"] in ("running", "parked") and shown["received_bytes"] < ONE_MB
        assert status(mount)["cache_used_bytes"] == bytes_on_disk(mount)   # bytes held, not announced sizes
    wait_until(lambda: status(mount)["downloads_in_flight"] == [], 10, message="the left download to be dropped")
    assert status(mount)["cache_used_bytes"] == bytes_on_disk(mount) == shared.size_bytes
    text = subprocess.run([sys.executable, "-m", "yeastarfs", "status", mount.mountpoint], capture_output=True,
                          text=True, check=True).stdout
    assert "2 started a download, 3 joined one" in text
