"""The cache with real files under tmp_path: DiskCache's byte-bounded LRU, pins, partial
files that grow, commits, restarts, the free-space floor, many threads at once; CacheDir's
lock, clean-stop marker and refusals (the attacks themselves, as another user, are in
tests/integration/test_cache_security.py)."""

from __future__ import annotations

import collections
import errno
import os
import pathlib
import random
import shutil
import stat
import sys
import threading
import time

import pytest

from yeastarfs import cache as cache_module
from yeastarfs import errors
from yeastarfs.cache import CacheDir, DiskCache, PartialFile, file_problem, riff_size

DiskUsage = collections.namedtuple("DiskUsage", "total used free")


def rec(i: int) -> str:
    return f"20261127{i:06d}-1764236100.{i}-1001-1002-Internal.wav"


A, B, C, D, E, X, Y = (rec(i) for i in range(1, 8))


def content(name: str, size_bytes: int) -> bytes:
    seed = name.encode("utf-8", "surrogateescape") or b"-"
    return (seed * (size_bytes // len(seed) + 1))[:size_bytes]


def fill(cache: DiskCache, name: str, size_bytes: int) -> PartialFile:
    """What a download does before its commit: a partial file, written (its pin grows)."""
    partial = cache.new_partial(name)
    partial.write(content(name, size_bytes))
    return partial


def finish(partial: PartialFile) -> None:
    """The rest of a whole download: commit, make durable, let go."""
    partial.commit()
    partial.sync()
    partial.close()


def store(cache: DiskCache, name: str, size_bytes: int) -> None:
    """A whole download: a partial file, written, committed, closed."""
    finish(fill(cache, name, size_bytes))


def complete_dir(cache: DiskCache) -> pathlib.Path:
    return pathlib.Path(cache.root) / "complete"


def partial_dir(cache: DiskCache) -> pathlib.Path:
    return pathlib.Path(cache.root) / "partial"


def on_disk(cache: DiskCache) -> set[str]:
    return set(os.listdir(complete_dir(cache)))


def disk_bytes(cache: DiskCache) -> int:
    return sum(path.stat().st_size for path in complete_dir(cache).iterdir())


def read_fd(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def set_mtime(cache: DiskCache, name: str, when: float) -> None:
    os.utime(cache.complete_path(name), (when, when))


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "cache")


@pytest.fixture
def cache(root):
    return DiskCache(root, max_bytes=1000)


# -- layout, commit --------------------------------------------------------------------------


def test_directories_are_private_even_when_they_existed(tmp_path):
    root = tmp_path / "cache"
    (root / "complete").mkdir(parents=True)
    os.chmod(root, 0o755)
    os.chmod(root / "complete", 0o777)
    old_umask = os.umask(0)  # the files' modes must not come from the umask
    try:
        cache = DiskCache(str(root), max_bytes=1000)
        partial = cache.new_partial(A)
    finally:
        os.umask(old_umask)
    for path in (root, root / "complete", root / "partial"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700, path
    assert partial.path.startswith(str(root / "partial") + os.sep)
    assert stat.S_IMODE(os.stat(partial.path).st_mode) == 0o600
    assert cache.complete_path(A) == str(root / "complete" / A)
    partial.discard()
    partial.close()


def test_commit_is_an_atomic_rename_to_a_private_file(cache):
    partial = fill(cache, A, 300)
    inode = os.stat(partial.path).st_ino
    partial.commit()
    final = cache.complete_path(A)
    assert not os.path.exists(partial.path)
    assert os.stat(final).st_ino == inode             # renamed, not copied
    assert stat.S_IMODE(os.stat(final).st_mode) == 0o600
    assert pathlib.Path(final).read_bytes() == content(A, 300)
    assert os.listdir(partial_dir(cache)) == []
    assert partial.pread(5, 0) == content(A, 5)       # readers of the download still read it
    partial.sync()
    partial.close()
    assert cache.contains(A) and cache.size_of(A) == 300


def test_commit_of_a_discarded_partial_raises_and_keeps_nothing(cache):
    partial = fill(cache, A, 300)
    partial.discard()
    assert os.listdir(partial_dir(cache)) == []
    with pytest.raises(errors.CacheError):
        partial.commit()
    partial.close()
    assert not cache.contains(A) and on_disk(cache) == set()
    assert cache.usage()["pinned"] == 0


def test_partial_names_are_a_hash_so_any_name_fits(cache):
    odd = "20261127101500-1.1-Jürgen 😀-" + "x" * 200 + ".wav"
    first, second, other = cache.new_partial(odd), cache.new_partial(odd), cache.new_partial(A)
    for partial in (first, second, other):
        assert os.path.dirname(partial.path) == str(partial_dir(cache))
        assert os.path.basename(partial.path).endswith(".part") and len(os.path.basename(partial.path)) < 70
    digest = os.path.basename(first.path).split(".")[0]
    assert len(digest) == 40 and os.path.basename(second.path).startswith(digest + ".")
    assert first.path != second.path                    # unique per download
    assert not os.path.basename(other.path).startswith(digest)
    for partial in (first, second, other):
        partial.discard()
        partial.close()
    store(cache, odd, 100)
    fd = cache.open_complete(odd)
    assert read_fd(fd) == content(odd, 100)
    os.close(fd)
    cache.release(odd)


# -- LRU by bytes ----------------------------------------------------------------------------


def test_lru_is_bounded_in_bytes_and_eviction_deletes_the_oldest_file(cache):
    for name in (A, B, C):
        store(cache, name, 300)
    assert on_disk(cache) == {A, B, C} and disk_bytes(cache) == 900
    store(cache, D, 300)
    assert on_disk(cache) == {B, C, D}
    assert not cache.contains(A) and cache.size_of(A) is None
    assert cache.open_complete(A) is None
    assert disk_bytes(cache) == 900 <= cache.max_bytes
    assert (cache.stats.evictions, cache.stats.evicted_bytes) == (1, 300)


def test_a_big_file_evicts_as_many_as_needed(cache):
    for name in (A, B, C):
        store(cache, name, 300)
    store(cache, D, 700)
    assert on_disk(cache) == {C, D}
    assert disk_bytes(cache) == 1000
    assert cache.stats.evictions == 2


def test_reading_makes_an_entry_the_most_recent(cache):
    for name in (A, B, C):
        store(cache, name, 300)
    fd = cache.open_complete(A)
    assert fd is not None
    assert read_fd(fd) == content(A, 300)
    os.close(fd)
    cache.release(A)
    store(cache, D, 300)
    assert on_disk(cache) == {A, C, D}    # B, not A, was least recently used


def test_size_of_and_contains_do_not_count_as_use(cache):
    # getattr asks size_of for every file an `ls -l` lists: that is not a read.
    for name in (A, B, C):
        store(cache, name, 300)
    assert cache.size_of(A) == 300 and cache.contains(A)
    store(cache, D, 300)
    assert on_disk(cache) == {B, C, D}


def test_hit_and_miss_counters(cache):
    assert cache.open_complete(A) is None
    store(cache, A, 100)
    fd = cache.open_complete(A)
    os.close(fd)
    cache.release(A)
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)


def test_open_that_fails_for_a_cached_file_keeps_it_cached(cache, monkeypatch):
    store(cache, A, 300)
    real_open = os.open

    def no_fds(path, *args, **kwargs):
        if path in (A, cache.complete_path(A)):  # by name in its folder, or by path
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_fds)
    assert cache.open_complete(A) is None
    monkeypatch.setattr(os, "open", real_open)
    assert cache.contains(A) and cache.usage()["idle_bytes"] == 300
    fd = cache.open_complete(A)
    assert fd is not None
    os.close(fd)
    cache.release(A)
    # Still accounted for: the budget still evicts it like any other file.
    store(cache, B, 800)
    assert on_disk(cache) == {B}


# -- pins ------------------------------------------------------------------------------------


def test_open_files_are_never_evicted_but_count_against_the_budget(cache):
    store(cache, A, 400)
    fd = cache.open_complete(A)
    assert fd is not None
    store(cache, B, 300)
    store(cache, C, 300)
    assert on_disk(cache) == {A, B, C}                   # 1000: fits exactly
    store(cache, D, 300)
    assert on_disk(cache) == {A, C, D}                   # B went, A is open
    assert cache.usage()["pinned_bytes"] == 400 and cache.usage()["idle_bytes"] == 600
    store(cache, E, 600)
    assert on_disk(cache) == {A, E}
    assert cache.clear() == 600
    assert on_disk(cache) == {A}                         # clear() leaves open files alone
    assert read_fd(fd) == content(A, 400)                # and the reader never noticed
    os.close(fd)
    cache.release(A)
    assert cache.contains(A) and cache.usage() == {
        "idle_bytes": 400, "pinned_bytes": 0, "files": 1, "pinned": 0, "max_bytes": 1000}


def test_release_returns_the_entry_as_most_recently_used(cache):
    for name in (A, B, C):
        store(cache, name, 300)
    fd = cache.open_complete(A)                          # A: oldest, but now pinned
    store(cache, D, 300)                                 # 300 pinned + 900 idle > 1000: B goes
    assert on_disk(cache) == {A, C, D}
    os.close(fd)
    cache.release(A)                                     # A is now the most recent
    store(cache, E, 300)
    assert on_disk(cache) == {A, D, E}                   # C went, not A


def test_a_file_open_twice_stays_pinned_until_the_last_release(cache):
    store(cache, A, 500)
    fds = [cache.open_complete(A), cache.open_complete(A)]
    assert cache.usage()["pinned"] == 1 and cache.usage()["pinned_bytes"] == 500
    os.close(fds[0])
    cache.release(A)
    store(cache, B, 700)                                 # 500 pinned + 700 > 1000, yet A stays
    assert A in on_disk(cache)
    os.close(fds[1])
    cache.release(A)
    assert cache.usage()["pinned"] == 0
    assert disk_bytes(cache) <= cache.max_bytes


def test_release_of_an_unknown_name_is_harmless(cache):
    store(cache, A, 100)
    cache.release(B)
    cache.release(A)    # A is idle: no pin to drop
    assert cache.contains(A) and cache.usage()["pinned"] == 0


# -- downloads: accounting by bytes held -------------------------------------------------------


def test_a_growing_download_evicts_only_as_much_as_it_holds(cache):
    for name in (A, B, C):
        store(cache, name, 300)
    partial = fill(cache, X, 100)                         # 100 + 900 fit: nothing goes
    assert on_disk(cache) == {A, B, C} and cache.stats.evictions == 0
    partial.write(content(X, 400)[100:])                  # 400 held: A goes, only A
    assert on_disk(cache) == {B, C}
    partial.write(content(X, 500)[400:])
    assert on_disk(cache) == {C}                          # 500 + 300 fit; only A and B had to go
    assert cache.usage()["pinned_bytes"] == 500
    partial.discard()
    partial.close()


def test_a_download_that_fits_evicts_nothing(cache):
    store(cache, A, 400)
    partial = fill(cache, X, 600)
    assert on_disk(cache) == {A}
    assert cache.stats.evictions == 0
    partial.discard()
    partial.close()


def test_a_download_left_early_counts_only_what_it_holds(cache):
    # A file manager sniffs a 1.9 MB recording: 4 KiB and a window, not the whole size.
    for name in (A, B, C):
        store(cache, name, 300)
    partial = fill(cache, X, 50)
    partial.expect(900)                                   # the PBX announced its size
    assert on_disk(cache) == {A, B, C}                    # held: 50, so 950 fit
    assert cache.usage()["pinned_bytes"] == 50
    partial.discard()                                     # dropped: nobody came back
    partial.close()
    assert cache.usage()["pinned"] == 0 and on_disk(cache) == {A, B, C}


def test_a_download_in_progress_is_not_a_hit(cache):
    partial = fill(cache, X, 300)
    assert cache.open_complete(X) is None
    assert not cache.contains(X) and cache.size_of(X) is None
    partial.commit()
    fd = cache.open_complete(X)                           # committed: readable while still pinned
    assert fd is not None and cache.contains(X) and cache.size_of(X) == 300
    partial.sync()
    partial.close()                                       # the download lets go
    assert cache.usage()["pinned"] == 1
    os.close(fd)
    cache.release(X)                                      # the reader lets go
    assert cache.usage() == {"idle_bytes": 300, "pinned_bytes": 0, "files": 1, "pinned": 0,
                             "max_bytes": 1000}


def test_failed_download_leaves_no_trace(cache):
    store(cache, A, 300)
    partial = fill(cache, X, 200)
    partial.discard()                                     # the downloader gives up and cleans up
    partial.close()
    assert cache.usage() == {"idle_bytes": 300, "pinned_bytes": 0, "files": 1, "pinned": 0,
                             "max_bytes": 1000}
    assert not cache.contains(X) and on_disk(cache) == {A}
    assert os.listdir(partial_dir(cache)) == []


def test_the_pin_follows_the_bytes_written(cache):
    store(cache, A, 400)
    partial = cache.new_partial(X)                        # size unknown at first
    assert on_disk(cache) == {A} and cache.usage()["pinned_bytes"] == 0
    partial.write(content(X, 600))                        # 600 + 400 fit
    assert on_disk(cache) == {A} and cache.usage()["pinned_bytes"] == 600
    partial.write(content(X, 100))                        # 700 + 400 do not
    assert on_disk(cache) == set() and cache.usage()["pinned_bytes"] == 700
    assert cache.usage()["pinned"] == 1
    partial.discard()
    assert cache.usage()["pinned_bytes"] == 0
    partial.close()


def test_release_accounts_for_the_real_file_size(cache):
    store(cache, A, 600)
    partial = cache.new_partial(X)
    partial.write(content(X, 600))
    finish(partial)
    assert cache.size_of(X) == 600
    assert on_disk(cache) == {X}                          # 600 + 600 > 1000: A had to go
    assert disk_bytes(cache) <= cache.max_bytes


def test_downloading_a_name_that_is_idle_pins_it(cache):
    # A second download of a cached name (a reader raced the previous download's release):
    # the name must not be both idle and pinned, or eviction deletes a file in use.
    store(cache, A, 300)
    again = cache.new_partial(A)
    assert cache.usage()["idle_bytes"] + cache.usage()["pinned_bytes"] == 300   # counted once
    pressure = fill(cache, Y, 600)                        # pressure: only A could be evicted
    assert A in on_disk(cache)
    again.write(content(A, 300))
    again.commit()
    again.sync()
    assert A in on_disk(cache)
    pressure.discard()
    pressure.close()
    again.close()
    assert cache.contains(A) and on_disk(cache) == {A}
    assert cache.usage() == {"idle_bytes": 300, "pinned_bytes": 0, "files": 1, "pinned": 0,
                             "max_bytes": 1000}


def test_a_recording_larger_than_the_budget_still_works_then_goes_and_evicts_nothing(cache):
    store(cache, A, 300)
    store(cache, B, 300)
    partial = cache.new_partial(X)
    partial.expect(1500)                                  # announced: larger than the whole budget
    partial.write(content(X, 1500))                       # never refused: reading must work
    assert on_disk(cache) == {A, B}                       # it will not be kept: nothing made room
    assert cache.usage()["pinned_bytes"] == 1500
    partial.commit()
    fd = cache.open_complete(X)
    assert fd is not None
    partial.sync()
    partial.close()                                       # the download is done
    assert X in on_disk(cache)                            # a reader still has it
    assert read_fd(fd) == content(X, 1500)
    os.close(fd)
    cache.release(X)
    assert on_disk(cache) == {A, B}                       # larger than the budget: deleted
    assert not cache.contains(X)
    assert cache.usage() == {"idle_bytes": 600, "pinned_bytes": 0, "files": 2, "pinned": 0,
                             "max_bytes": 1000}


def test_downloads_over_the_budget_together_evict_nothing_until_one_is_kept(cache):
    store(cache, A, 300)
    first, second = fill(cache, X, 600), fill(cache, Y, 500)   # 1100 held: no eviction can fit it
    assert on_disk(cache) == {A}
    second.discard()
    second.close()
    finish(first)                                         # kept: 600 + 300 fit
    assert on_disk(cache) == {A, X}


def test_a_file_that_pins_leave_no_room_for_is_deleted_on_release(cache):
    partial = fill(cache, X, 800)                         # a long download in progress
    store(cache, A, 300)                                  # 800 + 300 > 1000
    assert on_disk(cache) == set()
    assert not cache.contains(A)
    finish(partial)
    assert on_disk(cache) == {X}                          # alone it fits: kept


# -- restart ---------------------------------------------------------------------------------


def test_restart_deletes_partials_and_reloads_complete_files(root):
    cache = DiskCache(root, max_bytes=1000)
    store(cache, A, 300)
    store(cache, B, 200)
    leftover = fill(cache, C, 100)
    fill(cache, D, 50)                                    # a download cut short by a crash
    again = DiskCache(root, max_bytes=1000)
    assert os.listdir(partial_dir(again)) == []
    assert not os.path.exists(leftover.path)
    assert again.contains(A) and again.size_of(A) == 300 and again.size_of(B) == 200
    assert not again.contains(C) and not again.contains(D)
    assert again.usage() == {"idle_bytes": 500, "pinned_bytes": 0, "files": 2, "pinned": 0,
                             "max_bytes": 1000}


def test_restart_takes_the_lru_order_from_mtimes(root):
    cache = DiskCache(root, max_bytes=1000)
    for name in (A, B, C):
        store(cache, name, 300)
    now = time.time()
    set_mtime(cache, B, now - 3000)   # oldest
    set_mtime(cache, C, now - 2000)
    set_mtime(cache, A, now - 1000)   # newest, though stored first
    again = DiskCache(root, max_bytes=1000)
    store(again, D, 300)
    assert on_disk(again) == {A, C, D}
    store(again, E, 300)
    assert on_disk(again) == {A, D, E}


def test_restart_with_a_smaller_budget_keeps_the_newest(root):
    cache = DiskCache(root, max_bytes=1000)
    for name in (A, B, C):
        store(cache, name, 300)
    now = time.time()
    for age, name in enumerate((C, A, B)):               # C newest, B oldest
        set_mtime(cache, name, now - 1000 * (age + 1))
    smaller = DiskCache(root, max_bytes=650)
    assert on_disk(smaller) == {C, A}
    assert smaller.usage()["idle_bytes"] == 600
    tiny = DiskCache(root, max_bytes=200)                 # every file is larger than the budget
    assert on_disk(tiny) == set() and tiny.usage()["files"] == 0


def test_reading_updates_the_mtime_that_orders_the_next_start(root, monkeypatch):
    monkeypatch.setattr(cache_module, "TOUCH_INTERVAL_S", 0.0)
    cache = DiskCache(root, max_bytes=1000)
    for name in (A, B, C):
        store(cache, name, 300)
    now = time.time()
    for age, name in enumerate((C, B, A)):               # A oldest on disk
        set_mtime(cache, name, now - 1000 * (age + 1))
    fd = cache.open_complete(A)                           # ... until it is read
    os.close(fd)
    cache.release(A)
    assert os.stat(cache.complete_path(A)).st_mtime > now - 60
    again = DiskCache(root, max_bytes=1000)
    store(again, D, 300)
    assert on_disk(again) == {A, C, D}                    # B is now the oldest


def test_mtime_is_rewritten_at_most_once_a_minute(cache):
    store(cache, A, 100)                                  # commit touched it just now
    old = time.time() - 5000
    set_mtime(cache, A, old)
    for _ in range(3):
        fd = cache.open_complete(A)
        os.close(fd)
        cache.release(A)
    assert os.stat(cache.complete_path(A)).st_mtime == pytest.approx(old)


# -- free space ------------------------------------------------------------------------------


def fake_disk(monkeypatch, root: str, capacity: int, other_used: int = 0, calls=None):
    """shutil.disk_usage for a disk of *capacity* bytes holding the cache and *other_used*."""
    def disk_usage(path):
        if calls is not None:
            calls.append(path)
        used = other_used + sum(p.stat().st_size for p in pathlib.Path(root).rglob("*") if p.is_file())
        return DiskUsage(capacity, used, max(0, capacity - used))
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def test_min_free_bytes_evicts_to_keep_the_disk_from_filling(root, monkeypatch):
    fake_disk(monkeypatch, root, capacity=2000)
    cache = DiskCache(root, max_bytes=100_000, min_free_bytes=1000)
    for name in (A, B, C):
        store(cache, name, 300)                           # free 1100: all kept
    assert on_disk(cache) == {A, B, C} and cache.free_space_ok()
    partial = fill(cache, D, 300)                         # free 800 < 1000: A goes
    assert on_disk(cache) == {B, C}
    finish(partial)
    assert on_disk(cache) == {B, C, D} and cache.free_space_ok()


def test_min_free_bytes_when_other_data_fills_the_disk(root, monkeypatch):
    fake_disk(monkeypatch, root, capacity=2000, other_used=1500)
    cache = DiskCache(root, max_bytes=100_000, min_free_bytes=1000)
    assert not cache.free_space_ok()
    partial = fill(cache, A, 100)                         # reads still work ...
    partial.commit()
    fd = cache.open_complete(A)
    assert read_fd(fd) == content(A, 100)
    os.close(fd)
    cache.release(A)
    partial.sync()
    partial.close()
    assert on_disk(cache) == set()                        # ... but nothing is kept


def test_free_space_is_checked_on_the_cache_root(root, monkeypatch):
    calls: list = []
    fake_disk(monkeypatch, root, capacity=10_000, calls=calls)
    cache = DiskCache(root, max_bytes=1000, min_free_bytes=100)
    store(cache, A, 100)
    assert calls and set(calls) == {root}


def test_disk_usage_failure_counts_as_no_free_space(root, monkeypatch):
    cache = DiskCache(root, max_bytes=1000, min_free_bytes=1)
    store(cache, A, 100)

    def broken(path):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(shutil, "disk_usage", broken)
    assert not cache.free_space_ok()
    store(cache, B, 100)
    assert on_disk(cache) == set()


def test_without_a_floor_the_disk_is_never_asked(root, monkeypatch):
    def forbidden(path):
        raise AssertionError("disk_usage called with min_free_bytes=0")

    monkeypatch.setattr(shutil, "disk_usage", forbidden)
    cache = DiskCache(root, max_bytes=1000, min_free_bytes=0)
    for name in (A, B, C, D):
        store(cache, name, 300)
    assert cache.free_space_ok()


# -- maintenance -----------------------------------------------------------------------------


def test_clear_deletes_idle_files_and_returns_the_bytes(cache):
    store(cache, A, 100)
    store(cache, B, 200)
    partial = fill(cache, X, 300)
    assert cache.clear() == 300
    assert on_disk(cache) == set() and not cache.contains(A)
    assert cache.usage() == {"idle_bytes": 0, "pinned_bytes": 300, "files": 0, "pinned": 1,
                             "max_bytes": 1000}
    assert cache.clear() == 0
    partial.discard()
    partial.close()


def test_usage_reports_idle_and_pinned(cache):
    assert cache.usage() == {"idle_bytes": 0, "pinned_bytes": 0, "files": 0, "pinned": 0, "max_bytes": 1000}
    store(cache, A, 100)
    store(cache, B, 200)
    fd = cache.open_complete(B)
    partial = fill(cache, X, 50)
    assert cache.usage() == {"idle_bytes": 100, "pinned_bytes": 250, "files": 1, "pinned": 2,
                             "max_bytes": 1000}
    os.close(fd)
    cache.release(B)
    partial.discard()
    partial.close()
    assert cache.usage() == {"idle_bytes": 300, "pinned_bytes": 0, "files": 2, "pinned": 0,
                             "max_bytes": 1000}


# -- threads ---------------------------------------------------------------------------------


def test_many_threads_keep_the_books_straight(root):
    # Switch threads very often, so that a missing lock shows up as a broken invariant or an
    # exception from cachetools (which is not thread-safe) rather than passing by luck.
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        _hammer(root)
    finally:
        sys.setswitchinterval(old_interval)


def _hammer(root) -> None:
    cache = DiskCache(root, max_bytes=6000)
    names = [rec(100 + i) for i in range(24)]
    sizes = {name: 150 + (i * 97) % 700 for i, name in enumerate(names)}
    failures: list = []
    start = threading.Barrier(8)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait(timeout=5)
            for _ in range(150):
                name = rng.choice(names)
                roll = rng.random()
                if roll < 0.45:
                    store(cache, name, sizes[name])
                elif roll < 0.93:
                    fd = cache.open_complete(name)
                    if fd is not None:
                        try:
                            data = read_fd(fd)
                        finally:
                            os.close(fd)
                            cache.release(name)
                        if data != content(name, sizes[name]):
                            failures.append(f"{name}: read {len(data)} wrong bytes")
                elif roll < 0.97:
                    usage = cache.usage()
                    if usage["idle_bytes"] > cache.max_bytes:
                        failures.append(f"idle bytes over budget: {usage}")
                    cache.size_of(name)
                    cache.contains(name)
                else:
                    cache.clear()
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(seed,), daemon=True) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "deadlock?"
    assert failures == []

    usage = cache.usage()
    assert usage["pinned"] == 0 and usage["pinned_bytes"] == 0
    files = on_disk(cache)
    assert os.listdir(partial_dir(cache)) == []
    assert disk_bytes(cache) == usage["idle_bytes"] <= cache.max_bytes
    assert usage["files"] == len(files)
    for name in names:
        assert cache.contains(name) == (name in files)
        if name in files:
            assert cache.size_of(name) == sizes[name] == os.path.getsize(cache.complete_path(name))
    # And what is left still behaves as an LRU after all that.
    store(cache, rec(999), 6000)
    assert on_disk(cache) == {rec(999)}


