"""yeastarfs.config: size and duration units, the cache root, the password, the PBX URL, the
validated Config (whose repr never shows the password), and the option table it is built from
(with the README's options table, which must equal the generated one)."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib

import pytest

from yeastarfs.config import (OPTIONS, OPTIONS_BEGIN, OPTIONS_END, PASSWORD_ENV, Config, check_pbx_url,
                              default_cache_root, options_markdown, parse_duration, parse_flag, parse_size,
                              read_password)
from yeastarfs.errors import ConfigError

SECRET = "s3cret-Passw0rd"
LOGGER = "yeastarfs.config"

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def make_config(**overrides) -> Config:
    values = dict(mountpoint="/mnt/rec", pbx_url="https://192.168.5.150:8088", username="api",
                  password=SECRET, cache_root="/var/tmp/yc")
    values.update(overrides)
    return Config(**values)


# -- parse_size --------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("500M", 500 * MIB),
    ("10G", 10 * GIB),
    ("1.5T", int(1.5 * TIB)),
    ("4096", 4096),
    ("4K", 4 * KIB),
    ("0.5G", GIB // 2),
    ("500m", 500 * MIB),
    (" 10 G ", 10 * GIB),
    ("10GB", 10 * GIB),
    ("10GiB", 10 * GIB),
    ("4096B", 4096),
    ("0", 0),
    (4096, 4096),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected
    assert isinstance(parse_size(text), int)


def test_size_units_are_binary():
    assert parse_size("1K") == 1024
    assert parse_size("1M") == 1024 * 1024
    assert parse_size("1T") == 1024 ** 4


@pytest.mark.parametrize("text", ["", "   ", "abc", "M", "-1G", "+1G", "10X", "10 GG", "1.2.3M", "1e9",
                                  "1,5G", "10 mega", "ten", None])
def test_parse_size_rejects_bad_input_helpfully(text):
    with pytest.raises(ConfigError) as caught:
        parse_size(text)
    message = str(caught.value)
    assert repr(text) in message or str(text) in message   # says what was wrong
    assert "500M" in message                                 # and shows what would be right


# -- parse_duration ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("30d", 30 * 86400),
    ("12h", 12 * 3600),
    ("90m", 90 * 60),
    ("45s", 45),
    ("2w", 14 * 86400),
    ("60", 60),
    ("1.5h", 5400),
    (" 7D ", 7 * 86400),
    ("0s", 0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "d", "-5m", "5y", "1h30m", "ten days", "30 days", "1e3s", "5ms", None])
def test_parse_duration_rejects_bad_input_helpfully(text):
    with pytest.raises(ConfigError) as caught:
        parse_duration(text)
    message = str(caught.value)
    assert "duration" in message and "30d" in message


# -- default_cache_root ------------------------------------------------------------------------


def test_cache_root_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_root() == str(tmp_path / "xdg" / "yeastarfs")


def test_cache_root_under_home_without_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_root() == str(tmp_path / ".cache" / "yeastarfs")


def test_empty_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_root() == str(tmp_path / ".cache" / "yeastarfs")


def test_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
    # XDG Base Directory spec: "If an implementation encounters a relative path in any of these
    # variables it should consider the path invalid and ignore it." A relative cache root would
    # also move with the working directory.
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_root() == str(tmp_path / ".cache" / "yeastarfs")


def test_cache_root_without_home_or_xdg(monkeypatch):
    # systemd mount units run without HOME (pitfalls.md).
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("HOME", raising=False)
    assert default_cache_root() == "/var/cache/yeastarfs"


def test_home_that_does_not_exist_is_not_used(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "gone"))
    assert default_cache_root() == "/var/cache/yeastarfs"


def test_config_default_cache_root_is_read_when_the_config_is_made(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "one"))
    first = Config(mountpoint="/m", pbx_url="https://pbx:8088", username="api", password=SECRET)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "two"))
    second = Config(mountpoint="/m", pbx_url="https://pbx:8088", username="api", password=SECRET)
    assert first.cache_root == str(tmp_path / "one" / "yeastarfs")
    assert second.cache_root == str(tmp_path / "two" / "yeastarfs")


# -- read_password -----------------------------------------------------------------------------


def write_password(tmp_path, content, mode=0o600, name="password"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    os.chmod(path, mode)
    return str(path)


@pytest.mark.parametrize("content, expected", [
    (SECRET + "\n", SECRET),
    (SECRET + "\r\n", SECRET),
    (SECRET, SECRET),
    (SECRET + "\n\n", SECRET),
    (" pass word \n", " pass word "),   # spaces are part of a password; only line ends go
    ("pässwörd\n", "pässwörd"),
])
def test_password_from_file(tmp_path, monkeypatch, content, expected):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    assert read_password(write_password(tmp_path, content)) == expected


def test_password_file_wins_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    assert read_password(write_password(tmp_path, "from-file\n")) == "from-file"


def test_password_from_environment(monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, SECRET)
    assert read_password(None) == SECRET
    assert read_password("") == SECRET


def test_no_password_anywhere_explains_both_ways(monkeypatch):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(ConfigError) as caught:
        read_password(None)
    assert "--password-file" in str(caught.value) and PASSWORD_ENV in str(caught.value)


def test_empty_environment_password_is_no_password(monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, "")
    with pytest.raises(ConfigError):
        read_password(None)


@pytest.mark.parametrize("content", ["", "\n", "\r\n"])
def test_empty_password_file_is_an_error(tmp_path, monkeypatch, content):
    monkeypatch.setenv(PASSWORD_ENV, "not-used-as-fallback")
    path = write_password(tmp_path, content)
    with pytest.raises(ConfigError, match="empty"):
        read_password(path)


def test_missing_password_file_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, "not-used-as-fallback")
    path = str(tmp_path / "nope")
    with pytest.raises(ConfigError) as caught:
        read_password(path)
    assert path in str(caught.value)
    assert "No such file" in str(caught.value)


def test_password_file_that_is_a_directory_is_an_error(tmp_path):
    with pytest.raises(ConfigError):
        read_password(str(tmp_path))


def test_password_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = write_password(tmp_path, b"p\xe4ssw\xf6rd\n")   # Latin-1
    with pytest.raises(ConfigError) as caught:
        read_password(path)
    assert path in str(caught.value)
    assert "p\xe4ssw" not in str(caught.value)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_password_file_readable_by_others_logs_a_warning(tmp_path, caplog, mode):
    path = write_password(tmp_path, SECRET + "\n", mode=mode)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert read_password(path) == SECRET
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == LOGGER]
    assert len(warnings) == 1
    assert path in warnings[0].getMessage() and "600" in warnings[0].getMessage()
    assert SECRET not in caplog.text


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_password_file_logs_nothing(tmp_path, caplog, mode):
    path = write_password(tmp_path, SECRET + "\n", mode=mode)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert read_password(path) == SECRET
    assert [r for r in caplog.records if r.name == LOGGER] == []


# -- check_pbx_url -----------------------------------------------------------------------------


@pytest.mark.parametrize("url, expected", [
    ("https://192.168.5.150:8088", "https://192.168.5.150:8088"),
    ("https://192.168.5.150:8088/", "https://192.168.5.150:8088"),
    ("http://pbx.example.com", "http://pbx.example.com"),
    ("HTTPS://pbx.example.com:8088", "https://pbx.example.com:8088"),
    ("https://[fe80::1]:8088", "https://[fe80::1]:8088"),
])
def test_check_pbx_url_accepts_scheme_host_and_port(url, expected):
    assert check_pbx_url(url) == expected


@pytest.mark.parametrize("url", [
    "192.168.5.150:8088",             # no scheme
    "pbx.example.com",
    "ftp://pbx:21",
    "https://",                       # no host
    "https://:8088",
    "https://pbx:8088/api/v2.0.0",    # a path
    "https://pbx:8088/?x=1",          # a query
    "https://pbx:8088?token=abc",
    "https://pbx:port",               # a port that is not a number
    "https://pbx:99999",              # a port out of range
    "https://pbx:0",
    "",
])
def test_check_pbx_url_rejects_the_rest(url):
    with pytest.raises(ConfigError) as caught:
        check_pbx_url(url)
    assert "--pbx" in str(caught.value)


@pytest.mark.parametrize("url", ["https://api:Hunter2-secret@192.168.5.150:8088",
                                 "ftp://api:Hunter2-secret@192.168.5.150/path?q=1"])
def test_check_pbx_url_rejects_credentials_without_echoing_them(url):
    with pytest.raises(ConfigError) as caught:
        check_pbx_url(url)
    assert "Hunter2-secret" not in str(caught.value)
    assert "--pbx" in str(caught.value)


# -- Config ------------------------------------------------------------------------------------


def test_repr_and_str_never_show_the_password():
    config = make_config()
    assert SECRET not in repr(config)
    assert SECRET not in str(config)
    assert SECRET not in f"{config!r} {config}"
    assert "password" not in repr(config)
    assert config.password == SECRET          # still there for the client


def test_config_is_immutable():
    config = make_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.password = "x"  # type: ignore[misc]


def test_defaults_are_parsed_units():
    config = make_config()
    assert config.cache_max_bytes == 4 * GIB
    assert config.cache_min_free_bytes == GIB
    assert config.since_s == 30 * 86400
    assert config.validate() is config


def test_cache_dir_is_per_pbx_under_the_root():
    root = "/var/tmp/yc"
    a = make_config(pbx_url="https://192.168.5.150:8088", cache_root=root).cache_dir
    b = make_config(pbx_url="https://192.168.5.151:8088", cache_root=root).cache_dir
    c = make_config(pbx_url="https://192.168.5.150:9443", cache_root=root).cache_dir
    d = make_config(pbx_url="https://[fe80::1]:8088", cache_root=root).cache_dir
    assert a == os.path.join(root, "192.168.5.150_8088")
    assert len({a, b, c, d}) == 4
    for path in (a, b, c, d):
        assert os.path.dirname(path) == root
        assert "/" not in os.path.basename(path) and ":" not in os.path.basename(path)


@pytest.mark.parametrize("url", ["https://..", "https://.", "http://", "https://...", "https://../x"])
def test_cache_dir_never_escapes_or_equals_the_root(url):
    root = "/var/tmp/yc"
    path = make_config(pbx_url=url, cache_root=root).cache_dir
    assert os.path.dirname(os.path.normpath(path)) == root
    assert os.path.basename(os.path.normpath(path)) not in ("", ".", "..")


def test_pbx_host():
    assert make_config(pbx_url="https://192.168.5.150:8088").pbx_host == "192.168.5.150"
    assert make_config(pbx_url="https://[fe80::1]:8088").pbx_host == "fe80::1"


@pytest.mark.parametrize("overrides, words", [
    ({"cache_max_bytes": 0}, "--cache-size"),
    ({"cache_max_bytes": -1}, "--cache-size"),
    ({"poll_interval_s": 0}, "--poll-interval"),
    ({"poll_interval_s": -5.0}, "--poll-interval"),
    ({"poll_interval_s": float("nan")}, "--poll-interval"),
    ({"events_port": -1}, "--events-port"),
    ({"events_port": 65536}, "--events-port"),
    ({"max_downloads": 0}, "--max-downloads"),
    ({"stall_timeout_s": 0}, "--stall-timeout"),
    ({"stall_timeout_s": -1.0}, "--stall-timeout"),
    ({"verify": "/nonexistent/ca.pem"}, "--ca-file"),
])
def test_validate_rejects(overrides, words):
    with pytest.raises(ConfigError) as caught:
        make_config(**overrides).validate()
    assert words in str(caught.value)


def test_validate_accepts_edges(tmp_path):
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("-----BEGIN CERTIFICATE-----\n")
    for overrides in ({"events_port": 0}, {"events_port": 65535}, {"max_downloads": 1},
                      {"cache_max_bytes": 1}, {"verify": False}, {"verify": str(ca_file)},
                      {"poll_interval_s": 0.5}):
        config = make_config(**overrides)
        assert config.validate() is config


def test_errors_never_contain_the_password():
    config = make_config(cache_max_bytes=0)
    with pytest.raises(ConfigError) as caught:
        config.validate()
    assert SECRET not in str(caught.value)



# -- the option table: each option declared once ----------------------------------------------


def test_every_option_field_is_a_config_field_with_the_options_default():
    fields = {field.name: field for field in dataclasses.fields(Config)}
    for option in OPTIONS:
        if option.field is None:
            continue
        field = fields[option.field]
        assert field.metadata["option"] is option
        if option.required:
            assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        elif callable(option.default):
            assert field.default_factory is option.default
        else:
            expected = option.value(option.default if option.takes_value else False) \
                if option.default is not None or not option.takes_value else None
            assert field.default == expected, option.name
    # The fields no single option fills are few, and each is set where the docstring says.
    by_options = {option.field for option in OPTIONS if option.field}
    assert set(fields) - by_options == {"mountpoint", "password", "events_host", "verify", "allow_any_event_source"}


def test_names_are_unique_and_units_are_in_field_names():
    for attribute in ("name", "o_key", "env", "flag"):
        values = [getattr(option, attribute) for option in OPTIONS]
        assert len(values) == len(set(values)), attribute
    fields = [option.field for option in OPTIONS if option.field]
    assert len(fields) == len(set(fields))
    for option in OPTIONS:
        if option.parse is parse_size:
            assert option.field.endswith("_bytes"), option.field
        if option.parse is parse_duration or option.metavar == "SECONDS":
            assert option.field.endswith("_s"), option.field


def test_declarations_are_consistent():
    groups = [option.group for option in OPTIONS]
    assert all(groups) and groups == sorted(groups, key=groups.index), "each group's options stand together"
    for option in OPTIONS:
        assert option.help and not option.help.endswith(" "), option.name
        if option.takes_value:
            if isinstance(option.default, str):
                option.value(option.default)  # the default parses
            if option.choices:
                assert option.default in option.choices
        else:
            assert option.default is None and not option.choices, f"{option.name}: a flag is off unless given"
        if option.valid is not None:
            assert option.invalid, option.name


def test_validation_messages_come_from_the_declarations():
    for option in OPTIONS:
        if option.valid is None:
            continue
        with pytest.raises(ConfigError) as caught:
            option.check({"pin_sha256": "not hex"}.get(option.name, -1))
        assert str(caught.value) == f"{option.flag} {option.invalid}"


def test_parse_errors_name_the_option():
    by_name = {option.name: option for option in OPTIONS}
    with pytest.raises(ConfigError, match=r"^--cache-size: invalid size 'lots'"):
        by_name["cache_size"].value("lots")
    with pytest.raises(ConfigError, match=r"^invalid --pbx 'pbx'"):  # already named: not twice
        by_name["pbx"].value("pbx")
    with pytest.raises(ConfigError, match=r"^invalid --log-level 'LOUD': choose DEBUG, INFO, WARNING or ERROR"):
        by_name["log_level"].value("LOUD")


@pytest.mark.parametrize("text, state", [(True, True), (False, False), ("true", True), ("Yes", True), ("on", True),
                                         ("1", True), ("false", False), ("no", False), ("OFF", False), ("0", False),
                                         ("", False)])
def test_parse_flag(text, state):
    assert parse_flag(text) is state


def test_parse_flag_refuses_anything_else():
    with pytest.raises(ConfigError, match="expected true or false, got 'maybe'"):
        parse_flag("maybe")


def test_mount_defaults_agree_with_the_pbx_protocols():
    # The mount's defaults live in the table; the PBX package keeps the protocol's own defaults
    # for a client used on its own. config.py may not import the PBX package, so this test
    # holds the two together.
    from yeastarfs.pbx.sseries import client, events
    by_name = {option.name: option for option in OPTIONS}
    assert by_name["events_port"].value(by_name["events_port"].default) == events.DEFAULT_HTTP_PORT
    assert by_name["heartbeat_interval"].value(by_name["heartbeat_interval"].default) == client.HEARTBEAT_INTERVAL_S


README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_options_table_is_the_generated_one():
    text = README.read_text(encoding="utf-8")
    assert text.count(OPTIONS_BEGIN) == 1 and text.count(OPTIONS_END) == 1
    table = text.split(OPTIONS_BEGIN + "\n", 1)[1].split(OPTIONS_END, 1)[0]
    assert table == options_markdown(), "run: .venv/bin/python scripts/update_readme_options.py"


def test_readme_table_has_a_row_for_every_option_in_order():
    rows = options_markdown().splitlines()[2:]
    assert [row.split("`")[1].split()[0] for row in rows] == [option.flag for option in OPTIONS]
    assert rows[[o.name for o in OPTIONS].index("cache_size")] == (
        "| `--cache-size SIZE` | `4G` | disk budget for cached recordings (`500M`, `10G`; binary units) |")
    assert "| `--prefetch none\\|new` |" in options_markdown()  # a | inside a cell is escaped
