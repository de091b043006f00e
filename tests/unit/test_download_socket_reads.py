"""A download takes from the network no more than flow control allows (issue 16).

What a download has not read stays in the kernel's socket buffers, which fill and make TCP
stop the PBX; what it has read is the PBX's bytes sent for good. So a sniff (open, 4 KiB,
close) may cost the window and those buffers, but not a whole socket read (1 MiB) more.
"""

from __future__ import annotations

import pytest

from harness import wait_stable
from test_downloads import KIB, WAIT_S, add, cache, client, make_manager, quick_policies  # noqa: F401 - fixtures
from yeastarfs.downloads import INITIAL_WINDOW_BYTES
from yeastarfs.pbx.transport import FIRST_READ_BYTES


@pytest.fixture
def counting_client(client):
    """The test's PbxClient whose streams count the bytes they take from the network."""
    taken = []

    def open_recording(name, offset=0):
        stream = client.open_recording(name, offset)
        taken.append(len(stream._pending))  # the first read, made while opening
        read = stream._read

        def counted() -> bytes:
            data = read()
            taken.append(len(data))
            return data

        stream._read = counted
        return stream

    open_recording.taken = taken
    return open_recording


def test_a_sniffed_download_takes_only_the_window_from_the_network(pbx, cache, counting_client):
    from yeastarfs.downloads import DownloadManager
    rec = add(pbx, 4_000_044)  # loopback: the socket always holds more than a read asks
    manager = DownloadManager(counting_client, cache, stall_timeout_s=WAIT_S)
    try:
        download = manager.acquire(rec.name)
        assert download.read(0, 4 * KIB) == pbx.recording_bytes(rec.name)[:4 * KIB]
        wait_stable(lambda: sum(counting_client.taken), quiet_s=0.3, timeout_s=WAIT_S,
                    message="the download to pause ahead of its reader")
        taken = sum(counting_client.taken)
        assert taken <= 4 * KIB + INITIAL_WINDOW_BYTES + FIRST_READ_BYTES, taken
        manager.release(download)
    finally:
        manager.stop()


def test_a_sequential_reader_still_gets_large_reads(pbx, cache, counting_client):
    from yeastarfs.downloads import DownloadManager
    rec = add(pbx, 4_000_044)
    manager = DownloadManager(counting_client, cache, stall_timeout_s=WAIT_S)
    try:
        download = manager.acquire(rec.name)
        offset, parts = 0, []
        while offset < rec.size_bytes:
            parts.append(download.read(offset, 1 << 20))
            offset += len(parts[-1])
        assert b"".join(parts) == pbx.recording_bytes(rec.name)
        manager.release(download)
        assert max(counting_client.taken) > INITIAL_WINDOW_BYTES  # the window grew with the reader
    finally:
        manager.stop()
