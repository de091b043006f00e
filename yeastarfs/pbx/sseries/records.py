"""Recordings out of the S-Series' own formats: CDR CSV rows and NewCdr events.

The PBX's spellings (``callduraction``, ``dsttrcunkname``…) are undone here so that
nothing outside this package has to know them (yeastar-api.md §5.3, §7.4, §11). Pure
functions: no I/O, no logging, no locks, safe on any thread.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from typing import Any, Mapping, Optional

from yeastarfs.models import Recording

_LINE_END = re.compile(r"\r\n|\r|\n")

# Every spelling of each field seen in the docs, the CSV header and real events, first wins.
_FIELD_ALIASES = {
    "callid": ("callid",),
    "timestart": ("timestart",),
    "callfrom": ("callfrom",),
    "callto": ("callto",),
    "call_s": ("callduraction", "callduration"),
    "talk_s": ("talkduraction", "talkduration"),
    "src_trunk": ("srctrunkname",),
    "dst_trunk": ("dsttrunkname", "dsttrcunkname", "desttrunkname", "dstrunkname"),
    "status": ("status",),
    "call_type": ("type",),
    "pincode": ("pincode",),
    "did": ("didnumber",),
    "sn": ("sn",),
}


def _text(value: Any) -> str:
    """A CDR value as text; numbers are accepted, anything else (lists, null) is ''."""
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, (str, int, float)):
        return str(value).strip()
    return ""


def _seconds(value: Any) -> Optional[int]:
    """Whole seconds from "14", 14 or 14.0; None when absent or not a number."""
    text = _text(value)
    try:
        seconds = int(float(text))
    except (ValueError, OverflowError):
        return None
    return seconds if seconds >= 0 else None


def _pick(fields: Mapping[str, Any], aliases: tuple[str, ...]) -> Any:
    for key in aliases:
        if key in fields:
            return fields[key]
    return None


def recording_from_fields(fields: Mapping[str, Any]) -> Optional[Recording]:
    """Build a Recording from CDR fields (a CSV row or an event), keyed as the PBX spells them.

    Returns None when the call has no recording. The name is not validated here: the
    index decides what to do with an unsafe name (see `name_problem`).
    """
    name = _text(fields.get("recording"))
    if not name:
        return None
    values: dict[str, Any] = {}
    for attr, aliases in _FIELD_ALIASES.items():
        raw = _pick(fields, aliases)
        values[attr] = _seconds(raw) if attr in ("call_s", "talk_s") else _text(raw)
    return Recording(name=name, **values)


def event_name(payload: Mapping[str, Any]) -> str:
    """The event's name: under ``event`` in the v2 format, ``action`` in v1 (§7.3)."""
    return _text(payload.get("event")) or _text(payload.get("action"))


def recording_from_event(payload: Any) -> Optional[Recording]:
    """Return the Recording a NewCdr event announces, or None for any other payload."""
    if not isinstance(payload, dict):
        return None
    if event_name(payload).lower() != "newcdr":
        return None
    return recording_from_fields(payload)


@dataclasses.dataclass
class CdrParseResult:
    """What `parse_cdr_csv` found: the recordings, and the rows it could not use."""

    recordings: list[Recording]
    bad_rows: int = 0
    rows: int = 0


def parse_cdr_csv(text: str) -> CdrParseResult:
    """Parse the CDR CSV the PBX sends (yeastar-api.md §5.3).

    Columns are mapped by header name; a UTF-8 BOM, CRLF line ends, RFC-4180 quoting and
    unknown extra columns are tolerated. Each physical line is parsed on its own, strictly:
    CDR fields never hold line breaks, and a stray quote in one row must not swallow every
    row after it (as a multi-line quoted field would). A row that does not parse, or whose
    column count differs from the header's, is counted in ``bad_rows`` and skipped; rows
    without a recording are skipped silently. Raises ValueError when there is no header
    with a ``recording`` column.
    """
    # Only CR, LF and CRLF end a CSV line; str.splitlines() would also split a field at
    # U+2028, NEL, FF, VT or RS (a caller name may hold one), losing the row's recording.
    lines = _LINE_END.split(text.lstrip("\ufeff"))
    header_row = _csv_row(lines[0]) if lines else None
    header = [column.strip().lstrip("\ufeff").lower() for column in header_row or []]
    if "recording" not in header:
        raise ValueError("CDR CSV has no header row with a 'recording' column")
    result = CdrParseResult(recordings=[])
    for line in lines[1:]:
        if not line.strip():
            continue
        result.rows += 1
        row = _csv_row(line)
        if row is None or len(row) != len(header):
            result.bad_rows += 1
            continue
        recording = recording_from_fields(dict(zip(header, row)))
        if recording is not None:
            result.recordings.append(recording)
    return result


def _csv_row(line: str) -> Optional[list[str]]:
    """The fields of one CSV line, or None when it is malformed (unbalanced quotes, NUL, huge)."""
    try:
        rows = list(csv.reader([line], strict=True))
    except csv.Error:
        return None
    return rows[0] if len(rows) == 1 else None
