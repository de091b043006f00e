"""The peers of scripts/bench.py: rclone and httpdirfs mounting the same recordings over HTTP.

Owns: `RemoteService`, a stdlib service in a child process of its own driven over a pipe
(the benchmark's simulator is one, the file server here another, so that no server shares
an interpreter lock with the client it is timed against); `FileServer`, a folder served
over HTTP/1.1 with Range requests (what rclone's ``:http:`` remote and httpdirfs read),
paced like the simulator when given a bandwidth, counting the body bytes it writes; and
`PeerMount`, one peer's FUSE mount of that server (start, stop, RSS).

Leaves to bench.py: which recordings are served, the cases and their timing.

The peers are found on PATH (or given by path); either may be missing. Not thread-safe:
one benchmark thread drives everything here.
"""

from __future__ import annotations

import collections
import dataclasses
import http.server
import multiprocessing
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

from harness import fusermount, wait_until

RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")
CHUNK_BYTES = 64 * 1024
PACE_SLICES_PER_S = 20  # as the simulator paces: at most 1/20 s of the budget per chunk
MOUNT_TIMEOUT_S = 60.0
UNMOUNT_TIMEOUT_S = 20.0
PEER_NAMES = ("rclone", "httpdirfs")
INSTALL_HINT = ("apt-get install rclone httpdirfs (Debian/Ubuntu; httpdirfs pulls in libfuse2, "
                "which yeastarfs leaves alone: it loads libfuse 3)")


# ---------------------------------------------------------------------------------------
# A service in a child process


def _serve_rpc(conn, build: Callable, args: tuple) -> None:
    """Child process: ``build(*args)`` returns (ops, stop); answer ``(op, args)`` calls until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    ops, stop = build(*args)
    try:
        while True:
            try:
                op, op_args = conn.recv()
            except (EOFError, OSError):
                return
            try:
                conn.send((True, ops[op](*op_args)))
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                conn.send((False, f"{type(exc).__name__}: {exc}"))
    finally:
        stop()


class RemoteService:
    """A service built by *build* (a module-level function) in a child process; `call` runs one op."""

    def __init__(self, build: Callable, *args, name: str = "bench-service") -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_serve_rpc, args=(child_conn, build, args), name=name, daemon=True)
        self._process.start()
        child_conn.close()
        self._lock = threading.Lock()

    def call(self, op: str, *args):
        with self._lock:
            self._conn.send((op, args))
            ok, value = self._conn.recv()
        if not ok:
            raise RuntimeError(f"{self._process.name} {op}: {value}")
        return value

    def close(self) -> None:
        self._conn.close()
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)


# ---------------------------------------------------------------------------------------
# Bytes that crossed: what the clients' kernels acknowledged

# struct tcp_info (linux/tcp.h): u64 tcpi_bytes_acked after 104 bytes of u8/u32 fields and
# two u64 pacing rates.
TCP_INFO_BYTES = 232
TCPI_BYTES_ACKED_OFFSET = 120


def _bytes_acked(sock) -> int:
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_BYTES)
    except OSError:
        return 0
    return int.from_bytes(info[TCPI_BYTES_ACKED_OFFSET:TCPI_BYTES_ACKED_OFFSET + 8], sys.byteorder) \
        if len(info) >= TCPI_BYTES_ACKED_OFFSET + 8 else 0


def count_acked_bytes(server: socketserver.BaseServer) -> Callable[[], int]:
    """Make *server* (a socketserver in this process) count the bytes its clients' kernels
    acknowledged, over connections closed and still open: what crossed the network, unlike
    what the server wrote (which includes its own send buffer, megabytes on loopback, never
    sent when the client closes early). Returns the counter's reader."""
    lock, live, closed = threading.Lock(), set(), [0]
    process_request, shutdown_request = server.process_request, server.shutdown_request

    def tracked_process(request, client_address) -> None:
        with lock:
            live.add(request)
        process_request(request, client_address)

    def tracked_shutdown(request) -> None:
        acked = _bytes_acked(request)
        with lock:
            if request in live:
                live.discard(request)
                closed[0] += acked
        shutdown_request(request)

    def total() -> int:
        with lock:
            return closed[0] + sum(_bytes_acked(request) for request in live)

    server.process_request, server.shutdown_request = tracked_process, tracked_shutdown
    return total


