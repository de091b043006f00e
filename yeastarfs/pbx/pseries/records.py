"""Recordings out of the P-Series' own formats: ``recording/search`` rows, 30012 (New CDR)
events, and times written in the PBX's display format (yeastar-p-series-api.md).

Owns:
    DisplayTimes     how the PBX writes times (``system/information``'s date and time format,
                     ``DD/MM/YYYY`` ``HH:mm:ss``) as a strptime pattern, and reading them;
    recording_from_row    a list row as a `Recording` (exact ``size`` included);
    NEW_CDR_FORMAT   the `events.EventFormat` of 30012 events, whose ``msg`` is a JSON string
                     inside the JSON, decoded strictly: a string holding one JSON object, no
                     NaN, nothing else.

Every field is checked for its type: a number where a name belongs is refused, not turned
into a name. Names are not judged here: the index refuses unsafe ones (`models.name_problem`).

Threading: pure functions, plus `DisplayTimes`, whose pattern is replaced by one assignment
(the catalogue learns it; event threads read it), so readers see the old or the new one.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any, Optional

from yeastarfs.models import Recording, name_timestamp
from yeastarfs.pbx.clock import CALL_TIME_FORMAT
from yeastarfs.pbx.events import EventFormat, NewCall

TOPIC_NEW_CDR = 30012
# Yeastar's display tokens and the strptime directives they stand for; longest first.
_DISPLAY_TOKENS = {"YYYY": "%Y", "YY": "%y", "MM": "%m", "DD": "%d", "HH": "%H", "hh": "%I",
                   "mm": "%M", "ss": "%S", "A": "%p", "a": "%p"}
_TOKEN_RE = re.compile("|".join(sorted(_DISPLAY_TOKENS, key=len, reverse=True)) + "|[A-Za-z]")
# Until the PBX says otherwise: the format of the guide's example, "01/12/2022 17:36:24".
DEFAULT_PATTERN = "%d/%m/%Y %H:%M:%S"


def display_pattern(date_format: Any, time_format: Any) -> Optional[str]:
    """The strptime pattern of Yeastar's *date_format* and *time_format* (``DD/MM/YYYY``,
    ``HH:mm:ss``); None when either is not text made of known tokens and punctuation."""
    parts = []
    for text in (date_format, time_format):
        if not isinstance(text, str) or not text.strip() or len(text) > 40:
            return None
        spelled, unknown = [], False
        for piece in re.split(f"({_TOKEN_RE.pattern})", text.strip()):
            if piece in _DISPLAY_TOKENS:
                spelled.append(_DISPLAY_TOKENS[piece])
            elif piece.isalpha():
                unknown = True  # a token we cannot read (MMM, dddd...)
            else:
                spelled.append(piece.replace("%", "%%"))
        if unknown:
            return None
        parts.append("".join(spelled))
    return " ".join(parts)


class DisplayTimes:
    """The PBX's display format, as learned from ``system/information``.

    Attributes:
        pattern: the strptime pattern in use.
        learned: whether the PBX said it (False: the guide's example format is assumed).
    """

    def __init__(self) -> None:
        self.pattern = DEFAULT_PATTERN
        self.learned = False

    def learn(self, pattern: str) -> None:
        self.pattern, self.learned = pattern, True

    def parse(self, text: Any) -> Optional[dt.datetime]:
        """*text* as a naive PBX wall time, or None when it is not written that way."""
        if not isinstance(text, str) or len(text) > 64:
            return None
        try:
            return dt.datetime.strptime(text.strip(), self.pattern)
        except ValueError:
            return None

    def call_time(self, text: Any, name: str = "") -> str:
        """*text* as ``yyyy-mm-dd hh:mm:ss``; else the timestamp leading *name*; else ""."""
        moment = self.parse(text)
        if moment is None:
            try:
                moment = name_timestamp(name)
            except ValueError:
                return ""
        return moment.strftime(CALL_TIME_FORMAT)


def _text(value: Any) -> str:
    """A field as text: strings and numbers (ids, extensions) are; anything else is ""."""
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, (str, int)):
        return str(value).strip()
    return ""


def _seconds(value: Any) -> Optional[int]:
    """Whole non-negative seconds from 14 or "14"; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def recording_from_row(row: Any, times: DisplayTimes) -> Optional[Recording]:
    """The `Recording` a ``recording/list`` or ``recording/search`` row lists; None when the
    row is not an object or its ``file`` is not a non-empty string.

    ``time`` (when the recording began) becomes ``timestart``; ``duration`` is the talk
    time; ``size`` the exact size (kept only when it is a non-negative integer).
    """
    if not isinstance(row, dict):
        return None
    name = row.get("file")
    if not isinstance(name, str) or not name:
        return None
    size = row.get("size")
    return Recording(
        name=name, callid=_text(row.get("uid")), timestart=times.call_time(row.get("time"), name),
        callfrom=_text(row.get("call_from")), callto=_text(row.get("call_to")),
        talk_s=_seconds(row.get("duration")), call_type=_text(row.get("call_type")),
        size_bytes=size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None)


# -- events -------------------------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_message(payload: dict) -> tuple[Optional[dict], Optional[str]]:
    """The object inside a 30012 event's ``msg`` (a JSON string), or why there is none."""
    msg = payload.get("msg")
    if not isinstance(msg, str):
        return None, f"'msg' is a {type(msg).__name__}, not a JSON string"
    try:
        inner = json.loads(msg, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        return None, f"'msg' is not JSON ({str(exc)[:80]})"
    if not isinstance(inner, dict):
        return None, f"'msg' holds a JSON {type(inner).__name__}, not an object"
    recording = inner.get("recording")
    if recording is not None and not isinstance(recording, str):
        return None, f"'recording' is a {type(recording).__name__}, not a string"
    return inner, None


def event_problem(payload: Any) -> Optional[str]:
    """Why *payload* is not a usable P-Series event, or None."""
    if not isinstance(payload, dict):
        return f"a JSON {type(payload).__name__} instead of an object"
    topic = payload.get("type")
    if isinstance(topic, bool) or not isinstance(topic, int):
        return "'type' is not a number"
    if topic == TOPIC_NEW_CDR:
        return decode_message(payload)[1]
    return None


def new_cdr_format(times: DisplayTimes) -> EventFormat:
    """The `EventFormat` of 30012 events, reading ``time_start`` with *times*."""

    def new_call(payload: dict) -> Optional[NewCall]:
        if payload.get("type") != TOPIC_NEW_CDR:
            return None
        msg, _ = decode_message(payload)
        if msg is None:
            return None
        name, callid = _text(msg.get("recording")), _text(msg.get("call_id"))
        recording = None
        if name:
            recording = Recording(
                name=name, callid=callid, timestart=times.call_time(msg.get("time_start")),
                callfrom=_text(msg.get("call_from")), callto=_text(msg.get("call_to")),
                call_s=_seconds(msg.get("call_duration")), talk_s=_seconds(msg.get("talk_duration")),
                src_trunk=_text(msg.get("src_trunk_name")), dst_trunk=_text(msg.get("dst_trunk_name")),
                status=_text(msg.get("status")), call_type=_text(msg.get("type")),
                did=_text(msg.get("did_number")), sn=_text(payload.get("sn")))
        key = ("callid", callid) if callid else (("recording", name) if name else None)
        return NewCall(key, recording)

    return EventFormat(problem=event_problem, new_call=new_call)
