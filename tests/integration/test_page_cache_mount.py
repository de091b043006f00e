"""Through the kernel: a recording read right after its download comes from the page cache,
and the page cache never serves a stale size (issue 16).

The kernel is told each recording's estimated size first (a stat, as a listing does); the
PBX's file is then smaller or larger than that estimate. The first read goes through the
page cache (the core had the kernel forget the estimate at open), the second is served by
the kernel alone (no FUSE read reaches the daemon), and both return exactly the PBX's bytes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os

import pytest

from harness import date_path, wait_until

pytestmark = pytest.mark.fuse


def fuse_reads(mount) -> int:
    return json.loads(os.getxattr(mount.mountpoint, "user.yeastarfs.status"))["fuse_reads"]


def read_whole(path: str) -> tuple[bytes, int]:
    """All the bytes of *path* (1 MiB reads, as cp does) and the size fstat gave right after open."""
    with open(path, "rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        parts = list(iter(lambda: handle.read(1 << 20), b""))
    return b"".join(parts), size


@pytest.mark.parametrize("talk_s", [30, 120], ids=["estimate-too-small", "estimate-too-large"])
def test_the_read_after_a_download_comes_from_the_page_cache_with_the_exact_size(pbx, mounted, talk_s):
    size_bytes = 1_000_044  # 62.5 s of audio; the index estimates 16,000 bytes per second of talk
    start = dt.datetime.now().replace(microsecond=0) - dt.timedelta(minutes=30)
    rec = pbx.add_recording(start=start, duration_s=talk_s, size_bytes=size_bytes, announce=False)
    mount = mounted()
    path = mount.path(*date_path(rec.name))
    estimate = os.stat(path).st_size
    assert estimate != size_bytes and (estimate < size_bytes) == (talk_s == 30)
    expected = hashlib.sha256(pbx.recording_bytes(rec.name)).hexdigest()

    data, size_at_open = read_whole(path)
    assert (len(data), size_at_open) == (size_bytes, size_bytes)
    assert hashlib.sha256(data).hexdigest() == expected
    wait_until(lambda: os.path.exists(mount.cache_file(rec.name)), 10, message="the recording to be cached")

    before = fuse_reads(mount)
    data, size_at_open = read_whole(path)
    assert (len(data), size_at_open) == (size_bytes, size_bytes)
    assert hashlib.sha256(data).hexdigest() == expected
    assert fuse_reads(mount) == before  # every byte came from the kernel's page cache
    assert os.stat(path).st_size == size_bytes
