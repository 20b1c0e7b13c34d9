"""A private MariaDB server for the tests and bench/run: its own temporary
datadir, Unix socket and loopback port, made with ``mariadb-install-db`` and
run as a child process, so that tests may kill it, pause it and start it
again.

Nothing here touches a system MariaDB service or its files.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pymysql

__all__ = ["MariaDBServer", "find_binaries"]

APP_USER = "kmsd"
APP_HOSTS = ("localhost", "127.0.0.1")
# Exactly what the README tells an operator to grant.
APP_GRANTS = "SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX"

# The original Node.js system's tables, as it created them, under the
# original server's default collation (case- and trailing-space-insensitive).
ORIGINAL_SCHEMA = (
    (
        "CREATE TABLE master_keys (id INT AUTO_INCREMENT PRIMARY KEY, key_id VARCHAR(64) UNIQUE NOT NULL,"
        " key_material TEXT NOT NULL, created_at DATETIME NOT NULL, status ENUM('active','retired') NOT NULL,"
        " description TEXT) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci"
    ),
    (
        "CREATE TABLE kms_keys (user_id VARCHAR(64) PRIMARY KEY, encrypted_key TEXT, encrypted_dek TEXT,"
        " created_at DATETIME) DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci"
    ),
)

_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def find_binaries() -> tuple[str | None, str | None]:
    """(mariadbd, mariadb-install-db), each None when missing. ``mariadbd``
    lives in /usr/sbin, which is not on every PATH."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
    return shutil.which("mariadbd", path=path), shutil.which("mariadb-install-db", path=path)


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with(parent: int) -> None:
    """In the child, before exec: SIGKILL when the parent goes away, so that
    a test run that dies (even by a signal) leaves no server behind."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _free_port() -> int:
    """A free loopback port *below* the ephemeral range: while the server is
    down (killed by a test, restarting), no outgoing connection and no
    bind(0) elsewhere on the machine can take its port."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(100):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def socket_path(directory: Path) -> str:
    """The server's Unix socket in ``directory``, which must be short: the
    path must fit in 108 bytes."""
    path = str(directory / "s.sock")
    if len(path.encode()) >= 108:
        raise ValueError(f"socket path too long for a Unix socket: {path}")
    return path


class _PortTaken(RuntimeError):
    """mariadbd could not bind its TCP port: another process has it."""


