"""DownloadManager with a real DiskCache, a real PbxClient and the simulator over loopback.

Policies under test are the ones in the downloads module docstring: one transfer per
recording, reads that wait for their bytes, retries with a fresh random, early leavers,
the worker limit and stalls.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import factory, holds_for, wait_stable, wait_until
from yeastarfs import downloads as downloads_module
from yeastarfs import errors
from yeastarfs.sim import sseries as simulator_module
from yeastarfs.cache import DiskCache
from yeastarfs.downloads import TRANSITIONS, DownloadManager, State, check_move

START = datetime.datetime(2024, 3, 10, 14, 30, 0)
KIB = 1024
WAIT_S = 10.0  # longest wait for background work (a download ending, a file going)
# README "How downloads and the cache behave", stated here rather than imported, so that a
# changed constant in downloads.py fails these tests.
MAX_FAILURES = 4            # consecutive failures without progress before readers get EIO
FINISH_SHARE = 0.5          # a download left with more than this share of the file finishes
INITIAL_WINDOW_BYTES = 128 * KIB


@pytest.fixture(autouse=True)
def quick_policies(request, monkeypatch):
    """Shorter backoff and suspension times: the policy is the same, the suite is faster.
    Tests marked ``documented_timing`` keep the real ones: they check the documented values."""
    if request.node.get_closest_marker("documented_timing"):
        return
    monkeypatch.setattr(downloads_module, "BACKOFF_INITIAL_S", 0.02)
    monkeypatch.setattr(downloads_module, "KEEP_SUSPENDED_S", 0.5)
    monkeypatch.setattr(downloads_module, "PAUSE_SUSPEND_S", 0.5)
    monkeypatch.setattr(downloads_module, "JANITOR_INTERVAL_S", 0.05)


@pytest.fixture
def client(pbx, make_client):
    return make_client(pbx)


@pytest.fixture
def cache(tmp_path):
    return DiskCache(str(tmp_path / "cache"), 1 << 30)


@pytest.fixture
def make_manager(client, cache):
    """Build DownloadManagers on the test's client and cache; ``manager.sizes`` records on_size calls."""
    def build(**kwargs):
        sizes = []
        kwargs.setdefault("stall_timeout_s", 10.0)
        manager = DownloadManager(client.open_recording, cache, on_size=lambda name, size: sizes.append((name, size)), **kwargs)
        manager.sizes = sizes
        return manager

    yield from factory(build)


@pytest.fixture
def manager(make_manager):
    return make_manager()


def add(sim, size_bytes):
    start = START + datetime.timedelta(minutes=len(sim.recordings))
    return sim.add_recording(start=start, duration_s=1, size_bytes=size_bytes, announce=False)


def read_whole(download, size, block=64 * KIB):
    """Read like a sequential FUSE reader: fixed blocks until a short read."""
    parts, offset = [], 0
    while True:
        data = download.read(offset, block)
        parts.append(data)
        offset += len(data)
        if len(data) < block:
            return b"".join(parts)


def sha(data):
    return hashlib.sha256(data).hexdigest()


def partial_files(cache):
    return os.listdir(os.path.join(cache.root, "partial"))


def cached_bytes(cache, name):
    with open(cache.complete_path(name), "rb") as handle:
        return handle.read()


def assert_cached(cache, manager, rec):
    wait_until(lambda: cache.contains(rec.name), WAIT_S, message="the recording to be cached")
    assert sha(cached_bytes(cache, rec.name)) == rec.sha256
    assert manager.sizes == [(rec.name, rec.size_bytes)]
    wait_until(lambda: not partial_files(cache), WAIT_S, message="partial files to go")


# -- sharing -----------------------------------------------------------------------------------


def test_concurrent_readers_share_one_random_and_one_download(pbx, manager, cache):
    rec = add(pbx, 1_000_000)
    pbx.bandwidth_bps = 4_000_000
    barrier = threading.Barrier(8)
    results = []

    def reader():
        barrier.wait()
        download = manager.acquire(rec.name)
        try:
            results.append(sha(read_whole(download, rec.size_bytes)))
        finally:
            manager.release(download)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert results == [rec.sha256] * 8
    assert pbx.counters["recording/get_random"] == 1
    assert pbx.counters["recording/download"] == 1
    assert_cached(cache, manager, rec)


