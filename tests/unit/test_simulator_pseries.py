"""The P-Series simulator against its contract (pseries.py's docstring), over real loopback.

Plain http.client and a stdlib WebSocket client: nothing here shares code with a P-Series
client, so a misreading of the API cannot hide in both. Time-dependent rules are driven
with ``advance_clock`` instead of sleeps.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from urllib.parse import urlencode

import pytest
from harness import holds_for

from yeastarfs.sim import PSeriesSimulator
from yeastarfs.sim.common import (
    OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, WebSocketClient, WebSocketClosed,
    WebSocketHandshakeError, parse_close)
from yeastarfs.sim.sseries import Simulator

# From the S-Series tests: a condition wait, and the event receiver (a local HTTP server)
# whose fixture serves the webhook too.
from test_simulator import receiver, wait_until  # noqa: F401  (receiver is a fixture)

UA = "OpenAPI"
START = datetime.datetime(2024, 3, 10, 14, 30, 0)
TOKEN_RE = re.compile(r"^[A-Za-z0-9]{32}$")
LINK_RE = re.compile(r"^/api/download/Recording-X\.7\.0\.6-1-download-\d{14}-[A-Za-z0-9]{16}\.wav$")
IST = datetime.timezone(datetime.timedelta(hours=5, minutes=30))


@pytest.fixture
def sim():
    with PSeriesSimulator() as simulator:
        yield simulator


@pytest.fixture
def make_sim():
    """Start simulators with custom settings; all are stopped at the end."""
    started = []

    def make(**kwargs):
        started.append(PSeriesSimulator(**kwargs).start())
        return started[-1]

    yield make
    for simulator in started:
        simulator.stop()


class Reply:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


@contextlib.contextmanager
def exchange(sim, method, path, *, body=None, headers=None, user_agent=UA):
    """The response to one request, its body unread, with only the headers given
    (http.client sends no User-Agent of its own)."""
    if sim.certfile:
        conn = http.client.HTTPSConnection(sim.host, sim.port, timeout=10,
                                           context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection(sim.host, sim.port, timeout=10)
    sent = dict(headers or {})
    if user_agent:
        sent["User-Agent"] = user_agent
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode("utf-8")
        sent["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=body, headers=sent)
        yield conn.getresponse()
    finally:
        conn.close()


def request(sim, method, path, **kwargs):
    with exchange(sim, method, path, **kwargs) as response:
        return Reply(response.status, response.headers, response.read())


def api(sim, endpoint, token=None, *, method="GET", body=None, user_agent=UA, **query):
    if token is not None:
        query["access_token"] = token
    path = f"/openapi/v1.0/{endpoint}" + (f"?{urlencode(query)}" if query else "")
    reply = request(sim, method, path, body=body, user_agent=user_agent)
    assert reply.status == 200
    return reply.json()


def get_pair(sim, username="api", password="secret"):
    return api(sim, "get_token", method="POST", body={"username": username, "password": password})


def login(sim):
    pair = get_pair(sim)
    assert pair["errcode"] == 0, pair
    return pair["access_token"]


def refresh(sim, refresh_token):
    return api(sim, "refresh_token", method="POST", body={"refresh_token": refresh_token})


def link_for(sim, token, **query):
    reply = api(sim, "recording/download", token, **query)
    assert reply["errcode"] == 0, reply
    return reply["download_resource_url"]


def fetch(sim, link, token, headers=None):
    return request(sim, "GET", f"{link}?access_token={token}", headers=headers)


def download(sim, token, rec, headers=None):
    return fetch(sim, link_for(sim, token, id=rec.id), token, headers)


def add(sim, seconds=2.0, **kwargs):
    kwargs.setdefault("start", START)
    kwargs.setdefault("announce", False)
    return sim.add_recording(duration_s=seconds, **kwargs)


def error(code, message):
    return {"errcode": code, "errmsg": message}


# --- transport conventions --------------------------------------------------------------


def test_every_request_needs_a_user_agent(sim):
    token = login(sim)
    rec = add(sim)
    link = link_for(sim, token, id=rec.id)
    missing = error(10004, "USER AGENT REQUIRED")
    assert api(sim, "get_token", method="POST", body={"username": "api", "password": "secret"},
               user_agent=None) == missing
    assert api(sim, "recording/list", token, user_agent=None) == missing
    assert request(sim, "GET", f"{link}?access_token={token}", user_agent=None).json() == missing
    assert api(sim, "recording/list", token, user_agent=" ") == missing
    assert sim.counters["recording/list"] == 2  # refused requests are still counted


def test_errors_are_http_200_json_and_unknown_paths_404(sim):
    token = login(sim)
    reply = request(sim, "GET", "/openapi/v1.0/cdr/query?access_token=" + token)
    assert reply.status == 200 and reply.headers["Content-Type"] == "application/json"
    assert reply.headers["Connection"] == "close"
    assert reply.json() == error(10001, "INTERFACE NOT EXISTED")
    assert api(sim, "get_token") == error(10003, "METHOD NOT ALLOWED")
    assert api(sim, "recording/list", token, method="POST") == error(10003, "METHOD NOT ALLOWED")
    not_json = request(sim, "POST", "/openapi/v1.0/get_token", body=b"username=api",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert not_json.json() == error(10002, "PARAMETER ERROR")
    assert request(sim, "GET", "/index.html").status == 404
    # Any version segment reaches the same endpoints.
    assert api(sim, "recording/list", token).get("errcode") == 0
    reply = request(sim, "GET", f"/openapi/v2.0/recording/list?access_token={token}")
    assert reply.json()["errcode"] == 0


# --- tokens -------------------------------------------------------------------------------


def test_get_token_returns_the_documented_pair(sim):
    pair = get_pair(sim)
    assert list(pair) == ["errcode", "errmsg", "access_token_expire_time", "access_token",
                          "refresh_token_expire_time", "refresh_token"]
    assert pair["errcode"] == 0 and pair["errmsg"] == "SUCCESS"
    assert pair["access_token_expire_time"] == 1800 and pair["refresh_token_expire_time"] == 86400
    assert TOKEN_RE.match(pair["access_token"]) and TOKEN_RE.match(pair["refresh_token"])
    assert pair["access_token"] != pair["refresh_token"]
    assert sim.requests_log[-1]["user_agent"] == UA


def test_wrong_credentials_and_fail_logins(sim):
    assert get_pair(sim, password="wrong") == error(20001, "AUTHENTICATION FAILED")
    assert get_pair(sim, username="nobody") == error(20001, "AUTHENTICATION FAILED")
    assert api(sim, "get_token", method="POST", body={}) == error(20001, "AUTHENTICATION FAILED")
    sim.fail_logins = 3  # not counted towards the lockout: 2 real + 3 injected stay below 5
    assert [get_pair(sim)["errcode"] for _ in range(3)] == [20001] * 3
    assert sim.fail_logins == 0
    login(sim)


def test_five_failures_block_the_ip_until_the_lockout_ends(sim):
    token = login(sim)
    assert [get_pair(sim, password="x")["errcode"] for _ in range(5)] == [20001] * 5
    assert get_pair(sim) == error(20002, "IP BLOCKED")
    assert api(sim, "recording/list", token)["errcode"] == 0  # a valid token keeps working
    sim.advance_clock(599)
    assert get_pair(sim)["errcode"] == 20002
    sim.advance_clock(2)
    login(sim)
    sim.lock_ip()
    assert get_pair(sim)["errcode"] == 20002
    sim.unlock_all()
    login(sim)


def test_failures_count_within_the_window_and_a_success_clears_them(sim):
    for _ in range(4):
        get_pair(sim, password="x")
    sim.advance_clock(601)  # the four fall out of the window
    for _ in range(4):
        assert get_pair(sim, password="x")["errcode"] == 20001
    login(sim)  # clears the count
    for _ in range(4):
        assert get_pair(sim, password="x")["errcode"] == 20001
    login(sim)


def test_access_token_expires_after_its_lifetime(make_sim):
    sim = make_sim(access_token_ttl_s=60)
    token = login(sim)
    sim.advance_clock(59)
    assert api(sim, "recording/list", token)["errcode"] == 0  # use does not extend it
    sim.advance_clock(1)
    expired = api(sim, "recording/list", token)
    assert expired == error(20003, "TOKEN EXPIRED") and "TOKEN EXPIRED" in expired["errmsg"]
    assert api(sim, "recording/list", "A" * 32) == error(20004, "INVALID TOKEN")
    assert api(sim, "recording/list") == error(20004, "INVALID TOKEN")


def test_refresh_issues_a_new_pair_and_revokes_the_old_access_token(sim):
    old = get_pair(sim)
    new = refresh(sim, old["refresh_token"])
    assert new["errcode"] == 0 and set(new) == set(old)
    assert {new["access_token"], new["refresh_token"]}.isdisjoint(
        {old["access_token"], old["refresh_token"]})
    assert api(sim, "recording/list", old["access_token"]) == error(20004, "INVALID TOKEN")
    assert api(sim, "recording/list", new["access_token"])["errcode"] == 0
    assert refresh(sim, old["refresh_token"]) == error(20006, "INVALID REFRESH TOKEN")
    assert refresh(sim, "nope") == error(20006, "INVALID REFRESH TOKEN")
    assert api(sim, "refresh_token", method="POST", body={}) == error(10002, "PARAMETER ERROR")


def test_refresh_can_leave_the_old_access_token_valid(sim):
    sim.refresh_revokes_access = False
    old = get_pair(sim)
    new = refresh(sim, old["refresh_token"])
    assert api(sim, "recording/list", old["access_token"])["errcode"] == 0
    assert api(sim, "recording/list", new["access_token"])["errcode"] == 0


def test_refresh_token_expires(make_sim):
    sim = make_sim(access_token_ttl_s=10, refresh_token_ttl_s=100)
    pair = get_pair(sim)
    sim.advance_clock(50)  # access token expired, refresh token still good
    assert api(sim, "recording/list", pair["access_token"])["errcode"] == 20003
    pair = refresh(sim, pair["refresh_token"])
    assert api(sim, "recording/list", pair["access_token"])["errcode"] == 0
    sim.advance_clock(100)
    assert refresh(sim, pair["refresh_token"]) == error(20005, "REFRESH TOKEN EXPIRED")


def test_ninth_token_revokes_the_oldest(sim):
    pairs = [get_pair(sim) for _ in range(9)]
    first = pairs[0]
    assert api(sim, "recording/list", first["access_token"]) == error(20004, "INVALID TOKEN")
    assert refresh(sim, first["refresh_token"])["errcode"] == 20006
    # That refresh failed, so eight are valid: pairs[1:] all still work.
    assert all(api(sim, "recording/list", p["access_token"])["errcode"] == 0 for p in pairs[1:])
    sim.advance_clock(1800)  # all expired: none counts any more, a new one revokes nothing
    fresh = login(sim)
    assert api(sim, "recording/list", pairs[1]["access_token"])["errcode"] == 20003
    assert api(sim, "recording/list", fresh)["errcode"] == 0


def test_token_limit_can_be_lifted(make_sim):
    sim = make_sim(max_valid_tokens=None)
    tokens = [login(sim) for _ in range(10)]
    assert api(sim, "recording/list", tokens[0])["errcode"] == 0


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_del_token_revokes_the_pair(sim, method):
    pair = get_pair(sim)
    assert api(sim, "del_token", pair["access_token"], method=method) == error(0, "SUCCESS")
    assert api(sim, "recording/list", pair["access_token"])["errcode"] == 20004
    assert refresh(sim, pair["refresh_token"])["errcode"] == 20006
    assert api(sim, "del_token", pair["access_token"])["errcode"] == 20004


def test_expire_all_tokens(sim):
    pair = get_pair(sim)
    sim.expire_all_tokens()
    assert api(sim, "recording/list", pair["access_token"])["errcode"] == 20003
    assert refresh(sim, pair["refresh_token"])["errcode"] == 20005
    login(sim)


# --- catalogue ------------------------------------------------------------------------------


def test_list_entries_carry_exact_sizes_and_the_display_time(make_sim):
    sim = make_sim(tz=IST, time_format="%m/%d/%Y %I:%M:%S %p")
    rec = add(sim, seconds=3, callfrom="0612345678", callto="1001", ring_s=22)
    token = login(sim)
    reply = api(sim, "recording/list", token)
    assert reply["errcode"] == 0 and reply["errmsg"] == "SUCCESS" and reply["total_number"] == 1
    epoch = START.replace(tzinfo=IST).timestamp()
    assert rec.callid == f"{int(epoch)}.1" and rec.id == 1
    assert rec.name == f"20240310143022-{rec.callid}-0612345678-1001-Inbound.wav"
    assert reply["data"] == [{
        "id": 1, "time": "03/10/2024 02:30:22 PM", "uid": rec.callid, "call_from": "0612345678",
        "call_to": "1001", "duration": 3, "size": 44 + 3 * 16000, "call_type": "Inbound",
        "file": rec.name}]
    assert rec.timestart == "2024-03-10 14:30:00" and rec.record_epoch == epoch + 22


def test_aware_start_times_are_shown_in_the_pbx_zone(make_sim):
    sim = make_sim(tz=IST)
    rec = add(sim, start=datetime.datetime(2024, 3, 10, 23, 0, 0, tzinfo=datetime.timezone.utc),
              ring_s=0)
    token = login(sim)
    assert api(sim, "recording/list", token)["data"][0]["time"] == "11/03/2024 04:30:00"
    assert rec.name.startswith("20240311043000-")


def test_time_format_must_be_a_date_and_a_time():
    for bad in ("%d/%m/%Y", "%s %H:%M", "%d/%m/%Y %H:%M:%S.%f"):
        with pytest.raises(ValueError):
            PSeriesSimulator(time_format=bad)


def test_list_paging_and_sorting(sim):
    for i in range(25):  # ids ascend while times descend
        add(sim, start=START - datetime.timedelta(minutes=i), callto=str(2000 + i))
    token = login(sim)
    first = api(sim, "recording/list", token)
    assert first["total_number"] == 25
    assert [e["id"] for e in first["data"]] == list(range(25, 5, -1))
    second = api(sim, "recording/list", token, page=2)
    assert [e["id"] for e in second["data"]] == [5, 4, 3, 2, 1]
    beyond = api(sim, "recording/list", token, page=3)
    assert beyond["data"] == [] and beyond["total_number"] == 25
    by_time = api(sim, "recording/list", token, sort_by="time", order_by="asc", page_size=3)
    assert [e["id"] for e in by_time["data"]] == [25, 24, 23]
    by_id = api(sim, "recording/list", token, sort_by="id", order_by="asc", page=5, page_size=6)
    assert [e["id"] for e in by_id["data"]] == [25]
    assert len(api(sim, "recording/list", token, page_size=10000)["data"]) == 25
    for bad in ({"page_size": 10001}, {"page_size": 0}, {"page": 0}, {"page": "x"},
                {"sort_by": "size"}, {"order_by": "up"}):
        assert api(sim, "recording/list", token, **bad) == error(10002, "PARAMETER ERROR"), bad


def test_search_filters_on_the_recording_time_inclusively(make_sim):
    sim = make_sim(tz=datetime.timezone.utc)
    recs = [add(sim, start=START + datetime.timedelta(hours=h), ring_s=0,
                callfrom=str(1000 + h), callto="2000") for h in range(4)]
    token = login(sim)
    epoch = int(recs[1].record_epoch)

    def found(**query):
        reply = api(sim, "recording/search", token, sort_by="id", order_by="asc", **query)
        assert reply["errcode"] == 0, reply
        if "page" not in query:
            assert reply["total_number"] == len(reply["data"])
        return [e["id"] for e in reply["data"]]

    assert found(start_time=epoch, end_time=epoch + 3600) == [2, 3]
    assert found(start_time=epoch + 1) == [3, 4]
    assert found(end_time=epoch - 1) == [1]
    assert found() == [1, 2, 3, 4]
    assert found(caller="1002") == [3] and found(callee="2000") == [1, 2, 3, 4]
    assert found(ids="1,4") == [1, 4]
    assert found(start_time=epoch, page=2, page_size=2) == [4]
    assert api(sim, "recording/search", token, start_time=epoch, page_size=2)["total_number"] == 3
    for bad in ({"start_time": "yesterday"}, {"ids": "1,x"}, {"end_time": -5}):
        assert api(sim, "recording/search", token, **bad)["errcode"] == 10002, bad


def test_not_written_recordings_are_unlisted_and_not_found(sim):
    sim.not_ready_s = 30
    late = add(sim, callto="2001")
    quick = add(sim, callto="2002", ready_after_s=0)
    sim.not_ready_s = 0
    slow = add(sim, callto="2003", ready_after_s=3600)
    token = login(sim)

    def listed():
        return sorted(e["id"] for e in api(sim, "recording/list", token)["data"])

    assert listed() == [quick.id]
    assert api(sim, "recording/download", token, id=late.id) == error(30001, "RECORDING NOT FOUND")
    assert api(sim, "recording/download", token, file=late.name)["errcode"] == 30001
    sim.advance_clock(30)
    assert listed() == [late.id, quick.id]
    assert fetch(sim, link_for(sim, token, id=late.id), token).status == 200
    sim.make_ready(slow.name)
    assert listed() == [late.id, quick.id, slow.id]
    populated = sim.populate(2, seed=3)  # ready at once whatever not_ready_s says
    assert {r.id for r in populated} <= set(listed())


def test_deleted_and_unlisted_recordings(sim):
    gone, kept, unlisted = add(sim, callto="2001"), add(sim, callto="2002"), add(
        sim, callto="2003", in_cdr=False)
    missing = add(sim, callto="2004", stored=False)
    token = login(sim)

    def listed():
        return sorted(e["id"] for e in api(sim, "recording/list", token)["data"])

    assert listed() == [gone.id, kept.id, missing.id]
    assert api(sim, "recording/download", token, id=missing.id)["errcode"] == 30001
    assert fetch(sim, link_for(sim, token, id=unlisted.id), token).status == 200
    link = link_for(sim, token, file=gone.name)
    assert sim.delete_recording(gone.name, keep_cdr=False).stored is False
    assert listed() == [kept.id, missing.id]
    assert fetch(sim, link, token).json() == error(30002, "RESOURCE NOT FOUND")
    assert api(sim, "recording/download", token, id=gone.id)["errcode"] == 30001
    sim.delete_recording(kept.name)  # keep_cdr: still listed, its file gone
    assert listed() == [kept.id, missing.id]
    assert api(sim, "recording/download", token, id=kept.id)["errcode"] == 30001
    assert sim.recording_bytes(kept.name)[:4] == b"RIFF"  # the name stays known
    with pytest.raises(KeyError):
        sim.delete_recording("nope.wav")
    assert sim.publish_cdr(unlisted.name).in_cdr and unlisted.id in listed()


def test_system_information_reports_the_pbx_clock_and_display_format(make_sim):
    sim = make_sim(tz=IST, time_format="%Y/%m/%d %H:%M:%S")
    sim.clock_offset_s = 420  # the PBX's clock runs seven minutes fast
    token = login(sim)
    before = time.time()
    data = api(sim, "system/information", token)["data"]
    assert before + 420 - 1 <= data["timestamp"] <= time.time() + 420 + 1
    assert data["system_time"] == datetime.datetime.fromtimestamp(
        data["timestamp"], IST).strftime("%Y/%m/%d %H:%M:%S")
    assert (data["system_date_format"], data["system_time_format"]) == ("YYYY/MM/DD", "HH:mm:ss")
    assert data["sn"] == sim.sn and {"model_name", "firmware_version", "up_time"} <= set(data)
    assert api(sim, "system/information")["errcode"] == 20004


def test_the_pbx_clock_skews_times_names_and_the_date_header(make_sim):
    sim = make_sim(tz=IST)
    sim.clock_offset_s = 420
    token = login(sim)
    reply = request(sim, "GET", f"/openapi/v1.0/recording/list?access_token={token}")
    date = datetime.datetime.strptime(reply.headers["Date"], "%a, %d %b %Y %H:%M:%S GMT")
    skew_s = date.replace(tzinfo=datetime.timezone.utc).timestamp() - time.time()
    assert 418 <= skew_s <= 422
    assert abs((sim.now_local() - datetime.datetime.now(IST).replace(tzinfo=None))
               .total_seconds() - 420) <= 2
    # An aware start is a true instant: the PBX stamps it with its fast clock.
    true_start = datetime.datetime(2024, 3, 10, 9, 0, 0, tzinfo=datetime.timezone.utc)
    rec = add(sim, start=true_start, ring_s=0)
    assert rec.name.startswith("20240310143700-") and rec.callid.startswith(
        f"{int(true_start.timestamp())}.")
    # A naive start is the PBX's own wall time, taken as is.
    assert add(sim, start=START, ring_s=0, callto="2009").name.startswith("20240310143000-")
    sim.advance_clock(3600)  # the simulator clock, not the wall clock
    data = api(sim, "system/information", login(sim))["data"]
    assert abs(data["timestamp"] - (time.time() + 420)) <= 2


def test_a_call_without_start_has_just_ended_on_the_pbx_clock(sim):
    sim.clock_offset_s = -3600
    rec = sim.add_recording(duration_s=10, ring_s=5, announce=False)
    assert abs(rec.start_epoch + 15 - (time.time() - 3600)) <= 2


def test_populate_makes_the_s_series_calls(make_sim):
    now = datetime.datetime(2024, 3, 10, 12, 0, 0)
    sim = make_sim(tz=datetime.timezone.utc)
    recs = sim.populate(20, days=3, now=now, seed=7)
    twin = Simulator(tz=datetime.timezone.utc)
    assert [r.name for r in recs] == [r.name for r in twin.populate(20, days=3, now=now, seed=7)]
    assert len(sim.recordings) == 20 and [r.id for r in recs] == list(range(1, 21))
    assert sim.counters["ws_push"] == 0 and sim.counters["event_push"] == 0


# --- downloads ------------------------------------------------------------------------------


def test_two_step_download_returns_the_recording(sim):
    rec = add(sim, seconds=3)
    token = login(sim)
    step = api(sim, "recording/download", token, id=rec.id)
    assert step["errcode"] == 0 and step["errmsg"] == "SUCCESS" and step["file"] == rec.name
    assert LINK_RE.match(step["download_resource_url"]), step
    got = fetch(sim, step["download_resource_url"], token)
    assert got.status == 200 and got.headers["Content-Type"] == "audio/x-wav"
    assert int(got.headers["Content-Length"]) == rec.size_bytes == 44 + 3 * 16000
    assert hashlib.sha256(got.body).hexdigest() == rec.sha256
    assert got.body == sim.recording_bytes(rec.name) and sim.downloaded_bytes() == rec.size_bytes
    by_name = link_for(sim, token, file=rec.name)
    assert by_name != step["download_resource_url"]
    assert fetch(sim, by_name, token).body == got.body
    assert sim.counters["recording/download"] == 2 and sim.counters["download"] == 2


def test_download_step_errors(sim):
    rec = add(sim, name="a b&c+d#e%f=ü?.wav")
    other = add(sim, callto="2009")
    token = login(sim)
    assert fetch(sim, link_for(sim, token, file=rec.name), token).status == 200  # hostile name
    assert api(sim, "recording/download", token) == error(10002, "PARAMETER ERROR")
    assert api(sim, "recording/download", token, id="seven")["errcode"] == 10002
    assert api(sim, "recording/download", token, id=rec.id, file=other.name)["errcode"] == 10002
    assert api(sim, "recording/download", token, id=rec.id, file=rec.name)["errcode"] == 0
    assert api(sim, "recording/download", token, id=999) == error(30001, "RECORDING NOT FOUND")
    assert api(sim, "recording/download", token, file="nope.wav")["errcode"] == 30001
    assert api(sim, "recording/download", id=rec.id)["errcode"] == 20004
    sim.fail_download_urls = 1
    assert api(sim, "recording/download", token, id=rec.id) == error(30004, "DOWNLOAD FAILED")
    assert api(sim, "recording/download", token, id=rec.id)["errcode"] == 0


def test_link_is_reusable_until_it_expires(make_sim):
    sim = make_sim(resource_ttl_s=60)
    rec = add(sim)
    token = login(sim)
    link = link_for(sim, token, id=rec.id)
    assert fetch(sim, link, token).body == fetch(sim, link, token).body == sim.recording_bytes(
        rec.name)
    other = login(sim)  # links are not bound to the token that asked for them
    assert fetch(sim, link, other).status == 200
    sim.advance_clock(60)
    assert fetch(sim, link, other).json() == error(30002, "RESOURCE NOT FOUND")
    assert fetch(sim, "/api/download/nothing.wav", other).json()["errcode"] == 30002


def test_single_use_link_and_bad_token_do_not_use_it_up(sim):
    rec = add(sim)
    token = login(sim)
    sim.resource_single_use = True
    link = link_for(sim, token, id=rec.id)
    assert fetch(sim, link, "B" * 32).json() == error(20004, "INVALID TOKEN")
    assert fetch(sim, link, token).status == 200
    assert fetch(sim, link, token).json() == error(30002, "RESOURCE NOT FOUND")
    sim.advance_clock(1800)
    assert fetch(sim, link, token).json() == error(20003, "TOKEN EXPIRED")


def test_range_is_ignored_by_default(sim):
    rec = add(sim)
    token = login(sim)
    got = download(sim, token, rec, headers={"Range": "bytes=1000-"})
    assert got.status == 200 and len(got.body) == rec.size_bytes
    assert "Content-Range" not in got.headers


@pytest.mark.parametrize("mode, served_from", [("honour", 1000), ("wrong_offset", 500)])
def test_range_when_switched_on(sim, mode, served_from):
    rec = add(sim)
    data = sim.recording_bytes(rec.name)
    token = login(sim)
    sim.range_mode = mode
    assert sim.honour_range
    got = download(sim, token, rec, headers={"Range": "bytes=1000-"})
    assert got.status == 206 and got.body == data[served_from:]
    assert got.headers["Content-Range"] == (
        f"bytes {served_from}-{rec.size_bytes - 1}/{rec.size_bytes}")
    assert got.headers["Content-Type"] == "audio/x-wav"
    beyond = download(sim, token, rec, headers={"Range": f"bytes={rec.size_bytes}-"})
    assert beyond.status == 416 and beyond.headers["Content-Range"] == f"bytes */{rec.size_bytes}"
    assert download(sim, token, rec).status == 200


def test_a_closed_range_and_the_s_series_alias(sim):
    rec = add(sim)
    token = login(sim)
    sim.honour_range = True
    assert sim.range_mode == "honour"
    middle = download(sim, token, rec, headers={"Range": "bytes=10-19"})
    assert middle.status == 206 and middle.body == sim.recording_bytes(rec.name)[10:20]
    sim.honour_range = False
    assert sim.range_mode == "ignore"


def test_announced_size_exceeds_the_bytes_sent(sim):
    rec = add(sim)
    data = sim.recording_bytes(rec.name)
    token = login(sim)
    sim.announce_size_bytes = 5 * 2**30
    with exchange(sim, "GET", f"{link_for(sim, token, id=rec.id)}?access_token={token}") as got:
        assert got.getheader("Content-Length") == str(5 * 2**30)
        with pytest.raises(http.client.IncompleteRead) as short:
            got.read()
    assert short.value.partial == data


def test_bytes_change_after_n_downloads(sim):
    rec = add(sim)
    token = login(sim)
    link = link_for(sim, token, id=rec.id)
    original = sim.recording_bytes(rec.name)
    sim.mutate_bytes_after_downloads = 1
    assert fetch(sim, link, token).body == original
    changed = fetch(sim, link, token).body
    assert changed != original and len(changed) == len(original) and changed[:44] == original[:44]
    assert sim.recording_bytes(rec.name) == changed and rec.sha256 == hashlib.sha256(
        original).hexdigest()
    sim.reset()  # the counts restart; changed bytes stay changed
    assert fetch(sim, link, token).body == changed


def test_chaos_fails_some_downloads_repeatably(sim):
    rec = add(sim, size_bytes=300_044)
    token = login(sim)
    link = link_for(sim, token, id=rec.id)
    sim.chaos = 0.5

    def outcomes():
        seen = []
        for _ in range(12):
            try:
                got = fetch(sim, link, token)
                seen.append(got.body == sim.recording_bytes(rec.name))
            except (OSError, http.client.HTTPException):
                seen.append(False)
        return seen

    first = outcomes()
    assert any(first) and not all(first)
    sim.reset()
    sim.chaos = 0.5
    assert outcomes() == first


def test_raw_replies_latencies_and_first_byte_delay(sim):
    token = login(sim)
    sim.api_raw_reply = {"recording/list": b'{"errcode":0,"data":[{"id":'}
    assert request(sim, "GET", f"/openapi/v1.0/recording/list?access_token={token}",
                   user_agent=None).body == b'{"errcode":0,"data":[{"id":'
    sim.api_raw_reply = {}
    sim.cdr_latency_s = 0.3
    began = time.monotonic()
    api(sim, "system/information", token)
    assert time.monotonic() - began < 0.25
    api(sim, "recording/search", token)
    assert time.monotonic() - began >= 0.3
    sim.cdr_latency_s, sim.first_byte_delay_s = 0, 0.3
    began = time.monotonic()
    with exchange(sim, "GET", f"/openapi/v1.0/recording/list?access_token={token}") as got:
        headers_after = time.monotonic() - began
        assert json.loads(got.read())["errcode"] == 0
    assert headers_after < 0.25 <= time.monotonic() - began


def _slow_fetch(sim, link, token, results):
    try:
        results.append(fetch(sim, link, token))
    except (OSError, http.client.HTTPException) as exc:
        results.append(exc)


@pytest.mark.parametrize("single", [True, False])
def test_mp3_rule_allows_one_download_at_a_time(sim, single):
    rec = add(sim, size_bytes=40_044)
    token = login(sim)
    sim.mp3_single_download = single
    sim.bandwidth_bps = 80_000  # about half a second
    link = link_for(sim, token, id=rec.id)
    results = []
    thread = threading.Thread(target=_slow_fetch, args=(sim, link, token, results))
    thread.start()
    assert wait_until(lambda: sim.downloaded_bytes() > 0)
    sim.bandwidth_bps = None
    second = fetch(sim, link, token)
    if single:
        assert second.json() == error(30003, "DOWNLOAD BUSY")
    else:
        assert second.body == sim.recording_bytes(rec.name)
    thread.join(timeout=5)
    assert results[0].status == 200 and len(results[0].body) == rec.size_bytes
    # Once the first has ended, the next one runs.
    assert wait_until(lambda: fetch(sim, link, token).headers["Content-Type"] == "audio/x-wav")


def test_reset_after_bytes_breaks_the_connection_mid_body(sim):
    rec = add(sim, seconds=10)
    token = login(sim)
    link = link_for(sim, token, id=rec.id)
    sim.reset_after_bytes, sim.reset_downloads = 50_000, 1
    received = bytearray()
    with exchange(sim, "GET", f"{link}?access_token={token}") as got:
        with pytest.raises((OSError, http.client.HTTPException)):
            while True:
                chunk = got.read(8192)
                if not chunk:
                    raise http.client.IncompleteRead(bytes(received))
                received += chunk
    assert 0 < len(received) <= 50_000 < rec.size_bytes
    assert sim.reset_after_bytes is None  # the counted reset is used up
    assert len(fetch(sim, link, token).body) == rec.size_bytes
    sim.reset_after_bytes = 1000  # and without a count, every download is cut
    for _ in range(2):
        with pytest.raises((OSError, http.client.HTTPException)):
            fetch(sim, link, token)


@pytest.mark.parametrize("mode", ["json", "http500", "html", "truncate", "overlong"])
def test_fail_downloads_modes(sim, mode):
    rec = add(sim)
    token = login(sim)
    link = link_for(sim, token, id=rec.id)
    sim.fail_downloads, sim.fail_mode = 1, mode
    if mode == "truncate":
        with pytest.raises(http.client.IncompleteRead):
            fetch(sim, link, token)
    else:
        got = fetch(sim, link, token)
        if mode == "json":
            assert got.status == 200 and got.json() == error(30004, "DOWNLOAD FAILED")
        elif mode == "http500":
            assert got.status == 500
        elif mode == "html":
            assert got.status == 200 and got.headers["Content-Type"] == "text/html"
        else:
            assert int(got.headers["Content-Length"]) == len(got.body) < rec.size_bytes
    assert sim.fail_downloads == 0
    assert hashlib.sha256(fetch(sim, link, token).body).hexdigest() == rec.sha256


def test_bandwidth_latency_and_refused_connections(sim):
    rec = add(sim, size_bytes=120_044)
    token = login(sim)
    link = link_for(sim, token, id=rec.id)
    sim.bandwidth_bps = 200_000
    began = time.monotonic()
    assert len(fetch(sim, link, token).body) == rec.size_bytes
    assert 0.45 <= time.monotonic() - began <= 2.0
    sim.bandwidth_bps, sim.latency_s = None, 0.3
    began = time.monotonic()
    login(sim)
    assert time.monotonic() - began >= 0.3
    sim.latency_s, sim.refuse_connections = 0, True
    with pytest.raises((OSError, http.client.HTTPException)):
        login(sim)
    assert sim.counters["refused"] == 1
    sim.refuse_connections = False
    login(sim)


def test_audio_variants(sim):
    rec = add(sim)
    token = login(sim)
    sim.audio_content_type, sim.omit_content_length = "audio/wav", True
    got = download(sim, token, rec)
    assert got.headers["Content-Type"] == "audio/wav" and "Content-Length" not in got.headers
    assert got.body == sim.recording_bytes(rec.name)


# --- WebSocket events -------------------------------------------------------------------------


def connect(sim, token, user_agent=UA):
    return WebSocketClient(sim.subscribe_url(token),
                           headers={"User-Agent": user_agent} if user_agent else None)


def subscribe(ws, topics=(30011, 30012)):
    ws.send_json({"topic_list": list(topics)})
    assert json.loads(ws.recv_text(timeout_s=5)) == error(0, "SUCCESS")


def expect_close(ws, timeout_s=3.0):
    """The close frame's (code, reason); fails on any other frame."""
    frame = ws.recv(timeout_s=timeout_s)
    assert frame.opcode == OP_CLOSE, frame
    return parse_close(frame.payload)


