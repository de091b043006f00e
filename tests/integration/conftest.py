"""Real mounts: ``yeastarfs mount`` in a subprocess, used through the kernel.

The daemon runs in its own process (rclone's vfstest does the same) so a kernel deadlock
can never hang the test process; the simulator runs in the test process so tests can
flip its fault switches and read its counters. Without FUSE these tests are skipped,
except under CI=true, where a missing FUSE is a failure (``require`` in tests/conftest.py).
"""

from __future__ import annotations

import ctypes.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

MOUNT_TIMEOUT_S = 30.0
UNMOUNT_TIMEOUT_S = 20.0
# Log lines the daemon may write without the test expecting them.
ALLOWED_LOG_PATTERNS = ()


def fuse_problem() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        return "fusermount is not installed (apt-get install fuse3)"
    if not (ctypes.util.find_library("fuse3") or ctypes.util.find_library("fuse")):
        return "libfuse is not installed"
    return None


def pytest_collection_modifyitems(config, items):
    problem = fuse_problem()
    if problem is None:
        return
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.usefixtures("_fuse_required"))


@pytest.fixture
def _fuse_required(require):
    require(False, f"FUSE is unusable: {fuse_problem()}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fusermount() -> str:
    return shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount"


class MountProcess:
    """One `yeastarfs mount --foreground` daemon and its mountpoint."""

    def __init__(self, pbx, mountpoint, cache_dir, password_file, log_path, extra_args=()):
        self.pbx = pbx
        self.mountpoint = str(mountpoint)
        self.cache_dir = str(cache_dir)
        self.log_path = str(log_path)
        self.events_port = free_port()
        self.argv = [sys.executable, "-m", "yeastarfs", "mount", self.mountpoint, "--pbx", pbx.base_url,
                     "--user", "api", "--password-file", password_file, "--cache-dir", self.cache_dir,
                     "--events-port", str(self.events_port), "--foreground", "--log-level", "DEBUG",
                     "--cache-min-free", "0", *extra_args]
        self.process: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "MountProcess":
        os.makedirs(self.mountpoint, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        if wait:
            self.wait_mounted()
        return self

    def wait_mounted(self) -> None:
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while time.monotonic() < deadline:
            if os.path.ismount(self.mountpoint) and self._answers():
                return
            if self.process.poll() is not None:
                pytest.fail(f"daemon exited with {self.process.returncode} before mounting:\n{self.log()}")
            time.sleep(0.05)
        pytest.fail(f"not mounted after {MOUNT_TIMEOUT_S} s:\n{self.log()}")

    def _answers(self) -> bool:
        """True when the mount is ours and alive (a crashed one answers ENOTCONN)."""
        try:
            os.listdir(self.mountpoint)
            return True
        except OSError:
            return False

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""

    def path(self, *parts: str) -> str:
        return os.path.join(self.mountpoint, *parts)

    def unmount(self) -> int:
        """fusermount -u, then the daemon must exit 0 by itself."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        result = subprocess.run([fusermount(), "-u", self.mountpoint], capture_output=True, text=True)
        assert result.returncode == 0, f"fusermount -u failed: {result.stderr}"
        try:
            code = self.process.wait(timeout=UNMOUNT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"daemon did not exit after unmount:\n{self.log()}")
        self._log.close()
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        subprocess.run([fusermount(), "-uz", self.mountpoint], capture_output=True)

    def unexpected_log_lines(self) -> list[str]:
        bad = []
        for line in self.log().splitlines():
            if (" ERROR " in line or "Traceback" in line or " CRITICAL " in line) and not any(
                    pattern in line for pattern in ALLOWED_LOG_PATTERNS):
                bad.append(line)
        return bad


@pytest.fixture
def mount_factory(pbx, password_file, tmp_path):
    """Start mounts against the test's simulator; unmounts and checks them at the end."""
    mounts: list[MountProcess] = []

    def start(*extra_args: str, cache_dir=None, mountpoint=None, wait=True, name="mnt") -> MountProcess:
        index = len(mounts)
        mount = MountProcess(pbx, mountpoint or tmp_path / f"{name}{index}", cache_dir or tmp_path / "cache",
                             password_file, tmp_path / f"daemon{index}.log", extra_args)
        mounts.append(mount)
        return mount.start(wait=wait)

    yield start
    failures = []
    for mount in mounts:
        if mount.process is not None and mount.process.poll() is None:
            code = mount.unmount()
            if code != 0:
                failures.append(f"daemon exited {code} after unmount:\n{mount.log()}")
        bad = mount.unexpected_log_lines()
        if bad and not getattr(mount, "errors_expected", False):
            failures.append("unexpected errors in the daemon log:\n" + "\n".join(bad))
    if failures:
        pytest.fail("\n\n".join(failures))


@pytest.fixture
def mounted(mount_factory):
    return mount_factory
