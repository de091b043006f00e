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
import re
import time
import threading

import pytest

from harness import factory, wait_until
from yeastarfs import downloads as downloads_module
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


def says(error, words: str) -> bool:
    """Whether the message of *error* has *words* in it, as words (what a user reads)."""
    return re.search(rf"\b{re.escape(words)}\b", str(error)) is not None


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
    assert NAME in str(info.value) and says(info.value, "shutdown")


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
    assert rec.name in str(info.value) and says(info.value, "shutdown")
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


# -- who still wants the bytes ------------------------------------------------------------------------------


def wanted(manager, handles=0, opens=1, total_bytes=None, received_bytes=0, reopened=False) -> Download:
    download = Download(manager, NAME, reopened=reopened)
    with download._cond:
        download.handles, download.opens = handles, opens
        download.total_bytes, download.received_bytes = total_bytes, received_bytes
    return download


@pytest.mark.parametrize("options, goes_on", [
    ({"handles": 1}, True),                                          # a reader: go on
    ({"handles": 2}, True),
    ({}, False),                                                     # read once, left early: give up the slot
    ({"total_bytes": 1000, "received_bytes": 500}, True),            # half the file: finish it
    ({"total_bytes": 1000, "received_bytes": 499}, False),
    ({"total_bytes": None, "received_bytes": 500}, False),           # size unknown: not "mostly here"
    ({"opens": 2}, True),                                            # opened twice: finish it
    ({"reopened": True}, True),                                      # opened again soon after the last one
])
def test_a_download_goes_on_for_a_reader_or_when_worth_finishing(idle_manager, options, goes_on):
    download = wanted(idle_manager(), **options)
    if goes_on:
        download._check_wanted()
    else:
        with pytest.raises(downloads_module._Idle):
            download._check_wanted()


def test_once_worth_finishing_a_download_runs_without_a_window(idle_manager):
    download = wanted(idle_manager(), opens=2, received_bytes=10_000_000)
    download._check_wanted()
    assert download._wait_for_demand() is None      # no flow control: on to the end


def test_a_download_being_stopped_asks_nothing_more(idle_manager):
    manager = idle_manager()
    download = wanted(manager, handles=1)
    manager.stopping = True
    with pytest.raises(downloads_module._Cancelled):
        download._check_wanted()
    assert download._cancel_reason == "shutdown"


def asks(download: Download, end: int) -> None:
    """A reader asks for the bytes up to *end* (what `Download.read` notes first)."""
    with download._cond:
        download._want_locked(end)


# -- flow control -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("want_bytes, received_bytes, allowed", [
    (0, 0, 128 * 1024),                        # nothing asked yet: the first window
    (4096, 0, 4096 + 128 * 1024),              # the first window: 128 KiB past what was asked
    (300_000, 100_000, 300_000 + 600_000 - 100_000),   # then twice what was asked
    (4096, 4096 + 128 * 1024 - 1, 1),          # one byte left in the window
])
def test_the_window_a_download_may_run_ahead(idle_manager, want_bytes, received_bytes, allowed):
    download = wanted(idle_manager(), handles=1, received_bytes=received_bytes)
    asks(download, want_bytes)
    assert download._wait_for_demand() == allowed


def test_a_paused_download_goes_on_when_its_reader_asks_for_more(idle_manager):
    download = wanted(idle_manager(), handles=1, received_bytes=4096 + 128 * 1024)
    asks(download, 4096)
    outcome = []
    waiter = threading.Thread(target=lambda: outcome.append(download._wait_for_demand()))
    waiter.start()
    wait_until(lambda: download._paused_since is not None, WAIT_S, message="the download to pause")
    asks(download, 8192)
    waiter.join(WAIT_S)
    assert outcome == [8192 + 128 * 1024 - (4096 + 128 * 1024)]


