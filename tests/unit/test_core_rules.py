"""The core's small rules, asked directly of a Core over a real index and cache (no PBX: a
cached recording is put in the cache the way a download commits it): attributes of folders
and files, which size wins, listing pages, the bounded memo of sizes told to the kernel,
what the downloads teach (sizes, Range, the rate), statfs, what ``status`` shows and the
extended attributes' namespaces."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import stat
import subprocess
import time
from typing import Optional

import pytest

from harness import factory, wait_until
from test_core import add as sim_add, core_over, path_of as sim_path, read_all, stop_core
from yeastarfs import downloads as downloads_module
from yeastarfs import errors
from yeastarfs.cache import DiskCache
from yeastarfs.core import RATE_META_KEY, REPORTED_SIZES_MAX, Attributes, Core
from yeastarfs.downloads import DownloadManager
from yeastarfs.index import RecordingIndex
from yeastarfs.models import Recording
from yeastarfs.readers import Reader

DAY = "/2026/11/27"
NAMES = [f"2026112709{minute:02d}12-17954007{minute:02d}.1-0612345678-1001-Inbound.wav" for minute in (10, 20, 30)]
FIRST, SECOND, THIRD = NAMES
BLOCK = 128 * 1024          # README: st_blksize and statfs blocks of 128 KiB
ESTIMATE = 44 + 10 * 16000  # README (Sizes): 10 s of talk at 16,000 bytes per second, before any is learned


def path(name: str) -> str:
    return f"{DAY}/{name}"


def never_called(name, offset):
    raise AssertionError(f"the PBX was asked for {name}")


@pytest.fixture
def make_core(tmp_path):
    """Cores over one index (three recordings of 10 s talk on 2026-11-27) and one cache
    (budget *cache_bytes*); ``downloads={...}`` adds a download manager with no workers
    (those options)."""
    def build(cache_bytes: int = 1 << 30, downloads: Optional[dict] = None, **options) -> Core:
        index = RecordingIndex(str(tmp_path / "index.sqlite3"))
        index.add([Recording(name=name, callid=name.split("-")[1], callfrom="0612345678", talk_s=10)
                   for name in NAMES])
        cache = DiskCache(str(tmp_path / "cache"), cache_bytes)
        manager = None if downloads is None else DownloadManager(never_called, cache, max_downloads=0, **downloads)
        return Core(index, cache, manager, uid=0, gid=0, **options)

    def stop(core: Core) -> None:
        if core.downloads is not None:
            core.downloads.stop()
        core.index.close()

    yield from factory(build, stop)


def put_in_cache(cache, name: str, size_bytes: int) -> None:
    partial = cache.new_partial(name)
    partial.write(b"RIFF" + bytes(size_bytes - 4))
    partial.expect(size_bytes)
    partial.commit()
    partial.sync()
    partial.close()


def kernel_may_keep_pages(core: Core, name: str) -> bool:
    """Open cached *name*: may the kernel's page cache serve it (it was told this size)?"""
    opened = core.open(path(name))
    core.release(opened.fh)
    assert opened.keep_cache is not opened.size_changed
    assert opened.direct_io is (not opened.keep_cache)    # page cache, or direct I/O: one of them
    return opened.keep_cache


# -- attributes ---------------------------------------------------------------------------------


def test_a_folder_is_a_folder_of_size_0_with_its_own_time(make_core):
    core = make_core()
    [(name, is_dir, _, mtime_ns, _)] = core.list("/2026/11")
    assert (name, is_dir) == ("27", True) and mtime_ns > 0
    assert core.stat(DAY) == Attributes(True, 0, mtime_ns, 0)


def test_a_file_is_not_a_folder(make_core):
    core = make_core()
    listed = {name: mtime_ns for name, _, _, mtime_ns, _ in core.list(DAY)}
    assert core.stat(path(FIRST)) == Attributes(False, ESTIMATE, listed[FIRST], 0)


def test_getattr_and_readdir_are_counted_once_each(make_core):
    core = make_core()
    for _ in range(3):
        core.stat(path(FIRST))
        core.list(DAY)
    core.stat(DAY)
    assert core.counters["getattr"] == 4 and core.counters["readdir"] == 3


# -- which size is true ---------------------------------------------------------------------------


