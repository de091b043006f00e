"""The PBX simulator against its contract (yeastar-api.md §12), over real HTTP and TCP.

Other tests trust the simulator; these prove it deserves that trust.
"""

from __future__ import annotations

import datetime
import email.utils
import gzip
import hashlib
import http.client
import io
import json
import shutil
import socket
import subprocess
import threading
import time
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import pytest
import requests
from harness import holds_for

from yeastarfs.sim.sseries import CDR_COLUMNS, Simulator, wav_bytes

START = datetime.datetime(2024, 3, 10, 14, 30, 0)
HEX32 = set("0123456789abcdef")


@pytest.fixture
def sim():
    with Simulator() as simulator:
        yield simulator


@pytest.fixture
def make_sim():
    """Start simulators with custom settings; all are stopped at the end."""
    started = []

    def make(**kwargs):
        simulator = Simulator(**kwargs).start()
        started.append(simulator)
        return simulator

    yield make
    for simulator in started:
        simulator.stop()


def api(sim, endpoint, body=None, token=None, version="v2.0.0"):
    params = {"token": token} if token else None
    reply = requests.post(f"{sim.base_url}/api/{version}/{endpoint}", params=params,
                          json=body if body is not None else {}, timeout=5)
    assert reply.status_code == 200
    return reply.json()


def login(sim, **extra):
    reply = api(sim, "login", {"username": "api", "password": sim.password_md5, **extra})
    assert reply["status"] == "Success", reply
    return reply["token"]


def get_random(sim, token, name):
    reply = api(sim, "recording/get_random", {"recording": name}, token)
    assert reply["status"] == "Success", reply
    return reply["random"]


def download(sim, token, name, random_value=None, headers=None, stream=False):
    if random_value is None:
        random_value = get_random(sim, token, name)
    url = (f"{sim.base_url}/api/v2.0.0/recording/download?recording={quote(name, safe='')}"
           f"&random={random_value}&token={token}")
    return requests.get(url, headers=headers, timeout=10, stream=stream)


def add(sim, seconds=2.0, **kwargs):
    kwargs.setdefault("start", START)
    kwargs.setdefault("announce", False)
    return sim.add_recording(duration_s=seconds, **kwargs)