class MariaDBServer:
    """One private ``mariadbd``. ``base`` must be a short path: the Unix
    socket inside it must fit in 108 bytes."""

    def __init__(self, base: Path, *, mariadbd: str | None = None, install_db: str | None = None) -> None:
        found = find_binaries()
        self.mariadbd = mariadbd or found[0] or "mariadbd"
        self.install_db = install_db or found[1] or "mariadb-install-db"
        self.base = Path(base)
        self.datadir = self.base / "data"
        self.socket = socket_path(self.base)
        self.pid_file = self.base / "mariadbd.pid"
        self.log_file = self.base / "error.log"
        self.port = _free_port()
        # Hex: nothing in it needs percent-encoding in a URL.
        self.password = secrets.token_hex(16)
        self.proc: subprocess.Popen[bytes] | None = None
        self._user_created = False
        self._port_published = False  # a URL with the port was handed out
        self._names = itertools.count(1)

    # -- lifecycle -------------------------------------------------------------

    def install(self) -> None:
        """A fresh datadir (root over the socket, no password)."""
        self.base.mkdir(parents=True, exist_ok=True)
        if self.datadir.exists():
            shutil.rmtree(self.datadir)
        args = [
            self.install_db, "--no-defaults", f"--datadir={self.datadir}",
            "--auth-root-authentication-method=normal", "--skip-test-db",
        ]
        if os.geteuid() == 0:
            args.append("--user=root")
        result = subprocess.run(
            args, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"mariadb-install-db failed ({result.returncode}):\n{result.stdout.decode(errors='replace')}"
            )

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until root can connect over the socket.
        Until a URL naming the port has been handed out, a port that another
        process took meanwhile is replaced by a new one."""
        for _ in range(5):
            try:
                return self._start(timeout)
            except _PortTaken:
                if self._port_published:
                    raise
                self.port = _free_port()
        raise RuntimeError("no free port for mariadbd")

    def _start(self, timeout: float) -> None:
        if self.is_running():
            self.resume()
            return
        args = [
            self.mariadbd, "--no-defaults",
            f"--datadir={self.datadir}", f"--socket={self.socket}",
            f"--port={self.port}", "--bind-address=127.0.0.1",
            f"--pid-file={self.pid_file}", f"--log-error={self.log_file}",
            "--innodb-buffer-pool-size=64M",
            "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci",
            # TCP clients are matched by address ('kmsd'@'127.0.0.1'), and no
            # reverse DNS lookup slows down or breaks a connection.
            "--skip-name-resolve",
        ]
        if os.geteuid() == 0:
            args.append("--user=root")
        # The parent-death signal fires when the *thread* that forked exits:
        # only a server started from the main thread gets it (start it from
        # there, not from asyncio.to_thread, to keep that guarantee).
        parent = os.getpid()
        main = threading.current_thread() is threading.main_thread()
        log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=(lambda: _die_with(parent)) if main else None,  # noqa: PLW1509 - only prctl, no locks
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                with open(self.log_file, "rb") as fh:
                    fh.seek(log_offset)
                    this_start = fh.read().decode(errors="replace")
                if "Address already in use" in this_start:
                    raise _PortTaken(this_start)
                raise RuntimeError(f"mariadbd exited ({code}) while starting:\n{self.log_tail()}")
            try:
                self._root(connect_timeout=1).close()
                return
            except pymysql.MySQLError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mariadbd not ready in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.02)

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, sig: int) -> None:
        if self.is_running():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> None:
        """Clean shutdown (SIGTERM), then wait; SIGKILL if it takes too long."""
        if self.proc is None:
            return
        self._signal(signal.SIGTERM)
        self._signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """A crash: SIGKILL, then wait for it to be gone."""
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def pause(self, timeout: float = 5) -> None:
        """A hung server: SIGSTOP. Connections are accepted by the kernel
        but never answered. Returns once every thread has stopped (a
        signal is delivered asynchronously: a thread in the middle of an
        fsync stops only after it)."""
        self._signal(signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while self.is_running() and not self._all_threads_stopped() and time.monotonic() < deadline:
            time.sleep(0.001)

    def _all_threads_stopped(self) -> bool:
        assert self.proc is not None
        try:
            tasks = list(Path(f"/proc/{self.proc.pid}/task").iterdir())
            # The state is the field after the command name, which is in parentheses.
            states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks]
        except (OSError, IndexError):
            return True  # no /proc here: nothing to wait for
        return all(state in ("T", "t") for state in states)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self, timeout: float = 30) -> None:
        self.stop()
        self.start(timeout)

    def ensure_running(self) -> None:
        """Whatever an earlier test left behind, a running server."""
        self.resume()
        if not self.is_running():
            self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no error log)"

    # -- SQL as root -------------------------------------------------------------

    def _root(self, db: str | None = None, connect_timeout: float = 10) -> pymysql.connections.Connection:
        return pymysql.connect(
            unix_socket=self.socket, user="root", password="", database=db,
            charset="utf8mb4", autocommit=True, connect_timeout=connect_timeout,
        )

    def admin(self, sql: str, params: Any = None, db: str | None = None) -> list[tuple[Any, ...]]:
        """Run one statement as root over the Unix socket; its rows."""
        conn = self._root(db)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall())
        finally:
            conn.close()

    # -- databases for kmsd --------------------------------------------------------

    def _ensure_user(self) -> None:
        if self._user_created:
            return
        for host in APP_HOSTS:
            self.admin(f"CREATE USER IF NOT EXISTS '{APP_USER}'@'{host}' IDENTIFIED BY %s", (self.password,))
        self._user_created = True

    def new_database(self, name: str | None = None, *, original_schema: bool = False) -> str:
        """A fresh database that the application user may use with exactly
        the production grants; its TCP URL. ``original_schema``: with the
        original Node.js system's two tables, empty."""
        self.ensure_running()
        name = name or f"kms_t{next(self._names)}"
        if not _NAME.match(name):
            raise ValueError(f"not a plain database name: {name!r}")
        self.admin(f"CREATE DATABASE `{name}` DEFAULT CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
        self._ensure_user()
        for host in APP_HOSTS:
            self.admin(f"GRANT {APP_GRANTS} ON `{name}`.* TO '{APP_USER}'@'{host}'")
        if original_schema:
            for statement in ORIGINAL_SCHEMA:
                self.admin(statement, db=name)
        return self.url(name)

    def url(self, name: str) -> str:
        self._port_published = True
        return f"mysql://{APP_USER}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/{name}"

    def socket_url(self, name: str) -> str:
        return (
            f"mysql://{APP_USER}:{quote(self.password, safe='')}@localhost/{name}"
            f"?unix_socket={quote(self.socket, safe='/')}"
        )