def test_an_open_file_has_the_size_it_reads_and_an_exact_index_size_stands_without_it(make_core):
    # The index holds an exact size (the catalogue's) that the cached copy does not have:
    # a path's attributes say the index's; an open handle's say what that handle reads.
    core = make_core()
    put_in_cache(core.cache, FIRST, 5_000)
    core.index.set_size(FIRST, 7_000)
    opened = core.open(path(FIRST))
    try:
        assert core.stat(path(FIRST), opened.fh).size_bytes == 5_000
        assert core.stat(path(FIRST)).size_bytes == 7_000
        assert len(core.read(opened.fh, 0, 10_000)) == 5_000
    finally:
        core.release(opened.fh)


def test_a_listing_gives_a_cached_file_its_cached_size(make_core):
    core = make_core()
    put_in_cache(core.cache, SECOND, 5_000)
    assert [(name, size, stored) for name, _, size, _, stored in core.list(DAY)] == [
        (FIRST, ESTIMATE, 0), (SECOND, 5_000, 5_000), (THIRD, ESTIMATE, 0)]
    assert kernel_may_keep_pages(core, SECOND)   # the listing told the kernel its exact size


def test_a_listing_is_paged(make_core):
    core = make_core()
    assert [entry[0] for entry in core.list(DAY, skip=1, limit=1)] == [SECOND]
    assert [entry[0] for entry in core.list(DAY, after=FIRST, skip=1, limit=5)] == [THIRD]
    assert [entry[0] for entry in core.list(DAY, after=FIRST, limit=1)] == [SECOND]


def test_the_sizes_told_are_forgotten_when_a_stat_fills_the_memo(make_core):
    core = make_core()
    put_in_cache(core.cache, FIRST, 5_000)
    core.stat(path(FIRST))
    assert kernel_may_keep_pages(core, FIRST)
    core._reported_sizes.update((f"x{i}", 1) for i in range(REPORTED_SIZES_MAX - len(core._reported_sizes)))
    core.stat(path(SECOND))                       # the memo is full: it starts again
    assert not kernel_may_keep_pages(core, FIRST)


def test_the_sizes_told_are_forgotten_when_a_listing_fills_the_memo(make_core):
    core = make_core()
    put_in_cache(core.cache, FIRST, 5_000)
    core._reported_sizes.update((f"x{i}", 1) for i in range(REPORTED_SIZES_MAX - 3))
    core.list(DAY)                                # three more: full, so forgotten
    assert not kernel_may_keep_pages(core, FIRST)


def test_a_listing_below_the_bound_keeps_what_it_told(make_core):
    core = make_core()
    put_in_cache(core.cache, FIRST, 5_000)
    core._reported_sizes.update((f"x{i}", 1) for i in range(REPORTED_SIZES_MAX - 4))
    core.list(DAY)
    assert kernel_may_keep_pages(core, FIRST)


# -- what the downloads teach --------------------------------------------------------------------------


def test_a_size_learned_reaches_the_index_and_the_kernel_forgets_the_estimate(make_core):
    core = make_core()
    forgotten = []
    core.set_invalidator(forgotten.append)
    core.size_learned(SECOND, 123_456)
    assert forgotten == [path(SECOND)]
    assert core.stat(path(SECOND)).size_bytes == 123_456


@pytest.mark.parametrize("honoured, stored", [(True, "1"), (False, "0")])
def test_whether_range_works_is_kept_for_the_next_start(make_core, honoured, stored):
    core = make_core()
    core.range_learned(honoured)
    assert core.index.get_meta("pbx_honours_range") == stored
    core.index.close()
    restarted = make_core(downloads={})
    assert restarted.downloads.range_honoured is honoured
    assert restarted.transfer_stats()["pbx_honours_range"] is honoured


def test_a_completed_download_of_an_unknown_recording_teaches_nothing(make_core):
    core = make_core()
    core.download_complete("20261127090000-1.1-1-2-Inbound.wav", 1_000_000)
    assert core.index.get_meta(RATE_META_KEY) is None
    assert core.stat(path(FIRST)).size_bytes == ESTIMATE


def test_the_learned_rate_is_at_least_a_byte_per_second(make_core):
    core = make_core()
    core.download_complete(FIRST, 44)      # a header and no audio: the rate would be 0
    assert float(core.index.get_meta(RATE_META_KEY)) == 1.0
    assert core.stat(path(SECOND)).size_bytes == 44 + 10 * 1


