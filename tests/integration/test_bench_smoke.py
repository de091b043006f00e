"""scripts/bench.py runs every case end to end with tiny sizes and prints its JSON line.

Only that the benchmark works is checked, not whether yeastarfs meets the goals: timings
of tiny files on a busy CI machine mean nothing. Needs FUSE, like the integration tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"
TINY = ["--runs", "1", "--walk-recordings", "300", "--index-recordings", "300", "--stream-mb", "1",
        "--cold-mb", "1", "--parallel-mb", "0.5", "--parallel-readers", "3", "--ls-recordings", "20",
        "--head-mb", "1", "--sniff-files", "3", "--sniff-mb", "0.5"]
EXPECTED_ROWS = {"pbx_requests", "cold_seq", "cold_seq_lan", "first_64k_0ms", "first_64k", "parallel32", "cached_first",
                 "cached_repeat", "reread", "sniff", "ls_day_first", "ls_day_again", "walk_names", "walk_stat", "mount_start", "memory_idle", "memory_stream",
                 "memory_growth"}


pytestmark = pytest.mark.fuse  # FUSE availability: tests/integration/conftest.py


# The P-Series run: the cases that talk to the PBX (listing and memory do not depend on its family).
P_SERIES_CASES = ("pbx_requests", "cold_seq", "first_64k", "parallel32")
P_SERIES_ROWS = {"pbx_requests", "cold_seq", "first_64k_0ms", "first_64k", "parallel32"}  # first_64k: two rows


@pytest.mark.parametrize("api", ["s-series", "p-series"])
def test_bench_runs_every_case_with_tiny_sizes(tmp_path, api):
    json_path = tmp_path / "bench.json"
    cases = ["--cases", ",".join(P_SERIES_CASES)] if api == "p-series" else []
    result = subprocess.run([sys.executable, str(BENCH), *TINY, "--api", api, *cases, "--tmp-dir", str(tmp_path),
                             "--json", str(json_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("BENCH_JSON ")]
    assert len(lines) == 1
    data = json.loads(lines[0][len("BENCH_JSON "):])
    assert data == json.loads(json_path.read_text())
    rows = {case["case"]: case for case in data["cases"]}
    assert set(rows) == (P_SERIES_ROWS if api == "p-series" else EXPECTED_ROWS)
    assert rows["pbx_requests"]["met"], rows["pbx_requests"]  # correctness, not speed
    assert all(case["yeastarfs"]["samples"] for case in data["cases"])
    assert "| yeastarfs (median) |" in result.stdout
    assert [entry.name for entry in tmp_path.iterdir()] == ["bench.json"]  # everything else cleaned up


def test_the_peers_file_server_answers_ranges_as_a_web_server_does(tmp_path):
    """rclone and httpdirfs read the benchmark's recordings through this server: its ranges
    and byte counts are what the peers' columns rest on."""
    sys.path.insert(0, str(BENCH.parent))
    from bench_peers import FileServer
    import requests

    (tmp_path / "2023" / "06").mkdir(parents=True)
    data = bytes(range(256)) * 1000
    (tmp_path / "2023" / "06" / "a.wav").write_bytes(data)
    server = FileServer(str(tmp_path))
    try:
        url = server.base_url + "2023/06/a.wav"
        with requests.Session() as session:  # one kept-alive connection for all of them
            assert session.get(url).content == data
            part = session.get(url, headers={"Range": "bytes=1000-1999"})
            assert (part.status_code, part.headers["Content-Range"], part.content) == (
                206, f"bytes 1000-1999/{len(data)}", data[1000:2000])
            assert session.get(url, headers={"Range": "bytes=255000-"}).content == data[255000:]
            assert session.get(url, headers={"Range": "bytes=-10"}).content == data[-10:]
            assert session.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
            head = session.head(url)
            assert (head.headers["Content-Length"], head.headers["Accept-Ranges"]) == (str(len(data)), "bytes")
            assert 'href="a.wav"' in session.get(server.base_url + "2023/06/").text
        assert server.body_bytes() == len(data) + 1000 + 1000 + 10
    finally:
        server.close()
