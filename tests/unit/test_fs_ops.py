"""YeastarFS called directly, without a kernel (S3QL's t3 layer): the errno table, the
read-only callbacks, attributes and listings from the index, xattrs."""

from __future__ import annotations

import datetime as dt
import errno
import json
import stat

import pytest

from yeastarfs import errors
from yeastarfs.cache import DiskCache
from yeastarfs.core import Core
from yeastarfs.fs import YeastarFS, _errno_for, mfusepy  # the binding as loaded by fs (libfuse 3 if both)
from yeastarfs.index import RecordingIndex
from yeastarfs.models import Recording

NAME = "20261127093012-1795400714.1-0612345678-1001-Inbound.wav"


@pytest.fixture
def fs(tmp_path):
    index = RecordingIndex(str(tmp_path / "index.sqlite3"))
    index.add([Recording(name=NAME, callid="1795400714.1", callfrom="0612345678", callto="1001",
                         talk_s=10, call_type="Inbound", status="ANSWERED")])
    cache = DiskCache(str(tmp_path / "cache"), 1 << 20)
    asked = iter(range(1, 1_000_000))  # a status that changes between calls, as the daemon's does
    yield YeastarFS(Core(index, cache, downloads=None, status=lambda: {"asked": next(asked), "since": dt.date(2026, 11, 27)},
                         uid=1234, gid=2345, umask=0o027))
    index.close()


def fuse_errno(call) -> int:
    with pytest.raises(mfusepy.FuseOSError) as info:
        call()
    return info.value.errno


@pytest.mark.parametrize("exc, expected", [
    (errors.RecordingNotFoundError("recording/get_random", "10023"), errno.ENOENT),
    (errors.AuthError("no"), errno.EACCES),
    (errors.LockedOutError("locked"), errno.EACCES),
    (errors.CacheFullError("full"), errno.ENOSPC),
    (errors.DownloadStalledError("slow"), errno.EIO),
    (errors.PbxUnavailableError("down"), errno.EIO),
    (errors.DownloadError("short"), errno.EIO),
    (errors.CacheError("disk"), errno.EIO),
    (OSError(errno.EBADF, "bad"), errno.EBADF),
    (KeyError("surprise"), errno.EIO),   # anything unforeseen: EIO, never the binding's EINVAL
    (ValueError("surprise"), errno.EIO),
])
def test_the_one_errno_table(exc, expected):
    assert _errno_for(exc) == expected


def test_attributes_come_from_the_index(fs):
    root, day = fs.getattr("/"), fs.getattr("/2026/11/27")
    assert stat.S_ISDIR(root["st_mode"]) and stat.S_IMODE(day["st_mode"]) == 0o550
    info = fs.getattr(f"/2026/11/27/{NAME}")
    assert stat.S_ISREG(info["st_mode"]) and stat.S_IMODE(info["st_mode"]) == 0o440
    assert (info["st_uid"], info["st_gid"]) == (1234, 2345)
    assert info["st_size"] == 44 + 10 * 16000  # the estimate until the PBX says otherwise
    fs.core.index.set_size(NAME, 99_999)
    assert fs.getattr(f"/2026/11/27/{NAME}")["st_size"] == 99_999


@pytest.mark.parametrize("path", ["/2026/11/27/other.wav", "/1999", "/2026/11/27/" + NAME + "/x", "/x"])
def test_unknown_paths_are_enoent(fs, path):
    assert fuse_errno(lambda: fs.getattr(path)) == errno.ENOENT


def test_listings(fs):
    assert fs.readdir("/", None)[2:] == [("2026", {"st_mode": stat.S_IFDIR | 0o555}, 0)]
    assert [e if isinstance(e, str) else e[0] for e in fs.readdir("/2026/11/27", None)] == [".", "..", NAME]
    assert fs.readdir_plus("/2026/11/27") == [(NAME, stat.S_IFREG | 0o440, 44 + 10 * 16000,
                                               fs.getattr(f"/2026/11/27/{NAME}")["st_mtime"], 0)]
    assert fuse_errno(lambda: fs.readdir_plus("/2025")) == errno.ENOENT


