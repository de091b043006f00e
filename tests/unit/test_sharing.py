"""Issue 18 without a kernel: what file servers are given (exact sizes or an error, never an
estimate) and how handles from an earlier mount are made stale (libfuse's generation, written
only into a struct that looks as checked)."""

from __future__ import annotations

import ctypes
import logging
import os
import time
import types

import pytest

from harness import wait_until
from test_core import WAIT_S, add, make_core, path_of, process_named, quick_policies, read_all, sha  # noqa: F401
from yeastarfs import core as core_module
from yeastarfs import errors
from yeastarfs.core import OpenFile
from yeastarfs.fs import (HANDLES_UNSAFE, STRUCT_FUSE_GENERATION_OFFSET,
                          STRUCT_FUSE_ID_TABLE_USE_OFFSET, STRUCT_FUSE_NODE_COUNTER_OFFSET, YeastarFS,
                          randomise_generation)

# A quick ordinary wait, so that the exact-size readers' longer one shows.
ORDINARY_WAIT_S = 0.3
STALL_S = 1.5


@pytest.fixture
def sharing_core(make_core, monkeypatch):
    """A core whose smbd is an exact-size reader (an ordinary open waits ORDINARY_WAIT_S, smbd's STALL_S)."""
    monkeypatch.setattr(core_module, "OPEN_SIZE_WAIT_S", ORDINARY_WAIT_S)

    def build():
        core = make_core(exact_size_readers=("smbd",))
        core.downloads.stall_timeout_s = STALL_S
        return core

    return build


# -- exact sizes for file servers ----------------------------------------------------------------


def test_a_file_server_waits_for_the_exact_size_an_ordinary_reader_does_not(pbx, sharing_core):
    shorter, longer = (pbx.add_recording(duration_s=d, announce=False, start=None) for d in (20.3, 33.7))
    core = sharing_core()
    for rec in (shorter, longer):
        assert core.stat(path_of(rec)).size_bytes != rec.size_bytes       # the kernel was told an estimate
    pbx.latency_s = 0.4                                                    # the size comes after 0.8 s
    with process_named("smbd") as server:
        began = time.monotonic()
        opened = core.open(path_of(shorter), reader=server)
        assert time.monotonic() - began > ORDINARY_WAIT_S
        assert opened.size_changed                                         # the adapter makes the kernel ask again
        assert core.stat(path_of(shorter)).size_bytes == shorter.size_bytes  # what it then hears
        assert sha(read_all(core, opened.fh)) == shorter.sha256
        core.release(opened.fh)
    with process_named("vlc") as player:
        opened = core.open(path_of(longer), reader=player)
        assert not opened.size_changed                                     # not known yet: reads say where it ends
        assert sha(read_all(core, opened.fh)) == longer.sha256
        core.release(opened.fh)


def test_a_file_server_gets_an_error_never_an_estimate(pbx, sharing_core):
    rec = add(pbx, 300_044)
    pbx.omit_content_length = True    # the size is known only at the end of the body
    pbx.bandwidth_bps = 100_000       # 3 s
    core = sharing_core()
    with process_named("smbd") as server:
        began = time.monotonic()
        with pytest.raises(errors.DownloadStalledError, match="not opened for smbd"):
            core.open(path_of(rec), reader=server)
        assert STALL_S <= time.monotonic() - began < STALL_S + 1.0
    with process_named("vlc") as player:                                   # anyone else streams it
        opened = core.open(path_of(rec), reader=player)
        pbx.bandwidth_bps = None
        assert sha(read_all(core, opened.fh)) == rec.sha256
        core.release(opened.fh)


def test_a_size_the_catalogue_gave_is_exact_for_file_servers(pbx, sharing_core):
    # The P-Series lists exact sizes: a file server is served at once, whatever the download says.
    rec = add(pbx, 300_044)
    pbx.omit_content_length = True
    pbx.bandwidth_bps = 100_000
    core = sharing_core()
    core.index.set_size(rec.name, rec.size_bytes)
    with process_named("smbd") as server:
        began = time.monotonic()
        opened = core.open(path_of(rec), reader=server)
        assert time.monotonic() - began < STALL_S
        assert opened.size_changed and core.stat(path_of(rec)).size_bytes == rec.size_bytes
        again = core.open(path_of(rec), reader=server)
        assert not again.size_changed                                      # the kernel was told it now
        pbx.bandwidth_bps = None
        assert sha(read_all(core, opened.fh)) == rec.sha256
        for handle in (opened, again):
            core.release(handle.fh)