def wait_until(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# --- login, lockout, tokens ------------------------------------------------------------


def test_login_returns_token_transport_and_boa_headers(sim):
    reply = requests.post(f"{sim.base_url}/api/v2.0.0/login",
                          json={"username": "api", "password": sim.password_md5}, timeout=5)
    body = reply.json()
    assert body["status"] == "Success" and body["transport"] == "HTTP"
    assert len(body["token"]) == 32 and set(body["token"]) <= HEX32
    assert reply.headers["Server"] == "Boa/0.94.14rc21"
    assert reply.headers["Connection"] == "close"
    assert reply.headers["Accept-Ranges"] == "bytes"
    assert reply.headers["Access-control-allow-origin"] == "*"
    assert reply.headers["Access-control-allow-methods"] == "GET, POST, OPTIONS, PUT, DELETE"


def test_wrong_password_gives_20003(sim):
    assert api(sim, "login", {"username": "api", "password": "0" * 32}) == {
        "status": "Failed", "errno": "20003"}
    stranger = {"username": "nobody", "password": sim.password_md5}
    assert api(sim, "login", stranger)["errno"] == "20003"
    # The clear-text password is not the HTTP login secret.
    assert api(sim, "login", {"username": "api", "password": "secret"})["errno"] == "20003"


def test_five_failures_lock_the_ip_until_unlocked(sim):
    bad = {"username": "api", "password": "0" * 32}
    assert [api(sim, "login", bad)["errno"] for _ in range(5)] == ["20003"] * 5
    good = {"username": "api", "password": sim.password_md5}
    assert api(sim, "login", good) == {"status": "Failed", "errno": "20002"}
    sim.unlock_all()
    assert api(sim, "login", good)["status"] == "Success"
    sim.lock_ip("127.0.0.1")
    assert api(sim, "login", good)["errno"] == "20002"


def test_success_resets_the_failure_count(sim):
    bad = {"username": "api", "password": "0" * 32}
    for _ in range(4):
        api(sim, "login", bad)
    login(sim)
    for _ in range(4):
        assert api(sim, "login", bad)["errno"] == "20003"
    login(sim)


def test_lockout_expires(make_sim):
    sim = make_sim(lockout_s=0.3)
    sim.lock_ip()
    assert api(sim, "login", {"username": "api", "password": sim.password_md5})["errno"] == "20002"
    sim.advance_clock(0.29)
    assert api(sim, "login", {"username": "api", "password": sim.password_md5})["errno"] == "20002"
    sim.advance_clock(0.02)
    login(sim)


def test_token_dies_when_idle_and_calls_renew_it(make_sim):
    sim = make_sim(token_idle_s=0.4)
    token = login(sim)
    for _ in range(3):  # 0.75 s in all, but never 0.4 s idle
        sim.advance_clock(0.25)
        assert api(sim, "heartbeat", {}, token)["status"] == "Success"
    sim.advance_clock(0.41)
    assert api(sim, "heartbeat", {}, token) == {"status": "Failed", "errno": "20004"}


def test_token_errors_logout_and_concurrent_tokens(sim):
    assert api(sim, "heartbeat", {}) == {"status": "Failed", "errno": "20005"}
    assert api(sim, "heartbeat", {}, "f" * 32)["errno"] == "20004"
    first, second = login(sim), login(sim)
    assert first != second
    assert api(sim, "heartbeat", {}, first)["status"] == "Success"  # a new login keeps old tokens
    assert api(sim, "logout", None, first)["status"] == "Success"
    assert api(sim, "heartbeat", {}, first)["errno"] == "20004"
    assert api(sim, "logout", None, first)["errno"] == "20004"
    sim.expire_all_tokens()
    assert api(sim, "heartbeat", {}, second)["errno"] == "20004"


def test_request_conventions(sim):
    token = login(sim)
    # Any version segment, an empty heartbeat body, a GET heartbeat.
    assert api(sim, "login", {"username": "api", "password": sim.password_md5},
               version="v1.10")["status"] == "Success"
    empty = requests.post(f"{sim.base_url}/api/v2.0.0/heartbeat?token={token}", timeout=5)
    assert empty.json() == {"status": "Success"}
    assert requests.get(f"{sim.base_url}/api/v2.0.0/heartbeat?token={token}",
                        timeout=5).json()["status"] == "Success"
    assert api(sim, "cdr/query", {}, token) == {"status": "Failed", "errno": "10003"}
    not_json = requests.post(f"{sim.base_url}/api/v2.0.0/login", data=b"username=api", timeout=5)
    assert not_json.status_code == 200 and not_json.json()["errno"] == "20000"
    get_login = requests.get(f"{sim.base_url}/api/v2.0.0/login", timeout=5)
    assert get_login.json()["errno"] == "20001"
    assert requests.get(f"{sim.base_url}/index.html", timeout=5).status_code == 404


# --- recordings ------------------------------------------------------------------------


def test_get_random_errors(sim):
    token = login(sim)
    hidden = add(sim, stored=False)
    assert api(sim, "recording/get_random", {}, token) == {"status": "Failed", "errno": "10004"}
    assert api(sim, "recording/get_random", {"recording": "nope.wav"}, token)["errno"] == "10023"
    assert api(sim, "recording/get_random", {"recording": hidden.name}, token)["errno"] == "10023"
    assert api(sim, "recording/get_random", {"recording": hidden.name})["errno"] == "20005"


def test_download_returns_the_recording(sim):
    rec = add(sim, seconds=3)
    token = login(sim)
    reply = api(sim, "recording/get_random", {"recording": rec.name}, token)
    assert reply["recording"] == rec.name and len(reply["random"]) == 32
    got = download(sim, token, rec.name, reply["random"])
    assert got.status_code == 200
    assert got.headers["Content-Type"] == "audio/x-wav"
    assert int(got.headers["Content-Length"]) == rec.size_bytes == 44 + 3 * 16000
    assert hashlib.sha256(got.content).hexdigest() == rec.sha256
    assert got.content == sim.recording_bytes(rec.name)
    assert sim.downloaded_bytes() == rec.size_bytes


def test_download_accepts_any_parameter_order_and_hostile_names(sim):
    rec = add(sim, name="a b&c+d#e%f=ü?.wav")
    token = login(sim)
    random_value = get_random(sim, token, rec.name)
    url = (f"{sim.base_url}/api/v2.0.0/recording/download?token={token}"
           f"&random={random_value}&recording={quote(rec.name, safe='')}")
    got = requests.get(url, timeout=5)
    assert hashlib.sha256(got.content).hexdigest() == rec.sha256


def test_random_is_single_use_and_bound_to_its_recording(sim):
    first, second = add(sim), add(sim, callfrom="1002")
    token = login(sim)
    random_value = get_random(sim, token, first.name)
    assert download(sim, token, first.name, random_value).status_code == 200
    reused = download(sim, token, first.name, random_value)
    assert reused.status_code == 200
    assert reused.json() == {"status": "Failed", "errno": "10004"}
    wrong = download(sim, token, second.name, get_random(sim, token, first.name))
    assert wrong.json()["errno"] == "10004"
    unchecked = get_random(sim, token, first.name)
    assert download(sim, "f" * 32, first.name, unchecked).json()["errno"] == "20004"
    # A refused token does not use up the random.
    assert download(sim, token, first.name, unchecked).status_code == 200


def test_random_expires(make_sim):
    sim = make_sim(random_ttl_s=0.2)
    rec = add(sim)
    token = login(sim)
    random_value = get_random(sim, token, rec.name)
    sim.advance_clock(0.21)
    assert download(sim, token, rec.name, random_value).json()["errno"] == "10004"


def test_range_is_ignored_by_default(sim):
    rec = add(sim)
    token = login(sim)
    got = download(sim, token, rec.name, headers={"Range": "bytes=1000-"})
    assert got.status_code == 200 and len(got.content) == rec.size_bytes
    assert "Content-Range" not in got.headers


def test_range_is_honoured_when_switched_on(sim):
    rec = add(sim)
    data = sim.recording_bytes(rec.name)
    token = login(sim)
    sim.honour_range = True
    got = download(sim, token, rec.name, headers={"Range": "bytes=1000-"})
    assert got.status_code == 206
    assert got.headers["Content-Range"] == f"bytes 1000-{rec.size_bytes - 1}/{rec.size_bytes}"
    assert got.content == data[1000:]
    beyond = download(sim, token, rec.name, headers={"Range": f"bytes={rec.size_bytes}-"})
    assert beyond.status_code == 416
    assert beyond.headers["Content-Range"] == f"bytes */{rec.size_bytes}"
    assert download(sim, token, rec.name).status_code == 200  # no Range: whole file


def test_reset_after_bytes_breaks_the_connection_mid_body(sim):
    rec = add(sim, seconds=10)
    token = login(sim)
    sim.reset_after_bytes, sim.reset_downloads = 50_000, 1
    got = download(sim, token, rec.name, stream=True)
    received = bytearray()
    with pytest.raises(requests.exceptions.RequestException):
        for chunk in got.iter_content(8192):
            received += chunk
    assert 0 < len(received) <= 50_000 < rec.size_bytes
    assert sim.reset_after_bytes is None  # the counted reset is used up
    assert len(download(sim, token, rec.name).content) == rec.size_bytes


def test_reset_every_download_when_count_is_zero(sim):
    rec = add(sim)
    token = login(sim)
    sim.reset_after_bytes = 1000
    for _ in range(2):
        with pytest.raises(requests.exceptions.RequestException):
            download(sim, token, rec.name).content


@pytest.mark.parametrize("mode", ["json", "http500", "html", "truncate", "overlong"])
def test_fail_downloads_modes(sim, mode):
    rec = add(sim)
    token = login(sim)
    sim.fail_downloads, sim.fail_mode = 1, mode
    if mode == "truncate":
        with pytest.raises(requests.exceptions.RequestException):
            download(sim, token, rec.name).content
    else:
        got = download(sim, token, rec.name)
        if mode == "json":
            assert got.status_code == 200 and got.json() == {"status": "Failed", "errno": "10004"}
        elif mode == "http500":
            assert got.status_code == 500
        elif mode == "html":
            assert got.status_code == 200 and got.headers["Content-Type"] == "text/html"
        else:
            assert int(got.headers["Content-Length"]) < rec.size_bytes
    assert sim.fail_downloads == 0
    assert hashlib.sha256(download(sim, token, rec.name).content).hexdigest() == rec.sha256


def test_fail_get_random(sim):
    rec = add(sim)
    token = login(sim)
    sim.fail_get_random = 1
    assert api(sim, "recording/get_random", {"recording": rec.name}, token)["errno"] == "10004"
    get_random(sim, token, rec.name)


def test_bandwidth_limits_the_rate(sim):
    rec = add(sim, size_bytes=120_044)
    token = login(sim)
    sim.bandwidth_bps = 200_000
    began = time.monotonic()
    assert len(download(sim, token, rec.name).content) == rec.size_bytes
    assert 0.45 <= time.monotonic() - began <= 2.0


def test_latency_and_refused_connections(sim):
    sim.latency_s = 0.3
    began = time.monotonic()
    login(sim)
    assert time.monotonic() - began >= 0.3
    sim.latency_s = 0
    sim.refuse_connections = True
    with pytest.raises(requests.exceptions.ConnectionError):
        login(sim)
    assert sim.counters["refused"] == 1
    sim.refuse_connections = False
    login(sim)


def test_stop_is_quick_during_a_slow_download(sim):
    rec = add(sim, seconds=10)
    token = login(sim)
    sim.bandwidth_bps = 10_000
    thread = threading.Thread(
        target=lambda: _swallow(lambda: download(sim, token, rec.name).content))
    thread.start()
    assert wait_until(lambda: sim.downloaded_bytes() > 0)
    began = time.monotonic()
    sim.stop()
    assert time.monotonic() - began < 1.0
    thread.join(timeout=5)
    assert not thread.is_alive()


def _swallow(action):
    try:
        action()
    except requests.exceptions.RequestException:
        pass


# --- audio and names -------------------------------------------------------------------


def test_wav_is_valid_pcm_8khz_mono(sim):
    rec = add(sim, seconds=2.5)
    with wave.open(io.BytesIO(sim.recording_bytes(rec.name))) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 8000)
        assert wav.getnframes() == 2.5 * 8000
        assert len(wav.readframes(wav.getnframes())) == 2.5 * 16000


