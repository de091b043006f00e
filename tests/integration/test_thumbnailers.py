"""Issue 11: a real thumbnailer against the mount costs the PBX at most the folder once.

tumbler (Thunar's thumbnail service, whose GStreamer plugin claims audio/x-wav) runs headless
in a private D-Bus session and is asked for thumbnails of a day folder three times in a row,
as a file manager asks on every visit. Measured before this round: about 32 opens per file and
every view re-sent the folder (a PBX ignoring Range restarts each transfer from byte 0).
"""

from __future__ import annotations

import datetime as dt
import glob
import os
import shutil
import signal
import subprocess
import urllib.parse

import pytest

from harness import wait_until

TOOLS = os.path.join(os.path.dirname(__file__), "tools")
SYSTEM_PYTHON = "/usr/bin/python3"
SESSION_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:tmpdir={tmp}</listen>
  <auth>EXTERNAL</auth>
  <servicedir>{tmp}/no-services</servicedir>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def _tumblerd() -> str | None:
    found = glob.glob("/usr/lib/*/tumbler-1/tumblerd")
    return found[0] if found else None


def _has_gi() -> bool:
    return os.path.exists(SYSTEM_PYTHON) and subprocess.run(
        [SYSTEM_PYTHON, "-c", "import gi; gi.require_version('Gio', '2.0')"], capture_output=True).returncode == 0


@pytest.fixture
def tumbler(tmp_path, require):
    """tumblerd on a private session bus (no service activation: nothing else starts)."""
    require(_tumblerd() and shutil.which("dbus-run-session"), "tumbler and dbus are not installed (scripts/setup)")
    require(_has_gi(), "python3-gi is not installed (scripts/setup)")
    bus_dir = tmp_path / "bus"
    (bus_dir / "no-services").mkdir(parents=True)
    (bus_dir / "session.conf").write_text(SESSION_CONF.format(tmp=bus_dir))
    address_file = bus_dir / "address"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg-cache"), GST_REGISTRY=str(tmp_path / "gst.bin"))
    session = subprocess.Popen(
        ["dbus-run-session", f"--config-file={bus_dir / 'session.conf'}", "--", "sh", "-c",
         f'echo "$DBUS_SESSION_BUS_ADDRESS" > {address_file}; exec {_tumblerd()}'],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: address_file.exists() and address_file.read_text().strip(), 20,
               message="the private D-Bus session never started")
    env["DBUS_SESSION_BUS_ADDRESS"] = address_file.read_text().strip()

    def thumbnail(paths: list[str]) -> None:
        uris = ["file://" + urllib.parse.quote(path) for path in paths]
        done = subprocess.run([SYSTEM_PYTHON, os.path.join(TOOLS, "thumbnail_queue.py"), "audio/x-wav", "1", *uris],
                              env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr

    yield thumbnail
    os.killpg(session.pid, signal.SIGTERM)
    session.wait(timeout=10)


def _day_of_recordings(pbx, count: int) -> list:
    now = pbx.now_local().replace(microsecond=0)
    start = max(now.replace(hour=0, minute=30), now - dt.timedelta(hours=2))
    return [pbx.add_recording(start=start + dt.timedelta(minutes=i), duration_s=60 + i, announce=False)
            for i in range(count)]


@pytest.mark.parametrize("readers", ["standard", "none"])
def test_three_views_by_a_real_thumbnailer_cost_at_most_the_folder_once(pbx, mounted, tumbler, readers):
    # "standard": tumblerd is a known background reader (cache-only); "none": it is treated like a
    # person, and what then keeps the PBX quiet is the files' own attributes (no local blocks).
    recordings = _day_of_recordings(pbx, 6)
    folder_bytes = sum(rec.size_bytes for rec in recordings)
    mount = mounted("--background-readers", readers)
    mount.errors_expected = True  # mfusepy logs refused opens with a traceback at DEBUG
    paths = [mount.recording_path(rec.name) for rec in recordings]
    sent = []
    for _ in range(3):
        pbx.reset()
        tumbler(paths)
        mount.wait_settled()
        sent.append(pbx.downloaded_bytes())
    assert sent[0] <= folder_bytes and sent[1:] == [0, 0], f"bytes sent per view: {sent} (folder {folder_bytes})"


def test_cached_recordings_are_read_by_the_thumbnailer_from_the_cache(pbx, mounted, tumbler):
    recordings = _day_of_recordings(pbx, 3)
    mount = mounted()
    for rec in recordings:
        with open(mount.recording_path(rec.name), "rb") as handle:
            handle.read()
    pbx.reset()
    tumbler([mount.recording_path(rec.name) for rec in recordings])
    assert pbx.downloaded_bytes() == 0 and pbx.counters["recording/get_random"] == 0
