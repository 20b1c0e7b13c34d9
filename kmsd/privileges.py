"""Dropping privileges, shared by the daemon, the vault and the launcher."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import pwd
import resource
import socket

__all__ = ["MCL_CURRENT", "MCL_FUTURE", "harden", "libc", "switch_user", "unix_sockets_only", "user_exists"]

PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
MCL_CURRENT = 1
MCL_FUTURE = 2


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


# seccomp: a process that may create Unix sockets only (the vault: no
# network, whatever its user could otherwise do). A classic BPF program:
#   arch != native  -> allow (no other ABI is in use)
#   nr != socket    -> allow
#   domain == AF_UNIX -> allow, else fail with EACCES
_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x20, 0x15, 0x06
_SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def unix_sockets_only() -> bool:
    """Install the filter (needs no-new-privs first: ``harden``). False on
    an architecture it does not know; the caller says so."""
    arch = _ARCH.get(platform.machine())
    if arch is None:
        return False
    audit_arch, nr_socket = arch
    program = [
        (_BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (_BPF_JEQ_K, 0, 5, audit_arch),
        (_BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        (_BPF_JEQ_K, 0, 3, nr_socket),
        (_BPF_LD_W_ABS, 0, 0, 16),  # seccomp_data.args[0], low 32 bits
        (_BPF_JEQ_K, 1, 0, socket.AF_UNIX),
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.EACCES),
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
    ]
    filters = (_SockFilter * len(program))(*[_SockFilter(*ins) for ins in program])
    prog = _SockFprog(len(program), filters)
    if libc().prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise SystemExit(f"seccomp filter refused: errno {ctypes.get_errno()}")
    return True