def test_a_cached_recording_asks_for_invalidation_only_when_the_kernel_may_hold_another_size(pbx, make_core):
    rec = add(pbx, 200_044)
    core = make_core()
    opened = core.open(path_of(rec))
    read_all(core, opened.fh)
    core.release(opened.fh)
    wait_until(lambda: core.cache.contains(rec.name), WAIT_S, message="the recording to be cached")
    core.list(os.path.dirname(path_of(rec)))          # a listing tells the kernel the exact size
    assert not core.open(path_of(rec)).size_changed
    core._reported_sizes.clear()                      # forgotten (the memo is bounded): the kernel may hold anything
    assert core.open(path_of(rec)).size_changed


# -- the adapter -------------------------------------------------------------------------------------


class _OpeningCore:
    """What YeastarFS needs of a core to open a file."""

    def __init__(self, size_changed: bool) -> None:
        self.size_changed = size_changed

    def set_invalidator(self, invalidate) -> None:
        pass

    def open(self, path, writing=False, reader=None) -> OpenFile:
        return OpenFile(7, keep_cache=False, direct_io=True, size_changed=self.size_changed)


@pytest.mark.parametrize("size_changed", [True, False])
def test_open_makes_the_kernel_forget_a_size_that_changed_before_it_returns(size_changed):
    fs = YeastarFS(_OpeningCore(size_changed))
    invalidated = []
    fs.invalidate = invalidated.append
    info = types.SimpleNamespace(flags=os.O_RDONLY, fh=0, keep_cache=0, direct_io=0)
    assert fs.open("/2026/11/30/a.wav", info) == 0 and info.fh == 7
    assert invalidated == (["/2026/11/30/a.wav"] if size_changed else [])


def test_without_libfuse_3_context_the_mount_says_nfs_is_unsafe(caplog):
    fs = YeastarFS(_OpeningCore(False))
    with caplog.at_level(logging.WARNING, logger="yeastarfs.fs"):
        fs.init("/")                                   # no FUSE request: no struct fuse to check
    assert fs.handles == HANDLES_UNSAFE
    assert [record.message for record in caplog.records if "over NFS is unsafe" in record.message]


# -- libfuse's generation ----------------------------------------------------------------------------

SESSION = 0x5E55


def struct_fuse(session: int = SESSION, hashed: int = 1, counter: int = 0, generation: int = 0):
    """The first bytes of a libfuse 3.10-3.18 ``struct fuse`` as it is at init."""
    memory = ctypes.create_string_buffer(256)
    address = ctypes.addressof(memory)
    ctypes.c_void_p.from_address(address).value = session
    ctypes.c_size_t.from_address(address + STRUCT_FUSE_ID_TABLE_USE_OFFSET).value = hashed
    ctypes.c_uint64.from_address(address + STRUCT_FUSE_NODE_COUNTER_OFFSET).value = counter
    ctypes.c_uint32.from_address(address + STRUCT_FUSE_GENERATION_OFFSET).value = generation
    return memory, address


def generation_of(address: int) -> int:
    return ctypes.c_uint32.from_address(address + STRUCT_FUSE_GENERATION_OFFSET).value


def test_every_mount_gets_its_own_random_generation():
    generations = set()
    for _ in range(3):
        memory, address = struct_fuse()
        assert randomise_generation(address, 314, lambda pointer: SESSION) is None
        generations.add(generation_of(address))
    assert len(generations) == 3 and 0 not in generations


@pytest.mark.parametrize("layout, why", [
    (dict(session=0x1234), "does not start with its session"),
    (dict(hashed=2), "not as expected"),
    (dict(counter=40), "not as expected"),
    (dict(generation=7), "not as expected"),
])
def test_a_struct_that_does_not_look_as_checked_is_left_alone(layout, why):
    memory, address = struct_fuse(**layout)
    before = generation_of(address)
    assert why in randomise_generation(address, 314, lambda pointer: SESSION)
    assert generation_of(address) == before


@pytest.mark.parametrize("version", [309, 319, 299, 400])
def test_a_libfuse_whose_layout_was_not_checked_is_not_read(version):
    # Address 0: reading it would crash the test, so nothing may be read.
    assert "not one whose layout was checked" in randomise_generation(0, version, lambda pointer: 0)