@pytest.mark.parametrize("call", [
    lambda fs: fs.mkdir("/2026/x", 0o755), lambda fs: fs.unlink(f"/2026/11/27/{NAME}"),
    lambda fs: fs.rename(f"/2026/11/27/{NAME}", "/y"), lambda fs: fs.write(f"/2026/11/27/{NAME}", b"x", 0, 1),
    lambda fs: fs.truncate(f"/2026/11/27/{NAME}", 0), lambda fs: fs.chmod(f"/2026/11/27/{NAME}", 0o777),
    lambda fs: fs.create("/2026/11/27/new.wav", 0o644), lambda fs: fs.setxattr("/", "user.x", b"1", 0),
    lambda fs: fs.symlink("/a", "/b"), lambda fs: fs.utimens("/"),
])
def test_every_write_type_call_is_erofs(fs, call):
    assert fuse_errno(lambda: call(fs)) == errno.EROFS


def test_extended_attributes(fs):
    path = f"/2026/11/27/{NAME}"
    names = fs.listxattr(path)
    assert "user.yeastar.caller" in names and "user.yeastar.did" not in names  # empty fields are not listed
    assert fs.getxattr(path, "user.yeastar.caller") == b"0612345678"
    assert fs.getxattr(path, "user.yeastar.talk_seconds") == b"10"
    assert fuse_errno(lambda: fs.getxattr(path, "user.yeastar.did")) == errno.ENODATA
    assert fuse_errno(lambda: fs.getxattr(path, "security.selinux")) == errno.ENODATA
    # The root's status is asked of the daemon at every read (never a stale copy), as JSON
    # with anything JSON lacks (dates) as text; only the root has it, and it is listed there.
    assert json.loads(fs.getxattr("/", "user.yeastarfs.status")) == {"asked": 1, "since": "2026-11-27"}
    assert json.loads(fs.getxattr("/", "user.yeastarfs.status")) == {"asked": 2, "since": "2026-11-27"}
    assert "user.yeastarfs.status" in fs.listxattr("/") and "user.yeastarfs.status" not in names
    assert fuse_errno(lambda: fs.getxattr(path, "user.yeastarfs.status")) == errno.ENODATA
    assert fs.getxattr(path, "user.yeastarfs.cached") == b"0"


def test_open_refuses_writing_and_directories(fs):
    class FileInfo:
        flags, fh, keep_cache, direct_io = 0, 0, 0, 0

    writing = FileInfo()
    writing.flags = 1  # O_WRONLY
    assert fuse_errno(lambda: fs.open(f"/2026/11/27/{NAME}", writing)) == errno.EROFS
    assert fuse_errno(lambda: fs.open("/2026/11/27", FileInfo())) == errno.EISDIR
    assert fuse_errno(lambda: fs.open("/2026/11/27/none.wav", FileInfo())) == errno.ENOENT
    assert fuse_errno(lambda: fs.read(f"/2026/11/27/{NAME}", 10, 0, 999)) == errno.EBADF


def test_statfs_is_the_cache_budget_and_an_empty_cache_is_all_available(fs):
    stats = fs.statfs("/")
    assert stats["f_blocks"] * stats["f_frsize"] == 1 << 20          # the budget
    assert stats["f_bfree"] == stats["f_bavail"] == stats["f_blocks"]  # nothing held: nothing used
    assert stats["f_files"] == 1



def test_blocks_count_what_this_machine_stores(tmp_path):
    # An uncached recording occupies no local disk: st_blocks 0 (du is true, and tumbler's
    # GStreamer/ffmpeg thumbnailers skip such "sparse" files without opening them); a cached
    # one its whole size.
    cached_name = NAME.replace("093012", "093512")
    index = RecordingIndex(str(tmp_path / "index.sqlite3"))
    index.add([Recording(name=NAME, talk_s=10), Recording(name=cached_name, talk_s=1)])
    (tmp_path / "cache" / "complete").mkdir(parents=True, mode=0o700)
    (tmp_path / "cache").chmod(0o700)
    (tmp_path / "cache" / "complete" / cached_name).write_bytes(b"x" * 5000)
    fs = YeastarFS(Core(index, DiskCache(str(tmp_path / "cache"), 1 << 20), downloads=None))
    try:
        assert fs.getattr(f"/2026/11/27/{NAME}")["st_blocks"] == 0
        cached = fs.getattr(f"/2026/11/27/{cached_name}")
        assert (cached["st_size"], cached["st_blocks"]) == (5000, 10)
        assert {entry[0]: entry[4] for entry in fs.readdir_plus("/2026/11/27")} == {NAME: 0, cached_name: 5000}
    finally:
        index.close()