@pytest.fixture
def ws_clients():
    opened = []
    yield opened
    for client in opened:
        client.close()


def test_websocket_subscription_delivers_new_cdr_events(sim, ws_clients):
    token = login(sim)
    ws = connect(sim, token)
    ws_clients.append(ws)
    assert ws.response_headers["upgrade"].lower() == "websocket"
    add(sim, announce=True, callto="2000")  # nobody subscribed yet: lost
    subscribe(ws)
    rec = add(sim, announce=True, seconds=12, ring_s=4, did_number="0311112222")
    event = json.loads(ws.recv_text(timeout_s=5))
    assert set(event) == {"type", "sn", "msg"} and event["type"] == 30012 and event["sn"] == sim.sn
    assert isinstance(event["msg"], str)
    msg = json.loads(event["msg"])
    assert {k: msg[k] for k in ("call_id", "call_from", "call_to", "call_duration",
                                "talk_duration", "status", "type", "recording", "did_number")} == {
        "call_id": rec.callid, "call_from": "1001", "call_to": "2002", "call_duration": 16,
        "talk_duration": 12, "status": "ANSWERED", "type": "Inbound", "recording": rec.name,
        "did_number": "0311112222"}
    assert msg["time_start"] == sim.display_time(rec.start_epoch) == "10/03/2024 14:30:00"
    assert sim.counters["subscribe"] == 1 and sim.counters["ws_subscribe"] == 1
    assert wait_until(lambda: sim.counters["ws_push"] == 1)


