"""TLS towards either PBX family through a real mount: verification on by default (one clear
line), --ca-file, --pin-sha256 (a wrong pin refused), and --proxy carrying every request
(the P-Series' WebSocket events too, through a CONNECT tunnel)."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import threading

import pytest

from harness import mount_command, readable, sha256_of, wait_until

pytestmark = pytest.mark.fuse

TLS = {"tls": True}


class ConnectProxy:
    """An HTTP proxy that only tunnels (CONNECT), counting the tunnels it opened."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.tunnels: list[str] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            method, target = head.split(b" ", 2)[:2]
            if method != b"CONNECT":
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            host, port = target.decode().rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=10) as upstream:
                self.tunnels.append(target.decode())
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                _relay(client, upstream, self._stop)


def _relay(one: socket.socket, other: socket.socket, stop: threading.Event) -> None:
    peers = {one: other, other: one}
    while not stop.is_set():
        for sock in readable(list(peers), 0.2):
            data = sock.recv(65536)
            if not data:
                return
            peers[sock].sendall(data)


def refused(pbx, password_file, tmp_path, *args) -> str:
    """The one stderr line of a mount that must fail."""
    mountpoint = tmp_path / f"refused{len(os.listdir(tmp_path))}"
    mountpoint.mkdir()
    result = subprocess.run(mount_command(mountpoint, pbx.base_url, tmp_path / "refused-cache", password_file, *args),
                            capture_output=True, text=True, timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.families(s_series=TLS, p_series=TLS)
def test_tls_options_and_a_proxy_through_a_mount(pbx, mounted, tls_certificate, password_file, tmp_path):
    cert, _, fingerprint = tls_certificate
    rec = pbx.populate(1, days=1)[0]
    assert "TLS verification" in refused(pbx, password_file, tmp_path)  # on by default
    assert "does not match --pin-sha256" in refused(pbx, password_file, tmp_path, "--pin-sha256", "ab" * 32)
    proxy = ConnectProxy()
    try:
        for args in (("--ca-file", cert, "--proxy", proxy.url), ("--pin-sha256", fingerprint)):
            mount = mounted(*args, "--poll-interval", "3600")
            assert sha256_of(mount.recording_path(rec.name)) == rec.sha256
            announced = pbx.add_recording(start=dt.datetime.now() - dt.timedelta(minutes=len(args)), duration_s=5,
                                          announce=True)
            wait_until(lambda: os.path.exists(mount.recording_path(announced.name)), 5,
                       message="an event with these TLS options")
            assert mount.unmount() == 0
            rec = announced
    finally:
        proxy.stop()
    host = pbx.base_url.split("://", 1)[1]
    assert proxy.tunnels and set(proxy.tunnels) == {host}  # everything went through the proxy, to the PBX