def test_size_is_reported_once_exactly_and_the_file_cached(pbx, manager, cache):
    rec = add(pbx, 300_000)
    download = manager.acquire(rec.name)
    assert sha(read_whole(download, rec.size_bytes)) == rec.sha256
    assert download.size_if_known() == rec.size_bytes
    assert download.read(rec.size_bytes, 4096) == b""  # at the end: empty, not a wait
    assert download.read(rec.size_bytes - 10, 4096) == pbx.recording_bytes(rec.name)[-10:]
    manager.release(download)
    assert_cached(cache, manager, rec)
    assert cache.size_of(rec.name) == rec.size_bytes


# -- reads wait for their bytes ------------------------------------------------------------------


def test_reads_block_until_their_bytes_arrive(pbx, manager):
    rec = add(pbx, 2_000_000)
    data = pbx.recording_bytes(rec.name)
    pbx.bandwidth_bps = 200_000
    began = time.monotonic()
    download = manager.acquire(rec.name)
    try:
        assert download.read(0, 64 * KIB) == data[:64 * KIB]
        assert time.monotonic() - began < 0.8  # 64 KiB at 200 KB/s: 0.33 s, not the whole file's 10 s
        far = 1_500_000
        assert download.progress()[0] < far
        pbx.bandwidth_bps = 2_000_000  # the cap is re-read per chunk: keep the test short
        assert download.read(far, 64 * KIB) == data[far:far + 64 * KIB]
        assert download.read(rec.size_bytes - 100, 64 * KIB) == data[-100:]
    finally:
        manager.release(download)


def test_download_pauses_ahead_of_a_slow_reader(pbx, manager):
    rec = add(pbx, 4_000_000)
    download = manager.acquire(rec.name)
    try:
        assert download.read(0, 4 * KIB)
        # A download that ran away would go on to the end; a paused one holds still.
        held = wait_stable(lambda: download.progress()[0], quiet_s=0.3, timeout_s=WAIT_S,
                           message="the download to pause")
        assert held < 1_000_000  # the window, plus what sat in socket buffers
    finally:
        manager.release(download)


# -- failures and retries -----------------------------------------------------------------------


@pytest.mark.parametrize("honour_range", [True, False])
def test_resets_are_retried_with_a_fresh_random(pbx, manager, cache, honour_range):
    rec = add(pbx, 1_000_000)
    pbx.honour_range = honour_range
    pbx.reset_after_bytes, pbx.reset_downloads = 300_000, 2
    download = manager.acquire(rec.name)
    try:
        assert sha(read_whole(download, rec.size_bytes)) == rec.sha256
    finally:
        manager.release(download)
    assert pbx.counters["recording/get_random"] == 3
    assert pbx.counters["recording/download"] == 3
    ranges = [e for e in pbx.requests_log if e["endpoint"] == "recording/download"]
    assert len({e["query"]["random"] for e in ranges}) == 3
    assert_cached(cache, manager, rec)


@pytest.mark.parametrize("mode", ["json", "http500", "html", "truncate", "overlong"])
def test_fewer_failures_than_the_limit_recover(pbx, manager, cache, mode):
    rec = add(pbx, 400_000)
    pbx.fail_mode, pbx.fail_downloads = mode, MAX_FAILURES - 1
    download = manager.acquire(rec.name)
    try:
        assert sha(read_whole(download, rec.size_bytes)) == rec.sha256
    finally:
        manager.release(download)
    assert pbx.counters["recording/get_random"] == MAX_FAILURES
    assert_cached(cache, manager, rec)


