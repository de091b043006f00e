"""P-Series events against the simulator: New CDR over the WebSocket within a second, the
heartbeat that keeps it, reconnection and resubscription after a drop and after every token
renewal, webhooks through the shared hardened receiver, ``msg`` decoded strictly, and wss
with the mount's TLS options (a pin is checked before the token is sent)."""

from __future__ import annotations

import datetime
import json
import time
import urllib.request

import pytest

from harness import free_port, holds_for, wait_until
from yeastarfs import errors
from yeastarfs.config import Config
from yeastarfs.pbx.pseries import PSeriesPbx
from yeastarfs.pbx.pseries import websocket as websocket_module
from yeastarfs.pbx.pseries.records import DisplayTimes, event_problem, new_cdr_format
from yeastarfs.pbx.pseries.websocket import WebSocket
from yeastarfs.sim import PSeriesSimulator

SECRET = "events-secret-1"


@pytest.fixture
def make_pbx():
    """Start a simulator and a PSeriesPbx on it; ``make_pbx(sim_options, **config)`` returns
    (sim, pbx, recordings announced so far)."""
    started = []

    def make(sim_options=None, **config):
        sim = PSeriesSimulator(password=SECRET, **(sim_options or {})).start()
        options = {"events_port": 0, "events_host": "127.0.0.1", **config}
        pbx = PSeriesPbx(Config(mountpoint="/mnt", pbx_url=sim.base_url, username="api", password=SECRET,
                                **options))
        started.append((sim, pbx))
        got = []
        pbx.start(got.append)
        return sim, pbx, got

    yield make
    for sim, pbx in started:
        pbx.stop()
        sim.stop()


def announce(sim, seconds_ago=60):
    return sim.add_recording(start=datetime.datetime.now() - datetime.timedelta(seconds=seconds_ago),
                             duration_s=5, announce=True)


def arrives(got, rec, timeout_s):
    wait_until(lambda: rec.name in [r.name for r in got], timeout_s, message=f"{rec.name} announced")


def test_a_new_cdr_arrives_within_a_second_with_its_fields(make_pbx):
    sim, pbx, got = make_pbx()
    wait_until(lambda: sim.counters["ws_subscribe"] == 1, 5, message="the subscription")
    rec = announce(sim)
    sent = time.monotonic()
    arrives(got, rec, 1.0)
    assert time.monotonic() - sent < 1.0
    event = next(r for r in got if r.name == rec.name)
    assert (event.callid, event.callfrom, event.call_s, event.talk_s) == (rec.callid, rec.callfrom, rec.call_s,
                                                                         rec.talk_s)
    assert event.timestart == rec.timestart and event.size_bytes is None
    topics = [e for e in sim.requests_log if e["endpoint"] == "subscribe"]
    assert topics[0]["user_agent"] == "OpenAPI"


def test_a_dropped_websocket_is_reconnected_and_resubscribed(make_pbx):
    sim, pbx, got = make_pbx()
    wait_until(lambda: sim.counters["ws_subscribe"] == 1, 5, message="the subscription")
    sim.drop_websockets()
    wait_until(lambda: sim.counters["ws_subscribe"] == 2, 5, message="a second subscription")
    arrives(got, announce(sim), 1.0)
    assert pbx.status()["websocket_connected"] is True


def test_every_token_renewal_resubscribes_at_once(make_pbx):
    sim, pbx, got = make_pbx({"access_token_ttl_s": 2.0})
    for renewals in (1, 2, 3):  # the PBX ends the old subscription as soon as its token is replaced
        wait_until(lambda: sim.counters["ws_subscribe"] == renewals + 1, 3, message="a subscription per token")
        assert pbx.client.stats.renewals == renewals
        arrives(got, announce(sim, seconds_ago=60 + renewals), 1.0)
    assert pbx.client.stats.logins == 1


def test_the_heartbeat_keeps_a_quiet_subscription(make_pbx, monkeypatch):
    monkeypatch.setattr(websocket_module, "HEARTBEAT_INTERVAL_S", 0.3)
    sim, pbx, got = make_pbx({"ws_idle_timeout_s": 1.0})
    wait_until(lambda: sim.counters["ws_subscribe"] == 1, 5, message="the subscription")
    holds_for(lambda: sim.counters["ws_subscribe"] == 1 and sim.websocket_count() == 1, 2.5,
              message="one connection, kept alive by heartbeats")


def test_webhook_events_go_through_the_shared_receiver(make_pbx):
    port = free_port()
    sim, pbx, got = make_pbx({"webhook_url": f"http://127.0.0.1:{port}/yeastar"}, events_port=port)
    sim.drop_websockets()
    sim.drop_websockets = lambda: None
    rec = announce(sim)
    arrives(got, rec, 2.0)
    assert sim.counters["event_push"] >= 1
    hostile = dict(sim.new_cdr_event(rec), msg=json.loads(sim.new_cdr_event(rec)["msg"]))  # not a string
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=json.dumps(hostile).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 400


@pytest.mark.parametrize("msg, problem", [
    ({"recording": "x.wav"}, "not a JSON string"),
    ('"{\\"recording\\": \\"x.wav\\"}"', "holds a JSON str"),
    ("[1, 2]", "holds a JSON list"),
    ('{"recording": "x.wav", "call_duration": NaN}', "not JSON"),
    ('{"recording": 7}', "not a string"),
    ("{", "not JSON"),
])
def test_msg_is_decoded_strictly(msg, problem):
    assert problem in event_problem({"type": 30012, "sn": "1", "msg": msg})


def test_other_topics_and_bad_types_are_told_apart():
    event_format = new_cdr_format(DisplayTimes())
    assert event_problem({"type": 30011, "msg": {"any": "thing"}}) is None
    assert event_format.new_call({"type": 30011, "msg": "{}"}) is None
    assert "type" in event_problem({"type": "30012", "msg": "{}"})
    call = event_format.new_call({"type": 30012, "msg": json.dumps({"call_id": "1.2", "recording": "a.wav"})})
    assert call.key == ("callid", "1.2") and call.recording.name == "a.wav"


@pytest.fixture
def wss_sim(tls_certificate):
    cert, key, _ = tls_certificate
    with PSeriesSimulator(password=SECRET, certfile=cert, keyfile=key) as sim:
        yield sim


def test_wss_follows_the_tls_options_and_checks_a_pin_before_sending_the_token(wss_sim, tls_certificate):
    certificate = tls_certificate
    url = wss_sim.subscribe_url("not-a-token")
    with pytest.raises(errors.PbxUnavailableError, match="TLS verification"):
        WebSocket.connect(url)
    with pytest.raises(errors.PbxUnavailableError, match="--pin-sha256"):
        WebSocket.connect(url, pin_sha256="ab" * 32)
    assert wss_sim.counters["subscribe"] == 0  # nothing was sent
    for options in ({"verify": certificate[0]}, {"pin_sha256": certificate[2]}, {"verify": False}):
        with pytest.raises(errors.PbxUnavailableError, match="errcode 20004"):  # reached the PBX, token refused
            WebSocket.connect(url, headers={"User-Agent": "OpenAPI"}, **options)
    assert wss_sim.counters["subscribe"] == 3
