"""The P-Series client, catalogue and records against the P-Series simulator over loopback:
tokens (renewed, refreshed, one per mount, no lockout), errors by errcode and by errmsg,
two-step downloads (resource URLs reused while the PBX allows it), one mp3 at a time,
recording/search windows with exact sizes, the display format and zone, strict rows, and the
--api auto probe."""

from __future__ import annotations

import datetime
import hashlib
import threading
import time
import zoneinfo

import pytest

from harness import wait_until
from yeastarfs import errors
from yeastarfs.config import Config
from yeastarfs.pbx import auto
from yeastarfs.pbx.clock import PbxClock
from yeastarfs.pbx.pseries import catalogue as catalogue_module
from yeastarfs.pbx.pseries import client as client_module
from yeastarfs.pbx.pseries.catalogue import SearchCatalogue
from yeastarfs.pbx.pseries.client import PSeriesClient
from yeastarfs.pbx.pseries.records import DisplayTimes, display_pattern, recording_from_row
from yeastarfs.sim import PSeriesSimulator, Simulator

SECRET = "client-secret-1"


@pytest.fixture
def sim():
    with PSeriesSimulator(password=SECRET) as simulator:
        yield simulator


@pytest.fixture
def make_sim():
    started = []

    def make(**kwargs):
        started.append(PSeriesSimulator(password=SECRET, **kwargs).start())
        return started[-1]

    yield make
    for simulator in started:
        simulator.stop()


@pytest.fixture
def make_client():
    made = []

    def make(sim, secret=SECRET, **kwargs):
        made.append(PSeriesClient(sim.base_url, "api", secret, connect_timeout_s=2, read_timeout_s=5, **kwargs))
        return made[-1]

    yield make
    for client in made:
        client.stop()


def logins(sim) -> int:
    return sum(1 for entry in sim.requests_log if entry["endpoint"] == "get_token" and entry["method"] == "POST")


def valid_access_tokens(sim) -> int:
    """Access tokens the simulated PBX would accept now (its own bookkeeping)."""
    now = sim._clock.now()
    return sum(1 for grant in sim._by_access.values() if not grant.access_revoked and grant.access_expires > now)


def read_all(stream) -> bytes:
    with stream:
        return b"".join(stream.chunks())


def add(sim, minutes_ago=30, **kwargs):
    start = datetime.datetime.now().replace(microsecond=0) - datetime.timedelta(minutes=minutes_ago)
    kwargs.setdefault("duration_s", 4)
    return sim.add_recording(start=start, announce=False, **kwargs)


# -- the session --------------------------------------------------------------------------------


def test_get_token_sends_the_user_agent_and_keeps_the_secret_out_of_messages(sim, make_client):
    client = make_client(sim)
    token = client.login()
    entry = next(e for e in sim.requests_log if e["endpoint"] == "get_token")
    assert entry["user_agent"] == "OpenAPI" and entry["body"] == {"username": "api", "password": SECRET}
    assert client.login() == token and logins(sim) == 1  # a valid token is kept, not replaced
    assert errors.redact(f"x?access_token={token} {SECRET}") == "x?access_token=*** ***"


def test_a_rejected_login_is_not_tried_again_for_minutes(sim, make_client):
    client = make_client(sim, secret="wrong")
    with pytest.raises(errors.AuthError, match="Client ID"):
        client.login()
    with pytest.raises(errors.AuthError):
        client.call("recording/list")
    assert logins(sim) == 1


def test_a_blocked_ip_is_a_lockout_and_not_tried_again(sim, make_client):
    sim.lock_ip("127.0.0.1")
    client = make_client(sim)
    for _ in range(3):
        with pytest.raises(errors.LockedOutError):
            client.login()
    assert logins(sim) == 1


@pytest.mark.parametrize("sim_options", [{"access_token_ttl_s": 2.0}])
def test_the_token_is_renewed_before_it_runs_out_and_only_one_is_ever_valid(make_sim, make_client, sim_options):
    sim = make_sim(**sim_options)
    client = make_client(sim)
    client.login()
    client.start_renewal()
    wait_until(lambda: client.stats.renewals >= 2, timeout_s=8, message="two renewals")
    assert client.call("recording/list")["errcode"] == 0
    assert logins(sim) == 1 and sim.counters["refresh_token"] >= 2
    assert valid_access_tokens(sim) == 1


