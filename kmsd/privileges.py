"""Dropping privileges, shared by the daemon, the vault and the launcher."""

from __future__ import annotations

import ctypes
import errno
import os
import pwd
import resource
import socket
from typing import Any

__all__ = [
    "CAPABILITIES",
    "MCL_CURRENT",
    "MCL_FUTURE",
    "VAULT_MEMLOCK",
    "harden",
    "keep_capabilities",
    "libc",
    "restrict_syscalls",
    "switch_user",
    "syscall_filter",
    "user_exists",
]

PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
MCL_CURRENT = 1
MCL_FUTURE = 2
# RLIMIT_MEMLOCK the vault gets before it drops root: far above what it maps
# (~50 MB), so that locking every future page never fails an allocation.
VAULT_MEMLOCK = 512 * 1024 * 1024


def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def switch_user(name: str) -> pwd.struct_passwd:
    """Become ``name`` for good: its uid and gid, no supplementary groups.
    Refuses to return if root could be regained."""
    pw = pwd.getpwnam(name)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    if os.getuid() == 0 or os.geteuid() == 0 or os.getgid() == 0 and pw.pw_gid != 0:
        raise SystemExit(f"failed to drop root for {name}")
    return pw


def harden() -> None:
    """No core files, no new privileges (setuid binaries, file
    capabilities), not dumpable: no ptrace or /proc/PID/mem by the same uid.
    Call after ``switch_user``: changing credentials resets dumpable."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    c = libc()
    if c.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SystemExit("PR_SET_NO_NEW_PRIVS failed")
    if c.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise SystemExit("PR_SET_DUMPABLE failed")


# -- seccomp, through libseccomp ------------------------------------------------------
#
# A deny-list on top of "allow": the vault and the launcher run CPython and
# OpenSSL, whose system calls change between versions, so an allow-list
# would kill a vault in production at the first new one. What is denied is
# what a key holder never needs. libseccomp writes the BPF: it checks the
# architecture first and kills the process for any other ABI (an i386
# `int $0x80`, x32), the classic bypass of a hand-written filter.

# Refused (EPERM) whatever their arguments: io_uring does I/O (sockets
# included) that no seccomp rule sees; the others reach into other
# processes, the kernel or the mount table.
_DENIED_SYSCALLS = (
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
    "bpf", "perf_event_open", "userfaultfd",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "mount", "umount2", "pivot_root", "unshare", "setns", "open_by_handle_at",
)


def syscall_filter() -> Any:
    """kmsd's seccomp filter, built but not loaded (``.load()`` it, after
    ``harden``'s no-new-privs): the process dies at any system call of a
    non-native ABI; ``socket()`` for anything but AF_UNIX fails with EACCES
    (no network, whatever the user could otherwise do); io_uring and the
    calls above fail with EPERM. Inherited by every child; a second load
    stacks (each must allow). Built before a privilege drop: libseccomp is
    found and loaded while the interpreter's files are still readable."""
    try:
        import pyseccomp as seccomp
    except (ImportError, RuntimeError, OSError) as exc:  # RuntimeError: libseccomp.so.2 not found
        raise SystemExit(
            f"seccomp: libseccomp is required for the system-call filter ({exc}): apt-get install libseccomp2"
        ) from None
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    try:
        f.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    except OSError:
        # No seccomp() system call (an outer filter refuses it, as
        # systemd's @system-service does): libseccomp falls back to prctl,
        # which knows no KILL_PROCESS. The vault and the launcher run one
        # thread, so killing the thread kills the process.
        f.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL)
    f.add_rule(seccomp.ERRNO(errno.EACCES), "socket", seccomp.Arg(0, seccomp.NE, socket.AF_UNIX))
    for name in _DENIED_SYSCALLS:
        try:
            f.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except OSError:
            pass  # not a system call of this architecture: nothing to deny
    return f


def restrict_syscalls() -> None:
    """Build and load ``syscall_filter`` now."""
    syscall_filter().load()


# -- capabilities ----------------------------------------------------------------------

CAPABILITIES = {"chown": 0, "kill": 5, "setgid": 6, "setuid": 7, "setpcap": 8, "ipc_lock": 14, "sys_resource": 24}
_PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def keep_capabilities(names: tuple[str, ...]) -> int:
    """Keep only these capabilities (effective and permitted; none
    inheritable or ambient), and drop every other one from the bounding set
    where this process may (CAP_SETPCAP), so that no child regains them at
    exec either (no-new-privs clamps that too). The mask kept."""
    keep = 0
    for name in names:
        keep |= 1 << CAPABILITIES[name]
    c = libc()
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as fh:
            last = int(fh.read())
    except (OSError, ValueError):
        last = 40
    if _has_capability(CAPABILITIES["setpcap"]):
        for cap in range(last + 1):
            if not keep >> cap & 1:
                c.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # fails only for caps the kernel lacks
    c.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    ctypes.memset(data, 0, ctypes.sizeof(data))
    if c.capget(ctypes.byref(header), data) != 0:
        raise SystemExit(f"capget failed: errno {ctypes.get_errno()}")
    for i in range(2):
        mask = keep >> (32 * i) & 0xFFFFFFFF
        data[i].permitted &= mask
        data[i].effective = data[i].permitted
        data[i].inheritable = 0
    if c.capset(ctypes.byref(header), data) != 0:
        raise SystemExit(f"capset failed: errno {ctypes.get_errno()}")
    return keep


def _has_capability(cap: int) -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError):
        pass
    return False
