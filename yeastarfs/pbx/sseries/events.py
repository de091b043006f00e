"""S-Series events: what a NewCdr looks like (yeastar-api.md §7.3, §7.4), and the HTTP
receiver the PBX pushes them to (Report Method "HTTP", §7.1).

Owns: the event check (`payload_problem`), the identity of a NewCdr (its ``callid``, else its
recording name), and `NEW_CDR`, the `events.EventFormat` both S-Series transports use.

Leaves to others: the hardened HTTP server, deduplication and dispatch (``pbx/events.py``,
shared by both families), reading an event's fields and misspellings (`records`), the TCP
event port (`tcpevents`).

Threading: pure functions; `EventReceiver` and `EventSink` are the shared ones (see there).
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Optional

from yeastarfs.models import Recording
from yeastarfs.pbx import events
from yeastarfs.pbx.events import MAX_BODY_BYTES, Counters, EventFormat, NewCall, Throttle
from yeastarfs.pbx.sseries.records import event_name, recording_from_event

__all__ = ["Counters", "EventReceiver", "EventSink", "NEW_CDR", "Throttle", "payload_problem"]

# The PBX's default port for HTTP events (yeastar-api.md §7.1).
DEFAULT_HTTP_PORT = 8260


def payload_problem(payload: Any) -> Optional[str]:
    """Why *payload* is not a usable event, or None.

    Only the fields the transports rely on are checked; `records` copes with the others.
    A number as ``recording`` is refused here because `records` would turn it into a name.
    """
    if not isinstance(payload, dict):
        return f"a JSON {type(payload).__name__} instead of an object"
    for key in ("event", "action", "recording"):
        if payload.get(key) is not None and not isinstance(payload[key], str):
            return f"{key!r} is a {type(payload[key]).__name__}, not a string"
    return None


def _dedup_key(payload: dict, recording: Optional[Recording]) -> Optional[tuple[str, str]]:
    """The identity of a NewCdr: its callid, else its recording name; None if it has neither."""
    if recording is not None:
        callid = recording.callid
    else:
        raw = payload.get("callid")
        valid = isinstance(raw, (str, int, float)) and not isinstance(raw, bool)
        callid = str(raw).strip() if valid else ""
    if callid:
        return ("callid", callid)
    if recording is not None:
        return ("recording", recording.name)
    return None


def _new_cdr(payload: dict) -> Optional[NewCall]:
    if event_name(payload).lower() != "newcdr":
        return None
    recording = recording_from_event(payload)
    return NewCall(_dedup_key(payload, recording), recording)


NEW_CDR = EventFormat(problem=payload_problem, new_call=_new_cdr)


class EventReceiver(events.EventReceiver):
    """The shared receiver, reading NewCdr events, on the PBX's default port unless told."""

    def __init__(self, on_recording: Callable[[Recording], None], *, host: str = "0.0.0.0",
                 port: int = DEFAULT_HTTP_PORT, allowed_ips: Optional[Collection[str]] = None,
                 max_body_bytes: int = MAX_BODY_BYTES, on_event: Optional[Callable[[dict], None]] = None) -> None:
        super().__init__(on_recording, event_format=NEW_CDR, host=host, port=port, allowed_ips=allowed_ips,
                         max_body_bytes=max_body_bytes, on_event=on_event)


class EventSink(events.EventSink):
    """The shared sink, reading NewCdr events (the TCP event client's)."""

    def __init__(self, on_recording: Callable[[Recording], None], on_event: Optional[Callable[[dict], None]],
                 stats: Counters, thread_name: str) -> None:
        super().__init__(on_recording, on_event, stats, thread_name, NEW_CDR)
