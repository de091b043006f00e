"""Discovery (the loop) with the real S-Series catalogue against the simulator: resyncs find
rows the PBX exported late, nothing the PBX sends ends the loop, and `status` says when
discovery is failing."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from harness import holds_for, wait_until
from yeastarfs.discovery import Discovery
from yeastarfs.index import RecordingIndex
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
