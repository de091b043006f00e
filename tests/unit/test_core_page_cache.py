"""When the core lets the kernel's page cache serve a file (issue 16), without a kernel.

Page-cache reads stop at the size the kernel believes, so a cached file goes through the
page cache, keeping the pages it has from one open to the next (``keep_cache``), only when
the kernel was told its exact size, and a download's bytes are put there at its commit only
then. A download itself is read with direct I/O (a read asks the PBX for no more than its
reader asked).
"""

from __future__ import annotations

import pytest

from harness import wait_until
from test_core import WAIT_S, add, make_core, path_of, quick_policies, read_all, sha  # noqa: F401 - fixtures
from yeastarfs import core as core_module


class Invalidator:
    """Stands in for the adapter's invalidation: records the paths, answers *works*."""

    def __init__(self, works: bool) -> None:
        self.works, self.paths = works, []

    def __call__(self, path: str) -> bool:
        self.paths.append(path)
        return self.works


class PageFiller:
    """Stands in for the adapter's page-cache store: the kernel's inode is *inode*; records
    what it was asked to store."""

    def __init__(self, inode) -> None:
        self.inode, self.stored = inode, []

    def inode_of(self, path: str):
        return self.inode

    def fill(self, inode: int, size_bytes: int, pread) -> bool:
        self.stored.append((inode, pread(size_bytes, 0)))
        return True


def read_to_the_end(core, rec, *, stat_after_open: bool) -> None:
    """Open (the kernel was told the estimate first), maybe fstat as most tools do, read all."""
    path = path_of(rec)
    assert core.stat(path).size_bytes != rec.size_bytes
    opened = core.open(path)
    assert opened.direct_io and not opened.keep_cache  # a download: exactly what readers ask
    if stat_after_open:
        assert core.stat(path).size_bytes == rec.size_bytes
    assert sha(read_all(core, opened.fh)) == rec.sha256  # the last bytes come after the commit
    core.release(opened.fh)


def test_a_download_read_through_the_mount_fills_the_page_cache_at_commit(pbx, make_core):
    rec = add(pbx, 700_000)
    core = make_core()
    filler = PageFiller(inode=4242)
    core.set_page_filler(filler.inode_of, filler.fill)
    read_to_the_end(core, rec, stat_after_open=True)
    assert [(inode, sha(data)) for inode, data in filler.stored] == [(4242, rec.sha256)]
    again = core.open(path_of(rec))
    assert again.keep_cache and not again.direct_io  # the next open keeps those pages
    core.release(again.fh)


@pytest.mark.parametrize("stat_after_open, inode", [(False, 4242), (True, None)],
                         ids=["kernel-still-has-the-estimate", "kernel-inode-unknown"])
def test_no_page_cache_fill_unless_the_kernel_has_the_exact_size_and_the_inode(pbx, make_core, stat_after_open,
                                                                                inode):
    rec = add(pbx, 700_000)
    core = make_core()
    filler = PageFiller(inode)
    core.set_page_filler(filler.inode_of, filler.fill)
    read_to_the_end(core, rec, stat_after_open=stat_after_open)
    wait_until(lambda: core.cache.contains(rec.name), WAIT_S, message="the recording to be cached")
    assert filler.stored == []


def test_a_download_is_direct_io_even_when_its_size_is_unknown_at_open(pbx, make_core, monkeypatch):
    rec = add(pbx, 700_000)
    core = make_core()
    core.set_invalidator(Invalidator(works=True))
    monkeypatch.setattr(core_module, "OPEN_SIZE_WAIT_S", 0.05)
    pbx.latency_s = 0.5  # the reply headers come after open gave up waiting
    opened = core.open(path_of(rec))
    assert opened.direct_io and not opened.keep_cache
    pbx.latency_s = 0.0
    assert sha(read_all(core, opened.fh)) == rec.sha256
    core.release(opened.fh)


def test_a_failing_page_cache_fill_costs_the_download_nothing(pbx, make_core):
    rec = add(pbx, 300_000)
    core = make_core()

    def broken_fill(inode, size_bytes, pread):
        raise OSError("the kernel went away")

    core.set_page_filler(lambda path: 7, broken_fill)
    read_to_the_end(core, rec, stat_after_open=True)
    wait_until(lambda: core.cache.contains(rec.name), WAIT_S, message="the recording to be cached")
