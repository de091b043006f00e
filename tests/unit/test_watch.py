"""yeastarfs watch without a mount: the cursor, the state file, links, and the loop over a real
index (written by one RecordingIndex, read by a read-only one, as a mount and a watch do)."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import sys

import pytest

from yeastarfs.app import watch as watch_module
from yeastarfs.app.watch import Cursor, Job, StateFile, WatchOptions, Watcher, command_environment, make_link
from yeastarfs.errors import ConfigError
from yeastarfs.index import RecordingIndex
from yeastarfs.models import Recording


def name_at(minutes_ago: float, n: int) -> str:
    stamp = (dt.datetime.now() - dt.timedelta(minutes=minutes_ago)).strftime("%Y%m%d%H%M%S")
    return f"{stamp}-1700000000.{n}-100{n}-200{n}-Inbound.wav"


@pytest.fixture
def writer(tmp_path):
    with RecordingIndex(str(tmp_path / "index.sqlite3")) as index:
        yield index


@pytest.fixture
def run(tmp_path, writer):
    """run(options) -> (status, lines): one watch over the writer's index, as a mount's reader."""
    def run_watch(options: WatchOptions, state: StateFile | None = None):
        out = io.StringIO()
        with RecordingIndex(writer.db_path, read_only=True) as index:
            cursor, since_start, horizon = watch_module.starting_cursor(index, state, options.since_s)
            watcher = Watcher(str(tmp_path / "mnt"), index, options, cursor, state, out, since_start, horizon,
                              mount_alive=lambda: True)
            status = watcher.run()
        return status, out.getvalue().splitlines()
    return run_watch


def add(writer, *names: str, callfrom: str = "1001") -> None:
    writer.add([Recording(name=name, callid=name.split("-")[1], callfrom=callfrom, talk_s=7) for name in names])


def test_cursor_low_water_follows_the_lowest_unsettled_seq():
    cursor = Cursor(0)
    assert all(cursor.take(seq, f"n{seq}") for seq in (1, 2, 3, 5))  # 4 lost to a rollback: a gap
    cursor.settle(2, ok=True)
    cursor.settle(3, ok=True)
    assert cursor.low == 0 and cursor.done == {2, 3}
    cursor.settle(1, ok=True)
    assert cursor.low == 4  # the gap counts as settled: nothing will ever be found there
    cursor.settle(5, ok=False)
    assert cursor.low == 5 and cursor.failed == {5} and cursor.last == (5, "n5")
    assert cursor.to_json() == {"version": 1, "cursor": 5, "done": [], "failed": [5],
                                "last": {"seq": 5, "name": "n5"}}
    again = Cursor.from_json(json.loads(json.dumps(cursor.to_json())))
    assert not again.take(5, "n5")  # queued apart at the start, not fetched twice
    assert again.take(6, "n6") and again.low == 5


def test_state_file_is_replaced_atomically_and_locked(tmp_path):
    path = str(tmp_path / "deep" / "state.json")
    state = StateFile(path)
    assert state.load() is None
    cursor = Cursor(7, done=[9], failed=[3], last=(9, "x"))
    state.save(cursor)
    assert state.load().to_json() == cursor.to_json()
    assert sorted(os.listdir(tmp_path / "deep")) == ["state.json", "state.json.lock"]  # no temp file left
    with pytest.raises(ConfigError, match="in use"):
        StateFile(path)
    state.close()
    with open(path, "w") as handle:
        handle.write('{"version": 1, "cursor": -4}')
    with pytest.raises(ConfigError, match="unusable"):
        StateFile(path).load()


def test_recordings_go_out_in_discovery_order_once(run, writer, tmp_path):
    add(writer, name_at(3, 1))
    status, lines = run(WatchOptions())
    assert (status, lines) == (0, [])  # without --since or --state: only what comes later
    add(writer, name_at(2, 2))
    add(writer, name_at(60, 3))  # an older call found later (a CDR poll) comes after
    add(writer, name_at(3 * 24 * 60, 4))
    status, lines = run(WatchOptions(since_s=86_400))
    names = [os.path.basename(line) for line in lines]
    assert status == 0 and names == [name_at_seq(writer, seq) for seq in (1, 2, 3)]
    assert lines[0] == os.path.join(str(tmp_path / "mnt"), writer.path_of(names[0]).lstrip("/"))


def name_at_seq(index, seq: int) -> str:
    return index.recordings_after(seq - 1, 1)[0][1].name


def test_state_resumes_exactly_where_it_stopped(run, writer, tmp_path):
    add(writer, name_at(9, 1))
    state = StateFile(str(tmp_path / "state.json"))
    assert run(WatchOptions(), state) == (0, [])  # a first run starts at the end and says so
    assert json.load(open(state.path))["cursor"] == 1
    add(writer, name_at(8, 2), name_at(7, 3))
    _, lines = run(WatchOptions(since_s=10 ** 6), state)  # --since is ignored once a state exists
    assert [os.path.basename(line) for line in lines] == [name_at_seq(writer, 2), name_at_seq(writer, 3)]
    assert run(WatchOptions(), state) == (0, [])
    add(writer, name_at(1, 4))
    assert len(run(WatchOptions(), state)[1]) == 1
    state.close()


def test_a_state_of_another_index_is_refused(run, writer, tmp_path):
    path = str(tmp_path / "state.json")
    with open(path, "w") as handle:
        json.dump(Cursor(5, last=(5, name_at(1, 9))).to_json(), handle)
    add(writer, name_at(1, 1))
    state = StateFile(path)
    with pytest.raises(ConfigError, match="another index"):
        run(WatchOptions(), state)
    state.close()


COMMAND = """
import os, sys
path, log = sys.argv[-1], sys.argv[1]
tries = log + "." + os.path.basename(path)
with open(tries, "a") as handle:
    handle.write("x")