def test_the_old_token_is_revoked_even_when_the_pbx_keeps_it(sim, make_client):
    sim.refresh_revokes_access = False
    client = make_client(sim)
    old = client.login()
    new = client.token_failed(old)  # as if the PBX had refused it: renewed by refresh
    assert new != old and logins(sim) == 1
    assert valid_access_tokens(sim) == 1


def test_an_expired_refresh_token_means_a_new_login(sim, make_client):
    client = make_client(sim)
    client.login()
    sim.expire_all_tokens()  # access and refresh tokens both
    assert client.call("recording/list")["errcode"] == 0
    assert logins(sim) == 2 and sim.counters["refresh_token"] == 1
    assert valid_access_tokens(sim) == 1


def test_logout_deletes_the_token_and_none_is_got_after_it(sim, make_client):
    client = make_client(sim)
    client.login()
    client.logout()  # the mount is stopping; downloads may still be ending
    assert valid_access_tokens(sim) == 0
    with pytest.raises(errors.PbxUnavailableError, match="ended"):
        client.current_token()
    assert logins(sim) == 1


def test_an_expired_token_is_recognised_by_its_errmsg_alone(sim, make_client):
    client = make_client(sim)
    client.login()
    sim.api_raw_reply["recording/list"] = b'{"errcode": 99999, "errmsg": "Token expired, log in"}'
    with pytest.raises(errors.TokenError):
        client.call("recording/list")
    assert client.stats.renewals == 1  # it renewed, and asked once more


@pytest.mark.parametrize("reply, error", [
    (b'{"errcode": 30001, "errmsg": "RECORDING NOT FOUND"}', errors.RecordingNotFoundError),
    (b'{"errcode": 30004, "errmsg": "DOWNLOAD FAILED"}', errors.ApiError),
    (b'{"errcode": 30003, "errmsg": "DOWNLOAD BUSY"}', errors.PbxUnavailableError),
    (b'{"no": "errcode"}', errors.PbxUnavailableError),
    (b"[" * 100_000, errors.PbxUnavailableError),
    (b"<html>login</html>", errors.PbxUnavailableError),
])
def test_every_failure_is_an_errors_type(sim, make_client, reply, error):
    client = make_client(sim)
    sim.api_raw_reply["recording/download"] = reply
    with pytest.raises(error):
        client.open_recording("20240310143000-1.1-1001-2002-Inbound.wav")


# -- downloads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("range_mode", ["ignore", "honour"])
def test_downloads_are_exact_and_resume_where_the_pbx_lets_them(sim, make_client, range_mode):
    rec = add(sim, duration_s=20)
    sim.range_mode = range_mode
    client = make_client(sim)
    assert hashlib.sha256(read_all(client.open_recording(rec.name))).hexdigest() == rec.sha256
    stream = client.open_recording(rec.name, offset=100_000)
    assert stream.start_offset == (100_000 if range_mode == "honour" else 0)
    assert read_all(stream) == sim.recording_bytes(rec.name)[stream.start_offset:]


def test_a_resource_url_is_reused_within_its_lifetime(sim, make_client):
    rec = add(sim)
    client = make_client(sim)
    for _ in range(3):
        assert hashlib.sha256(read_all(client.open_recording(rec.name))).hexdigest() == rec.sha256
    assert (sim.counters["recording/download"], sim.counters["download"]) == (1, 3)
    assert client.links_reusable is True


def test_single_use_urls_are_learned_and_then_never_reused(sim, make_client):
    first, second = add(sim, minutes_ago=30), add(sim, minutes_ago=31)
    sim.resource_single_use = True
    client = make_client(sim)
    for rec in (first, first, second, second):
        assert hashlib.sha256(read_all(client.open_recording(rec.name))).hexdigest() == rec.sha256
    # One refused reuse taught it; from then on every download asks for its own URL.
    assert (sim.counters["recording/download"], sim.counters["download"]) == (4, 5)
    assert client.links_reusable is False


