"""yeastarfs.models and pbx.sseries.records: the name safety rule (yeastar-api.md §12.9), Recording from CDR fields and
NewCdr events (§7.3, §7.4, §11), and the CDR CSV parser (§5.3, §12.5)."""

from __future__ import annotations

import datetime as dt

import pytest

from harness import new_cdr
from yeastarfs.models import NAME_MAX_BYTES, Recording, name_problem, name_timestamp
from yeastarfs.pbx.sseries.records import (CdrParseResult, event_name, parse_cdr_csv, recording_from_event,
                                          recording_from_fields)

# yeastar-api.md §8.1, every name listed there (the `_` call-id variant included).
REAL_NAMES = [
    "20191024012719-1571909237.191-4000-4001-Internal.wav",
    "20170901181806-1504261084.7-1001-1003-Internal.wav",
    "20170724103619-1500860177.268-2000-2001-Internal.wav",
    "20191024201242-1571897930.5-203-201-Internal.wav",
    "20170914093038-1505352615.274-1000-91000-Outbound.wav",
    "20170914092747-1505352445.265-102-1000-Inbound.wav",
    "20190426155521-1556265319.2739-9001-9002-Internal.wav",
    "20251104173706-1762252614_105999-104-0819979336-Outbound.wav",
    "20251201175254-1764586296.121193-0634654956-102-Inbound.wav",
]

NAME = "20191024201242-1571897930.5-203-201-Internal.wav"
STAMP = "20261127101500"

# The exact header of yeastar-api.md §5.3 / §12.5.
HEADER = ("callid,timestart,callfrom,callto,callduraction,talkduraction,srctrunkname,dsttrunkname,"
          "status,type,pincode,recording,didnumber,sn")


def csv_row(callid="1764236100.1", timestart="2026-11-27 10:14:38", callfrom="1001", callto="1002",
            call="42", talk="34", src="", dst="", status="ANSWERED", kind="Internal", pincode="",
            recording="", did="", sn="369392534749") -> str:
    return ",".join([callid, timestart, callfrom, callto, call, talk, src, dst, status, kind, pincode,
                     recording, did, sn])


# -- name_problem ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_NAMES)
def test_real_names_are_safe(name):
    assert name_problem(name) is None


@pytest.mark.parametrize("name", [
    STAMP + "-1.1-+31612345678-1001-Inbound.wav",      # '+', '*', '#': UNCONFIRMED but harmless
    STAMP + "-1.1-*97-1001-Internal.wav",
    STAMP + "-1.1-#1-1001-Internal.wav",
    STAMP + "-1.1-1001-1002 copy-Internal.wav",
    STAMP + "-1.1-Jürgen-1001-Internal.wav",          # non-ASCII is fine when it is valid UTF-8
    STAMP + ".gsm",
    STAMP,                                             # nothing but the timestamp
    STAMP + "...",                                     # dots are only forbidden as "." / ".."
])
def test_unusual_but_harmless_names_are_safe(name):
    assert name_problem(name) is None


@pytest.mark.parametrize("name, words", [
    (STAMP + "-1.1-1001/../../etc/passwd", "slash"),
    (STAMP + "-a/b.wav", "slash"),
    ("/" + STAMP + ".wav", "slash"),
    (STAMP + "-a\\b.wav", "backslash"),
    (STAMP + "-a\x00b.wav", "control"),
    (STAMP + "\x00", "control"),
    (STAMP + "-a\nb.wav", "control"),
    (STAMP + "-a\rb.wav", "control"),
    (STAMP + "-a\tb.wav", "control"),
    (STAMP + "-a\x1bb.wav", "control"),       # ESC: terminal escape sequences in `ls`
    (STAMP + "-a\x1fb.wav", "control"),
    (STAMP + "-a\x7fb.wav", "control"),       # DEL
    (STAMP + "-a\x85b.wav", "control"),       # NEL, a C1 control
    (STAMP + "-a\x9fb.wav", "control"),
    (".", ". or .."),
    ("..", ". or .."),
    ("", "empty"),
])
def test_hostile_names_are_rejected_with_a_reason(name, words):
    problem = name_problem(name)
    assert problem is not None
    assert words in problem


@pytest.mark.parametrize("value", [None, 20261127101500, b"20261127101500.wav", ["x"], 1.5, True])
def test_non_strings_are_rejected(value):
    assert name_problem(value) is not None