def test_a_download_paused_long_enough_gives_back_its_slot_at_once(idle_manager):
    download = wanted(idle_manager(), handles=1, received_bytes=4096 + 128 * 1024)
    asks(download, 4096)
    download._paused_since = time.monotonic() - 5.0      # README: paused by flow control for 5 s
    began = time.monotonic()
    with pytest.raises(downloads_module._Idle):
        download._wait_for_demand()
    assert time.monotonic() - began < 2.0          # at once, not after another 5 s


# -- what the PBX's reply says about the bytes held -----------------------------------------------------------


@pytest.fixture
def holding(idle_manager, cache):
    """A download holding *data* in its partial file."""
    made = []

    def build(data: bytes) -> Download:
        download = Download(idle_manager(), NAME)
        download._partial = cache.new_partial(NAME)
        download._partial.write(data)
        download.received_bytes = len(data)
        made.append(download)
        return download

    yield build
    for download in made:
        download._partial.discard()
        download._partial.close()


def riff(declared_total: int, length: int) -> bytes:
    return (b"RIFF" + (declared_total - 8).to_bytes(4, "little") + b"WAVE" + bytes(length))[:length]


@pytest.mark.parametrize("data, announced, agrees", [
    (riff(10_000, 11), 10_000, None),          # too little held to tell
    (riff(10_000, 12), 10_000, True),          # the 12-byte RIFF header says the same size
    (riff(10_000, 12), 9_000, False),          # it says another: wait for the body's end
    (riff(10_000, 100), 10_000, True),
    (b"ID3" + bytes(97), 10_000, True),        # no RIFF header to compare with
])
def test_the_riff_header_confirms_the_announced_size(holding, data, announced, agrees):
    assert holding(data)._header_agrees(announced) is agrees


@pytest.mark.parametrize("start_offset, skip", [(500, 0), (0, 500)])
def test_a_resume_skips_what_the_pbx_sends_again(holding, start_offset, skip):
    assert holding(bytes(500))._skip_for(start_offset) == skip


def test_a_resume_at_another_offset_is_an_error_naming_both(holding):
    with pytest.raises(errors.DownloadError) as info:
        holding(bytes(500))._skip_for(200)
    assert NAME in str(info.value) and "200" in str(info.value) and "500" in str(info.value)


# -- which bytes a reader gets before the end ----------------------------------------------------------------------


@pytest.mark.parametrize("total_bytes, received_bytes, end, readable", [
    (None, 1000, 1000, True),      # size unknown: what is held is readable
    (None, 999, 1000, False),
    (2000, 1000, 1000, True),
    (2000, 999, 1000, False),
    (1000, 1000, 1000, False),     # the last bytes wait for the commit to the cache
    (1000, 1000, 999, True),
])
def test_the_last_bytes_are_handed_out_only_once_cached(idle_manager, total_bytes, received_bytes, end, readable):
    download = wanted(idle_manager(), total_bytes=total_bytes, received_bytes=received_bytes)
    assert download._readable_locked(0, end) is readable
    download.state = State.COMPLETE
    assert download._readable_locked(0, end) is True


# -- the janitor and shutdown: downloads nobody came back to -------------------------------------------------------


@pytest.fixture
def live_stream(pbx, make_client):
    """A real open transfer from the simulator, and the list its close appends to."""
    made = []

    def build():
        rec = pbx.add_recording(start=datetime.datetime(2024, 3, 10, 14, 30), duration_s=1,
                                size_bytes=500_000, announce=False)
        stream = make_client(pbx).open_recording(rec.name, 0)
        closed = []
        stream.call_on_close(lambda: closed.append(True))
        made.append(stream)
        return stream, closed

    yield build
    for stream in made:
        stream.close()


def idle_with(manager, state: State, stream=None, handles: int = 0, received_bytes: int = 1000) -> Download:
    download = Download(manager, NAME)
    assert download.begin()
    with download._cond:
        download._stream, download.handles, download.received_bytes = stream, handles, received_bytes
        download._to(state)
    return download