@pytest.mark.parametrize("mode", ["json", "http500", "html", "truncate", "overlong"])
def test_more_failures_than_the_limit_fail_the_readers(pbx, manager, cache, mode):
    rec = add(pbx, 400_000)
    # A PBX that keeps failing. Attempts that gain verified bytes count as progress (a
    # truncated or overlong body still delivers a correct prefix), so the limit is reached
    # after MAX_FAILURES attempts without progress, not after MAX_FAILURES in all.
    pbx.fail_mode, pbx.fail_downloads = mode, 1000
    download = manager.acquire(rec.name)
    began = time.monotonic()
    try:
        with pytest.raises(errors.PbxError):
            read_whole(download, rec.size_bytes)
        assert time.monotonic() - began < 2  # backoff shortened to 0.02 s here (its real timing: below)
    finally:
        manager.release(download)
    wait_until(lambda: download.done, WAIT_S, message="the download to end")
    assert not download.complete
    assert not cache.contains(rec.name)
    assert not os.listdir(os.path.join(cache.root, "complete"))
    wait_until(lambda: not partial_files(cache), WAIT_S, message="the partial file to go")
    assert all(size == rec.size_bytes for _, size in manager.sizes)  # never a wrong size
    assert MAX_FAILURES <= pbx.counters["recording/get_random"] <= 3 * MAX_FAILURES
    # The next open starts afresh and succeeds once the PBX behaves.
    pbx.fail_downloads = 0
    again = manager.acquire(rec.name)
    try:
        assert sha(read_whole(again, rec.size_bytes)) == rec.sha256
    finally:
        manager.release(again)


def test_unknown_length_is_taken_from_the_clean_end(pbx, manager, cache):
    rec = add(pbx, 500_000)
    pbx.omit_content_length = True
    download = manager.acquire(rec.name)
    try:
        assert sha(read_whole(download, rec.size_bytes)) == rec.sha256
    finally:
        manager.release(download)
    assert_cached(cache, manager, rec)


# -- early leavers ------------------------------------------------------------------------------


def sniff_and_leave(pbx, manager, rec):
    """What a file manager does: open, read 4 KiB, close. The download, and when it was left."""
    download = manager.acquire(rec.name)
    assert download.read(0, 4 * KIB) == pbx.recording_bytes(rec.name)[:4 * KIB]
    released = time.monotonic()
    manager.release(download)
    return download, released


def test_an_early_leaver_suspends_at_once_and_is_dropped_later(pbx, make_manager, cache):
    # A PBX known to honour Range: the bytes held are worth keeping for a resume at their end.
    pbx.honour_range = True
    manager = make_manager(range_honoured=True)
    rec = add(pbx, 4_000_000)
    pbx.bandwidth_bps = 200_000
    download, released = sniff_and_leave(pbx, manager, rec)
    wait_until(lambda: download.suspended, WAIT_S, message="the download to be suspended")
    assert time.monotonic() - released < downloads_module.REOPEN_LINGER_S + 1.0
    assert cache.usage()["pinned_bytes"] == download.progress()[0] > 0   # it counts what it holds
    # The PBX's last write may still be in flight when the connection closes.
    pulled = wait_stable(pbx.downloaded_bytes, quiet_s=0.2, timeout_s=WAIT_S, message="the PBX to stop sending")
    holds_for(lambda: pbx.downloaded_bytes() == pulled, duration_s=0.3,
              message="the connection is closed: the PBX stopped sending")
    wait_until(lambda: download.done, WAIT_S, message="the download to be dropped")
    assert time.monotonic() - released >= downloads_module.KEEP_SUSPENDED_S
    assert download.cancelled and not download.complete
    assert pulled < rec.size_bytes // 4
    assert not cache.contains(rec.name)
    wait_until(lambda: not partial_files(cache), WAIT_S, message="the partial file to go")
    assert manager.running() == []


def test_an_early_leaver_without_range_is_dropped_with_its_bytes(pbx, manager, cache):
    # Range not known to work: a resume would make the PBX send the held bytes again, so the
    # download is dropped (a later open is a new transfer, never a restart of a held one).
    rec = add(pbx, 4_000_000)
    pbx.bandwidth_bps = 200_000
    download, released = sniff_and_leave(pbx, manager, rec)
    wait_until(lambda: download.done, WAIT_S, message="the download to be dropped")
    assert time.monotonic() - released < downloads_module.REOPEN_LINGER_S + 1.0
    assert download.cancelled and not download.complete
    pulled = wait_stable(pbx.downloaded_bytes, quiet_s=0.2, timeout_s=WAIT_S, message="the PBX to stop sending")
    holds_for(lambda: pbx.downloaded_bytes() == pulled, duration_s=0.3, message="the PBX stopped sending")
    assert pulled < rec.size_bytes // 4
    wait_until(lambda: not partial_files(cache), WAIT_S, message="the partial file to go")
    assert cache.usage()["pinned"] == 0 and manager.running() == []
    assert pbx.counters["recording/get_random"] == 1