@pytest.mark.parametrize("name", [
    STAMP + "-\ud800.wav",           # lone high surrogate (json.loads produces these from "\ud800")
    STAMP + "-\udcff.wav",           # lone low surrogate (surrogateescape'd byte)
    "\udfff" + STAMP,
])
def test_lone_surrogates_are_rejected(name):
    assert name_problem(name) is not None


def _name_of_bytes(total_bytes: int, tail: str = "") -> str:
    """A name with a valid timestamp, padded with 'x' so that it is *total_bytes* in UTF-8."""
    pad = total_bytes - len(STAMP) - len(tail.encode("utf-8"))
    name = STAMP + "x" * pad + tail
    assert len(name.encode("utf-8")) == total_bytes
    return name


def test_length_limit_is_255_utf8_bytes():
    assert NAME_MAX_BYTES == 255
    assert name_problem(_name_of_bytes(255)) is None
    assert "255" in name_problem(_name_of_bytes(256))
    assert name_problem(_name_of_bytes(4000)) is not None


@pytest.mark.parametrize("char", ["é", "€", "😀"])  # 2, 3 and 4 bytes in UTF-8
def test_length_limit_counts_bytes_not_characters_at_the_boundary(char):
    width = len(char.encode("utf-8"))
    fits = _name_of_bytes(255, tail=char)
    too_long = _name_of_bytes(256, tail=char)
    assert name_problem(fits) is None
    assert name_problem(too_long) is not None
    # The character count alone would have let it through.
    assert len(too_long) == 256 - width + 1 < 256


@pytest.mark.parametrize("name", [
    "recording.wav",                       # no timestamp at all
    "2026112710150-1.1-1-2-Internal.wav",  # 13 digits
    "2026112710150",                       # too short
    "20261340101500-1.1-1-2-Internal.wav",  # month 13, day 40
    "20261300101500-1.1-1-2-Internal.wav",  # month 13
    "20261100101500-1.1-1-2-Internal.wav",  # day 0
    "20260230101500-1.1-1-2-Internal.wav",  # 30 February
    "20250229101500-1.1-1-2-Internal.wav",  # 29 February of a common year
    "20261127246000-1.1-1-2-Internal.wav",  # hour 24
    "20261127106000-1.1-1-2-Internal.wav",  # minute 60
    "2026-11-27 10:15:00-1.1-1-2.wav",     # a CDR timestart, not a name stamp
    "２０２６１１２７１０１５００-x.wav",    # full-width digits: str.isdigit() says yes
    " 20261127101500-1.1-1-2-Internal.wav",  # leading space
    "+2026112710150-1.1-1-2-Internal.wav",
])
def test_names_without_a_valid_leading_timestamp_are_rejected(name):
    problem = name_problem(name)
    assert problem is not None
    assert "timestamp" in problem


def test_leap_day_is_a_valid_timestamp():
    assert name_problem("20240229235959-1.1-1-2-Internal.wav") is None
    assert Recording(name="20240229235959-1.1-1-2-Internal.wav").start == dt.datetime(2024, 2, 29, 23, 59, 59)


def test_name_timestamp_is_naive_local_time_from_the_name():
    stamp = name_timestamp(REAL_NAMES[0])
    assert stamp == dt.datetime(2019, 10, 24, 1, 27, 19)
    assert stamp.tzinfo is None
    with pytest.raises(ValueError):
        name_timestamp("20261340101500-x.wav")


# -- recording_from_fields / recording_from_event ---------------------------------------------


def test_v2_event_with_the_documented_misspellings():
    recording = recording_from_event(new_cdr(dsttrcunkname="SIP-out"))
    assert recording == Recording(
        name=NAME, callid="1571897930.5", timestart="2019-10-23 22:18:50", callfrom="1023",
        callto="2023", call_s=19, talk_s=14, src_trunk="", dst_trunk="SIP-out", status="ANSWERED",
        call_type="Internal", pincode="", did="", sn="369451090405")


def test_v1_event_uses_the_action_key():
    payload = new_cdr(key="action")
    assert "event" not in payload
    assert event_name(payload) == "NewCdr"
    recording = recording_from_event(payload)
    assert recording is not None and recording.name == NAME and recording.call_s == 19


def test_event_key_wins_over_action_and_case_is_ignored():
    assert recording_from_event(new_cdr(action="RING")) is not None
    assert recording_from_event({**new_cdr(), "event": "newcdr"}) is not None
    assert recording_from_event({**new_cdr(key="action"), "action": "NEWCDR"}) is not None