def test_a_deleted_recording_is_not_found_even_through_a_kept_url(sim, make_client):
    rec = add(sim)
    client = make_client(sim)
    read_all(client.open_recording(rec.name))
    sim.delete_recording(rec.name)
    with pytest.raises(errors.RecordingNotFoundError):
        client.open_recording(rec.name)


def test_a_token_refused_mid_download_is_renewed_and_the_download_made(sim, make_client):
    rec = add(sim)
    client = make_client(sim)
    client.login()
    sim.expire_all_tokens()
    assert hashlib.sha256(read_all(client.open_recording(rec.name))).hexdigest() == rec.sha256
    assert logins(sim) == 2


@pytest.mark.parametrize("link", ["http://192.0.2.9/api/download/x.wav", "//192.0.2.9/x.wav", "api/x.wav"])
def test_a_resource_url_off_the_pbx_never_gets_the_token(sim, make_client, link):
    client = make_client(sim)
    sim.api_raw_reply["recording/download"] = (
        b'{"errcode": 0, "errmsg": "SUCCESS", "download_resource_url": "' + link.encode() + b'"}')
    with pytest.raises(errors.PbxUnavailableError, match="no resource path"):
        client.open_recording("20240310143000-1.1-1001-2002-Inbound.wav")


def test_mp3_recordings_are_downloaded_one_at_a_time(sim, make_client, monkeypatch):
    first = add(sim, name="20240310143000-1.1-1001-2002-Inbound.mp3", minutes_ago=30)
    second = add(sim, name="20240310143100-1.2-1001-2002-Inbound.mp3", minutes_ago=31)
    sim.mp3_single_download = True
    client = make_client(sim)
    running = client.open_recording(first.name)
    opened = []
    waiter = threading.Thread(target=lambda: opened.append(client.open_recording(second.name)))
    waiter.start()
    time.sleep(0.3)
    assert not opened  # waits for the slot instead of meeting the PBX's 30003
    assert read_all(running) == sim.recording_bytes(first.name)
    waiter.join(5)
    assert read_all(opened[0]) == sim.recording_bytes(second.name)
    monkeypatch.setattr(client_module, "MP3_SLOT_WAIT_S", 0.2)
    held = client.open_recording(first.name)
    with pytest.raises(errors.PbxUnavailableError, match="one at a time"):
        client.open_recording(second.name)
    held.close()
    assert sim.counters["download"] == 3


# -- records ----------------------------------------------------------------------------------


@pytest.mark.parametrize("date, time_, pattern", [
    ("DD/MM/YYYY", "HH:mm:ss", "%d/%m/%Y %H:%M:%S"),
    ("MM/DD/YYYY", "hh:mm:ss A", "%m/%d/%Y %I:%M:%S %p"),
    ("YYYY-MM-DD", "HH:mm", "%Y-%m-%d %H:%M"),
    ("MMM D, YYYY", "HH:mm:ss", None),
    (None, "HH:mm:ss", None),
    ("DD%MM", "HH", "%d%%%m %H"),
])
def test_display_formats_become_strptime_patterns(date, time_, pattern):
    assert display_pattern(date, time_) == pattern


def test_rows_are_read_strictly():
    times = DisplayTimes()
    row = {"id": 7, "time": "01/12/2022 17:36:24", "uid": "1641980184.7", "call_from": "2002",
           "call_to": 2005, "duration": 15, "size": 240044, "call_type": "Internal",
           "file": "20220112173624-1641980184.7-2002-2005-Internal.wav"}
    rec = recording_from_row(row, times)
    assert (rec.name, rec.timestart, rec.callto, rec.talk_s, rec.size_bytes) == (
        row["file"], "2022-12-01 17:36:24", "2005", 15, 240044)
    assert recording_from_row({**row, "time": "garbage", "size": "240044"}, times).timestart == "2022-01-12 17:36:24"
    assert recording_from_row({**row, "size": -1}, times).size_bytes is None
    assert recording_from_row({**row, "size": True}, times).size_bytes is None
    for bad in ({**row, "file": 20220112}, {**row, "file": ""}, "a row", None):
        assert recording_from_row(bad, times) is None


