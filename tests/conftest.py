"""Fixtures every test folder shares: the PBX simulator on loopback, a password file for it,
PbxClients, and `require` for tools a test needs. The pieces behind them live in harness.py
(this folder is on sys.path: pytest puts a rootless conftest's folder there)."""

from __future__ import annotations

import os

import pytest

from harness import FAMILIES, USER, factory, new_simulator, self_signed_certificate, view, write_password_file
from yeastarfs.pbx.sseries.client import PbxClient


def pytest_configure(config):
    config.addinivalue_line("markers", "families(**options): run the test against the simulator of every PBX "
                                       "family; s_series={...} / p_series={...} give one family's options")


def pytest_generate_tests(metafunc):
    """``@pytest.mark.families`` parametrizes the ``pbx`` fixture with each family (ids
    ``s-series``, ``p-series``); the marker's ``s_series``/``p_series`` dicts give that
    family's simulator options."""
    marker = metafunc.definition.get_closest_marker("families")
    if marker is None:
        return
    params = []
    for family in FAMILIES:
        options = marker.kwargs.get(family.replace("-", "_"), {})
        params.append({"family": family, **options})
    metafunc.parametrize("pbx", params, indirect=True, ids=list(FAMILIES))


@pytest.fixture(scope="session")
def tls_certificate(tmp_path_factory):
    """(certificate, key, SHA-256 hex) of a self-signed certificate for 127.0.0.1."""
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def pbx(request):
    """A started simulator (function-scoped: every test gets fresh counters and faults), the
    S-Series one unless the test is marked ``families`` or asks for ``{"family": ...}``;
    ``{"tls": True}`` serves HTTPS (and wss) with `tls_certificate`.

    Tests pass constructor options with ``@pytest.mark.parametrize("pbx", [{...}], indirect=True)``.
    """
    options = dict(getattr(request, "param", None) or {})
    if options.pop("tls", False):
        options["certfile"], options["keyfile"], _ = request.getfixturevalue("tls_certificate")
    with new_simulator(**options) as sim:
        yield sim


@pytest.fixture
def pbx_view(pbx):
    """What the test's simulator saw, in words both families share (`harness.view`)."""
    return view(pbx)


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


@pytest.fixture
def high_descriptors():
    """Hold descriptors until the next one opened is over 1,100, as in a long-lived daemon or
    test process (select.select fails on any over 1,023); released after the test."""
    held = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        yield held[-1] + 1
    finally:
        for fd in held:
            os.close(fd)
