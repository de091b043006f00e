"""The ``yeastarfs`` command: argument parsing, logging, daemonising, and the subcommands.

``main(argv) -> int`` never lets a traceback reach the user for an expected failure: a
``YeastarfsError`` becomes one line on stderr and exit status 1 (2 for usage errors).

Daemonising: ``mount`` without ``--foreground`` starts a *fresh* child process (not a fork
of this one, which may already run threads) with ``--foreground`` and a pipe, and returns
when the child writes "ready" (the kernel has mounted) or prints the child's error line.
Secrets never travel in argv: the child reads the same password file or environment.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import logging.handlers
import os
import select
import subprocess
import sys
from typing import Optional, Sequence

from yeastarfs import __version__, errors
from yeastarfs.app import options
from yeastarfs.app.tools import CALL_COLUMNS
from yeastarfs.config import (DEFAULT_CACHE_MIN_FREE, DEFAULT_CACHE_SIZE, DEFAULT_EVENTS_PORT,
                              DEFAULT_HEARTBEAT_INTERVAL_S,
                              DEFAULT_MAX_DOWNLOADS, DEFAULT_POLL_INTERVAL_S, DEFAULT_SINCE,
                              DEFAULT_STALL_TIMEOUT_S, DEFAULT_START_TIMEOUT_S, DEFAULT_TCP_EVENTS_PORT, PASSWORD_ENV, Config, check_pbx_url,
                              default_cache_root, parse_duration, parse_size, read_password)

log = logging.getLogger("yeastarfs")

EXIT_ERROR = 1
EXIT_USAGE = 2
# How long `mount` waits for its child to report the mount ready (login + --start-timeout).
READY_TIMEOUT_S = 300.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _JournalFormatter(logging.Formatter):
    """Under systemd stderr goes to the journal, which stamps the time itself and reads a
    ``<N>`` syslog priority prefix (SyslogLevelPrefix=yes, the default)."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITIES.get(record.levelno, 6)}>{super().format(record)}"


