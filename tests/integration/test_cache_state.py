"""Each file's cache state (user.yeastarfs.cache) and `yeastarfs status PATH` for files and folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading

import pytest

from harness import date_path, download_requests, sha256_of, wait_until, yeastarfs_command
from test_streaming import ONE_MB, add

pytestmark = pytest.mark.fuse

CACHE_XATTR = "user.yeastarfs.cache"


def getfattr_state(getfattr: str, path: str) -> str:
    result = subprocess.run([getfattr, "--only-values", "-n", CACHE_XATTR, path], capture_output=True,
                            text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    return result.stdout


def status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(yeastarfs_command("status", *args), capture_output=True, text=True, timeout=60)


def test_cache_state_moves_from_none_to_partial_to_complete_during_a_read(pbx, mounted, require):
    getfattr = shutil.which("getfattr")
    require(getfattr, "getfattr is not installed (scripts/setup installs attr)")
    rec = add(pbx, size_bytes=2 * ONE_MB)
    mount = mounted()
    path = mount.recording_path(rec.name)
    assert getfattr_state(getfattr, path) == "none"
    pbx.bandwidth_bps = 1_000_000  # about two seconds for the file
    digest = {}
    reader = threading.Thread(target=lambda: digest.update(sha256=sha256_of(path)))
    reader.start()
    states = []

    def seen_complete() -> bool:
        state = getfattr_state(getfattr, path)
        if not states or states[-1] != state:
            states.append(state)
        return state == "complete"

    wait_until(seen_complete, timeout_s=30, interval_s=0.05, message=lambda: f"complete; saw {states}")
    reader.join(timeout=30)
    assert digest["sha256"] == rec.sha256
    kinds = [state.split()[0] for state in states]
    assert kinds[kinds.count("none"):] == ["partial"] * kinds.count("partial") + ["complete"], states
    assert kinds.count("partial") >= 2, f"too few partial states to see progress: {states}"
    partial = [state.split() for state in states if state.startswith("partial")]
    assert all(words[2] == "of" and words[3] == str(rec.size_bytes) for words in partial), states
    held = [int(words[1]) for words in partial]
    assert held == sorted(held) and 0 < held[0] and held[-1] < rec.size_bytes


def test_status_of_a_file_and_a_folder_downloads_nothing(pbx, mounted):
    recordings = [add(pbx, size_bytes=ONE_MB // 4, minutes_ago=30 + i) for i in range(3)]
    mount = mounted()
    cached = recordings[0]
    assert sha256_of(mount.recording_path(cached.name)) == cached.sha256
    pbx.reset()
    day = os.path.dirname(mount.recording_path(cached.name))

    folder = status(day, "--json")
    assert folder.returncode == 0, folder.stderr
    summary = json.loads(folder.stdout)
    assert (summary["recordings"], summary["complete"], summary["partial"], summary["none"]) == (3, 1, 0, 2)
    assert summary["held_bytes"] == cached.size_bytes
    assert summary["total_bytes"] >= sum(rec.size_bytes for rec in recordings) * 0.5  # estimates for the rest
    text = status(day)
    assert text.returncode == 0 and "3 recordings: 1 complete, 0 partial, 2 not cached" in text.stdout

    one = json.loads(status(mount.recording_path(cached.name), "--json").stdout)
    assert one["state"] == "complete" and one["held_bytes"] == cached.size_bytes
    other = status(mount.recording_path(recordings[1].name))
    assert other.returncode == 0 and ": none, 0 B of ~" in other.stdout
    assert download_requests(pbx) == (0, 0)

    outside = status(str(mount.pbx_dir))
    assert outside.returncode == 1 and "not a running yeastarfs mount" in outside.stderr