def test_topics_select_events_and_a_new_list_replaces_the_old(sim, ws_clients):
    token = login(sim)
    ws = connect(sim, token)
    ws_clients.append(ws)
    subscribe(ws, [30011])
    add(sim, announce=True, callto="2001")
    subscribe(ws, [30012])
    later = add(sim, announce=True, callto="2002")
    assert json.loads(json.loads(ws.recv_text(timeout_s=5))["msg"])["recording"] == later.name
    ws.send_text("subscribe me")
    assert json.loads(ws.recv_text(timeout_s=5)) == error(10002, "PARAMETER ERROR")
    ws.send_json({"topic_list": ["30012"]})
    assert json.loads(ws.recv_text(timeout_s=5))["errcode"] == 10002


def test_fragmented_subscription_is_reassembled(sim, ws_clients):
    ws = connect(sim, login(sim))
    ws_clients.append(ws)
    ws.send_frame(OP_TEXT, b'{"topic_list":', fin=False)
    ws.ping(b"between")  # control frames may come between fragments
    ws.send_frame(OP_CONTINUATION, b"[30012]}")
    pong = ws.recv(timeout_s=5)
    assert (pong.opcode, pong.payload) == (OP_PONG, b"between")
    assert json.loads(ws.recv_text(timeout_s=5)) == error(0, "SUCCESS")