def test_recordings_differ_and_size_override_is_exact(sim):
    first, second = add(sim), add(sim, callto="2003")
    assert first.size_bytes == second.size_bytes and first.sha256 != second.sha256
    odd = add(sim, callto="2004", size_bytes=1001)
    assert len(sim.recording_bytes(odd.name)) == 1001


def test_ffprobe_accepts_the_wav(sim, tmp_path, require):
    require(shutil.which("ffprobe"), "ffprobe is not installed (scripts/setup installs ffmpeg)")
    rec = add(sim, seconds=1)
    path = tmp_path / "x.wav"
    path.write_bytes(sim.recording_bytes(rec.name))
    out = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-of", "json", str(path)],
                         capture_output=True, text=True, check=True, timeout=10)
    stream = json.loads(out.stdout)["streams"][0]
    assert stream["codec_name"] == "pcm_s16le" and stream["sample_rate"] == "8000"


def test_twenty_megabytes_are_generated_fast():
    began = time.perf_counter()
    data = wav_bytes("big.wav", 20_000_044)
    assert time.perf_counter() - began < 0.2
    assert len(data) == 20_000_044 and data[:4] == b"RIFF" and data[8:12] == b"WAVE"


def test_names_and_cdr_fields_follow_the_contract(sim):
    rec = add(sim, seconds=30.4, callfrom="0612345678", callto="1001", ring_s=22)
    assert rec.callid.endswith(".1") and rec.callid.split(".")[0].isdigit()
    assert rec.name == f"20240310143022-{rec.callid}-0612345678-1001-Inbound.wav"
    assert (rec.timestart, rec.talk_s, rec.call_s) == ("2024-03-10 14:30:00", 30, 52)
    row = rec.cdr_row()
    assert list(row) == list(CDR_COLUMNS) and row["recording"] == rec.name
    with pytest.raises(ValueError):
        add(sim, seconds=30.4, callfrom="0612345678", callto="1001", ring_s=22,
            callid=rec.callid)


def test_populate_is_deterministic_and_unannounced(make_sim):
    now = datetime.datetime(2024, 3, 10, 12, 0, 0)
    first, second = make_sim(), make_sim()
    login(first, port=1)  # a target that would fail loudly if anything were announced
    recs = first.populate(20, days=3, now=now, seed=7)
    assert [r.name for r in recs] == [r.name for r in second.populate(20, days=3, now=now, seed=7)]
    assert len(first.recordings) == 20
    earliest = (now - datetime.timedelta(days=3)).strftime("%Y-%m-%d %H:%M:%S")
    assert all(earliest <= r.timestart < now.strftime("%Y-%m-%d %H:%M:%S") for r in recs)
    assert all(5 <= r.talk_s <= 120 for r in recs)
    assert [r.timestart for r in recs] == sorted(r.timestart for r in recs)
    holds_for(lambda: first.counters["event_push"] == 0, 0.1, message="no event pushed")