# -- the catalogue -----------------------------------------------------------------------------


def catalogue_of(client, clock=None):
    return SearchCatalogue(client, clock or client.clock, DisplayTimes())


def test_backfill_pages_through_every_window_with_exact_sizes(sim, make_client, monkeypatch):
    monkeypatch.setattr(catalogue_module, "PAGE_SIZE", 7)
    recordings = sim.populate(40, days=5)
    catalogue = catalogue_of(make_client(sim))
    batches = list(catalogue.backfill(6 * 86400))
    assert max(map(len, batches)) == 7
    found = {rec.name: rec for batch in batches for rec in batch}
    assert {name: rec.size_bytes for name, rec in found.items()} == {r.name: r.size_bytes for r in recordings}
    searches = [e["query"] for e in sim.requests_log if e["endpoint"] == "recording/search"]
    assert all(q["sort_by"] == "time" and q["order_by"] == "asc" for q in searches)
    assert "end_time" not in searches[-1]  # the last window is open: a clock running fast loses nothing


def test_a_poll_reaches_back_past_failures(sim, make_client):
    client = make_client(sim)
    catalogue = catalogue_of(client)
    old = add(sim, minutes_ago=2 * 60)
    assert [rec.name for rec in catalogue.poll()] == [old.name]
    too_old = add(sim, minutes_ago=5 * 60)
    assert too_old.name not in [rec.name for rec in catalogue.poll()]  # beyond the lookback: a resync's
    sim.refuse_connections = True
    with pytest.raises(errors.PbxUnavailableError):
        catalogue.poll()
    sim.refuse_connections = False
    late = add(sim, minutes_ago=1)
    assert {old.name, late.name} <= {rec.name for rec in catalogue.poll()}


def test_bad_rows_are_counted_and_skipped(sim, make_client):
    good = add(sim)
    sim.api_raw_reply["recording/search"] = (
        b'{"errcode": 0, "errmsg": "SUCCESS", "total_number": 3, "data": [{"file": 7}, "x", '
        b'{"file": "' + good.name.encode() + b'", "size": 1}]}')
    catalogue = catalogue_of(make_client(sim))
    assert [rec.name for rec in catalogue.poll()] == [good.name]
    assert catalogue.status()["catalogue_bad_rows"] == 2


def test_the_zone_and_display_format_come_from_system_information(make_sim, make_client):
    sim = make_sim(tz=zoneinfo.ZoneInfo("Asia/Kolkata"), time_format="%m/%d/%Y %I:%M:%S %p")
    rec = sim.add_recording(start=datetime.datetime(2024, 3, 10, 14, 30), duration_s=4, announce=False)
    clock = PbxClock()
    client = make_client(sim, clock=clock)
    catalogue = catalogue_of(client, clock)
    found = [r for batch in catalogue.backfill(30 * 86400 + (time.time() - 1710061200)) for r in batch]
    assert clock.zone()[0].utcoffset(None) == datetime.timedelta(hours=5, minutes=30)
    assert clock.status()["pbx_timezone_source"] == "detected"
    assert [(r.name, r.timestart) for r in found] == [(rec.name, "2024-03-10 14:30:05")]


# -- the probe ---------------------------------------------------------------------------------


def config_for(url: str) -> Config:
    return Config(mountpoint="/mnt", pbx_url=url, username="api", password=SECRET)


def test_the_probe_tells_the_families_apart_without_a_login(sim):
    assert auto.probe(config_for(sim.base_url)) == "p-series"
    assert logins(sim) == 0 and sim.counters["get_token"] == 1
    with Simulator(password=SECRET) as s_series:
        assert auto.probe(config_for(s_series.base_url)) == "s-series"
        assert s_series.counters["login"] == 0
    with pytest.raises(errors.PbxUnavailableError):
        auto.probe(config_for("http://127.0.0.1:9"))
