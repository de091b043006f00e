"""The command line: mount(8) option translation, layered defaults, start-up checks, logging."""

from __future__ import annotations

import logging

import pytest

from yeastarfs import errors
from yeastarfs.app import cli, mount, options


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
    flags, valued = options._mount_option_kinds(mount_parser())
    for dest in flags | valued:
        if dest in ("foreground",):
            continue
        item = dest if dest in flags else f"{dest}=x"
        translated = options._translate_option_list(item.replace("user=", "username="), flags, valued)
        assert translated and translated[0].startswith("--"), dest


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
