"""Another local user must never steer the daemon's file operations through the cache folder.

The daemon runs as root here (the tests do); the attacker's steps run as ``nobody``, as a
review demonstrated them (issue 9, item 2): a cache folder created beforehand by another
user, with ``lock``, ``clean-stop``, ``partial`` or the log file pointing elsewhere. Each
test fails when the daemon follows the link or accepts a folder another user controls, and
passes when the mount is refused with a message naming the folder and the fix and the
target is untouched.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
import subprocess

import pytest

from harness import mount_command, pbx_cache_dir, wait_until
from test_security import as_nobody, shared_dir  # noqa: F401 - the attacker's steps and playground

NOBODY = "nobody"
PRECIOUS = b"precious: root's file\n"


@pytest.fixture
def nobody(require):
    """The attacker: runs a command as the unprivileged user ``nobody``."""
    try:
        pwd.getpwnam(NOBODY)
    except KeyError:
        require(False, "no user 'nobody' to play the attacker")
    return as_nobody


@pytest.fixture
def shared(shared_dir):
    """A folder every user may create things in (sticky, like /tmp itself)."""
    return shared_dir


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim"
    path.write_bytes(PRECIOUS)
    os.chmod(path, 0o644)
    return path


def start(mounted, cache_root):
    """Start a daemon on *cache_root*; return it once it mounted or exited."""
    mount = mounted(cache_root=cache_root, wait=False)
    mount.errors_expected = True
    wait_until(lambda: mount.process.poll() is not None or os.path.ismount(mount.mountpoint), 30,
               message="the daemon to mount or exit")
    return mount


def assert_refused(mount, folder: str, *fixes: str) -> None:
    """The daemon refused to start, saying which folder and what to do."""
    wait_until(lambda: mount.process.poll() is not None, 10,
               message=lambda: f"the daemon to refuse the cache folder; it mounted:\n{mount.log_tail()}")
    assert mount.process.returncode == 1
    log = mount.log()
    assert folder in log, log
    assert any(fix in log for fix in fixes), log


def test_a_lock_symlink_in_a_folder_of_another_user_is_never_followed(pbx, mounted, nobody, shared, victim):
    cache_root = os.path.join(shared, "cache")
    pbx_dir = pbx_cache_dir(cache_root, pbx.base_url)
    nobody("mkdir", "-p", "-m", "0777", pbx_dir)
    nobody("ln", "-s", str(victim), os.path.join(pbx_dir, "lock"))
    mount = start(mounted, cache_root)
    assert victim.read_bytes() == PRECIOUS
    assert_refused(mount, cache_root, "another --cache-dir")


def test_a_clean_stop_marker_planted_after_start_is_never_followed(pbx, mounted, nobody, shared, victim):
    cache_root = os.path.join(shared, "cache")
    pbx_dir = pbx_cache_dir(cache_root, pbx.base_url)
    nobody("mkdir", "-p", "-m", "0777", pbx_dir)
    mount = start(mounted, cache_root)
    if mount.running():  # the attacker's second step, while the daemon runs
        nobody("ln", "-s", str(victim), os.path.join(pbx_dir, "clean-stop"))
        mount.unmount()
    assert victim.read_bytes() == PRECIOUS
    assert_refused(mount, cache_root, "another --cache-dir")


def test_a_partial_symlink_never_deletes_or_chmods_its_target(pbx, mounted, nobody, shared, tmp_path):
    precious_dir = tmp_path / "precious-dir"
    precious_dir.mkdir()
    os.chmod(precious_dir, 0o755)
    for name in ("a", "b"):
        (precious_dir / name).write_bytes(PRECIOUS)
    cache_root = os.path.join(shared, "cache")
    pbx_dir = pbx_cache_dir(cache_root, pbx.base_url)
    nobody("mkdir", "-p", "-m", "0777", pbx_dir)
    nobody("ln", "-s", str(precious_dir), os.path.join(pbx_dir, "partial"))
    mount = start(mounted, cache_root)
    assert sorted(os.listdir(precious_dir)) == ["a", "b"]
    assert stat.S_IMODE(os.stat(precious_dir).st_mode) == 0o755
    assert_refused(mount, cache_root, "another --cache-dir")


def test_the_default_log_file_is_never_followed(pbx, password_file, nobody, shared, victim, tmp_path):
    cache_root = os.path.join(shared, "cache")
    nobody("mkdir", "-m", "0777", cache_root)
    nobody("ln", "-s", str(victim), os.path.join(cache_root, "yeastarfs.log"))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = subprocess.run(mount_command(mountpoint, pbx.base_url, cache_root, password_file),
                            capture_output=True, text=True, timeout=60)  # the background daemon, logging to a file
    try:
        assert victim.read_bytes() == PRECIOUS
        assert result.returncode == 1
        assert cache_root in result.stderr and "another --cache-dir" in result.stderr
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)


def test_a_cache_root_owned_by_another_user_is_refused(pbx, mounted, nobody, shared):
    cache_root = os.path.join(shared, "cache")
    nobody("mkdir", "-m", "0755", cache_root)   # no link at all: its owner could add one at any time
    mount = start(mounted, cache_root)
    assert_refused(mount, cache_root, "another --cache-dir")
    assert os.listdir(cache_root) == []


def test_a_cache_root_inside_a_folder_of_another_user_is_refused(pbx, mounted, nobody, shared):
    evil = os.path.join(shared, "evil")
    nobody("mkdir", "-m", "0755", evil)         # its owner could swap whatever root creates in it
    cache_root = os.path.join(evil, "cache")
    mount = start(mounted, cache_root)
    assert_refused(mount, cache_root, "another --cache-dir")


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
@pytest.mark.parametrize("which", ["root", "pbx folder"])
def test_a_cache_folder_writable_by_others_is_refused(pbx, mounted, tmp_path, mode, which):
    cache_root = str(tmp_path / "cache")
    folder = cache_root if which == "root" else pbx_cache_dir(cache_root, pbx.base_url)
    os.makedirs(folder)
    os.chmod(folder, mode)
    mount = start(mounted, cache_root)
    assert_refused(mount, folder, f"chmod 700 {folder}")
    assert stat.S_IMODE(os.stat(folder).st_mode) == mode   # refused, not silently changed


def test_a_cache_root_that_cannot_be_reached_is_refused_with_the_reason(pbx, mounted, tmp_path):
    (tmp_path / "file").write_bytes(b"")
    cache_root = str(tmp_path / "file" / "sub" / "cache")  # a regular file on the way
    mount = start(mounted, cache_root)
    assert_refused(mount, cache_root, os.strerror(errno.ENOTDIR))
    assert "another --cache-dir" in mount.log()
