"""The systemd service protocol, both halves kmsd needs: sockets passed by
socket activation (``LISTEN_FDS``), and notifications to the service manager
(``NOTIFY_SOCKET``: READY=1, STOPPING=1, RELOADING=1, WATCHDOG=1, STATUS=).

Both are small, documented wire protocols (sd_listen_fds(3), sd_notify(3));
outside systemd every function here does nothing.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

__all__ = ["ListenSocket", "Notifier", "listen_fds", "watchdog_interval"]

SD_LISTEN_FDS_START = 3


@dataclass(frozen=True)
class ListenSocket:
    sock: socket.socket
    name: str  # FileDescriptorName= of the socket unit, else "unknown"

    @property
    def is_unix(self) -> bool:
        return self.sock.family == socket.AF_UNIX


def listen_fds(environ: MutableMapping[str, str] | None = None, *, unset: bool = True) -> list[ListenSocket]:
    """The listening sockets systemd passed to this process, if any. The
    variables are removed (``unset``) so that children (the vault) do not
    think the sockets are theirs."""
    env = os.environ if environ is None else environ
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    if unset:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(var, None)
    if pid != os.getpid() or count <= 0:
        return []
    found = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        found.append(ListenSocket(sock, names[i] if i < len(names) else "unknown"))
    return found


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """How often to send WATCHDOG=1 (half the configured timeout), or None
    when the watchdog is off or meant for another process."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    watchdog_pid = env.get("WATCHDOG_PID")
    if watchdog_pid and watchdog_pid != str(os.getpid()):
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


class Notifier:
    """Datagrams to ``$NOTIFY_SOCKET``; a no-op when it is not set."""

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if address.startswith("@"):
            # Abstract namespace.
            self._address = "\0" + address[1:]
        elif address.startswith("/"):
            self._address = address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> bool:
        if self._sock is None or self._address is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
            return True
        except OSError:
            return False

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self, status: str = "stopping") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets Type=notify-reload match the reload to its request.
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