# --- CDR -------------------------------------------------------------------------------


def cdr_link(sim, token, number, start, end, encode_space="%20"):
    """The cdr/download path (query included) after a successful cdr/get_random."""
    reply = api(sim, "cdr/get_random", {"number": number, "starttime": start, "endtime": end},
                token)
    assert reply["status"] == "Success", reply
    assert (reply["number"], reply["starttime"], reply["endtime"]) == (number, start, end)

    def enc(value):
        return quote(value, safe="").replace("%20", encode_space)

    return (f"/api/v2.0.0/cdr/download?number={enc(number)}&starttime={enc(start)}"
            f"&endtime={enc(end)}&token={token}&random={reply['random']}")


def cdr(sim, token, number, start, end, encode_space="%20"):
    return requests.get(sim.base_url + cdr_link(sim, token, number, start, end, encode_space),
                        timeout=5)


def cdr_names(sim, token, start="2024-03-10 00:00:00", end="2024-03-10 23:59:59"):
    """The recording column of every CDR row in the window, number "all"."""
    lines = cdr(sim, token, "all", start, end).text.splitlines()
    column = lines[0].split(",").index("recording")
    return [line.split(",")[column] for line in lines[1:]]


def test_cdr_csv_header_rows_and_window(sim):
    late = add(sim, start=START + datetime.timedelta(hours=1), callfrom="1005")
    early = add(sim, start=START, callfrom="1005")
    add(sim, start=START - datetime.timedelta(days=1), callfrom="1005")  # outside the window
    add(sim, start=START, callfrom="1006", callto="1007")  # another number
    add(sim, start=START, callfrom="1005", callto="1008", in_cdr=False)
    sim.add_cdr_row({"callid": "9.9", "timestart": "2024-03-10 15:00:00", "callfrom": "1005",
                     "callto": "110", "status": "NO ANSWER", "type": "Outbound"})
    token = login(sim)
    got = cdr(sim, token, "1005", "2024-03-10 00:00:00", "2024-03-10 23:59:59")
    assert got.status_code == 200 and got.headers["Content-Type"] == "text/csv"
    text = got.content.decode("utf-8")
    assert not text.startswith("\ufeff") and "\r" not in text and '"' not in text
    lines = text.split("\n")
    assert lines[0] == ("callid,timestart,callfrom,callto,callduraction,talkduraction,"
                        "srctrunkname,dsttrunkname,status,type,pincode,recording,didnumber,sn")
    assert lines[-1] == ""
    rows = [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:-1]]
    assert [r["callid"] for r in rows] == [early.callid, "9.9", late.callid]
    assert rows[0]["recording"] == early.name and rows[1]["recording"] == ""
    assert all(len(line.split(",")) == 14 for line in lines[:-1])


def test_cdr_number_all_lists_and_plus_encoding(sim):
    add(sim, callfrom="1001")
    add(sim, callfrom="1002")
    add(sim, callfrom="3000", callto="3001")
    token = login(sim)
    got = cdr(sim, token, "all", "2024-03-10 00:00:00", "2024-03-11 00:00:00", encode_space="+")
    assert len(got.text.splitlines()) == 4
    got = cdr(sim, token, "1001,3001", "2024-03-10 00:00:00", "2024-03-11 00:00:00")
    assert len(got.text.splitlines()) == 3
    empty = cdr(sim, token, "all", "2020-01-01 00:00:00", "2020-01-02 00:00:00")
    assert empty.text == ",".join(CDR_COLUMNS) + "\n"


def test_cdr_random_rules(sim):
    token = login(sim)
    assert api(sim, "cdr/get_random", {"number": "all"}, token)["errno"] == "10004"
    body = {"extid": "all", "starttime": "2024-03-10 00:00:00", "endtime": "2024-03-11 00:00:00"}
    reply = api(sim, "cdr/get_random", body, token)
    assert reply["extid"] == "all"
    url = f"{sim.base_url}/api/v2.0.0/cdr/download?token={token}&random={reply['random']}"
    first = requests.post(url, timeout=5)  # POST with an empty body works too
    assert first.text.startswith("callid,")
    assert requests.get(url, timeout=5).json() == {"status": "Failed", "errno": "10004"}


# --- events ----------------------------------------------------------------------------


class EventReceiver:
    """A local application server that records NewCdr POSTs and answers scripted statuses."""

    def __init__(self, statuses=()):
        self.statuses = list(statuses)
        self.received = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((self.path, dict(self.headers), json.loads(body)))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(statuses=()):
        made.append(EventReceiver(statuses))
        return made[-1]

    yield make
    for item in made:
        item.close()


@pytest.mark.parametrize("version,key", [("2.0.0", "event"), (None, "action")])
def test_http_event_key_depends_on_login_version(sim, receiver, version, key):
    app = receiver()
    extra = {"port": str(app.port), "url": "yeastar"}
    if version:
        extra["version"] = version
    login(sim, **extra)
    rec = add(sim, announce=True)
    assert wait_until(lambda: len(app.received) == 1)
    path, headers, event = app.received[0]
    assert path == "/yeastar"
    assert headers["User-Agent"] == "WebAPI" and headers["Content-Type"] == "application/json"
    assert headers["Accept"] == "application/json"
    assert event[key] == "NewCdr" and ({"event", "action"} - {key}).isdisjoint(event)
    assert event["recording"] == rec.name and event["callid"] == rec.callid
    assert event["callduraction"] == str(rec.call_s) and "dsttrcunkname" in event
    assert all(isinstance(value, str) for value in event.values())
    assert sim.counters["event_push"] == 1


def test_http_event_is_resent_until_200(make_sim, receiver):
    sim = make_sim(event_retry_s=0.05)
    app = receiver(statuses=[500, 404])
    login(sim, port=app.port, version="2.0.0")  # port as an integer works too
    add(sim, announce=True)
    assert wait_until(lambda: len(app.received) == 3)
    holds_for(lambda: len(app.received) == 3, 0.2, message="no fourth push after the 200")
    assert sim.counters["event_push"] == 3