def test_a_parked_download_nobody_came_back_to_is_suspended_when_range_works(idle_manager, live_stream):
    stream, closed = live_stream()
    download = idle_with(idle_manager(range_honoured=True), State.PARKED, stream)
    download.expire(download.idle_deadline())           # at its deadline exactly
    assert download.state is State.SUSPENDED and download.error is None
    assert closed == [True] and download._stream is None


@pytest.mark.parametrize("range_honoured", [None, False])
def test_a_parked_download_nobody_came_back_to_is_dropped_without_range(idle_manager, live_stream, range_honoured):
    stream, closed = live_stream()
    download = idle_with(idle_manager(range_honoured=range_honoured), State.PARKED, stream)
    download.expire(download.idle_deadline())
    assert download.cancelled and closed == [True]
    assert NAME in str(download.error) and says(download.error, "no reader came back")


def test_a_suspended_download_nobody_came_back_to_is_dropped(idle_manager):
    download = idle_with(idle_manager(range_honoured=True), State.SUSPENDED)
    download.expire(download.idle_deadline())
    assert download.cancelled and says(download.error, "no reader came back")


@pytest.mark.parametrize("state, handles, early_s", [
    (State.PARKED, 0, 0.001),       # before its deadline
    (State.PARKED, 1, -100.0),      # a reader holds it
    (State.SUSPENDED, 2, -100.0),
])
def test_an_idle_download_is_left_alone_before_its_deadline_or_with_a_reader(idle_manager, state, handles, early_s):
    download = idle_with(idle_manager(range_honoured=True), state, handles=handles)
    deadline = download._idle_deadline_locked()
    download.expire(deadline - early_s)
    assert download.state is state and download.error is None


@pytest.mark.parametrize("state", [State.QUEUED, State.RUNNING])
def test_the_janitor_leaves_queued_and_running_downloads_alone(idle_manager, state):
    download = Download(idle_manager(), NAME)
    if state is State.RUNNING:
        assert download.begin()
    download.expire(time.monotonic() + 1000)
    assert download.state is state


@pytest.mark.parametrize("state, cancelled", [
    (State.QUEUED, True), (State.PARKED, True), (State.SUSPENDED, True),
    (State.RUNNING, False),          # its worker ends it (it sees the manager stopping)
])
def test_shutdown_cancels_every_download_no_worker_runs(idle_manager, live_stream, state, cancelled):
    stream, closed = live_stream()
    download = Download(idle_manager(), NAME)
    if state is not State.QUEUED:
        assert download.begin()
        with download._cond:
            download._stream = stream
            if state is not State.RUNNING:
                download._to(state)
    download.expire(time.monotonic(), stopping=True)
    assert download.cancelled is cancelled
    if cancelled:
        assert says(download.error, "shutdown")
        assert closed == ([True] if state is not State.QUEUED else [])
    else:
        assert download.state is State.RUNNING and closed == []


# -- readers joining -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("end", [State.FAILED, State.CANCELLED])
def test_a_reader_cannot_join_a_download_that_ended_without_its_bytes(idle_manager, end):
    download = Download(idle_manager(), NAME)
    assert download.begin()
    with download._cond:
        download._end_locked(end, errors.PbxUnavailableError("x") if end is State.FAILED else None)
    assert download.join() is False
    assert (download.handles, download.opens) == (0, 0)


def test_readers_joining_a_queued_download_raise_its_priority(idle_manager):
    manager = idle_manager()
    download = manager.prefetch(NAME)
    assert download.join() is True and download.join() is True
    assert (download.handles, download.opens) == (2, 2)
    assert queued(manager) == [(0, NAME), (0, NAME), (1, NAME)]   # the worker runs it once (`begin`)


def test_a_reader_joining_a_running_download_queues_nothing(idle_manager):
    manager = idle_manager()
    download = Download(manager, NAME)
    assert download.begin()
    assert download.join() is True
    assert download.state is State.RUNNING and queued(manager) == []
    download.leave()
    assert download.handles == 0 and download.opens == 1