def test_a_reader_returning_in_time_resumes_the_download(pbx, manager, cache):
    rec = add(pbx, 600_000)
    pbx.bandwidth_bps = 1_000_000
    first = manager.acquire(rec.name)
    first.read(0, 4 * KIB)
    manager.release(first)
    second = manager.acquire(rec.name)
    try:
        assert second is first
        assert sha(read_whole(second, rec.size_bytes)) == rec.sha256
    finally:
        manager.release(second)
    # Resuming needs a fresh random: at most one per suspension, never one per read.
    assert 1 <= pbx.counters["recording/get_random"] <= 2
    assert_cached(cache, manager, rec)


@pytest.mark.parametrize("range_honoured, idle_state", [(True, State.SUSPENDED), (None, State.PARKED)])
def test_a_paused_reader_gives_back_its_slot(pbx, make_manager, cache, range_honoured, idle_state):
    # Suspended (connection closed) when a resume can ask for the rest with Range; parked
    # (connection kept, unread) otherwise, so that the resume continues the same transfer.
    pbx.honour_range = bool(range_honoured)
    manager = make_manager(max_downloads=1, range_honoured=range_honoured)
    idle, other = add(pbx, 2_000_000), add(pbx, 300_000)
    pbx.bandwidth_bps = 4_000_000
    held = manager.acquire(idle.name)
    try:
        held.read(0, 4 * KIB)  # then the "player" pauses, holding the file open
        wait_until(lambda: held.state is idle_state, WAIT_S, message="the paused download to give back its slot")
        second = manager.acquire(other.name)
        try:
            assert sha(read_whole(second, other.size_bytes)) == other.sha256
        finally:
            manager.release(second)
        assert sha(read_whole(held, idle.size_bytes)) == idle.sha256  # resumes on the next read
    finally:
        manager.release(held)
    randoms = [e["body"]["recording"] for e in pbx.requests_log if e["endpoint"] == "recording/get_random"]
    if idle_state is State.PARKED:
        assert randoms == [idle.name, other.name]          # the parked transfer went on: no new random
    else:
        assert randoms == [idle.name, other.name, idle.name]   # resumed with Range, a fresh random


def test_a_download_past_the_finish_share_completes_after_release(pbx, manager, cache):
    rec = add(pbx, 1_000_000)
    pbx.bandwidth_bps = 2_000_000
    download = manager.acquire(rec.name)
    wanted = int(rec.size_bytes * FINISH_SHARE) + 50_000  # more than half of the file asked for
    assert len(download.read(0, wanted)) == wanted
    manager.release(download)
    assert_cached(cache, manager, rec)
    assert download.complete and not download.cancelled
    assert pbx.counters["recording/download"] == 1


# -- load and stalls ----------------------------------------------------------------------------