def test_refused_upgrades_answer_json(sim):
    token = login(sim)
    with pytest.raises(WebSocketHandshakeError) as bad_token:
        connect(sim, "C" * 32)
    assert bad_token.value.status == 200
    assert json.loads(bad_token.value.body) == error(20004, "INVALID TOKEN")
    with pytest.raises(WebSocketHandshakeError) as no_agent:
        connect(sim, token, user_agent=None)
    assert json.loads(no_agent.value.body)["errcode"] == 10004
    plain = request(sim, "GET", f"/openapi/v1.0/subscribe?access_token={token}")
    assert plain.json() == error(10002, "PARAMETER ERROR")
    assert sim.websocket_count() == 0


def test_heartbeat_and_ping_are_answered(sim, ws_clients):
    ws = connect(sim, login(sim))
    ws_clients.append(ws)
    ws.send_text("heartbeat")
    assert ws.recv_text(timeout_s=5) == "heartbeat response"
    ws.ping(b"abc")
    frame = ws.recv(timeout_s=5)
    assert (frame.opcode, frame.payload) == (OP_PONG, b"abc")


def test_silent_connection_is_dropped_after_the_idle_timeout(sim, ws_clients):
    ws = connect(sim, login(sim))
    ws_clients.append(ws)
    subscribe(ws)
    sim.advance_clock(59)
    ws.ping()
    assert ws.recv(timeout_s=5).opcode == OP_PONG  # the ping restarted the idle timer
    sim.advance_clock(59)
    with pytest.raises(socket.timeout):
        ws.recv(timeout_s=0.2)
    sim.advance_clock(1)
    assert expect_close(ws) == (1000, "IDLE TIMEOUT")
    assert wait_until(lambda: sim.websocket_count() == 0)


