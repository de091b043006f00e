"""Discovery (the loop) with the real S-Series catalogue against the simulator: resyncs find
rows the PBX exported late, nothing the PBX sends ends the loop, and `status` says when
discovery is failing."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest

from harness import holds_for, wait_until
from yeastarfs import errors
from yeastarfs.discovery import Discovery
from yeastarfs.index import RecordingIndex
from yeastarfs.models import Recording
from yeastarfs.pbx.sseries.cdr import CdrCatalogue

DAY_S = 86400.0


class Found:
    """The on_recordings callback: remembers each name with the kind of pass that found it
    and returns how many were new, as the mount's does."""

    def __init__(self, index=None):
        self.kinds: dict[str, str] = {}
        self.index = index
        self._lock = threading.Lock()

    def __call__(self, batch, kind):
        if self.index is not None:
            self.index.add(batch)
        with self._lock:
            new = [rec.name for rec in batch if rec.name not in self.kinds]
            for name in new:
                self.kinds[name] = kind
        return len(new)

    def has(self, name):
        with self._lock:
            return name in self.kinds


@pytest.fixture
def make_discovery(make_client):
    """``make_discovery(sim, found, **Discovery options)``: started; stopped at the end."""
    started = []

    def build(sim, found, **options):
        client = make_client(sim)
        client.login()
        options.setdefault("since_s", 2 * DAY_S)
        options.setdefault("poll_interval_s", 0.2)
        discovery = Discovery(CdrCatalogue(client), found, **options).start()
        started.append(discovery)
        assert discovery.wait_first_pass(10)
        return discovery

    yield build
    for discovery in started:
        discovery.stop()


def recent_calls(sim, count=3):
    """Calls of the last hours, so that polls are anchored near the PBX's now."""
    now = sim.now_local()
    return [sim.add_recording(start=now - dt.timedelta(minutes=20 * (i + 1)), duration_s=30, announce=False)
            for i in range(count)]


def late_call(sim, hours_ago=21):
    """A call that started *hours_ago*, whose CDR row the PBX exports only now."""
    start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=hours_ago)
    rec = sim.add_recording(start=start, duration_s=30, in_cdr=False, announce=False)
    return sim.publish_cdr(rec.name)


def test_a_periodic_resync_finds_a_row_exported_late(pbx, make_discovery):
    recent_calls(pbx)
    found = Found()
    discovery = make_discovery(pbx, found, resync_interval_s=1.0)
    late = late_call(pbx)
    wait_until(lambda: found.has(late.name), 5, message="the late row")
    assert found.kinds[late.name] == "resync"
    # The resync that found it is noted once it ends; the next one finds nothing new.
    status = wait_until(lambda: (s := discovery.status())["last_resync_new"] == 0 and s, 5,
                        message="a resync with nothing new")
    assert status["last_resync_found"] == 4 and status["resync_interval_s"] == 1.0


def test_polls_miss_a_late_row_and_resync_now_finds_it(pbx, make_discovery):
    recent_calls(pbx)
    found = Found()
    discovery = make_discovery(pbx, found, resync_interval_s=0)
    late = late_call(pbx)
    polls = discovery.status()["polls"]
    holds_for(lambda: not found.has(late.name), 1.0, message="polls not finding a 21-hour-old call")
    assert discovery.status()["polls"] > polls + 2
    discovery.resync_now()
    wait_until(lambda: discovery.status()["last_resync_new"] == 1, 5, message="the resync asked for")
    assert found.kinds[late.name] == "resync"


@pytest.mark.parametrize("depth", [100_000, 60_000])  # beyond the reply size cap, and within it
def test_json_nested_too_deep_is_reported_and_survived(pbx, make_discovery, depth):
    """Issue 9 item 3: 100,000 '[' to cdr/get_random once killed the sync thread through a
    RecursionError; now it is a failure like any other, in `status`, and polling goes on."""
    recent_calls(pbx)
    found = Found()
    discovery = make_discovery(pbx, found)
    pbx.api_raw_reply["cdr/get_random"] = b"[" * depth
    status = wait_until(lambda: (s := discovery.status())["consecutive_failures"] >= 2 and s, 10,
                        message="discovery to report the failure")
    assert status["last_error"].startswith("cdr/get_random") and status["failing_since"]
    assert "RecursionError" not in status["last_error"]
    del pbx.api_raw_reply["cdr/get_random"]
    after = pbx.add_recording(duration_s=5, announce=False)
    wait_until(lambda: found.has(after.name), 5, message="the recording after the PBX recovered")
    assert discovery.status()["consecutive_failures"] == 0