# -- opened again soon ---------------------------------------------------------------------------------------------


def test_an_open_within_30_s_of_the_last_is_a_reopen(idle_manager):
    manager = idle_manager()
    assert manager._note_open_locked(NAME) is False
    assert manager._note_open_locked(NAME) is True
    assert manager._note_open_locked(OTHER) is False
    manager._recent_opens[NAME] = time.monotonic() - 31.0      # README: opened again within 30 s
    manager._recent_opens.move_to_end(NAME, last=False)
    assert manager._note_open_locked(NAME) is False


def test_the_recent_opens_are_bounded_oldest_first(idle_manager):
    manager = idle_manager()
    now = time.monotonic()
    bound = downloads_module.RECENT_OPENS_MAX
    manager._recent_opens.update((f"old{i}", now) for i in range(bound + 1))
    manager._note_open_locked(NAME)              # one over the bound: the oldest goes
    assert len(manager._recent_opens) == bound + 1
    assert "old0" not in manager._recent_opens and "old1" in manager._recent_opens
    assert manager._note_open_locked(NAME) is True


# -- the size a reply announces ---------------------------------------------------------------------------------------


def test_an_announced_size_is_believed_once_and_reported_once(idle_manager, cache):
    learned = []
    manager = idle_manager(on_size=lambda name, size: learned.append((name, size)))
    download = Download(manager, NAME)
    download._partial = cache.new_partial(NAME)
    try:
        download._accept_total(None)                      # nothing announced: nothing learned
        assert download.total_bytes is None and learned == []
        download.received_bytes = 1000
        download._accept_total(1000)                      # all of it held: fine
        assert download.total_bytes == 1000 and learned == [(NAME, 1000)]
        download._accept_total(1000)                      # the same again: nothing new to tell
        assert learned == [(NAME, 1000)]
        with pytest.raises(errors.DownloadError) as info:
            download._accept_total(2000)
        assert NAME in str(info.value) and "2000" in str(info.value) and "1000" in str(info.value)
    finally:
        download._partial.discard()
        download._partial.close()


def test_more_bytes_held_than_announced_is_an_error(idle_manager, cache):
    download = Download(idle_manager(), NAME)
    download._partial = cache.new_partial(NAME)
    try:
        download.received_bytes = 1001
        with pytest.raises(errors.DownloadError) as info:
            download._accept_total(1000)
        assert NAME in str(info.value) and download.total_bytes is None
    finally:
        download._partial.discard()
        download._partial.close()


# -- the manager's callbacks ----------------------------------------------------------------------------------------------


def test_a_commit_is_shown_to_on_commit_and_its_failure_costs_nothing(idle_manager):
    seen = []

    def pread(size, offset):
        return b"x" * size

    idle_manager(on_commit=lambda *args: seen.append(args)).committed(NAME, 1234, pread)
    assert seen == [(NAME, 1234, pread)]

    def broken(*args):
        raise OSError("the page cache is full")

    idle_manager(on_commit=broken).committed(NAME, 1234, pread)   # no exception
    idle_manager().committed(NAME, 1234, pread)


def test_a_finished_download_is_reported_complete_or_leaves_the_map(idle_manager):
    completed = []
    manager = idle_manager(on_complete=lambda name, size: completed.append((name, size)))
    done = manager.acquire(NAME)                    # a reader holds each of them
    failed = manager.acquire(OTHER)
    for download in (done, failed):
        assert download.begin()
    with done._cond:
        done.received_bytes = 4321
        done._to(State.COMPLETE)
    with failed._cond:
        failed._end_locked(State.FAILED, errors.PbxUnavailableError("reset"))
    manager.finished(done)
    manager.finished(failed)
    assert completed == [(NAME, 4321)]
    assert manager.running() == [done]             # the failed one: the next open starts afresh
    manager.release(done)
    manager.release(failed)
    assert manager.running() == []                 # retired once nobody reads it


