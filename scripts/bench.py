#!/usr/bin/env python3
"""Benchmark yeastarfs against its limits, each limit measured in the same run (issue 5).

A cold read can be no faster than downloading the same bytes from the PBX directly, and a
cached read no faster than reading a local file. This script starts the PBX simulator on
loopback, mounts yeastarfs against it, runs every case against the mount and against its
baseline alternately, several times, and prints a table (median, min, max, ratio) and one
``BENCH_JSON {...}`` line.

    .venv/bin/python scripts/bench.py                      # the default set, a few minutes
    .venv/bin/python scripts/bench.py --cases cold_seq,walk --runs 3
    .venv/bin/python scripts/bench.py --walk-recordings 1000000 --stream-mb 1024   # full size
    .venv/bin/python scripts/bench.py --cases cold_seq,cached_repeat --metrics     # metrics on
    .venv/bin/python scripts/bench.py --api p-series       # the same table against a P-Series

``--api`` picks the simulated PBX family (the same recordings either way) and mounts with
that ``--api``. The simulator runs in a child process of its own, so that neither the baseline client in
this process nor the yeastarfs daemon shares an interpreter lock with the server.
Timings cover open to last byte (close is not timed) on both sides. Reads use 1 MiB
``readinto`` calls on unbuffered files, both on the mount and on local files (the local
baselines are these Python reads, not ``dd``). MB is 10^6 bytes everywhere.

Cases and their baselines:

cold_seq       Sequential read of an uncached ``--cold-mb`` recording through the mount
               (MB/s). Baseline: the same recording downloaded directly with ``requests``
               (S-Series: POST recording/get_random, then GET recording/download; P-Series:
               GET recording/download for the resource URL, then GET it). Goal >= 0.9x.
first_64k      Open + first 64 KiB of an uncached recording (ms), two rows: a ``--head-mb``
               recording at zero PBX latency (goal <= baseline + 3 ms, issue 16), and a
               2 MB one while every PBX request takes ``--latency-ms`` (goal <= baseline
               + 10 ms). Baseline: the same two requests and 64 KiB of the body directly.
parallel32     ``--parallel-readers`` threads each read a distinct uncached
               ``--parallel-mb`` recording (mount started with ``--max-downloads 32``);
               aggregate MB/s. Baseline: as many parallel direct downloads. Goal >= 0.8x.
cached_first   First read of a cached recording after its pages were dropped from the page
               cache (posix_fadvise DONTNEED on the cache file and on the mounted file).
               Baseline: the cache file itself read the same way. Goal >= 0.3x.
cached_repeat  Second of two reads of a cached recording (kernel page cache). Baseline:
               second of two reads of the cache file. Goal >= 0.9x.
reread         An uncached ``--cold-mb`` recording read whole, then at once again: the
               second read (MB/s), which should come from the kernel's page cache.
               Baseline: the second of two reads of the cache file. Goal: the second
               read makes no FUSE read in any run (the daemon's status counts them).
sniff          ``--sniff-files`` times open, read 4 KiB, close of uncached ``--sniff-mb``
               recordings with the PBX sending at ``--lan-mbps``: body bytes the PBX sent
               per sniff once every transfer stopped (KB). Goal: at most 4 flow-control
               windows; the note gives the socket buffer sizes (what may be in flight).
ls_day         ``ls -l`` of a day folder with ``--ls-recordings`` recordings, two rows:
               the first listing on a fresh mount (nothing of the mount is in the kernel's
               caches yet; goal <= 4x), and the same folder listed again right after (names
               and attributes now cached by the kernel for the mount's 60 s timeout; the
               listing itself and the extended-attribute probes of ``ls`` still reach the
               daemon; goal <= 2x, issue 16). Baseline: ``ls -l`` of a local folder of as
               many empty files (in the kernel's caches, as a folder in use is).
walk           ``--walk-recordings`` recordings over 3 years (2020-2022), each walk the first
               on a fresh mount: names only (``find -type f``: lookups of the folders and
               readdir) and with a stat of every file (``find -type f -printf %s``).
               Baseline: the same tree of empty local files. Goal <= 4x the time.
mount_start    Seconds from spawning ``yeastarfs mount`` until ``os.listdir`` of the
               mountpoint works, with a pre-built index of ``--index-recordings``
               recordings and a PBX with few recordings (``--since 1d``). Goal < 2 s.
memory         Daemon VmRSS with ``--index-recordings`` indexed: idle after start, and
               sampled every 50 ms while streaming a ``--stream-mb`` recording (max, and
               last minus first sample). Goal < 150 MB, growth <= 10 MB (flat).
pbx_requests   Simulator counters around one cold read of a whole recording, which is
               also checked byte for byte. Goal: exactly 1 first step (get_random, or the
               P-Series resource URL), 1 download and 0 logins (the token is alive).

Peers (``--peers``): first_64k (zero latency), reread, sniff and ls_day also run against
rclone (``mount :http: --vfs-cache-mode full``) and httpdirfs (``--cache``) where installed
(``apt-get install rclone httpdirfs``, or ``--rclone PATH``/``--httpdirfs PATH``), each
mounting an HTTP server with Range requests (scripts/bench_peers.py, in its own process)
that serves the same kind of files: the ls day's names at a typical recording's size, and
fresh WAV files of the same sizes for the reads, each new to every peer. Their medians are
extra columns; ls_day_again must also beat rclone's, reread both peers'. Each peer mount
is fresh (empty cache) for every first listing. The sniff's peer figure is the bytes their
HTTP server sent, at the same rate.

The listing cases use a mount of their own, restarted for every first listing or walk,
whose index holds the day folder and the 3-year tree; the other cases share one mount.
Mounts are started by tests/harness.py's MountProcess, the runner the integration tests use.

Everything (mounts, simulator, temporary files) is cleaned up on exit, Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_peers import (INSTALL_HINT, PEER_NAMES, FileServer, PeerMount, RemoteService,  # noqa: E402
                         count_acked_bytes, find_peers)
from harness import (MountProcess, date_path, new_simulator, view, wait_stable,  # noqa: E402 - after the path
                     write_password_file)

from yeastarfs.downloads import INITIAL_WINDOW_BYTES  # noqa: E402
from yeastarfs.index import RecordingIndex  # noqa: E402
from yeastarfs.models import Recording  # noqa: E402
from yeastarfs.sim.sseries import wav_bytes  # noqa: E402

MB = 1_000_000
BLOCK_BYTES = 1 << 20
HEAD_BYTES = 64 * 1024
WAV_HEADER_BYTES = 44
BYTES_PER_S = 16_000  # the simulator's PCM-16 8 kHz mono
USER = "api"
API = "api/v2.0.0"
P_API = "openapi/v1.0"
P_USER_AGENT = {"User-Agent": "OpenAPI"}
FIRST_STEP = {"s-series": "get_random", "p-series": "download URL"}
READY_TIMEOUT_S = 180.0
READY_POLL_S = 0.002  # mount_start is timed by this poll
RSS_SAMPLE_S = 0.05
FLAT_GROWTH_MB = 10.0
# A 1-minute load average above this at start means something else is running.
BUSY_LOAD = 0.5
MEMORY_LIMIT_MB = 150.0
INDEX_BATCH = 50_000
TREE_FIRST_DAY = dt.datetime(2020, 1, 1)
TREE_DAYS = 3 * 365 + 1  # 2020-01-01 .. 2022-12-31
LS_DAY = dt.datetime(2023, 6, 15)
PEER_DAY = dt.datetime(2023, 6, 16)  # the peers' recordings, beside the ls day
MAIN_CASES = ("pbx_requests", "cold_seq", "cold_seq_lan", "first_64k", "parallel32", "cached_first",
              "cached_repeat", "reread", "sniff", "ls_day", "walk")
# Cases that also run against the peers with --peers.
PEER_CASES = ("first_64k", "reread", "sniff", "ls_day")
SNIFF_BYTES = 4096
BIG_CASES = ("mount_start", "memory")
ALL_CASES = MAIN_CASES + BIG_CASES
C_LOCALE = {**os.environ, "LC_ALL": "C"}


# ---------------------------------------------------------------------------------------
# Options and machine


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(ALL_CASES),
                        help=f"comma-separated cases (default all: {','.join(ALL_CASES)})")
    parser.add_argument("--runs", type=int, default=5, help="runs per case (default 5)")
    parser.add_argument("--api", choices=("s-series", "p-series"), default="s-series",
                        help="the simulated PBX family, and the mounts' --api (default s-series)")
    parser.add_argument("--walk-recordings", type=int, default=100_000,
                        help="recordings in the walk tree (default 100000; the issue's case: 1000000)")
    parser.add_argument("--index-recordings", type=int, default=1_000_000,
                        help="recordings indexed for mount_start and memory (default 1000000)")
    parser.add_argument("--stream-mb", type=float, default=200,
                        help="recording streamed in the memory case, MB (default 200; the issue's case: 1024)")
    parser.add_argument("--cold-mb", type=float, default=20, help="cold and cached recordings, MB (default 20)")
    parser.add_argument("--parallel-mb", type=float, default=4, help="each parallel recording, MB (default 4)")
    parser.add_argument("--parallel-readers", type=int, default=32, help="parallel readers (default 32)")
    parser.add_argument("--ls-recordings", type=int, default=1000, help="recordings in the ls day (default 1000)")
    parser.add_argument("--latency-ms", type=float, default=20, help="PBX latency in first_64k (default 20)")
    parser.add_argument("--lan-mbps", type=float, default=1000,
                        help="PBX send rate in cold_seq_lan, Mbit/s (default 1000: a gigabit LAN)")
    parser.add_argument("--head-mb", type=float, default=16,
                        help="recording whose first 64 KiB are read at zero latency, MB (default 16)")
    parser.add_argument("--sniff-files", type=int, default=20, help="files sniffed per run (default 20)")
    parser.add_argument("--sniff-mb", type=float, default=2, help="each sniffed recording, MB (default 2)")
    parser.add_argument("--peers", action="store_true",
                        help=f"also run {', '.join(PEER_CASES)} against rclone and httpdirfs where installed, "
                             f"serving the same recordings over HTTP ({INSTALL_HINT})")
    for peer in PEER_NAMES:
        parser.add_argument(f"--{peer}", metavar="PATH", help=f"the {peer} executable (default: from PATH)")
    parser.add_argument("--tmp-dir", default=None, help="where mounts, caches and trees go (default: system temp)")
    parser.add_argument("--json", metavar="PATH", help="also write the JSON result to PATH")
    parser.add_argument("--metrics", action="store_true",
                        help="start every mount with --metrics-port 0 (FUSE operations measured), to compare "
                             "with a run without")
    args = parser.parse_args(argv)
    args.case_list = [case.strip() for case in args.cases.split(",") if case.strip()]
    unknown = sorted(set(args.case_list) - set(ALL_CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {','.join(ALL_CASES)}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def machine_info(tmp_dir: str) -> dict:
    """What the numbers depend on: CPU, cores, kernel, Python, libfuse, RAM, cache filesystem."""
    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(), "libfuse": _command_line(["fusermount3", "--version"]),
        "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "tmp_fs": _command_line(["stat", "-f", "-c", "%T", tmp_dir]),
        "load_at_start": round(os.getloadavg()[0], 2),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _command_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "?"


# ---------------------------------------------------------------------------------------
# The simulator, in a child process driven over a pipe


def _build_simulator(password: str, api: str) -> tuple[dict, Callable[[], None]]:
    """In the child process: a started simulator of *api*'s family and the operations the
    benchmark calls."""
    sim = new_simulator(password, api).start()
    seen = view(sim)
    acked_bytes = count_acked_bytes(sim._http)  # the simulator's HTTP server (a socketserver)
    ops: dict[str, Callable] = {
        "base_url": lambda: sim.base_url,
        "add": lambda specs: [sim.add_recording(announce=False, **spec).name for spec in specs],
        "warm": lambda names: sum(len(sim.recording_bytes(name)) for name in names),
        "latency": lambda seconds: setattr(sim, "latency_s", seconds),
        "bandwidth": lambda bps: setattr(sim, "bandwidth_bps", bps),
        "requests": lambda: dict(zip(("first_step", "download", "login"),
                                     (*seen.download_requests(), seen.logins()))),
        "downloaded": sim.downloaded_bytes,
        "acked": acked_bytes,
        "sha256": lambda name: sim.recordings[name].sha256,
    }
    return ops, sim.stop


class RemoteSimulator(RemoteService):
    """The PBX simulator in a child process; `call` runs one operation of `_build_simulator`."""

    def __init__(self, password: str, api: str) -> None:
        super().__init__(_build_simulator, password, api, name="pbx-simulator")
        self.base_url: str = self.call("base_url")


@dataclasses.dataclass(frozen=True)
class Rec:
    name: str
    size_bytes: int


def recording_bytes(mb: float) -> int:
    return int(mb * MB) + WAV_HEADER_BYTES


class Pool:
    """Fresh simulator recordings per case, all added before mounting; each is used once.

    They lie in the last 20 hours, so ``--since 1d`` makes every mount index them.
    """

    def __init__(self, sim: RemoteSimulator) -> None:
        self._sim = sim
        self._free: dict[str, list[Rec]] = collections.defaultdict(list)
        self._next_start = dt.datetime.now().replace(microsecond=0) - dt.timedelta(hours=20)

    def plan(self, group: str, count: int, size_bytes: int) -> None:
        specs = []
        for _ in range(count):
            specs.append({"start": self._next_start, "size_bytes": size_bytes,
                          "duration_s": max(1.0, (size_bytes - WAV_HEADER_BYTES) / BYTES_PER_S)})
            self._next_start += dt.timedelta(seconds=7)
        self._free[group] += [Rec(name, size_bytes) for name in self._sim.call("add", specs)]

    def take(self, group: str, count: int = 1) -> list[Rec]:
        return take_planned(self._free, group, count)


def take_planned(free: dict[str, list], group: str, count: int) -> list:
    """*count* of *group*'s planned recordings, each handed out once."""
    taken, free[group] = free[group][:count], free[group][count:]
    if len(taken) < count:
        raise RuntimeError(f"not enough fresh recordings planned for {group}")
    return taken


