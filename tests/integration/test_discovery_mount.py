"""Discovery through a real mount when the PBX lives in another zone, on another clock, exports
rows late or answers garbage (issue 10 items 1, 2, 7; issue 9 item 3).

The simulator runs in this process with a zone of its own (``tz``) and, where said, a clock
that runs fast; the daemon runs in its own process with another ``TZ``. Events are off
unless a test needs them, so the CDR is the only way recordings are found.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import zoneinfo

import pytest

from harness import holds_for, wait_until, yeastarfs_command

pytestmark = pytest.mark.fuse

KOLKATA, BOGOTA = "Asia/Kolkata", "America/Bogota"  # UTC+05:30 and UTC-05:00, no DST
POLL_S = 2
# A poll interval, plus the time a poll and a lookup take on a loaded machine.
POLL_SLACK_S = 3


def zone(name):
    return zoneinfo.ZoneInfo(name)


def sim_in(name):
    return {"tz": zone(name)}


def yeastarfs(*args, env=None, **kwargs):
    return subprocess.run(yeastarfs_command(*args), capture_output=True, text=True, timeout=60,
                          env=None if env is None else {**os.environ, **env}, **kwargs)


def status_of(mount, env=None):
    result = yeastarfs("status", mount.mountpoint, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def exists(mount, rec):
    return os.path.exists(mount.recording_path(rec.name))


def calls_of_the_last_hours(pbx):
    """Calls that ended in the last hour (the newest a moment ago), and others over two days."""
    now = dt.datetime.now(dt.timezone.utc)
    recent = [pbx.add_recording(start=now - dt.timedelta(minutes=minutes), duration_s=30, announce=False)
              for minutes in (50, 20, 5)]
    recent.append(pbx.add_recording(duration_s=10, announce=False))  # ends now
    return pbx.populate(8, days=2) + recent


def real_mtime_s(rec):
    """When the recording began, as a true instant: the call's start (its callid, Unix
    seconds) plus the ringing before the answer (the name's timestamp is the answer)."""
    return int(rec.callid.split(".")[0]) + rec.call_s - rec.talk_s


@pytest.mark.parametrize("pbx, daemon_zone, clock_offset_s", [
    (sim_in(KOLKATA), BOGOTA, 0),
    (sim_in(BOGOTA), KOLKATA, 0),
    (sim_in(KOLKATA), BOGOTA, 420),  # and the PBX's clock 7 minutes fast
    ({**sim_in(KOLKATA), "family": "p-series"}, BOGOTA, 420),
], indirect=["pbx"], ids=["pbx+0530-mount-0500", "pbx-0500-mount+0530", "pbx+0530-7min-fast-mount-0500",
                          "p-series-pbx+0530-7min-fast-mount-0500"])
def test_backfill_and_polls_find_every_recording_across_zones_and_clocks(pbx, mounted, daemon_zone, clock_offset_s):
    pbx.clock_offset_s = clock_offset_s
    recordings = calls_of_the_last_hours(pbx)
    mount = mounted("--no-events", "--poll-interval", str(POLL_S), env={"TZ": daemon_zone})
    missing = [rec.name for rec in recordings if not exists(mount, rec)]
    assert not missing, f"the backfill missed {missing}"
    new = pbx.add_recording(duration_s=5, announce=False)
    wait_until(lambda: exists(mount, new), POLL_S + POLL_SLACK_S, message="the new recording, by CDR poll")
    status = status_of(mount)
    assert status["pbx_clock_skew_s"] == pytest.approx(clock_offset_s, abs=3)
    assert status["discovery"]["consecutive_failures"] == 0


def late_row(pbx, hours_ago=21):
    """A call that started *hours_ago*, whose CDR row the PBX exports only now."""
    start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=hours_ago)
    rec = pbx.add_recording(start=start, duration_s=40, in_cdr=False, announce=False)
    return pbx.publish_cdr(rec.name)


def test_sighup_resyncs_and_finds_a_row_exported_late(pbx, mounted):
    calls_of_the_last_hours(pbx)
    mount = mounted("--no-events", "--poll-interval", "1", "--resync-interval", "1h")
    late = late_row(pbx)
    holds_for(lambda: not exists(mount, late), 3, message="polls not reaching back 21 hours")
    mount.process.send_signal(signal.SIGHUP)
    wait_until(lambda: exists(mount, late), 15, message="the late row after SIGHUP")


@pytest.mark.families
def test_the_periodic_resync_finds_a_row_exported_late(pbx, mounted):
    calls_of_the_last_hours(pbx)
    mount = mounted("--no-events", "--poll-interval", str(POLL_S), "--resync-interval", "5s")
    late = late_row(pbx)
    wait_until(lambda: exists(mount, late), 5 + POLL_S + POLL_SLACK_S, message="the late row, by resync")
    discovery = status_of(mount)["discovery"]
    assert discovery["resync_interval_s"] == 5 and discovery["last_resync_found"] >= 13
    shown = yeastarfs("status", mount.mountpoint)
    assert "recordings (1 new); every 5 s" in shown.stdout or "recordings (0 new); every 5 s" in shown.stdout


