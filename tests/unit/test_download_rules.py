"""The downloads' small rules, each asked of the method that holds it (no waiting in real time):
how long an idle download is kept, the not-found backoff, the worker queue's priorities,
what ``status`` shows, prefetch sharing, and what readers see when a download ends without
its bytes (the reason named, the PBX connection closed).

Most tests use a manager with no workers (``max_downloads=0``): nothing is transferred, so a
download's state is exactly what the test made it; the priority queue is then what the
workers would take, in their order.
"""

from __future__ import annotations

import datetime
import threading

import pytest

from harness import factory, wait_until
from yeastarfs import errors
from yeastarfs.cache import DiskCache
from yeastarfs.downloads import Download, DownloadManager, State

NAME = "20240310143000-1710077400.1-0612345678-1001-Inbound.wav"
OTHER = "20240310143100-1710077460.1-0612345678-1001-Inbound.wav"
THIRD = "20240310143200-1710077520.1-0612345678-1001-Inbound.wav"
WAIT_S = 5.0
# README "How downloads and the cache behave", written here, not imported.
LINGER_S = 0.1        # a parked download waits this long for a reader coming right back
KEEP_S = 30.0         # the bytes of a suspended download, when the PBX honours Range


@pytest.fixture
def cache(tmp_path):
    return DiskCache(str(tmp_path / "cache"), 1 << 30)


def never_called(name, offset):
    raise AssertionError(f"the PBX was asked for {name} at {offset}")


@pytest.fixture
def idle_manager(cache):
    """Managers with no worker: downloads stay where the test puts them."""
    yield from factory(lambda **kw: DownloadManager(never_called, cache, max_downloads=0, **kw))


def suspended(manager, name: str, received_bytes: int = 0) -> Download:
    """A download that ran, held *received_bytes*, and gave back its slot (no connection)."""
    download = Download(manager, name)
    assert download.begin()
    with download._cond:
        download.received_bytes = received_bytes
        download._to(State.SUSPENDED)
    return download


def queued(manager) -> list[tuple[int, str]]:
    """What the workers would take, in their order: (priority, recording)."""
    taken = []
    while not manager._queue.empty():
        priority, _, download = manager._queue.get_nowait()
        taken.append((priority, download.name))
    return taken


# -- how long an idle download is kept --------------------------------------------------------------


def test_a_parked_download_waits_a_tenth_of_a_second(idle_manager):
    manager = idle_manager(range_honoured=True)
    download = Download(manager, NAME)
    assert download.begin()
    with download._cond:
        download.received_bytes = 50_000
        download._to(State.PARKED)
    assert download.idle_deadline() == pytest.approx(download._idle_since + LINGER_S)


@pytest.mark.parametrize("range_honoured, received_bytes, kept_s", [
    (True, 1, KEEP_S),          # one byte held is worth a resume with Range
    (True, 0, LINGER_S),        # nothing held: nothing to keep
    (None, 100_000, LINGER_S),  # Range not known to work: a resume would send the bytes again
    (False, 100_000, LINGER_S),
])
def test_a_suspended_download_keeps_its_bytes_only_when_a_resume_can_use_them(
        idle_manager, range_honoured, received_bytes, kept_s):
    download = suspended(idle_manager(range_honoured=range_honoured), NAME, received_bytes)
    assert download.idle_deadline() == pytest.approx(download._idle_since + kept_s)


def test_an_idle_download_with_a_reader_has_no_deadline(idle_manager):
    download = suspended(idle_manager(range_honoured=True), NAME, 10)
    download.handles = 1
    assert download.idle_deadline() is None


# -- recordings the PBX does not have yet -------------------------------------------------------------


def test_not_found_is_asked_again_after_half_a_second_then_every_second():
    download = Download(None, NAME, not_found_grace_s=30.0)
    assert [download._not_found_delay() for _ in range(4)] == pytest.approx([0.5, 1.0, 1.0, 1.0], abs=0.01)


def test_the_last_wait_for_a_missing_recording_ends_with_its_grace():
    download = Download(None, NAME, not_found_grace_s=0.3)
    assert download._not_found_delay() == pytest.approx(0.3, abs=0.01)   # not the 0.5 s backoff


def test_a_missing_recording_without_grace_is_not_asked_again():
    assert Download(None, NAME)._not_found_delay() is None
    ended = Download(None, NAME, not_found_grace_s=0.02)
    assert ended._not_found_delay() == pytest.approx(0.02, abs=0.01)
    wait_until(lambda: ended._not_found_delay() is None, WAIT_S, message="the grace to end")


# -- the worker queue -------------------------------------------------------------------------------


def test_a_resumed_download_goes_before_prefetches_only_when_a_reader_waits(idle_manager):
    manager = idle_manager(stall_timeout_s=0.01)
    prefetched = manager.prefetch(NAME)
    assert prefetched is not None and prefetched.state is State.QUEUED
    with_reader = suspended(manager, OTHER, 1000)
    assert with_reader.join()                       # a reader opens it again: it resumes
    assert with_reader.state is State.QUEUED
    without_reader = suspended(manager, THIRD, 1000)
    with pytest.raises(errors.DownloadStalledError):  # a read with no handle resumes it too
        without_reader.read(0, 4096)
    assert without_reader.state is State.QUEUED
    assert queued(manager) == [(0, OTHER), (1, NAME), (1, THIRD)]


# -- prefetch -----------------------------------------------------------------------------------------


