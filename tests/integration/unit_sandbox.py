"""Run a command under the kernel-enforced part of yeastarfs@.service's hardening, without systemd.

``python unit_sandbox.py UNIT_FILE -- COMMAND...`` reads the unit's ``SystemCallFilter=``,
``MemoryDenyWriteExecute=``, ``RestrictAddressFamilies=``, ``CapabilityBoundingSet=`` and
``NoNewPrivileges=``, applies them to itself the way systemd applies them to a service (seccomp
filters through libseccomp: an allow list that kills on anything else, systemd's W^X rules,
a socket family filter; capabilities dropped from the bounding set), then execs COMMAND. The
tests mount through it, so a setting the daemon cannot live with fails a test here rather
than a service in the field. The groups (``@system-service``...) are expanded by this
machine's ``systemd-analyze syscall-filter``, i.e. as its systemd would.

Not emulated (no kernel state to set from here, or nothing the daemon calls): the device
cgroup (DeviceAllow=), LockPersonality=, RestrictNamespaces=, RestrictRealtime=,
RestrictSUIDSGID=, ProtectHostname=, ProtectClock=, UMask=.

A standalone script, run in a fresh single-threaded process (never a preexec_fn of a test
process that runs threads).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import subprocess
import sys

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
SHM_EXEC = 0o100000
CAP_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"
CAPABILITIES = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3,
                "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_NET_BIND_SERVICE": 10,
                "CAP_SYS_ADMIN": 21}


def SCMP_ACT_ERRNO(code: int) -> int:  # noqa: N802 - libseccomp's macro
    return 0x00050000 | (code & 0x0000FFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def unit_settings(path: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if "=" in line and not line.startswith(("#", ";", "[")):
                key, value = line.split("=", 1)
                settings.setdefault(key, []).extend(value.split())
    return settings


def expand_syscalls(names: list[str]) -> set[str]:
    """Syscall names of *names* (groups expanded by systemd-analyze)."""
    calls: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            calls.add(name)
            continue
        listing = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True,
                                 text=True, check=True).stdout
        members = [line.strip() for line in listing.splitlines()[1:]
                   if line.startswith("    ") and not line.strip().startswith("#")]
        calls |= expand_syscalls(members)
    return calls


class Filter:
    def __init__(self, lib, default_action: int) -> None:
        self.lib = lib
        self.ctx = lib.seccomp_init(ctypes.c_uint32(default_action))
        if not self.ctx:
            raise OSError("seccomp_init failed")

    def rule(self, action: int, name: str, *comparisons: tuple[int, int, int, int]) -> None:
        number = self.lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:  # not a syscall on this architecture (arm_fadvise64_64 on x86-64)
            return
        array = (ArgCmp * max(1, len(comparisons)))(*[ArgCmp(*c) for c in comparisons])
        result = self.lib.seccomp_rule_add_array(self.ctx, ctypes.c_uint32(action), number,
                                                 len(comparisons), array)
        if result < 0:
            raise OSError(-result, f"seccomp_rule_add {name}")

    def load(self) -> None:
        result = self.lib.seccomp_load(self.ctx)
        if result < 0:
            raise OSError(-result, "seccomp_load")


def apply(settings: dict[str, list[str]]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    if settings.get("NoNewPrivileges") == ["yes"]:
        assert libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    if "CapabilityBoundingSet" in settings:
        keep = {CAPABILITIES[name] for name in settings["CapabilityBoundingSet"]}
        with open(CAP_LAST_CAP_FILE) as handle:
            last = int(handle.read())
        for cap in range(last + 1):
            if cap not in keep and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), f"dropping capability {cap}")
    if settings.get("MemoryDenyWriteExecute") == ["yes"]:
        wx = Filter(lib, SCMP_ACT_ALLOW)  # systemd's rules (seccomp-util.c), EPERM
        both = mmap.PROT_EXEC | mmap.PROT_WRITE
        wx.rule(SCMP_ACT_ERRNO(errno.EPERM), "mmap", (2, SCMP_CMP_MASKED_EQ, both, both))
        for name in ("mprotect", "pkey_mprotect"):
            wx.rule(SCMP_ACT_ERRNO(errno.EPERM), name, (2, SCMP_CMP_MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC))
        wx.rule(SCMP_ACT_ERRNO(errno.EPERM), "shmat", (2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
        wx.load()
    if "RestrictAddressFamilies" in settings:
        allowed_families = {int(getattr(socket, name)) for name in settings["RestrictAddressFamilies"]}
        families = Filter(lib, SCMP_ACT_ALLOW)
        for family in range(64):
            if family not in allowed_families:
                families.rule(SCMP_ACT_ERRNO(errno.EAFNOSUPPORT), "socket", (0, SCMP_CMP_EQ, family, 0))
        families.load()
    if "SystemCallFilter" in settings:  # last: loading a filter is not a service's call
        allowed = Filter(lib, SCMP_ACT_KILL_PROCESS)  # systemd kills on a call off the list
        for name in sorted(expand_syscalls(settings["SystemCallFilter"])):
            allowed.rule(SCMP_ACT_ALLOW, name)
        allowed.load()


def main(argv: list[str]) -> None:
    unit, separator, *command = argv
    assert separator == "--" and command, "usage: unit_sandbox.py UNIT -- COMMAND..."
    apply(unit_settings(unit))
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