def plan_recordings(pool: Pool, args: argparse.Namespace) -> None:
    """Add every recording the selected cases will read, before any mount starts."""
    cases, runs = set(args.case_list), args.runs
    pool.plan("warmup", 1, recording_bytes(2))
    if "pbx_requests" in cases:
        pool.plan("pbx_requests", runs, recording_bytes(2))
    if "cold_seq" in cases:
        pool.plan("cold_seq", runs, recording_bytes(args.cold_mb))
    if "cold_seq_lan" in cases:
        pool.plan("cold_seq_lan", runs, recording_bytes(args.cold_mb))
    if "first_64k" in cases:
        pool.plan("first_64k", runs, recording_bytes(2))
        pool.plan("first_64k_0ms", runs, recording_bytes(args.head_mb))
    if "reread" in cases:
        pool.plan("reread", runs, recording_bytes(args.cold_mb))
    if "sniff" in cases:
        pool.plan("sniff", runs * args.sniff_files, recording_bytes(args.sniff_mb))
    if "parallel32" in cases:
        pool.plan("parallel32", runs * args.parallel_readers, recording_bytes(args.parallel_mb))
    if cases & {"cached_first", "cached_repeat"}:
        pool.plan("cached", 1, recording_bytes(args.cold_mb))
    if "memory" in cases:
        pool.plan("memory", runs, recording_bytes(args.stream_mb))


