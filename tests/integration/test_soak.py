"""Soak: 32 readers over 200 recordings while the PBX fails at random, for a bounded time.

Every read returns the PBX's bytes (sha256) or EIO; afterwards the cache holds only
complete, correct files; the daemon's memory stays flat.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import os
import random
import threading
import time

import pytest

from harness import date_path, wait_until

pytestmark = pytest.mark.fuse

READERS = 32
RECORDINGS = 200
SOAK_S = 35.0
WARM_UP_READS = 8 * READERS


def test_soak_random_faults(pbx, mounted):
    now = dt.datetime.now().replace(microsecond=0)
    rng = random.Random(7)
    recordings = [pbx.add_recording(start=now - dt.timedelta(minutes=10 + i), duration_s=rng.randint(3, 20),
                                    announce=False) for i in range(RECORDINGS)]
    expected = {rec.name: rec.sha256 for rec in recordings}
    mount = mounted("--max-downloads", "8", "--cache-size", "8M", "--stall-timeout", "20")
    mount.errors_expected = True
    pbx.chaos = 0.25
    pbx.latency_s = 0.005
    outcomes = {"ok": 0, "eio": 0}
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + SOAK_S

    def reader(seed: int) -> None:
        own = random.Random(seed)
        while time.monotonic() < deadline:
            rec = own.choice(recordings)
            path = mount.path(*date_path(rec.name))
            try:
                with open(path, "rb") as handle:
                    digest = hashlib.sha256(handle.read()).hexdigest()
            except OSError as exc:
                with lock:
                    if exc.errno == errno.EIO:
                        outcomes["eio"] += 1
                    else:
                        failures.append(f"{rec.name}: {exc!r}")
                continue
            with lock:
                if digest == expected[rec.name]:
                    outcomes["ok"] += 1
                else:
                    failures.append(f"{rec.name}: wrong bytes")

    def expirer() -> None:
        while time.monotonic() < deadline:
            time.sleep(4)
            pbx.expire_all_tokens()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(READERS)]
    threads.append(threading.Thread(target=expirer))
    for thread in threads:
        thread.start()
    # Warm up: every reader has been served a few times, so the daemon's threads, buffers
    # and malloc arenas have reached their working size.
    wait_until(lambda: sum(outcomes.values()) >= WARM_UP_READS, timeout_s=SOAK_S / 2,
               message=lambda: f"{WARM_UP_READS} reads to warm up (so far {outcomes})")
    rss_start = mount.rss_kib()
    rss_samples = []
    while any(thread.is_alive() for thread in threads[:-1]):
        rss_samples.append(mount.rss_kib())
        time.sleep(1)
    for thread in threads:
        thread.join(timeout=60)
    pbx.chaos = 0.0

    assert not failures, failures[:10]
    assert outcomes["ok"] > 200, outcomes
    # README (Performance): streaming keeps the RSS flat, "<= 10 MB" (MB = 10^6 bytes) of growth.
    assert max(rss_samples) - rss_start <= 10_000_000 // 1024, (rss_start, rss_samples)
    complete = mount.complete_dir
    cached = os.listdir(complete)
    assert cached
    for name in cached:
        with open(os.path.join(complete, name), "rb") as handle:
            assert hashlib.sha256(handle.read()).hexdigest() == expected[name], name
    assert sum(os.path.getsize(os.path.join(complete, n)) for n in cached) <= 8 << 20
    print(f"soak: {outcomes}, rss {rss_start} -> {rss_samples[-1]} KiB (max {max(rss_samples)}): {rss_samples}")