first_time = os.path.getsize(tries) == 1
if os.environ["YEASTAR_CALLER"] == "666" or (os.environ["YEASTAR_CALLER"] == "13" and first_time):
    sys.exit(3)
with open(log, "a") as handle:
    handle.write(f"{os.environ['YEASTAR_CURSOR']} {os.environ['YEASTAR_TALK_SECONDS']} {path}\\n")
"""


def test_exec_retries_reports_and_never_blocks_the_others(run, writer, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(watch_module, "RETRY_BASE_S", 0.01)
    add(writer, name_at(5, 1))
    add(writer, name_at(4, 2), callfrom="13")   # fails once, then succeeds
    add(writer, name_at(3, 3), callfrom="666")  # always fails
    add(writer, name_at(2, 4))
    log = str(tmp_path / "done.log")
    options = WatchOptions(since_s=3600, output_format="json", command=[sys.executable, "-c", COMMAND, log],
                           jobs=2, retries=2)
    status, lines = run(options)
    rows = [json.loads(line) for line in lines]
    assert status == 1  # one given up on
    assert sorted(row["cursor"] for row in rows if "error" not in row) == [1, 2, 4]
    [failed] = [row for row in rows if "error" in row]
    assert failed["cursor"] == 3 and failed["caller"] == "666" and "exit status 3 (after 3 attempts)" in failed["error"]
    done = sorted(line.split()[0] for line in open(log))
    assert done == ["1", "2", "4"] and all(line.split()[1] == "7" for line in open(log))
    assert open(f"{log}.{name_at_seq(writer, 3)}").read() == "xxx"  # first try + 2 retries
    assert "retry 1 of 2" in capfd.readouterr().err


def test_failed_recordings_run_again_at_the_next_start(run, writer, tmp_path, monkeypatch):
    monkeypatch.setattr(watch_module, "RETRY_BASE_S", 0.01)
    state = StateFile(str(tmp_path / "state.json"))
    run(WatchOptions(), state)
    add(writer, name_at(2, 1), name_at(1, 2))
    flag = tmp_path / "broken"
    flag.touch()
    script = f"import os, sys; sys.exit(1 if os.path.exists({str(flag)!r}) else 0)"
    assert run(WatchOptions(command=[sys.executable, "-c", script], retries=0), state) == (1, [])
    assert json.load(open(state.path))["failed"] == [1, 2]
    flag.unlink()
    status, lines = run(WatchOptions(command=[sys.executable, "-c", script]), state)
    assert status == 0 and len(lines) == 2
    assert json.load(open(state.path))["failed"] == [] and json.load(open(state.path))["cursor"] == 2
    state.close()


def test_a_closed_stdout_ends_quietly_and_settles_nothing_unwritten(tmp_path, writer):
    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError

    add(writer, name_at(2, 1), name_at(1, 2))
    with RecordingIndex(writer.db_path, read_only=True) as index:
        cursor = Cursor(0)
        watcher = Watcher(str(tmp_path), index, WatchOptions(), cursor, out=ClosedPipe(), mount_alive=lambda: True)
        assert watcher.run() == 0
    assert cursor.low == 0 and not cursor.done


def test_links_are_renamed_into_place(tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    make_link(str(folder), "a.wav", "/mnt/x/a.wav")
    make_link(str(folder), "a.wav", "/mnt/y/a.wav")  # delivered again after a crash: replaced
    assert os.readlink(folder / "a.wav") == "/mnt/y/a.wav"
    assert os.listdir(folder / watch_module.LINK_TMP_DIR) == []


def test_command_environment_carries_the_json_columns_with_the_pbx_offset(tmp_path, writer):
    name = "20261127100005-1764237605.3-1001-2002-Inbound.wav"
    writer.add([Recording(name=name, callid="1764237605.3", timestart="2026-11-27 10:00:00", callfrom="1001",
                          callto="2002", call_s=9, talk_s=None, status="ANSWERED", call_type="Inbound")])
    zone = dt.timezone(dt.timedelta(hours=5, minutes=30))
    with RecordingIndex(writer.db_path, read_only=True, tz=zone) as index:
        watcher = Watcher(str(tmp_path / "mnt"), index, WatchOptions(), Cursor(0), zone=zone)
        seq, rec, _ = index.recordings_after(0)[0]
        env = command_environment(watcher._row(Job(seq, rec, "unused")))
    assert env == {"YEASTAR_PATH": str(tmp_path / "mnt" / "2026" / "11" / "27" / name), "YEASTAR_RECORDING": name,
                   "YEASTAR_CALLER": "1001", "YEASTAR_CALLEE": "2002", "YEASTAR_CALLID": "1764237605.3",
                   "YEASTAR_START_TIME": "2026-11-27T10:00:00+05:30", "YEASTAR_TYPE": "Inbound",
                   "YEASTAR_STATUS": "ANSWERED", "YEASTAR_CALL_SECONDS": "9", "YEASTAR_TALK_SECONDS": "",
                   "YEASTAR_CURSOR": "1"}


def test_only_a_real_yeastarfs_mount_is_opened(tmp_path):
    from yeastarfs.app.tools import mount_fstype, open_mount_index
    assert mount_fstype("/proc") == "proc" and mount_fstype(str(tmp_path)) is None
    for place, why in (("/proc", "proc"), (str(tmp_path), "not a mountpoint")):
        with pytest.raises(ConfigError, match=rf"not a yeastarfs mount \({why}\)"):
            open_mount_index(place)
    assert os.listdir(tmp_path) == []  # nothing created


def test_exec_waits_for_its_commands_with_descriptors_over_1023(run, writer, tmp_path, high_descriptors):
    add(writer, name_at(2, 1), name_at(1, 2))
    log = str(tmp_path / "done.log")
    options = WatchOptions(since_s=3600, output_format="json", command=[sys.executable, "-c", COMMAND, log], jobs=2)
    status, lines = run(options)
    assert status == 0 and sorted(json.loads(line)["cursor"] for line in lines) == [1, 2]