@pytest.mark.parametrize("payload", [
    {"event": "RING", "recording": NAME},
    {"action": "ANSWER", "recording": NAME},
    {"recording": NAME},                         # no event name at all
    {"event": ["NewCdr"], "recording": NAME},
    {"event": None, "action": None, "recording": NAME},
    None, [new_cdr()], "NewCdr", 42,
])
def test_anything_but_a_newcdr_dict_is_not_a_recording(payload):
    assert recording_from_event(payload) is None


@pytest.mark.parametrize("key", ["dsttrunkname", "dsttrcunkname", "desttrunkname", "dstrunkname"])
def test_every_spelling_of_the_destination_trunk(key):
    fields = {"recording": NAME, key: "Trunk-9"}
    assert recording_from_fields(fields).dst_trunk == "Trunk-9"


@pytest.mark.parametrize("call_key, talk_key", [
    ("callduraction", "talkduraction"),   # the PBX's spelling
    ("callduration", "talkduration"),     # the correct one, should a firmware fix it
])
def test_duration_spellings(call_key, talk_key):
    recording = recording_from_fields({"recording": NAME, call_key: "19", talk_key: "14"})
    assert (recording.call_s, recording.talk_s) == (19, 14)


@pytest.mark.parametrize("raw, seconds", [
    ("19", 19), (19, 19), (19.0, 19), ("19.0", 19), (" 19 ", 19), ("0", 0), (19.9, 19),
    ("", None), (None, None), ("abc", None), ("-5", None), (-5, None), (True, None), (False, None),
    ([19], None), ({"s": 19}, None), ("nan", None), ("inf", None), (float("inf"), None), ("1e400", None),
])
def test_durations_are_parsed_leniently(raw, seconds):
    recording = recording_from_fields({"recording": NAME, "callduraction": raw, "talkduraction": raw})
    assert recording.call_s == seconds
    assert recording.talk_s == seconds


@pytest.mark.parametrize("raw, text", [
    ("1001", "1001"), (1001, "1001"), (" 1001 ", "1001"), (1001.0, "1001.0"),
    (None, ""), ([1001], ""), ({"n": 1}, ""), (True, ""), (False, ""),
])
def test_text_fields_accept_numbers_and_blank_out_wrong_types(raw, text):
    recording = recording_from_fields({"recording": NAME, "callto": raw, "didnumber": raw, "pincode": raw})
    assert recording.callto == text
    assert recording.did == text
    assert recording.pincode == text


def test_missing_fields_are_empty_or_none():
    # v1 examples omit empty fields entirely (§7.4).
    recording = recording_from_event({"action": "NewCdr", "recording": NAME})
    assert recording == Recording(name=NAME)
    assert recording.call_s is None and recording.talk_s is None
    assert recording.dst_trunk == "" and recording.callid == ""


@pytest.mark.parametrize("value", ["", "   ", None, [], [NAME], {"name": NAME}, True, False])
def test_no_usable_recording_means_no_recording(value):
    assert recording_from_fields({"recording": value, "callid": "1.1"}) is None
    assert recording_from_event(new_cdr(recording=value)) is None


def test_absent_recording_key_means_no_recording():
    payload = new_cdr()
    del payload["recording"]
    assert recording_from_event(payload) is None
    assert recording_from_fields({}) is None


def test_numeric_recording_value_is_taken_as_text():
    # Not validated here: the index applies name_problem.
    recording = recording_from_fields({"recording": 20261127101500})
    assert recording is not None and recording.name == "20261127101500"


def test_unsafe_names_are_passed_through_for_the_index_to_judge():
    recording = recording_from_event(new_cdr(recording="../../etc/passwd"))
    assert recording is not None
    assert name_problem(recording.name) is not None


def test_recording_is_frozen():
    recording = Recording(name=NAME)
    with pytest.raises(Exception):
        recording.name = "other"  # type: ignore[misc]


# -- parse_cdr_csv -----------------------------------------------------------------------------


def names(result: CdrParseResult) -> list[str]:
    return [recording.name for recording in result.recordings]


