#!/usr/bin/python3
"""Ask the freedesktop thumbnail service (tumbler) for thumbnails, as a file manager does.

usage: thumbnail_queue.py MIME ROUNDS URI...

Runs under the system Python (it needs python3-gi). Each round queues every URI with
org.freedesktop.thumbnails.Thumbnailer1.Queue and waits for that request's Finished signal;
the service sends its signals to the caller only, so one connection both asks and listens.
Prints one line per signal; exits 0 when every round finished, 1 on a timeout.
"""

import sys

from gi.repository import Gio, GLib

SERVICE = "org.freedesktop.thumbnails.Thumbnailer1"
OBJECT = "/org/freedesktop/thumbnails/Thumbnailer1"
ROUND_TIMEOUT_S = 120


def wait_for_service(bus, timeout_s: float = 30.0) -> None:
    """Wait until tumblerd owns its name (it was started beside this bus, not activated)."""
    deadline = GLib.get_monotonic_time() + int(timeout_s * 1e6)
    while GLib.get_monotonic_time() < deadline:
        reply = bus.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                              "NameHasOwner", GLib.Variant("(s)", (SERVICE,)), GLib.VariantType("(b)"),
                              Gio.DBusCallFlags.NONE, -1, None)
        if reply.unpack()[0]:
            return
        GLib.usleep(100_000)
    raise SystemExit(f"{SERVICE} never appeared on the bus")


def main() -> int:
    mime, rounds, uris = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    bus = Gio.bus_get_sync(Gio.BusType.SESSION, None)
    wait_for_service(bus)
    loop, state = GLib.MainLoop(), {"handle": None, "finished": False}

    def on_signal(_conn, _sender, _path, _iface, name, params, *_):
        values = params.unpack()
        print(name, values, flush=True)
        if name == "Finished" and values[0] == state["handle"]:
            state["finished"] = True
            loop.quit()

    bus.signal_subscribe(None, SERVICE, None, OBJECT, None, Gio.DBusSignalFlags.NONE, on_signal)
    for number in range(rounds):
        reply = bus.call_sync(SERVICE, OBJECT, SERVICE, "Queue",
                              GLib.Variant("(asasssu)", (uris, [mime] * len(uris), "normal", "default", 0)),
                              GLib.VariantType("(u)"), Gio.DBusCallFlags.NONE, -1, None)
        state.update(handle=reply.unpack()[0], finished=False)
        print(f"round {number + 1}: handle {state['handle']}", flush=True)
        timer = GLib.timeout_add_seconds(ROUND_TIMEOUT_S, loop.quit)
        loop.run()
        if state["finished"]:
            GLib.source_remove(timer)
        else:
            print(f"round {number + 1}: no Finished within {ROUND_TIMEOUT_S} s", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
