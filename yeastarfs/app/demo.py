"""``yeastarfs demo`` and ``yeastarfs simulator``: the simulator, on its own or mounted.

The demo is the whole product against the project's PBX simulator of either family
(``--api s-series`` or ``p-series``): sample recordings over the last days, a real FUSE
mount in the foreground, a new call announced (an S-Series NewCdr, a P-Series New CDR over
the WebSocket) every ``NEW_CALL_EVERY_S`` so the live path can be watched, and a clean
unmount on Ctrl-C. Both simulators hold the same calls for the same seed.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
from typing import Optional

from yeastarfs.config import Config
from yeastarfs.sim.pseries import PSeriesSimulator
from yeastarfs.sim.sseries import Simulator

log = logging.getLogger(__name__)

NEW_CALL_EVERY_S = 30.0
DEMO_CACHE_BYTES = 512 << 20
SIMULATORS = {"s-series": Simulator, "p-series": PSeriesSimulator}


def _announce_calls(sim, stop: threading.Event) -> None:
    """Add a fresh call every NEW_CALL_EVERY_S, pushed to the mount as a NewCdr event."""
    while not stop.wait(NEW_CALL_EVERY_S):
        duration_s = 20 + secrets.randbelow(90)
        start = dt.datetime.now().replace(microsecond=0) - dt.timedelta(seconds=duration_s + 5)
        rec = sim.add_recording(start=start, duration_s=duration_s, announce=True)
        log.info("demo: new call announced: %s", rec.name)


def _instructions(mountpoint: str) -> str:
    today = dt.date.today()
    day_dir = os.path.join(mountpoint, f"{today:%Y/%m/%d}")
    return "\n".join([
        f"yeastarfs demo: simulated PBX recordings mounted at {mountpoint}",
        "Try, in another terminal:",
        f"  ls {mountpoint}",
        f"  ls -l {day_dir}",
        f"  ffprobe \"$(ls -d {day_dir}/* | head -1)\"",
        f"  sha256sum {day_dir}/*",
        f"A new call appears in {day_dir} every {NEW_CALL_EVERY_S:.0f} s.",
        "Press Ctrl-C to unmount and stop.",
    ])


def run_demo(mountpoint: Optional[str], recordings: int = 60, api: str = "s-series") -> int:
    from yeastarfs.app.mount import ready_notifier, run_mount  # needs libfuse

    workdir = tempfile.mkdtemp(prefix="yeastarfs-demo-")
    mountpoint = mountpoint or os.path.join(workdir, "recordings")
    os.makedirs(mountpoint, exist_ok=True)
    password = secrets.token_hex(12)  # the demo's own, never shown
    stop = threading.Event()
    with SIMULATORS[api](username="api", password=password) as sim:
        sim.populate(recordings, days=5)
        threading.Thread(target=_announce_calls, args=(sim, stop), daemon=True).start()
        config = Config(mountpoint=mountpoint, pbx_url=sim.base_url, api=api, username="api", password=password,
                        cache_root=os.path.join(workdir, "cache"), cache_max_bytes=DEMO_CACHE_BYTES,
                        cache_min_free_bytes=0, since_s=7 * 86400, poll_interval_s=30,
                        events_port=0, events_host="127.0.0.1").validate()
        try:
            run_mount(config, ready_notifier(None, _instructions(mountpoint)))
        finally:
            stop.set()
    shutil.rmtree(workdir, ignore_errors=True)
    print("yeastarfs demo: unmounted, bye")
    return 0


def run_simulator(host: str, port: int, username: str, password: str, recordings: int, days: int,
                  api: str = "s-series") -> int:
    # SIGTERM is caught before the ready line: a caller that stops it as soon as it read that
    # line gets a clean exit, not death by the signal.
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with SIMULATORS[api](host=host, port=port, username=username, password=password) as sim:
        sim.populate(recordings, days=days)
        who = f"user {username!r}" if api == "s-series" else f"client ID {username!r}"
        print(f"{api} PBX simulator serving {recordings} recordings at {sim.base_url} ({who}); Ctrl-C stops it",
              flush=True)
        try:
            done.wait()
        except KeyboardInterrupt:
            pass
    return 0
