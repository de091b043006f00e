"""Shared fixtures: the PBX simulator on loopback, and a password file for it."""

from __future__ import annotations

import os

import pytest

from yeastarfs.simulator import Simulator

PASSWORD = "s3cret-Passw0rd"


@pytest.fixture
def pbx():
    """A started simulator (function-scoped: every test gets fresh counters and faults)."""
    with Simulator(username="api", password=PASSWORD) as sim:
        yield sim


@pytest.fixture
def password_file(tmp_path):
    path = tmp_path / "password"
    path.write_text(PASSWORD + "\n")
    os.chmod(path, 0o600)
    return str(path)