def test_a_duration_beyond_any_integer_is_dropped_not_fatal(pbx, make_discovery, tmp_path):
    """Issue 9 item 3: talkduraction=99999999999999999999 once overflowed SQLite and killed
    the sync thread; the index now drops the duration and keeps the recording."""
    [rec] = recent_calls(pbx, 1)
    hostile = dict(rec.cdr_row(), callid="7.7", talkduraction="99999999999999999999",
                   recording=rec.name.replace(rec.callid, "7.7"))
    pbx.add_cdr_row(hostile)
    with RecordingIndex(str(tmp_path / "index.sqlite3")) as index:
        found = Found(index)
        discovery = make_discovery(pbx, found)
        assert found.has(hostile["recording"]) and found.has(rec.name)
        assert index.get(hostile["recording"]).recording.talk_s is None
        after = pbx.add_recording(duration_s=5, announce=False)
        wait_until(lambda: found.has(after.name), 5, message="a recording polled after the hostile row")
        assert discovery.status()["failures"] == 0
        discovery.stop()


# -- the loop against a scripted catalogue: status, backoff, retried resyncs ------------------------


class ScriptedCatalogue:
    """A catalogue whose next answers are set by the test: a list of recordings or an exception."""

    def __init__(self):
        self.answers = []           # consumed first; then `default`
        self.default = []
        self.calls = []             # ("backfill", since_s) or ("poll", None), in order
        self._lock = threading.Lock()

    def _next(self):
        with self._lock:
            answer = self.answers.pop(0) if self.answers else self.default
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def backfill(self, since_s):
        self.calls.append(("backfill", since_s))
        answer = self._next()
        yield answer[:1]        # the S-Series catalogue yields a day at a time
        yield answer[1:]

    def poll(self):
        self.calls.append(("poll", None))
        return self._next()


def recordings(*stamps):
    return [Recording(name=f"{stamp}-1.{i}-1001-1002-Internal.wav") for i, stamp in enumerate(stamps)]


def test_status_counts_passes_failures_and_the_recovery():
    catalogue = ScriptedCatalogue()
    found = Found()
    catalogue.answers = [recordings("20261127090000", "20261127091000", "20261127092000")]
    discovery = Discovery(catalogue, found, since_s=3 * DAY_S, poll_interval_s=0.05, resync_interval_s=0)
    assert discovery.status() == {
        "polls": 0, "last_poll_time": None, "last_resync_time": None, "last_resync_found": None,
        "last_resync_new": None, "resync_interval_s": 0, "failures": 0, "consecutive_failures": 0,
        "failing_since": None, "last_error": None, "last_error_time": None,
        "last_poll_ok": None, "last_resync_ok": None}
    catalogue.default = errors.PbxUnavailableError("PBX down")
    before = time.time()
    discovery.start()
    try:
        assert discovery.wait_first_pass(5)
        assert catalogue.calls[0] == ("backfill", 3 * DAY_S)
        failing = wait_until(lambda: (s := discovery.status())["consecutive_failures"] >= 2 and s, 5,
                             message="two failed polls")
        assert failing["polls"] == 1 and failing["failures"] == failing["consecutive_failures"]
        assert failing["last_resync_found"] == 3 and failing["last_resync_new"] == 3
        assert before <= failing["last_resync_time"] == failing["last_poll_time"] <= failing["failing_since"]
        assert failing["failing_since"] <= failing["last_error_time"] and failing["last_error"] == "PBX down"
        assert failing["last_resync_ok"] is True and failing["last_poll_ok"] is False
        first_failure = failing["failing_since"]
        catalogue.default = recordings("20261127093000")
        recovered = wait_until(lambda: (s := discovery.status())["consecutive_failures"] == 0 and s, 5,
                               message="a poll after the PBX came back")
        assert recovered["failing_since"] is None and recovered["failures"] >= 2
        assert recovered["last_poll_time"] > first_failure and recovered["polls"] >= 2
        assert recovered["last_resync_found"] == 3  # polls leave the last resync's figures alone
        assert recovered["last_poll_ok"] is True
        backfilled = recordings("20261127090000", "20261127091000", "20261127092000")
        assert found.kinds == {**{rec.name: "backfill" for rec in backfilled},
                               catalogue.default[0].name: "poll"}
    finally:
        discovery.stop()


