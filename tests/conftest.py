"""Fixtures that start the real daemon (with its real vault process) on a
private Unix socket, a free loopback port and a fresh database."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.ci import skip_or_fail

from devtools.mariadb_server import MariaDBServer, find_binaries

# Every plaintext, DEK and token a test hands to a daemon or gets back goes
# here (``API.call`` adds what passes through it); at the end of the session
# no daemon log (stdout and stderr) and no audit trail may contain any of them.
SECRETS: set[str] = set()
LOG_FILES: list[Path] = []
AUDIT_FILES: list[Path] = []
# Fields of request and response bodies that carry a secret.
SECRET_FIELDS = ("data", "dek", "token", "access_token")


def remember(*values: str | bytes) -> None:
    for v in values:
        if isinstance(v, bytes):
            SECRETS.add(v.hex())
        elif v:
            SECRETS.add(v)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 2.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


@dataclass
class Daemon:
    """A running ``kmsd serve`` process."""

    dir: Path
    socket: str
    port: int
    database: str
    env: dict[str, str]
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0, expect_ready: bool = True) -> None:
        self.log_path = self.dir / f"daemon-{len(list(self.dir.glob('daemon-*.log')))}.log"
        LOG_FILES.append(self.log_path)
        if self.env.get("KMSD_AUDIT_LOG"):
            AUDIT_FILES.append(Path(self.env["KMSD_AUDIT_LOG"]))
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kmsd", "serve", "--socket", self.socket,
             "--listen", f"127.0.0.1:{self.port}", "--database", self.database, *self.args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        if expect_ready:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited ({self.proc.returncode}):\n{self.logs()}")
            if self.get("/readyz")[0] == 200:
                return
            time.sleep(0.05)
        raise RuntimeError(f"daemon not ready in {timeout}s:\n{self.logs()}")

    def get(self, path: str) -> tuple[int, Any]:
        """A quick synchronous GET over the Unix socket; (0, None) if down."""
        conn = _UnixHTTPConnection(self.socket)
        try:
            conn.request("GET", path, headers={"Host": "localhost"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"null")
        except (OSError, http.client.HTTPException, ValueError):
            return 0, None
        finally:
            conn.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def vault_pid(self) -> int:
        """The vault's pid: the daemon's child, or its launcher's (a daemon
        that drops root or holds ROOT_KEY starts vaults through a launcher)."""
        vaults = [pid for pid in descendants(self.pid) if _is_vault(pid)]
        assert len(vaults) == 1, vaults
        return vaults[0]

    def launcher_pid(self) -> int | None:
        launchers = [pid for pid in descendants(self.pid) if _cmdline(pid)[3:4] == [b"kmsd.launcher"]]
        return launchers[0] if launchers else None

    def wait_vault(self, not_pid: int | None = None, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid = self.vault_pid()
                if pid != not_pid and self.get("/readyz")[0] == 200:
                    return pid
            except (AssertionError, OSError):
                pass
            time.sleep(0.02)
        raise RuntimeError("vault did not come back")

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.dir.glob("daemon-*.log")))


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop(0)
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _is_vault(pid: int) -> bool:
    # python -I -m kmsd.vault_process ...
    return _cmdline(pid)[3:4] == [b"kmsd.vault_process"]


def make_daemon(
    base: Path,
    *,
    extra_env: dict[str, str] | None = None,
    dev: bool = True,
    database: str | None = None,
) -> Daemon:
    """A daemon in ``base``; its database is ``database`` (a URL), else a
    fresh SQLite file in ``base``."""
    base.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSD_") and k != "ROOT_KEY"}
    env.update(extra_env or {})
    return Daemon(
        dir=base,
        socket=str(base / "kmsd.sock"),
        port=free_port(),
        database=database or f"sqlite:///{base / 'kmsd.db'}",
        env=env,
        args=["--dev"] if dev else [],
    )


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    # Short paths: a Unix socket path must fit in 108 bytes. World-traversable
    # so that tests which connect as another user can reach the socket.
    path = Path(tempfile.mkdtemp(prefix="kmsd-t-"))
    path.chmod(0o755)
    yield path
    if os.environ.get("KMSD_TEST_KEEP"):  # the daemons' logs, to read after a failure
        print(f"\nKMSD_TEST_KEEP: the tests' work directory is kept: {path}")
        return
    shutil.rmtree(path, ignore_errors=True)


def secret_files(workdir: Path | None = None) -> list[Path]:
    """Every daemon log, every audit trail a daemon was given (with the files
    logrotate made of it), and any other audit trail under ``workdir``."""
    files = {p for p in LOG_FILES if p.is_file()}
    for trail in AUDIT_FILES:
        files.update(p for p in trail.parent.glob(glob_escape(trail.name) + "*") if p.is_file())
    if workdir is not None:
        files.update(p for p in workdir.rglob("*audit*") if p.is_file())
    return sorted(files)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


# Fields of a JSON log or audit line that the logger or the trail fills in
# itself (times, durations, counters, pids, the chain's hashes): no secret can
# be there, and leaving them out makes most lines alike.
_FILLED_IN = ("timestamp", "time", "ms", "seq", "hash", "prev", "peer_pid", "pid")


def _distinct_content(text: str) -> str:
    """The lines of a log or audit file, each once, JSON ones decoded (so
    that escapes do not hide a secret) and without ``_FILLED_IN``: what is
    searched costs a fraction of the whole file."""
    seen = set()
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if isinstance(entry, dict):
                for key in _FILLED_IN:
                    entry.pop(key, None)
                line = json.dumps(entry, ensure_ascii=False, sort_keys=True)
        seen.add(line)
    return "\n".join(seen)


_WORD = re.compile(r"[\w.\-]+")
_ANCHOR = 8


def find_leaks(files: list[Path], secrets: set[str] | None = None) -> list[str]:
    """Which remembered secrets appear in ``files``. Short or degenerate
    ones (a DEK of zeros is the audit chain's first hash) are not looked for.

    Thousands of secrets times megabytes of logs is too slow one ``in`` at a
    time, so each secret is anchored by the last characters of its longest
    word (run of ``[\\w.-]``): a secret can only be in a file where its
    anchor is inside a word, and only those are searched for."""
    wanted = [s for s in (SECRETS if secrets is None else secrets) if len(s) >= 6 and len(set(s)) >= 4]
    anchored: dict[str, list[str]] = {}
    unanchored = []
    for secret in wanted:
        word = max(_WORD.findall(secret), key=len, default="")
        if len(word) >= _ANCHOR:
            anchored.setdefault(word[-_ANCHOR:], []).append(secret)
        else:
            unanchored.append(secret)
    leaks = []
    for path in files:
        text = _distinct_content(path.read_text(errors="replace"))
        hits = {
            word[i : i + _ANCHOR]
            for word in set(_WORD.findall(text))
            for i in range(len(word) - _ANCHOR + 1)
            if word[i : i + _ANCHOR] in anchored
        }
        candidates = [s for anchor in hits for s in anchored[anchor]] + unanchored
        leaks += [f"{path}: {s[:12]}..." for s in candidates if s in text]
    return leaks


@pytest.fixture(scope="session", autouse=True)
def no_secrets_in_logs(workdir: Path) -> Iterator[None]:
    # On workdir: its files must still be there when this runs.
    yield
    leaks = find_leaks(secret_files(workdir))
    assert not leaks, f"secrets found in daemon logs or audit trails: {leaks}"


_counter = iter(range(1_000_000))


@pytest.fixture
def daemon_factory(workdir: Path) -> Iterator[Any]:
    started: list[Daemon] = []

    def factory(
        *,
        extra_env: dict[str, str] | None = None,
        dev: bool = True,
        start: bool = True,
        database: str | None = None,
    ) -> Daemon:
        d = make_daemon(workdir / f"d{next(_counter)}", extra_env=extra_env, dev=dev, database=database)
        started.append(d)
        if start:
            d.start()
        return d

    yield factory
    for d in started:
        if d.proc is not None:
            d.stop()


@pytest.fixture(scope="module")
def shared_daemon(workdir: Path) -> Iterator[Daemon]:
    """One daemon for the tests of a module that do not restart it."""
    d = make_daemon(workdir / f"m{next(_counter)}")
    d.start()
    yield d
    d.stop()


# -- databases: SQLite, and a private MariaDB server ---------------------------------

_INSTALL_HINT = (
    "MariaDB server binaries (mariadbd, mariadb-install-db) not found: the MySQL/MariaDB "
    "tests need them (no running service, the tests start their own private server). "
    "Install them with `sudo apt-get install mariadb-server`."
)


@pytest.fixture(scope="session")
def mariadb(workdir: Path) -> Iterator[MariaDBServer]:
    """One private MariaDB server for the session, started on first use.
    Skipped loudly where the server binaries are missing, except under CI
    (``CI`` set), where that is a failure."""
    mariadbd, install_db = find_binaries()
    if not (mariadbd and install_db):
        missing = ", ".join(n for n, p in (("mariadbd", mariadbd), ("mariadb-install-db", install_db)) if not p)
        skip_or_fail(f"{_INSTALL_HINT} (missing: {missing})")
    server = MariaDBServer(workdir / "my", mariadbd=mariadbd, install_db=install_db)
    server.install()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "mysql"], ids=["sqlite", "mysql"])
def backend(request: pytest.FixtureRequest) -> str:
    """The storage backend a test runs against (parametrize it indirectly
    to pick one)."""
    return str(request.param)


@pytest.fixture
def database_url(backend: str, workdir: Path, request: pytest.FixtureRequest) -> str:
    """A fresh, empty database of ``backend``. MariaDB is started only when
    a test needs it."""
    if backend == "sqlite":
        directory = workdir / f"db{next(_counter)}"
        directory.mkdir()
        return f"sqlite:///{directory / 'kmsd.db'}"
    if backend == "mysql":
        server: MariaDBServer = request.getfixturevalue("mariadb")
        return server.new_database()
    raise ValueError(f"unknown backend {backend!r}")


class API:
    """A thin aiohttp client bound to one listener of a daemon."""

    def __init__(self, session: aiohttp.ClientSession, base: str, transport: str) -> None:
        self.session = session
        self.base = base
        self.transport = transport

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
            remember(token)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        remember_fields(body)
        async with self.session.request(method, self.base + path, data=data, headers=hdrs) as resp:
            text = await resp.read()
            try:
                answer = json.loads(text)
            except ValueError:
                return resp.status, text
            remember_fields(answer)
            return resp.status, answer

    async def store(self, user_id: str, data: str, token: str | None = None) -> str:
        remember(data)
        status, body = await self.call("POST", "/api/keys", {"user_id": user_id, "data": data}, token=token)
        assert status == 200, body
        remember(body["access_token"])
        return body["access_token"]


def remember_fields(body: Any) -> None:
    if isinstance(body, dict):
        remember(*(v for k, v in body.items() if k in SECRET_FIELDS and isinstance(v, str)))
        if isinstance(body.get("batch"), list):  # a batch request or answer: each item
            for item in body["batch"]:
                remember_fields(item)


def open_api(daemon: Daemon, transport: str) -> tuple[aiohttp.ClientSession, API]:
    if transport == "unix":
        session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=daemon.socket))
        return session, API(session, "http://localhost", "unix")
    session = aiohttp.ClientSession()
    return session, API(session, daemon.url, "tcp")


@pytest.fixture(params=["unix", "tcp"])
async def api(request: pytest.FixtureRequest, shared_daemon: Daemon) -> AsyncIterator[API]:
    session, client = open_api(shared_daemon, request.param)
    async with session:
        yield client


@pytest.fixture
async def unix_api(shared_daemon: Daemon) -> AsyncIterator[API]:
    session, client = open_api(shared_daemon, "unix")
    async with session:
        yield client


@pytest.fixture
async def tcp_api(shared_daemon: Daemon) -> AsyncIterator[API]:
    session, client = open_api(shared_daemon, "tcp")
    async with session:
        yield client


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Any]:
    """A fresh, empty store on the test's backend (the storage tests)."""
    from support.store import open_url

    s = await open_url(database_url)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def mysql_server(mariadb: MariaDBServer) -> Any:
    """The shared server, left running whatever the test did to it."""
    try:
        yield mariadb
    finally:
        mariadb.ensure_running()


# -- a Galera cluster: three MariaDB nodes on loopback ------------------------------

GALERA_PROVIDER = Path("/usr/lib/galera/libgalera_smm.so")


@pytest.fixture(scope="session")
def galera(workdir: Path) -> Iterator[Any]:
    """One private 3-node MariaDB Galera cluster for the session, started on
    first use (about 15 s) and shared by the tests that need one; each test
    leaves it as it found it (``ensure_healthy``). Skipped loudly where
    galera-4 or the server is missing, except under CI."""
    from devtools.galera_cluster import GaleraCluster

    mariadbd, install_db = find_binaries()
    if not (mariadbd and install_db and GALERA_PROVIDER.exists()):
        skip_or_fail(
            "a Galera cluster needs mariadb-server, galera-4 and rsync: `sudo apt-get install mariadb-server"
            f" galera-4 rsync` (missing: {'server' if not mariadbd else GALERA_PROVIDER})"
        )
    # Short: each node's Unix socket lives under it.
    cluster = GaleraCluster(Path(tempfile.mkdtemp(prefix="kg-", dir="/tmp")))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.base, ignore_errors=True)