def test_a_commit_of_a_recording_not_read_through_the_mount_fills_no_pages(make_core):
    core = make_core()
    filled = []
    core.set_page_filler(lambda p: 7, lambda inode, size, pread: filled.append((inode, size)) or True)
    core.stat(path(FIRST))
    core.download_committed(FIRST, ESTIMATE, lambda size, offset: b"")   # a prefetch: no inode noted
    assert filled == []


@pytest.mark.parametrize("size_bytes, filled_expected", [
    ((128 << 20), True), ((128 << 20) + 1, False)])  # the limit written here, not imported: 128 MiB
def test_pages_are_filled_up_to_the_limit_inclusive(make_core, size_bytes, filled_expected):
    core = make_core()
    filled = []
    core.set_page_filler(lambda p: 7, lambda inode, size, pread: filled.append((inode, size)) or True)
    core.index.set_size(FIRST, size_bytes)
    assert core.stat(path(FIRST)).size_bytes == size_bytes      # the kernel is told the exact size
    core._inodes[FIRST] = 7                                      # as `open` notes it for a download
    core.download_committed(FIRST, size_bytes, lambda size, offset: b"")
    assert filled == ([(7, size_bytes)] if filled_expected else [])


# -- statfs -----------------------------------------------------------------------------------------------


def test_statfs_counts_idle_and_open_cached_files(make_core):
    budget = 1_000_000
    core = make_core(cache_bytes=budget)
    put_in_cache(core.cache, FIRST, 300_000)
    put_in_cache(core.cache, SECOND, 200_000)
    opened = core.open(path(FIRST))                         # in use: pinned, not idle
    try:
        stats = core.statfs()
    finally:
        core.release(opened.fh)
    assert (stats.block_size, stats.blocks) == (BLOCK, budget // BLOCK)
    assert stats.blocks_free == (budget - 500_000) // BLOCK
    assert stats.blocks_available == (budget - 300_000) // BLOCK
    assert (stats.files, stats.name_max) == (3, 255)


def test_a_budget_under_one_block_is_one_block(make_core):
    assert make_core(cache_bytes=100_000).statfs().blocks == 1


# -- what status shows --------------------------------------------------------------------------------------


def test_status_without_downloads_shows_no_opens_and_no_rate(make_core):
    assert make_core().transfer_stats() == {
        "opens": {"cached": 0, "joined": 0, "downloaded": 0, "refused": 0},
        "cache_hit_rate": None, "downloads_in_flight": [], "pbx_honours_range": None}


def test_status_with_downloads_before_any_open(make_core):
    stats = make_core(downloads={}).transfer_stats()
    assert stats["cache_hit_rate"] is None and stats["downloads_in_flight"] == []


def test_the_hit_rate_is_shown_to_three_decimals(make_core):
    core = make_core(downloads={})
    put_in_cache(core.cache, FIRST, 5_000)
    for _ in range(2):
        kernel_may_keep_pages(core, FIRST)                # two opens served by the cache
    download = core.downloads.acquire(SECOND)             # one that started a download
    core.downloads.release(download)
    assert core.transfer_stats()["cache_hit_rate"] == 0.667


# -- extended attributes --------------------------------------------------------------------------------------


def test_only_the_root_carries_the_status_and_only_under_its_name(make_core):
    core = make_core(status=lambda: {"up": True})
    assert json.loads(core.xattr("/", "user.yeastarfs.status")) == {"up": True}
    assert core.xattr_names("/") == ["user.yeastarfs.status"]
    assert core.xattr_names(DAY) == []
    for where, name in (("/2026", "user.yeastarfs.status"), (DAY, "user.anything"),
                        ("/", "user.yeastar.callid"), ("/", "user.yeastarfs.other")):
        with pytest.raises(errors.NoSuchAttributeError):
            core.xattr(where, name)


def test_without_a_status_the_root_has_no_attributes(make_core):
    core = make_core()
    assert core.xattr_names("/") == []
    with pytest.raises(errors.NoSuchAttributeError):
        core.xattr("/", "user.yeastarfs.status")


def test_only_the_yeastar_namespace_gives_cdr_fields(make_core):
    core = make_core()
    assert core.xattr(path(FIRST), "user.yeastar.caller") == b"0612345678"
    for name in ("user.someone.callid", "user.someone.caller", "user.yeastar."):
        with pytest.raises(errors.NoSuchAttributeError):
            core.xattr(path(FIRST), name)


# -- handles ----------------------------------------------------------------------------------------------


def test_releasing_a_cached_file_unpins_it_and_an_unknown_handle_is_ignored(make_core):
    core = make_core()
    put_in_cache(core.cache, FIRST, 5_000)
    opened = core.open(path(FIRST))
    assert core.cache.usage()["pinned_bytes"] == 5_000
    core.release(opened.fh)
    assert core.cache.usage()["pinned_bytes"] == 0 and core.cache.usage()["idle_bytes"] == 5_000
    core.release(opened.fh)                     # twice, or a handle never given: nothing happens
    core.release(12345)
    assert core.cache.contains(FIRST)


# -- young recordings ---------------------------------------------------------------------------------------


def young_entry(core: Core, name: str, call_ended_before_seen_s: float, talk_s: float, seen_ago_s: float = 1.0):
    """*name*'s entry first seen *seen_ago_s* ago, its call (of *talk_s* s of talk) over
    *call_ended_before_seen_s* before that: the call started talk_s earlier still."""
    seen_s = time.time() - seen_ago_s
    start_s = seen_s - call_ended_before_seen_s - talk_s
    entry = core.index.get(name)
    recording = dataclasses.replace(entry.recording, talk_s=talk_s)
    return dataclasses.replace(entry, first_seen=seen_s, mtime_ns=int(start_s * 1e9), recording=recording)


@pytest.mark.parametrize("ended_before_s, talk_s, seen_ago_s, grace_s", [
    (5, 10, 1.0, 30.0),        # just written: the PBX may still be writing it
    (500, 200, 1.0, 30.0),     # started 700 s before it was seen, but ended 500 s before
    (599, 10, 1.0, 30.0),
    (700, 10, 1.0, 0.0),       # a backfill found an old call: no grace
    (5, 10, 61.0, 0.0),        # first seen over a minute ago: no grace
])
def test_which_recordings_are_young(make_core, ended_before_s, talk_s, seen_ago_s, grace_s):
    core = make_core()
    assert core._not_found_grace_s(young_entry(core, FIRST, ended_before_s, talk_s, seen_ago_s)) == grace_s


@pytest.mark.parametrize("talk_s, call_s, ended_before_s, grace_s", [
    (0, 200, 500, 30.0),       # unanswered: the call's length says when it ended
    (200, None, 500, 30.0),    # answered, no call length: the talk says it
    (0, 0, 600.5, 0.0),        # neither: the call ended when it started, over 600 s before
])
def test_a_call_ends_after_its_talk_or_else_its_length(make_core, talk_s, call_s, ended_before_s, grace_s):
    core = make_core()
    seen_s = time.time() - 1.0
    length_s = talk_s or call_s or 0
    entry = core.index.get(FIRST)
    recording = dataclasses.replace(entry.recording, talk_s=talk_s, call_s=call_s)
    entry = dataclasses.replace(entry, first_seen=seen_s, recording=recording,
                                mtime_ns=int((seen_s - ended_before_s - length_s) * 1e9))
    assert core._not_found_grace_s(entry) == grace_s


def test_a_call_that_ended_exactly_600_s_before_it_was_seen_is_still_young(make_core):
    core = make_core()
    start_s = int(time.time()) - 611                  # whole seconds: the sums below are exact
    entry = core.index.get(FIRST)
    recording = dataclasses.replace(entry.recording, talk_s=10)
    entry = dataclasses.replace(entry, mtime_ns=start_s * 10**9, first_seen=float(start_s + 10 + 600),
                                recording=recording)
    assert core._not_found_grace_s(entry) == 30.0


def test_a_recording_with_no_first_sighting_is_not_young(make_core):
    core = make_core()
    entry = dataclasses.replace(young_entry(core, FIRST, 5, 10), first_seen=None)
    assert core._not_found_grace_s(entry) == 0.0


# -- a new core ------------------------------------------------------------------------------------------------


def test_a_core_by_default_is_owned_by_its_user_and_readable_by_all(tmp_path):
    with RecordingIndex(str(tmp_path / "index.sqlite3")) as index:
        core = Core(index, DiskCache(str(tmp_path / "cache"), 1 << 20), None)
        assert (core.uid, core.gid) == (os.getuid(), os.getgid())
        assert core.mode_of(True) == stat.S_IFDIR | 0o555 and core.mode_of(False) == stat.S_IFREG | 0o444
        other = Core(index, core.cache, None, uid=1234, gid=2345, umask=0)
        assert (other.uid, other.gid) == (1234, 2345)
        assert other.mode_of(True) == stat.S_IFDIR | 0o555 and other.mode_of(False) == stat.S_IFREG | 0o444


def test_every_operation_is_counted_once(make_core):
    core = make_core()
    put_in_cache(core.cache, FIRST, 5_000)
    core.stat(path(FIRST))
    core.list(DAY)
    opened = [core.open(path(FIRST)) for _ in range(2)]
    assert core.read(opened[0].fh, 100, 10) == bytes(10)
    assert core.read(opened[1].fh, 4990, 100) == bytes(10)
    for handle in opened:
        core.release(handle.fh)
    assert core.counters == {"getattr": 1, "read": 2, "open": 2, "readdir": 1, "open_cached": 2, "open_refused": 0}


def test_each_open_gets_its_own_positive_handle(make_core):
    core = make_core()
    put_in_cache(core.cache, FIRST, 5_000)
    put_in_cache(core.cache, SECOND, 6_000)
    first, second, third = core.open(path(FIRST)), core.open(path(SECOND)), core.open(path(FIRST))
    handles = [first.fh, second.fh, third.fh]
    assert len(set(handles)) == 3 and all(isinstance(fh, int) and fh > 0 for fh in handles)
    core.release(first.fh)
    assert core.stat(path(SECOND), second.fh).size_bytes == 6_000
    assert len(core.read(third.fh, 0, 10_000)) == 5_000
    core.release(second.fh)
    core.release(third.fh)


def test_a_bad_handle_is_named(make_core):
    with pytest.raises(errors.BadHandleError) as info:
        make_core().read(4242, 0, 10)
    assert "4242" in str(info.value)


def test_the_learned_rate_is_kept_for_the_next_start_and_learning_goes_on_from_it(make_core):
    core = make_core()
    core.download_complete(FIRST, 44 + 10 * 8000)
    core.index.close()
    restarted = make_core()
    assert restarted.stat(path(SECOND)).size_bytes == 44 + 10 * 8000
    restarted.download_complete(SECOND, 44 + 10 * 12000)     # 20 % of the way to the new one
    assert restarted.stat(path(THIRD)).size_bytes == 44 + 10 * 8800


def test_a_stored_range_answer_reaches_a_new_manager_but_not_one_told_at_start(make_core):
    core = make_core()
    core.range_learned(False)
    core.index.close()
    without = make_core()                 # no download manager: nothing to tell it, nothing fails
    assert without.transfer_stats()["pbx_honours_range"] is None
    without.index.close()
    assert make_core(downloads={}).downloads.range_honoured is False
    given = make_core(downloads={"range_honoured": True})
    assert given.downloads.range_honoured is True


# -- recordings the PBX no longer has -------------------------------------------------------------------------


def test_a_recording_gone_from_the_pbx_stays_only_if_cached(make_core):
    core = make_core()
    put_in_cache(core.cache, SECOND, 5_000)
    core.index.mark_gone(FIRST)
    core.index.mark_gone(SECOND)
    with pytest.raises(errors.NoSuchPathError) as info:
        core.stat(path(FIRST))
    assert path(FIRST) in str(info.value)
    assert core.stat(path(SECOND)).size_bytes == 5_000
    assert [entry[0] for entry in core.list(DAY)] == [SECOND, THIRD]


# -- recordings not cached: opened through their download (the simulator over loopback) -------------------------------


@pytest.fixture
def sim_core(pbx, make_client, tmp_path):
    """Cores whose downloads talk to the test's simulator, indexing what it holds when built."""
    yield from factory(lambda **options: core_over(pbx, make_client, tmp_path, prefix="sim-", **options), stop_core)


def test_an_uncached_recording_is_read_with_direct_io_and_its_pages_come_at_commit(pbx, sim_core):
    rec = sim_add(pbx, 300_044)
    core = sim_core()
    where = sim_path(rec)
    filled = []
    core.set_page_filler(lambda p: 42 if p == where else None,
                         lambda inode, size, pread: filled.append((inode, size, hashlib.sha256(pread(size, 0)).hexdigest()))
                         or True)
    assert core.stat(where).size_bytes != rec.size_bytes            # the kernel was told an estimate
    opened = core.open(where)
    assert (opened.keep_cache, opened.direct_io, opened.size_changed) == (False, True, True)
    assert core.stat(where, opened.fh).size_bytes == rec.size_bytes  # now the exact size
    assert hashlib.sha256(read_all(core, opened.fh)).hexdigest() == rec.sha256
    core.release(opened.fh)
    wait_until(lambda: core.cache.contains(rec.name), 5.0, message="the recording to be cached")
    assert filled == [(42, rec.size_bytes, rec.sha256)]
    assert core.downloads.counts == {"started": 1, "joined": 0}


def test_an_uncached_recording_whose_exact_size_the_kernel_has_needs_no_invalidation(pbx, sim_core):
    rec = sim_add(pbx, 200_044)
    core = sim_core()
    core.index.set_size(rec.name, rec.size_bytes)
    core.stat(sim_path(rec))
    opened = core.open(sim_path(rec))
    assert (opened.keep_cache, opened.direct_io, opened.size_changed) == (False, True, False)
    assert core.read(opened.fh, 0, 4) == b"RIFF"
    core.release(opened.fh)


def test_a_failed_open_lets_go_of_its_download(pbx, sim_core):
    rec = sim_add(pbx, 100_044, stored=False)         # an old call whose audio the PBX lacks
    core = sim_core()
    began = time.monotonic()
    with pytest.raises(errors.RecordingNotFoundError):
        core.open(sim_path(rec))
    assert time.monotonic() - began < 5.0               # not young: no 30 s grace
    wait_until(lambda: core.downloads.running() == [], 5.0, message="the download to be retired")
    with pytest.raises(errors.NoSuchPathError):
        core.stat(sim_path(rec))


def test_a_young_recording_is_waited_for(pbx, sim_core, monkeypatch):
    monkeypatch.setattr(downloads_module, "NOT_FOUND_BACKOFF_S", 0.02)
    monkeypatch.setattr(downloads_module, "NOT_FOUND_BACKOFF_MAX_S", 0.02)
    rec = pbx.add_recording(duration_s=3, size_bytes=20_044, announce=False, ready_after_s=0.1)
    core = sim_core()                                   # first seen now, just after its call
    opened = core.open(sim_path(rec))
    assert hashlib.sha256(read_all(core, opened.fh)).hexdigest() == rec.sha256
    core.release(opened.fh)


def test_a_background_reader_is_refused_an_uncached_recording_by_name(pbx, sim_core):
    rec = sim_add(pbx, 100_044)
    core = sim_core(background_readers=("sleep",))
    child = subprocess.Popen(["sleep", "30"])
    try:
        for _ in range(2):
            with pytest.raises(errors.BackgroundReaderError) as info:
                core.open(sim_path(rec), reader=Reader(pid=child.pid, uid=os.getuid()))
    finally:
        child.kill()
        child.wait()
    assert sim_path(rec) in str(info.value) and "sleep" in str(info.value)
    assert core.counters["open_refused"] == 2 and pbx.counters["recording/get_random"] == 0


def test_the_inodes_of_downloads_being_read_are_bounded(pbx, sim_core):
    rec = sim_add(pbx, 100_044)
    core = sim_core()
    where = sim_path(rec)
    filled = []
    core.set_page_filler(lambda p: 42 if p == where else None,
                         lambda inode, size, pread: filled.append((inode, size)) or True)
    core.index.set_size(FIRST, 1000)   # not in this index: a name the memo still holds
    core._reported_sizes[FIRST] = 1000
    core._inodes.update((f"x{i}", i) for i in range(REPORTED_SIZES_MAX - 1))
    core._inodes[FIRST] = 9
    opened = core.open(where)                          # the memo is full: it starts again
    core.release(opened.fh)
    core.download_committed(FIRST, 1000, lambda size, offset: bytes(size))
    assert filled == []
