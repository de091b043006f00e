"""Through the kernel: what the request-saving paths of the adapter rely on.

``ls -l`` asks every file for ``security.selinux`` and ``system.posix_acl_access``; the mount
answers EOPNOTSUPP (not supported here) so that coreutils stops asking after the first file,
while ``user.*`` attributes keep working (the kernel would turn getxattr off for good only on
ENOSYS). libfuse's worker threads are kept between bursts (each keeps its Python thread state).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import date_path, holds_for
from test_streaming import add

pytestmark = pytest.mark.fuse

C_LOCALE = {**os.environ, "LC_ALL": "C"}


def test_other_xattr_namespaces_are_unsupported_and_user_ones_keep_working(pbx, mounted, require):
    rec = add(pbx, size_bytes=100_044, callfrom="0612345678")
    mount = mounted()
    path = mount.path(*date_path(rec.name))
    for _ in range(2):  # and again: nothing was turned off by the first refusals
        for name in ("security.selinux", "system.posix_acl_access", "system.posix_acl_default", "trusted.x"):
            with pytest.raises(OSError) as info:
                os.getxattr(path, name)
            assert info.value.errno == errno.EOPNOTSUPP, name
        with pytest.raises(OSError) as info:
            os.getxattr(path, "user.yeastar.nonexistent")
        assert info.value.errno == errno.ENODATA
        assert os.getxattr(path, "user.yeastar.caller") == b"0612345678"
    listing = subprocess.run(["ls", "-l", os.path.dirname(path)], capture_output=True, text=True, env=C_LOCALE)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines()[1].startswith("-r") and rec.name in listing.stdout
    getfattr = shutil.which("getfattr")
    require(getfattr, "getfattr is not installed (scripts/setup installs attr)")
    dumped = subprocess.run([getfattr, "-d", path], capture_output=True, text=True)
    assert 'user.yeastar.caller="0612345678"' in dumped.stdout


def test_ls_l_asks_a_folder_for_xattrs_once_not_per_file(pbx, mounted, require):
    strace = shutil.which("strace")
    require(strace, "strace is not installed (scripts/setup installs it)")
    recordings = [add(pbx, size_bytes=20_044, minutes_ago=30 + i) for i in range(40)]
    mount = mounted()
    folder = os.path.dirname(mount.path(*date_path(recordings[0].name)))
    traced = subprocess.run([strace, "-f", "-c", "-e", "trace=getxattr,lgetxattr", "ls", "-l", folder],
                            capture_output=True, text=True, env=C_LOCALE)
    assert traced.returncode == 0, traced.stderr
    assert sum(rec.name in traced.stdout for rec in recordings) == len(recordings)
    calls = sum(int(line.split()[3]) for line in traced.stderr.splitlines()
                if line.strip().endswith(("getxattr", "lgetxattr")) and len(line.split()) >= 5)
    # Two per folder (label and ACL of the first file), where ENODATA made it two per file (80).
    assert 0 < calls <= 4, traced.stderr


def test_fuse_worker_threads_are_kept_after_a_burst(pbx, mounted):
    recordings = [add(pbx, size_bytes=100_044, minutes_ago=30 + i) for i in range(24)]
    mount = mounted()
    tasks = lambda: len(os.listdir(f"/proc/{mount.process.pid}/task"))  # noqa: E731
    before = tasks()
    pbx.latency_s = 0.5  # every open waits for the PBX: each holds a FUSE worker meanwhile
    barrier = threading.Barrier(len(recordings))

    def head(rec) -> bytes:
        barrier.wait()
        with open(mount.path(*date_path(rec.name)), "rb") as handle:
            return handle.read(4096)

    with ThreadPoolExecutor(len(recordings)) as pool:
        heads = list(pool.map(head, recordings, timeout=60))
    pbx.latency_s = 0.0
    assert heads == [pbx.recording_bytes(rec.name)[:4096] for rec in recordings]
    # libfuse lets a surplus idle worker exit right after its request; none may (each would
    # leave its kept Python thread state behind).
    holds_for(lambda: tasks() >= before + len(recordings) - 2, 1.0, message="the burst's FUSE workers")
