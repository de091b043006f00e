"""The core without a kernel: a real index, cache and download manager, the simulator over
loopback. Opens and reads of uncached recordings, cached ones, background readers, young
and deleted recordings, statfs and the counters ``status`` shows."""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import errno
import hashlib
import os
import subprocess
import sys
import threading
import time

import pytest

from harness import factory, wait_until
from yeastarfs import downloads as downloads_module
from yeastarfs import errors
from yeastarfs.cache import DiskCache
from yeastarfs.core import BLOCK_SIZE_BYTES, NOT_FOUND_GRACE_S, RANGE_META_KEY, Core
from yeastarfs.downloads import DownloadManager
from yeastarfs.index import RecordingIndex
from yeastarfs.models import Recording
from yeastarfs.readers import Reader

KIB = 1024
WAIT_S = 10.0
PR_SET_NAME = 15


@pytest.fixture(autouse=True)
def quick_policies(monkeypatch):
    monkeypatch.setattr(downloads_module, "KEEP_SUSPENDED_S", 0.5)
    monkeypatch.setattr(downloads_module, "JANITOR_INTERVAL_S", 0.05)


def core_over(pbx, make_client, folder, cache_bytes: int = 1 << 30, prefix: str = "", **core_options) -> Core:
    """A Core over a fresh index and cache (budget *cache_bytes*) in *folder*, their names
    starting with *prefix*, and a download manager talking to the simulator *pbx*, wired as
    the daemon wires it; every recording the simulator has is indexed."""
    index = RecordingIndex(str(folder / f"{prefix}index.sqlite3"))
    index.add([Recording(name=rec.name, talk_s=rec.talk_s, call_s=rec.call_s) for rec in pbx.recordings.values()])
    cache = DiskCache(str(folder / f"{prefix}cache"), cache_bytes)
    core = Core(index, cache, None, uid=0, gid=0, **core_options)
    core.downloads = DownloadManager(make_client(pbx).open_recording, cache, stall_timeout_s=10.0,
                                     on_size=core.size_learned, on_complete=core.download_complete,
                                     on_gone=core.recording_gone, on_range=core.range_learned,
                                     on_commit=core.download_committed)
    return core


def stop_core(core: Core) -> None:
    core.downloads.stop()
    core.index.close()


@pytest.fixture
def make_core(pbx, make_client, tmp_path):
    """Build cores with `core_over` in the test's folder; every one is stopped afterwards."""
    yield from factory(lambda **options: core_over(pbx, make_client, tmp_path, **options), stop_core)


def add(pbx, size_bytes: int, minutes_ago: int = 60, **options):
    start = dt.datetime.now().replace(microsecond=0) - dt.timedelta(minutes=minutes_ago)
    return pbx.add_recording(start=start, duration_s=max(1, (size_bytes - 44) / 16000), size_bytes=size_bytes,
                             announce=False, **options)


def path_of(rec) -> str:
    return f"/{rec.name[0:4]}/{rec.name[4:6]}/{rec.name[6:8]}/{rec.name}"


def read_all(core: Core, fh: int, block: int = 128 * KIB) -> bytes:
    parts, offset = [], 0
    while True:
        data = core.read(fh, offset, block)
        parts.append(data)
        offset += len(data)
        if len(data) < block:
            return b"".join(parts)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- uncached and cached -----------------------------------------------------------------------


def test_an_uncached_recording_is_opened_and_read_through_its_download(pbx, make_core):
    rec = add(pbx, 700_000)
    core = make_core()
    path = path_of(rec)
    assert core.stat(path).size_bytes != rec.size_bytes           # an estimate before the PBX speaks
    opened = core.open(path)
    assert opened.direct_io and not opened.keep_cache
    assert core.stat(path, opened.fh).size_bytes == rec.size_bytes  # open waited for the exact size
    assert core.stat(path).size_bytes == rec.size_bytes
    assert sha(read_all(core, opened.fh)) == rec.sha256
    core.release(opened.fh)
    wait_until(lambda: core.cache.contains(rec.name), WAIT_S, message="the recording to be cached")
    assert core.index.get(rec.name).size_exact
    # Cached now, and the kernel was told the exact size: page cache allowed.
    again = core.open(path)
    assert again.keep_cache and not again.direct_io
    assert sha(read_all(core, again.fh)) == rec.sha256
    core.release(again.fh)
    assert pbx.counters["recording/get_random"] == 1
    stats = core.transfer_stats()
    assert stats["opens"] == {"cached": 1, "joined": 0, "downloaded": 1, "refused": 0}
    assert stats["cache_hit_rate"] == 0.5