def test_at_most_max_downloads_run_at_the_pbx(pbx, make_manager, cache, monkeypatch):
    active, peak, lock = [0], [0], threading.Lock()
    real_stream = simulator_module._Handler._stream

    def counted_stream(handler, reply):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return real_stream(handler, reply)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(simulator_module._Handler, "_stream", counted_stream)
    manager = make_manager(max_downloads=2, stall_timeout_s=20.0)
    recs = [add(pbx, 300_000) for _ in range(5)]
    pbx.bandwidth_bps = 1_500_000
    handles = [manager.acquire(rec.name) for rec in recs]
    results = {}

    def reader(download, rec):
        results[rec.name] = sha(read_whole(download, rec.size_bytes))

    threads = [threading.Thread(target=reader, args=pair) for pair in zip(handles, recs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=25)
    for download in handles:
        manager.release(download)
    assert results == {rec.name: rec.sha256 for rec in recs}
    assert peak[0] == 2
    assert pbx.counters["recording/download"] == 5
    for rec in recs:
        wait_until(lambda: cache.contains(rec.name), WAIT_S, message="every recording to be cached")


def test_a_silent_pbx_is_a_stall_not_a_hang(pbx, make_manager, client):
    rec = add(pbx, 100_000)
    client._timeouts = (2.0, 1.0)  # the worker's own requests give up too
    manager = make_manager(stall_timeout_s=0.5)
    pbx.latency_s = 3.0
    download = manager.acquire(rec.name)
    began = time.monotonic()
    try:
        with pytest.raises(errors.DownloadStalledError):
            download.read(0, 4096)
        stalled_s = time.monotonic() - began
        assert 0.5 <= stalled_s < 0.8, stalled_s  # the stall timeout, not the PBX's 3 s or the client's
    finally:
        manager.release(download)
        pbx.latency_s = 0.0
    began = time.monotonic()
    manager.stop()
    assert time.monotonic() - began < 5


def test_a_stalled_body_is_a_stall(pbx, make_manager):
    rec = add(pbx, 2_000_000)
    manager = make_manager(stall_timeout_s=0.5)
    pbx.bandwidth_bps = 400_000
    download = manager.acquire(rec.name)
    try:
        assert download.read(0, 4096)
        pbx.bandwidth_bps = 1  # one byte a second: nothing a reader can use
        wait_stable(lambda: download.progress()[0], quiet_s=0.2, timeout_s=WAIT_S,
                    message="the bytes sent at the old rate to arrive")
        began = time.monotonic()
        with pytest.raises(errors.DownloadStalledError):
            while True:
                download.read(download.progress()[0] + 100_000, 4096)
        stalled_s = time.monotonic() - began
        assert 0.5 <= stalled_s < 0.8, stalled_s  # --stall-timeout's 0.5 s without progress
    finally:
        manager.release(download)
        pbx.bandwidth_bps = None


def test_stop_cancels_running_downloads_quickly(pbx, make_manager, cache):
    rec = add(pbx, 4_000_000)
    manager = make_manager()
    pbx.bandwidth_bps = 200_000
    download = manager.acquire(rec.name)
    download.read(0, 4096)
    began = time.monotonic()
    manager.stop()
    assert time.monotonic() - began < 3
    assert download.done and not download.complete
    manager.release(download)
    assert not cache.contains(rec.name)
    wait_until(lambda: not partial_files(cache), WAIT_S, message="the partial file to go")


def test_a_queued_download_left_by_its_reader_never_asks_the_pbx(pbx, make_manager, cache):
    manager = make_manager(max_downloads=1)
    busy, left = add(pbx, 600_000), add(pbx, 300_000)
    pbx.bandwidth_bps = 600_000
    first = manager.acquire(busy.name)
    first.read(0, 4096)
    second = manager.acquire(left.name)  # queued behind the first
    manager.release(second)
    # Nobody comes back while it is queued, longer than suspended bytes would be kept (0.5 s here).
    holds_for(lambda: not second.done and pbx.counters["recording/get_random"] == 1, 0.6,
              message="the left download to stay queued, asking the PBX nothing")
    try:
        assert sha(read_whole(first, busy.size_bytes)) == busy.sha256
    finally:
        manager.release(first)
    wait_until(lambda: second.done, WAIT_S, message="the queued download to be dropped")
    assert second.cancelled and not second.complete
    asked = [e for e in pbx.requests_log if e["endpoint"] == "recording/get_random"]
    assert [e["body"]["recording"] for e in asked] == [busy.name]
    wait_until(lambda: not partial_files(cache), WAIT_S, message="the partial file to go")


def test_stop_fails_queued_downloads_at_once(pbx, make_manager):
    manager = make_manager(max_downloads=1, stall_timeout_s=30.0)
    running, queued = add(pbx, 4_000_000), add(pbx, 100_000)
    pbx.bandwidth_bps = 200_000
    first = manager.acquire(running.name)
    first.read(0, 4096)
    second = manager.acquire(queued.name)
    outcome = []

    def reader():
        try:
            second.read(0, 4096)
            outcome.append("data")
        except errors.PbxError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.1)
    began = time.monotonic()
    manager.stop()
    thread.join(timeout=5)
    assert time.monotonic() - began < 3
    assert len(outcome) == 1 and isinstance(outcome[0], errors.PbxError)
    manager.release(first)
    manager.release(second)


# -- the lifecycle -------------------------------------------------------------------------------


def test_every_state_can_end_and_ends_are_final():
    ends = {State.COMPLETE, State.FAILED, State.CANCELLED}
    assert set(TRANSITIONS) == set(State)
    for state, targets in TRANSITIONS.items():
        assert (targets == frozenset()) == (state in ends), state
        reachable, frontier = set(), {state}
        while frontier:
            frontier = {nxt for s in frontier for nxt in TRANSITIONS[s]} - reachable
            reachable |= frontier
        assert state in ends or State.CANCELLED in reachable, state


