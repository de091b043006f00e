"""What the P-Series adds, through a real mount: exact sizes before any download (so ``stat``
and ``tar`` see true sizes), and events over a WebSocket that the PBX may drop."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import subprocess
import tarfile
import time

import pytest

from harness import download_requests, wait_until

pytestmark = pytest.mark.fuse

P_SERIES = [{"family": "p-series"}]
POLL_S = 2


@pytest.mark.parametrize("pbx", P_SERIES, indirect=True)
def test_stat_is_exact_before_any_download_and_tar_of_a_day_is_the_pbx_files(pbx, mounted, tmp_path, require):
    require(shutil.which("tar"), "tar is not installed")
    day = (dt.datetime.now() - dt.timedelta(days=1)).replace(hour=9, minute=0, second=0, microsecond=0)
    # Sizes no duration can predict (an estimate from the talk time would be off by 1-6 KB).
    recordings = [pbx.add_recording(start=day + dt.timedelta(minutes=7 * i), duration_s=3 + i,
                                    size_bytes=44 + 16000 * (3 + i) + 1000 * (i + 1) + i, announce=False)
                  for i in range(6)]
    mount = mounted()
    folder = os.path.dirname(mount.recording_path(recordings[0].name))
    pbx.reset()
    sizes = {name: os.stat(os.path.join(folder, name)).st_size for name in os.listdir(folder)}
    assert sizes == {rec.name: rec.size_bytes for rec in recordings}
    assert download_requests(pbx) == (0, 0)  # the sizes came from the list
    archive = tmp_path / "day.tar"
    made = subprocess.run(["tar", "-cf", str(archive), "-C", folder, "."], capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0 and made.stderr == ""  # no "file changed as we read it"
    with tarfile.open(archive) as tar:
        members = {os.path.basename(member.name): hashlib.sha256(tar.extractfile(member).read()).hexdigest()
                   for member in tar.getmembers() if member.isfile()}
    assert members == {rec.name: rec.sha256 for rec in recordings}
    assert download_requests(pbx)[1] == len(recordings)


@pytest.mark.parametrize("pbx", P_SERIES, indirect=True)
def test_a_dropped_websocket_is_resubscribed_and_what_it_missed_is_polled(pbx, mounted):
    pbx.populate(2, days=1)
    mount = mounted("--poll-interval", str(POLL_S))
    wait_until(lambda: pbx.counters["ws_subscribe"] == 1, 10, message="the first subscription")
    now = dt.datetime.now().replace(microsecond=0)
    pbx.drop_websockets()  # a network drop: no close frame
    missed = pbx.add_recording(start=now - dt.timedelta(minutes=2), duration_s=20, announce=True)
    assert pbx.counters["ws_push"] == 0  # announced while nobody was subscribed: lost as an event
    wait_until(lambda: pbx.counters["ws_subscribe"] == 2, 10, message="a new subscription")
    wait_until(lambda: os.path.exists(mount.recording_path(missed.name)), POLL_S + 3,
               message="the missed recording, by the next poll")
    after = pbx.add_recording(start=now - dt.timedelta(minutes=1), duration_s=10, announce=True)
    announced = time.monotonic()
    wait_until(lambda: os.path.exists(mount.recording_path(after.name)), 5, message="an event after the drop")
    assert time.monotonic() - announced < 1.0
