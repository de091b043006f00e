"""PbxClient's rules that test_api.py leaves open, against the real simulator: the heartbeat
thread (when it fires, what it counts, how it recovers), the address the heartbeat names,
what a refused download or CDR says and does to the token, and how a CDR download is asked
and decoded.

Time in the heartbeat tests is the client's ``monotonic`` seam (`SteppedClock`), so the
token's idleness is exact; the thread itself checks every quarter of a 0.25 s interval.
"""

from __future__ import annotations

import datetime
import json
import socket
import threading

import pytest

from harness import factory, holds_for, new_simulator, wait_until
from test_api import START, SteppedClock, add, read_all
from yeastarfs import errors, metrics
from yeastarfs.sim import common as sim_common

INTERVAL_S = 0.25  # exact in binary: idleness equal to it can be reached to the bit
DAY = datetime.timedelta(days=1)
CDR_HEADER = ("callid,timestart,callfrom,callto,callduraction,talkduraction,srctrunkname,dsttrunkname,"
              "status,type,pincode,recording,didnumber,sn\n")


@pytest.fixture
def client(pbx, make_client):
    return make_client(pbx)


def counted(name, **labels):
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def renewals(outcome):
    return counted("yeastarfs_pbx_token_renewals_total", outcome=outcome)


def requests_with_token(sim):
    return [e for e in sim.requests_log if e["endpoint"] != "login"]


# -- the heartbeat thread ------------------------------------------------------------------


def test_a_token_idle_for_exactly_the_interval_gets_its_heartbeat(pbx, make_client):
    clock = SteppedClock()
    client = make_client(pbx, heartbeat_interval_s=INTERVAL_S, monotonic=clock)
    client.login()
    ok_before = renewals("ok")
    client.start_heartbeat()
    clock.advance(INTERVAL_S / 2)
    holds_for(lambda: pbx.counters["heartbeat"] == 0, duration_s=0.2, interval_s=0.02,
              message="no heartbeat for a token idle half the interval")
    clock.advance(INTERVAL_S / 2)
    wait_until(lambda: renewals("ok") == ok_before + 1, timeout_s=3, message="one counted renewal")
    assert pbx.counters["heartbeat"] == 1


def test_a_failed_heartbeat_is_counted_and_retried_after_one_more_interval(pbx, make_client):
    clock = SteppedClock()
    client = make_client(pbx, heartbeat_interval_s=INTERVAL_S, monotonic=clock)
    client.login()
    ok_before, failed_before = renewals("ok"), renewals("failed")
    client.start_heartbeat()
    pbx.refuse_connections = True
    clock.advance(INTERVAL_S)
    wait_until(lambda: renewals("failed") == failed_before + 1, timeout_s=3, message="one counted failure")
    pbx.refuse_connections = False
    holds_for(lambda: pbx.counters["heartbeat"] == 0 and renewals("failed") == failed_before + 1,
              duration_s=0.2, interval_s=0.02, message="no retry before another interval")
    clock.advance(INTERVAL_S)
    wait_until(lambda: renewals("ok") == ok_before + 1, timeout_s=3, message="the retried heartbeat")
    assert pbx.counters["heartbeat"] == 1


def test_the_heartbeat_runs_in_a_daemon_thread_named_for_it(pbx, make_client):
    """A thread dump names it, and it never keeps the process alive."""
    client = make_client(pbx, heartbeat_interval_s=INTERVAL_S)
    client.start_heartbeat()
    [thread] = [t for t in threading.enumerate() if t is client._heartbeat_thread]
    assert thread.name == "pbx-heartbeat"
    assert thread.daemon


# -- the address the heartbeat names -------------------------------------------------------


def _non_loopback_ipv4():
    """An IPv4 address of this machine other than loopback, or None."""
    candidates = []
    try:
        candidates += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    except OSError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent
            candidates.append(probe.getsockname()[0])
    except OSError:
        pass
    return next((a for a in candidates if not a.startswith("127.")), None)


