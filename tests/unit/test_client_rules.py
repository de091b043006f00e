"""PbxClient's rules that test_api.py leaves open, against the real simulator: the heartbeat
thread (when it fires, what it counts, how it recovers), the address the heartbeat names,
what a refused download or CDR says and does to the token, and how a CDR download is asked
and decoded.

Time in the heartbeat tests is the client's ``monotonic`` seam (`SteppedClock`), so the
token's idleness is exact; the thread itself checks every quarter of a 0.25 s interval.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import threading
import time
import uuid

import pytest

from harness import factory, holds_for, new_simulator, wait_until
from test_api import START, SteppedClock, add, read_all
from yeastarfs import errors, metrics
from yeastarfs.pbx.sseries.client import PbxClient
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


def test_the_heartbeat_names_the_address_the_pbx_sees_us_from(make_client, require):
    """A PBX on another address than loopback: the heartbeat's ipaddr (where events go) is
    the source address of our requests to it."""
    address = _non_loopback_ipv4()
    require(address is not None, "this machine has no IPv4 address but loopback")
    sim = new_simulator(host=address).start()
    try:
        client = make_client(sim)
        client.heartbeat()
        [entry] = [e for e in sim.requests_log if e["endpoint"] == "heartbeat"]
        assert entry["body"]["ipaddr"] == entry["client_ip"] == address
    finally:
        sim.stop()


def test_a_pbx_reached_over_ipv6_is_told_the_ipv4_loopback(make_client, monkeypatch, require):
    """No IPv4 route to the PBX (an IPv6 address): the heartbeat still goes out and names
    127.0.0.1, the fallback."""
    monkeypatch.setattr(sim_common.SimHttpServer, "address_family", socket.AF_INET6)
    require(socket.has_ipv6 and os.path.exists("/proc/net/if_inet6"), "no IPv6 here")
    sim = new_simulator(host="::1").start()
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


# -- what goes over the wire -----------------------------------------------------------------


class Wire:
    """What the simulator received, as sent: each request's method, raw target, headers and
    raw body (the simulator's own log has them parsed). Wraps the running simulator's
    handler class and its dispatch; the simulator still answers every request itself."""

    def __init__(self, sim):
        self.requests = []
        wire = self
        handler = sim._http.RequestHandlerClass

        class Recording(handler):
            def _serve(self, method):
                wire.requests.append({"method": method, "target": self.path, "headers": dict(self.headers)})
                super()._serve(method)

        sim._http.RequestHandlerClass = Recording
        dispatch = sim._dispatch

        def recording_dispatch(method, target, raw_body, *args):
            for request in reversed(self.requests):
                if request["target"] == target and "body" not in request:
                    request["body"] = raw_body
                    break
            return dispatch(method, target, raw_body, *args)

        sim._dispatch = recording_dispatch

    def to(self, endpoint):
        return [r for r in self.requests if r["target"].split("?")[0].endswith("/" + endpoint)]


def test_api_calls_are_json_posts_and_logout_sends_no_body(pbx, client):
    wire = Wire(pbx)
    client.login()
    client.logout()
    [login] = wire.to("login")
    assert login["method"] == "POST"
    assert "?" not in login["target"]  # no token, not even an empty one
    assert login["headers"]["Content-Type"] == "application/json; charset=utf-8"
    assert json.loads(login["body"]) == {"username": "api", "password": pbx.password_md5,
                                         "version": "2.0.0", "port": "8260"}
    [logout] = wire.to("logout")
    assert logout["body"] == b""


def test_downloads_ask_for_identity_bytes_and_a_range_only_past_byte_0(pbx, client):
    rec = add(pbx, name="20240310143000-1.2-+49 30-1000-Inbound.wav")
    pbx.honour_range = True
    wire = Wire(pbx)
    read_all(client.open_recording(rec.name))
    with client.open_recording(rec.name, offset=1) as stream:
        assert stream.start_offset == 1
        assert b"".join(stream.chunks()) == pbx.recording_bytes(rec.name)[1:]
    whole, tail = wire.to("recording/download")
    for request in (whole, tail):
        assert request["headers"]["Accept-Encoding"] == "identity"
        assert "recording=20240310143000-1.2-%2B49%2030-1000-Inbound.wav" in request["target"]
    assert "Range" not in whole["headers"]
    assert tail["headers"]["Range"] == "bytes=1-"


# -- the base URL, secrets, the transport ------------------------------------------------------


def test_the_base_url_loses_its_trailing_slash_only(pbx, make_client):
    class WithSlash:
        base_url, password = pbx.base_url + "/", pbx.password

    client = make_client(WithSlash)
    assert client.base_url == pbx.base_url
    assert client.login()
    secret = f"pw-{uuid.uuid4().hex}"  # a client registers its password for redaction, for the process's life
    named = PbxClient("http://PBX/", "api", secret)
    try:
        assert named.base_url == "http://PBX"
    finally:
        named.stop()
        errors.forget_secret(secret)


def test_a_base_url_with_a_path_is_not_the_api(pbx, make_client):
    class WithPath:
        base_url, password = pbx.base_url + "/nothing", pbx.password

    with pytest.raises(errors.PbxUnavailableError) as info:
        make_client(WithPath).login()
    assert "login answered HTTP 404" in str(info.value)


def test_the_password_and_its_md5_are_redacted_from_the_start(pbx, make_client):
    password = f"pw-{uuid.uuid4().hex}"
    make_client(pbx, password=password)
    digest = hashlib.md5(password.encode()).hexdigest()
    try:
        assert errors.redact(f"a {password} b {digest}") == "a *** b ***"
    finally:
        for secret in (password, digest):
            errors.forget_secret(secret)


def test_events_over_http_until_a_login_says_otherwise(make_sim, make_client):
    sim = make_sim(transport="TCP")
    client = make_client(sim)
    assert client.transport == "HTTP"
    client.login()
    assert client.transport == "TCP"
    token = "a-token-of-32-characters-for-you"
    sim.api_raw_reply = {"login": json.dumps({"status": "Success", "token": token, "transport": "tcp"}).encode()}
    client.login()
    assert client.transport == "TCP"
    sim.api_raw_reply = {"login": json.dumps({"status": "Success", "token": token}).encode()}
    client.login()
    assert client.transport == "HTTP"


@pytest.fixture
def make_sim():
    yield from factory(lambda **options: new_simulator(**options).start())


# -- login replies and refusals ----------------------------------------------------------------


@pytest.mark.parametrize("reply", [{"status": "Success"}, {"status": "Success", "token": ""},
                                   {"status": "Success", "token": 7}])
def test_a_login_reply_without_a_token_is_refused(pbx, client, reply):
    pbx.api_raw_reply = {"login": json.dumps(reply).encode()}
    with pytest.raises(errors.PbxUnavailableError) as info:
        client.login()
    assert str(info.value).startswith("login reply carries no token")
    assert client.stats.logins == 0


def test_a_refusal_repeated_during_the_pause_says_what_the_first_said(pbx, make_client):
    client = make_client(pbx, password="wrong-password", monotonic=SteppedClock())
    with pytest.raises(errors.AuthError) as first:
        client.login()
    with pytest.raises(errors.AuthError) as again:
        client.login()
    assert str(again.value) == str(first.value)
    assert "'api'" in str(again.value) and "rejected" in str(again.value)
    assert pbx.counters["login"] == 1


def test_the_login_pause_ends_at_five_minutes_to_the_tick(pbx, make_client):
    clock = SteppedClock()
    client = make_client(pbx, monotonic=clock)
    pbx.fail_logins = 1
    with pytest.raises(errors.AuthError):
        client.login()
    clock.advance(300)  # exact in binary: the pause ends now
    assert client.login()
    assert pbx.counters["login"] == 2


def test_logins_are_counted_by_outcome(pbx, client):
    ok, unreachable = (counted("yeastarfs_pbx_logins_total", outcome=o) for o in ("ok", "unreachable"))
    client.login()
    assert counted("yeastarfs_pbx_logins_total", outcome="ok") == ok + 1
    pbx.refuse_connections = True
    with pytest.raises(errors.PbxUnavailableError) as info:
        client.login()
    assert str(info.value).startswith(f"cannot log in to {pbx.base_url}")
    assert counted("yeastarfs_pbx_logins_total", outcome="unreachable") == unreachable + 1
    assert counted("yeastarfs_pbx_logins_total", outcome="ok") == ok + 1


def test_a_heartbeat_thread_started_before_any_login_logs_in_by_itself(pbx, make_client):
    """Before its first login the session counts as idle since the monotonic clock's zero:
    here the clock reads exactly one interval, so the first check logs in."""
    clock = SteppedClock()
    clock.now_s = INTERVAL_S
    client = make_client(pbx, heartbeat_interval_s=INTERVAL_S, monotonic=clock)
    client.start_heartbeat()
    wait_until(lambda: pbx.counters["heartbeat"] == 1, timeout_s=3, message="the first heartbeat")
    assert pbx.counters["login"] == 1


# -- what the client counts ------------------------------------------------------------------


def test_stats_count_api_calls_logins_and_downloads(pbx, client):
    rec = add(pbx)
    before_s = time.time()
    client.login()
    for _ in range(2):
        client.recording_random(rec.name)
    assert (client.stats.api_calls, client.stats.logins, client.stats.downloads_opened) == (3, 1, 0)
    read_all(client.open_recording(rec.name))
    assert (client.stats.api_calls, client.stats.downloads_opened) == (4, 1)
    read_all(client.open_recording(rec.name))
    assert (client.stats.api_calls, client.stats.downloads_opened) == (5, 2)
    pbx.expire_all_tokens()
    client.recording_random(rec.name)  # refused, a login, again
    assert (client.stats.api_calls, client.stats.logins) == (8, 2)
    after_s = time.time()
    assert before_s <= client.stats.last_success_time <= after_s
    assert before_s <= client.stats.last_login_time <= after_s
    assert 0 <= client.token_age_s <= after_s - before_s + 1


def test_every_api_request_is_counted_by_its_endpoint(pbx, client):
    rec = add(pbx)
    client.login()
    before = counted("yeastarfs_pbx_requests_total", endpoint="recording/get_random", outcome="ok")
    client.recording_random(rec.name)
    assert counted("yeastarfs_pbx_requests_total", endpoint="recording/get_random", outcome="ok") == before + 1


# -- what failed calls say --------------------------------------------------------------------


def test_a_call_refused_without_an_errno_is_tried_once_more_and_says_none(pbx, client):
    rec = add(pbx)
    client.login()
    pbx.api_raw_reply = {"recording/get_random": b'{"status": "Failed"}'}
    with pytest.raises(errors.ApiError) as info:
        client.recording_random(rec.name)
    assert (info.value.endpoint, info.value.api_errno) == ("recording/get_random", "")
    assert pbx.counters["login"] == 2


def test_a_call_refused_again_after_a_fresh_login_names_the_call_and_errno(pbx, client):
    rec = add(pbx)
    client.login()
    pbx.api_raw_reply = {"recording/get_random": b'{"status": "Failed", "errno": "30000"}'}
    with pytest.raises(errors.ApiError) as info:
        client.recording_random(rec.name)
    assert (info.value.endpoint, info.value.api_errno) == ("recording/get_random", "30000")
    pbx.api_raw_reply = {"recording/get_random": b'{"status": "Failed", "errno": "10004"}'}
    with pytest.raises(errors.ApiError) as info:
        client.recording_random(rec.name)
    assert (info.value.endpoint, info.value.api_errno) == ("recording/get_random", "10004")


def test_a_token_refused_after_a_fresh_login_names_the_call_and_errno(make_client):
    sim = new_simulator(token_idle_s=-1).start()  # every token is dead on arrival
    try:
        with pytest.raises(errors.TokenError) as info:
            make_client(sim).heartbeat()
        assert "heartbeat" in str(info.value) and "20004" in str(info.value)
    finally:
        sim.stop()


def test_api_replies_with_bytes_that_are_not_utf8_are_read(pbx, client):
    rec = add(pbx)
    pbx.api_raw_reply = {"recording/get_random": b'{"status": "Success", "random": "r4nd0m", "msg": "\xff"}'}
    assert client.recording_random(rec.name) == "r4nd0m"


@pytest.mark.parametrize("reply, words", [(b'{"status": "Success"}', "get_random reply carries no random"),
                                          (b"[1, 2]", "recording/get_random answered JSON that is not an object"),
                                          (b'{"pad": "' + b"x" * 70_000 + b'"}', "recording/get_random: reply is larger than")])
def test_refused_random_replies_say_what_was_wrong(pbx, client, reply, words):
    rec = add(pbx)
    client.login()
    pbx.api_raw_reply = {"recording/get_random": reply}
    with pytest.raises(errors.PbxUnavailableError) as info:
        client.recording_random(rec.name)
    assert str(info.value).startswith(words)


@pytest.mark.parametrize("mode, words", [("http500", "recording/download answered HTTP 500"),
                                         ("html", "recording/download returned an HTML page")])
def test_failed_downloads_name_the_download(pbx, client, mode, words):
    rec = add(pbx)
    pbx.fail_mode, pbx.fail_downloads = mode, 1
    with pytest.raises(errors.PbxError) as info:
        read_all(client.open_recording(rec.name))
    assert str(info.value).startswith(words)


def test_a_json_refusal_of_a_download_names_the_download(pbx, client):
    rec = add(pbx)
    pbx.fail_mode, pbx.fail_downloads = "json", 1
    with pytest.raises(errors.ApiError) as info:
        client.open_recording(rec.name)
    assert info.value.endpoint == "recording/download"


def test_a_token_handed_out_again_stays_redacted(pbx, client):
    """A PBX may answer a second login with the token it already gave: it is still the live
    token, and still kept out of every message."""
    token = f"t{uuid.uuid4().hex}"
    pbx.api_raw_reply = {"login": json.dumps({"status": "Success", "token": token}).encode()}
    assert client.login() == token
    assert client.login() == token
    try:
        assert errors.redact(f"token {token}") == "token ***"
    finally:
        client.logout()