# ---------------------------------------------------------------------------------------
# The file server


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.body_bytes = 0
        self.requests: collections.Counter = collections.Counter()
        self.bandwidth_bps: Optional[int] = None


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler with keep-alive, single byte ranges, pacing and counting."""

    protocol_version = "HTTP/1.1"
    counters: _Counters  # set on the subclass made per server

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass

    def send_head(self):
        with self.counters.lock:
            self.counters.requests[self.command] += 1
        self._range = None
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            return super().send_head()  # the HTML index (or the redirect to the name with "/")
        try:
            handle = open(path, "rb")
        except OSError:
            self.send_error(404, "File not found")
            return None
        size = os.fstat(handle.fileno()).st_size
        start, end = 0, size
        match = RANGE_RE.match(self.headers.get("Range", ""))
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = min(size, int(match.group(2)) + 1) if match.group(2) else size
            else:  # bytes=-N: the last N
                start = max(0, size - int(match.group(2)))
            if start >= size:
                handle.close()
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "audio/x-wav")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Last-Modified", self.date_time_string(int(os.fstat(handle.fileno()).st_mtime)))
        self.end_headers()
        self._range = (start, end)
        return handle

    def copyfile(self, source, outputfile) -> None:
        if self._range is None:  # a directory index
            shutil.copyfileobj(source, outputfile)
            return
        start, end = self._range
        source.seek(start)
        sent, next_send = start, time.monotonic()
        while sent < end:
            bps = self.counters.bandwidth_bps
            size = CHUNK_BYTES if not bps else max(1, min(CHUNK_BYTES, bps // PACE_SLICES_PER_S))
            piece = source.read(min(size, end - sent))
            if not piece:
                return
            with self.counters.lock:  # counted before the write, taken back if it fails (as the simulator does)
                self.counters.body_bytes += len(piece)
            try:
                outputfile.write(piece)
            except OSError:
                with self.counters.lock:
                    self.counters.body_bytes -= len(piece)
                raise
            sent += len(piece)
            if bps and sent < end:
                next_send = max(next_send, time.monotonic() - 0.5) + len(piece) / bps
                delay = next_send - time.monotonic()
                if delay > 0:
                    time.sleep(delay)


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a peer closing a connection mid-body (a sniff) is what the benchmark provokes


def _build_file_server(root: str) -> tuple[dict, Callable[[], None]]:
    counters = _Counters()
    handler = type("Handler", (_RangeHandler,), {"counters": counters})
    server = _QuietServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=root))
    acked_bytes = count_acked_bytes(server)
    threading.Thread(target=server.serve_forever, name="file-server", daemon=True).start()

    def reset() -> None:
        with counters.lock:
            counters.body_bytes = 0
            counters.requests.clear()

    def bandwidth(bps: Optional[int]) -> None:
        counters.bandwidth_bps = bps

    ops = {
        "base_url": lambda: f"http://127.0.0.1:{server.server_address[1]}/",
        "body_bytes": lambda: counters.body_bytes,
        "acked_bytes": acked_bytes,
        "requests": lambda: dict(counters.requests),
        "reset": reset,
        "bandwidth": bandwidth,
    }

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return ops, stop


class FileServer(RemoteService):
    """*root* served over HTTP/1.1 with Range, in a child process. ``base_url`` ends with "/"."""

    def __init__(self, root: str) -> None:
        super().__init__(_build_file_server, root, name="peer-file-server")
        self.root = root
        self.base_url: str = self.call("base_url")

    def body_bytes(self) -> int:
        return self.call("body_bytes")

    def acked_bytes(self) -> int:
        return self.call("acked_bytes")


# ---------------------------------------------------------------------------------------
# The peers' mounts


@dataclasses.dataclass(frozen=True)
class PeerTool:
    """One peer: its name and executable."""

    name: str
    binary: str

    def command(self, url: str, mountpoint: str, cache_dir: str) -> list[str]:
        """The peer's mount in the foreground, with its disk cache in *cache_dir*, as issue 16 ran it."""
        if self.name == "rclone":
            return [self.binary, "mount", ":http:", mountpoint, "--http-url", url, "--vfs-cache-mode", "full",
                    "--cache-dir", cache_dir, "--read-only"]
        if self.name == "httpdirfs":
            return [self.binary, "-f", "--cache", "--cache-location", cache_dir, url, mountpoint]
        raise ValueError(f"unknown peer {self.name}")


def find_peers(names: tuple[str, ...], paths: dict[str, Optional[str]]) -> tuple[list[PeerTool], list[str]]:
    """The peers found (a given path, else PATH), and the names not found."""
    found, missing = [], []
    for name in names:
        binary = paths.get(name) or shutil.which(name)
        if binary and os.access(binary, os.X_OK):
            found.append(PeerTool(name, binary))
        else:
            missing.append(name)
    return found, missing


class PeerMount:
    """A peer mounted at *mountpoint* from *url*; `start` again after `stop` starts fresh
    (the peer's disk cache is emptied: nothing of an earlier mount is cached)."""

    def __init__(self, tool: PeerTool, url: str, mountpoint: str, cache_dir: str, log_path: str) -> None:
        self.tool, self.url = tool, url
        self.mountpoint, self.cache_dir, self.log_path = mountpoint, cache_dir, log_path
        self.process: Optional[subprocess.Popen] = None

    @property
    def name(self) -> str:
        return self.tool.name

    def path(self, *parts: str) -> str:
        return os.path.join(self.mountpoint, *parts)

    def start(self) -> "PeerMount":
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        os.makedirs(self.cache_dir, exist_ok=True)
        os.makedirs(self.mountpoint, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.tool.command(self.url, self.mountpoint, self.cache_dir),
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        wait_until(self._ready, MOUNT_TIMEOUT_S, message=lambda: f"{self.name} to mount {self.mountpoint}")
        return self

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.process.returncode}; log {self.log_path}")
        if not os.path.ismount(self.mountpoint):
            return False
        try:
            return bool(os.listdir(self.mountpoint))
        except OSError:
            return False

    def rss_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e6
        return float("nan")

    def stop(self) -> None:
        """Unmount; the peer must exit by itself, else it is killed (by its pid)."""
        if self.process is None:
            return
        subprocess.run([fusermount(), "-u", self.mountpoint], capture_output=True)
        try:
            self.process.wait(timeout=UNMOUNT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        subprocess.run([fusermount(), "-uz", self.mountpoint], capture_output=True)
        self.process = None