# -- small lifecycle facts ---------------------------------------------------------------------------------------------


def test_the_idle_clock_starts_when_a_download_first_goes_idle(idle_manager):
    download = Download(idle_manager(range_honoured=True), NAME)
    assert download.begin()
    download._idle_since = -1000.0                    # whatever it was before
    with download._cond:
        download._to(State.PARKED)
    assert abs(download._idle_since - time.monotonic()) < 5.0
    download._idle_since -= 10.0                      # parked a while ago...
    parked_at = download._idle_since
    with download._cond:
        download._to(State.SUSPENDED)                 # ...then suspended: still idle since then
    assert download._idle_since == parked_at


@pytest.mark.parametrize("state", [State.QUEUED, State.RUNNING])
def test_only_an_idle_download_has_a_deadline_or_stays_held_when_left(idle_manager, state):
    download = Download(idle_manager(), NAME)
    if state is State.RUNNING:
        assert download.begin()
    assert download.idle_deadline() is None
    assert download.retirable() is False             # not ended: its pin and descriptor stay


def test_an_ended_download_is_retired_only_when_its_last_reader_leaves(idle_manager):
    download = Download(idle_manager(), NAME)
    assert download.begin()
    download.handles = 1
    with download._cond:
        download._end_locked(State.FAILED, errors.PbxUnavailableError("reset"))
    assert download.retirable() is False
    download.leave()
    assert download.retirable() is True


@pytest.mark.parametrize("range_mode, honoured", [("honour", True), ("ignore", False)])
def test_a_resume_after_one_byte_teaches_whether_range_works(pbx, make_client, idle_manager, cache, range_mode, honoured):
    rec = pbx.add_recording(start=datetime.datetime(2024, 3, 10, 14, 30), duration_s=1,
                            size_bytes=100_000, announce=False)
    pbx.range_mode = range_mode
    client = make_client(pbx)
    told = []
    manager = DownloadManager(client.open_recording, cache, max_downloads=0, on_range=told.append)
    download = Download(manager, rec.name)
    download._partial = cache.new_partial(rec.name)
    try:
        download._partial.write(pbx.recording_bytes(rec.name)[:1])
        download.received_bytes = 1
        download._open_stream()
        assert told == [honoured] and manager.range_honoured is honoured
        assert download._skip_bytes == (0 if honoured else 1)
    finally:
        download._drop_stream()
        download._partial.discard()
        download._partial.close()
        manager.stop()


@pytest.mark.parametrize("handles, want_bytes, received_bytes, read_size", [
    (1, 4096, 0, 4096 + 128 * 1024),          # no more than the window allows
    (1, 4096, 4096 + 128 * 1024 - 1, 1),      # one byte: never 0
    (1, 2_000_000, 0, 1 << 20),               # at most 1 MiB per socket read
    (0, 0, 0, 1 << 20),                       # finishing without readers: 1 MiB
])
def test_a_socket_read_asks_for_no_more_than_demand_allows(idle_manager, live_stream, handles, want_bytes,
                                                           received_bytes, read_size):
    stream, _ = live_stream()
    download = wanted(idle_manager(), handles=handles, opens=2, received_bytes=received_bytes)
    asks(download, want_bytes)
    download._stream = stream
    download._limit_next_read()
    assert stream.read_size_bytes == read_size


def test_a_paused_download_looks_at_the_clock_four_times_a_second(idle_manager, monkeypatch):
    monkeypatch.setattr(downloads_module, "PAUSE_SUSPEND_S", 0.01)
    download = wanted(idle_manager(), handles=1, received_bytes=4096 + 128 * 1024)
    asks(download, 4096)
    began = time.monotonic()
    with pytest.raises(downloads_module._Idle):
        download._wait_for_demand()
    assert time.monotonic() - began < 1.0          # a quarter-second wait, not a 1 s one or longer


