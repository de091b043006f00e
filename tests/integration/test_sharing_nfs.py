"""Issue 18 through a real NFS server: nfs-ganesha re-exporting a mount never serves the wrong recording.

nfs-ganesha 4.3 (FSAL_VFS, installed by scripts/setup) exports the mount over NFSv3 on
127.0.0.1. A pure-Python NFSv3 client (pyNfsClient, in the test extra) keeps the raw file
handles, the way a worker's kernel keeps them across a server restart. After a yeastarfs
remount (with other recordings looked up first, so that the old node ids name other calls)
and a ganesha restart, every old handle gets NFS3ERR_STALE, with the inodes cached and after
the kernel dropped them. Before this round those handles read other recordings' bytes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import warnings

import pytest

from harness import date_path, wait_until
from test_sharing_handles import drop_inode_cache

# These tests share the NFS and rpcbind ports: one test process runs them in turn (--dist loadfile).
pytestmark = pytest.mark.fuse

try:
    with warnings.catch_warnings():  # pyNfsClient uses xdrlib (deprecated since Python 3.11)
        warnings.simplefilter("ignore", DeprecationWarning)
        from pyNfsClient import MNT3_OK, NFS3_OK, Mount, NFSv3
except ImportError:  # checked by the fixture (require)
    Mount = None

NFS_PORT, MOUNT_PORT, RPCBIND_PORT = 12049, 12048, 111
NFS3ERR_STALE = 70
AUTH = {"flavor": 1, "machine_name": "worker", "uid": 0, "gid": 0, "aux_gid": []}
READ_BYTES = 1 << 20
GANESHA_CONF = """NFS_CORE_PARAM {{
    Protocols = 3; NFS_Port = {nfs_port}; MNT_Port = {mount_port}; Bind_addr = 127.0.0.1;
    Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = false;
}}
NFSV4 {{ RecoveryBackend = fs; RecoveryRoot = {state}/recovery; Graceless = true; }}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT {{
    Export_Id = 1; Path = {path}; Pseudo = /recordings; Access_Type = RO;
    SecType = sys; Squash = No_Root_Squash; Transports = TCP; Protocols = 3;
    FSAL {{ Name = VFS; }}
}}
"""


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture
def ganesha(require):
    """``ganesha.start(path)`` exports *path* over NFSv3 until ``ganesha.stop()`` or the test's end
    (rpcbind, which NFSv3 needs, is started too unless one already runs)."""
    require(_tool("ganesha.nfsd") and _tool("rpcbind"), "nfs-ganesha and rpcbind are not installed (scripts/setup)")
    require(Mount is not None, "pyNfsClient is not installed (pip install -e '.[test]')")
    require(os.geteuid() == 0, "nfs-ganesha needs root (CI runs as root)")
    state = pathlib.Path(tempfile.mkdtemp(prefix="yeastarfs-ganesha-"))
    (state / "recovery").mkdir()
    ours: list[subprocess.Popen] = []
    if not _listening(RPCBIND_PORT):
        ours.append(subprocess.Popen([_tool("rpcbind"), "-f", "-w"], start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_until(lambda: _listening(RPCBIND_PORT), 10, message="rpcbind to listen")
    server: list[subprocess.Popen] = []

    class Server:
        log = state / "ganesha.log"

        def start(self, path: str) -> None:
            assert not _listening(NFS_PORT), f"port {NFS_PORT} is taken: another NFS server is running"
            conf = state / "ganesha.conf"
            conf.write_text(GANESHA_CONF.format(nfs_port=NFS_PORT, mount_port=MOUNT_PORT, state=state, path=path))
            server.append(subprocess.Popen([_tool("ganesha.nfsd"), "-F", "-f", str(conf), "-L", str(self.log),
                                            "-p", str(state / "ganesha.pid"), "-N", "NIV_EVENT"],
                                           start_new_session=True, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL))
            wait_until(lambda: (_listening(NFS_PORT) and _listening(MOUNT_PORT)) or server[-1].poll() is not None,
                       20, message="ganesha to listen")
            assert server[-1].poll() is None, self.log.read_text(errors="replace")

        def stop(self) -> None:
            _stop(server.pop())

    yield Server()
    for process in server + ours:
        _stop(process)
    shutil.rmtree(state, ignore_errors=True)


class NfsWorker:
    """An NFSv3 client that keeps raw handles, as a worker's kernel does."""

    def __init__(self) -> None:
        self.nfs = NFSv3("127.0.0.1", NFS_PORT, 10, AUTH)
        self.nfs.connect()

    def close(self) -> None:
        self.nfs.disconnect()

    def lookup(self, export: str, name: str) -> bytes:
        """The handle of recording *name* under the export's path, walked from its root."""
        mount = Mount("127.0.0.1", MOUNT_PORT, 10, AUTH)
        mount.connect()
        try:
            reply = mount.mnt(export, AUTH)
        finally:
            mount.disconnect()
        assert reply["status"] == MNT3_OK, reply
        handle = reply["mountinfo"]["fhandle"]
        for part in date_path(name):
            found = self.nfs.lookup(handle, part, AUTH)
            assert found["status"] == NFS3_OK, (part, found["status"])
            handle = found["resok"]["object"]["data"]
        return handle

    def read(self, handle: bytes) -> str:
        """sha256 of the whole file, or ``NFS3 status N``."""
        digest, offset = hashlib.sha256(), 0
        while True:
            reply = self.nfs.read(handle, offset, READ_BYTES, AUTH)
            if reply["status"] != NFS3_OK:
                return f"NFS3 status {reply['status']}"
            data = reply["resok"]["data"]
            digest.update(data)
            offset += len(data)
            if reply["resok"]["eof"] or not data:
                return digest.hexdigest()


STALE = f"NFS3 status {NFS3ERR_STALE}"


def test_old_nfs_handles_after_a_remount_are_stale_never_another_recording(pbx, public_dir, mounted, ganesha):
    start = dt.datetime.now().replace(microsecond=0) - dt.timedelta(hours=1)
    recordings = [pbx.add_recording(start=start + dt.timedelta(minutes=i), duration_s=3 + i, announce=False)
                  for i in range(7)]
    first, later = recordings[:3], recordings[3:]
    mount = mounted(mountpoint=os.path.join(public_dir, "mnt"))
    ganesha.start(mount.mountpoint)
    worker = NfsWorker()
    handles = {rec.name: worker.lookup(mount.mountpoint, rec.name) for rec in first}
    assert [worker.read(handles[rec.name]) for rec in first] == [rec.sha256 for rec in first]
    worker.close()
    ganesha.stop()                                      # the README: restart the NFS server after a remount
    assert mount.unmount() == 0

    again = mounted(mountpoint=mount.mountpoint)        # a fresh daemon, the same cache and index
    for rec in later:                                   # others first: they get the old node ids
        os.stat(again.recording_path(rec.name))
    ganesha.start(again.mountpoint)
    worker = NfsWorker()
    assert [worker.read(handles[rec.name]) for rec in first] == [STALE] * len(first)
    drop_inode_cache()
    assert [worker.read(handles[rec.name]) for rec in first] == [STALE] * len(first)
    fresh = worker.lookup(again.mountpoint, later[0].name)  # looked up again by name, it is served
    assert worker.read(fresh) == later[0].sha256
    worker.close()