def test_start_up_deletes_files_shorter_than_announced(tmp_path):
    root = tmp_path / "cache"
    (root / "complete").mkdir(parents=True)
    (root / "complete" / "20261127093012-1.1-1-2-Inbound.wav").write_bytes(b"x" * 100)
    (root / "complete" / "20261127093013-1.2-1-2-Inbound.wav").write_bytes(b"y" * 80)  # cut short
    (root / "complete" / "20261127093014-1.3-1-2-Inbound.wav").write_bytes(b"z" * 50)  # size unknown
    sizes = {"20261127093012-1.1-1-2-Inbound.wav": 100, "20261127093013-1.2-1-2-Inbound.wav": 100}
    cache = DiskCache(str(root), 10_000, expected_size=sizes.get)
    assert cache.contains("20261127093012-1.1-1-2-Inbound.wav")
    assert not cache.contains("20261127093013-1.2-1-2-Inbound.wav")
    assert not (root / "complete" / "20261127093013-1.2-1-2-Inbound.wav").exists()
    assert cache.contains("20261127093014-1.3-1-2-Inbound.wav")


# -- the folder: CacheDir ----------------------------------------------------------------------


def test_the_folder_is_locked_by_one_daemon_at_a_time(tmp_path):
    first = CacheDir(str(tmp_path / "cache"), "pbx")
    try:
        assert (tmp_path / "cache" / "pbx" / "lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(errors.ConfigError, match=f"in use by a running yeastarfs \\(pid {os.getpid()}\\)"):
            CacheDir(str(tmp_path / "cache"), "pbx")
        with CacheDir(str(tmp_path / "cache"), "pbx", lock=False) as reader:   # the cache commands may look
            assert reader.holder_pid() == str(os.getpid())
    finally:
        first.close()
    CacheDir(str(tmp_path / "cache"), "pbx").close()


def test_a_clean_stop_is_remembered_and_a_first_start_counts_as_clean(tmp_path):
    root = str(tmp_path / "cache")
    first = CacheDir(root, "pbx")
    assert first.clean_start                                  # never ran: nothing to check
    open(first.index_path, "wb").close()                      # it ran (it has an index) ...
    first.close(clean_stop=False)                             # ... and was killed
    crashed = CacheDir(root, "pbx")
    assert not crashed.clean_start
    crashed.close()                                           # a clean stop writes the marker
    assert (tmp_path / "cache" / "pbx" / "clean-stop").exists()
    again = CacheDir(root, "pbx")
    assert again.clean_start and not (tmp_path / "cache" / "pbx" / "clean-stop").exists()
    again.close()


def test_a_symlinked_or_foreign_folder_is_refused_and_left_alone(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(errors.ConfigError, match="is a symlink or not a folder"):
        CacheDir(str(tmp_path / "link"), "pbx")
    assert os.listdir(real) == []
    os.chown(real, 65534, 65534)
    with pytest.raises(errors.ConfigError, match="belongs to uid 65534"):
        CacheDir(str(real), "pbx")
    assert os.listdir(real) == []


def test_links_planted_in_the_folder_are_removed_not_followed(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"keep me")
    pbx = tmp_path / "cache" / "pbx"
    (pbx / "complete").mkdir(parents=True, mode=0o700)
    (pbx / "partial").mkdir(mode=0o700)
    (pbx / "complete" / A).symlink_to(target)
    (pbx / "partial" / "x.part").symlink_to(target)
    (pbx / "index.sqlite3-wal").symlink_to(target)
    (pbx / "lock").symlink_to(target)
    with pytest.raises(errors.ConfigError, match="lock is a symlink"):
        CacheDir(str(tmp_path / "cache"), "pbx")
    os.unlink(pbx / "lock")
    os.link(target, pbx / "lock")                         # a hard link reaches the target too
    with pytest.raises(errors.ConfigError, match="with one link"):
        CacheDir(str(tmp_path / "cache"), "pbx")
    os.unlink(pbx / "lock")
    with CacheDir(str(tmp_path / "cache"), "pbx") as folder:
        assert folder.index_path == str(pbx / "index.sqlite3")
        assert not os.path.lexists(pbx / "index.sqlite3-wal")
        cache = DiskCache(folder.path, 1000)
        assert not cache.contains(A) and os.listdir(pbx / "complete") == os.listdir(pbx / "partial") == []
    assert target.read_bytes() == b"keep me"


def test_riff_sizes_and_file_problems():
    header = b"RIFF" + (1000 - 8).to_bytes(4, "little") + b"WAVE"
    assert riff_size(header) == 1000 and riff_size(b"ID3\x03" + bytes(8)) is None and riff_size(b"RIFF") is None
    assert file_problem(1000, header, 1000) is None
    assert file_problem(999, header, 1000) == "999 bytes, the PBX announced 1000"
    assert file_problem(999, header, None) == "999 bytes, its RIFF header says 1000"
    assert file_problem(5, b"plain", None) is None


@pytest.mark.parametrize("mode, accepted", [(0o755, True), (0o775, True), (0o1777, True), (0o777, False)])
def test_folders_above_the_root_that_another_user_could_change_are_refused(tmp_path, mode, accepted):
    # Group-writable is harmless when the group is this user's own (umask 002 makes ~/.cache
    # 0775); writable by others is not, unless sticky (like /tmp: nobody can swap our entries).
    above = tmp_path / "above"
    above.mkdir()
    os.chmod(above, mode)
    if accepted:
        CacheDir(str(above / "cache"), "pbx").close()
    else:
        with pytest.raises(errors.ConfigError, match="which other users may write to"):
            CacheDir(str(above / "cache"), "pbx")
        assert os.listdir(above) == []


def _wav(size_bytes: int, declared: int = None) -> bytes:
    """A RIFF/WAVE file of *size_bytes* whose header declares *declared* bytes (default: its size)."""
    declared = size_bytes if declared is None else declared
    return b"RIFF" + (declared - 8).to_bytes(4, "little") + b"WAVE" + b"\0" * (size_bytes - 12)


def test_the_cache_commands_see_folders_files_and_their_problems(tmp_path):
    """What `yeastarfs cache stats|verify|clear` ask of a folder (README: "cache verify checks
    every cached file against the size the PBX announced and its RIFF header")."""
    root = tmp_path / "cache"
    with pytest.raises(errors.ConfigError, match="does not exist"):
        CacheDir.names(str(root))
    folder = CacheDir(str(root), "pbx-b")
    open(folder.index_path, "wb").close()
    CacheDir(str(root), "pbx-a", lock=False).close()  # a folder without an index: not a PBX's cache
    os.makedirs(root / "pbx-c")
    open(root / "pbx-c" / "index.sqlite3", "wb").close()
    (root / "stray-file").write_bytes(b"x")
    assert CacheDir.names(str(root)) == ["pbx-b", "pbx-c"]
    with pytest.raises(errors.ConfigError, match="no yeastarfs cache"):
        CacheDir.names(str(tmp_path))
    assert folder.complete_files() == []
    assert folder.problem_with("20261127093012-1.1-1-2-Inbound.wav", None) is not None
    complete = root / "pbx-b" / "complete"
    os.makedirs(complete, exist_ok=True)
    (complete / "b.wav").write_bytes(_wav(1000))
    (complete / "a.wav").write_bytes(_wav(600, declared=700))
    (complete / "c.raw").write_bytes(b"\x01" * 50)
    os.symlink("/etc/passwd", complete / "d.wav")       # not a file of ours: never listed
    assert folder.complete_files() == [("a.wav", 600), ("b.wav", 1000), ("c.raw", 50)]
    assert folder.problem_with("b.wav", 1000) is None
    assert folder.problem_with("b.wav", None) is None
    assert folder.problem_with("b.wav", 999) == "1000 bytes, the PBX announced 999"
    assert folder.problem_with("a.wav", None) == "600 bytes, its RIFF header says 700"
    assert folder.problem_with("c.raw", 50) is None        # not RIFF: only the size is checked
    assert folder.problem_with("d.wav", None).startswith("cannot open it")
    assert folder.problem_with("gone.wav", None).startswith("cannot open it")
    assert folder.remove_complete(["b.wav", "nothing.wav"]) == (1, 1000)
    assert folder.complete_files() == [("a.wav", 600), ("c.raw", 50)]
    assert folder.remove_complete() == (2, 650)
    assert folder.complete_files() == []
    folder.close()
    with CacheDir(str(root), "pbx-b", lock=False) as looking:
        with pytest.raises(RuntimeError, match="lock"):
            looking.remove_complete()
        assert looking.holder_pid() == str(os.getpid())  # the lock file still names the last holder


def test_the_daemon_log_is_created_private_in_the_cache_root(tmp_path):
    root = tmp_path / "cache"
    path = cache_module.daemon_log_path(str(root))
    assert path == os.path.join(str(root), "yeastarfs.log")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and os.path.getsize(path) == 0
    with open(path, "a") as handle:
        handle.write("kept\n")
    assert cache_module.daemon_log_path(str(root)) == path
    assert open(path).read() == "kept\n"                     # opened for appending, never truncated