def put_in_cache(cache, name: str, data: bytes) -> None:
    partial = cache.new_partial(name)
    partial.write(data)
    partial.expect(len(data))
    partial.commit()
    partial.sync()
    partial.close()


def test_a_cached_recording_is_not_prefetched(idle_manager, cache):
    manager = idle_manager()
    put_in_cache(cache, NAME, b"RIFF" + bytes(100))
    assert manager.prefetch(NAME) is None
    assert manager.running() == []


def test_a_recording_prefetched_twice_is_one_download(idle_manager):
    manager = idle_manager()
    first = manager.prefetch(NAME)
    assert manager.prefetch(NAME) is first
    assert manager.running() == [first]
    assert [name for _, name in queued(manager)] == [NAME]


# -- what status shows ----------------------------------------------------------------------------------


def test_status_shows_what_a_download_holds(idle_manager):
    download = suspended(idle_manager(), NAME, 12_345)
    download.total_bytes = 99_000
    assert download.snapshot() == {"recording": NAME, "state": "suspended", "received_bytes": 12_345,
                                   "total_bytes": 99_000, "readers": 0}


# -- ends without the bytes -------------------------------------------------------------------------------


def test_a_download_cancelled_at_shutdown_tells_its_readers_why(idle_manager):
    manager = idle_manager()
    download = manager.acquire(NAME)       # queued: no worker takes it
    manager.stop()
    assert download.cancelled
    with pytest.raises(errors.PbxUnavailableError) as info:
        download.read(0, 4096)
    assert NAME in str(info.value) and "shutdown" in str(info.value)


def test_an_unexpected_failure_reaches_the_readers_named(cache):
    def broken(name, offset):
        raise ZeroDivisionError("a bug in the client")

    manager = DownloadManager(broken, cache, max_downloads=1, stall_timeout_s=WAIT_S)
    try:
        download = manager.acquire(NAME)
        with pytest.raises(errors.PbxUnavailableError) as info:
            download.read(0, 4096)
        assert "ZeroDivisionError" in str(info.value)
        manager.release(download)
    finally:
        manager.stop()


def test_shutdown_closes_the_connection_of_a_running_download(pbx, make_client, cache):
    rec = pbx.add_recording(start=datetime.datetime(2024, 3, 10, 14, 30), duration_s=1,
                            size_bytes=2_000_000, announce=False)
    client = make_client(pbx)
    closed, lock = [], threading.Lock()

    def open_stream(name, offset):
        stream = client.open_recording(name, offset)
        stream.call_on_close(lambda: closed.append(name))
        with lock:
            opened.append(stream)
        return stream

    opened = []
    manager = DownloadManager(open_stream, cache, max_downloads=1, stall_timeout_s=WAIT_S)
    try:
        download = manager.acquire(rec.name)
        assert download.read(0, 4096) == pbx.recording_bytes(rec.name)[:4096]
        assert download.state is State.RUNNING        # paused by flow control, its connection open
    finally:
        manager.stop()
    assert download.cancelled and len(opened) == 1
    assert closed == [rec.name]
    with pytest.raises(errors.PbxUnavailableError) as info:
        download.read(1_900_000, 4096)
    assert rec.name in str(info.value) and "shutdown" in str(info.value)
    manager.release(download)


# -- giving back the worker slot ----------------------------------------------------------------------


def gone_idle(manager, handles: int, want_bytes: int, received_bytes: int) -> Download:
    """A running download that gives back its slot (no connection open) with *handles*
    readers, the furthest of which asked for *want_bytes*."""
    download = Download(manager, NAME)
    assert download.begin()
    with download._cond:
        download.handles, download._want_bytes, download.received_bytes = handles, want_bytes, received_bytes
    download._go_idle()
    return download


@pytest.mark.parametrize("handles, want_bytes, received_bytes, state", [
    (0, 200_000, 100_000, State.SUSPENDED),   # nobody left to want them: it stays idle
    (1, 200_000, 100_000, State.QUEUED),      # a reader asked for more meanwhile: queued again
    (2, 200_000, 100_000, State.QUEUED),
    (1, 100_000, 100_000, State.SUSPENDED),   # the reader has all it asked for
])
def test_a_download_giving_back_its_slot_is_queued_again_only_for_a_reader_wanting_more(
        idle_manager, handles, want_bytes, received_bytes, state):
    manager = idle_manager(range_honoured=True)
    download = gone_idle(manager, handles, want_bytes, received_bytes)
    assert download.state is state
    assert queued(manager) == ([(0, NAME)] if state is State.QUEUED else [])


@pytest.mark.parametrize("handles, state, closed_expected", [
    (1, State.SUSPENDED, True),   # a paused reader, Range honoured: closed, resumed with Range
    (0, State.PARKED, False),     # nobody reading: kept open for one who comes right back
])
def test_a_download_giving_back_its_slot_closes_its_connection_only_when_suspended(
        pbx, make_client, idle_manager, handles, state, closed_expected):
    rec = pbx.add_recording(start=datetime.datetime(2024, 3, 10, 14, 30), duration_s=1,
                            size_bytes=500_000, announce=False)
    stream = make_client(pbx).open_recording(rec.name, 0)
    closed = []
    stream.call_on_close(lambda: closed.append(rec.name))
    download = Download(idle_manager(range_honoured=True), rec.name)
    assert download.begin()
    try:
        with download._cond:
            download._stream, download.handles = stream, handles
        download._go_idle()
        assert download.state is state
        assert closed == ([rec.name] if closed_expected else [])
    finally:
        stream.close()