def test_readers_joining_a_download_are_not_misses(pbx, make_core):
    rec = add(pbx, 2_000_000)
    pbx.bandwidth_bps = 4_000_000
    core = make_core()
    handles = [core.open(path_of(rec)) for _ in range(4)]
    digests = []
    threads = [threading.Thread(target=lambda fh=opened.fh: digests.append(sha(read_all(core, fh))))
               for opened in handles]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_S)
    for opened in handles:
        core.release(opened.fh)
    assert digests == [rec.sha256] * 4
    stats = core.transfer_stats()
    assert stats["opens"] == {"cached": 0, "joined": 3, "downloaded": 1, "refused": 0}
    assert stats["cache_hit_rate"] == 0.0                        # one download: the one miss
    assert pbx.counters["recording/download"] == 1


def test_status_shows_downloads_by_state(pbx, make_core):
    rec = add(pbx, 3_000_000)
    pbx.bandwidth_bps = 1_000_000
    core = make_core()
    opened = core.open(path_of(rec))
    core.read(opened.fh, 0, 4 * KIB)
    [shown] = core.transfer_stats()["downloads_in_flight"]
    assert shown["recording"] == rec.name and shown["readers"] == 1
    assert shown["state"] in ("running", "parked", "suspended") and shown["total_bytes"] == rec.size_bytes
    core.release(opened.fh)
    wait_until(lambda: core.transfer_stats()["downloads_in_flight"] == [], WAIT_S,
               message="the sniffed download to be dropped")


# -- background readers ------------------------------------------------------------------------


@contextlib.contextmanager
def process_named(name: str):
    """A child process whose kernel name (comm) is *name*, as the Reader FUSE would report for
    one of its threads (here its main thread)."""
    child = subprocess.Popen([sys.executable, "-c", NAMED_CHILD, name], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        yield Reader(pid=child.pid, uid=os.getuid())
    finally:
        child.kill()
        child.wait()


NAMED_CHILD = """
import ctypes, sys, time
ctypes.CDLL(None).prctl(15, ctypes.c_char_p(sys.argv[1].encode()), 0, 0, 0)  # PR_SET_NAME
print("ready", flush=True)
time.sleep(60)
"""


def test_a_background_reader_gets_only_cached_recordings(pbx, make_core):
    cached, uncached = add(pbx, 300_000, minutes_ago=61), add(pbx, 300_000, minutes_ago=62)
    core = make_core(background_readers=("tumblerd",))
    opened = core.open(path_of(cached))
    read_all(core, opened.fh)
    core.release(opened.fh)
    wait_until(lambda: core.cache.contains(cached.name), WAIT_S, message="one recording to be cached")
    pbx.reset()
    with process_named("tumblerd") as thumbnailer:
        began = time.monotonic()
        with pytest.raises(errors.BackgroundReaderError):
            core.open(path_of(uncached), reader=thumbnailer)
        assert time.monotonic() - began < 1.0
        served = core.open(path_of(cached), reader=thumbnailer)
        assert sha(read_all(core, served.fh)) == cached.sha256
        core.release(served.fh)
    assert pbx.counters["recording/get_random"] == 0
    # An ordinary process (a person's player) gets the uncached one.
    with process_named("vlc") as player:
        ordinary = core.open(path_of(uncached), reader=player)
        assert sha(read_all(core, ordinary.fh)) == uncached.sha256
        core.release(ordinary.fh)
    assert core.transfer_stats()["opens"]["refused"] == 1


def test_a_thread_named_like_a_background_reader_is_not_one(pbx, make_core):
    # The kernel reports the calling thread; a thread's name is not its program's.
    rec = add(pbx, 100_000)
    core = make_core(background_readers=("tumblerd",))
    outcome = {}

    def named_thread() -> None:
        ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(b"tumblerd"), 0, 0, 0)
        outcome["opened"] = core.open(path_of(rec), reader=Reader(pid=threading.get_native_id()))

    thread = threading.Thread(target=named_thread)
    thread.start()
    thread.join(timeout=WAIT_S)
    assert sha(read_all(core, outcome["opened"].fh)) == rec.sha256
    core.release(outcome["opened"].fh)


