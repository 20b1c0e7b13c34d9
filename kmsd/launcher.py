"""The vault launcher: the one part of kmsd that stays root.

A daemon started as root drops to its own user once it is serving; from
then on it could not start a vault that reads a root-owned root key and
drops to its own, different user. So before dropping, it starts this small
process, which keeps root for exactly two things: start a vault (with the
arguments fixed when the launcher itself started: the daemon cannot choose
what the vault reads), and signal the vaults it started. It reads no key,
opens no file and no network socket, and has no other request.

Protocol, on a SOCK_SEQPACKET socketpair (one message per datagram, JSON):

    daemon -> launcher   {"op": "spawn"} + the vault's end of its socketpair (SCM_RIGHTS)
                         {"op": "signal", "pid": N, "signal": 9}
    launcher -> daemon   {"pid": N} | {"ok": true} | {"error": "..."}     (answers, in order)
                         {"exited": N, "returncode": RC}                 (whenever a vault exits)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["LAUNCHER_CAPABILITIES", "LaunchedProcess", "Launcher"]

MAX_MESSAGE = 4096
LAUNCHER_CAPABILITIES = ("setuid", "setgid", "kill", "ipc_lock")


# -- daemon side -------------------------------------------------------------------


class Launcher:
    """The daemon's handle on the launcher process."""

    def __init__(
        self, vault_args: Sequence[str], pass_fds: Sequence[int] = (), on_exit: Callable[[], None] | None = None
    ) -> None:
        self._vault_args = list(vault_args)
        self._pass_fds = list(pass_fds)
        # Called once if the launcher goes away while the daemon still needs it.
        self._on_exit = on_exit
        self.alive = False
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._answers: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-m", "kmsd.launcher", "--fd", str(child.fileno()), "--", *self._vault_args],
                pass_fds=[child.fileno(), *self._pass_fds],
                env={},
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        finally:
            child.close()
        parent.setblocking(False)
        self._sock = parent
        self.alive = True
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="launcher-reader")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                data = await loop.sock_recv(self._sock, MAX_MESSAGE)
            except OSError:
                data = b""
            if not data:
                # The launcher is gone: no vault can be started any more.
                self.alive = False
                if self._sock is not None and self._on_exit is not None:
                    self._on_exit()
                await self._answers.put({"error": "launcher exited"})
                for fut in self._exits.values():
                    if not fut.done():
                        fut.set_result(-1)
                return
            message = json.loads(data)
            if "exited" in message:
                fut = self._exits.setdefault(int(message["exited"]), loop.create_future())
                if not fut.done():
                    fut.set_result(int(message["returncode"]))
            else:
                await self._answers.put(message)

    async def _request(self, message: dict[str, object], fds: Sequence[int] = ()) -> dict[str, object]:
        if self._sock is None:
            raise OSError("launcher not started")
        async with self._lock:
            # A few bytes on a local socketpair: never blocks in practice.
            self._sock.setblocking(True)
            try:
                socket.send_fds(self._sock, [json.dumps(message).encode()], list(fds))
            finally:
                self._sock.setblocking(False)
            answer = await asyncio.wait_for(self._answers.get(), 30)
        if "error" in answer:
            raise OSError(str(answer["error"]))
        return answer

    async def spawn(self, vault_fd: int) -> LaunchedProcess:
        answer = await self._request({"op": "spawn"}, [vault_fd])
        pid = answer["pid"]
        if not isinstance(pid, int):
            raise OSError("the launcher answered no pid")
        self._exits.setdefault(pid, asyncio.get_running_loop().create_future())
        return LaunchedProcess(self, pid)

    async def signal(self, pid: int, sig: int) -> None:
        await self._request({"op": "signal", "pid": pid, "signal": sig})

    async def wait(self, pid: int) -> int:
        fut = self._exits.setdefault(pid, asyncio.get_running_loop().create_future())
        return await asyncio.shield(fut)

    def exited(self, pid: int) -> int | None:
        fut = self._exits.get(pid)
        return fut.result() if fut is not None and fut.done() else None

    async def close(self) -> None:
        self.alive = False
        if self._sock is not None:
            self._sock.close()  # the launcher stops its vaults and exits
            self._sock = None
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._proc is not None:
            try:
                await asyncio.to_thread(self._proc.wait, 5)
            except subprocess.TimeoutExpired:
                # After this process dropped root it may not signal the launcher.
                with contextlib.suppress(PermissionError):
                    self._proc.kill()


