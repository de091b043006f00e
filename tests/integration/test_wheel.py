"""Installable like other tools: a wheel built from this checkout, installed into a fresh venv
(its dependencies from the package index, as any user's pip gets them), mounts the simulator."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from harness import MountProcess, sha256_of

pytestmark = pytest.mark.fuse

CHECKOUT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PIP_TIMEOUT_S = 300
BUILD_LEFTOVERS = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, **kwargs)
    assert result.returncode == 0, f"{argv}:\n{result.stdout}\n{result.stderr}"
    return result


def test_a_wheel_installs_into_a_fresh_venv_and_mounts(pbx, password_file, tmp_path):
    # From a copy of the checkout: setuptools reuses a build/ folder, which may hold files
    # since removed from the source.
    source = tmp_path / "source"
    shutil.copytree(CHECKOUT, source, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w", str(wheels),
         str(source)])
    [wheel] = glob.glob(str(wheels / "yeastarfs-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "yeastarfs/app/systemd/yeastarfs@.service" in names  # what install-system installs
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])  # a clean venv: no system site-packages
    run([str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "-q", wheel])
    # The venv's own copy, not this checkout (run from elsewhere, nothing on PYTHONPATH).
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    where = run([str(venv / "bin" / "python"), "-c", "import yeastarfs; print(yeastarfs.__file__)"],
                cwd=str(tmp_path), env=env)
    assert where.stdout.strip().startswith(str(venv))

    rec = pbx.populate(2, days=1)[0]
    mount = MountProcess(pbx.base_url, tmp_path / "mnt", tmp_path / "cache", password_file, tmp_path / "log")
    assert mount.argv[1:3] == ["-m", "yeastarfs"]
    mount.argv = [str(venv / "bin" / "yeastarfs"), *mount.argv[3:]]  # the console script pip made
    mount.start()
    try:
        assert sha256_of(mount.recording_path(rec.name)) == rec.sha256
        assert mount.unmount() == 0
        assert not mount.unexpected_log_lines()
    finally:
        mount.kill()
