"""What a recording is, whatever PBX family reported it, and which names are safe.

Pure functions and a frozen dataclass: no I/O, no logging, no locks, safe on any thread.
Reading a recording out of a PBX's own formats (the S-Series CDR CSV and NewCdr events,
with their misspelt fields) is the business of that family's package under ``pbx/``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import unicodedata
from typing import Any, Optional

# Longest name Linux accepts for one path component (NAME_MAX), in UTF-8 bytes.
NAME_MAX_BYTES = 255
# The leading "YYYYMMDDhhmmss" of every recording name (yeastar-api.md §8.1).
TIMESTAMP_CHARS = 14
# Unicode format characters (Cf: U+202E right-to-left override, U+200B zero-width space…)
# and line/paragraph separators (Zl, Zp) display a name as something it is not in terminals
# and file managers: refused like control characters.
_SPOOFING_CATEGORIES = ("Cf", "Zl", "Zp")


@dataclasses.dataclass(frozen=True)
class Recording:
    """One call recording the PBX holds, with the CDR fields known about its call.

    Attributes:
        name: the PBX's file name, the recording's only identifier in the API.
        callid…sn: CDR fields as the PBX sent them ("" when unknown).
        call_s, talk_s: call and talk durations in whole seconds (None when unknown).
        size_bytes: the recording's exact size when the PBX's catalogue lists it (the
            P-Series does), else None: then only a download learns it.
    """

    name: str
    callid: str = ""
    timestart: str = ""
    callfrom: str = ""
    callto: str = ""
    call_s: Optional[int] = None
    talk_s: Optional[int] = None
    src_trunk: str = ""
    dst_trunk: str = ""
    status: str = ""
    call_type: str = ""
    pincode: str = ""
    did: str = ""
    sn: str = ""
    size_bytes: Optional[int] = None

    @property
    def start(self) -> dt.datetime:
        """The timestamp leading the name, naive, in the PBX's local time."""
        return name_timestamp(self.name)


def name_timestamp(name: str) -> dt.datetime:
    """Return the naive local datetime that leads *name*. Raises ValueError."""
    stamp = name[:TIMESTAMP_CHARS]
    if len(stamp) != TIMESTAMP_CHARS or not stamp.isascii() or not stamp.isdigit():
        raise ValueError("name does not start with YYYYMMDDhhmmss")
    return dt.datetime.strptime(stamp, "%Y%m%d%H%M%S")


def name_problem(name: Any) -> Optional[str]:
    """Return why *name* must never become a file name, or None when it is safe.

    The rule is yeastar-api.md §12.9, plus a valid leading timestamp, because the
    date folders are built from it.
    """
    if not isinstance(name, str) or not name:
        return "empty or not a string"
    if name in (".", ".."):
        return "is . or .."
    if "/" in name or "\\" in name:
        return "contains a slash or backslash"
    if any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in name):
        return "contains NUL or a control character"
    if any(unicodedata.category(ch) in _SPOOFING_CATEGORIES for ch in name if ord(ch) >= 160):
        return "contains an invisible format or line/paragraph separator character"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode"
    if len(encoded) > NAME_MAX_BYTES:
        return f"is longer than {NAME_MAX_BYTES} bytes"
    try:
        name_timestamp(name)
    except ValueError:
        return "does not start with a valid YYYYMMDDhhmmss timestamp"
    return None
