"""PbxClient against the real simulator over loopback (yeastar-api.md §2-§4, §9, §11, §12).

The simulator is the contract's reference; the variant switches model what a real PBX may
do differently, and the client must cope with both.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import threading
import time

import pytest

from harness import factory, free_port, holds_for, new_simulator, wait_until
from yeastarfs import errors
from yeastarfs.pbx.sseries.client import PbxClient

START = datetime.datetime(2024, 3, 10, 14, 30, 0)
HEX32 = set("0123456789abcdef")
PASSWORD = "an0ther-Passw0rd"  # for simulators this file starts itself


@pytest.fixture
def client(pbx, make_client):
    return make_client(pbx)


@pytest.fixture
def make_sim():
    """Start simulators with options of their own (``make_sim(token_idle_s=0.3)``); all stopped at the end."""
    yield from factory(lambda **options: new_simulator(password=PASSWORD, **options).start())


def add(sim, seconds=2.0, **kwargs):
    kwargs.setdefault("start", START + datetime.timedelta(minutes=len(sim.recordings)))
    return sim.add_recording(duration_s=seconds, announce=False, **kwargs)


def read_all(stream):
    with stream:
        return b"".join(stream.chunks())


def in_threads(count, target):
    """Run *target* on *count* threads released together; return results and exceptions."""
    barrier = threading.Barrier(count)
    results, failures = [], []

    def run():
        barrier.wait()
        try:
            results.append(target())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not any(thread.is_alive() for thread in threads)
    return results, failures


# -- login and the session -------------------------------------------------------------------


def test_login_sends_md5_version_and_port(pbx, client):
    token = client.login()
    assert set(token) <= HEX32 and len(token) == 32
    [entry] = [e for e in pbx.requests_log if e["endpoint"] == "login"]
    assert entry["method"] == "POST"
    assert entry["body"] == {"username": "api", "password": hashlib.md5(pbx.password.encode()).hexdigest(),
                             "version": "2.0.0", "port": "8260"}
    assert pbx.password not in str(entry)
    assert client.transport == "HTTP"


def test_token_is_reused_across_calls(pbx, client):
    rec = add(pbx)
    for _ in range(5):
        client.recording_random(rec.name)
    client.heartbeat()
    read_all(client.open_recording(rec.name))
    client.fetch_cdr(START, START + datetime.timedelta(hours=1))
    assert pbx.counters["login"] == 1
    assert client.stats.logins == 1
    tokens = {e["query"].get("token") for e in pbx.requests_log if e["endpoint"] != "login"}
    assert len(tokens) == 1


def test_concurrent_first_calls_share_one_login(pbx, client):
    rec = add(pbx)
    results, failures = in_threads(8, lambda: client.recording_random(rec.name))
    assert not failures and len(results) == 8
    assert pbx.counters["login"] == 1


def test_expired_token_logs_in_again_once_and_retries_once(pbx, client):
    rec = add(pbx)
    client.recording_random(rec.name)
    pbx.expire_all_tokens()
    assert client.recording_random(rec.name)
    assert pbx.counters["login"] == 2
    assert pbx.counters["recording/get_random"] == 3  # ok, refused, retried


def test_idle_token_expiry_is_transparent(make_sim, make_client):
    sim = make_sim(token_idle_s=0.3)
    client = make_client(sim)
    rec = add(sim)
    token = client.login()
    wait_until(lambda: not sim._token_alive(token), timeout_s=5.0, message="the token to die")
    assert client.recording_random(rec.name)
    assert sim.counters["login"] == 2


def test_token_refused_after_fresh_login_is_a_token_error(make_sim, make_client):
    sim = make_sim(token_idle_s=-1)  # every token is dead on arrival
    client = make_client(sim)
    rec = add(sim)
    with pytest.raises(errors.TokenError):
        client.recording_random(rec.name)
    assert sim.counters["login"] == 2  # the first login, one re-login, no more
    assert sim.counters["recording/get_random"] == 2


def test_concurrent_threads_on_an_expired_token_share_one_login(pbx, client):
    rec = add(pbx)
    client.login()
    pbx.expire_all_tokens()
    results, failures = in_threads(8, lambda: client.recording_random(rec.name))
    assert not failures and len(results) == 8
    assert pbx.counters["login"] == 2


def test_download_with_a_dead_token_recovers_on_the_next_attempt(pbx, client):
    rec = add(pbx)
    client.login()
    original = client.recording_random
    def random_then_expire(name):
        value = original(name)
        pbx.expire_all_tokens()  # the token dies between get_random and download
        return value
    client.recording_random = random_then_expire
    with pytest.raises(errors.ApiError) as info:
        client.open_recording(rec.name)
    assert info.value.api_errno == "20004"
    client.recording_random = original
    assert read_all(client.open_recording(rec.name)) == pbx.recording_bytes(rec.name)
    assert pbx.counters["login"] == 2


# -- refused logins, lockout, unreachable PBX --------------------------------------------------


def test_wrong_password_is_refused_once_without_retry_storm(pbx, make_client):
    rec = add(pbx)
    client = make_client(pbx, password="wrong-password")
    with pytest.raises(errors.AuthError) as info:
        client.recording_random(rec.name)
    assert not isinstance(info.value, errors.LockedOutError)
    message = str(info.value)
    assert "rejected" in message and "'api'" in message and "password" in message
    assert "wrong-password" not in message
    assert pbx.counters["login"] == 1
    for call in (lambda: client.recording_random(rec.name), client.login, client.heartbeat,
                 lambda: client.open_recording(rec.name)):
        with pytest.raises(errors.AuthError):
            call()
    assert pbx.counters["login"] == 1
    assert client.stats.login_failures == 1


def test_lockout_is_reported_and_not_retried(pbx, client):
    pbx.lock_ip("127.0.0.1")
    with pytest.raises(errors.LockedOutError) as info:
        client.login()
    assert "locked" in str(info.value)
    with pytest.raises(errors.LockedOutError):
        client.heartbeat()
    assert pbx.counters["login"] == 1


class SteppedClock:
    """A monotonic clock that moves only when told (PbxClient's ``monotonic`` seam)."""

    def __init__(self):
        self.now_s = 1000.0

    def __call__(self):
        return self.now_s

    def advance(self, seconds):
        self.now_s += seconds


def test_a_rejected_login_pauses_logins_for_five_minutes_then_they_resume(pbx, make_client):
    """README (Locking out): one rejected login stops all logins for five minutes."""
    rec = add(pbx)
    clock = SteppedClock()
    client = make_client(pbx, monotonic=clock)
    pbx.fail_logins = 1  # the next login is rejected (20003), the one after accepted
    with pytest.raises(errors.AuthError) as info:
        client.recording_random(rec.name)
    assert not isinstance(info.value, errors.LockedOutError)
    clock.advance(299.9)
    with pytest.raises(errors.AuthError):
        client.login()
    assert pbx.counters["login"] == 1  # refused here, not asked of the PBX
    clock.advance(0.1)  # five minutes to the tick
    assert client.recording_random(rec.name)
    assert pbx.counters["login"] == 2


def test_a_lockout_pauses_logins_for_ten_minutes_then_they_resume(pbx, make_client):
    """README (Locking out): ten minutes after a lockout (the PBX's own ban lasts ten)."""
    rec = add(pbx)
    clock = SteppedClock()
    client = make_client(pbx, monotonic=clock)
    pbx.lock_ip("127.0.0.1")
    with pytest.raises(errors.LockedOutError):
        client.recording_random(rec.name)
    pbx.advance_clock(600)  # the PBX lifts its ban after its ten minutes
    clock.advance(599.9)
    with pytest.raises(errors.LockedOutError):
        client.heartbeat()
    assert pbx.counters["login"] == 1
    clock.advance(0.1)
    assert client.recording_random(rec.name)
    assert pbx.counters["login"] == 2


def test_refused_connections_are_unavailable_quickly(pbx, client):
    rec = add(pbx)
    pbx.refuse_connections = True
    began = time.monotonic()
    with pytest.raises(errors.PbxUnavailableError):
        client.recording_random(rec.name)
    assert time.monotonic() - began < 1.0  # at once, not after make_client's 2 s connect timeout
    # A network failure is not a refused login: once the PBX is back, work resumes at once.
    pbx.refuse_connections = False
    assert client.recording_random(rec.name)


def test_closed_port_is_unavailable_quickly(make_client):
    class Nowhere:
        base_url, password = f"http://127.0.0.1:{free_port()}", "x"

    client = make_client(Nowhere)
    began = time.monotonic()
    with pytest.raises(errors.PbxUnavailableError) as info:
        client.login()
    assert time.monotonic() - began < 1.0  # at once, not after make_client's 2 s connect timeout
    assert "127.0.0.1" in str(info.value)


def test_an_answer_that_is_not_the_api_is_unavailable(make_client):
    # An HTTP server that is not a PBX (404 HTML): never an AuthError, never a crash.
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotPbx(BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", "13")
            self.end_headers()
            self.wfile.write(b"<html></html>")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotPbx)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        class Where:
            base_url, password = f"http://127.0.0.1:{server.server_address[1]}", "x"

        with pytest.raises(errors.PbxUnavailableError):
            make_client(Where).login()
    finally:
        server.shutdown()
        server.server_close()


# -- recordings --------------------------------------------------------------------------------


def test_open_recording_streams_the_exact_bytes(pbx, client):
    rec = add(pbx, seconds=40)  # 640 KB: several chunks
    random_value = client.recording_random(rec.name)
    assert set(random_value) <= HEX32 and len(random_value) == 32
    stream = client.open_recording(rec.name)
    assert stream.start_offset == 0
    assert stream.total_bytes == rec.size_bytes
    assert hashlib.sha256(read_all(stream)).hexdigest() == rec.sha256
    downloads = [e for e in pbx.requests_log if e["endpoint"] == "recording/download"]
    assert downloads[-1]["method"] == "GET"
    assert downloads[-1]["query"]["recording"] == rec.name


def test_hostile_names_are_url_encoded(pbx, client):
    rec = add(pbx, name="20240310143000-1.2-+49 30&x=1#-1000-Inbound.wav")
    assert read_all(client.open_recording(rec.name)) == pbx.recording_bytes(rec.name)


def test_every_download_gets_a_fresh_random(pbx, client):
    rec = add(pbx)
    for _ in range(3):
        read_all(client.open_recording(rec.name))
    randoms = [e["query"]["random"] for e in pbx.requests_log if e["endpoint"] == "recording/download"]
    assert len(set(randoms)) == 3
    assert pbx.counters["recording/get_random"] == 3


@pytest.mark.parametrize("stored", [False, None])
def test_missing_recording_is_not_found(pbx, client, stored):
    name = "20240310143000-1.1-1000-1001-Internal.wav"
    if stored is not None:
        add(pbx, name=name, stored=stored)
    with pytest.raises(errors.RecordingNotFoundError) as info:
        client.open_recording(name)
    assert info.value.api_errno == "10023"
    assert pbx.counters["login"] == 1  # no re-login for a missing file


def test_get_random_failure_is_an_api_error(pbx, client):
    rec = add(pbx)
    pbx.fail_get_random = 1
    with pytest.raises(errors.ApiError) as info:
        client.open_recording(rec.name)
    assert info.value.api_errno == "10004"
    assert pbx.counters["recording/download"] == 0


@pytest.mark.parametrize("mode, error", [
    ("json", errors.ApiError),
    ("html", errors.DownloadError),
    ("http500", errors.PbxUnavailableError),
])
def test_failed_download_shapes(pbx, client, mode, error):
    rec = add(pbx)
    pbx.fail_mode, pbx.fail_downloads = mode, 1
    with pytest.raises(error):
        read_all(client.open_recording(rec.name))
    # The next download works: nothing was left half-open or poisoned.
    assert read_all(client.open_recording(rec.name)) == pbx.recording_bytes(rec.name)


def test_json_failure_on_download_has_the_errno(pbx, client):
    rec = add(pbx)
    pbx.fail_mode, pbx.fail_downloads = "json", 1
    with pytest.raises(errors.ApiError) as info:
        client.open_recording(rec.name)
    assert not isinstance(info.value, errors.DownloadError)
    assert info.value.api_errno == "10004"


@pytest.mark.parametrize("mode", ["truncate", "overlong"])
def test_body_length_mismatch_fails_in_chunks(pbx, client, mode):
    rec = add(pbx, seconds=20)
    pbx.fail_mode, pbx.fail_downloads = mode, 1
    received = bytearray()
    with pytest.raises(errors.PbxError):
        with client.open_recording(rec.name) as stream:
            for chunk in stream.chunks():
                received += chunk
    data = pbx.recording_bytes(rec.name)
    assert len(received) <= len(data) // 2
    assert bytes(received) == data[:len(received)]


def test_range_honoured_gives_the_tail_and_total(pbx, client):
    rec = add(pbx, seconds=10)
    pbx.honour_range = True
    stream = client.open_recording(rec.name, offset=1000)
    assert stream.start_offset == 1000
    assert stream.total_bytes == rec.size_bytes
    assert read_all(stream) == pbx.recording_bytes(rec.name)[1000:]


def test_range_ignored_gives_the_whole_file(pbx, client):
    rec = add(pbx, seconds=10)
    stream = client.open_recording(rec.name, offset=1000)
    assert stream.start_offset == 0
    assert stream.total_bytes == rec.size_bytes
    assert read_all(stream) == pbx.recording_bytes(rec.name)


def test_reset_mid_body_is_unavailable_not_a_raw_exception(pbx, client):
    rec = add(pbx, seconds=60)  # ~960 KB
    pbx.reset_after_bytes, pbx.reset_downloads = 200_000, 1
    received = 0
    with pytest.raises(errors.PbxUnavailableError) as info:
        with client.open_recording(rec.name) as stream:
            for chunk in stream.chunks():
                received += len(chunk)
    assert type(info.value).__module__ == "yeastarfs.errors"
    assert 0 < received <= 200_000


def test_silent_pbx_mid_body_is_a_stall(pbx, make_client):
    rec = add(pbx, seconds=30)
    client = make_client(pbx, read_timeout_s=0.5)
    pbx.bandwidth_bps = 20_000
    with client.open_recording(rec.name) as stream:
        chunks = stream.chunks()
        next(chunks)
        pbx.bandwidth_bps = 1  # one byte a second: slower than the read timeout
        began = time.monotonic()
        with pytest.raises(errors.DownloadStalledError):
            for _ in chunks:
                pass
        # The 0.5 s read timeout after the last byte; a byte comes every second, so at most
        # one such gap passes first (1.5 s), never the several a looser timeout would take.
        stalled_s = time.monotonic() - began
        assert 0.5 <= stalled_s < 1.5, stalled_s


# -- CDR ---------------------------------------------------------------------------------------


def test_fetch_cdr_returns_the_window_and_survives_hostile_rows(pbx, client):
    inside = [add(pbx, start=START + datetime.timedelta(minutes=m)) for m in (0, 10, 20)]
    add(pbx, start=START - datetime.timedelta(days=1))
    add(pbx, start=START + datetime.timedelta(minutes=5), in_cdr=False)
    pbx.add_cdr_row({"callid": "1.1", "timestart": "2024-03-10 14:31:00", "status": "NO ANSWER"})
    pbx.add_cdr_row({"callid": "1.2", "timestart": "2024-03-10 14:32:00",
                     "recording": "20240310143200-1.2-1,2-3-Inbound.wav"})  # comma: a bad row
    pbx.add_cdr_row({"callid": "1.3", "timestart": "garbage", "recording": "../../etc/passwd"})
    result = client.fetch_cdr(START, START + datetime.timedelta(hours=1))
    # Rows come ordered by timestart; the garbage timestart sorts last and is in every window.
    assert [r.name for r in result.recordings] == [r.name for r in inside] + ["../../etc/passwd"]
    assert result.bad_rows == 1
    first = next(r for r in result.recordings if r.name == inside[0].name)
    assert (first.callid, first.callfrom, first.call_type) == (inside[0].callid, "1001", "Inbound")
    assert first.talk_s == 2
    [entry] = [e for e in pbx.requests_log if e["endpoint"] == "cdr/get_random"]
    assert entry["body"] == {"number": "all", "starttime": "2024-03-10 14:30:00",
                             "endtime": "2024-03-10 15:30:00"}


def test_fetch_cdr_of_an_empty_window(pbx, client):
    result = client.fetch_cdr(START, START + datetime.timedelta(hours=1))
    assert result.recordings == [] and result.bad_rows == 0


def test_fetch_cdr_after_token_expiry(pbx, client):
    add(pbx)
    client.login()
    pbx.expire_all_tokens()
    assert len(client.fetch_cdr(START, START + datetime.timedelta(hours=1)).recordings) == 1


# -- heartbeat ---------------------------------------------------------------------------------


def test_heartbeat_keeps_an_idle_token_alive(make_sim, make_client):
    sim = make_sim(token_idle_s=0.6)
    client = make_client(sim, heartbeat_interval_s=0.2)
    rec = add(sim)
    token = client.login()
    client.start_heartbeat()
    holds_for(lambda: sim._token_alive(token), duration_s=2.0, interval_s=0.05,  # more than three lifetimes
              message="the token staying alive")
    assert sim.counters["heartbeat"] >= 3
    [body] = {str(e["body"]) for e in sim.requests_log if e["endpoint"] == "heartbeat"}
    assert "'ipaddr': '127.0.0.1'" in body and "'version': '2.0.0'" in body
    client.recording_random(rec.name)
    assert sim.counters["login"] == 1


def test_heartbeat_stays_quiet_while_calls_keep_the_token_busy(pbx, make_client):
    client = make_client(pbx, heartbeat_interval_s=0.4)
    rec = add(pbx)
    client.login()
    client.start_heartbeat()
    holds_for(lambda: client.recording_random(rec.name), duration_s=1.0, interval_s=0.05,
              message="calls keeping the token busy")
    assert pbx.counters["heartbeat"] == 0


def test_stop_ends_the_heartbeat_thread(pbx, make_client):
    client = make_client(pbx, heartbeat_interval_s=0.2)
    client.login()
    client.start_heartbeat()
    began = time.monotonic()
    client.stop()
    assert time.monotonic() - began < 2
    assert not client._heartbeat_thread.is_alive()


# -- secrets -----------------------------------------------------------------------------------


def test_no_secret_reaches_exceptions_or_logs(pbx, make_client, caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("urllib3", "urllib3.connectionpool"):  # cli.setup_logging may have quietened them
        caplog.set_level(logging.DEBUG, logger=name)
    rec = add(pbx, seconds=5)
    messages = []

    def expect_failure(call):
        try:
            call()
        except errors.YeastarfsError as exc:
            messages.append(str(exc))
            messages.append(repr(exc))
        else:
            raise AssertionError("expected a failure")

    client = make_client(pbx)
    read_all(client.open_recording(rec.name))
    client.heartbeat()
    client.fetch_cdr(START, START + datetime.timedelta(hours=1))
    pbx.expire_all_tokens()
    read_all(client.open_recording(rec.name))
    for mode in ("json", "html", "http500", "truncate"):
        pbx.fail_mode, pbx.fail_downloads = mode, 1
        expect_failure(lambda: read_all(client.open_recording(rec.name)))
    pbx.reset_after_bytes, pbx.reset_downloads = 1000, 1
    expect_failure(lambda: read_all(client.open_recording(rec.name)))
    expect_failure(lambda: client.open_recording("20240310143000-9.9-1-2-Inbound.wav"))
    pbx.refuse_connections = True
    expect_failure(lambda: client.open_recording(rec.name))
    pbx.refuse_connections = False
    # A download link whose token died between get_random and the download.
    real_random = client.recording_random
    client.recording_random = lambda name: (real_random(name), pbx.expire_all_tokens())[0]
    expect_failure(lambda: client.open_recording(rec.name))
    client.recording_random = real_random
    client.logout()
    wrong = "not-" + pbx.password
    expect_failure(make_client(pbx, password=wrong).login)

    secrets = {pbx.password, wrong, pbx.password_md5, hashlib.md5(wrong.encode()).hexdigest()}
    for entry in pbx.requests_log:
        secrets.update(v for k, v in entry["query"].items() if k in ("token", "random"))
        if entry["body"] and "random" in str(entry["body"]):
            secrets.add(entry["body"]["random"])
    secrets.discard("")
    assert len([s for s in secrets if len(s) == 32]) >= 8  # tokens and randoms were collected
    text = caplog.text + "\n".join(messages)
    assert "download" in caplog.text  # the log was really captured
    leaked = [s for s in secrets if s in text]
    assert not leaked


# -- variants a real PBX may show ---------------------------------------------------------------


def test_lowercase_success_is_accepted(pbx, client):
    rec = add(pbx)
    pbx.success_status = "success"
    assert read_all(client.open_recording(rec.name)) == pbx.recording_bytes(rec.name)
    assert client.fetch_cdr(START, START + datetime.timedelta(hours=1)).recordings
    assert pbx.counters["login"] == 1


def test_errno_20006_for_an_expired_token_logs_in_again(pbx, client):
    rec = add(pbx)
    pbx.token_errno = "20006"
    client.login()
    pbx.expire_all_tokens()
    assert client.recording_random(rec.name)
    assert pbx.counters["login"] == 2


def test_octet_stream_download_is_accepted(pbx, client):
    rec = add(pbx)
    pbx.audio_content_type = "application/octet-stream"
    stream = client.open_recording(rec.name)
    assert stream.total_bytes == rec.size_bytes
    assert read_all(stream) == pbx.recording_bytes(rec.name)


@pytest.mark.parametrize("honour_range", [False, True])
def test_missing_content_length_gives_unknown_total(pbx, client, honour_range):
    rec = add(pbx, seconds=20)
    pbx.omit_content_length = True
    pbx.honour_range = honour_range
    stream = client.open_recording(rec.name)
    assert stream.total_bytes is None
    assert read_all(stream) == pbx.recording_bytes(rec.name)
    # A 206 still tells the total in Content-Range.
    stream = client.open_recording(rec.name, offset=100)
    assert stream.total_bytes == (rec.size_bytes if honour_range else None)
    assert read_all(stream) == pbx.recording_bytes(rec.name)[stream.start_offset:]


def test_an_endless_body_is_refused_not_stored(pbx, monkeypatch):
    import yeastarfs.pbx.transport as api_module
    monkeypatch.setattr(api_module, "MAX_RECORDING_BYTES", 100_000)
    rec = pbx.add_recording(start=datetime.datetime(2024, 3, 10, 14, 30), duration_s=20, announce=False)
    pbx.omit_content_length = True  # no length: the body runs until the PBX closes
    client = PbxClient(pbx.base_url, "api", pbx.password, events_port=None)
    try:
        stream = client.open_recording(rec.name)
        with pytest.raises(errors.DownloadError, match="exceeds"):
            with stream:
                for _ in stream.chunks():
                    pass
    finally:
        client.stop()


@pytest.mark.parametrize("honour_range", [False, True])
def test_a_content_length_over_4_gib_is_refused_at_open(pbx, client, honour_range):
    """README (Sizes of bodies): anything announced beyond 4 GiB is refused; 4 GiB itself is not."""
    rec = add(pbx)
    pbx.honour_range = honour_range
    offset = 100 if honour_range else 0
    pbx.announce_size_bytes = 4 * 1024 ** 3 + 1
    with pytest.raises(errors.DownloadError, match="refused"):
        client.open_recording(rec.name, offset=offset)
    pbx.announce_size_bytes = 4 * 1024 ** 3
    with client.open_recording(rec.name, offset=offset) as stream:  # accepted: the body is what fails
        assert stream.total_bytes == 4 * 1024 ** 3
        with pytest.raises(errors.DownloadError, match="ended after"):
            for _ in stream.chunks():
                pass


# -- what the environment and hostile replies may not do (issue 9) ------------------------------


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"])
def test_proxy_variables_from_the_environment_are_ignored(pbx, make_client, monkeypatch, variable):
    monkeypatch.setenv(variable, "http://127.0.0.1:9")  # nothing listens: a proxy would fail
    assert make_client(pbx, events_port=None).login()


def test_proxy_environment_opts_in_to_the_proxy_variables(pbx, make_client, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(errors.PbxUnavailableError):
        make_client(pbx, events_port=None, proxy="environment").login()
    assert pbx.counters["login"] == 0


def _rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_a_gzip_bomb_instead_of_the_cdr_is_refused_without_expanding_it(pbx, make_client):
    import gzip
    row = "1.1,2026-11-27 09:00:00,1001,1002,10,8,,,ANSWERED,Internal,,,,369\n"
    header = "callid,timestart,callfrom,callto,callduraction,talkduraction,srctrunkname,dsttrunkname," \
             "status,type,pincode,recording,didnumber,sn\n"
    bomb = gzip.compress((header + row * (200_000_000 // len(row))).encode(), compresslevel=9)
    assert len(bomb) < 2_000_000  # a small body that expands to 200 MB
    pbx.cdr_gzip, pbx.cdr_raw_body = True, bomb
    client = make_client(pbx, events_port=None)
    before_kib = _rss_kib()
    with pytest.raises(errors.PbxUnavailableError, match="larger than"):
        client.fetch_cdr(START, START + datetime.timedelta(days=1))
    assert _rss_kib() - before_kib < 80 * 1024  # the cap (32 MB) and its copies, never 200 MB


def test_a_deeply_nested_json_reply_is_an_unavailable_pbx_not_a_crash(pbx, make_client):
    pbx.api_raw_reply = {"cdr/get_random": b"[" * 60_000}  # under the size cap, over any recursion limit
    with pytest.raises(errors.PbxUnavailableError, match="JSON"):
        make_client(pbx, events_port=None).fetch_cdr(START, START + datetime.timedelta(days=1))


def test_an_overlong_api_reply_is_refused(pbx, make_client):
    pbx.api_raw_reply = {"cdr/get_random": b'{"status": "Success", "pad": "' + b"x" * 200_000 + b'"}'}
    with pytest.raises(errors.PbxUnavailableError, match="larger than"):
        make_client(pbx, events_port=None).fetch_cdr(START, START + datetime.timedelta(days=1))


def padded_json(size_bytes, **fields):
    """A JSON object of exactly *size_bytes*, padded in a "pad" field."""
    bare = len(json.dumps({**fields, "pad": ""}).encode())
    body = json.dumps({**fields, "pad": "x" * (size_bytes - bare)}).encode()
    assert len(body) == size_bytes
    return body


def test_api_replies_are_read_up_to_64_kib(pbx, make_client):
    rec = add(pbx)
    client = make_client(pbx, events_port=None)
    pbx.api_raw_reply = {"recording/get_random": padded_json(64 * 1024, status="Success", random="r4nd0m")}
    assert client.recording_random(rec.name) == "r4nd0m"
    pbx.api_raw_reply = {"recording/get_random": padded_json(64 * 1024 + 1, status="Success", random="r4nd0m")}
    with pytest.raises(errors.PbxUnavailableError, match="larger than"):
        client.recording_random(rec.name)


def test_a_cdr_of_32_mib_is_read_and_one_byte_more_refused(pbx, make_client):
    header = ("callid,timestart,callfrom,callto,callduraction,talkduraction,srctrunkname,dsttrunkname,"
              "status,type,pincode,recording,didnumber,sn\n")
    row = ("1.1,2024-03-10 14:30:00,1001,1002,10,8,,,ANSWERED,Internal,,"
           "20240310143000-1.1-1001-1002-Internal.wav,," + "3" * 100_000 + "\n")  # long rows parse fast
    body = header + row * ((32 * 1024 * 1024 - len(header)) // len(row))
    body = (body + "x" * (32 * 1024 * 1024 - len(body) - 1) + "\n").encode()
    client = make_client(pbx, events_port=None)
    pbx.cdr_raw_body = body
    assert client.fetch_cdr(START, START + datetime.timedelta(days=1)).recordings
    pbx.cdr_raw_body = body + b"\n"
    with pytest.raises(errors.PbxUnavailableError, match="larger than"):
        client.fetch_cdr(START, START + datetime.timedelta(days=1))


# -- what a refusal says, logout, token errors on downloads (mutation testing's survivors) ----------


def test_refusals_name_their_cause_and_every_failed_login_is_counted(pbx, make_client):
    clock = SteppedClock()
    client = make_client(pbx, monotonic=clock)
    pbx.fail_logins = 2
    for expected_failures in (1, 2):
        with pytest.raises(errors.AuthError) as info:
            client.login()
        assert str(info.value) == (f"PBX {pbx.base_url} rejected the login for user 'api' (errno 20003): check the "
                                   "username, the password and that the API is enabled")
        assert client.stats.login_failures == expected_failures
        clock.advance(300)
    pbx.api_raw_reply = {"login": b'{"status": "Failed"}'}  # no errno at all
    with pytest.raises(errors.AuthError, match=r"\(errno none\)"):
        client.login()
    pbx.api_raw_reply = {}
    clock.advance(300)
    pbx.lock_ip("127.0.0.1")
    with pytest.raises(errors.LockedOutError) as info:
        client.login()
    assert str(info.value) == (f"PBX {pbx.base_url} has locked out this IP after failed logins (errno 20002); "
                               "wait 10 minutes or remove it from the PBX's blocked IP list")
    assert client.stats.login_failures == 4


def test_logout_ends_the_session_and_the_next_call_logs_in(pbx, client):
    rec = add(pbx)
    token = client.login()
    client.logout()
    [logout] = [e for e in pbx.requests_log if e["endpoint"] == "logout"]
    assert logout["query"]["token"] == token
    assert not pbx._token_alive(token)
    client.logout()  # nothing to end: no request
    assert pbx.counters["logout"] == 1
    assert client.recording_random(rec.name)
    assert pbx.counters["login"] == 2


@pytest.mark.parametrize("api_errno, logins", [("20004", 2), ("20006", 2), ("10004", 1)])
def test_a_token_error_instead_of_audio_drops_the_token(pbx, client, api_errno, logins):
    rec = add(pbx)
    client.login()
    pbx.api_raw_reply = {"recording/download": json.dumps({"status": "Failed", "errno": api_errno}).encode()}
    with pytest.raises(errors.ApiError) as info:
        client.open_recording(rec.name)
    assert info.value.api_errno == api_errno and "recording/download" in str(info.value)
    pbx.api_raw_reply = {}
    assert client.recording_random(rec.name)
    assert pbx.counters["login"] == logins  # a token error: the next call logs in again; another errno: not


def test_a_json_failure_with_bytes_that_are_not_utf8_still_says_its_errno(pbx, client):
    rec = add(pbx)
    pbx.api_raw_reply = {"recording/download": b'{"status": "Failed", "errno": "10004", "msg": "\xff\xfe"}'}
    with pytest.raises(errors.ApiError) as info:
        client.open_recording(rec.name)
    assert info.value.api_errno == "10004"
    pbx.api_raw_reply = {"recording/download": b'["Failed"]'}  # JSON, but not an object
    with pytest.raises(errors.ApiError) as info:
        client.open_recording(rec.name)
    assert info.value.api_errno == ""


def test_a_cdr_answered_with_json_is_the_pbx_refusing(pbx, client):
    pbx.cdr_raw_body = b' \r\n{"status": "Failed", "errno": "10004"}'  # blanks, then JSON
    with pytest.raises(errors.ApiError) as info:
        client.fetch_cdr(START, START + datetime.timedelta(days=1))
    assert info.value.api_errno == "10004" and "cdr/download" in str(info.value)
    pbx.cdr_raw_body = b'\xef\xbb\xbf{"status": "Failed", "errno": "10004"}'  # after a BOM: refused all the same
    with pytest.raises(errors.PbxError):
        client.fetch_cdr(START, START + datetime.timedelta(days=1))
    pbx.cdr_raw_body = b"callid,recording\r\n1.1,{not json}\r\n"  # CSV that merely contains a brace
    assert [r.name for r in client.fetch_cdr(START, START + datetime.timedelta(days=1)).recordings] == ["{not json}"]


def test_a_cdr_random_that_is_missing_or_empty_is_refused(pbx, client):
    for reply in (b'{"status": "Success"}', b'{"status": "Success", "random": ""}', b'{"status": "Success", "random": 7}'):
        pbx.api_raw_reply = {"cdr/get_random": reply}
        with pytest.raises(errors.PbxUnavailableError, match="cdr/get_random reply carries no random"):
            client.fetch_cdr(START, START + datetime.timedelta(days=1))
    assert pbx.counters["cdr/download"] == 0


def test_the_heartbeat_tells_the_pbx_where_events_go(pbx, make_client):
    client = make_client(pbx, events_port=8765)
    client.login()
    client.heartbeat()
    [body] = [e["body"] for e in pbx.requests_log if e["endpoint"] == "heartbeat"]
    assert body == {"ipaddr": "127.0.0.1", "port": "8765", "version": "2.0.0"}
    quiet = make_client(pbx, events_port=None)
    quiet.login()
    quiet.heartbeat()
    assert [e["body"] for e in pbx.requests_log if e["endpoint"] == "heartbeat"][1] == {
        "ipaddr": "127.0.0.1", "version": "2.0.0"}