def test_an_unexpected_error_is_reported_cut_and_redacted():
    catalogue = ScriptedCatalogue()
    catalogue.answers = [[], ValueError("token=" + "s" * 40 + " " + "x" * 400)]
    discovery = Discovery(catalogue, Found(), since_s=DAY_S, poll_interval_s=0.05)
    discovery.start()
    try:
        status = wait_until(lambda: (s := discovery.status())["failures"] == 1 and s, 5, message="the failure")
    finally:
        discovery.stop()
    assert status["last_error"].startswith("ValueError: token=***")
    assert "s" * 40 not in status["last_error"]
    assert len(status["last_error"]) == len("ValueError: ") + 300


def test_failures_back_off_from_5_s_doubling_up_to_the_poll_interval():
    catalogue = ScriptedCatalogue()
    catalogue.default = errors.PbxUnavailableError("PBX down")
    discovery = Discovery(catalogue, Found(), since_s=DAY_S, poll_interval_s=60.0)
    delays, delay = [], 0.0
    for _ in range(6):
        delay = discovery._run_once(delay)  # one pass, as the loop runs it; its wait is the loop's
        delays.append(delay)
    assert delays == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    catalogue.default = []
    assert discovery._run_once(delay) == 60.0  # a success waits the poll interval
    short = Discovery(ScriptedCatalogue(), Found(), since_s=DAY_S, poll_interval_s=2.0)
    short._catalogue.default = errors.PbxUnavailableError("PBX down")
    assert short._run_once(0.0) == 2.0  # never longer than the poll interval


def test_a_failed_resync_is_tried_again_before_the_next_poll():
    catalogue = ScriptedCatalogue()
    discovery = Discovery(catalogue, Found(), since_s=DAY_S, poll_interval_s=60.0, resync_interval_s=0)
    discovery._run_once(0.0)                       # the backfill
    discovery._run_once(0.0)                       # a poll
    assert [kind for kind, _ in catalogue.calls] == ["backfill", "poll"]
    discovery.resync_now()
    catalogue.answers = [errors.PbxUnavailableError("PBX down")]
    discovery._run_once(0.0)                       # the resync fails...
    discovery._run_once(0.0)                       # ...and is the next pass again
    discovery._run_once(0.0)
    assert [kind for kind, _ in catalogue.calls] == ["backfill", "poll", "backfill", "backfill", "poll"]
    assert discovery.status()["last_resync_new"] == 0


def test_resyncs_come_every_resync_interval():
    catalogue = ScriptedCatalogue()
    discovery = Discovery(catalogue, Found(), since_s=DAY_S, poll_interval_s=0.01, resync_interval_s=0.3)
    discovery.start()
    try:
        wait_until(lambda: [kind for kind, _ in catalogue.calls].count("backfill") >= 3, 5,
                   message="three passes over the whole window")
    finally:
        discovery.stop()
    kinds = [kind for kind, _ in catalogue.calls]
    first, second = [i for i, kind in enumerate(kinds) if kind == "backfill"][1:3]
    polls_between = second - first - 1
    assert 10 <= polls_between, kinds  # 0.3 s of 0.01 s polls between two resyncs, not a resync each pass


def test_by_default_only_a_sighup_resyncs_and_an_unstarted_loop_stops_quietly():
    catalogue = ScriptedCatalogue()
    discovery = Discovery(catalogue, Found(), since_s=DAY_S, poll_interval_s=60.0)
    assert discovery.status()["resync_interval_s"] == 0
    discovery.stop()  # never started: nothing to join
    for _ in range(3):
        discovery._run_once(0.0)
    assert [kind for kind, _ in catalogue.calls] == ["backfill", "poll", "poll"]
    assert discovery.wait_first_pass(0) is False  # set by the loop, which never ran