def test_no_background_readers_when_told_none(pbx, make_core):
    rec = add(pbx, 100_000)
    core = make_core(background_readers=())
    with process_named("tumblerd") as thumbnailer:
        opened = core.open(path_of(rec), reader=thumbnailer)
        assert sha(read_all(core, opened.fh)) == rec.sha256
        core.release(opened.fh)


# -- recordings not there yet, and gone ----------------------------------------------------------


def test_a_young_recording_the_pbx_is_still_writing_is_waited_for(pbx, make_core):
    core = make_core()
    # Announced now (first seen now), its call just over, its audio there in 2 s.
    rec = pbx.add_recording(duration_s=3, size_bytes=200_044, announce=False, ready_after_s=2.0)
    core.index.add([Recording(name=rec.name, talk_s=rec.talk_s)])
    began = time.monotonic()
    opened = core.open(path_of(rec))
    assert sha(read_all(core, opened.fh)) == rec.sha256
    core.release(opened.fh)
    assert 2.0 <= time.monotonic() - began < NOT_FOUND_GRACE_S
    assert not core.index.get(rec.name).gone


def test_a_recording_deleted_on_the_pbx_leaves_its_folder_unless_cached(pbx, make_core):
    kept, lost = add(pbx, 100_000, minutes_ago=61), add(pbx, 100_000, minutes_ago=62)
    core = make_core()
    invalidated = []
    core.set_invalidator(invalidated.append)
    opened = core.open(path_of(kept))
    read_all(core, opened.fh)
    core.release(opened.fh)
    wait_until(lambda: core.cache.contains(kept.name), WAIT_S, message="one recording to be cached")
    for rec in (kept, lost):
        pbx.delete_recording(rec.name)
    began = time.monotonic()
    with pytest.raises(errors.RecordingNotFoundError):             # found by the backfill: no grace
        core.open(path_of(lost))
    assert time.monotonic() - began < 2.0
    assert core.index.get(lost.name).gone and path_of(lost) in invalidated
    day = os.path.dirname(path_of(lost))
    assert [entry[0] for entry in core.list(day)] == [kept.name]
    with pytest.raises(errors.NoSuchPathError):
        core.stat(path_of(lost))
    again = core.open(path_of(kept))                                # the cached copy stays readable
    assert sha(read_all(core, again.fh)) == kept.sha256
    core.release(again.fh)


# -- what the kernel and status are told -----------------------------------------------------------


def test_statfs_shows_the_budget_and_its_use_never_full_when_idle(pbx, make_core):
    recs = [add(pbx, 300_000, minutes_ago=60 + i) for i in range(3)]
    budget = 1_000_000
    core = make_core(cache_bytes=budget)
    idle = core.statfs()
    assert idle.blocks == budget // BLOCK_SIZE_BYTES
    assert idle.blocks_free == idle.blocks_available == idle.blocks
    for rec in recs:
        opened = core.open(path_of(rec))
        read_all(core, opened.fh)
        core.release(opened.fh)
    wait_until(lambda: all(core.cache.contains(rec.name) for rec in recs), WAIT_S, message="all three cached")
    full = core.statfs()
    assert full.blocks_free == (budget - 900_000) // BLOCK_SIZE_BYTES   # what the cache holds
    assert full.blocks_available == full.blocks                          # idle files make room on demand
    opened = core.open(path_of(recs[0]))                                 # in use: not available
    assert core.statfs().blocks_available == (budget - 300_000) // BLOCK_SIZE_BYTES
    core.release(opened.fh)


def test_what_the_downloads_learn_about_range_is_kept(pbx, make_core):
    rec = add(pbx, 600_000)
    pbx.range_mode = "honour"
    pbx.reset_after_bytes, pbx.reset_downloads = 200_000, 1
    core = make_core()
    opened = core.open(path_of(rec))
    assert sha(read_all(core, opened.fh)) == rec.sha256
    core.release(opened.fh)
    assert core.index.get_meta(RANGE_META_KEY) == "1"
    assert core.transfer_stats()["pbx_honours_range"] is True


