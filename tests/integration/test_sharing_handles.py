"""Issue 18: a file handle from an earlier mount is refused (ESTALE) and never opens another recording.

This does at the syscall level what an NFS server does. nfs-ganesha's FSAL_VFS and the
kernel's nfsd both turn a path into a handle with ``name_to_handle_at`` and a handle back into
an open file with ``open_by_handle_at``. A FUSE handle is (node id, generation). libfuse's
high-level API hands out node ids in lookup order, so a remount that looks recordings up in
another order gives the old ids to other recordings. Before this round the generation was
always 0, and an old handle opened the other recording (reproduced in the research for issue 18).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import errno
import hashlib
import json
import os
import struct

import pytest

from harness import sha256_of

pytestmark = pytest.mark.fuse

MAX_HANDLE_BYTES = 128
AT_FDCWD = -100
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_BYTES)]


def handle_of(path: str) -> tuple[int, bytes]:
    """(type, bytes) of *path*'s file handle, as an NFS server makes it."""
    handle = _FileHandle(handle_bytes=MAX_HANDLE_BYTES)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(AT_FDCWD, path.encode(), ctypes.byref(handle), ctypes.byref(mount_id), 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return handle.handle_type, bytes(handle.f_handle[:handle.handle_bytes])


def node_and_generation(raw: bytes) -> tuple[int, int]:
    """What FUSE puts in a handle (linux fs/fuse/inode.c, fuse_encode_fh): node id, generation."""
    high, low, generation = struct.unpack("=III", raw[:12])
    return high << 32 | low, generation


def open_handle(mountpoint: str, handle: tuple[int, bytes]) -> str:
    """The sha256 of the bytes *handle* opens, or ``errno N`` when it is refused."""
    handle_type, raw = handle
    request = _FileHandle(handle_bytes=len(raw), handle_type=handle_type)
    ctypes.memmove(request.f_handle, raw, len(raw))
    mount_fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(request), os.O_RDONLY)
        if fd < 0:
            return f"errno {ctypes.get_errno()}"
        with os.fdopen(fd, "rb") as opened:
            return hashlib.sha256(opened.read()).hexdigest()
    finally:
        os.close(mount_fd)


def drop_inode_cache() -> None:
    """Make the kernel forget unused dentries and inodes (an NFS server's idle files)."""
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as handle:
        handle.write("2")


STALE = f"errno {errno.ESTALE}"


def test_handles_from_an_earlier_mount_are_stale_never_another_recording(pbx, mounted, require):
    require(os.geteuid() == 0, "open_by_handle_at and drop_caches need root (CI runs as root)")
    start = dt.datetime.now().replace(microsecond=0) - dt.timedelta(hours=1)
    recordings = [pbx.add_recording(start=start + dt.timedelta(minutes=i), duration_s=3 + i, announce=False)
                  for i in range(7)]
    first, later = recordings[:3], recordings[3:]
    mount = mounted()
    handles = {}
    for rec in first:                                         # an NFS client looks these up and reads them
        path = mount.recording_path(rec.name)
        assert sha256_of(path) == rec.sha256
        handles[rec.name] = handle_of(path)
    for rec in first:                                         # the same mount: the same recordings
        assert open_handle(mount.mountpoint, handles[rec.name]) == rec.sha256
    generations = {node_and_generation(raw)[1] for _, raw in handles.values()}
    assert len(generations) == 1 and 0 not in generations     # this mount's random generation
    drop_inode_cache()                                        # forgotten by the kernel, then by libfuse
    for rec in first:
        assert open_handle(mount.mountpoint, handles[rec.name]) in (rec.sha256, STALE)
    status = json.loads(os.getxattr(mount.mountpoint, "user.yeastarfs.status"))
    assert status["nfs_handles"] == "an earlier mount's handles get ESTALE"
    assert mount.unmount() == 0

    again = mounted(mountpoint=mount.mountpoint)              # a fresh daemon, the same cache and index
    reused = {}
    for rec in later:                                         # others first: they get the old node ids
        reused[node_and_generation(handle_of(again.recording_path(rec.name))[1])[0]] = rec
    old_nodes = {node_and_generation(raw)[0] for _, raw in handles.values()}
    assert old_nodes <= set(reused)                           # each old handle's node id names another call now
    for rec in first:
        assert open_handle(again.mountpoint, handles[rec.name]) == STALE, rec.name
    drop_inode_cache()
    for rec in first:
        assert open_handle(again.mountpoint, handles[rec.name]) == STALE, rec.name
    for rec in later:                                         # the new mount's own handles work
        assert open_handle(again.mountpoint, handle_of(again.recording_path(rec.name))) == rec.sha256