@pytest.mark.parametrize("pbx", [sim_in(KOLKATA)], indirect=True)
def test_pbx_timezone_gives_real_instants_in_stat_and_calls(pbx, mounted):
    recordings = calls_of_the_last_hours(pbx)
    env = {"TZ": BOGOTA}
    mount = mounted("--no-events", "--pbx-timezone", KOLKATA, env=env)
    for rec in recordings:
        assert os.stat(mount.recording_path(rec.name)).st_mtime == pytest.approx(real_mtime_s(rec), abs=2)
    status = status_of(mount)
    assert (status["pbx_timezone"], status["pbx_timezone_source"]) == (KOLKATA, "configured")
    result = yeastarfs("calls", mount.mountpoint, "--since", "3d", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    rows = {row["recording"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert set(rows) == {rec.name for rec in recordings}
    for rec in recordings:
        start_time = rows[rec.name]["start_time"]
        assert start_time == dt.datetime.strptime(rec.timestart, "%Y-%m-%d %H:%M:%S").isoformat() + "+05:30"
        assert dt.datetime.fromisoformat(start_time).timestamp() == int(rec.callid.split(".")[0])
    shown = yeastarfs("status", mount.mountpoint)
    assert f"{KOLKATA} (configured, UTC+05:30)" in shown.stdout


@pytest.mark.parametrize("pbx", [sim_in(KOLKATA)], indirect=True)
def test_the_zone_is_detected_from_an_event(pbx, mounted):
    recordings = pbx.populate(5, days=2)
    mount = mounted("--poll-interval", "3600", env={"TZ": BOGOTA})
    assert status_of(mount)["pbx_timezone_source"] == "assumed"
    announced = pbx.add_recording(duration_s=5)
    wait_until(lambda: exists(mount, announced), 10, message="the announced recording")
    status = wait_until(lambda: (s := status_of(mount))["pbx_timezone_source"] == "detected" and s, 10,
                        message="the zone detected")
    assert (status["pbx_timezone"], status["pbx_utc_offset_s"]) == ("UTC+05:30", 19800)
    for rec in recordings:  # first looked up now, so no attribute cached from before
        assert os.stat(mount.recording_path(rec.name)).st_mtime == pytest.approx(real_mtime_s(rec), abs=2)
    assert "time zone is UTC+05:30 (detected" in mount.log()


def test_hostile_replies_do_not_stop_discovery_and_status_says_so(pbx, mounted):
    """Issue 9 item 3, through the mount: a duration beyond any integer in one row, then
    100,000 '[' for cdr/get_random. The row's recording appears; while the replies are bad
    `status` says discovery is failing; once they are gone a CDR-only recording appears
    within a poll interval."""
    [rec, *_] = calls_of_the_last_hours(pbx)
    hostile = dict(rec.cdr_row(), callid="7.7", talkduraction="99999999999999999999",
                   recording=rec.name.replace(rec.callid, "7.7"))
    pbx.add_cdr_row(hostile)
    mount = mounted("--no-events", "--poll-interval", str(POLL_S))
    assert os.path.exists(mount.recording_path(hostile["recording"]))
    pbx.api_raw_reply["cdr/get_random"] = b"[" * 100_000
    wait_until(lambda: status_of(mount)["discovery"]["consecutive_failures"] >= 1, 3 * POLL_S + POLL_SLACK_S,
               message="status to report discovery failing")
    shown = yeastarfs("status", mount.mountpoint)
    assert "discovery:         FAILING since" in shown.stdout and "cdr/get_random" in shown.stdout
    del pbx.api_raw_reply["cdr/get_random"]
    new = pbx.add_recording(duration_s=5, announce=False)
    wait_until(lambda: exists(mount, new), POLL_S + POLL_SLACK_S, message="a recording after the PBX recovered")
    assert status_of(mount)["discovery"]["consecutive_failures"] == 0
    assert "discovery:         ok" in yeastarfs("status", mount.mountpoint).stdout


def test_calls_into_a_closed_pipe_ends_quietly(pbx, mounted):
    pbx.populate(1500, days=3)  # far more than a pipe holds
    mount = mounted("--no-events", "--poll-interval", "3600")
    for output in ("csv", "json"):
        command = shlex.join(yeastarfs_command("calls", mount.mountpoint, "--format", output))
        result = subprocess.run(["bash", "-c", f"set -o pipefail; {command} | head -1"],
                                capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stderr) == (0, ""), result.stderr
        assert len(result.stdout.splitlines()) == 1


def test_a_new_cache_does_not_warn_of_an_unclean_stop(pbx, mounted):
    pbx.populate(3, days=1)
    mount = mounted("--no-events", "--poll-interval", "3600")
    assert mount.unmount() == 0
    again = mounted("--no-events", "--poll-interval", "3600", cache_root=mount.cache_root)
    assert again.unmount() == 0
    assert "did not stop cleanly" not in mount.log() + again.log()