def test_a_missing_recording_opened_without_grace_fails_at_once(pbx, make_client, cache):
    rec = pbx.add_recording(start=datetime.datetime(2024, 3, 10, 14, 30), duration_s=1, stored=False,
                            announce=False)
    manager = DownloadManager(make_client(pbx).open_recording, cache, max_downloads=1, stall_timeout_s=WAIT_S)
    try:
        download = manager.acquire(rec.name)
        began = time.monotonic()
        with pytest.raises(errors.RecordingNotFoundError):
            download.read(0, 4096)
        assert time.monotonic() - began < 0.9          # no grace: not retried for a second
        manager.release(download)
    finally:
        manager.stop()
    assert pbx.counters["recording/get_random"] == 1


def test_a_manager_runs_the_readme_defaults_in_named_daemon_threads(cache):
    """README: --max-downloads 4 and --stall-timeout 60 by default (the mount passes them;
    a manager built without them behaves the same)."""
    before = set(threading.enumerate())
    manager = DownloadManager(never_called, cache)
    try:
        started = {thread.name: thread for thread in set(threading.enumerate()) - before
                   if thread.name.startswith("download")}
        assert sorted(started) == ["download-0", "download-1", "download-2", "download-3", "download-janitor"]
        assert all(thread.daemon for thread in started.values())
        assert manager.stall_timeout_s == 60.0
    finally:
        manager.stop()
    assert not any(thread.is_alive() for thread in started.values())


# -- retries -------------------------------------------------------------------------------------------------------------


class ScriptedStream:
    """A PBX reply as `pbx.RecordingStream` describes it: *data* from *start_offset*, then
    *error* instead of the end when given (the simulator cannot order a reset with progress
    before failures without any, which is the case here)."""

    def __init__(self, data: bytes, start_offset: int, total_bytes: int, error=None) -> None:
        self.start_offset, self.total_bytes, self.read_size_bytes = start_offset, total_bytes, 1 << 20
        self._data, self._error = data, error

    def chunks(self):
        yield self._data
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        pass


def test_a_failure_after_progress_starts_the_count_again(cache, monkeypatch):
    monkeypatch.setattr(downloads_module, "BACKOFF_INITIAL_S", 0.001)
    data = bytes(range(256)) * 12
    attempts = []

    def open_stream(name, offset):
        attempts.append(offset)
        if len(attempts) == 1:     # progress, then a reset
            return ScriptedStream(data[:1000], 0, len(data), errors.PbxUnavailableError("reset"))
        if len(attempts) <= 3:     # two without progress: three failures in a row, one under the limit of 4
            raise errors.PbxUnavailableError("the PBX said Failed")
        return ScriptedStream(data[offset:], offset, len(data))

    manager = DownloadManager(open_stream, cache, max_downloads=1, stall_timeout_s=WAIT_S)
    try:
        download = manager.acquire(NAME)
        assert download.read(0, len(data) + 1) == data
        manager.release(download)
    finally:
        manager.stop()
    assert attempts == [0, 1000, 1000, 1000]


def test_a_recording_larger_than_the_cache_pushes_out_no_cached_one(idle_manager, tmp_path):
    small = DiskCache(str(tmp_path / "small"), 1000)
    put_in_cache(small, OTHER, b"RIFF" + bytes(596))
    download = Download(idle_manager(), NAME)
    download._partial = small.new_partial(NAME)
    try:
        download._accept_total(5000)                      # announced: five times the budget
        download._append(bytes(600))
        assert small.contains(OTHER)                      # it will never be kept: evicts nothing
    finally:
        download._partial.discard()
        download._partial.close()