# ---------------------------------------------------------------------------------------
# The baseline client: the PBX API used directly with requests


def direct_login(base_url: str, password: str, api: str) -> str:
    """S-Series: POST login with the MD5 of the password; P-Series: get_token. The token
    (never printed)."""
    if api == "p-series":
        reply = requests.post(f"{base_url}/{P_API}/get_token", json={"username": USER, "password": password},
                              headers=P_USER_AGENT, timeout=30).json()
        if reply.get("errcode") != 0:
            raise RuntimeError(f"baseline get_token failed with errcode {reply.get('errcode')}")
        return reply["access_token"]
    body = {"username": USER, "password": hashlib.md5(password.encode()).hexdigest(), "version": "2.0.0"}
    reply = requests.post(f"{base_url}/{API}/login", json=body, timeout=30).json()
    if str(reply.get("status", "")).lower() != "success":
        raise RuntimeError(f"baseline login failed with errno {reply.get('errno')}")
    return reply["token"]


class DirectClient:
    """One baseline downloader (own requests.Session, shared token)."""

    def __init__(self, base_url: str, token: str) -> None:
        self._base_url = base_url
        self._api = f"{base_url}/{API}"
        self._token = token
        self._session = requests.Session()

    def open(self, name: str) -> requests.Response:
        """get_random, then GET recording/download, streamed."""
        reply = self._session.post(f"{self._api}/recording/get_random", params={"token": self._token},
                                   json={"recording": name}, timeout=30).json()
        if "random" not in reply:
            raise RuntimeError(f"baseline get_random failed with errno {reply.get('errno')}")
        query = {"recording": name, "random": reply["random"], "token": self._token}
        response = self._session.get(f"{self._api}/recording/download", params=query, stream=True, timeout=60)
        response.raise_for_status()
        return response

    def download(self, name: str) -> tuple[float, int]:
        """(seconds from the first step to the last byte, bytes)."""
        start = time.perf_counter()
        response = self.open(name)
        total = sum(len(chunk) for chunk in response.iter_content(BLOCK_BYTES))
        elapsed = time.perf_counter() - start
        response.close()
        return elapsed, total

    def head(self, name: str, size: int) -> float:
        """Seconds from the first step until the first *size* body bytes are in."""
        start = time.perf_counter()
        response = self.open(name)
        data = response.raw.read(size)
        elapsed = time.perf_counter() - start
        response.close()
        if len(data) != size:
            raise RuntimeError(f"baseline head read {len(data)} bytes")
        return elapsed


class PSeriesDirectClient(DirectClient):
    """The P-Series baseline: recording/download for the resource URL, then GET it."""

    def open(self, name: str) -> requests.Response:
        reply = self._session.get(f"{self._base_url}/{P_API}/recording/download", headers=P_USER_AGENT,
                                  params={"file": name, "access_token": self._token}, timeout=30).json()
        if reply.get("errcode") != 0:
            raise RuntimeError(f"baseline recording/download failed with errcode {reply.get('errcode')}")
        response = self._session.get(f"{self._base_url}{reply['download_resource_url']}", headers=P_USER_AGENT,
                                     params={"access_token": self._token}, stream=True, timeout=60)
        response.raise_for_status()
        return response


# ---------------------------------------------------------------------------------------
# Mounts


def new_mount(b: "Bench", tag: str, extra: tuple = ()) -> MountProcess:
    """A mount of the simulator in the temporary folder (not started); *tag* names its folders.

    ``--since 1d``: the pool's recordings lie in the last 20 hours. Logs at INFO: DEBUG
    lines for every read would be part of what is timed.
    """
    metrics = ("--metrics-port", "0") if b.args.metrics else ()
    return MountProcess(b.sim.base_url, os.path.join(b.tmp, f"mnt-{tag}"), os.path.join(b.tmp, f"cache-{tag}"),
                        b.password_file, os.path.join(b.tmp, f"daemon-{tag}.log"),
                        ("--since", "1d", "--api", b.args.api, *metrics, *extra),
                        log_level="INFO", ready_timeout_s=READY_TIMEOUT_S, ready_interval_s=READY_POLL_S)


def stop_mount(mount: MountProcess) -> None:
    """Exit-stack cleanup: unmount; whatever does not go is killed."""
    try:
        code = mount.unmount()
        if code != 0:
            print(f"warning: daemon {mount.mountpoint} exited {code}; log {mount.log_path}", flush=True)
    except AssertionError as exc:
        print(f"warning: {exc}", flush=True)
    finally:
        mount.kill()


def rss_mb(mount: MountProcess) -> float:
    return mount.rss_kib() * 1024 / MB


def settle(what: str, wait: Callable[[], object]) -> None:
    """Run *wait* (a harness wait); when it times out, say so and measure anyway."""
    try:
        wait()
    except AssertionError as exc:
        print(f"warning: {what}: {exc}", flush=True)


# ---------------------------------------------------------------------------------------
# Index and local trees


def tree_names(count: int, first_day: dt.datetime, days: int) -> Iterator[str]:
    """*count* recording names spread evenly over *days* days from *first_day*, in order."""
    span_s = days * 86_400
    for i in range(count):
        moment = first_day + dt.timedelta(seconds=i * span_s // count)
        yield f"{moment:%Y%m%d%H%M%S}-{1_500_000_000 + i}.{i}-1001-2002-Inbound.wav"


def walk_names(count: int) -> Iterator[str]:
    return tree_names(count, TREE_FIRST_DAY, TREE_DAYS)


def ls_names(count: int) -> Iterator[str]:
    return tree_names(count, LS_DAY, 1)


def _recording(name: str) -> Recording:
    moment = dt.datetime.strptime(name[:14], "%Y%m%d%H%M%S")
    return Recording(name=name, callid=name.split("-")[1], timestart=f"{moment:%Y-%m-%d %H:%M:%S}",
                     callfrom="1001", callto="2002", call_s=65, talk_s=60, status="ANSWERED",
                     call_type="Inbound")


def build_index(db_path: str, names: Iterator[str], total: int, what: str) -> None:
    """Pre-build a mount's index with RecordingIndex.add, in batches, printing progress."""
    started = time.monotonic()
    done = 0
    with RecordingIndex(db_path) as index:
        batch: list[Recording] = []
        for name in names:
            batch.append(_recording(name))
            if len(batch) == INDEX_BATCH:
                done += len(index.add(batch))
                batch = []
                progress(f"  index {what}: {done:,}/{total:,}")
        done += len(index.add(batch))
    progress(f"  index {what}: {done:,} recordings in {time.monotonic() - started:.1f} s", end=True)


def make_local_tree(root: str, names: Iterator[str], total: int, what: str) -> None:
    """Empty local files at root/YYYY/MM/DD/<name>: the baseline of ls and walk."""
    started, current_dir = time.monotonic(), None
    for done, name in enumerate(names, 1):
        folder = os.path.join(root, name[0:4], name[4:6], name[6:8])
        if folder != current_dir:
            os.makedirs(folder, exist_ok=True)
            current_dir = folder
        os.close(os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT, 0o644))
        if done % INDEX_BATCH == 0:
            progress(f"  local tree {what}: {done:,}/{total:,}")
    progress(f"  local tree {what}: {total:,} files in {time.monotonic() - started:.1f} s", end=True)