def test_simulator_format_header_lf_no_quoting():
    text = "\n".join([
        HEADER,
        csv_row(callid="1.1", recording=REAL_NAMES[0], call="19", talk="14", dst="Trunk-A"),
        # the real sample row of §5.3: not recorded
        "1589299528.4,2020-05-12 17:05:28,966024422,110,42,34,MEO,,ANSWERED,Inbound,,,,369392534749",
        csv_row(callid="1.3", recording=REAL_NAMES[7], kind="Outbound"),
    ]) + "\n"
    result = parse_cdr_csv(text)
    assert names(result) == [REAL_NAMES[0], REAL_NAMES[7]]
    assert result.rows == 3 and result.bad_rows == 0
    first = result.recordings[0]
    assert first == Recording(name=REAL_NAMES[0], callid="1.1", timestart="2026-11-27 10:14:38",
                              callfrom="1001", callto="1002", call_s=19, talk_s=14, src_trunk="",
                              dst_trunk="Trunk-A", status="ANSWERED", call_type="Internal",
                              pincode="", did="", sn="369392534749")


def test_bom_and_crlf():
    text = "\ufeff" + "\r\n".join([HEADER, csv_row(recording=NAME), csv_row(recording=REAL_NAMES[1])]) + "\r\n"
    result = parse_cdr_csv(text)
    assert names(result) == [NAME, REAL_NAMES[1]]
    assert result.recordings[0].callid == "1764236100.1"      # the BOM did not stick to "callid"
    assert result.recordings[0].sn == "369392534749"          # no "\r" left on the last column
    assert result.bad_rows == 0


def test_rfc4180_quoting_with_commas_and_quotes_inside_fields():
    header = '"' + HEADER.replace(",", '","') + '"'
    row = ('"1.1","2026-11-27 10:14:38","""Smith, J"" <0612>","1002","42","34","Trunk, A","",'
           '"NO ANSWER","Inbound","","' + NAME + '","0201234567","369392534749"')
    partly_quoted = csv_row(callid="1.2", src='"a ""b"", c"', recording='"' + REAL_NAMES[2] + '"')
    result = parse_cdr_csv("\r\n".join([header, row, partly_quoted]) + "\r\n")
    assert result.bad_rows == 0
    assert names(result) == [NAME, REAL_NAMES[2]]
    first, second = result.recordings
    assert first.callfrom == '"Smith, J" <0612>'
    assert first.src_trunk == "Trunk, A"
    assert first.status == "NO ANSWER"
    assert first.did == "0201234567"
    assert first.call_s == 42
    assert second.src_trunk == 'a "b", c'


def test_a_stray_quote_spoils_only_its_own_row():
    text = "\n".join([
        HEADER,
        csv_row(callid="1.1", callfrom='"Smith', recording=REAL_NAMES[0]),   # unbalanced quote
        csv_row(callid="1.2", recording=REAL_NAMES[1]),
        csv_row(callid="1.3", recording=REAL_NAMES[2]),
    ]) + "\n"
    result = parse_cdr_csv(text)
    assert names(result) == REAL_NAMES[1:3]
    assert (result.rows, result.bad_rows) == (3, 1)


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\x1c", "\x1e"])
def test_only_cr_and_lf_end_a_line(char):
    # str.splitlines() also breaks at these; a caller name holding one must not cost the row.
    text = "\n".join([HEADER, csv_row(callfrom=f"Smith{char}J", recording=NAME),
                      csv_row(callid="1.2", recording=REAL_NAMES[1])]) + "\n"
    result = parse_cdr_csv(text)
    assert names(result) == [NAME, REAL_NAMES[1]]
    assert result.bad_rows == 0
    assert result.recordings[0].callfrom == f"Smith{char}J"


def test_old_mac_line_ends():
    text = "\r".join([HEADER, csv_row(recording=NAME), csv_row(recording=REAL_NAMES[1])]) + "\r"
    assert names(parse_cdr_csv(text)) == [NAME, REAL_NAMES[1]]


def test_unknown_extra_columns_anywhere_are_ignored():
    columns = HEADER.split(",")
    header = ",".join(["agentringtime"] + columns[:5] + ["newfield"] + columns[5:] + ["trailing"])
    values = csv_row(recording=NAME, call="19").split(",")
    row = ",".join(["7"] + values[:5] + ["zzz"] + values[5:] + ["yyy"])
    result = parse_cdr_csv(header + "\n" + row + "\n")
    assert result.bad_rows == 0
    assert result.recordings == [recording_from_fields(dict(zip(columns, values)))]
    assert result.recordings[0].call_s == 19


