"""Issue 18: a mount shared over SMB. Several workers, whole recordings, one PBX download each.

A real ``smbd`` (Samba, installed by scripts/setup) runs in the foreground on 127.0.0.1:4455
with a private configuration. It serves a read-only share of a mount made as the README's
recipe says (``--allow-other``, the workers' group as ``--gid``, ``--umask 027``) to a Samba
user of that group. Several ``smbclient`` processes at once read every recording through it.
smbd reads exactly the size it stats after opening. Before this round, a recording whose exact
size was not known within an open's few seconds was served at its estimated size (the CDR's
whole talk seconds): truncated audio, no error. So the recordings here last a fraction of a
second more or less than their CDR says.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import date_path, sha256_of, wait_until

# These tests share port 4455: one test process runs them in turn (--dist loadfile).
pytestmark = pytest.mark.fuse

SMB_PORT = 4455
SHARE = "recordings"
SBIN_PATH = "/usr/sbin:/sbin"
SMB_CONF = """[global]
  server role = standalone server
  smb ports = {port}
  interfaces = lo
  bind interfaces only = yes
  disable netbios = yes
  lock directory = {state}/lock
  state directory = {state}/state
  cache directory = {state}/cache
  pid directory = {state}/pid
  private dir = {state}/private
  ncalrpc dir = {state}/ncalrpc
  passdb backend = tdbsam:{state}/private/passdb.tdb
  log file = {state}/log.%m
  load printers = no
  printing = bsd
  printcap name = /dev/null
  disable spoolss = yes

[{share}]
  path = {path}
  read only = yes
  valid users = {user}
  store dos attributes = no