def progress(text: str, end: bool = False) -> None:
    """A progress line: rewritten in place on a terminal, one line each otherwise."""
    if sys.stdout.isatty():
        print(f"\r{text}\033[K", end="\n" if end else "", flush=True)
    else:
        print(text, flush=True)


# ---------------------------------------------------------------------------------------
# Measurement primitives


def timed_read(path: str, limit: Optional[int] = None) -> tuple[float, int]:
    """(seconds from open to the last byte, bytes) with 1 MiB readinto on an unbuffered file."""
    buffer = bytearray(min(BLOCK_BYTES, limit or BLOCK_BYTES))
    view, total = memoryview(buffer), 0
    started = time.perf_counter()
    handle = open(path, "rb", buffering=0)
    try:
        while limit is None or total < limit:
            count = handle.readinto(view if limit is None else view[: limit - total])
            if not count:
                break
            total += count
        return time.perf_counter() - started, total
    finally:
        handle.close()


def drop_page_cache(path: str) -> None:
    """Drop the kernel's cached pages of *path* only (nothing else)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def in_parallel(jobs: list[Callable[[], object]]) -> float:
    """Run *jobs* on threads released together; wall seconds until the last one finished."""
    barrier = threading.Barrier(len(jobs) + 1)
    failures: list[BaseException] = []

    def worker(job: Callable[[], object]) -> None:
        barrier.wait()
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(job,), daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return time.perf_counter() - started


def alternate(run: int, mine: Callable[[], float], base: Callable[[], float]) -> tuple[float, float]:
    """Run both sides, the mount first on even runs and the baseline first on odd ones."""
    if run % 2:
        base_value = base()
        return mine(), base_value
    mine_value = mine()
    return mine_value, base()


def run_command(argv: list[str]) -> tuple[float, int]:
    """(seconds, lines of stdout) of a command run in the C locale."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, env=C_LOCALE)
    lines = 0
    for block in iter(lambda: process.stdout.read(BLOCK_BYTES), b""):
        lines += block.count(b"\n")
    code = process.wait()
    elapsed = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{argv[0]} exited {code}")
    return elapsed, lines


# ---------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class Result:
    """One row of the table. ``check(mine, base, ratio)`` decides the goal on medians."""

    key: str
    label: str
    unit: str
    mine: list
    base: Optional[list]
    goal: str
    check: Callable[[float, Optional[float], Optional[float]], bool]
    note: str = ""
    # The peers' samples (--peers), by name, and the peers whose median must be beaten too.
    peers: dict = dataclasses.field(default_factory=dict)
    beat: tuple = ()
    met: bool = dataclasses.field(init=False)
    ratio: Optional[float] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        mine, base = median(self.mine), median(self.base) if self.base else None
        self.ratio = mine / base if isinstance(mine, float) and base else None
        self.met = bool(self.check(mine, base, self.ratio))
        higher_is_better = self.unit == "MB/s"
        for peer in self.beat:
            if self.peers.get(peer):
                theirs = median(self.peers[peer])
                self.met = self.met and (mine > theirs if higher_is_better else mine < theirs)

    def as_json(self) -> dict:
        def side(values):
            if not values:
                return None
            numeric = isinstance(values[0], (int, float))
            return {"median": median(values), "min": min(values) if numeric else None,
                    "max": max(values) if numeric else None, "samples": values}
        return {"case": self.key, "label": self.label, "unit": self.unit, "yeastarfs": side(self.mine),
                "baseline": side(self.base), "ratio": self.ratio, "goal": self.goal, "met": self.met,
                "note": self.note, "peers": {name: side(values) for name, values in self.peers.items()}}


