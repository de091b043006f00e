"""The ``yeastarfs`` command: argument parsing, logging, daemonising, and the subcommands.

``main(argv) -> int`` never lets a traceback reach the user for an expected failure: a
``YeastarfsError`` becomes one line on stderr and exit status 1 (2 for usage errors). Output
cut short by a closed pipe (``yeastarfs calls MNT | head``) ends quietly with status 0.

Daemonising: ``mount`` without ``--foreground`` starts a *fresh* child process (not a fork
of this one, which may already run threads) with ``--foreground`` and a pipe, and returns
when the child writes "ready" (the mount answers a stat) or prints the child's error line.
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
from typing import Any, Optional, Sequence

from yeastarfs import __version__, errors
from yeastarfs.app import options
from yeastarfs.app.notify import WATCHDOG_PID_ENV, Notifier
from yeastarfs.app.tools import CALL_COLUMNS
from yeastarfs.cache import daemon_log_path
from yeastarfs.config import (OPTIONS, PASSWORD_ENV, Config, Option, check_pbx_url, default_cache_root, parse_duration,
                              plain, read_password)

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

def _add_mount_options(parser: argparse.ArgumentParser) -> list[tuple[argparse.Action, bool]]:
    """The mount command's options, from config.OPTIONS. Returns the actions that take a
    path, each with whether it is a directory (for shell completion)."""
    groups: dict[str, Any] = {}     # group title -> argument group
    exclusive: dict[str, Any] = {}  # Option.exclusive -> mutually exclusive group
    paths = []
    for option in OPTIONS:
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        target = groups[option.group]
        if option.exclusive:
            if option.exclusive not in exclusive:
                exclusive[option.exclusive] = target.add_mutually_exclusive_group()
            target = exclusive[option.exclusive]
        names = [option.flag, *([option.short] if option.short else [])]
        if not option.takes_value:
            target.add_argument(*names, dest=option.name, action="store_true", help=_help(option))
            continue
        # Raw text, as from the environment or a file; config_from_args parses all alike. A
        # default computed when the Config is made (the cache root) stays None here.
        default = option.default if isinstance(option.default, str) else None
        action = target.add_argument(*names, dest=option.name, metavar=option.metavar, default=default,
                                     choices=option.choices or None, help=_help(option))
        if option.metavar in ("PATH", "DIR"):
            paths.append((action, option.metavar == "DIR"))
    return paths


def _help(option: Option) -> str:
    if option.required:
        suffix = "; required"
    elif option.takes_value and (option.default is not None or option.default_doc):
        suffix = f"; default {option.default_markdown}"
    else:
        suffix = ""
    return plain(option.help + suffix).replace("%", "%%")  # argparse %-formats help


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
                    "Options may also come from a TOML --config file and YEASTARFS_<NAME> variables;\n"
                    "the command line wins, then the environment, then the file.",
        epilog="examples:\n"
               "  yeastarfs mount /mnt/recordings --pbx https://192.168.5.150:8088 --user api \\\n"
               "      --password-file /etc/yeastarfs/password --ca-file /etc/yeastarfs/pbx.pem\n"
               "  mount -t fuse.yeastarfs https://192.168.5.150:8088 /mnt/recordings \\\n"
               "      -o username=api,password_file=/etc/yeastarfs/password,cache_size=20G\n"
               "  fstab: https://192.168.5.150:8088 /mnt/recordings fuse.yeastarfs "
               "_netdev,username=api,password_file=/etc/yeastarfs/password 0 0\n\n"
               "signals: SIGHUP re-reads the CDR of the whole --since window now, SIGUSR1 logs statistics,\n"
               "SIGTERM/SIGINT unmount.\n"
               "exit status: 0 mounted (or unmounted cleanly), 1 start-up failure, 2 usage error.")
    mountpoint = mount.add_argument("mountpoint", metavar="MOUNTPOINT")
    parser.path_actions = [(mountpoint, True), *_add_mount_options(mount)]  # type: ignore[attr-defined]
    mount.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)  # the daemon's child
    parser.mount_parser = mount  # type: ignore[attr-defined]  # for layered defaults
    demo = commands.add_parser(
        "demo", help="mount a built-in simulated PBX with sample recordings",
        description="Start the PBX simulator with sample recordings, mount them, and unmount on Ctrl-C.")
    demo.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?", help="where to mount (default: a temporary dir)")
    demo.add_argument("--recordings", type=int, default=60, help="sample recordings to create (default 60)")
    status = commands.add_parser(
        "status", help="show the state of a running mount, or what is cached of a file or folder",
        description="For a mount's root: PBX reachable, token age, last event and poll, recordings "
                    "indexed, cache use and hit rate, downloads in flight. For a recording: complete, "
                    "partial (bytes held) or not cached; for a folder: how many of its recordings are "
                    "each, and the bytes held. Asks the daemon through extended attributes; never "
                    "contacts the PBX or downloads anything.")
    status.epilog = ("examples:\n  yeastarfs status /mnt/recordings\n"
                     "  yeastarfs status /mnt/recordings --json | jq .cache_hit_rate\n"
                     "  yeastarfs status /mnt/recordings/2026/11/27\n"
                     "exit status: 0, or 1 when PATH is not in a running yeastarfs mount.")
    status.add_argument("path", metavar="PATH", help="the mount's root, or a file or folder in it")
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
    _add_watch_parser(commands)
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
    commands.add_parser(
        "man", help="print the man page (roff)",
        description="Print yeastarfs(1) in roff, built from the same option declarations as --help.",
        epilog="example:\n  yeastarfs man > yeastarfs.1 && man ./yeastarfs.1")
    install = commands.add_parser(
        "install-system", help="put yeastarfs where mount(8), systemd and man find it",
        description="Link this installation's yeastarfs command into PREFIX/bin (where mount -t "
                    "fuse.yeastarfs and fstab find it), write the man page to PREFIX/share/man/man1, "
                    "the README and the example .mount/.automount units to PREFIX/share/doc/yeastarfs, "
                    "and the service template yeastarfs@.service to UNIT_DIR. Safe to run again: "
                    "prints what it wrote, linked or left unchanged.",
        epilog="examples:\n  sudo yeastarfs install-system\n"
               "  yeastarfs install-system --dest /tmp/stage     # a staging root, as for a package")
    install.add_argument("--prefix", default="/usr/local", metavar="DIR",
                         help="where bin/ and share/ go (default /usr/local)")
    install.add_argument("--unit-dir", default="/etc/systemd/system", metavar="DIR",
                         help="where the service template goes (default /etc/systemd/system)")
    install.add_argument("--dest", default="/", metavar="DIR",
                         help="staging root every path is written under (default /)")
    completion = commands.add_parser(
        "completion", help="print a shell completion script",
        description="Print a completion script for SHELL, made from these parsers by the shtab "
                    "package (pip install 'yeastarfs[completion]').",
        epilog="example:\n  yeastarfs completion bash > /etc/bash_completion.d/yeastarfs")
    completion.add_argument("shell", choices=["bash", "zsh"])
    parser.commands = dict(commands.choices)  # type: ignore[attr-defined]  # by name, for the man page
    return parser


def _add_watch_parser(commands) -> None:
    watch = commands.add_parser(
        "watch", help="print or process each new recording once, as the mount learns of it",
        description="Print each recording a running mount discovers, one line each, in discovery order; "
                    "with --follow keep going as calls end (a NewCdr event shows within a second). With "
                    "--exec run a command per recording, with --link-into make a symlink to it. Reads the "
                    "mount's index read-only and asks the mount itself; no PBX request, no credentials. "
                    "--state FILE makes it resumable: after a crash, a reboot or a remount it continues "
                    "exactly where it stopped, never repeating a recorded success, never losing one.")
    watch.epilog = (
        "examples:\n"
        "  yeastarfs watch /mnt/recordings --follow\n"
        "  yeastarfs watch /mnt/recordings --since 1d --format json | jq -r .caller\n"
        "  yeastarfs watch /mnt/recordings --follow --cached --state ~/.watch.json \\\n"
        "      --jobs 2 --exec /usr/local/bin/transcribe\n"
        "  yeastarfs watch /mnt/recordings --follow --link-into ~/incoming\n\n"
        "The command gets the path as its last argument (\"$1\" with --shell) and YEASTAR_PATH,\n"
        "YEASTAR_RECORDING, YEASTAR_CALLER, YEASTAR_CALLEE, YEASTAR_CALLID, YEASTAR_START_TIME,\n"
        "YEASTAR_TYPE, YEASTAR_STATUS, YEASTAR_CALL_SECONDS, YEASTAR_TALK_SECONDS and YEASTAR_CURSOR;\n"
        "its stdout goes to watch's stderr. Done only when it exits 0; else retried after 1, 2, 4...\n"
        "s, then reported.\n"
        "JSON lines: " + ", ".join(CALL_COLUMNS[:7]) + ",\n  " + ", ".join(CALL_COLUMNS[7:])
        + ", cursor (and error).\n\n"
        "signals: SIGINT/SIGTERM start nothing new and wait --grace for running commands, then kill\n"
        "them; a second signal kills them at once.\n"
        "exit status: 0 done (with --follow: stopped by a signal, every command finished; or stdout\n"
        "closed), 1 some recordings failed (without --follow) or an error, 2 usage error,\n"
        "128+N stopped by signal N before the work was done (without --follow, or commands killed).")
    watch.add_argument("mountpoint", metavar="MOUNTPOINT")
    watch.add_argument("-f", "--follow", action="store_true",
                       help="keep watching (default: deliver what is there, then exit)")
    watch.add_argument("--format", choices=["paths", "json"], default="paths",
                       help="a path per line (default), or JSON lines with the call's fields")
    watch.add_argument("--since", metavar="DURATION",
                       help="also deliver the recordings of calls started within DURATION (e.g. 1d); "
                            "default: only recordings discovered from now on. Ignored once --state exists")
    watch.add_argument("--cached", action="store_true",
                       help="deliver a recording only once it is fully in the mount's cache "
                            "(use with the mount's --prefetch new)")
    watch.add_argument("--state", metavar="FILE",
                       help="resume from and record progress in FILE (JSON, replaced atomically)")
    watch.add_argument("--link-into", metavar="DIR",
                       help="make DIR/<recording> a symlink to each recording (atomically: IN_MOVED_TO)")
    watch.add_argument("--jobs", type=int, default=1, metavar="N", help="commands run at once (default 1)")
    watch.add_argument("--retries", type=int, default=3, metavar="N",
                       help="retries of a failed command before it is reported (default 3)")
    watch.add_argument("--grace", default="30s", metavar="DURATION",
                       help="on SIGINT/SIGTERM, how long running commands may finish (default 30s)")
    watch.add_argument("--shell", action="store_true", help="run the --exec command with /bin/sh -c")
    watch.add_argument("--exec", dest="exec_command", nargs=argparse.REMAINDER, metavar="CMD [ARG...]",
                       help="run CMD ARG... PATH for each recording; everything after --exec is the command")


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated Config from parsed mount arguments: each option's value (command line,
    environment, config file or default) through its parser into its field."""
    missing = [option for option in OPTIONS if option.required and not getattr(args, option.name)]
    if missing:
        raise errors.ConfigError(_required_message(missing))
    fields = {option.field: option.value(getattr(args, option.name)) for option in OPTIONS
              if option.field and getattr(args, option.name) is not None}
    # The few that are not one option to one field:
    password = getattr(args, "password", None) or read_password(args.password_file)  # a file-only key
    if args.insecure:
        log.warning("tls: --insecure: the PBX's certificate is not verified")
    any_source = str(args.events_allow_from or "").strip().lower() == "any"
    return Config(mountpoint=args.mountpoint, password=password, verify=args.ca_file or not args.insecure,
                  allow_any_event_source=any_source, **fields).validate()