def test_columns_are_mapped_by_name_not_position():
    columns = HEADER.split(",")
    values = csv_row(recording=NAME, callfrom="1001", callto="1002", call="19", talk="14").split(",")
    order = list(reversed(range(len(columns))))
    header = ",".join(columns[i] for i in order)
    row = ",".join(values[i] for i in order)
    result = parse_cdr_csv(header + "\n" + row + "\n")
    recording = result.recordings[0]
    assert (recording.name, recording.callfrom, recording.callto, recording.call_s, recording.talk_s) == (
        NAME, "1001", "1002", 19, 14)


def test_header_names_are_trimmed_and_case_insensitive():
    header = " CallID , TimeStart,callfrom,callto,callduraction,talkduraction,srctrunkname," \
             "dsttrunkname,status,type,pincode, Recording ,didnumber,sn"
    result = parse_cdr_csv(header + "\n" + csv_row(recording=NAME) + "\n")
    assert names(result) == [NAME]
    assert result.recordings[0].callid == "1764236100.1"


def test_broken_rows_are_counted_and_skipped_and_the_rest_is_used():
    good = [csv_row(callid=f"1.{i}", recording=REAL_NAMES[i]) for i in range(3)]
    text = "\n".join([
        HEADER,
        good[0],
        csv_row(recording="20261127000000-short.wav") + ",extra",    # 15 columns
        "1.9,2026-11-27 10:00:00,1001",                              # 3 columns
        good[1],
        "",                                                          # blank line: not a row
        csv_row(recording="20261127000001-1.1-1-2-Internal.wav").rsplit(",", 1)[0],  # 13 columns
        good[2],
    ]) + "\n"
    result = parse_cdr_csv(text)
    assert names(result) == REAL_NAMES[:3]
    assert result.bad_rows == 3
    assert result.rows == 6


def test_a_row_the_csv_module_rejects_is_counted_and_parsing_goes_on():
    huge = csv_row(recording='"' + "x" * 200_000 + '"')   # beyond csv.field_size_limit()
    text = "\n".join([HEADER, huge, csv_row(recording=NAME)]) + "\n"
    result = parse_cdr_csv(text)
    assert names(result) == [NAME]
    assert result.bad_rows == 1
    assert result.rows == 2   # a bad row is still a row: bad_rows never exceeds rows


def test_rows_without_recording_are_skipped_silently():
    text = "\n".join([HEADER] + [csv_row(callid=f"1.{i}") for i in range(5)]) + "\n"
    result = parse_cdr_csv(text)
    assert result.recordings == [] and result.bad_rows == 0 and result.rows == 5


def test_header_only_is_an_empty_result_not_an_error():
    # The assumed shape of an empty time window (§5.3), with and without a line end.
    for text in (HEADER, HEADER + "\n", HEADER + "\r\n", "\ufeff" + HEADER + "\r\n"):
        result = parse_cdr_csv(text)
        assert (result.recordings, result.rows, result.bad_rows) == ([], 0, 0)


@pytest.mark.parametrize("text", [
    "",
    "\ufeff",
    "\n",
    "callid,timestart,callfrom,callto,status\n1.1,2026-11-27 10:00:00,1,2,ANSWERED\n",  # no recording column
    csv_row(recording=NAME) + "\n",           # data without a header
    '{"status": "Failed", "errno": "10023"}',  # a JSON error body
])
def test_no_header_with_a_recording_column_is_a_value_error(text):
    with pytest.raises(ValueError, match="recording"):
        parse_cdr_csv(text)


def test_parsed_names_keep_the_pbx_spelling_exactly():
    odd = "20261127101500-1764236100.1-+31 6,12-1001-Inbound.wav"
    text = HEADER + "\n" + csv_row(recording='"' + odd + '"') + "\n"
    assert names(parse_cdr_csv(text)) == [odd]


@pytest.mark.parametrize("spoof", ["\u202e", "\u2028", "\u2029", "\u200b", "\ufeff", "\u2066", "\u00ad"])
def test_invisible_format_and_separator_characters_are_refused(spoof):
    # Issue 9: U+202E (right-to-left override) shows "...-Inbound\u202evaw.exe" as something else
    # in terminals and file managers; line/paragraph separators break listings.
    name = f"20261127093012-1795400714.1-1001-2002-Inb{spoof}ound.wav"
    assert "invisible" in name_problem(name)
    assert name_problem("20261127093012-1795400714.1-Müller-2002-Inbound.wav") is None  # letters are fine