def test_sizes_are_estimated_at_the_learned_rate_and_it_survives_a_restart(pbx, make_core, tmp_path):
    """README (Sizes): talk seconds x the bytes per second learned from this PBX's completed
    downloads, 16,000 at first; the learned rate is kept across restarts."""
    start = dt.datetime.now().replace(microsecond=0) - dt.timedelta(hours=1)
    slow = pbx.add_recording(start=start, duration_s=10, size_bytes=44 + 10 * 8000, announce=False)
    fast = pbx.add_recording(start=start + dt.timedelta(minutes=1), duration_s=10, size_bytes=44 + 10 * 12000,
                             announce=False)
    unseen = pbx.add_recording(start=start + dt.timedelta(minutes=2), duration_s=10, announce=False)
    core = make_core()
    assert core.stat(path_of(unseen)).size_bytes == 44 + 10 * 16000
    for rec, rate in ((slow, 8000), (fast, 8800)):  # the first learned as is, then 20 % of each new one
        opened = core.open(path_of(rec))
        assert sha(read_all(core, opened.fh)) == rec.sha256
        core.release(opened.fh)
        wait_until(lambda: core.stat(path_of(unseen)).size_bytes == 44 + 10 * rate, WAIT_S,
                   message=lambda: f"the estimate at {rate} B/s, not {core.stat(path_of(unseen)).size_bytes}")
    with RecordingIndex(str(tmp_path / "index.sqlite3")) as reopened:  # the next start
        restarted = Core(reopened, core.cache, None, uid=0, gid=0)
        assert restarted.stat(path_of(unseen)).size_bytes == 44 + 10 * 8800


def test_the_background_errno_is_one_thumbnailers_record():
    from yeastarfs.fs import _errno_for
    assert _errno_for(errors.BackgroundReaderError("x")) == errno.EACCES


def test_the_cache_attributes_say_what_is_held(pbx, make_core):
    """README (Seeing and steering): user.yeastarfs.cache says `complete`, `partial <bytes
    held> of <total, or ?>` or `none`; user.yeastarfs.cached is 1 or 0; neither is listed."""
    rec = add(pbx, 2_000_044)
    core = make_core()
    path = path_of(rec)
    assert core.xattr(path, "user.yeastarfs.cache") == b"none"
    assert core.xattr(path, "user.yeastarfs.cached") == b"0"
    pbx.bandwidth_bps = 500_000
    opened = core.open(path)
    try:
        core.read(opened.fh, 0, 4 * KIB)
        state = core.xattr(path, "user.yeastarfs.cache").decode()
        held, total = state.split()[1], state.split()[3]
        assert state.startswith("partial ") and 0 < int(held) < rec.size_bytes and total == str(rec.size_bytes)
        pbx.bandwidth_bps = None
        assert sha(read_all(core, opened.fh)) == rec.sha256
    finally:
        core.release(opened.fh)
    wait_until(lambda: core.xattr(path, "user.yeastarfs.cache") == b"complete", WAIT_S, message="complete")
    assert core.xattr(path, "user.yeastarfs.cached") == b"1"
    names = core.xattr_names(path)
    assert "user.yeastarfs.cache" not in names and "user.yeastarfs.cached" not in names
    for name in ("user.yeastarfs.cache", "user.yeastarfs.cached", "trusted.x", "user.yeastar.nothing"):
        with pytest.raises(errors.NoSuchAttributeError):
            core.xattr("/" + rec.name[0:4], name)   # a folder has none of them
    with pytest.raises(errors.NoSuchAttributeError):
        core.xattr(path, "security.selinux")


def test_open_waits_5_s_for_a_size_and_a_partial_download_of_unknown_length_says_so(pbx, make_core):
    """README (Sizes): `open` waits (up to 5 s) for the PBX's reply headers."""
    rec = add(pbx, 2_000_044)
    pbx.omit_content_length = True  # the headers never tell the size
    pbx.bandwidth_bps = 20_000      # slow: the first window is still arriving after 5 s
    core = make_core()
    began = time.monotonic()
    opened = core.open(path_of(rec))
    waited_s = time.monotonic() - began
    assert 5.0 <= waited_s < 5.9, waited_s
    pbx.bandwidth_bps = 500_000
    try:
        core.read(opened.fh, 0, 4 * KIB)
        state = core.xattr(path_of(rec), "user.yeastarfs.cache").decode()
        assert state.startswith("partial ") and state.endswith(" of ?")
    finally:
        pbx.bandwidth_bps = None
        core.release(opened.fh)