def _required_message(missing: list[Option]) -> str:
    names = " and ".join(f"{option.flag} {option.metavar}" for option in missing)
    verb = "is" if len(missing) == 1 else "are"
    return (f"{names} {verb} required (on the command line, as -o {'/'.join(o.o_key for o in missing)}, "
            f"in {'/'.join(o.env for o in missing)} or in the config file)")


def _cache_root(args: argparse.Namespace) -> str:
    return os.path.abspath(args.cache_dir) if args.cache_dir else default_cache_root()


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


# The daemon is started as ``python -I -c`` with this code, not ``python -m yeastarfs``: -m
# puts the current directory first on the module path, so a `yeastarfs/` folder planted in
# a shared directory (mount -a, sudo mount from /tmp) would run as root. -I also ignores
# PYTHONPATH and the user's site-packages; the code drops '' and the current directory from
# sys.path for Pythons whose -I does not already do so.
_DAEMON_CODE = ("import os, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.', os.getcwd())]; "
                "from yeastarfs.app.cli import main; sys.exit(main())")


def _isolated_python() -> list[str]:
    """The command that runs ``yeastarfs`` in a fresh, isolated interpreter."""
    return [sys.executable, "-I", "-c", _DAEMON_CODE]


def _spawn_daemon(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run this command again as a detached child and wait until it is mounted."""
    config = config_from_args(args)  # fail fast, in this terminal, on bad options or a missing password
    log_file = args.log_file or daemon_log_path(config.cache_root)  # in a cache root nobody else controls
    read_fd, write_fd = os.pipe()
    child_argv = [*_isolated_python(), *argv, "--foreground", "--ready-fd", str(write_fd)]
    if not args.log_file:
        child_argv += ["--log-file", log_file]
    _create_private_file(log_file)
    # Under a Type=notify service the child is the daemon: systemd hears its pid (MAINPID=)
    # now, and READY=1, STATUS= and the watchdog from the child itself (WATCHDOG_PID names
    # this process, so the child gets the watchdog without it).
    notifier = Notifier.from_environment()
    child_env = {key: value for key, value in os.environ.items() if key != WATCHDOG_PID_ENV}
    with open(log_file, "ab") as child_stderr:  # tracebacks of a child that dies early land here
        child = subprocess.Popen(child_argv, pass_fds=(write_fd,), start_new_session=True, env=child_env,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=child_stderr)
    os.close(write_fd)
    notifier.send(f"MAINPID={child.pid}")
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
    return print_status(args.path, as_json=args.json)


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


def cmd_watch(args: argparse.Namespace) -> int:
    from yeastarfs.app.watch import WatchOptions, watch
    problem = ("--exec needs a command" if args.exec_command == [] else
               "--shell needs --exec" if args.shell and not args.exec_command else
               "--jobs must be at least 1" if args.jobs < 1 else
               "--retries must be at least 0" if args.retries < 0 else None)
    if problem:
        print(f"yeastarfs watch: {problem}", file=sys.stderr)
        return EXIT_USAGE
    options = WatchOptions(
        follow=args.follow, output_format=args.format, cached=args.cached, state_path=args.state,
        since_s=parse_duration(args.since) if args.since else None, link_dir=args.link_into,
        command=args.exec_command, shell=args.shell, jobs=args.jobs, retries=args.retries,
        grace_s=parse_duration(args.grace))
    return watch(args.mountpoint, options)


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


def cmd_man() -> int:
    sys.stdout.write(render_man_page(build_parser()))
    return 0


def cmd_install_system(args: argparse.Namespace) -> int:
    from yeastarfs.app.install import install_system
    parser = build_parser()
    return install_system(args.prefix, args.dest, args.unit_dir,
                          man_page=lambda: render_man_page(parser), out=sys.stdout)


def render_man_page(parser: argparse.ArgumentParser) -> str:
    from yeastarfs.app.manpage import render
    return render(parser, parser.commands)


def cmd_completion(args: argparse.Namespace) -> int:
    try:
        import shtab  # optional: the [completion] extra
    except ModuleNotFoundError:
        raise errors.ConfigError("shell completion needs the shtab package: "
                                 "pip install 'yeastarfs[completion]'") from None
    parser = build_parser()
    for action, is_dir in parser.path_actions:
        action.complete = shtab.DIRECTORY if is_dir else shtab.FILE  # read by shtab
    sys.stdout.write(shtab.complete(parser, shell=args.shell))
    return 0


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse *argv*, accepting the mount(8) form and layering file and environment defaults."""
    parser = build_parser()
    if options.is_fstab_form(argv):
        argv = options.translate_fstab_argv(argv)
    if argv[:1] == ["mount"]:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config")
        config_path = pre.parse_known_args(argv[1:])[0].config
        parser.mount_parser.set_defaults(**options.layered_defaults(config_path))
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
                "calls": lambda: cmd_calls(args), "watch": lambda: cmd_watch(args),
                "cache": lambda: cmd_cache(args),
                "fingerprint": lambda: cmd_fingerprint(args), "simulator": lambda: cmd_simulator(args),
                "man": cmd_man, "completion": lambda: cmd_completion(args),
                "install-system": lambda: cmd_install_system(args)}
    try:
        code = commands[args.command]()
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at exit
        return code
    except BrokenPipeError:
        return _output_closed()
    except errors.YeastarfsError as exc:
        print(f"yeastarfs: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _output_closed() -> int:
    """Whoever read our output has gone (``| head``): stop quietly with status 0, as other
    tools do. stdout is pointed at /dev/null so that the interpreter's last flush of what
    is still buffered does not fail again on the way out."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor
        pass
    return 0