def test_an_illegal_move_is_refused(pbx, manager):
    with pytest.raises(RuntimeError, match="cannot go from complete to running"):
        check_move("x.wav", State.COMPLETE, State.RUNNING)
    check_move("x.wav", State.PARKED, State.QUEUED)
    download = manager.acquire(add(pbx, 100_000).name)
    try:
        read_whole(download, 100_000)
        assert download.state is State.COMPLETE and not download.begin()   # a worker cannot take it again
    finally:
        manager.release(download)


# -- repeated opens, Range, recordings not there -------------------------------------------------


def test_repeated_opens_cost_one_download_and_cache_it(pbx, manager, cache):
    # A thumbnailer's pattern: the same file opened 32 times, a little read each time, from
    # several threads. However the opens interleave, the PBX sends the recording once.
    rec = add(pbx, 1_500_000)
    pbx.bandwidth_bps = 8_000_000
    data = pbx.recording_bytes(rec.name)

    def open_read_close(i: int) -> None:
        download = manager.acquire(rec.name)
        try:
            offset = (i * 37_000) % (rec.size_bytes - 4 * KIB)
            assert download.read(0, 4 * KIB) == data[:4 * KIB]
            assert download.read(offset, 4 * KIB) == data[offset:offset + 4 * KIB]
        finally:
            manager.release(download)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(open_read_close, range(32)))
    wait_until(lambda: cache.contains(rec.name), WAIT_S, message="the reopened recording to be fetched and cached")
    assert sha(cached_bytes(cache, rec.name)) == rec.sha256
    assert pbx.counters["recording/get_random"] == 1 and pbx.counters["recording/download"] == 1
    assert pbx.downloaded_bytes() == rec.size_bytes
    assert manager.counts == {"started": 1, "joined": 31}


def test_a_recording_opened_again_after_its_download_ended_is_fetched_to_the_end(pbx, manager, cache):
    rec = add(pbx, 2_000_000)
    pbx.bandwidth_bps = 2_000_000
    first, _ = sniff_and_leave(pbx, manager, rec)
    wait_until(lambda: first.done, WAIT_S, message="the sniffed download to be dropped")
    second, _ = sniff_and_leave(pbx, manager, rec)          # a player opening what was sniffed, and leaving
    assert second is not first                              # at once: opened again, so it goes on to the end
    wait_until(lambda: cache.contains(rec.name), WAIT_S, message="the reopened recording to be cached")
    assert pbx.counters["recording/get_random"] == 2


@pytest.mark.parametrize("range_mode, learned", [("honour", True), ("ignore", False)])
def test_whether_the_pbx_honours_range_is_learned(pbx, make_manager, cache, range_mode, learned):
    told = []
    manager = make_manager(on_range=told.append)
    rec = add(pbx, 1_000_000)
    pbx.range_mode = range_mode
    pbx.reset_after_bytes, pbx.reset_downloads = 300_000, 1   # the retry asks for Range
    download = manager.acquire(rec.name)
    try:
        assert sha(read_whole(download, rec.size_bytes)) == rec.sha256
    finally:
        manager.release(download)
    assert manager.range_honoured is learned and told == [learned]


def test_a_young_recording_not_there_yet_is_waited_for(pbx, make_manager, cache):
    gone = []
    manager = make_manager(on_gone=gone.append)
    rec = pbx.add_recording(start=START, duration_s=1, size_bytes=200_000, announce=False, ready_after_s=1.5)
    began = time.monotonic()
    download = manager.acquire(rec.name, not_found_grace_s=10.0)
    try:
        assert sha(read_whole(download, rec.size_bytes)) == rec.sha256
    finally:
        manager.release(download)
    assert 1.5 <= time.monotonic() - began < 5.0
    assert pbx.counters["recording/get_random"] >= 2 and gone == []


@pytest.mark.parametrize("grace_s", [0.0, 1.0])
def test_a_missing_recording_fails_after_its_grace_and_is_reported_gone(pbx, make_manager, cache, grace_s):
    gone = []
    manager = make_manager(on_gone=gone.append)
    rec = pbx.add_recording(start=START, duration_s=1, stored=False, announce=False)
    began = time.monotonic()
    download = manager.acquire(rec.name, not_found_grace_s=grace_s)
    try:
        with pytest.raises(errors.RecordingNotFoundError):
            download.read(0, 4096)
    finally:
        manager.release(download)
    assert grace_s <= time.monotonic() - began < grace_s + 2.0
    assert gone == [rec.name]
    randoms = pbx.counters["recording/get_random"]
    assert randoms == 1 if not grace_s else randoms >= 2      # without grace: at once, asked once
    wait_until(lambda: not partial_files(cache), WAIT_S, message="the partial file to go")