def test_the_heartbeat_names_the_address_the_pbx_sees_us_from(make_client):
    """A PBX on another address than loopback: the heartbeat's ipaddr (where events go) is
    the source address of our requests to it."""
    address = _non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no IPv4 address but loopback")
    try:
        sim = new_simulator(host=address).start()
    except OSError as exc:
        pytest.skip(f"cannot listen on {address}: {exc}")
    try:
        client = make_client(sim)
        client.heartbeat()
        [entry] = [e for e in sim.requests_log if e["endpoint"] == "heartbeat"]
        assert entry["body"]["ipaddr"] == entry["client_ip"] == address
    finally:
        sim.stop()


def test_a_pbx_reached_over_ipv6_is_told_the_ipv4_loopback(make_client, monkeypatch):
    """No IPv4 route to the PBX (an IPv6 address): the heartbeat still goes out and names
    127.0.0.1, the fallback."""
    monkeypatch.setattr(sim_common.SimHttpServer, "address_family", socket.AF_INET6)
    try:
        sim = new_simulator(host="::1").start()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        class OverIpv6:  # the simulator's own base_url assumes IPv4
            base_url, password = f"http://[::1]:{sim.port}", sim.password

        make_client(OverIpv6).heartbeat()
        [entry] = [e for e in sim.requests_log if e["endpoint"] == "heartbeat"]
        assert entry["body"]["ipaddr"] == "127.0.0.1"
    finally:
        sim.stop()


# -- logins --------------------------------------------------------------------------------


def test_a_rejected_login_is_counted_as_rejected(pbx, make_client):
    rejected, ok = counted("yeastarfs_pbx_logins_total", outcome="rejected"), counted(
        "yeastarfs_pbx_logins_total", outcome="ok")
    with pytest.raises(errors.AuthError):
        make_client(pbx, password="wrong-password").login()
    assert counted("yeastarfs_pbx_logins_total", outcome="rejected") == rejected + 1
    assert counted("yeastarfs_pbx_logins_total", outcome="ok") == ok


def test_after_a_failed_relogin_the_next_call_asks_the_pbx_nothing(pbx, make_client):
    """The dead token is dropped before the re-login: when that login is refused, later
    calls are refused here (the login pause), not sent with an empty token."""
    rec = add(pbx)
    client = make_client(pbx, monotonic=SteppedClock())
    client.login()
    pbx.expire_all_tokens()
    pbx.fail_logins = 1
    with pytest.raises(errors.AuthError):
        client.recording_random(rec.name)
    asked = dict(pbx.counters)
    with pytest.raises(errors.AuthError):
        client.recording_random(rec.name)
    assert dict(pbx.counters) == asked
    assert all(e["query"].get("token") for e in requests_with_token(pbx))


# -- refused downloads ---------------------------------------------------------------------


def test_a_missing_recording_names_the_call_that_found_it_missing(pbx, client):
    with pytest.raises(errors.RecordingNotFoundError) as info:
        client.open_recording("20240310143000-1.1-1000-1001-Internal.wav")
    assert info.value.endpoint == "recording/get_random"
    assert "recording/get_random" in str(info.value)


def test_a_refused_download_without_an_errno_says_none(pbx, client):
    rec = add(pbx)
    pbx.api_raw_reply = {"recording/download": b'{"status": "Failed"}'}
    with pytest.raises(errors.ApiError) as info:
        client.open_recording(rec.name)
    assert info.value.api_errno == ""
    assert "errno (none)" in str(info.value)


def test_after_a_token_error_on_a_download_the_next_call_logs_in_first(pbx, client):
    """The dropped token is not replaced by an empty one: the next call logs in before it
    asks anything, so the PBX sees one request for it, with a live token."""
    rec = add(pbx)
    client.login()
    pbx.api_raw_reply = {"recording/download": json.dumps({"status": "Failed", "errno": "20004"}).encode()}
    with pytest.raises(errors.ApiError):
        client.open_recording(rec.name)
    pbx.api_raw_reply = {}
    randoms = pbx.counters["recording/get_random"]
    assert client.recording_random(rec.name)
    assert pbx.counters["recording/get_random"] == randoms + 1
    assert pbx.counters["login"] == 2
    assert all(e["query"].get("token") for e in requests_with_token(pbx))


