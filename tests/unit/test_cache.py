"""DiskCache with real files under tmp_path: the byte-bounded LRU, pins, commits, restarts,
the free-space floor, and many threads at once."""

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
from yeastarfs.cache import DiskCache

DiskUsage = collections.namedtuple("DiskUsage", "total used free")


def rec(i: int) -> str:
    return f"20261127{i:06d}-1764236100.{i}-1001-1002-Internal.wav"


A, B, C, D, E, X, Y = (rec(i) for i in range(1, 8))


def content(name: str, size_bytes: int) -> bytes:
    seed = name.encode("utf-8", "surrogateescape") or b"-"
    return (seed * (size_bytes // len(seed) + 1))[:size_bytes]


_partial_ids = iter(range(1, 1 << 62))
_partial_ids_lock = threading.Lock()


def write_partial(cache: DiskCache, name: str, size_bytes: int, mode: int = 0o644) -> str:
    """What a download leaves behind: a finished file under partial/ (unique per download)."""
    with _partial_ids_lock:
        path = f"{cache.partial_path(name)}.{next(_partial_ids)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, content(name, size_bytes))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, mode)  # regardless of the umask
    return path


def store(cache: DiskCache, name: str, size_bytes: int) -> None:
    """A whole download: reserve, write, commit, release."""
    cache.reserve(name, size_bytes)
    cache.commit(name, write_partial(cache, name, size_bytes))
    cache.release(name)


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
    cache = DiskCache(str(root), max_bytes=1000)
    for path in (root, root / "complete", root / "partial"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700, path
    assert cache.partial_path(A).startswith(str(root / "partial") + os.sep)
    assert cache.complete_path(A) == str(root / "complete" / A)


def test_commit_is_an_atomic_rename_to_a_private_file(cache):
    cache.reserve(A, 300)
    partial = write_partial(cache, A, 300, mode=0o644)
    inode = os.stat(partial).st_ino
    final = cache.commit(A, partial)
    assert final == cache.complete_path(A)
    assert not os.path.exists(partial)
    assert os.stat(final).st_ino == inode             # renamed, not copied
    assert stat.S_IMODE(os.stat(final).st_mode) == 0o600
    assert pathlib.Path(final).read_bytes() == content(A, 300)
    assert os.listdir(partial_dir(cache)) == []
    cache.release(A)
    assert cache.contains(A) and cache.size_of(A) == 300


def test_commit_of_a_missing_partial_raises_and_keeps_nothing(cache):
    cache.reserve(A, 300)
    with pytest.raises(OSError):
        cache.commit(A, cache.partial_path(A) + ".404")
    cache.release(A)
    assert not cache.contains(A) and on_disk(cache) == set()


def test_partial_path_is_a_hash_so_any_name_fits(cache):
    odd = "20261127101500-1.1-Jürgen 😀-" + "x" * 200 + ".wav"
    path = cache.partial_path(odd)
    assert os.path.dirname(path) == str(partial_dir(cache))
    assert os.path.basename(path).endswith(".part") and len(os.path.basename(path)) == 40 + 5
    assert cache.partial_path(odd) == path and cache.partial_path(A) != path
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
        if path == cache.complete_path(A):
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


# -- reservations ----------------------------------------------------------------------------


def test_reserve_evicts_only_as_much_as_the_download_needs(cache):
    for name in (A, B, C):
        store(cache, name, 300)
    cache.reserve(X, 500)
    assert on_disk(cache) == {C}                          # 500 + 300 fit; only A and B had to go
    assert cache.usage()["pinned_bytes"] == 500
    cache.release(X)


def test_reserve_that_fits_evicts_nothing(cache):
    store(cache, A, 400)
    cache.reserve(X, 600)
    assert on_disk(cache) == {A}
    assert cache.stats.evictions == 0
    cache.release(X)


def test_a_download_in_progress_is_not_a_hit(cache):
    cache.reserve(X, 300)
    assert cache.open_complete(X) is None
    assert not cache.contains(X) and cache.size_of(X) is None
    cache.commit(X, write_partial(cache, X, 300))
    fd = cache.open_complete(X)                           # committed: readable while still pinned
    assert fd is not None and cache.contains(X) and cache.size_of(X) == 300
    cache.release(X)                                      # the download lets go
    assert cache.usage()["pinned"] == 1
    os.close(fd)
    cache.release(X)                                      # the reader lets go
    assert cache.usage() == {"idle_bytes": 300, "pinned_bytes": 0, "files": 1, "pinned": 0,
                             "max_bytes": 1000}


def test_failed_download_leaves_no_trace(cache):
    store(cache, A, 300)
    cache.reserve(X, 500)
    os.unlink(write_partial(cache, X, 200))               # the downloader gives up and cleans up
    cache.release(X)
    assert cache.usage() == {"idle_bytes": 300, "pinned_bytes": 0, "files": 1, "pinned": 0,
                             "max_bytes": 1000}
    assert not cache.contains(X) and on_disk(cache) == {A}


def test_resize_adjusts_the_reservation(cache):
    store(cache, A, 400)
    cache.reserve(X, 0)                                   # size unknown at first
    assert on_disk(cache) == {A}
    cache.resize(X, 600)                                  # 600 + 400 fit
    assert on_disk(cache) == {A} and cache.usage()["pinned_bytes"] == 600
    cache.resize(X, 700)                                  # 700 + 400 do not
    assert on_disk(cache) == set() and cache.usage()["pinned_bytes"] == 700
    cache.resize(X, 100)
    assert cache.usage()["pinned_bytes"] == 100
    cache.resize(Y, 100)                                  # not reserved: ignored
    assert cache.usage()["pinned"] == 1
    cache.release(X)


def test_release_accounts_for_the_real_file_size(cache):
    store(cache, A, 600)
    cache.reserve(X, 0)                                   # no size hint, never resized
    cache.commit(X, write_partial(cache, X, 600))
    cache.release(X)
    assert cache.size_of(X) == 600
    assert on_disk(cache) == {X}                          # 600 + 600 > 1000: A had to go
    assert disk_bytes(cache) <= cache.max_bytes


def test_reserving_a_name_that_is_idle_pins_it(cache):
    # A second download of a cached name (a reader raced the previous download's release):
    # the name must not be both idle and pinned, or eviction deletes a file in use.
    store(cache, A, 300)
    cache.reserve(A, 300)
    assert cache.usage()["idle_bytes"] + cache.usage()["pinned_bytes"] == 300   # counted once
    cache.reserve(Y, 900)                                 # pressure: only A could be evicted
    assert A in on_disk(cache)
    cache.commit(A, write_partial(cache, A, 300))
    cache.reserve(Y, 900)
    assert A in on_disk(cache)
    cache.release(Y)
    cache.release(Y)
    cache.release(A)
    assert cache.contains(A) and on_disk(cache) == {A}
    assert cache.usage() == {"idle_bytes": 300, "pinned_bytes": 0, "files": 1, "pinned": 0,
                             "max_bytes": 1000}


def test_reservation_larger_than_everything_evictable_still_works_then_goes(cache):
    store(cache, A, 300)
    store(cache, B, 300)
    cache.reserve(X, 1500)                                # never refused: reading must work
    assert on_disk(cache) == set()                        # everything idle made room
    assert cache.usage()["pinned_bytes"] == 1500
    cache.commit(X, write_partial(cache, X, 1500))
    fd = cache.open_complete(X)
    assert fd is not None
    cache.release(X)                                      # the download is done
    assert X in on_disk(cache)                            # a reader still has it
    assert read_fd(fd) == content(X, 1500)
    os.close(fd)
    cache.release(X)
    assert on_disk(cache) == set()                        # larger than the budget: deleted
    assert not cache.contains(X)
    assert cache.usage() == {"idle_bytes": 0, "pinned_bytes": 0, "files": 0, "pinned": 0,
                             "max_bytes": 1000}


def test_a_file_that_pins_leave_no_room_for_is_deleted_on_release(cache):
    cache.reserve(X, 800)                                 # a long download in progress
    store(cache, A, 300)                                  # 800 + 300 > 1000
    assert on_disk(cache) == set()
    assert not cache.contains(A)
    cache.commit(X, write_partial(cache, X, 800))
    cache.release(X)
    assert on_disk(cache) == {X}                          # alone it fits: kept


# -- restart ---------------------------------------------------------------------------------


def test_restart_deletes_partials_and_reloads_complete_files(root):
    cache = DiskCache(root, max_bytes=1000)
    store(cache, A, 300)
    store(cache, B, 200)
    leftover = write_partial(cache, C, 100)
    cache.reserve(D, 100)
    write_partial(cache, D, 50)                           # a download cut short by a crash
    again = DiskCache(root, max_bytes=1000)
    assert os.listdir(partial_dir(again)) == []
    assert not os.path.exists(leftover)
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
    cache.reserve(D, 300)                                 # needs free >= 1000 + 300: A goes
    assert on_disk(cache) == {B, C}
    cache.commit(D, write_partial(cache, D, 300))
    cache.release(D)
    assert on_disk(cache) == {B, C, D} and cache.free_space_ok()


def test_min_free_bytes_when_other_data_fills_the_disk(root, monkeypatch):
    fake_disk(monkeypatch, root, capacity=2000, other_used=1500)
    cache = DiskCache(root, max_bytes=100_000, min_free_bytes=1000)
    assert not cache.free_space_ok()
    cache.reserve(A, 100)                                 # reads still work ...
    cache.commit(A, write_partial(cache, A, 100))
    fd = cache.open_complete(A)
    assert read_fd(fd) == content(A, 100)
    os.close(fd)
    cache.release(A)
    cache.release(A)
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
    cache.reserve(X, 300)
    assert cache.clear() == 300
    assert on_disk(cache) == set() and not cache.contains(A)
    assert cache.usage() == {"idle_bytes": 0, "pinned_bytes": 300, "files": 0, "pinned": 1,
                             "max_bytes": 1000}
    assert cache.clear() == 0
    cache.release(X)


def test_usage_reports_idle_and_pinned(cache):
    assert cache.usage() == {"idle_bytes": 0, "pinned_bytes": 0, "files": 0, "pinned": 0, "max_bytes": 1000}
    store(cache, A, 100)
    store(cache, B, 200)
    fd = cache.open_complete(B)
    cache.reserve(X, 50)
    assert cache.usage() == {"idle_bytes": 100, "pinned_bytes": 250, "files": 1, "pinned": 2,
                             "max_bytes": 1000}
    os.close(fd)
    cache.release(B)
    cache.release(X)
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
                    cache.reserve(name, sizes[name])
                    path = write_partial(cache, name, sizes[name])
                    cache.commit(name, path)
                    cache.release(name)
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