def test_every_connection_is_closed_after_a_reset_and_at_the_end(pbx, make_client, cache, monkeypatch):
    monkeypatch.setattr(downloads_module, "BACKOFF_INITIAL_S", 0.001)
    rec = pbx.add_recording(start=datetime.datetime(2024, 3, 10, 14, 30), duration_s=1,
                            size_bytes=300_000, announce=False)
    pbx.range_mode = "honour"
    pbx.reset_after_bytes, pbx.reset_downloads = 100_000, 1
    client = make_client(pbx)
    opened, closed = [], []

    def open_stream(name, offset):
        stream = client.open_recording(name, offset)
        opened.append(offset)
        stream.call_on_close(lambda: closed.append(offset))
        return stream

    manager = DownloadManager(open_stream, cache, max_downloads=1, stall_timeout_s=WAIT_S)
    try:
        download = manager.acquire(rec.name)
        assert download.read(0, rec.size_bytes + 1) == pbx.recording_bytes(rec.name)
        manager.release(download)
        assert download.complete
    finally:
        manager.stop()
    assert len(opened) == 2 and opened[0] == 0 and opened[1] > 0
    assert sorted(closed) == sorted(opened)


def test_four_failures_in_a_row_without_progress_fail_the_readers(cache, monkeypatch):
    monkeypatch.setattr(downloads_module, "BACKOFF_INITIAL_S", 0.001)
    attempts = []

    def open_stream(name, offset):
        attempts.append(offset)
        if len(attempts) == 1:     # bytes, then a reset: a failure that made progress
            return ScriptedStream(bytes(1000), 0, 5000, errors.PbxUnavailableError("reset"))
        raise errors.PbxUnavailableError("the PBX said Failed")

    manager = DownloadManager(open_stream, cache, max_downloads=1, stall_timeout_s=WAIT_S)
    try:
        download = manager.acquire(NAME)
        with pytest.raises(errors.PbxUnavailableError, match="Failed"):
            download.read(0, 5000)
        manager.release(download)
    finally:
        manager.stop()
    assert attempts == [0, 1000, 1000, 1000]      # the reset and three more: four in a row


def test_a_first_request_teaches_nothing_about_range(pbx, make_client, cache):
    rec = pbx.add_recording(start=datetime.datetime(2024, 3, 10, 14, 30), duration_s=1,
                            size_bytes=100_000, announce=False)
    told = []
    manager = DownloadManager(make_client(pbx).open_recording, cache, max_downloads=0, on_range=told.append)
    download = Download(manager, rec.name)
    download._partial = cache.new_partial(rec.name)
    try:
        download._open_stream()                       # from byte 0: no Range asked
        assert told == [] and manager.range_honoured is None
    finally:
        download._drop_stream()
        download._partial.discard()
        download._partial.close()
        manager.stop()


def test_a_recording_opened_again_soon_is_finished_when_its_reader_leaves(idle_manager):
    manager = idle_manager()
    first = manager.acquire(NAME)
    assert first.begin()
    with first._cond:
        first._end_locked(State.CANCELLED, None)      # dropped: nobody came back in time
    manager.finished(first)
    manager.release(first)
    again = manager.acquire(NAME)                     # opened again within 30 s: a new download
    assert again is not first
    again.leave()                                     # its reader leaves at once, after 4 KiB
    again.received_bytes = 4096
    again._check_wanted()                             # yet it goes on to the end
    assert again._wait_for_demand() is None


@pytest.mark.parametrize("range_honoured, state, kept", [(True, State.SUSPENDED, True), (None, State.CANCELLED, False)])
def test_a_download_nobody_came_back_to_keeps_or_gives_back_its_bytes(idle_manager, cache, range_honoured, state, kept):
    manager = idle_manager(range_honoured=range_honoured)
    download = manager.acquire(NAME)
    assert download.begin()
    download._partial = cache.new_partial(NAME)
    download._append(bytes(5000))
    with download._cond:
        download._to(State.PARKED)
    manager.release(download)                          # its reader left
    download.expire(download.idle_deadline())
    assert download.state is state
    assert manager.running() == ([download] if kept else [])     # dropped: the next open starts afresh
    assert cache.usage()["pinned_bytes"] == (5000 if kept else 0)  # suspended bytes count until dropped
