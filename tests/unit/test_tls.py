"""TLS towards the PBX: verification on by default, --ca-file, --insecure, pinning, fingerprint."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness import self_signed_certificate
from yeastarfs import errors
from yeastarfs.pbx.sseries.client import PbxClient
from yeastarfs.sim.sseries import Simulator
from yeastarfs.app.tools import certificate_sha256

PASSWORD = "tls-secret"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, as a PBX ships with."""
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def https_pbx(certificate):
    cert, key, _ = certificate
    with Simulator(password=PASSWORD, certfile=cert, keyfile=key) as sim:
        sim.populate(1, days=1)
        yield sim


def login(sim, **kwargs):
    client = PbxClient(sim.base_url, "api", PASSWORD, events_port=None, connect_timeout_s=5, **kwargs)
    try:
        return client.login()
    finally:
        client.stop()


def test_verification_is_on_by_default(https_pbx):
    with pytest.raises(errors.PbxUnavailableError) as info:
        login(https_pbx)
    assert "TLS verification" in str(info.value) and "--ca-file" in str(info.value)
    assert https_pbx.counters["login"] == 0


def test_ca_file_trusts_the_pbx_certificate(https_pbx, certificate):
    assert login(https_pbx, verify=certificate[0])


def test_insecure_connects_without_verification(https_pbx):
    assert login(https_pbx, verify=False)


def test_pinned_fingerprint_is_trusted_and_a_wrong_one_refused(https_pbx, certificate):
    assert login(https_pbx, pin_sha256=certificate[2])
    with pytest.raises(errors.PbxUnavailableError) as info:
        login(https_pbx, pin_sha256="ab" * 32)
    assert "does not match --pin-sha256" in str(info.value)
    assert https_pbx.counters["login"] == 1


def test_fingerprint_command_prints_what_to_pin(https_pbx, certificate):
    assert certificate_sha256(https_pbx.base_url).replace(":", "").lower() == certificate[2]
    result = subprocess.run([sys.executable, "-m", "yeastarfs", "fingerprint", https_pbx.base_url],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.strip().replace(":", "").lower() == certificate[2]
    assert f"--pin-sha256 {certificate[2]}" in result.stderr


def test_requests_ca_bundle_from_the_environment_never_widens_trust(https_pbx, certificate, monkeypatch):
    # Issue 9: with neither --ca-file nor --pin-sha256, REQUESTS_CA_BUNDLE used to make requests
    # trust whatever it names. The environment does not decide whom the PBX client trusts.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certificate[0])
    monkeypatch.setenv("CURL_CA_BUNDLE", certificate[0])
    with pytest.raises(errors.PbxUnavailableError, match="TLS verification"):
        login(https_pbx)


@pytest.fixture(scope="module")
def other_certificate(tmp_path_factory):
    """Another self-signed certificate for 127.0.0.1: a CA bundle that does not sign the PBX's."""
    return self_signed_certificate(tmp_path_factory.mktemp("other-tls"))[0]


@pytest.mark.parametrize("proxy", [None, "environment"])
@pytest.mark.parametrize("choice", ["ca_file", "insecure", "pin"])
def test_requests_ca_bundle_never_overrides_the_tls_options(https_pbx, certificate, other_certificate, monkeypatch,
                                                            choice, proxy):
    """README (Security, TLS): REQUESTS_CA_BUNDLE never overrides --ca-file, --insecure or
    --pin-sha256, not even with --proxy environment (which reads the proxy variables)."""
    for variable in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(variable, other_certificate)  # would make every choice fail if obeyed
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    options = {"ca_file": {"verify": certificate[0]}, "insecure": {"verify": False},
               "pin": {"pin_sha256": certificate[2]}}[choice]
    assert login(https_pbx, proxy=proxy, **options)


def test_tls_options_with_a_plain_http_pbx_are_an_error():
    from yeastarfs.config import Config
    for extra in ({"pin_sha256": "ab" * 32}, {"verify": __file__}):
        with pytest.raises(errors.ConfigError, match="https://"):
            Config(mountpoint="/mnt", pbx_url="http://192.0.2.1:80", username="api", password="x", **extra).validate()