def test_heartbeats_keep_a_connection_alive_in_real_time(make_sim, ws_clients):
    sim = make_sim(ws_idle_timeout_s=0.4)
    ws = connect(sim, login(sim))
    ws_clients.append(ws)
    began = time.monotonic()
    while time.monotonic() - began < 0.9:
        ws.send_text("heartbeat")
        last_beat = time.monotonic()
        assert ws.recv_text(timeout_s=2) == "heartbeat response"
        time.sleep(0.15)
    assert expect_close(ws) == (1000, "IDLE TIMEOUT")
    assert 0.35 <= time.monotonic() - last_beat <= 1.5


def test_subscription_ends_with_its_access_token(sim, ws_clients):
    pair = get_pair(sim)
    ws = connect(sim, pair["access_token"])
    ws_clients.append(ws)
    subscribe(ws)
    sim.advance_clock(1800)
    assert expect_close(ws) == (1008, "TOKEN EXPIRED")
    # Renewal revokes the old access token: its subscription ends too.
    pair = get_pair(sim)
    ws = connect(sim, pair["access_token"])
    ws_clients.append(ws)
    refresh(sim, pair["refresh_token"])
    assert expect_close(ws) == (1008, "INVALID TOKEN")


def test_drop_websockets_cuts_connections_and_clients_reconnect(sim, ws_clients):
    token = login(sim)
    ws = connect(sim, token)
    ws_clients.append(ws)
    subscribe(ws)
    assert wait_until(lambda: sim.websocket_count() == 1)
    sim.drop_websockets()
    with pytest.raises((WebSocketClosed, OSError)):
        ws.recv(timeout_s=3)
    assert wait_until(lambda: sim.websocket_count() == 0)
    again = connect(sim, token)
    ws_clients.append(again)
    subscribe(again)
    rec = add(sim, announce=True)
    assert json.loads(json.loads(again.recv_text(timeout_s=5))["msg"])["recording"] == rec.name