def _create_private_file(path: str) -> None:
    """Create *path* (and its directory) readable by the owner only, if missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))


def setup_logging(level: str, log_file: Optional[str] = None) -> None:
    handler: logging.Handler
    if log_file:
        _create_private_file(log_file)
        handler = logging.handlers.WatchedFileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JournalFormatter() if not log_file and os.environ.get("JOURNAL_STREAM")
                         else logging.Formatter(LOG_FORMAT))
    handler.addFilter(errors.RedactingFilter())  # last line of defence for every log line
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # urllib3 logs every connection at DEBUG with full URLs; the filter redacts, but the
    # volume helps nobody.
    logging.getLogger("urllib3").setLevel(logging.WARNING)


# -- argument parsing ------------------------------------------------------------------------

def _add_mount_options(parser: argparse.ArgumentParser) -> None:
    pbx = parser.add_argument_group("PBX")
    pbx.add_argument("--pbx", metavar="URL",
                     help="the PBX's web address, e.g. https://192.168.5.150:8088 (required)")
    pbx.add_argument("--user", metavar="NAME", help="API username set on the PBX (required; -o username=)")
    pbx.add_argument("--password-file", metavar="PATH",
                     help=f"file holding the API password (else ${PASSWORD_ENV}); never pass it in argv")
    tls = pbx.add_mutually_exclusive_group()
    tls.add_argument("--ca-file", metavar="PATH", help="verify the PBX's TLS certificate against this CA/cert")
    tls.add_argument("--insecure", action="store_true", help="do not verify the PBX's TLS certificate")
    tls.add_argument("--pin-sha256", metavar="HEX",
                     help="trust exactly the certificate with this SHA-256 fingerprint "
                          "(print it with: yeastarfs fingerprint URL)")
    cache = parser.add_argument_group("cache and index")
    cache.add_argument("--cache-dir", metavar="DIR", default=None,
                       help=f"cache and index location (default {default_cache_root()})")
    cache.add_argument("--cache-size", metavar="SIZE", default=DEFAULT_CACHE_SIZE,
                       help=f"disk budget for cached recordings, e.g. 500M, 10G (default {DEFAULT_CACHE_SIZE})")
    cache.add_argument("--cache-min-free", metavar="SIZE", default=DEFAULT_CACHE_MIN_FREE,
                       help=f"free space to leave on the cache's disk (default {DEFAULT_CACHE_MIN_FREE})")
    cache.add_argument("--since", metavar="DURATION", default=DEFAULT_SINCE,
                       help=f"CDR backfill window at start, e.g. 30d, 12h (default {DEFAULT_SINCE})")
    cache.add_argument("--start-timeout", metavar="SECONDS", type=float, default=DEFAULT_START_TIMEOUT_S,
                       help=f"wait at most this long for the CDR backfill before mounting; it then "
                            f"goes on in the background (default {DEFAULT_START_TIMEOUT_S:g})")
    cache.add_argument("--poll-interval", metavar="SECONDS", type=float, default=DEFAULT_POLL_INTERVAL_S,
                       help=f"how often to poll the CDR for new recordings (default {DEFAULT_POLL_INTERVAL_S:g})")
    net = parser.add_argument_group("events and downloads")
    net.add_argument("--events-port", metavar="PORT", type=int, default=DEFAULT_EVENTS_PORT,
                     help=f"port the PBX pushes NewCdr events to (default {DEFAULT_EVENTS_PORT}; 0 = any free port)")
    net.add_argument("--no-events", action="store_true", help="do not listen for events; rely on CDR polling")
    net.add_argument("--events-allow-from", metavar="IP[,IP…]|any", default=None,
                     help="addresses allowed to push events (default: the PBX's own address)")
    net.add_argument("--tcp-events-port", metavar="PORT", type=int, default=DEFAULT_TCP_EVENTS_PORT,
                     help=f"the PBX's TCP event port, used when it reports events over TCP (default {DEFAULT_TCP_EVENTS_PORT})")
    net.add_argument("--max-downloads", metavar="N", type=int, default=DEFAULT_MAX_DOWNLOADS,
                     help=f"downloads running at once (default {DEFAULT_MAX_DOWNLOADS})")
    net.add_argument("--heartbeat-interval", metavar="SECONDS", type=float, default=DEFAULT_HEARTBEAT_INTERVAL_S,
                     help=f"keep the token alive after this long idle (default {DEFAULT_HEARTBEAT_INTERVAL_S:g})")
    net.add_argument("--stall-timeout", metavar="SECONDS", type=float, default=DEFAULT_STALL_TIMEOUT_S,
                     help=f"a read fails with EIO after this long without data (default {DEFAULT_STALL_TIMEOUT_S:g})")
    net.add_argument("--prefetch", choices=["none", "new"], default="none",
                     help="'new': download each newly announced recording into the cache at once")
    run = parser.add_argument_group("running")
    run.add_argument("--config", metavar="PATH",
                     help="TOML file with any of these options (default /etc/yeastarfs/config.toml, "
                          "then ~/.config/yeastarfs/config.toml); the command line and "
                          "YEASTARFS_<OPTION> variables override it")
    run.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground (log to stderr)")
    run.add_argument("--allow-other", action="store_true", help="let other users read the mount")
    run.add_argument("--uid", type=int, default=None, help="owner shown for every file (default: the mounting user)")
    run.add_argument("--gid", type=int, default=None, help="group shown for every file (default: the mounting group)")
    run.add_argument("--umask", default="022", metavar="OCTAL",
                     help="permission bits to remove from r-xr-xr-x (default 022; e.g. 027)")
    run.add_argument("--log-file", metavar="PATH", help="log here (default in the background: CACHE_DIR/yeastarfs.log)")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)


class _ManPageFormatter(argparse.HelpFormatter):
    """Wraps a one-paragraph description; keeps text laid out by hand (examples) as it is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class _ManPageParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _ManPageFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yeastarfs",
        description="A Yeastar S-Series PBX's call recordings as a read-only filesystem.")
    parser.add_argument("--version", action="version", version=f"yeastarfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_ManPageParser)
    mount = commands.add_parser(
        "mount", help="mount the recordings of a PBX",
        description="Mount a PBX's recordings at MOUNTPOINT as /YYYY/MM/DD/<recording>.wav.\n\n"
                    "Returns once the mount is ready and keeps serving in the background (logging to\n"
                    "CACHE_DIR/yeastarfs.log); unmount with: fusermount -u MOUNTPOINT. The password is\n"
                    f"read from --password-file or ${PASSWORD_ENV}, never from the command line.\n"
                    "Options may also come from a TOML --config file and YEASTARFS_<OPTION> variables;\n"
                    "the command line wins, then the environment, then the file.",
        epilog="examples:\n"
               "  yeastarfs mount /mnt/recordings --pbx https://192.168.5.150:8088 --user api \\\n"
               "      --password-file /etc/yeastarfs/password --ca-file /etc/yeastarfs/pbx.pem\n"
               "  mount -t fuse.yeastarfs https://192.168.5.150:8088 /mnt/recordings \\\n"
               "      -o username=api,password_file=/etc/yeastarfs/password,cache_size=20G\n"
               "  fstab: https://192.168.5.150:8088 /mnt/recordings fuse.yeastarfs "
               "_netdev,username=api,password_file=/etc/yeastarfs/password 0 0\n\n"
               "signals: SIGHUP polls the CDR now, SIGUSR1 logs statistics, SIGTERM/SIGINT unmount.\n"
               "exit status: 0 mounted (or unmounted cleanly), 1 start-up failure, 2 usage error.")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT")
    _add_mount_options(mount)
    parser.mount_parser = mount  # type: ignore[attr-defined]  # for layered defaults
    demo = commands.add_parser(
        "demo", help="mount a built-in simulated PBX with sample recordings",
        description="Start the PBX simulator with sample recordings, mount them, and unmount on Ctrl-C.")
    demo.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?", help="where to mount (default: a temporary dir)")
    demo.add_argument("--recordings", type=int, default=60, help="sample recordings to create (default 60)")
    status = commands.add_parser(
        "status", help="show the state of a running mount",
        description="Show a running mount's state: PBX reachable, token age, last event and poll, "
                    "recordings indexed, cache use and hit rate, downloads in flight. Asks the daemon "
                    "through an extended attribute of the mount's root; never contacts the PBX.")
    status.epilog = ("example:\n  yeastarfs status /mnt/recordings\n  yeastarfs status /mnt/recordings --json | jq .cache_hit_rate\n"
                     "exit status: 0, or 1 when MOUNTPOINT is not a running yeastarfs mount.")
    status.add_argument("mountpoint", metavar="MOUNTPOINT")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    pre = commands.add_parser(
        "prefetch", help="download recordings into the cache, with progress",
        description="Read recordings through the mount so that the daemon caches them, showing bytes, "
                    "rate and ETA. PATHs are files or folders of a mount (e.g. MOUNTPOINT/2026/11); "
                    "--from/--to narrow them to a date range. The daemon's --max-downloads still "
                    "applies. Safe to interrupt: recordings not read to the end are not kept.")
    pre.epilog = ("examples:\n  yeastarfs prefetch /mnt/recordings/2026/11\n"
                  "  yeastarfs prefetch /mnt/recordings --from 2026-11-20 --to 2026-11-27 --jobs 4\n"
                  "exit status: 0 all fetched, 1 some failed (listed), 130 interrupted.")
    pre.add_argument("paths", nargs="+", metavar="PATH")
    pre.add_argument("--from", dest="date_from", metavar="YYYY-MM-DD", help="first day to fetch")
    pre.add_argument("--to", dest="date_to", metavar="YYYY-MM-DD", help="last day to fetch")
    pre.add_argument("--jobs", type=int, default=4, help="recordings read at once (default 4)")
    calls = commands.add_parser(
        "calls", help="list the indexed calls with their recordings' paths",
        description="Print the calls the mount knows, with each recording's path and CDR fields, "
                    "newest last, as CSV (default) or JSON lines. Reads the index; no PBX request.")
    calls.epilog = ("examples:\n  yeastarfs calls /mnt/recordings --since 1d > today.csv\n"
                    "  yeastarfs calls /mnt/recordings --format json | jq -r 'select(.caller==\"1001\") | .path'\n"
                    "columns: " + ", ".join(CALL_COLUMNS))
    calls.add_argument("mountpoint", metavar="MOUNTPOINT")
    calls.add_argument("--since", default="7d", metavar="DURATION", help="how far back (default 7d)")
    calls.add_argument("--format", choices=["csv", "json"], default="csv")
    cache = commands.add_parser(
        "cache", help="inspect, verify or clear a cache directory",
        description="stats: cached recordings and bytes per PBX. verify: every cached file is complete "
                    "(size equals what the PBX announced, and its RIFF header agrees); exit 1 if not. "
                    "clear: delete every cached recording (refused while a mount uses the cache).")
    cache.epilog = ("examples:\n  yeastarfs cache stats --cache-dir /var/cache/yeastarfs\n"
                    "  yeastarfs cache verify --cache-dir /var/cache/yeastarfs --delete-bad\n"
                    "exit status: 0, 1 when verify found bad files or clear found the cache in use.")
    cache.add_argument("action", choices=["stats", "verify", "clear"])
    cache.add_argument("--cache-dir", metavar="DIR", default=None,
                       help=f"cache root (default {default_cache_root()})")
    cache.add_argument("--delete-bad", action="store_true", help="verify: delete the files that fail")
    finger = commands.add_parser(
        "fingerprint", help="print the SHA-256 fingerprint of the PBX's TLS certificate",
        description="Connect to the PBX without verifying it and print its certificate's SHA-256 "
                    "fingerprint, for --pin-sha256. Compare it with the one the PBX's web interface "
                    "shows (or run this where you trust the network) before pinning it.")
    finger.epilog = ("example:\n  yeastarfs fingerprint https://192.168.5.150:8088\n"
                     "  yeastarfs mount /mnt/recordings ... --pin-sha256 <the printed value>")
    finger.add_argument("url", metavar="URL", help="the PBX's address, e.g. https://192.168.5.150:8088")
    sim = commands.add_parser(
        "simulator", help="run the PBX simulator on its own",
        description="Serve the project's Yeastar PBX simulator (yeastar-api.md §12) until Ctrl-C. "
                    f"The password comes from --password-file or ${PASSWORD_ENV} (default: 'demo').")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8088)
    sim.add_argument("--user", default="api")
    sim.add_argument("--password-file", metavar="PATH")
    sim.add_argument("--recordings", type=int, default=60)
    sim.add_argument("--days", type=int, default=7)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    if not args.pbx or not args.user:
        raise errors.ConfigError("--pbx URL and --user NAME are required (on the command line, "
                                 "as -o options, in YEASTARFS_PBX/YEASTARFS_USER or in the config file)")
    password = getattr(args, "password", None) or read_password(args.password_file)
    verify = args.ca_file if args.ca_file else not args.insecure
    if args.insecure:
        log.warning("tls: --insecure: the PBX's certificate is not verified")
    return Config(
        mountpoint=args.mountpoint, pbx_url=check_pbx_url(args.pbx), username=args.user, password=password,
        cache_root=_cache_root(args),
        cache_max_bytes=parse_size(args.cache_size), cache_min_free_bytes=parse_size(args.cache_min_free),
        since_s=parse_duration(args.since), poll_interval_s=args.poll_interval,
        events_port=args.events_port, events_enabled=not args.no_events, verify=verify,
        pin_sha256=args.pin_sha256,
        events_allow_from=_address_list(args.events_allow_from),
        allow_any_event_source=(args.events_allow_from or "").strip().lower() == "any",
        tcp_events_port=args.tcp_events_port, heartbeat_interval_s=args.heartbeat_interval,
        start_timeout_s=args.start_timeout,
        max_downloads=args.max_downloads, stall_timeout_s=args.stall_timeout,
        allow_other=args.allow_other, log_file=args.log_file, log_level=args.log_level,
        uid=args.uid, gid=args.gid, umask=_octal(args.umask), prefetch_new=args.prefetch == "new",
    ).validate()


