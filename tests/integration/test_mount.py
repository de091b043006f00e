"""The product end to end: a real mount, used through the kernel, against the simulator."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import shutil
import subprocess
import time
import wave

import pytest

from harness import (date_path, download_requests, fusermount, mount_command, sha256_of, wait_until,
                     write_password_file)

pytestmark = pytest.mark.fuse


@pytest.mark.families
def test_every_recording_appears_at_its_date_path(pbx, mounted):
    recordings = pbx.populate(25, days=6)
    mount = mounted()
    assert all(len(year) == 4 and year.isdigit() for year in os.listdir(mount.mountpoint))
    found = set()
    for root, dirs, files in os.walk(mount.mountpoint):
        found.update(os.path.relpath(os.path.join(root, f), mount.mountpoint) for f in files)
    assert found == {os.path.join(*date_path(rec.name)) for rec in recordings}


@pytest.mark.families
def test_read_matches_pbx_with_one_random_and_one_download(pbx, mounted):
    rec = pbx.populate(3, days=2)[1]
    mount = mounted()
    path = mount.path(*date_path(rec.name))
    pbx.reset()
    assert sha256_of(path) == rec.sha256
    assert download_requests(pbx) == (1, 1)
    assert sha256_of(path) == rec.sha256          # second read: from the cache
    assert download_requests(pbx) == (1, 1)
    wait_until(lambda: os.stat(path).st_size == rec.size_bytes, timeout_s=2.5, message="the exact size")
    assert os.stat(path).st_mtime == time.mktime(dt.datetime.strptime(rec.name[:14], "%Y%m%d%H%M%S").timetuple())


def test_audio_tools_read_by_path(pbx, mounted, require):
    rec = pbx.add_recording(start=dt.datetime.now() - dt.timedelta(hours=2), duration_s=7, announce=False)
    mount = mounted()
    path = mount.path(*date_path(rec.name))
    with wave.open(path, "rb") as audio:
        assert (audio.getnchannels(), audio.getsampwidth(), audio.getframerate()) == (1, 2, 8000)
        assert audio.getnframes() == 7 * 8000
    ffprobe = shutil.which("ffprobe")
    require(ffprobe, "ffprobe is not installed (scripts/setup installs ffmpeg)")
    probe = subprocess.run([ffprobe, "-v", "error", "-show_entries", "stream=codec_name,sample_rate,duration",
                            "-of", "json", path], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    stream = json.loads(probe.stdout)["streams"][0]
    assert stream["codec_name"] == "pcm_s16le" and stream["sample_rate"] == "8000"
    assert float(stream["duration"]) == pytest.approx(7.0, abs=0.01)


@pytest.mark.families
def test_new_cdr_event_appears_within_a_second(pbx, pbx_view, mounted):
    """README (Limits, Processing new recordings): "by event within a second"."""
    pbx.populate(2, days=1)
    mount = mounted("--poll-interval", "3600")
    announced = time.monotonic()
    rec = pbx.add_recording(start=dt.datetime.now() - dt.timedelta(minutes=3), duration_s=30, announce=True)
    # Waited on longer than promised, so that a miss reports how late it was.
    wait_until(lambda: os.path.exists(mount.path(*date_path(rec.name))), timeout_s=5,
               message="the announced recording")
    elapsed_s = time.monotonic() - announced
    assert elapsed_s <= 1.0, f"the event's recording appeared after {elapsed_s:.2f} s"
    assert pbx_view.event_pushes() == 1


@pytest.mark.families
def test_cdr_only_recording_appears_within_one_poll_interval(pbx, mounted):
    pbx.populate(2, days=1)
    mount = mounted("--poll-interval", "2", "--no-events")
    rec = pbx.add_recording(start=dt.datetime.now() - dt.timedelta(minutes=3), duration_s=30, announce=False)
    wait_until(lambda: os.path.exists(mount.path(*date_path(rec.name))), timeout_s=2 + 1.5,
               message="the polled recording")


def test_unknown_names_are_enoent_without_pbx_requests(pbx, mounted):
    rec = pbx.populate(1, days=1)[0]
    mount = mounted()
    pbx.reset()
    year, month, day, _ = date_path(rec.name)
    for missing in (mount.path(year, month, day, "desktop.ini"), mount.path(year, month, day, ".hidden"),
                    mount.path("1999"), mount.path(year, "13"), mount.path(year, month, day, rec.name, "x"),
                    mount.path(".Trash-0"), mount.path("autorun.inf")):
        with pytest.raises(OSError) as info:
            os.stat(missing)
        assert info.value.errno in (errno.ENOENT, errno.ENOTDIR), missing
    assert download_requests(pbx) == (0, 0)
    assert pbx.counters["login"] == 0


def test_writes_are_erofs(pbx, mounted):
    rec = pbx.populate(1, days=1)[0]
    mount = mounted()
    path = mount.path(*date_path(rec.name))
    day_dir = os.path.dirname(path)
    attempts = [
        lambda: open(path, "r+b"),
        lambda: open(os.path.join(day_dir, "new.wav"), "wb"),
        lambda: os.mkdir(os.path.join(day_dir, "sub")),
        lambda: os.unlink(path),
        lambda: os.rename(path, path + ".bak"),
        lambda: os.chmod(path, 0o666),
        lambda: os.truncate(path, 0),
        lambda: os.rmdir(day_dir),
        lambda: os.symlink(path, os.path.join(day_dir, "link")),
        lambda: os.utime(path, (0, 0)),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS


def test_unmount_is_clean_and_remount_serves_the_cache(pbx, mounted, tmp_path):
    rec = pbx.populate(2, days=1)[0]
    first = mounted()
    path = first.path(*date_path(rec.name))
    assert sha256_of(path) == rec.sha256
    assert first.unmount() == 0
    pbx.reset()
    second = mounted(cache_root=first.cache_root)
    assert sha256_of(second.path(*date_path(rec.name))) == rec.sha256
    assert download_requests(pbx) == (0, 0)
    assert os.stat(second.path(*date_path(rec.name))).st_size == rec.size_bytes


def test_background_mount_returns_when_ready_and_exits_on_unmount(pbx, password_file, tmp_path):
    rec = pbx.populate(1, days=1)[0]
    mountpoint, cache_root = tmp_path / "bg", tmp_path / "cache"
    mountpoint.mkdir()
    result = subprocess.run(mount_command(mountpoint, pbx.base_url, cache_root, password_file),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    try:
        assert os.path.ismount(mountpoint)
        assert os.path.exists(os.path.join(mountpoint, *date_path(rec.name)))
        lock_files = list(cache_root.glob("*/lock"))
        daemon_pid = int(lock_files[0].read_text())
    finally:
        subprocess.run([fusermount(), "-u", str(mountpoint)], check=False)
    wait_until(lambda: not os.path.exists(f"/proc/{daemon_pid}"), timeout_s=20, message="the daemon to exit")


@pytest.mark.parametrize("problem", ["wrong password", "unreachable", "busy", "no password"])
def test_start_errors_print_one_clear_line(pbx, password_file, tmp_path, problem):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    url, env = pbx.base_url, {k: v for k, v in os.environ.items() if k != "YEASTARFS_PASSWORD"}
    if problem == "wrong password":
        password_file = write_password_file(tmp_path / "bad", "nope")
    elif problem == "unreachable":
        url = "http://127.0.0.1:9"  # discard port: connection refused
    elif problem == "busy":
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mountpoint)], check=True)
    elif problem == "no password":
        password_file = None
    try:
        result = subprocess.run(mount_command(mountpoint, url, tmp_path / "cache", password_file),
                                capture_output=True, text=True, timeout=60, env=env)
    finally:
        if problem == "busy":
            subprocess.run(["umount", str(mountpoint)], check=False)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    expected = {"wrong password": "rejected the login", "unreachable": "cannot", "busy": "busy",
                "no password": "password"}[problem]
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    if problem == "wrong password":
        assert pbx.counters["login"] <= 2


def test_a_large_folder_lists_every_recording_once_with_its_attributes(pbx, mounted):
    """Listings come in several kernel calls (offsets) and carry attributes (READDIRPLUS)."""
    day = dt.datetime.now().replace(hour=0, minute=0, second=0, microsecond=0) - dt.timedelta(days=2)
    recordings = [pbx.add_recording(start=day + dt.timedelta(seconds=30 * i), duration_s=2, announce=False)
                  for i in range(1200)]
    mount = mounted()
    folder = os.path.dirname(mount.path(*date_path(recordings[0].name)))
    before = json.loads(os.getxattr(mount.mountpoint, "user.yeastarfs.status"))["fuse_getattrs"]
    listed = subprocess.run(["find", folder, "-type", "f", "-printf", "%f %s\n"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    after = json.loads(os.getxattr(mount.mountpoint, "user.yeastarfs.status"))["fuse_getattrs"]
    expected = sorted(f"{rec.name} {44 + 2 * 16000}" for rec in recordings)
    assert sorted(listed) == expected              # each once, sizes from the listing itself
    assert after - before < 20                     # no per-file lookups into the daemon
    assert sorted(os.listdir(folder)) == sorted(rec.name for rec in recordings)


def test_a_slow_pbx_never_holds_up_the_mount(pbx, mounted):
    recordings = pbx.populate(6, days=20)
    pbx.cdr_latency_s = 0.3  # 20 one-day CDR slices: ~12 s of backfill; the login is instant
    mount = mounted("--since", "20d", "--start-timeout", "1", "--poll-interval", "3600")
    mounted_at = time.time()
    logged_in = min(entry["time"] for entry in pbx.requests_log if entry["endpoint"] == "login")
    # --start-timeout 1: the backfill starts right after the login, the mount waits one second
    # for it, then mounts (FUSE init and the harness's 50 ms polls of the mountpoint are the rest).
    assert 1.0 <= mounted_at - logged_in <= 1.6, f"mounted {mounted_at - logged_in:.2f} s after the login"
    assert "goes on in the background" in mount.log()
    pbx.cdr_latency_s = 0.0
    for rec in recordings:  # the backfill finishes behind the mount
        wait_until(lambda: os.path.exists(mount.path(*date_path(rec.name))), timeout_s=30,
                   message=f"{rec.name} from the background backfill")