def test_unmasked_client_frames_are_a_protocol_error(sim, ws_clients):
    ws = connect(sim, login(sim))
    ws_clients.append(ws)
    ws.send_frame(OP_PING, b"x", mask=False)
    assert expect_close(ws)[0] == 1002


def test_client_close_is_echoed_and_stop_says_going_away(sim, ws_clients):
    token = login(sim)
    ws = connect(sim, token)
    ws.send_frame(OP_CLOSE, b"\x03\xe8bye")
    assert expect_close(ws)[0] == 1000
    ws.sock.close()
    other = connect(sim, token)
    ws_clients.append(other)
    began = time.monotonic()
    sim.stop()
    assert expect_close(other) == (1001, "PBX STOPPING")
    assert time.monotonic() - began < 1.0


# --- webhook ---------------------------------------------------------------------------------


def test_webhook_receives_each_event_until_it_answers_2xx(make_sim, receiver):
    app = receiver(statuses=[500, 204])
    sim = make_sim(webhook_url=f"http://127.0.0.1:{app.port}/yeastar/events", event_retry_s=0.05)
    rec = add(sim, announce=True)  # no token needed: the webhook is configured on the PBX
    assert wait_until(lambda: len(app.received) == 2)
    holds_for(lambda: len(app.received) == 2, 0.2, message="no push after the 2xx")
    assert sim.counters["event_push"] == 2
    path, headers, event = app.received[-1]
    assert path == "/yeastar/events" and headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "Yeastar-PBX-Webhook"
    assert event["type"] == 30012 and json.loads(event["msg"])["recording"] == rec.name
    assert event == app.received[0][2]


