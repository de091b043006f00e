"""What the tests and scripts/bench.py share: waiting on conditions, the mount runner, simulator pieces.

Owns: waits with deadlines (`wait_until`, `holds_for`, `wait_stable`); `MountProcess`, one
``yeastarfs mount --foreground`` daemon in a subprocess and its mountpoint, cache folder and
log; the per-PBX cache folder and the names inside it as the tests see them; password files,
free ports, simulators of both families (`new_simulator`, ``FAMILIES``) and `view`, the
adapter that says in one vocabulary what either simulator saw (downloads and their first
step, logins, catalogue reads, pushed events, the secrets it handed out); the NewCdr payload
the tests build.

Leaves to others: fixtures (tests/conftest.py, tests/integration/conftest.py wrap these in
pytest fixtures), and every rule of yeastarfs itself. The per-PBX folder's name comes from
`yeastarfs.config.Config.cache_dir`, never a copy of its rule.

Imports no pytest, so that scripts/bench.py can use it: a failed wait raises AssertionError,
which pytest reports as a test failure and the benchmark as an error. Not thread-safe: one
`MountProcess` belongs to one test or one benchmark thread.
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import shutil
import socket
import ssl
import subprocess
import sys
import time
from typing import Any, Callable, Iterator, Optional, TypeVar, Union

# The cache folder's layout, as its one owner spells it.
from yeastarfs.cache import CLEAN_STOP_FILE as CLEAN_STOP_MARKER  # noqa: F401 - for the tests
from yeastarfs.cache import COMPLETE_DIR, INDEX_FILE, LOCK_FILE, PARTIAL_DIR  # noqa: F401
from yeastarfs.config import Config
from yeastarfs.sim import PSeriesSimulator, Simulator

T = TypeVar("T")
Message = Union[str, Callable[[], str]]

USER = "api"
PASSWORD = "s3cret-Passw0rd"
WAIT_INTERVAL_S = 0.02
MOUNT_TIMEOUT_S = 30.0
UNMOUNT_TIMEOUT_S = 20.0
UNMOUNT_BUSY_S = 5.0  # how long an unmount may find the mount busy before failing
KILL_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 200
# Daemon log lines that mean something went wrong, unless a test expects them.
BAD_LOG_MARKERS = (" ERROR ", " CRITICAL ", "Traceback")


# ---------------------------------------------------------------------------------------
# Waiting


def _text(message: Message) -> str:
    return message() if callable(message) else message


def wait_until(condition: Callable[[], T], timeout_s: float, interval_s: float = WAIT_INTERVAL_S,
               message: Message = "the condition") -> T:
    """Poll *condition* until it returns a true value, and return that value.

    Raises AssertionError naming *message* (a string, or a function giving one, called only
    on failure so it can show the state at that moment) when *timeout_s* passes first. The
    condition is asked once more at the deadline, so a slow poll never loses a last chance.
    An exception from *condition* ends the wait at once (a daemon that died, for instance).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {_text(message)}")
        time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))


def holds_for(condition: Callable[[], Any], duration_s: float, interval_s: float = WAIT_INTERVAL_S,
              message: Message = "the condition") -> None:
    """Assert that *condition* stays true, asked every *interval_s*, for *duration_s*.

    For promises about a stretch of time ("nothing more is sent", "the token stays alive");
    it is asked at the start and once more at the end.
    """
    deadline = time.monotonic() + duration_s
    started = time.monotonic()
    while True:
        if not condition():
            raise AssertionError(f"{_text(message)} stopped holding after "
                                 f"{time.monotonic() - started:.2f} s of {duration_s:g} s")
        if time.monotonic() >= deadline:
            return
        time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))


