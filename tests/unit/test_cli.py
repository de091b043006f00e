"""The command line: mount(8) option translation, layered defaults, start-up checks, logging."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess

import pytest

from yeastarfs import errors
from yeastarfs.app import cli, mount, options
from yeastarfs.config import OPTIONS, PASSWORD_ENV


def mount_parser():
    return cli.build_parser().mount_parser


def test_fstab_form_translates_every_option_kind():
    argv = ["https://pbx:8088", "/mnt/rec", "-o",
            "rw,dev,suid,_netdev,noauto,username=api,password_file=/etc/p,cache_size=10G,allow_other,x-systemd.automount"]
    assert options.translate_fstab_argv(argv) == [
        "mount", "/mnt/rec", "--pbx", "https://pbx:8088", "--user", "api", "--password-file", "/etc/p",
        "--cache-size", "10G", "--allow-other"]


@pytest.mark.parametrize("bad", ["cache_sise=1G", "allow_other=yes", "cache_size", "user=api"])
def test_fstab_form_rejects_unknown_or_malformed_options(bad):
    with pytest.raises(errors.ConfigError) as info:
        options.translate_fstab_argv(["https://p", "/m", "-o", bad])
    assert bad.split("=")[0] in str(info.value)


def test_every_long_option_has_an_o_spelling():
    for option in OPTIONS:
        item = f"{option.o_key}=x" if option.takes_value else option.o_key
        expected = [option.flag, "x"] if option.takes_value else [option.flag]
        assert options.translate_option_list(item) == expected, option.name


def test_precedence_command_line_then_environment_then_file(tmp_path, monkeypatch):
    config = tmp_path / "c.toml"
    config.write_text('cache_size = "1M"\nsince = "2d"\nusername = "fromfile"\n')
    monkeypatch.setenv("YEASTARFS_CACHE_SIZE", "2M")
    args, _ = cli.parse_args(["mount", "/m", "--config", str(config), "--pbx", "http://p:1"])
    assert (args.cache_size, args.since, args.user) == ("2M", "2d", "fromfile")
    args, _ = cli.parse_args(["mount", "/m", "--config", str(config), "--pbx", "http://p:1", "--cache-size", "3M"])
    assert args.cache_size == "3M"


def test_config_file_with_a_password_must_be_private(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('password = "x"\n')
    config.chmod(0o644)
    with pytest.raises(errors.ConfigError, match="chmod 600"):
        cli.parse_args(["mount", "/m", "--config", str(config)])
    config.chmod(0o600)
    args, _ = cli.parse_args(["mount", "/m", "--config", str(config)])
    assert args.password == "x"


def test_allow_other_needs_user_allow_other_for_non_root(tmp_path, monkeypatch):
    monkeypatch.setattr(mount.os, "getuid", lambda: 1000)
    conf = tmp_path / "fuse.conf"
    conf.write_text("# user_allow_other\n")
    with pytest.raises(errors.ConfigError, match="user_allow_other"):
        mount.check_allow_other(str(conf))
    conf.write_text("user_allow_other\n")
    mount.check_allow_other(str(conf))


def test_journal_lines_carry_syslog_priorities():
    formatter = cli._JournalFormatter()
    record = logging.LogRecord("yeastarfs.x", logging.WARNING, __file__, 1, "hello %s", ("token=abc",), None)
    assert formatter.format(record) == "<4>yeastarfs.x: hello token=abc"


def test_log_filter_redacts_secrets():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "url %s", ("/a?token=0123456789abcdef&random=77",), None)
    errors.RedactingFilter().filter(record)
    assert "0123456789abcdef" not in record.getMessage() and "77" not in record.getMessage()


@pytest.fixture
def restore_logging():
    """cli.main installs its own root handler on this test's (soon closed) stderr."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    yield
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def test_bad_options_fail_with_one_line(capsys, monkeypatch, restore_logging):
    monkeypatch.setenv("YEASTARFS_PASSWORD", "pw")
    assert cli.main(["mount", "/m", "--pbx", "http://p:1", "--user", "u", "--cache-size", "lots"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid size" in err[0]


# -- every option's spellings, all from config.OPTIONS ----------------------------------------

VALUED = [option for option in OPTIONS if option.takes_value]
FLAGS = [option for option in OPTIONS if not option.takes_value]
BASE = ["mount", "/m"]


@pytest.fixture(autouse=True)
def no_outside_options(monkeypatch, tmp_path):
    """No YEASTARFS_* variable or config file of this machine's reaches these tests."""
    for name in [name for name in os.environ if name.startswith("YEASTARFS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(options, "SYSTEM_CONFIG", str(tmp_path / "no-system-config.toml"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-xdg"))


# Not a valid value of any option with a strict parser (which must then say where it came
# from), and kept as it is by the others: either way, proof that the spelling was read.
NOT_A_VALUE = "not a value!"


def reaches(argv, option, where) -> bool:
    """Whether NOT_A_VALUE, given as *where* says, reached *option*."""
    try:
        args, _ = cli.parse_args(argv)
    except errors.ConfigError as exc:
        return where in str(exc)
    return getattr(args, option.name) == NOT_A_VALUE


@pytest.mark.parametrize("option", [o for o in VALUED if o.name != "config"], ids=lambda o: o.name)
def test_environment_spelling_of_each_option(option, monkeypatch):
    monkeypatch.setenv(f"YEASTARFS_{option.name.upper()}", NOT_A_VALUE)
    assert option.env == f"YEASTARFS_{option.name.upper()}"
    assert reaches(BASE, option, option.env)


@pytest.mark.parametrize("option", FLAGS, ids=lambda o: o.name)
def test_environment_spelling_of_each_flag(option, monkeypatch):
    for text, state in (("true", True), ("1", True), ("yes", True), ("false", False), ("0", False), ("", False)):
        monkeypatch.setenv(f"YEASTARFS_{option.name.upper()}", text)
        args, _ = cli.parse_args(BASE)
        assert getattr(args, option.name) is state, (option.name, text)
    monkeypatch.setenv(option.env, "maybe")
    with pytest.raises(errors.ConfigError, match=option.env):
        cli.parse_args(BASE)


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.name != "config"], ids=lambda o: o.name)
def test_config_file_keys_of_each_option(option, tmp_path):
    assert option.o_key in option.file_keys
    for key in option.file_keys:
        path = tmp_path / f"{key}.toml"
        if option.takes_value:
            path.write_text(f'{key} = "{NOT_A_VALUE}"\n')
            assert reaches([*BASE, "--config", str(path)], option, f"{path}: {key}"), key
        else:
            path.write_text(f"{key} = true\n")
            assert getattr(cli.parse_args([*BASE, "--config", str(path)])[0], option.name) is True, key


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_o_spelling_of_each_option_reaches_the_same_argument(option):
    raw = (option.choices[-1] if option.choices else NOT_A_VALUE) if option.takes_value else True
    item = f"{option.o_key}={raw}" if option.takes_value else option.o_key
    argv = options.translate_fstab_argv(["https://pbx:8088", "/m", "-o", item])
    assert argv[:4] == ["mount", "/m", "--pbx", "https://pbx:8088"]
    if option.name == "config":  # names a file that parse_args would then read
        assert argv[4:] == ["--config", raw]
    elif option.name != "pbx":   # the URL of the mount(8) form comes first, -o pbx= after it
        assert getattr(cli.parse_args(argv)[0], option.name) == raw