"""
# The workers' account: Samba's own password for an existing Unix user, who reads the mount as
# a member of the group it shows (--gid, and --umask 027: nothing for others).
SMB_USER, SMB_GID, SMB_PASSWORD = "nobody", 65534, "w0rker-Passw0rd"
# Talk durations in seconds: the CDR gives whole seconds, so the estimates of all but the
# whole ones are wrong both ways (shorter and longer than the real files).
DURATIONS_S = (20.3, 33.7, 41.45, 12.55, 27.52, 30.0)
WORKERS = 4


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN_PATH)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def smb_share(require):
    """``smb_share(path)`` serves *path* as the share `SHARE` on `SMB_PORT` until the test ends."""
    require(_tool("smbd") and _tool("smbclient") and _tool("smbpasswd"),
            "samba and smbclient are not installed (scripts/setup)")
    require(os.geteuid() == 0, "smbd needs root (CI runs as root)")
    # smbd's state must be readable by the workers' processes: one asks another's messaging lock
    # file whether it is alive (pytest's tmp dirs are 0700: every other open would look stale).
    state = pathlib.Path(tempfile.mkdtemp(prefix="yeastarfs-smbd-"))
    state.chmod(0o755)
    started: list[subprocess.Popen] = []

    def start(path: str) -> None:
        assert not _listening(SMB_PORT), f"port {SMB_PORT} is taken: another smbd is running"
        for folder in ("lock", "state", "cache", "pid", "private", "ncalrpc"):
            (state / folder).mkdir(exist_ok=True)
        conf = state / "smb.conf"
        conf.write_text(SMB_CONF.format(port=SMB_PORT, state=state, share=SHARE, path=path, user=SMB_USER))
        subprocess.run([_tool("smbpasswd"), "-c", str(conf), "-a", "-s", SMB_USER],
                       input=f"{SMB_PASSWORD}\n{SMB_PASSWORD}\n", text=True, capture_output=True, check=True)
        log = open(state / "smbd.log", "wb")
        # Its own session: stopping it stops its helpers and its per-client processes too.
        started.append(subprocess.Popen([_tool("smbd"), "--foreground", "--no-process-group", "--debug-stdout",
                                         "-s", str(conf)], stdout=log, stderr=log, start_new_session=True))
        log.close()
        wait_until(lambda: _listening(SMB_PORT) or started[-1].poll() is not None, 20,
                   message=f"smbd to listen on port {SMB_PORT}")
        assert started[-1].poll() is None, (state / "smbd.log").read_text(errors="replace")

    yield start
    for process in started:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    shutil.rmtree(state, ignore_errors=True)


def smbclient(command: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """Run one smbclient as a worker; *command* in its own language (``get``, ``ls``…)."""
    return subprocess.run([_tool("smbclient"), f"//127.0.0.1/{SHARE}", "-p", str(SMB_PORT), "-m", "SMB3",
                           "-U", f"{SMB_USER}%{SMB_PASSWORD}",
                           "-c", command], capture_output=True, text=True, timeout=timeout_s)


def smb_path(name: str) -> str:
    return "\\".join(date_path(name))


def get_all(names: list[str], folder) -> subprocess.CompletedProcess:
    """One worker: copy every recording of *names* into *folder*, in that order, in one session."""
    folder.mkdir()
    return smbclient("; ".join(f'get "{smb_path(name)}" "{folder / name}"' for name in names))


def workers_copy(recordings: list, workers: int, tmp_path) -> None:
    """*workers* smbclients at once, each starting at another recording, copy them all; every
    copy must be whole (size and sha256)."""
    names = [rec.name for rec in recordings]
    orders = [names[i % len(names):] + names[:i % len(names)] for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        copies = list(pool.map(lambda i: get_all(orders[i], tmp_path / f"worker{i}"), range(workers)))
    for copy in copies:
        assert copy.returncode == 0 and "NT_STATUS" not in copy.stdout + copy.stderr, copy.stdout + copy.stderr
    for i in range(workers):
        for rec in recordings:
            copied = tmp_path / f"worker{i}" / rec.name
            assert copied.stat().st_size == rec.size_bytes, f"worker {i}: {rec.name}"
            assert sha256_of(copied) == rec.sha256


def asked_once_each(pbx, recordings: list) -> bool:
    """Whether the PBX sent every recording exactly once."""
    asked = [entry["body"]["recording"] for entry in pbx.requests_log if entry["endpoint"] == "recording/get_random"]
    return sorted(asked) == sorted(rec.name for rec in recordings) and \
        pbx.counters["recording/download"] == len(recordings)


def add_calls(pbx, durations_s: tuple = DURATIONS_S) -> list:
    start = dt.datetime.now().replace(microsecond=0) - dt.timedelta(hours=1)
    return [pbx.add_recording(start=start + dt.timedelta(minutes=minute), duration_s=duration_s, announce=False)
            for minute, duration_s in enumerate(durations_s)]


@pytest.fixture
def shared_mount(public_dir, mounted, smb_share):
    """``shared_mount(*options)``: a mount as the README's recipe makes it, served by smbd as `SHARE`.

    (Set up in this order so that they end the other way round: smbd lets go of the mount, the
    mount goes, then its folder.)"""
    def start(*options: str):
        mount = mounted("--allow-other", "--gid", str(SMB_GID), "--umask", "027", *options,
                        mountpoint=os.path.join(public_dir, "mnt"))
        smb_share(mount.mountpoint)
        return mount

    return start


def test_smb_workers_get_whole_recordings_and_the_pbx_sends_each_once(pbx, shared_mount, tmp_path):
    recordings = add_calls(pbx)
    mount = shared_mount()
    estimates = {rec.name: os.stat(mount.recording_path(rec.name)).st_size for rec in recordings}
    assert sum(estimates[rec.name] != rec.size_bytes for rec in recordings) == len(DURATIONS_S) - 1
    assert any(estimates[rec.name] < rec.size_bytes for rec in recordings)   # the truncation case
    folders = {smb_path(rec.name).rsplit("\\", 1)[0] for rec in recordings}
    listing = smbclient("; ".join(f'ls "{folder}\\*"' for folder in sorted(folders)))
    assert listing.returncode == 0 and all(rec.name in listing.stdout for rec in recordings), listing.stdout
    eas = smbclient(f'geteas "{smb_path(recordings[0].name)}"')               # the CDR, as extended attributes
    assert "yeastar.caller" in eas.stdout and "yeastar.talk_seconds" in eas.stdout, eas.stdout + eas.stderr
    assert pbx.counters["recording/download"] == 0                           # neither costs the PBX anything
    pbx.bandwidth_bps = 2_000_000  # each download lasts long enough for the workers to meet on it
    workers_copy(recordings, WORKERS, tmp_path)
    assert asked_once_each(pbx, recordings)                                  # one PBX download per recording
    opens = json.loads(os.getxattr(mount.mountpoint, "user.yeastarfs.status"))["opens"]
    assert opens["downloaded"] == len(recordings)


def test_smb_waits_for_the_exact_size_from_a_slow_pbx(pbx, shared_mount, tmp_path):
    # The size comes after the few seconds an open waits for an ordinary reader (the PBX answers
    # get_random and the download 3 s each): smbd's opens wait on, and the copies are whole.
    recordings = add_calls(pbx, DURATIONS_S[:2])         # estimated shorter and longer than they are
    shared_mount()
    pbx.latency_s = 3.0
    workers_copy(recordings, 2, tmp_path)
    pbx.latency_s = 0.0
    assert asked_once_each(pbx, recordings)


def test_smb_never_gets_a_recording_whose_size_is_not_known(pbx, shared_mount, tmp_path):
    # A PBX that does not say how long a recording is: its size is known only at the end of
    # the body, which here takes longer than smbd may wait (the stall timeout).
    [rec] = add_calls(pbx, DURATIONS_S[:1])
    pbx.omit_content_length = True
    pbx.bandwidth_bps = 100_000                          # 3.2 s for its 325 kB
    mount = shared_mount("--stall-timeout", "2")
    mount.errors_expected = True  # the refused open's EIO (and the binding's traceback of it at DEBUG)
    refused = smbclient(f'get "{smb_path(rec.name)}" "{tmp_path / "copy.wav"}"')
    assert "NT_STATUS" in refused.stdout + refused.stderr                  # an error, not a guessed size
    assert not (tmp_path / "copy.wav").exists() or sha256_of(tmp_path / "copy.wav") == rec.sha256
    assert "not opened for smbd" in mount.log()