def test_http_event_gives_up_after_three_resends(make_sim, receiver):
    sim = make_sim(event_retry_s=0.05)
    app = receiver(statuses=[500] * 10)
    login(sim, port=app.port)
    add(sim, announce=True)
    assert wait_until(lambda: len(app.received) == 4)
    holds_for(lambda: len(app.received) == 4, 0.3, message="no push after the third resend")
    assert sim.counters["event_push"] == 4


def test_heartbeat_moves_the_target_and_dead_tokens_get_no_events(sim, receiver):
    old, new = receiver(), receiver()
    token = login(sim, port=old.port, version="2.0.0")
    api(sim, "heartbeat", {"ipaddr": "127.0.0.1", "port": new.port, "version": "2.0.0"}, token)
    add(sim, announce=True)
    assert wait_until(lambda: len(new.received) == 1)
    sim.expire_all_tokens()
    add(sim, callto="2009", announce=True)
    holds_for(lambda: len(new.received) == 1 and not old.received, 0.2, message="no event for a dead token")


def tcp_login(sim, secret, version="2.0.0"):
    conn = socket.create_connection(("127.0.0.1", sim.tcp_port), timeout=5)
    block = f"Action: login\r\nUsername: api\r\nSecret: {secret}\r\n"
    if version:
        block += f"Version: {version}\r\n"
    conn.sendall((block + "\r\n").encode())
    return conn, _read_until(conn, b"\r\n\r\n")


def _read_until(conn, end):
    data = b""
    while end not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _read_events(conn, count):
    """*count* JSON objects, each followed by CRLF, from the TCP event stream."""
    data = b""
    while data.count(b"}\r\n") < count:
        chunk = conn.recv(4096)
        assert chunk, "event stream closed early"
        data += chunk
    return [json.loads(line) for line in data.split(b"\r\n") if line]


def test_tcp_events(make_sim):
    sim = make_sim(transport="TCP")
    assert sim.tcp_port and api(sim, "login", {"username": "api", "password": sim.password_md5})[
        "transport"] == "TCP"
    conn, reply = tcp_login(sim, sim.password_md5)  # the MD5 is wrong here: clear text wanted
    assert reply == b"Response: Failed\r\n\r\n" and conn.recv(100) == b""
    conn.close()
    conn, reply = tcp_login(sim, "secret")
    assert reply == b"Response: Success\r\n\r\n"
    assert wait_until(lambda: sim.counters["tcp_login"] == 2)
    first = add(sim, announce=True)
    second = add(sim, callto="2003", announce=True)
    events = _read_events(conn, 2)
    assert [e["recording"] for e in events] == [first.name, second.name]
    assert all(e["event"] == "NewCdr" for e in events)
    conn.close()


def test_tcp_v1_key_and_disconnect(make_sim):
    sim = make_sim(transport="TCP")
    conn, reply = tcp_login(sim, "secret", version=None)
    assert reply == b"Response: Success\r\n\r\n"
    add(sim, announce=True)
    assert _read_events(conn, 1)[0]["action"] == "NewCdr"
    sim.disconnect_tcp_clients()
    assert conn.recv(100) == b""
    conn.close()


# --- observation -----------------------------------------------------------------------


def test_counters_log_and_reset(sim):
    rec = add(sim)
    token = login(sim)
    download(sim, token, rec.name)
    api(sim, "heartbeat", {}, token)
    assert sim.counters["login"] == 1 and sim.counters["recording/get_random"] == 1
    assert sim.counters["recording/download"] == 1 and sim.counters["heartbeat"] == 1
    entry = sim.requests_log[-1]
    assert entry["endpoint"] == "heartbeat" and entry["method"] == "POST"
    assert entry["client_ip"] == "127.0.0.1" and entry["query"] == {"token": token}
    assert sim.requests_log[0]["body"]["username"] == "api"
    sim.latency_s, sim.fail_downloads = 1.0, 3
    sim.reset()
    assert not sim.counters and not sim.requests_log and sim.downloaded_bytes() == 0
    assert sim.latency_s == 0 and sim.fail_downloads == 0
    assert api(sim, "heartbeat", {}, token)["status"] == "Success"  # tokens survive
    assert rec.name in sim.recordings


# --- site variants: zone and clock -------------------------------------------------------

UTC = datetime.timezone.utc
KOLKATA = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
NEW_YORK_WINTER = datetime.timezone(datetime.timedelta(hours=-5))


def date_header(response_headers):
    return email.utils.parsedate_to_datetime(response_headers["Date"])


def test_pbx_zone_shapes_names_cdr_and_events(make_sim, receiver):
    sim = make_sim(tz=KOLKATA)
    app = receiver()
    token = login(sim, port=app.port, version="2.0.0")
    instant = datetime.datetime(2024, 3, 10, 9, 0, 0, tzinfo=UTC)  # 14:30 in Kolkata
    rec = add(sim, start=instant, ring_s=5, announce=True)
    assert rec.timestart == "2024-03-10 14:30:00"
    assert rec.name.startswith("20240310143005-") and rec.callid == f"{int(instant.timestamp())}.1"
    assert wait_until(lambda: len(app.received) == 1)
    assert app.received[0][2]["timestart"] == "2024-03-10 14:30:00"
    # A naive time is the PBX's wall time; its callid is still the true instant.
    naive = add(sim, start=datetime.datetime(2024, 3, 10, 14, 30), callfrom="1009")
    assert naive.timestart == "2024-03-10 14:30:00"
    assert naive.callid.split(".")[0] == str(int(instant.timestamp()))
    # CDR windows are PBX-local: the UTC hour of the calls finds nothing.
    local = cdr_names(sim, token, "2024-03-10 14:00:00", "2024-03-10 15:00:00")
    assert sorted(local) == sorted([rec.name, naive.name])
    assert cdr_names(sim, token, "2024-03-10 08:30:00", "2024-03-10 09:30:00") == []