def test_spellings_follow_the_name_except_the_pbx_user():
    by_name = {option.name: option for option in OPTIONS}
    assert (by_name["user"].flag, by_name["user"].o_key, by_name["user"].env) == ("--user", "username", "YEASTARFS_USER")
    assert by_name["user"].file_keys == ("username", "user")
    assert {o.name for o in OPTIONS if o.o_key != o.name} == {"user"}
    assert by_name["config"].file_keys == ()
    assert by_name["foreground"].short == "-f"


def test_config_file_may_not_name_the_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('config = "/elsewhere.toml"\n')
    with pytest.raises(errors.ConfigError, match="unknown key 'config'"):
        cli.parse_args([*BASE, "--config", str(path)])


def test_yeastarfs_config_chooses_the_file_and_the_command_line_wins(tmp_path, monkeypatch):
    chosen, other = tmp_path / "chosen.toml", tmp_path / "other.toml"
    chosen.write_text('cache_size = "5M"\n')
    other.write_text('cache_size = "6M"\n')
    monkeypatch.setenv("YEASTARFS_CONFIG", str(chosen))
    assert cli.parse_args(BASE)[0].cache_size == "5M"
    assert cli.parse_args([*BASE, "--config", str(other)])[0].cache_size == "6M"


def test_precedence_reaches_the_config_for_values_and_flags(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text('pbx = "https://pbx:8088"\nusername = "api"\ncache_size = "1M"\nno_events = true\n'
                    'max_downloads = 2\nallow_other = true\n')
    monkeypatch.setenv(PASSWORD_ENV, "pw")
    monkeypatch.setenv("YEASTARFS_MAX_DOWNLOADS", "3")
    monkeypatch.setenv("YEASTARFS_ALLOW_OTHER", "false")

    def config(*argv):
        return cli.config_from_args(cli.parse_args([*BASE, "--config", str(path), *argv])[0])

    first = config()
    assert (first.cache_max_bytes, first.events_enabled, first.max_downloads, first.allow_other) == (1 << 20, False, 3, False)
    second = config("--cache-size", "2M", "--max-downloads", "5", "--allow-other")
    assert (second.cache_max_bytes, second.max_downloads, second.allow_other) == (2 << 20, 5, True)


def test_bad_values_name_where_they_came_from(tmp_path, monkeypatch):
    monkeypatch.setenv("YEASTARFS_CACHE_SIZE", "lots")
    with pytest.raises(errors.ConfigError, match=r"YEASTARFS_CACHE_SIZE: --cache-size: invalid size 'lots'"):
        cli.parse_args(BASE)
    monkeypatch.delenv("YEASTARFS_CACHE_SIZE")
    path = tmp_path / "c.toml"
    path.write_text("events_port = \"eighty\"\n")
    with pytest.raises(errors.ConfigError, match=re.escape(f"config file {path}: events_port: --events-port")):
        cli.parse_args([*BASE, "--config", str(path)])


# -- config_from_args: each option through its parser into its field --------------------------


def config_of(*argv, env_password="pw", monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, env_password)
    return cli.config_from_args(cli.parse_args([*BASE, "--pbx", "https://pbx:8088", "--user", "api", *argv])[0])


def test_every_option_fills_its_field_in_its_unit(monkeypatch, tmp_path):
    config = config_of("--cache-dir", "rel/cache", "--cache-size", "10G", "--cache-min-free", "512M",
                       "--since", "2w", "--start-timeout", "7.5", "--poll-interval", "30",
                       "--events-port", "0", "--no-events", "--events-allow-from", "10.0.0.1, 10.0.0.2",
                       "--tcp-events-port", "9000", "--heartbeat-interval", "300", "--prefetch", "new",
                       "--max-downloads", "8", "--stall-timeout", "15", "--allow-other", "--uid", "1000",
                       "--gid", "1001", "--umask", "027", "--log-file", "/var/log/y.log", "--log-level", "DEBUG",
                       "--pin-sha256", "AB" * 32, monkeypatch=monkeypatch)
    assert (config.pbx_url, config.username, config.password) == ("https://pbx:8088", "api", "pw")
    assert config.cache_root == os.path.abspath("rel/cache")
    assert (config.cache_max_bytes, config.cache_min_free_bytes) == (10 << 30, 512 << 20)
    assert (config.since_s, config.start_timeout_s, config.poll_interval_s) == (14 * 86400, 7.5, 30.0)
    assert (config.events_port, config.events_enabled, config.tcp_events_port) == (0, False, 9000)
    assert (config.events_allow_from, config.allow_any_event_source) == (("10.0.0.1", "10.0.0.2"), False)
    assert (config.heartbeat_interval_s, config.prefetch_new, config.max_downloads) == (300.0, True, 8)
    assert (config.stall_timeout_s, config.allow_other, config.uid, config.gid) == (15.0, True, 1000, 1001)
    assert (config.umask, config.log_file, config.log_level, config.pin_sha256) == (0o027, "/var/log/y.log",
                                                                                   "DEBUG", "AB" * 32)
    assert config.verify is True


def test_defaults_when_no_option_is_given(monkeypatch):
    config = config_of(monkeypatch=monkeypatch)
    assert (config.cache_max_bytes, config.since_s, config.events_port, config.tcp_events_port) == (4 << 30, 30 * 86400,
                                                                                                 8260, 8333)
    assert (config.events_enabled, config.prefetch_new, config.umask, config.log_level) == (True, False, 0o022, "INFO")
    assert (config.uid, config.events_allow_from, config.allow_any_event_source) == (None, None, False)


def test_the_few_options_that_are_not_one_field(monkeypatch, tmp_path, caplog):
    assert config_of("--events-allow-from", "any", monkeypatch=monkeypatch).allow_any_event_source is True
    with caplog.at_level(logging.WARNING):
        assert config_of("--insecure", monkeypatch=monkeypatch).verify is False
    assert "--insecure" in caplog.text
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("-----BEGIN CERTIFICATE-----\n")
    assert config_of("--ca-file", str(ca_file), monkeypatch=monkeypatch).verify == str(ca_file)
    password_file = tmp_path / "password"
    password_file.write_text("from-file\n")
    password_file.chmod(0o600)
    assert config_of("--password-file", str(password_file), monkeypatch=monkeypatch).password == "from-file"


def test_missing_required_options_are_named_with_all_their_spellings(monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, "pw")
    with pytest.raises(errors.ConfigError) as info:
        cli.config_from_args(cli.parse_args(BASE)[0])
    assert str(info.value) == ("--pbx URL and --user NAME are required (on the command line, as -o pbx/username, "
                               "in YEASTARFS_PBX/YEASTARFS_USER or in the config file)")
    with pytest.raises(errors.ConfigError, match=r"^--user NAME is required .* -o username, in YEASTARFS_USER "):
        cli.config_from_args(cli.parse_args([*BASE, "--pbx", "https://pbx:8088"])[0])


@pytest.mark.parametrize("argv, words", [
    (["--events-port", "http"], "--events-port: invalid number 'http'"),
    (["--poll-interval", "soon"], "--poll-interval: invalid number of seconds 'soon'"),
    (["--since", "ever"], "--since: invalid duration 'ever'"),
    (["--umask", "999"], "invalid --umask '999'"),
    (["--max-downloads", "0"], "--max-downloads must be 1-100"),
    (["--pin-sha256", "abc"], "--pin-sha256 must be the certificate's SHA-256"),
])
def test_bad_values_are_config_errors_naming_the_option(argv, words, monkeypatch):
    with pytest.raises(errors.ConfigError) as info:
        config_of(*argv, monkeypatch=monkeypatch)
    assert words in str(info.value)


def test_choices_from_the_environment_are_checked_like_the_command_line(monkeypatch):
    monkeypatch.setenv("YEASTARFS_PREFETCH", "all")
    with pytest.raises(errors.ConfigError, match="YEASTARFS_PREFETCH: invalid --prefetch 'all': choose none or new"):
        cli.parse_args(BASE)


# -- help, man page and completion, made from the same declarations ---------------------------


def test_mount_help_shows_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["mount", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in OPTIONS:
        assert option.flag in text
        if isinstance(option.default, str):
            assert f"default {option.default}" in text, option.name


def man_page(capsys, restore_logging) -> str:
    assert cli.main(["man"]) == 0
    return capsys.readouterr().out


def test_man_page_lists_every_option_with_all_its_spellings(capsys, restore_logging):
    page = man_page(capsys, restore_logging)
    readable = page.replace("\\-", "-").replace("\\fB", "").replace("\\fI", "").replace("\\fR", "")
    for option in OPTIONS:
        entry = readable.split(f".TP\n{option.flag}", 1)[1].split(".TP", 1)[0]
        assert f"-o {option.o_key}" in entry and option.env in entry, option.name
        assert all(key in entry for key in option.file_keys)
        assert " ".join(option.help.replace("`", "").split()[:4]) in " ".join(entry.split()), option.name
    for command in cli.build_parser().commands:
        assert f"yeastarfs {command}" in readable


def test_man_page_is_well_formed_roff(capsys, restore_logging, require, tmp_path):
    page = man_page(capsys, restore_logging)
    assert page.isascii()
    require(shutil.which("groff"), "groff is not installed (scripts/setup installs groff-base)")
    path = tmp_path / "yeastarfs.1"
    path.write_text(page)
    result = subprocess.run(["groff", "-man", "-Tutf8", "-ww", str(path)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "--cache-size SIZE" in re.sub(r".\x08", "", result.stdout).replace("\u2010", "-")


def complete_in_bash(script: str, words: list[str], tmp_path) -> list[str]:
    path = tmp_path / "completion.bash"
    path.write_text(script)
    line = " ".join(words)
    program = (f'source {path}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; COMP_LINE="{line}"; '
               'COMP_POINT=${#COMP_LINE}; _shtab_yeastarfs; printf "%s\\n" "${COMPREPLY[@]}"')
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_bash_completion_knows_every_option_and_its_choices(capsys, restore_logging, tmp_path):
    assert cli.main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    flags = complete_in_bash(script, ["yeastarfs", "mount", "--"], tmp_path)
    assert {option.flag for option in OPTIONS} <= set(flags)
    assert complete_in_bash(script, ["yeastarfs", "mount", "--prefetch", "''"], tmp_path) == ["none", "new"]
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("")
    assert complete_in_bash(script, ["yeastarfs", "mount", "--cache-dir", "a-"], tmp_path) == ["a-dir"]
    assert sorted(complete_in_bash(script, ["yeastarfs", "mount", "--config", "a-"], tmp_path)) == ["a-dir", "a-file"]
