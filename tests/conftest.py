"""Shared fixtures: the PBX simulator on loopback, and a password file for it."""

from __future__ import annotations

import os

import pytest

from yeastarfs.sim.sseries import Simulator

PASSWORD = "s3cret-Passw0rd"


@pytest.fixture
def pbx(request):
    """A started simulator (function-scoped: every test gets fresh counters and faults).

    Tests pass constructor options with ``@pytest.mark.parametrize("pbx", [{...}], indirect=True)``.
    """
    options = getattr(request, "param", None) or {}
    with Simulator(username="api", password=PASSWORD, **options) as sim:
        yield sim


def require(available, what: str) -> None:
    """Skip a test whose tool is missing here, but fail it under CI=true: CI installs every
    tool (scripts/setup), so a missing one there is a broken setup, never a reason to skip."""
    if available:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {what}")
    pytest.skip(what)


@pytest.fixture(name="require")
def require_fixture():
    return require


@pytest.fixture
def password_file(tmp_path):
    path = tmp_path / "password"
    path.write_text(PASSWORD + "\n")
    os.chmod(path, 0o600)
    return str(path)