def _cache_root(args: argparse.Namespace) -> str:
    return os.path.abspath(args.cache_dir) if args.cache_dir else default_cache_root()


def _octal(text) -> int:
    try:
        value = int(str(text), 8)
    except ValueError:
        raise errors.ConfigError(f"invalid --umask {text!r}: expected octal digits like 027") from None
    if not 0 <= value <= 0o777:
        raise errors.ConfigError(f"invalid --umask {text!r}")
    return value


def _address_list(text: Optional[str]) -> Optional[tuple[str, ...]]:
    if not text or text.strip().lower() == "any":
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())


# -- commands ------------------------------------------------------------------------------

def cmd_mount(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if not args.foreground:
        return _spawn_daemon(args, argv)
    ready_fd = args.ready_fd
    try:
        config = config_from_args(args)
        from yeastarfs.app.mount import ready_notifier, run_mount  # imports mfusepy (needs libfuse)
        run_mount(config, ready_notifier(ready_fd))
    except errors.YeastarfsError as exc:
        _report_failure(ready_fd, str(exc))
        return EXIT_ERROR
    except OSError as exc:  # libfuse missing, /dev/fuse unusable
        _report_failure(ready_fd, f"cannot mount: {exc}")
        return EXIT_ERROR
    return 0


def _report_failure(ready_fd: Optional[int], message: str) -> None:
    log.error("%s", message)
    if ready_fd is not None:
        try:
            os.write(ready_fd, f"error: {errors.redact(message)}\n".encode())
        except OSError:
            pass


def _spawn_daemon(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run this command again as a detached child and wait until it is mounted."""
    config = config_from_args(args)  # fail fast, in this terminal, on bad options or a missing password
    log_file = args.log_file or os.path.join(config.cache_root, "yeastarfs.log")
    read_fd, write_fd = os.pipe()
    child_argv = [sys.executable, "-m", "yeastarfs", *argv, "--foreground", "--ready-fd", str(write_fd)]
    if not args.log_file:
        child_argv += ["--log-file", log_file]
    _create_private_file(log_file)
    with open(log_file, "ab") as child_stderr:  # tracebacks of a child that dies early land here
        child = subprocess.Popen(child_argv, pass_fds=(write_fd,), start_new_session=True,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=child_stderr)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        # The child is ready within --start-timeout plus a login; a hung one must not hang
        # mount(8) (and boot) with it.
        readable, _, _ = select.select([pipe], [], [], READY_TIMEOUT_S)
        reply = pipe.readline().decode(errors="replace").strip() if readable else ""
    if reply == "ready":
        return 0
    if not readable:
        child.terminate()
        print(f"yeastarfs: the mount was not ready after {READY_TIMEOUT_S:.0f} s; see {log_file}", file=sys.stderr)
        return EXIT_ERROR
    code = child.wait()
    message = reply[len("error: "):] if reply.startswith("error: ") else f"mount failed (exit {code}); see {log_file}"
    print(f"yeastarfs: {message}", file=sys.stderr)
    return EXIT_ERROR


def cmd_status(args: argparse.Namespace) -> int:
    from yeastarfs.app.tools import print_status
    return print_status(args.mountpoint, as_json=args.json)


def cmd_prefetch(args: argparse.Namespace) -> int:
    from yeastarfs.app.tools import prefetch
    return prefetch(args.paths, jobs=args.jobs, start=_date(args.date_from), end=_date(args.date_to))


def _date(text: Optional[str]):
    if not text:
        return None
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise errors.ConfigError(f"invalid date {text!r}: use YYYY-MM-DD") from None


def cmd_calls(args: argparse.Namespace) -> int:
    from yeastarfs.app.tools import list_calls
    return list_calls(args.mountpoint, parse_duration(args.since), args.format)


def cmd_cache(args: argparse.Namespace) -> int:
    from yeastarfs.app import tools
    root = _cache_root(args)
    if args.action == "stats":
        return tools.cache_stats(root)
    if args.action == "verify":
        return tools.cache_verify(root, delete_bad=args.delete_bad)
    return tools.cache_clear(root)


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from yeastarfs.app.tools import print_fingerprint
    return print_fingerprint(check_pbx_url(args.url))


def cmd_demo(args: argparse.Namespace) -> int:
    from yeastarfs.app.demo import run_demo
    return run_demo(args.mountpoint, recordings=args.recordings)


def cmd_simulator(args: argparse.Namespace) -> int:
    from yeastarfs.app.demo import run_simulator
    password = read_password(args.password_file) if (args.password_file or os.environ.get(PASSWORD_ENV)) else "demo"
    return run_simulator(args.host, args.port, args.user, password, args.recordings, args.days)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse *argv*, accepting the mount(8) form and layering file and environment defaults."""
    parser = build_parser()
    if options.is_fstab_form(argv):
        argv = options.translate_fstab_argv(argv, parser.mount_parser)
    if argv[:1] == ["mount"]:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config")
        config_path = pre.parse_known_args(argv[1:])[0].config
        parser.mount_parser.set_defaults(**options.layered_defaults(parser.mount_parser, config_path))
    return parser.parse_args(argv), argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, argv = parse_args(argv)
    except errors.YeastarfsError as exc:
        print(f"yeastarfs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    foreground = getattr(args, "foreground", True)
    setup_logging(getattr(args, "log_level", "INFO"), getattr(args, "log_file", None) if foreground else None)
    commands = {"mount": lambda: cmd_mount(args, argv), "demo": lambda: cmd_demo(args),
                "status": lambda: cmd_status(args), "prefetch": lambda: cmd_prefetch(args),
                "calls": lambda: cmd_calls(args), "cache": lambda: cmd_cache(args),
                "fingerprint": lambda: cmd_fingerprint(args), "simulator": lambda: cmd_simulator(args)}
    try:
        return commands[args.command]()
    except errors.YeastarfsError as exc:
        print(f"yeastarfs: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130