def test_webhook_gives_up_after_three_resends(make_sim, receiver):
    app = receiver(statuses=[500] * 10)
    sim = make_sim(webhook_url=f"http://127.0.0.1:{app.port}/", event_retry_s=0.05)
    add(sim, announce=True)
    assert wait_until(lambda: len(app.received) == 4)
    holds_for(lambda: len(app.received) == 4, 0.3, message="no push after the third resend")
    assert sim.counters["event_push"] == 4


# --- TLS and observation ----------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path, require):
    require(shutil.which("openssl"), "openssl is not installed (needed for a test certificate)")
    cert, key = tmp_path / "pbx.pem", tmp_path / "pbx.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return str(cert), str(key)


def test_https_and_wss_share_one_port(make_sim, certificate, ws_clients):
    sim = make_sim(certfile=certificate[0], keyfile=certificate[1])
    assert sim.base_url.startswith("https://") and sim.subscribe_url("t").startswith("wss://")
    rec = add(sim)
    token = login(sim)
    assert download(sim, token, rec).body == sim.recording_bytes(rec.name)
    ws = connect(sim, token)
    ws_clients.append(ws)
    subscribe(ws)
    announced = add(sim, announce=True, callto="2003")
    assert json.loads(json.loads(ws.recv_text(timeout_s=5))["msg"])["recording"] == announced.name