def wait_stable(read: Callable[[], T], quiet_s: float, timeout_s: float, interval_s: float = WAIT_INTERVAL_S,
                message: Message = "the value to settle") -> T:
    """The value of *read* once it has not changed for *quiet_s*; AssertionError after *timeout_s*.

    For conditions only visible as "nothing moves any more" (a transfer that stopped, a
    partial file no longer growing).
    """
    deadline = time.monotonic() + timeout_s
    value, since = read(), time.monotonic()
    while True:
        now = time.monotonic()
        if now - since >= quiet_s:
            return value
        if now >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {_text(message)} "
                                 f"(still changing: last {value!r})")
        time.sleep(min(interval_s, max(0.0, deadline - now)))
        current = read()
        if current != value:
            value, since = current, time.monotonic()


# ---------------------------------------------------------------------------------------
# Simulators, passwords, ports


def self_signed_certificate(folder: Union[str, os.PathLike]) -> tuple[str, str, str]:
    """(certificate, key, its SHA-256 in hex) of a new self-signed certificate for 127.0.0.1 in
    *folder*, as a PBX ships with (needs openssl)."""
    cert, key = os.path.join(folder, "pbx.pem"), os.path.join(folder, "pbx.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    with open(cert, encoding="ascii") as handle:
        der = ssl.PEM_cert_to_DER_cert(handle.read())
    return cert, key, hashlib.sha256(der).hexdigest()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_password_file(path: Union[str, os.PathLike], password: str = PASSWORD) -> str:
    """*password* and a newline in a new file at *path*, created 0600 (never readable by others)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(password + "\n")
    return os.fspath(path)


FAMILIES = ("s-series", "p-series")
SIMULATORS = {"s-series": Simulator, "p-series": PSeriesSimulator}


def new_simulator(password: str = PASSWORD, family: str = "s-series", **options: Any) -> Any:
    """A simulator of *family* (not started) that accepts `USER` and *password*; *options* as
    that simulator's class takes."""
    return SIMULATORS[family](username=USER, password=password, **options)


class SSeriesView:
    """What an S-Series simulator saw, in the words the tests share with the P-Series' (`view`)."""

    family = "s-series"
    # Simulator options that make the session's token die after *seconds* unless it is kept
    # alive, and the mount options that keep it alive (the heartbeat).
    token_lifetime_options = staticmethod(lambda seconds: {"token_idle_s": seconds})
    token_keeping_args = staticmethod(lambda seconds: ("--heartbeat-interval", str(max(1, int(seconds / 3)))))

    def __init__(self, sim: Any) -> None:
        self.sim = sim

    def download_requests(self) -> tuple[int, int]:
        """(first steps: get_random, downloads) answered."""
        return self.sim.counters["recording/get_random"], self.sim.counters["recording/download"]

    def first_steps_for(self, downloads: int) -> int:
        """The first steps *downloads* downloads of one recording cost: a random each."""
        return downloads

    def logins(self) -> int:
        return self.sim.counters["login"]

    def keepalives(self) -> int:
        """Requests that kept the session's token alive (heartbeats)."""
        return self.sim.counters["heartbeat"]

    def catalogue_reads(self) -> int:
        return self.sim.counters["cdr/download"]

    def event_pushes(self) -> int:
        return self.sim.counters["event_push"]

    def secrets(self) -> set[str]:
        """Every secret the PBX was sent or handed out: password hash, tokens, randoms."""
        found = {self.sim.password_md5}
        for entry in self.sim.requests_log:
            found.update(v for k, v in (entry.get("query") or {}).items() if k in ("token", "random"))
            found.update(v for k, v in (entry.get("body") or {}).items() if k == "random" and isinstance(v, str))
        return found - {""}


class PSeriesView(SSeriesView):
    """What a P-Series simulator saw (see `SSeriesView`)."""

    family = "p-series"
    token_lifetime_options = staticmethod(lambda seconds: {"access_token_ttl_s": seconds})
    token_keeping_args = staticmethod(lambda seconds: ())  # the client refreshes by itself

    def download_requests(self) -> tuple[int, int]:
        """(first steps: recording/download for a resource URL, audio downloads) answered."""
        return self.sim.counters["recording/download"], self.sim.counters["download"]

    def first_steps_for(self, downloads: int) -> int:
        """One resource URL serves every download of a recording within its lifetime."""
        return 1 if downloads else 0

    def logins(self) -> int:
        return sum(1 for entry in self.sim.requests_log if entry["endpoint"] == "get_token" and entry["method"] == "POST")

    def keepalives(self) -> int:
        """Requests that kept the session's token alive (refreshes)."""
        return self.sim.counters["refresh_token"]

    def catalogue_reads(self) -> int:
        return self.sim.counters["recording/search"]

    def event_pushes(self) -> int:
        return self.sim.counters["ws_push"] + self.sim.counters["event_push"]

    def secrets(self) -> set[str]:
        """The client secret, every token the PBX was sent, and the resource URLs' keys."""
        found = {self.sim.password}
        for entry in self.sim.requests_log:
            found.update(v for k, v in (entry.get("query") or {}).items() if k == "access_token")
            found.update(v for k, v in (entry.get("body") or {}).items() if k == "refresh_token" and isinstance(v, str))
        return found - {""}


def view(sim: Any) -> SSeriesView:
    """The adapter for *sim*, whichever family it simulates."""
    return PSeriesView(sim) if isinstance(sim, PSeriesSimulator) else SSeriesView(sim)


def factory(build: Callable[..., T], stop: Callable[[T], Any] = lambda made: made.stop()) -> Iterator[Callable[..., T]]:
    """Body of a factory fixture: yields *build*; afterwards stops everything it built.

    ``yield from factory(lambda **kw: PbxClient(...))`` inside a pytest fixture.
    """
    made: list[T] = []

    def make(*args: Any, **kwargs: Any) -> T:
        thing = build(*args, **kwargs)
        made.append(thing)
        return thing

    yield make
    for thing in made:
        stop(thing)


def new_cdr(callid: str = "1571897930.5", name: str = "20191024201242-1571897930.5-203-201-Internal.wav",
            key: str = "event", **extra: Any) -> dict:
    """A NewCdr event as the v2 docs show it (v1: key="action"), their misspellings included
    (yeastar-api.md §7.4); *extra* adds or replaces fields."""
    payload = {
        key: "NewCdr", "callid": callid, "timestart": "2019-10-23 22:18:50",
        "callfrom": "1023", "callto": "2023", "callduraction": "19", "talkduraction": "14",
        "srctrunkname": "", "dsttrcunkname": "", "pincode": "", "status": "ANSWERED",
        "type": "Internal", "recording": name, "didnumber": "", "agentringtime": "0",
        "sn": "369451090405",
    }
    payload.update(extra)
    return payload


# ---------------------------------------------------------------------------------------
# Recordings through a mount


def date_path(name: str) -> tuple[str, str, str, str]:
    """A recording's place in the mount: YYYY, MM, DD, name."""
    return name[0:4], name[4:6], name[6:8], name


def sha256_of(path: Union[str, os.PathLike]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_requests(pbx: Any) -> tuple[int, int]:
    """(first steps, downloads) the simulator has answered: S-Series (get_random, download),
    P-Series (recording/download, the resource URL's audio)."""
    return view(pbx).download_requests()


def pbx_cache_dir(cache_root: Union[str, os.PathLike], pbx_url: str) -> str:
    """The per-PBX folder a mount with ``--cache-dir cache_root --pbx pbx_url`` uses.

    Asked of `Config.cache_dir` (the package has no other public spelling of the rule);
    the Config is a minimal one with a placeholder password, used for nothing else.
    """
    return Config(mountpoint="", pbx_url=pbx_url, username=USER, password="unused",
                  cache_root=os.fspath(cache_root)).cache_dir


# ---------------------------------------------------------------------------------------
# The mount runner


def fusermount() -> str:
    return shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount"


def yeastarfs_command(*args: str) -> list[str]:
    """argv running this checkout's yeastarfs with the current interpreter."""
    return [sys.executable, "-m", "yeastarfs", *args]


def mount_command(mountpoint: Union[str, os.PathLike], pbx_url: str, cache_root: Union[str, os.PathLike],
                  password_file: Optional[str], *extra: str, events_port: int = 0) -> list[str]:
    """argv of ``yeastarfs mount`` as the tests and the benchmark start it (without --password-file
    when *password_file* is None)."""
    password = ["--password-file", password_file] if password_file is not None else []
    return yeastarfs_command("mount", os.fspath(mountpoint), "--pbx", pbx_url, "--user", USER, *password,
                             "--cache-dir", os.fspath(cache_root), "--events-port", str(events_port), *extra)


class MountProcess:
    """One ``yeastarfs mount --foreground`` daemon started by us (we know its pid), and its mountpoint.

    ``cache_root`` is what ``--cache-dir`` names; ``pbx_dir`` the per-PBX folder inside it.
    `start` may be called again after `unmount` (the benchmark restarts one mount).
    Set ``errors_expected`` when the test provokes ERROR lines in the daemon log. *env* adds
    to (or replaces in) the daemon's environment, e.g. ``{"TZ": "America/Bogota"}``.
    """

    def __init__(self, pbx_url: str, mountpoint: Union[str, os.PathLike], cache_root: Union[str, os.PathLike],
                 password_file: str, log_path: Union[str, os.PathLike], extra_args: tuple = (), *,
                 log_level: str = "DEBUG", ready_timeout_s: float = MOUNT_TIMEOUT_S,
                 ready_interval_s: float = 0.05, env: Optional[dict] = None) -> None:
        self.pbx_url = pbx_url
        self.mountpoint = os.fspath(mountpoint)
        self.cache_root = os.fspath(cache_root)
        self.pbx_dir = pbx_cache_dir(self.cache_root, pbx_url)
        self.log_path = os.fspath(log_path)
        self.events_port = free_port()
        self.argv = mount_command(self.mountpoint, pbx_url, self.cache_root, password_file,
                                  "--foreground", "--log-level", log_level, "--cache-min-free", "0", *extra_args,
                                  events_port=self.events_port)
        self.ready_timeout_s = ready_timeout_s
        self.ready_interval_s = ready_interval_s
        self.env = None if env is None else {**os.environ, **env}
        self.process: Optional[subprocess.Popen] = None
        self.ready_s: Optional[float] = None
        self.errors_expected = False
        self._log = None

    # -- the cache folder ------------------------------------------------------------------

    @property
    def index_path(self) -> str:
        return os.path.join(self.pbx_dir, INDEX_FILE)

    @property
    def complete_dir(self) -> str:
        return os.path.join(self.pbx_dir, COMPLETE_DIR)

    @property
    def partial_dir(self) -> str:
        return os.path.join(self.pbx_dir, PARTIAL_DIR)

    def cache_file(self, name: str) -> str:
        """Where the complete cached copy of recording *name* lies."""
        return os.path.join(self.complete_dir, name)

    def path(self, *parts: str) -> str:
        return os.path.join(self.mountpoint, *parts)

    def recording_path(self, name: str) -> str:
        return self.path(*date_path(name))

    # -- the daemon ------------------------------------------------------------------------

    def start(self, wait: bool = True) -> "MountProcess":
        """Spawn the daemon; with *wait*, return once the mountpoint lists (``ready_s`` says when)."""
        os.makedirs(self.mountpoint, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._started = time.perf_counter()
        self.ready_s = None
        # Own session: a Ctrl-C reaches only the test runner or the benchmark, which then unmount in order.
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                        start_new_session=True, env=self.env)
        if wait:
            self.wait_mounted()
        return self

    def wait_mounted(self) -> float:
        """Seconds from spawn until the mountpoint is ours and lists; AssertionError if it never does."""
        wait_until(self._ready, self.ready_timeout_s, self.ready_interval_s,
                   message=lambda: f"the mount at {self.mountpoint}:\n{self.log_tail()}")
        self.ready_s = time.perf_counter() - self._started
        return self.ready_s

    def _ready(self) -> bool:
        if os.path.ismount(self.mountpoint) and _lists(self.mountpoint):
            return True
        if self.process.poll() is not None:
            raise AssertionError(f"daemon exited with {self.process.returncode} before mounting:\n{self.log_tail()}")
        return False

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def unmount(self) -> int:
        """fusermount -u, then the daemon must exit by itself; its exit status."""
        if not self.running():
            self._close_log()
            return self.process.returncode if self.process else 0
        # EBUSY can be transient: another process of the suite (a GIO mount monitor, a walk of
        # the temporary folders) may stat the mountpoint at that moment. Busy for 5 s is a failure.
        deadline = time.monotonic() + UNMOUNT_BUSY_S
        while True:
            result = subprocess.run([fusermount(), "-u", self.mountpoint], capture_output=True, text=True)
            if result.returncode == 0 or "busy" not in result.stderr or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert result.returncode == 0, f"fusermount -u failed: {result.stderr}"
        try:
            code = self.process.wait(timeout=UNMOUNT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon did not exit after unmount:\n{self.log_tail()}") from None
        self._close_log()
        return code

    def kill(self) -> None:
        """Last resort: SIGKILL our daemon (by pid) and detach the mount lazily."""
        if self.running():
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=KILL_TIMEOUT_S)
        # Unconditionally: a dead FUSE mount answers ENOTCONN, which os.path.ismount calls "not a mount".
        subprocess.run([fusermount(), "-uz", self.mountpoint], capture_output=True)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def rss_kib(self) -> int:
        """The daemon's resident memory (VmRSS), KiB."""
        with open(f"/proc/{self.process.pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc/PID/status")

    # -- waiting on the daemon's work -------------------------------------------------------

    def wait_cached(self, name: str, timeout_s: float = 60.0) -> None:
        """Until recording *name* is complete in the cache."""
        wait_until(lambda: os.path.exists(self.cache_file(name)), timeout_s,
                   message=f"{name} to be cached")

    def partial_sizes(self) -> dict[str, int]:
        """Sizes of the partial download files now in the cache."""
        sizes = {}
        try:
            entries = list(os.scandir(self.partial_dir))
        except FileNotFoundError:
            return sizes
        for entry in entries:
            try:
                sizes[entry.name] = entry.stat().st_size
            except FileNotFoundError:
                pass
        return sizes

    def wait_settled(self, quiet_s: float = 0.2, timeout_s: float = 15.0) -> None:
        """Until no partial download file grows (transfers finished, paused or suspended)."""
        wait_stable(self.partial_sizes, quiet_s, timeout_s, interval_s=0.05,
                    message="the partial download files to stop growing")

    # -- the log ------------------------------------------------------------------------------

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def unexpected_log_lines(self) -> list[str]:
        """ERROR, CRITICAL and traceback lines of the daemon's log."""
        return [line for line in self.log().splitlines() if any(marker in line for marker in BAD_LOG_MARKERS)]


def _lists(path: str) -> bool:
    """True when the mount answers (a crashed one answers ENOTCONN)."""
    try:
        os.listdir(path)
        return True
    except OSError:
        return False


def readable(files: list, timeout_s: float) -> list:
    """Those of *files* (sockets, pipes) with something to read within *timeout_s*: poll, not
    select, which fails on descriptors over 1,023 (a long test process may reach them)."""
    poller = select.poll()
    by_fd = {file.fileno(): file for file in files}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    return [by_fd[fd] for fd, _ in poller.poll(max(0.0, timeout_s) * 1000)]