class LaunchedProcess:
    """A vault started by the launcher, with the part of
    ``asyncio.subprocess.Process`` that ``VaultClient`` uses."""

    def __init__(self, launcher: Launcher, pid: int) -> None:
        self._launcher = launcher
        self.pid = pid

    @property
    def returncode(self) -> int | None:
        return self._launcher.exited(self.pid)

    def _send(self, sig: int) -> None:
        if self.returncode is None:
            asyncio.get_running_loop().create_task(self._launcher.signal(self.pid, sig))

    def terminate(self) -> None:
        self._send(signal.SIGTERM)

    def kill(self) -> None:
        self._send(signal.SIGKILL)

    async def wait(self) -> int:
        return await self._launcher.wait(self.pid)


# -- launcher side -------------------------------------------------------------------


def _send(sock: socket.socket, message: dict[str, object]) -> None:
    with contextlib.suppress(OSError):
        sock.send(json.dumps(message).encode())


def launcher_main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[0] != "--fd" or argv[2] != "--":
        raise SystemExit("usage: python -m kmsd.launcher --fd N -- VAULT_ARGS...")
    sock = socket.socket(fileno=int(argv[1]))
    _confine()
    children: dict[int, subprocess.Popen[bytes]] = {}
    try:
        _serve(sock, argv[3:], children)
    finally:
        for proc in children.values():
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in children.values():
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()


def _confine() -> None:
    from .privileges import VAULT_MEMLOCK, harden, keep_capabilities, restrict_syscalls

    # The vaults lock their memory as root; raising the limit needs
    # CAP_SYS_RESOURCE, which is not kept: raise it here, once, for them.
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if hard != resource.RLIM_INFINITY and hard < VAULT_MEMLOCK:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (VAULT_MEMLOCK, VAULT_MEMLOCK))
    harden()
    # Root for starting vaults and signalling them, nothing else: a vault
    # switches to its user (setuid, setgid) and locks its memory (ipc_lock);
    # the launcher signals vaults of another uid (kill). Outside systemd
    # (whose unit bounds it too) it would otherwise keep every capability.
    keep_capabilities(LAUNCHER_CAPABILITIES)
    restrict_syscalls()
    # The daemon's terminal signals are not for us: we end when it closes
    # the socket. A handler, not SIG_IGN, which the vaults would inherit.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)


def _serve(sock: socket.socket, vault_args: list[str], children: dict[int, subprocess.Popen[bytes]]) -> None:
    """Answer the daemon's requests until it closes the socket, and tell it
    whenever a vault exits."""
    while True:
        for pid, proc in list(children.items()):
            if proc.poll() is not None:
                del children[pid]
                _send(sock, {"exited": pid, "returncode": proc.returncode})
        readable, _, _ = select.select([sock], [], [], 0.05 if children else 1.0)
        if not readable:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 4)
        except OSError:
            return
        if not data:
            return  # the daemon is gone
        try:
            request = json.loads(data)
        except ValueError:
            request = {}
        _send(sock, _answer(request if isinstance(request, dict) else {}, fds, vault_args, children))


def _answer(
    request: dict[str, Any], fds: list[int], vault_args: list[str], children: dict[int, subprocess.Popen[bytes]]
) -> dict[str, object]:
    op = request.get("op")
    if op == "spawn" and len(fds) == 1:
        fd = fds[0]
        proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "kmsd.vault_process", "--fd", str(fd), *vault_args],
            pass_fds=[fd, *_inherited_fds(vault_args)],
            env={},
            stdin=subprocess.DEVNULL,
            close_fds=True,
        )
        os.close(fd)
        children[proc.pid] = proc
        return {"pid": proc.pid}
    if op == "signal" and request.get("pid") in children and request.get("signal") in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(request["pid"]), int(request["signal"]))
        return {"ok": True}
    for fd in fds:
        os.close(fd)
    return {"error": "bad request"}


def _inherited_fds(vault_args: Sequence[str]) -> list[int]:
    """The root key's sealed memfd, when the vault reads it from one."""
    args = list(vault_args)
    if "--root-key-fd" in args:
        return [int(args[args.index("--root-key-fd") + 1])]
    return []


if __name__ == "__main__":
    launcher_main()
