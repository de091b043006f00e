"""Real mounts: ``yeastarfs mount`` in a subprocess, used through the kernel.

The daemon runs in its own process (rclone's vfstest does the same) so a kernel deadlock
can never hang the test process; the simulator runs in the test process so tests can
flip its fault switches and read its counters. The runner is `harness.MountProcess`
(scripts/bench.py uses it too); this file only makes fixtures of it. Without FUSE every
test here is skipped, except under CI, where a missing FUSE is a failure (``require``
in tests/conftest.py).
"""

from __future__ import annotations

import ctypes.util
import os
import shutil
import tempfile

import pytest

from harness import MountProcess


def fuse_problem() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        return "fusermount is not installed (apt-get install fuse3)"
    if not (ctypes.util.find_library("fuse3") or ctypes.util.find_library("fuse")):
        return "libfuse is not installed"
    return None


@pytest.fixture(autouse=True)
def _fuse_required(require):
    """Every test in this folder needs FUSE (an autouse fixture: a marker added while
    collecting would be ignored)."""
    problem = fuse_problem()
    require(problem is None, f"FUSE is unusable: {problem}")


@pytest.fixture
def mount_factory(pbx, password_file, tmp_path):
    """Start mounts against the test's simulator; unmounts and checks them at the end.

    ``mounted(*extra_args, cache_root=None, mountpoint=None, wait=True, name="mnt", env=None)``;
    every mount of a test shares ``tmp_path/cache`` unless told otherwise; *env* adds to the
    daemon's environment (`MountProcess`).
    """
    mounts: list[MountProcess] = []

    def start(*extra_args: str, cache_root=None, mountpoint=None, wait=True, name="mnt", env=None) -> MountProcess:
        index = len(mounts)
        mount = MountProcess(pbx.base_url, mountpoint or tmp_path / f"{name}{index}", cache_root or tmp_path / "cache",
                             password_file, tmp_path / f"daemon{index}.log", extra_args, env=env)
        mounts.append(mount)
        return mount.start(wait=wait)

    yield start
    failures = []
    for mount in mounts:
        if mount.running():
            try:
                code = mount.unmount()
            except AssertionError as exc:
                mount.kill()
                failures.append(str(exc))
                continue
            if code != 0:
                failures.append(f"daemon exited {code} after unmount:\n{mount.log_tail()}")
        bad = mount.unexpected_log_lines()
        if bad and not mount.errors_expected:
            failures.append("unexpected errors in the daemon log:\n" + "\n".join(bad))
    if failures:
        pytest.fail("\n\n".join(failures))


@pytest.fixture
def mounted(mount_factory):
    return mount_factory


@pytest.fixture
def public_dir():
    """A directory other users can traverse (pytest's tmp dirs are 0700); removed after the mount."""
    path = tempfile.mkdtemp(prefix="yeastarfs-allow-other-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
