"""Fixtures every test folder shares: the PBX simulator on loopback, a password file for it,
PbxClients, and `require` for tools a test needs. The pieces behind them live in harness.py
(this folder is on sys.path: pytest puts a rootless conftest's folder there)."""

from __future__ import annotations

import os

import pytest

from harness import USER, factory, new_simulator, write_password_file
from yeastarfs.pbx.sseries.client import PbxClient


@pytest.fixture
def pbx(request):
    """A started simulator (function-scoped: every test gets fresh counters and faults).

    Tests pass constructor options with ``@pytest.mark.parametrize("pbx", [{...}], indirect=True)``.
    """
    options = getattr(request, "param", None) or {}
    with new_simulator(**options) as sim:
        yield sim


def under_ci() -> bool:
    """CI is any non-empty CI value but "false" and "0" (GitHub, GitLab and others set CI=true or 1)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "false", "0")


def require(available, what: str) -> None:
    """Skip a test whose tool is missing here, but fail it under CI: CI installs every tool
    (scripts/setup), so a missing one there is a broken setup, never a reason to skip."""
    if available:
        return
    if under_ci():
        pytest.fail(f"CI={os.environ['CI']} but {what}")
    pytest.skip(what)


@pytest.fixture(name="require")
def require_fixture():
    return require


@pytest.fixture
def password_file(tmp_path):
    return write_password_file(tmp_path / "password")


@pytest.fixture
def make_client():
    """Build PbxClients for a simulator with short timeouts; all are stopped at the end.

    ``make_client(sim, password=None, **PbxClient options)``; the password defaults to the simulator's.
    """
    def build(sim, password=None, **kwargs):
        kwargs.setdefault("connect_timeout_s", 2.0)
        kwargs.setdefault("read_timeout_s", 5.0)
        return PbxClient(sim.base_url, USER, sim.password if password is None else password, **kwargs)

    yield from factory(build)