# -- the README's numbers, at their documented values ----------------------------------------------


def settled_progress(download, expected):
    """Wait until *download* holds *expected* bytes and stays there (flow control paused it)."""
    wait_until(lambda: download.progress()[0] >= expected, WAIT_S,
               message=lambda: f"{expected} bytes (held {download.progress()[0]})")
    holds_for(lambda: download.progress()[0] == expected, 0.3,
              message=lambda: f"the download to pause at {expected} bytes (held {download.progress()[0]})")


def test_the_window_is_128_kib_at_first_then_twice_what_was_read(pbx, make_manager):
    """README (Flow control): at most a window ahead of the furthest byte asked for, 128 KiB
    at first, then twice what was read."""
    manager = make_manager(range_honoured=True)
    rec = add(pbx, 3_000_000)
    download = manager.acquire(rec.name)
    try:
        download.read(0, 4 * KIB)
        settled_progress(download, 4 * KIB + INITIAL_WINDOW_BYTES)
        download.read(0, 300_000)
        settled_progress(download, 300_000 + 2 * 300_000)
    finally:
        manager.release(download)


@pytest.mark.parametrize("read_bytes, finishes", [(200_000, True), (199_000, False)])
def test_a_download_left_with_half_the_file_finishes_and_one_with_less_does_not(pbx, make_manager, cache,
                                                                                read_bytes, finishes):
    """README (Flow control): when the last reader closes, a download that has more than half
    the file finishes and is cached; a smaller one is suspended (dropped without Range)."""
    manager = make_manager()
    rec = add(pbx, 1_200_000)
    download = manager.acquire(rec.name)
    download.read(0, read_bytes)
    settled_progress(download, 3 * read_bytes)  # what was read plus twice that: 600,000 is half
    manager.release(download)
    wait_until(lambda: download.done, WAIT_S, message="the download to end")
    assert download.complete is finishes and download.cancelled is not finishes
    assert cache.contains(rec.name) is finishes
    assert pbx.counters["recording/download"] == 1


def test_held_bytes_are_compared_when_a_retry_gets_the_whole_file(pbx, manager, cache):
    """README (Failures): a 200 reply to a retry is re-read from the start and the bytes
    already held are compared, not trusted. Here the PBX's bytes change between attempts."""
    rec = add(pbx, 1_000_000)
    original = pbx.recording_bytes(rec.name)
    pbx.range_mode = "ignore"
    pbx.reset_after_bytes, pbx.reset_downloads = 300_000, 1
    pbx.mutate_bytes_after_downloads = 1
    download = manager.acquire(rec.name)
    got = []
    try:
        with pytest.raises(errors.DownloadError, match="changed"):
            offset = 0
            while True:
                data = download.read(offset, 64 * KIB)
                got.append(data)
                offset += len(data)
                if not data:  # the end, without the error: the test fails, it does not hang
                    break
    finally:
        manager.release(download)
    assert pbx.recording_bytes(rec.name) != original  # the PBX did change them
    assert original.startswith(b"".join(got))         # readers never got a byte of the new ones
    wait_until(lambda: download.done, WAIT_S, message="the download to end")
    assert not download.complete and not cache.contains(rec.name)
    assert pbx.counters["recording/download"] == MAX_FAILURES  # the reset, then retries that saw the change


@pytest.mark.documented_timing
def test_four_failures_without_progress_give_eio_after_the_backoff(pbx, manager):
    """README (Failures): up to four consecutive failures, with backoff (0.5, 1 and 2 s
    between them: 3.5 s), then the readers get the error."""
    rec = add(pbx, 400_000)
    pbx.fail_mode, pbx.fail_downloads = "json", 1000
    download = manager.acquire(rec.name)
    began = time.monotonic()
    try:
        with pytest.raises(errors.PbxError):
            download.read(0, 4096)
    finally:
        manager.release(download)
    assert 3.5 <= time.monotonic() - began  # never sooner than the backoff allows
    assert_backoff(pbx, [0.5, 1.0, 2.0])