# -- the CDR download ----------------------------------------------------------------------


def test_a_cdr_random_that_is_missing_says_which_call_lacked_it(pbx, client):
    pbx.api_raw_reply = {"cdr/get_random": b'{"status": "Success"}'}
    with pytest.raises(errors.PbxUnavailableError) as info:
        client.fetch_cdr(START, START + DAY)
    assert str(info.value).startswith("cdr/get_random ")


def test_the_cdr_download_asks_for_every_number_with_times_percent_encoded(pbx, client):
    """A space in the window's times goes as %20 (a PBX need not read "+" as a space), and
    the download names the same numbers as its random."""
    targets = []
    dispatch = pbx._dispatch

    def recording_dispatch(method, target, *args):
        targets.append(target)
        return dispatch(method, target, *args)

    pbx._dispatch = recording_dispatch
    client.fetch_cdr(START, START + datetime.timedelta(hours=1))
    [target] = [t for t in targets if "cdr/download" in t]
    assert "starttime=2024-03-10%2014%3A30%3A00" in target and "+" not in target
    [entry] = [e for e in pbx.requests_log if e["endpoint"] == "cdr/download"]
    assert entry["query"]["number"] == "all"


def test_a_cdr_over_32_mib_names_the_download_it_refused(pbx, client):
    pbx.cdr_raw_body = CDR_HEADER.encode() + b"x" * (32 << 20)
    with pytest.raises(errors.PbxUnavailableError) as info:
        client.fetch_cdr(START, START + DAY)
    assert str(info.value).startswith("cdr/download: ") and "larger than" in str(info.value)


def test_a_cdr_with_bytes_that_are_not_utf8_is_read_with_replacements(pbx, client):
    row = ("1.1,2024-03-10 14:30:00,10@1,1002,10,8,,,ANSWERED,Internal,,"
           "20240310143000-1.1-1001-1002-Internal.wav,,369\n")
    pbx.cdr_raw_body = (CDR_HEADER + row).encode().replace(b"@", b"\xff")
    [rec] = client.fetch_cdr(START, START + DAY).recordings
    assert rec.name == "20240310143000-1.1-1001-1002-Internal.wav"
    assert rec.callfrom == "10\ufffd1"


def test_a_cdr_refused_after_a_byte_order_mark_has_its_errno(pbx, client):
    pbx.cdr_raw_body = b'\xef\xbb\xbf{"status": "Failed", "errno": "10004"}'
    with pytest.raises(errors.ApiError) as info:
        client.fetch_cdr(START, START + DAY)
    assert info.value.api_errno == "10004"
    assert info.value.endpoint == "cdr/download"


def test_a_cdr_that_is_neither_csv_nor_json_says_why(pbx, client):
    """Only blanks and a byte order mark may come before a JSON refusal; anything else is a
    CSV, here one without its header row, and the error names the download and the reason."""
    pbx.cdr_raw_body = b'XX{"status": "Failed", "errno": "10004"}'
    with pytest.raises(errors.PbxUnavailableError) as info:
        client.fetch_cdr(START, START + DAY)
    message = str(info.value)
    assert message.startswith("cdr/download: ") and "header" in message and "'recording'" in message


def test_a_token_error_instead_of_the_cdr_drops_the_token(pbx, client):
    add(pbx)
    client.login()
    pbx.cdr_raw_body = json.dumps({"status": "Failed", "errno": "20004"}).encode()
    with pytest.raises(errors.ApiError) as info:
        client.fetch_cdr(START, START + DAY)
    assert info.value.api_errno == "20004"
    pbx.cdr_raw_body = None
    assert len(client.fetch_cdr(START, START + DAY).recordings) == 1
    assert pbx.counters["login"] == 2
