"""Mounting the way Linux mounts things: mount -t fuse.yeastarfs, fstab options, config
files and the environment, systemd units, ownership options, desktop (GIO) browsing."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from harness import (LOCK_FILE, date_path, download_requests, fusermount, pbx_cache_dir, sha256_of, wait_until,
                     yeastarfs_command)

pytestmark = pytest.mark.fuse

SYSTEM_BIN = "/usr/local/bin/yeastarfs"
UNITS = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "systemd")


@pytest.fixture
def system_yeastarfs(require):
    """mount(8) runs helpers with a fixed PATH: put yeastarfs in /usr/local/bin for the test."""
    require(os.geteuid() == 0, "mount -t fuse.yeastarfs needs root (CI runs as root)")
    if os.path.exists(SYSTEM_BIN):
        yield SYSTEM_BIN
        return
    with open(SYSTEM_BIN, "w") as handle:
        handle.write(f"#!/bin/sh\nexec {sys.executable} -m yeastarfs \"$@\"\n")
    os.chmod(SYSTEM_BIN, 0o755)
    try:
        yield SYSTEM_BIN
    finally:
        os.unlink(SYSTEM_BIN)


def mount_entry(mountpoint: str) -> list[str]:
    with open("/proc/self/mounts") as handle:
        for line in handle:
            fields = line.split()
            if fields[1] == mountpoint:
                return fields
    return []


def test_mount_t_fuse_yeastarfs_with_fstab_options(pbx, password_file, tmp_path, system_yeastarfs):
    rec = pbx.populate(2, days=1)[0]
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    options = (f"_netdev,noauto,username=api,password_file={password_file},cache_dir={tmp_path / 'cache'},"
               "events_port=0,cache_size=100M,cache_min_free=0,poll_interval=30")
    result = subprocess.run(["mount", "-t", "fuse.yeastarfs", pbx.base_url, str(mountpoint), "-o", options],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    try:
        fields = mount_entry(str(mountpoint))
        assert fields[2] == "fuse.yeastarfs"
        assert ":" in fields[0]  # fsname "yeastarfs:HOST": desktop tools treat it as remote
        assert {"ro", "nosuid", "nodev"} <= set(fields[3].split(","))
        assert sha256_of(os.path.join(mountpoint, *date_path(rec.name))) == rec.sha256
    finally:
        assert subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode == 0
    assert not os.path.ismount(mountpoint)


def test_unknown_mount_option_is_a_clear_error(pbx, tmp_path, system_yeastarfs):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = subprocess.run(["mount", "-t", "fuse.yeastarfs", pbx.base_url, str(mountpoint), "-o",
                             "username=api,cache_sise=1G"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "cache_sise" in result.stderr


def test_config_file_environment_and_command_line_precedence(pbx, password_file, tmp_path):
    pbx.populate(1, days=1)
    config = tmp_path / "config.toml"
    config.write_text(f'pbx = "{pbx.base_url}"\nusername = "api"\npassword_file = "{password_file}"\n'
                      f'cache_dir = "{tmp_path / "cache"}"\nevents_port = 0\ncache_size = "1M"\n'
                      'cache_min_free = "0"\nmax_downloads = 2\n')
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()

    def mount_with(env_size, cli_args):
        env = dict(os.environ)
        env.pop("YEASTARFS_CACHE_SIZE", None)
        if env_size:
            env["YEASTARFS_CACHE_SIZE"] = env_size
        result = subprocess.run(yeastarfs_command("mount", str(mountpoint), "--config", str(config), *cli_args),
                                capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, result.stderr
        status = subprocess.run(yeastarfs_command("status", str(mountpoint), "--json"),
                                capture_output=True, text=True, timeout=30)
        subprocess.run([fusermount(), "-u", str(mountpoint)], check=True)
        lock = os.path.join(pbx_cache_dir(tmp_path / "cache", pbx.base_url), LOCK_FILE)
        wait_until(lambda: not os.path.exists(lock) or _unlocked(lock), timeout_s=15,
                   message="the daemon to release the cache lock")
        return json.loads(status.stdout)["cache_limit_bytes"]

    assert mount_with(None, []) == 1 << 20
    assert mount_with("2M", []) == 2 << 20
    assert mount_with("2M", ["--cache-size", "3M"]) == 3 << 20


def _unlocked(lock_path: str) -> bool:
    with open(lock_path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
    return True


def test_uid_gid_and_umask(pbx, mounted):
    rec = pbx.populate(1, days=1)[0]
    mount = mounted("--uid", "1234", "--gid", "2345", "--umask", "027")
    info = os.stat(mount.path(*date_path(rec.name)))
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (1234, 2345, 0o440)
    assert stat.S_IMODE(os.stat(os.path.dirname(mount.path(*date_path(rec.name)))).st_mode) == 0o550


def test_systemd_units_verify(system_yeastarfs, require):
    analyze = shutil.which("systemd-analyze")
    require(analyze, "systemd-analyze is not installed (scripts/setup installs systemd)")
    for unit in sorted(os.listdir(UNITS)):
        result = subprocess.run([analyze, "verify", os.path.abspath(os.path.join(UNITS, unit))],
                                capture_output=True, text=True, timeout=60)
        problems = [line for line in result.stderr.splitlines() if "yeastarfs" in line or unit in line]
        assert result.returncode == 0 and not problems, result.stderr


def test_gio_browsing_downloads_nothing(pbx, mounted, require):
    gio = shutil.which("gio")
    require(gio, "gio is not installed (scripts/setup installs libglib2.0-bin)")
    recordings = pbx.populate(4, days=1)
    mount = mounted()
    pbx.reset()
    day = os.path.dirname(mount.path(*date_path(recordings[0].name)))
    listing = subprocess.run([gio, "list", "-l", day], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    in_day = [rec.name for rec in recordings if os.path.dirname(mount.path(*date_path(rec.name))) == day]
    assert in_day and all(name in listing.stdout for name in in_day)
    for rec in recordings:
        info = subprocess.run([gio, "info", mount.path(*date_path(rec.name))], capture_output=True, text=True,
                              timeout=60)
        assert info.returncode == 0, info.stderr
        assert "audio" in info.stdout or "wav" in info.stdout.lower()
    assert download_requests(pbx) == (0, 0)


@pytest.fixture
def public_dir():
    """A directory other users can traverse (pytest's tmp dirs are 0700); removed after the mount."""
    path = tempfile.mkdtemp(prefix="yeastarfs-allow-other-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("allow_other", [True, False])
def test_allow_other_lets_other_users_read(public_dir, pbx, mounted, allow_other, require):
    require(os.geteuid() == 0 and shutil.which("setpriv"), "acting as another user needs root and setpriv")
    rec = pbx.populate(1, days=1)[0]
    mount = mounted(*(["--allow-other"] if allow_other else []), mountpoint=os.path.join(public_dir, "mnt"))
    as_nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sha256sum",
                                mount.path(*date_path(rec.name))], capture_output=True, text=True, timeout=60)
    if allow_other:
        assert as_nobody.returncode == 0 and rec.sha256 in as_nobody.stdout
    else:
        assert as_nobody.returncode != 0 and "Permission denied" in as_nobody.stderr