def assert_backoff(pbx, delays_s):
    """The attempts (each a get_random) came *delays_s* apart, plus at most 0.4 s for the
    attempt itself: the waits between them, not the time the requests took, are the policy."""
    asked = [e["time"] for e in pbx.requests_log if e["endpoint"] == "recording/get_random"]
    assert len(asked) == len(delays_s) + 1, asked
    gaps = [later - earlier for earlier, later in zip(asked, asked[1:])]
    assert all(delay <= gap < delay + 0.4 for gap, delay in zip(gaps, delays_s)), gaps


@pytest.mark.documented_timing
def test_a_paused_download_gives_back_its_slot_after_5_s(pbx, make_manager):
    """README (Flow control): a download paused by flow control for 5 s is suspended."""
    pbx.honour_range = True
    manager = make_manager(range_honoured=True)
    rec = add(pbx, 2_000_000)
    held = manager.acquire(rec.name)
    try:
        held.read(0, 4 * KIB)
        paused = time.monotonic()  # the window fills within milliseconds of the first bytes
        settled_progress(held, 4 * KIB + INITIAL_WINDOW_BYTES)
        wait_until(lambda: held.suspended, 10, message="the paused download to be suspended")
        assert 4.9 <= time.monotonic() - paused < 6.0, time.monotonic() - paused
    finally:
        manager.release(held)


@pytest.mark.documented_timing
def test_an_early_leaver_keeps_its_bytes_30_s(pbx, make_manager):
    """README (Flow control): a download left early is suspended at once, its bytes kept for 30 s."""
    pbx.honour_range = True
    manager = make_manager(range_honoured=True)
    rec = add(pbx, 4_000_000)
    download, released = sniff_and_leave(pbx, manager, rec)
    wait_until(lambda: download.suspended, WAIT_S, message="the download to be suspended")
    assert time.monotonic() - released < 0.5  # "at once": after a 0.1 s linger for a reader coming back
    kept_s = download.idle_deadline() - released
    assert 29.9 <= kept_s <= 30.5, kept_s


def test_reader_downloads_go_before_prefetches(pbx, make_manager):
    """README (Load): downloads a reader waits for go before --prefetch new ones."""
    manager = make_manager(max_downloads=1)
    busy = add(pbx, 600_000)
    prefetched = [add(pbx, 100_000) for _ in range(3)]
    wanted = add(pbx, 100_000)
    pbx.bandwidth_bps = 1_000_000
    first = manager.acquire(busy.name)
    try:
        first.read(0, 4096)                       # the one worker is busy with it
        for rec in prefetched:
            manager.prefetch(rec.name)
        reader = manager.acquire(wanted.name)     # queued after the prefetches, served before them
        pbx.bandwidth_bps = None
        assert sha(read_whole(first, busy.size_bytes)) == busy.sha256
        assert sha(read_whole(reader, wanted.size_bytes)) == wanted.sha256
        manager.release(reader)
    finally:
        manager.release(first)
    wait_until(lambda: pbx.counters["recording/get_random"] == 5, WAIT_S, message="the prefetches")
    order = [e["body"]["recording"] for e in pbx.requests_log if e["endpoint"] == "recording/get_random"]
    assert order == [busy.name, wanted.name] + [rec.name for rec in prefetched]


def test_prefetches_stay_within_the_cache_budget(pbx, client, tmp_path):
    """README (--prefetch new): every newly announced recording, within the cache budget."""
    cache = DiskCache(str(tmp_path / "small"), 1_000_000)
    manager = DownloadManager(client.open_recording, cache, max_downloads=2)
    try:
        recs = [add(pbx, 300_000) for _ in range(6)]
        for rec in recs:
            manager.prefetch(rec.name)
        wait_until(lambda: pbx.counters["recording/download"] == 6 and not manager.running(), WAIT_S,
                   message="every prefetch to end")
        held = [rec for rec in recs if cache.contains(rec.name)]
        assert 1 <= len(held) <= 3 and sum(rec.size_bytes for rec in held) <= 1_000_000
        assert cache.usage()["idle_bytes"] <= 1_000_000
        for rec in held:
            assert sha(cached_bytes(cache, rec.name)) == rec.sha256
    finally:
        manager.stop()