def median(values: list):
    if isinstance(values[0], str):
        return collections.Counter(values).most_common(1)[0][0]
    return float(statistics.median(values))


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def table(results: list[Result]) -> str:
    peers = [name for name in PEER_NAMES if any(name in r.peers for r in results)]
    header = ["case", "yeastarfs (median)", "min", "max", "baseline (median)", "ratio",
              *(f"{name} (median)" for name in peers), "goal", "met?"]
    rows = [header]
    for r in results:
        numeric = not isinstance(r.mine[0], str)
        rows.append([r.label, fmt(median(r.mine)), fmt(min(r.mine)) if numeric else "-",
                     fmt(max(r.mine)) if numeric else "-", fmt(median(r.base)) if r.base else "-",
                     f"{r.ratio:.2f}x" if r.ratio else "-",
                     *(fmt(median(r.peers[name])) if r.peers.get(name) else "-" for name in peers),
                     r.goal, "yes" if r.met else "NO"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def say(case: str, run: int, text: str) -> None:
    print(f"  [{case}] run {run + 1}: {text}", flush=True)


# ---------------------------------------------------------------------------------------
# Cases on the main mount


@dataclasses.dataclass
class Bench:
    args: argparse.Namespace
    sim: RemoteSimulator
    pool: Pool
    token: str
    tmp: str
    password_file: str
    tree: str = ""
    main: Optional[MountProcess] = None
    lister: Optional[MountProcess] = None
    info: dict = dataclasses.field(default_factory=dict)
    peers: list = dataclasses.field(default_factory=list)   # PeerMount, with --peers
    peer_files: Optional["PeerFiles"] = None

    def client(self) -> DirectClient:
        kind = PSeriesDirectClient if self.args.api == "p-series" else DirectClient
        return kind(self.sim.base_url, self.token)

    def recording_counters(self) -> collections.Counter:
        """first_step (get_random, or the P-Series resource URL), download and login requests."""
        return collections.Counter(self.sim.call("requests"))


def case_pbx_requests(b: Bench) -> list[Result]:
    """One cold read of a whole recording: PBX requests it caused, and its bytes verified."""
    samples, bad = [], 0
    for run in range(b.args.runs):
        (rec,) = b.pool.take("pbx_requests")
        before = b.recording_counters()
        digest = sha256_file(b.main.recording_path(rec.name))
        b.main.wait_cached(rec.name)
        delta = b.recording_counters() - before
        bad += digest != b.sim.call("sha256", rec.name)
        sample = f"{delta['first_step']}/{delta['download']}/{delta['login']}"
        samples.append(sample)
        say("pbx_requests", run, f"{FIRST_STEP[b.args.api]}/download/login = {sample}")
    note = "bytes verified" if not bad else f"{bad} reads returned WRONG BYTES"
    return [Result("pbx_requests", f"PBX requests per cold read ({FIRST_STEP[b.args.api]}/download/login)", "count",
                   samples, None, "1/1/0", lambda m, _b, _r: all(s == "1/1/0" for s in samples) and not bad,
                   note)]


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        for block in iter(lambda: handle.read(BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def paired_runs(b: Bench, case: str, mine: Callable[[int], float], base: Callable[[int], float],
                 baseline_name: str, after: Optional[Callable[[int], None]] = None) -> tuple[list, list]:
    """Run *mine* and *base* once per run (alternating which goes first); say each pair."""
    mine_values, base_values = [], []
    for run in range(b.args.runs):
        m, d = alternate(run, lambda: mine(run), lambda: base(run))
        mine_values.append(m)
        base_values.append(d)
        say(case, run, f"mount {m:.0f} MB/s, {baseline_name} {d:.0f} MB/s")
        if after is not None:
            after(run)
    return mine_values, base_values


def cold_reads(b: Bench, case: str, label: str) -> list[Result]:
    """Uncached recordings read sequentially through the mount vs downloaded directly."""
    client, recs = b.client(), {}

    def take(run: int) -> Rec:
        if run not in recs:
            (recs[run],) = b.pool.take(case)
            b.sim.call("warm", [recs[run].name])  # the simulator builds the bytes before either side asks
        return recs[run]

    mine, base = paired_runs(
        b, case, lambda run: throughput(timed_read(b.main.recording_path(take(run).name)), take(run)),
        lambda run: throughput(client.download(take(run).name), take(run)), "direct",
        after=lambda run: b.main.wait_cached(take(run).name))
    return [Result(case, label, "MB/s", mine, base, ">= 0.9x", lambda _m, _b, r: r >= 0.9)]


def case_cold_seq(b: Bench) -> list[Result]:
    return cold_reads(b, "cold_seq", f"cold sequential read, {b.args.cold_mb:g} MB (MB/s)")


def case_cold_seq_lan(b: Bench) -> list[Result]:
    """The cold read again with the PBX sending at gigabit-LAN speed (--lan-mbps): what a
    real PBX allows. Not a goal of the issue; it shows where the loopback gap matters."""
    b.sim.call("bandwidth", int(b.args.lan_mbps * 1_000_000 / 8))
    try:
        return cold_reads(b, "cold_seq_lan", f"cold sequential read, {b.args.cold_mb:g} MB, "
                                             f"PBX at {b.args.lan_mbps:g} Mbit/s (MB/s)")
    finally:
        b.sim.call("bandwidth", None)


def throughput(timing: tuple[float, int], rec: Rec) -> float:
    seconds, size = timing
    if size != rec.size_bytes:
        raise RuntimeError(f"{rec.name}: read {size} bytes, expected {rec.size_bytes}")
    return size / seconds / MB


def case_first_64k(b: Bench) -> list[Result]:
    """Open + first 64 KiB of an uncached recording vs direct API calls: at zero PBX latency
    (a ``--head-mb`` recording; the peers read a file as large), and with ``--latency-ms``."""
    fast = first_64k_runs(b, "first_64k_0ms", 0.0)
    slow = first_64k_runs(b, "first_64k", b.args.latency_ms)
    return [Result("first_64k_0ms", f"first 64 KiB of an uncached {b.args.head_mb:g} MB recording, PBX latency 0 (ms)",
                   "ms", *fast[:2], "<= base + 3 ms", lambda m, d, _r: m <= d + 3, peers=fast[2]),
            Result("first_64k", f"first 64 KiB, uncached, PBX latency {b.args.latency_ms:g} ms (ms)", "ms",
                   *slow[:2], "<= base + 10 ms", lambda m, d, _r: m <= d + 10)]


def first_64k_runs(b: Bench, group: str, latency_ms: float) -> tuple[list, list, dict]:
    """(mount ms, direct ms, {peer: ms}) per run; peers only at zero latency (their server has none)."""
    client, mine, base = b.client(), [], []
    peers = collections.defaultdict(list)
    b.sim.call("latency", latency_ms / 1000)
    try:
        for run in range(b.args.runs):
            (rec,) = b.pool.take(group)
            b.sim.call("warm", [rec.name])
            m, d = alternate(run, lambda: head_ms(b.main.recording_path(rec.name)),
                             lambda: client.head(rec.name, HEAD_BYTES) * 1000)
            mine.append(m)
            base.append(d)
            text = f"mount {m:.1f} ms, direct {d:.1f} ms"
            if latency_ms == 0 and b.peers:
                (peer_file,) = b.peer_files.take(group)
                for peer in b.peers:
                    peers[peer.name].append(head_ms(peer.path(peer_file)))
                    text += f", {peer.name} {peers[peer.name][-1]:.1f} ms"
            say(group, run, text)
            settle(group, b.main.wait_settled)  # the early leaver's transfer stops before the next run
    finally:
        b.sim.call("latency", 0.0)
    return mine, base, dict(peers)


def head_ms(path: str) -> float:
    seconds, size = timed_read(path, limit=HEAD_BYTES)
    if size != HEAD_BYTES:
        raise RuntimeError(f"{path}: first read gave {size} bytes")
    return seconds * 1000


def case_parallel32(b: Bench) -> list[Result]:
    """N readers of distinct uncached recordings at once vs N parallel direct downloads."""
    readers, mine, base = b.args.parallel_readers, [], []
    for run in range(b.args.runs):
        recs = b.pool.take("parallel32", readers)
        b.sim.call("warm", [rec.name for rec in recs])
        total_mb = sum(rec.size_bytes for rec in recs) / MB
        clients = [b.client() for _ in recs]
        mount_jobs = [lambda rec=rec: throughput(timed_read(b.main.recording_path(rec.name)), rec) for rec in recs]
        direct_jobs = [lambda rec=rec, c=c: throughput(c.download(rec.name), rec) for rec, c in zip(recs, clients)]
        m, d = alternate(run, lambda: total_mb / in_parallel(mount_jobs),
                         lambda: total_mb / in_parallel(direct_jobs))
        mine.append(m)
        base.append(d)
        say("parallel32", run, f"mount {m:.0f} MB/s, direct {d:.0f} MB/s aggregate")
        for rec in recs:
            b.main.wait_cached(rec.name)
    label = f"{readers} parallel cold readers, {b.args.parallel_mb:g} MB each (aggregate MB/s)"
    return [Result("parallel32", label, "MB/s", mine, base, ">= 0.8x", lambda _m, _b, r: r >= 0.8)]


def cached_recording(b: Bench) -> Rec:
    """A recording read once through the mount and now complete in the cache."""
    if "cached" not in b.info:
        (rec,) = b.pool.take("cached")
        timed_read(b.main.recording_path(rec.name))
        b.main.wait_cached(rec.name)
        os.stat(b.main.recording_path(rec.name))  # the kernel learns the exact size (keep_cache is then trusted)
        b.info["cached"] = rec
    return b.info["cached"]


def cached_reads(b: Bench, case: str, label: str, goal: float, read: Callable[[str, Rec], float]) -> list[Result]:
    """A cached recording through the mount vs its cache file, each read with *read*."""
    rec = cached_recording(b)
    mounted, local = b.main.recording_path(rec.name), b.main.cache_file(rec.name)
    mine, base = paired_runs(b, case, lambda _run: read(mounted, rec), lambda _run: read(local, rec),
                             "local file")
    return [Result(case, label, "MB/s", mine, base, f">= {goal:g}x", lambda _m, _b, r: r >= goal)]


def case_cached_first(b: Bench) -> list[Result]:
    """First read of a cached recording with its pages dropped vs the cache file read alike."""
    def cold(path: str, rec: Rec) -> float:
        drop_page_cache(b.main.cache_file(rec.name))
        drop_page_cache(b.main.recording_path(rec.name))
        return throughput(timed_read(path), rec)

    return cached_reads(b, "cached_first", f"first read of a cached {b.args.cold_mb:g} MB recording (MB/s)",
                        0.3, cold)


def case_cached_repeat(b: Bench) -> list[Result]:
    """Second of two reads of a cached recording vs the second of two reads of the cache file."""
    def twice(path: str, rec: Rec) -> float:
        timed_read(path)
        return throughput(timed_read(path), rec)

    return cached_reads(b, "cached_repeat", f"repeated read of a cached {b.args.cold_mb:g} MB recording (MB/s)",
                        0.9, twice)


def case_reread(b: Bench) -> list[Result]:
    """An uncached recording read whole, then at once again: the second read (MB/s), which
    should come from the kernel's page cache: the goal is that it makes no FUSE read (the
    daemon's own count, ``fuse_reads`` of its status), in every run. Baseline: the second
    of two reads of the local cache file. The peers read a file as large twice."""
    mine, base, fuse_reads, peers = [], [], [], collections.defaultdict(list)
    for run in range(b.args.runs):
        (rec,) = b.pool.take("reread")
        b.sim.call("warm", [rec.name])
        path = b.main.recording_path(rec.name)
        timed_read(path)  # the download (its last bytes come once it is in the cache)
        before = daemon_fuse_reads(b.main)
        mine.append(throughput(timed_read(path), rec))
        fuse_reads.append(daemon_fuse_reads(b.main) - before)
        timed_read(b.main.cache_file(rec.name))
        base.append(throughput(timed_read(b.main.cache_file(rec.name)), rec))
        text = f"mount {mine[-1]:.0f} MB/s ({fuse_reads[-1]} FUSE reads), local file {base[-1]:.0f} MB/s"
        (peer_file,) = b.peer_files.take("reread") if b.peers else ("",)
        for peer in b.peers:
            timed_read(peer.path(peer_file))
            peers[peer.name].append(throughput(timed_read(peer.path(peer_file)), rec))
            text += f", {peer.name} {peers[peer.name][-1]:.0f} MB/s"
        say("reread", run, text)
    label = f"read right after its download, {b.args.cold_mb:g} MB (MB/s)"
    return [Result("reread", label, "MB/s", mine, base, "no FUSE read", lambda _m, _b, _r: not any(fuse_reads),
                   f"FUSE reads of the second read, per run: {fuse_reads}", peers=dict(peers), beat=tuple(peers))]


def daemon_fuse_reads(mount: MountProcess) -> int:
    """The daemon's count of FUSE reads served (its status, an extended attribute of the root)."""
    return json.loads(os.getxattr(mount.mountpoint, "user.yeastarfs.status"))["fuse_reads"]


def case_sniff(b: Bench) -> list[Result]:
    """``--sniff-files`` × (open, read 4 KiB, close) of uncached ``--sniff-mb`` recordings with
    the PBX sending at ``--lan-mbps``, once every transfer stopped: the bytes that crossed the
    network per sniff (what the reader's kernel acknowledged), and in the note what the PBX
    wrote (that and its own send buffer, which an early close throws away unsent). The peers:
    their HTTP server, at the same rate. Goal: within 4 flow-control windows."""
    count, window = b.args.sniff_files, INITIAL_WINDOW_BYTES
    bps = int(b.args.lan_mbps * 1_000_000 / 8)
    mine, written, peers = [], [], collections.defaultdict(list)
    b.sim.call("bandwidth", bps)
    if b.peer_files:
        b.peer_files.server.call("bandwidth", bps)
    try:
        for run in range(b.args.runs):
            recs = b.pool.take("sniff", count)
            b.sim.call("warm", [rec.name for rec in recs])
            acked, sent = b.sim.call("acked"), b.sim.call("downloaded")
            for rec in recs:
                sniff(b.main.recording_path(rec.name))
            settle("sniff", b.main.wait_settled)
            mine.append((wait_stable(lambda: b.sim.call("acked"), quiet_s=0.3, timeout_s=15) - acked) / count / 1000)
            written.append((b.sim.call("downloaded") - sent) / count / 1000)
            text = f"mount {mine[-1]:.0f} KB crossed per sniff ({written[-1]:.0f} KB written by the PBX)"
            peer_files = b.peer_files.take("sniff", count) if b.peers else []
            for peer in b.peers:
                acked = b.peer_files.server.acked_bytes()
                for peer_file in peer_files:
                    sniff(peer.path(peer_file))
                crossed = wait_stable(b.peer_files.server.acked_bytes, quiet_s=0.5, timeout_s=30) - acked
                peers[peer.name].append(crossed / count / 1000)
                text += f", {peer.name} {peers[peer.name][-1]:.0f} KB"
            say("sniff", run, text)
    finally:
        b.sim.call("bandwidth", None)
        if b.peer_files:
            b.peer_files.server.call("bandwidth", None)
    label = (f"sniff: open, {SNIFF_BYTES // 1024} KiB, close of a {b.args.sniff_mb:g} MB recording, "
             f"PBX at {b.args.lan_mbps:g} Mbit/s: KB crossing per sniff")
    note = (f"needed {SNIFF_BYTES / 1000:g} KB per sniff; flow-control window {window // 1024} KiB; the PBX wrote "
            f"{statistics.median(written):.0f} KB per sniff (median; its send buffer included); socket buffers "
            f"(tcp_rmem / tcp_wmem min default max): {_sysctl('net/ipv4/tcp_rmem')} / {_sysctl('net/ipv4/tcp_wmem')}")
    return [Result("sniff", label, "KB", mine, None, f"<= {4 * window / 1000:.0f} KB (4 windows)",
                   lambda m, _b, _r: m <= 4 * window / 1000, note, peers=dict(peers))]


def sniff(path: str) -> None:
    with open(path, "rb", buffering=0) as handle:
        if len(handle.read(SNIFF_BYTES)) != SNIFF_BYTES:
            raise RuntimeError(f"{path}: short sniff")


def _sysctl(name: str) -> str:
    try:
        with open(f"/proc/sys/{name}", encoding="ascii") as handle:
            return " ".join(handle.read().split())
    except OSError:
        return "?"


def case_ls_day(b: Bench) -> list[Result]:
    """``ls -l`` of a day folder: the first listing on a fresh mount, then the same folder again,
    each against ``ls -l`` of the local folder of empty files."""
    count = b.args.ls_recordings
    day = f"{LS_DAY:%Y/%m/%d}"
    first, first_base, again, again_base = [], [], [], []

    def ls_ms(root: str) -> float:
        seconds, lines = run_command(["ls", "-l", os.path.join(root, day)])
        if lines != count + 1:
            raise RuntimeError(f"ls -l {root}/{day} listed {lines - 1} entries, not {count}")
        return seconds * 1000

    peers_first, peers_again = collections.defaultdict(list), collections.defaultdict(list)
    for run in range(b.args.runs):
        mount = b.lister.start()  # fresh: the kernel holds nothing of this mount yet
        try:
            m, d = alternate(run, lambda: ls_ms(mount.mountpoint), lambda: ls_ms(b.tree))
            m2, d2 = alternate(run, lambda: ls_ms(mount.mountpoint), lambda: ls_ms(b.tree))
        finally:
            stop_mount(mount)
        first.append(m)
        first_base.append(d)
        again.append(m2)
        again_base.append(d2)
        text = f"first listing: mount {m:.1f} ms, local {d:.1f} ms; again: mount {m2:.1f} ms, local {d2:.1f} ms"
        for peer in b.peers:
            peer.stop()
            peer.start()  # fresh, with an empty cache, as the lister is
            peers_first[peer.name].append(ls_ms(peer.mountpoint))
            peers_again[peer.name].append(ls_ms(peer.mountpoint))
            text += f"; {peer.name} {peers_first[peer.name][-1]:.1f}, again {peers_again[peer.name][-1]:.1f} ms"
        say("ls_day", run, text)
    label = f"ls -l of a day with {count:,} recordings"
    return [Result("ls_day_first", f"{label}, first listing (ms)", "ms", first, first_base, "<= 4x",
                   lambda _m, _b, r: r <= 4, peers=dict(peers_first)),
            Result("ls_day_again", f"{label}, listed again (ms)", "ms", again, again_base,
                   "<= 2x" + (", < rclone" if "rclone" in peers_again else ""), lambda _m, _b, r: r <= 2,
                   peers=dict(peers_again), beat=tuple(name for name in peers_again if name == "rclone"))]


WALK_VARIANTS = (
    ("names", "first walk, names only: find -type f", ()),
    ("stat", "first walk + stat of every file: find -printf %s", ("-printf", "%s\\n")),
)


def case_walk(b: Bench) -> list[Result]:
    """The 3-year tree walked on a fresh mount vs the same tree of empty local files."""
    return [walk_variant(b, tag, label, extra) for tag, label, extra in WALK_VARIANTS]


def walk_variant(b: Bench, tag: str, label: str, extra: tuple) -> Result:
    count, mine, base = b.args.walk_recordings, [], []
    for run in range(b.args.runs):
        mount = b.lister.start()  # fresh: every folder and file is new to the kernel
        try:
            m, d = alternate(run, lambda: walk_seconds(mount.mountpoint, extra, count),
                             lambda: walk_seconds(b.tree, extra, count))
        finally:
            stop_mount(mount)
        mine.append(m)
        base.append(d)
        say(f"walk {tag}", run, f"mount {m:.2f} s, local {d:.2f} s")
    return Result(f"walk_{tag}", f"{label}, {count:,} recordings (s)", "s", mine, base, "<= 4x",
                  lambda _m, _b, r: r <= 4)


def walk_seconds(root: str, extra: tuple, count: int) -> float:
    """``find`` over the three year folders of *root*; checks it found *count* files."""
    years = [os.path.join(root, str(year)) for year in range(2020, 2023)]
    seconds, lines = run_command(["find", *years, "-type", "f", *extra])
    if lines != count:
        raise RuntimeError(f"walk of {root} found {lines} files, not {count}")
    return seconds


MAIN_CASE_FUNCTIONS = {
    "pbx_requests": case_pbx_requests, "cold_seq": case_cold_seq, "cold_seq_lan": case_cold_seq_lan,
    "first_64k": case_first_64k,
    "parallel32": case_parallel32, "cached_first": case_cached_first, "cached_repeat": case_cached_repeat,
    "reread": case_reread, "sniff": case_sniff, "ls_day": case_ls_day, "walk": case_walk,
}


def _peer_version(tool) -> str:
    """The peer's own version line (httpdirfs prints libfuse's too)."""
    try:
        out = subprocess.run([tool.binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{tool.name} (version unavailable: {exc})"
    lines = (out.stdout + "\n" + out.stderr).splitlines()
    return next((line.strip() for line in lines if tool.name in line.lower()), tool.name)


class PeerFiles:
    """The folder the peers' HTTP server serves: the ls day (files of a typical recording's
    size, sparse) and the recordings the read cases take, each read once by each peer. All
    are made before the peers mount: rclone keeps a folder's listing for 5 minutes."""

    def __init__(self, root: str, ls_recordings: int) -> None:
        self.root = root
        self._made = 0
        self._free: dict[str, list[str]] = collections.defaultdict(list)
        for name in ls_names(ls_recordings):
            folder = os.path.join(root, *date_path(name)[:3])
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, name), "wb") as handle:
                handle.truncate(recording_bytes(60 * BYTES_PER_S / MB))  # sparse: sizes are what the peers list
        self.server = FileServer(root)

    def plan(self, group: str, count: int, size_bytes: int) -> None:
        """*count* new recordings of *size_bytes* (the simulator's WAV bytes) for *group*."""
        for _ in range(count):
            moment = PEER_DAY + dt.timedelta(seconds=7 * self._made)
            name = f"{moment:%Y%m%d%H%M%S}-{1_600_000_000 + self._made}.{self._made}-1001-2002-Inbound.wav"
            self._made += 1
            relative = os.path.join(*date_path(name))
            os.makedirs(os.path.join(self.root, os.path.dirname(relative)), exist_ok=True)
            with open(os.path.join(self.root, relative), "wb") as handle:
                handle.write(wav_bytes(name, size_bytes))
            self._free[group].append(relative)

    def take(self, group: str, count: int = 1) -> list[str]:
        """Paths relative to a mount of recordings planned for *group*, not taken before."""
        return take_planned(self._free, group, count)


def plan_peer_files(files: PeerFiles, args: argparse.Namespace) -> None:
    cases, runs = set(args.case_list), args.runs
    if "first_64k" in cases:
        files.plan("first_64k_0ms", runs, recording_bytes(args.head_mb))
    if "reread" in cases:
        files.plan("reread", runs, recording_bytes(args.cold_mb))
    if "sniff" in cases:
        files.plan("sniff", runs * args.sniff_files, recording_bytes(args.sniff_mb))


def prepare_peers(b: Bench, stack: contextlib.ExitStack) -> None:
    """With --peers: the HTTP server of the same recordings and every peer found, mounted."""
    if not b.args.peers or not set(PEER_CASES) & set(b.args.case_list):
        return
    tools, missing = find_peers(PEER_NAMES, {name: getattr(b.args, name) for name in PEER_NAMES})
    if missing:
        print(f"peers: {', '.join(missing)} not found; to compare with them: {INSTALL_HINT}", flush=True)
    if not tools:
        return
    b.peer_files = PeerFiles(os.path.join(b.tmp, "peer-files"), b.args.ls_recordings)
    stack.callback(b.peer_files.server.close)
    plan_peer_files(b.peer_files, b.args)
    for tool in tools:
        peer = PeerMount(tool, b.peer_files.server.base_url, os.path.join(b.tmp, f"mnt-{tool.name}"),
                         os.path.join(b.tmp, f"cache-{tool.name}"), os.path.join(b.tmp, f"{tool.name}.log"))
        stack.callback(peer.stop)
        b.peers.append(peer.start())
    b.info["peers"] = [_peer_version(tool) for tool in tools]
    print("peers: " + "; ".join(b.info["peers"]), flush=True)


def prepare_main(b: Bench, stack: contextlib.ExitStack) -> None:
    """The listing mount's index and local trees for ls/walk, then the main mount (``--max-downloads 32``)."""
    args, cases = b.args, set(b.args.case_list)
    lister = b.lister = new_mount(b, "list")
    tree = b.tree = os.path.join(b.tmp, "local-tree")
    if "walk" in cases:
        build_index(lister.index_path, walk_names(args.walk_recordings), args.walk_recordings, "walk tree")
        make_local_tree(tree, walk_names(args.walk_recordings), args.walk_recordings, "walk tree")
    if "ls_day" in cases:
        build_index(lister.index_path, ls_names(args.ls_recordings), args.ls_recordings, "ls day")
        make_local_tree(tree, ls_names(args.ls_recordings), args.ls_recordings, "ls day")
    stack.callback(stop_mount, lister)
    main = new_mount(b, "main", ("--max-downloads", str(max(32, args.parallel_readers))))
    stack.callback(stop_mount, main)
    b.info["main_mount_ready_s"] = round(main.start().ready_s, 3)
    b.main = main
    print(f"main mount ready in {b.info['main_mount_ready_s']:.2f} s", flush=True)
    prepare_peers(b, stack)
    warm_up(b)


def warm_up(b: Bench) -> None:
    """One untimed cold read through the mount and one direct download."""
    (rec,) = b.pool.take("warmup")
    timed_read(b.main.recording_path(rec.name))
    b.client().download(rec.name)
    b.main.wait_cached(rec.name)


def run_main_cases(b: Bench, stack: contextlib.ExitStack) -> list[Result]:
    selected = [case for case in MAIN_CASES if case in b.args.case_list]
    if not selected:
        return []
    prepare_main(b, stack)
    logins_before = b.recording_counters()["login"]
    results = []
    for case in selected:
        print(f"{case}:", flush=True)
        settle(case, b.main.wait_settled)
        results += MAIN_CASE_FUNCTIONS[case](b)
    b.info["daemon_logins_during_main_cases"] = b.recording_counters()["login"] - logins_before
    b.info["main_rss_mb_at_end"] = round(rss_mb(b.main), 1)
    code = b.main.unmount()
    b.info["main_exit_status"] = code
    return results


# ---------------------------------------------------------------------------------------
# Cases on a mount with a big index


def big_mount(b: Bench, stack: contextlib.ExitStack) -> MountProcess:
    """A mount whose pre-built index holds ``--index-recordings`` recordings."""
    if "big" not in b.info:
        count = b.args.index_recordings
        mount = new_mount(b, "big")
        build_index(mount.index_path, walk_names(count), count, "big")
        stack.callback(stop_mount, mount)
        b.info["big"] = mount
    return b.info["big"]


def case_mount_start(b: Bench, stack: contextlib.ExitStack) -> list[Result]:
    """Spawn to first successful listdir, with a big index and a PBX with few recordings."""
    mount, count = big_mount(b, stack), b.args.index_recordings
    mine, idle = [], []
    for run in range(b.args.runs):
        seconds = mount.start().ready_s
        idle.append(rss_mb(mount))
        mount.unmount()
        mine.append(seconds)
        say("mount_start", run, f"ready in {seconds:.2f} s, RSS {idle[-1]:.1f} MB")
    b.info["mount_start_idle_rss_mb"] = idle
    return [Result("mount_start", f"mount start, {count:,} indexed (s)", "s", mine, None, "< 2 s",
                   lambda m, _b, _r: m < 2)]


def case_memory(b: Bench, stack: contextlib.ExitStack) -> list[Result]:
    """Daemon RSS with a big index: idle, and sampled while streaming a large recording."""
    mount, count = big_mount(b, stack), b.args.index_recordings
    mount.start()
    settle("memory_idle", lambda: wait_stable(mount.rss_kib, quiet_s=0.5, timeout_s=10,
                                              message="the idle daemon's RSS to settle"))
    idle = [rss_mb(mount)]
    runs = [stream_once(b, mount, run) for run in range(b.args.runs)]
    mount.unmount()
    peaks = [max(samples) for samples in runs]
    growth = [samples[-1] - samples[0] for samples in runs]
    per_run = ", ".join(f"{samples[0]:.0f}->{samples[-1]:.0f}" for samples in runs)
    note = f"RSS first->last per run (MB): {per_run}; over all runs {runs[0][0]:.0f}->{runs[-1][-1]:.0f}"
    stream = f"{b.args.stream_mb:g} MB"
    return [
        Result("memory_idle", f"daemon RSS, {count:,} indexed, idle (MB)", "MB", idle, None,
               f"< {MEMORY_LIMIT_MB:g} MB", lambda m, _b, _r: m < MEMORY_LIMIT_MB),
        Result("memory_stream", f"daemon RSS while streaming {stream}, max (MB)", "MB", peaks, None,
               f"< {MEMORY_LIMIT_MB:g} MB", lambda _m, _b, _r: max(peaks) < MEMORY_LIMIT_MB),
        Result("memory_growth", f"RSS growth while streaming {stream}, last-first (MB)", "MB", growth, None,
               f"<= {FLAT_GROWTH_MB:g} MB (flat)", lambda _m, _b, _r: max(growth) <= FLAT_GROWTH_MB, note),
    ]


def stream_once(b: Bench, mount: MountProcess, run: int) -> list[float]:
    """Stream one fresh large recording through *mount*; the daemon's RSS samples meanwhile."""
    (rec,) = b.pool.take("memory")
    b.sim.call("warm", [rec.name])
    samples, rate = sample_rss_while(mount, lambda: throughput(timed_read(mount.recording_path(rec.name)), rec))
    say("memory", run, f"streamed {rec.size_bytes / MB:.0f} MB at {rate:.0f} MB/s, RSS first {samples[0]:.1f}, "
                       f"max {max(samples):.1f}, last {samples[-1]:.1f} MB ({len(samples)} samples)")
    mount.wait_cached(rec.name)
    return samples


def sample_rss_while(mount: MountProcess, job: Callable[[], float]) -> tuple[list[float], float]:
    """VmRSS of the daemon every 50 ms while *job* runs; (samples, job's result)."""
    samples = [rss_mb(mount)]
    done = threading.Event()

    def sampler() -> None:
        while not done.wait(RSS_SAMPLE_S):
            samples.append(rss_mb(mount))

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    try:
        result = job()
    finally:
        done.set()
        thread.join()
    samples.append(rss_mb(mount))
    return samples, result


def run_big_cases(b: Bench, stack: contextlib.ExitStack) -> list[Result]:
    results = []
    if "mount_start" in b.args.case_list:
        print("mount_start:", flush=True)
        results += case_mount_start(b, stack)
    if "memory" in b.args.case_list:
        print("memory:", flush=True)
        results += case_memory(b, stack)
    b.info.pop("big", None)
    return results


# ---------------------------------------------------------------------------------------
# Main


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def make_tmp(args: argparse.Namespace, stack: contextlib.ExitStack) -> str:
    tmp = tempfile.mkdtemp(prefix="yeastarfs-bench-", dir=args.tmp_dir)
    stack.callback(remove_tmp, tmp)
    return tmp


def remove_tmp(tmp: str) -> None:
    """Delete the temporary tree, unless something is still mounted inside it."""
    mounted = [entry.path for entry in os.scandir(tmp) if os.path.ismount(entry.path)]
    if mounted:
        print(f"warning: {mounted} still mounted; leaving {tmp}", flush=True)
        return
    print("cleaning up temporary files...", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


def report(results: list[Result], machine: dict, args: argparse.Namespace, info: dict, elapsed_s: float) -> dict:
    print()
    print(table(results))
    for result in results:
        if result.note:
            print(f"  {result.key}: {result.note}")
    machine["load_at_end"] = round(os.getloadavg()[0], 2)
    print(f"goals judged on medians (memory: on the worst run); MB = 10^6 bytes; run took {elapsed_s:.0f} s; "
          f"load average {machine['load_at_start']} at start, {machine['load_at_end']} at end")
    options = {key: value for key, value in vars(args).items() if key != "case_list"}
    data = {"machine": machine, "options": options, "elapsed_s": round(elapsed_s, 1),
            "info": {k: v for k, v in info.items() if isinstance(v, (int, float, str, list))},
            "cases": [result.as_json() for result in results]}
    print("BENCH_JSON " + json.dumps(data, separators=(",", ":")), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
    return data


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    machine = machine_info(args.tmp_dir or tempfile.gettempdir())
    print("machine: " + ", ".join(f"{key} {value}" for key, value in machine.items()), flush=True)
    if machine["load_at_start"] > BUSY_LOAD:
        print(f"warning: load average {machine['load_at_start']} at start; other work skews the numbers", flush=True)
    with contextlib.ExitStack() as stack:
        tmp = make_tmp(args, stack)
        password = secrets.token_urlsafe(18)
        sim = RemoteSimulator(password, args.api)
        stack.callback(sim.close)
        bench = Bench(args, sim, Pool(sim), direct_login(sim.base_url, password, args.api), tmp,
                      write_password_file(os.path.join(tmp, "password"), password))
        plan_recordings(bench.pool, args)
        results = run_main_cases(bench, stack) + run_big_cases(bench, stack)
        report(results, machine, args, bench.info, time.monotonic() - started)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; cleaned up", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