def test_counters_log_and_reset(sim):
    rec = add(sim)
    token = login(sim)
    download(sim, token, rec)
    assert (sim.counters["get_token"], sim.counters["recording/download"],
            sim.counters["download"]) == (1, 1, 1)
    entry = sim.requests_log[-1]
    assert entry["endpoint"] == "download" and entry["method"] == "GET"
    assert entry["client_ip"] == "127.0.0.1" and entry["query"] == {"access_token": token}
    assert sim.requests_log[0]["body"]["username"] == "api"
    sim.latency_s, sim.fail_downloads, sim.range_mode = 1.0, 3, "honour"
    sim.resource_single_use = sim.mp3_single_download = True
    sim.chaos, sim.clock_offset_s, sim.api_raw_reply = 1.0, 60, {"get_token": b"{}"}
    sim.lock_ip()
    sim.reset()
    assert not sim.counters and not sim.requests_log and sim.downloaded_bytes() == 0
    assert (sim.latency_s, sim.fail_downloads, sim.range_mode) == (0, 0, "ignore")
    assert not sim.resource_single_use and not sim.mp3_single_download
    assert (sim.chaos, sim.clock_offset_s, sim.api_raw_reply) == (0, 0, {})
    assert api(sim, "recording/list", token)["errcode"] == 0  # tokens survive
    login(sim)  # and the lockout is gone
    assert rec.name in sim.recordings


def test_stop_is_quick_during_a_slow_download(sim):
    rec = add(sim, seconds=10)
    token = login(sim)
    link = link_for(sim, token, id=rec.id)
    sim.bandwidth_bps = 10_000
    results = []
    thread = threading.Thread(target=_slow_fetch, args=(sim, link, token, results))
    thread.start()
    assert wait_until(lambda: sim.downloaded_bytes() > 0)
    began = time.monotonic()
    sim.stop()
    assert time.monotonic() - began < 1.0
    thread.join(timeout=5)
    assert not thread.is_alive()

