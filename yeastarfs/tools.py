"""Commands that work on a mount from outside: status (and, later, prefetch, cache, calls).

They talk to the daemon only through the filesystem itself (an extended attribute of the
root for status), so they need no socket, no credentials and no PBX access.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time

from yeastarfs.errors import ConfigError

STATUS_XATTR = "user.yeastarfs.status"


def read_status(mountpoint: str) -> dict:
    """The daemon's statistics. Raises ConfigError when *mountpoint* is not a yeastarfs mount."""
    try:
        return json.loads(os.getxattr(mountpoint, STATUS_XATTR))
    except OSError as exc:
        raise ConfigError(f"{mountpoint} is not a running yeastarfs mount ({exc.strerror})") from None


def _ago(timestamp) -> str:
    if not timestamp:
        return "never"
    return f"{dt.datetime.fromtimestamp(timestamp):%Y-%m-%d %H:%M:%S} ({time.time() - timestamp:.0f} s ago)"


def _bytes(count) -> str:
    value = float(count or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} TiB"


def print_status(mountpoint: str, as_json: bool = False) -> int:
    status = read_status(mountpoint)
    if as_json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    hit_rate = status.get("cache_hit_rate")
    token_age_s = status.get("token_age_s")
    lines = [
        f"mountpoint:        {status['mountpoint']} (pid {status['pid']}, up {status['uptime_s']:.0f} s)",
        f"PBX:               {status['pbx']} ({'reachable' if status['pbx_reachable'] else 'NOT reachable'})",
        f"token age:         {'no token' if token_age_s is None else f'{token_age_s:.0f} s'}",
        f"last event:        {_ago(status.get('last_event_time'))}",
        f"last CDR poll:     {_ago(status.get('last_poll_time'))}"
        + (f"  last error: {status['last_poll_error']}" if status.get("last_poll_error") else ""),
        f"recordings:        {status['recordings_indexed']}",
        f"cache:             {_bytes(status['cache_used_bytes'])} of {_bytes(status['cache_limit_bytes'])}, "
        f"{status['cache_files']} files, hit rate {'n/a' if hit_rate is None else f'{hit_rate:.0%}'}",
        f"downloads:         {len(status['downloads_in_flight'])} in flight",
    ]
    for item in status["downloads_in_flight"]:
        total = item["total_bytes"]
        share = f"{item['received_bytes'] / total:.0%}" if total else "?"
        lines.append(f"  {item['recording']}: {_bytes(item['received_bytes'])} of {_bytes(total)} ({share})")
    print("\n".join(lines))
    return 0
