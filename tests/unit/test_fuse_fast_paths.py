"""What the adapter's fast paths rely on, without a kernel: libfuse 3 is loaded where both
libfuse 2 and 3 are installed, and extended attributes outside ``user.*`` are refused as
unsupported (EOPNOTSUPP, which `ls` caches per device), never as absent (ENODATA, which it
asks again for every file) nor as ENOSYS (which would turn getxattr off for the whole mount)."""

from __future__ import annotations

import ctypes.util
import errno
import os
import stat
import tempfile

import pytest

from yeastarfs import fs
from yeastarfs.fs import FusePlus, YeastarFS, _prefer_libfuse3


def test_libfuse3_is_preferred_when_both_are_installed():
    both = {"fuse": "libfuse.so.2", "fuse3": "libfuse3.so.3"}.get
    assert _prefer_libfuse3({}, both, "linux") == "fuse3"
    assert _prefer_libfuse3({}, {"fuse": "libfuse.so.2"}.get, "linux") is None  # libfuse 2 alone: mfusepy's choice
    # The user's own choice, with mfusepy's variables, stands; other systems are left alone.
    assert _prefer_libfuse3({"FUSE_LIBRARY_PATH": "/opt/libfuse.so.2"}, both, "linux") is None
    assert _prefer_libfuse3({"FUSE_LIBRARY_NAME": "fuse"}, both, "linux") is None
    assert _prefer_libfuse3({}, both, "darwin") is None


def test_the_loaded_binding_is_libfuse3_where_installed_and_the_environment_is_left_clean(require):
    require(ctypes.util.find_library("fuse3"), "libfuse 3 is not installed (scripts/setup installs libfuse3-3)")
    assert FusePlus.is_libfuse3()
    assert FusePlus.can_invalidate()
    assert "FUSE_LIBRARY_NAME" not in os.environ


@pytest.mark.parametrize("name", [b"security.selinux", b"system.posix_acl_access", b"system.posix_acl_default",
                                  b"trusted.overlay.opaque", b"security.capability"])
def test_other_namespaces_are_unsupported_before_python(name):
    # self is never touched on this path: nothing is decoded, raised or logged.
    assert FusePlus.getxattr(None, b"/2026/11/27/x.wav", name, None, 0) == -errno.EOPNOTSUPP
    assert fs.XATTR_NAMESPACE_UNSUPPORTED not in (errno.ENODATA, errno.ENOSYS)


def test_the_page_cache_store_takes_inodes_of_its_own_fuse_mount_only(tmp_path):
    """The inode goes to FUSE_NOTIFY_STORE on this connection: one of another filesystem
    (a folder that is not the mount, or something mounted over it) must never be used."""
    (tmp_path / "2026").mkdir()
    (tmp_path / "2026" / "a.wav").write_bytes(b"RIFF")

    class NoCore:
        uid = gid = 0

        def set_invalidator(self, invalidate):
            pass

        def set_page_filler(self, inode_of, fill):
            pass

    assert YeastarFS(NoCore(), mountpoint=str(tmp_path)).kernel_inode("/2026/a.wav") is None  # a disk's folder
    assert YeastarFS(NoCore()).kernel_inode("/2026/a.wav") is None  # no mountpoint known
    if os.path.isdir("/dev/shm"):  # an anonymous device like FUSE's, but not a FUSE mount
        with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
            os.makedirs(os.path.join(shm, "2026"))
            open(os.path.join(shm, "2026", "a.wav"), "wb").close()
            assert YeastarFS(NoCore(), mountpoint=shm).kernel_inode("/2026/a.wav") is None


@pytest.mark.parametrize("mode, size_bytes, mtime_ns, stored_bytes", [
    (stat.S_IFREG | 0o444, 960_044, 1_700_000_000_123_456_789, 0),
    (stat.S_IFREG | 0o440, 5, 3, 960_044),
    (stat.S_IFDIR | 0o555, 0, 1_600_000_000_000_000_001, 0),
])
def test_a_listing_fills_each_entry_exactly_as_field_by_field(mode, size_bytes, mtime_ns, stored_bytes):
    listing = fs._ListingStats(1234, 2345)
    listing.of(stat.S_IFDIR | 0o555, 1, 2, 3)  # an earlier entry of another kind leaves nothing behind
    expected = fs.mfusepy.c_stat()
    fs._fill_stat(expected, mode, size_bytes, mtime_ns, 1234, 2345, stored_bytes)
    assert bytes(listing.of(mode, size_bytes, mtime_ns, stored_bytes)) == bytes(expected)