def test_default_zone_and_naive_callids_are_as_before(sim):
    rec = add(sim, start=START)
    assert rec.timestart == "2024-03-10 14:30:00"
    assert rec.callid.split(".")[0] == str(int(START.replace(tzinfo=UTC).timestamp()))
    aware = add(sim, start=START.replace(tzinfo=UTC), callfrom="1003")
    assert aware.timestart == START.replace(tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def test_clock_offset_moves_local_times_and_the_date_header(make_sim):
    sim = make_sim(tz=NEW_YORK_WINTER)
    true_now = datetime.datetime.now(UTC)
    reply = requests.get(f"{sim.base_url}/api/v2.0.0/heartbeat", timeout=5)
    assert abs((date_header(reply.headers) - true_now).total_seconds()) <= 2
    sim.clock_offset_s = 420  # the PBX's clock is 7 minutes fast
    true_now = datetime.datetime.now(UTC)
    reply = requests.get(f"{sim.base_url}/api/v2.0.0/heartbeat", timeout=5)
    assert reply.headers["Date"].endswith(" GMT")
    assert abs((date_header(reply.headers) - true_now).total_seconds() - 420) <= 2
    assert abs(sim.pbx_time() - time.time() - 420) < 1
    expected_local = (true_now + datetime.timedelta(seconds=420)).astimezone(NEW_YORK_WINTER)
    assert sim.now_local().tzinfo is None and sim.now_local().microsecond == 0
    assert abs((sim.now_local() - expected_local.replace(tzinfo=None)).total_seconds()) <= 2
    # No time: the call ends now, stated on the PBX's clock; the callid is the true start.
    rec = add(sim, start=None, seconds=10, ring_s=5)
    started = datetime.datetime.strptime(rec.timestart, "%Y-%m-%d %H:%M:%S")
    assert abs((sim.now_local() - started).total_seconds() - 15) <= 2
    assert abs(int(rec.callid.split(".")[0]) - (time.time() - 15)) <= 2
    instant = datetime.datetime(2024, 1, 10, 12, 0, 0, tzinfo=UTC)
    shown = add(sim, start=instant, callfrom="1004")
    assert shown.timestart == "2024-01-10 07:07:00"
    assert shown.callid.split(".")[0] == str(int(instant.timestamp()))


def test_populate_uses_the_pbx_clock(make_sim):
    sim = make_sim(tz=KOLKATA)
    sim.clock_offset_s = -3600
    recs = sim.populate(10, days=1, seed=3)
    assert all(r.timestart < sim.now_local().strftime("%Y-%m-%d %H:%M:%S") for r in recs)
    newest = max(datetime.datetime.strptime(r.timestart, "%Y-%m-%d %H:%M:%S") for r in recs)
    assert (sim.now_local() - newest).total_seconds() < 86400
    instant = datetime.datetime(2024, 3, 10, 12, 0, 0, tzinfo=UTC)  # 17:30 Kolkata, 16:30 shown
    late = sim.populate(5, days=0.01, now=instant, seed=4)
    assert all("2024-03-10 16:00:00" < r.timestart < "2024-03-10 16:30:00" for r in late)


# --- site variants: late rows, deletions, audio not written yet ---------------------------


def test_late_cdr_row_appears_when_published(sim, receiver):
    app = receiver()
    token = login(sim, port=app.port, version="2.0.0")
    rec = add(sim, in_cdr=False)
    assert cdr_names(sim, token) == []
    assert sim.publish_cdr(rec.name).in_cdr and sim.recordings[rec.name].in_cdr
    assert cdr_names(sim, token) == [rec.name]
    holds_for(lambda: not app.received, 0.1, message="no event")  # announce is optional and off by default
    other = add(sim, in_cdr=False, callfrom="1005")
    sim.publish_cdr(other.name, announce=True)
    assert wait_until(lambda: len(app.received) == 1)
    assert app.received[0][2]["recording"] == other.name
    with pytest.raises(KeyError):
        sim.publish_cdr("nope.wav")


def test_deleted_recording_does_not_exist_but_keeps_its_cdr_row(sim):
    kept, dropped = add(sim), add(sim, callfrom="1005")
    token = login(sim)
    early_random = get_random(sim, token, kept.name)
    sim.delete_recording(kept.name)
    assert api(sim, "recording/get_random", {"recording": kept.name}, token) == {
        "status": "Failed", "errno": "10023"}
    assert download(sim, token, kept.name, early_random).json() == {
        "status": "Failed", "errno": "10023"}
    sim.delete_recording(dropped.name, keep_cdr=False)
    assert cdr_names(sim, token) == [kept.name]
    assert sim.recordings[kept.name].stored is False
    assert hashlib.sha256(sim.recording_bytes(kept.name)).hexdigest() == kept.sha256


def test_not_ready_until_its_time_on_the_simulator_clock(sim):
    sim.not_ready_s = 60
    young = add(sim)
    old = sim.populate(1, now=START, seed=2)[0]  # populate adds ready recordings
    token = login(sim)
    assert api(sim, "recording/get_random", {"recording": young.name}, token)["errno"] == "10023"
    get_random(sim, token, old.name)
    sim.advance_clock(59)
    assert api(sim, "recording/get_random", {"recording": young.name}, token)["errno"] == "10023"
    sim.advance_clock(2)
    assert hashlib.sha256(download(sim, token, young.name).content).hexdigest() == young.sha256
    sim.not_ready_s = 0
    ready = add(sim, callfrom="1007")
    get_random(sim, token, ready.name)


def test_ready_after_s_per_recording_in_real_time(sim):
    token = login(sim)
    rec = add(sim, ready_after_s=0.3)
    began = time.monotonic()
    assert api(sim, "recording/get_random", {"recording": rec.name}, token)["errno"] == "10023"

    def ready():
        reply = api(sim, "recording/get_random", {"recording": rec.name}, token)
        return reply["status"] == "Success"

    assert wait_until(ready, timeout_s=2.0)
    assert 0.3 <= time.monotonic() - began < 1.0


def test_not_found_errno_and_where_it_is_reported(sim):
    gone = add(sim)
    sim.delete_recording(gone.name)
    token = login(sim)
    sim.not_found_errno = "10005"
    assert api(sim, "recording/get_random", {"recording": "nope.wav"}, token)["errno"] == "10005"
    sim.not_found_at = "download"
    for name in ("nope.wav", gone.name):
        random_value = get_random(sim, token, name)  # get_random no longer says it
        assert download(sim, token, name, random_value).json() == {
            "status": "Failed", "errno": "10005"}
    young = add(sim, callfrom="1008", ready_after_s=60)
    assert download(sim, token, young.name).json()["errno"] == "10005"


# --- site variants: bytes, ranges, sizes --------------------------------------------------


def test_bytes_change_after_n_downloads(sim):
    rec = add(sim, seconds=3)
    token = login(sim)
    sim.mutate_bytes_after_downloads = 1
    first = download(sim, token, rec.name).content
    assert hashlib.sha256(first).hexdigest() == rec.sha256
    second = download(sim, token, rec.name).content
    assert len(second) == len(first) and second[:44] == first[:44] and second != first
    assert sim.recording_bytes(rec.name) == second
    assert download(sim, token, rec.name).content == second  # changed once, then stable


def test_changed_bytes_break_a_naive_resume(sim):
    rec = add(sim, seconds=3)
    token = login(sim)
    sim.mutate_bytes_after_downloads, sim.range_mode = 1, "honour"
    sim.reset_after_bytes, sim.reset_downloads = 20_000, 1
    held = bytearray()
    with pytest.raises(requests.exceptions.RequestException):
        for chunk in download(sim, token, rec.name, stream=True).iter_content(4096):
            held += chunk
    assert 0 < len(held) <= 20_000
    rest = download(sim, token, rec.name, headers={"Range": f"bytes={len(held)}-"})
    assert rest.status_code == 206
    stitched = bytes(held) + rest.content
    assert len(stitched) == rec.size_bytes and hashlib.sha256(stitched).hexdigest() != rec.sha256
    assert stitched != sim.recording_bytes(rec.name)


def test_range_modes_and_the_honour_range_alias(sim):
    rec = add(sim)
    data = sim.recording_bytes(rec.name)
    token = login(sim)
    assert sim.range_mode == "ignore" and sim.honour_range is False
    sim.range_mode = "wrong_offset"
    assert sim.honour_range is True
    got = download(sim, token, rec.name, headers={"Range": "bytes=1000-"})
    assert got.status_code == 206
    assert got.headers["Content-Range"] == f"bytes 500-{rec.size_bytes - 1}/{rec.size_bytes}"
    assert got.content == data[500:]
    from_zero = download(sim, token, rec.name, headers={"Range": "bytes=0-"})
    assert from_zero.headers["Content-Range"].startswith("bytes 1-")
    assert from_zero.content == data[1:]
    sim.honour_range = True
    assert sim.range_mode == "honour"
    assert download(sim, token, rec.name, headers={"Range": "bytes=1000-"}).content == data[1000:]
    sim.honour_range = False
    assert sim.range_mode == "ignore"
    assert download(sim, token, rec.name, headers={"Range": "bytes=1000-"}).content == data


def raw_get(sim, path, headers=None):
    """(response, body) over http.client: no decoding, and a short body is not an error."""
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        body = b""
        while True:
            piece = response.read(65536)
            if not piece:
                return response, body
            body += piece
    finally:
        conn.close()


def download_path(sim, token, name):
    return (f"/api/v2.0.0/recording/download?recording={quote(name, safe='')}"
            f"&random={get_random(sim, token, name)}&token={token}")


def test_announced_size_over_4_gib(sim):
    rec = add(sim)
    data = sim.recording_bytes(rec.name)
    token = login(sim)
    huge = 5 * 2**30
    sim.announce_size_bytes = huge
    response, body = raw_get(sim, download_path(sim, token, rec.name))
    assert response.status == 200 and response.getheader("Content-Length") == str(huge)
    assert body == data
    sim.range_mode = "honour"
    response, body = raw_get(sim, download_path(sim, token, rec.name), {"Range": "bytes=1000-"})
    assert response.status == 206
    assert response.getheader("Content-Range") == f"bytes 1000-{huge - 1}/{huge}"
    assert response.getheader("Content-Length") == str(huge - 1000)
    assert body == data[1000:]


# --- site variants: hostile replies and delays ---------------------------------------------


def test_cdr_gzip_even_unasked(sim):
    rec = add(sim)
    token = login(sim)
    plain = cdr(sim, token, "all", "2024-03-10 00:00:00", "2024-03-10 23:59:59").content
    sim.cdr_gzip = True
    path = cdr_link(sim, token, "all", "2024-03-10 00:00:00", "2024-03-10 23:59:59")
    response, body = raw_get(sim, path)  # http.client asks for identity
    assert response.getheader("Content-Encoding") == "gzip"
    assert gzip.decompress(body) == plain and rec.name.encode() in plain


def test_cdr_raw_body_and_hostile_rows(sim):
    token = login(sim)
    sim.add_cdr_row({"callid": "1.1", "timestart": "2024-03-10 10:00:00",
                     "talkduraction": "99999999999999999999"})
    got = cdr(sim, token, "all", "2024-03-10 00:00:00", "2024-03-10 23:59:59")
    assert got.text.splitlines()[1].split(",")[5] == "99999999999999999999"
    sim.cdr_raw_body = b"[" * 100_000
    got = cdr(sim, token, "all", "2024-03-10 00:00:00", "2024-03-10 23:59:59")
    assert got.status_code == 200 and got.content == b"[" * 100_000
    bomb = gzip.compress(b"1," * 5_000_000)
    sim.cdr_raw_body, sim.cdr_gzip = bomb, True
    path = cdr_link(sim, token, "all", "2024-03-10 00:00:00", "2024-03-10 23:59:59")
    response, body = raw_get(sim, path)
    assert response.getheader("Content-Encoding") == "gzip" and body == bomb  # not re-compressed
    assert len(bomb) < 100_000


def test_api_raw_reply_replaces_one_endpoint(sim):
    token = login(sim)
    sim.api_raw_reply = {"cdr/get_random": b"[" * 100_000}
    reply = requests.post(f"{sim.base_url}/api/v2.0.0/cdr/get_random", params={"token": token},
                          json={"number": "all"}, timeout=5)
    assert reply.status_code == 200 and reply.content == b"[" * 100_000
    assert reply.headers["Content-Type"] == "application/json"
    assert api(sim, "heartbeat", {}, token)["status"] == "Success"
    assert sim.counters["cdr/get_random"] == 1


def test_first_byte_delay_sends_headers_first(sim):
    sim.first_byte_delay_s = 0.5
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=5)
    began = time.monotonic()
    conn.request("POST", "/api/v2.0.0/login", body=json.dumps(
        {"username": "api", "password": sim.password_md5}),
        headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    headers_at = time.monotonic() - began
    body = response.read()
    body_at = time.monotonic() - began
    conn.close()
    assert headers_at < 0.4 and 0.5 <= body_at < 1.5
    assert json.loads(body)["status"] == "Success"


def test_cdr_latency_slows_only_the_cdr_endpoints(sim):
    sim.cdr_latency_s = 0.4
    began = time.monotonic()
    token = login(sim)
    assert time.monotonic() - began < 0.3
    began = time.monotonic()
    api(sim, "cdr/get_random", {"number": "all", "starttime": "2024-03-10 00:00:00",
                                "endtime": "2024-03-10 23:59:59"}, token)
    assert 0.4 <= time.monotonic() - began < 1.2


# --- site variants: the simulator clock ---------------------------------------------------


def test_lockout_lifts_after_ten_minutes_on_the_simulator_clock(sim):
    bad = {"username": "api", "password": "0" * 32}
    good = {"username": "api", "password": sim.password_md5}
    assert [api(sim, "login", bad)["errno"] for _ in range(5)] == ["20003"] * 5
    sim.advance_clock(599)
    assert api(sim, "login", good)["errno"] == "20002"
    sim.advance_clock(2)
    login(sim)


def test_failures_outside_the_window_do_not_lock(sim):
    bad = {"username": "api", "password": "0" * 32}
    for _ in range(4):
        api(sim, "login", bad)
    sim.advance_clock(601)
    assert api(sim, "login", bad)["errno"] == "20003"  # the 5th, but the first 4 are stale
    login(sim)


def test_tokens_and_randoms_age_on_the_simulator_clock(sim):
    rec = add(sim)
    token = login(sim)
    random_value = get_random(sim, token, rec.name)
    sim.advance_clock(31)
    assert download(sim, token, rec.name, random_value).json()["errno"] == "10004"
    sim.advance_clock(1799)
    assert api(sim, "heartbeat", {}, token)["status"] == "Success"  # renewed, not idle
    sim.advance_clock(1801)
    assert api(sim, "heartbeat", {}, token)["errno"] == "20004"
    with pytest.raises(ValueError):
        sim.advance_clock(-1)


def test_reset_restores_every_new_switch(make_sim):
    sim = make_sim(tz=KOLKATA)
    changed = {
        "cdr_latency_s": 1.0, "first_byte_delay_s": 1.0, "range_mode": "wrong_offset",
        "announce_size_bytes": 1, "mutate_bytes_after_downloads": 1, "cdr_gzip": True,
        "cdr_raw_body": b"x", "api_raw_reply": {"login": b"x"}, "clock_offset_s": 5.0,
        "not_found_errno": "1", "not_found_at": "download", "not_ready_s": 9.0,
    }
    defaults = {name: getattr(sim, name) for name in changed}
    assert defaults["range_mode"] == "ignore" and defaults["api_raw_reply"] == {}
    for name, value in changed.items():
        setattr(sim, name, value)
    sim.reset()
    assert {name: getattr(sim, name) for name in changed} == defaults
    assert sim.tz is KOLKATA


def test_given_audio_is_served_as_it_is(sim):
    speech = wav_bytes("any other sound", 44 + 16_000)  # stands for a WAV a test made
    rec = sim.add_recording(start=START, duration_s=1, audio=speech)
    assert rec.size_bytes == len(speech) and rec.sha256 == hashlib.sha256(speech).hexdigest()
    assert rec.talk_s == 1 and rec.cdr_row()["talkduraction"] == "1"
    token = login(sim)
    assert download(sim, token, rec.name).content == speech == sim.recording_bytes(rec.name)
    sim.mutate_bytes_after_downloads = 1  # changed bytes keep the given header and size
    changed = download(sim, token, rec.name).content
    assert len(changed) == len(speech) and changed[:44] == speech[:44] and changed != speech
    with pytest.raises(ValueError):
        sim.add_recording(start=START, duration_s=1, audio=speech, size_bytes=len(speech) + 2)



def test_the_tcp_event_server_serves_when_its_descriptors_are_over_1023(make_sim, high_descriptors):
    sim = make_sim(transport="TCP")  # its listening socket, and the connection, are over 1,023
    conn, reply = tcp_login(sim, "secret")
    assert reply == b"Response: Success\r\n\r\n"
    first = add(sim, announce=True)
    assert [e["recording"] for e in _read_events(conn, 1)] == [first.name]
    conn.close()
