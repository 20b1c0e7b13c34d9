"""Fault injection under load (issue 6): a real daemon, its real vault and a
real database, a dozen clients writing and reading over the Unix socket and
loopback TCP, and in the middle of it a fault: the vault killed (-9), the
MariaDB server hung (SIGSTOP), shut down or crashed, the SQLite disk full,
the daemon itself killed (-9).

Every client keeps a ledger: for each write, the status, the token and the
exact data. Afterwards every acknowledged write reads back exactly, and
every failed one is absent, or, where nobody can know its outcome (no
answer; a database that went away after the statement was sent), whole and
correct. Every failure on the way is a prompt 503 in the JSON error shape,
never a 500, a hang or a traceback.

The kill -9 of the vault and of the daemon in the middle of a master-key
rotation is in test_rotation.py
(``test_kill_9_of_vault_and_daemon_mid_rotation_loses_nothing``).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import secrets
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import aiohttp
import pytest
from conftest import Daemon, remember
from support.ci import skip_or_fail

# aiohttp's total timeout for one request; every answer must come well
# within it (BOUND), or the daemon hung.
CLIENT_TIMEOUT = 30.0
BOUND = 5.0
CLIENTS = 12
# What a client does after a 503 or a refused connection, as a real one
# would: a short pause, not a hot loop.
BACKOFF = 0.02
# A few characters of each kind: JSON escapes, multi-byte UTF-8, astral.
ALPHABET = "abcXYZ019 -_/+=.,;:!?'\"\\<>&%\t" + "éøßΩж漢字🔑\u2028"
# The checks issue tokens for the ids of failed writes: an admin's job (root
# by default; this makes the test's own user one where it is not root).
# The load creates records faster than the default creation rate allows
# (when a fault makes writes fail fast, much faster): the limit has tests of
# its own (test_review), here it would only turn faults into 429s.
ADMIN = {"KMSD_ADMIN_UIDS": str(os.getuid()), "KMSD_RECORD_CREATION_RATE": "0"}


@dataclass
class Op:
    """One request of the ledger."""

    kind: str  # "write" | "read"
    user_id: str
    data: str
    transport: str
    started: float
    ended: float = 0.0
    status: int | None = None  # None: no answer
    body: Any = None
    content_type: str = ""
    token: str | None = None
    # No answer: "connect" (never reached the daemon) or "lost" (sent,
    # then the connection broke: its outcome is unknown).
    error: str | None = None

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    def __repr__(self) -> str:
        return (f"Op({self.kind} {self.user_id} via {self.transport}: {self.status or self.error}"
                f" {self.body if self.status != 200 else ''} in {self.seconds:.2f}s)")


class Load:
    """CLIENTS concurrent clients in a thread of their own (its own event
    loop), half on the Unix socket, half on TCP, until ``stop``. Each writes
    new user ids with random data and every third request reads back one of
    its own acknowledged writes. The test's thread is free to inject faults
    (some, like starting MariaDB, must run there) without stalling them."""

    def __init__(self, daemon: Daemon, prefix: str, *, clients: int = CLIENTS) -> None:
        self.daemon = daemon
        self.prefix = prefix
        self.clients = clients
        self.writes: list[Op] = []
        self.reads: list[Op] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self.crash: BaseException | None = None

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(CLIENT_TIMEOUT + 10)
        assert not self._thread.is_alive(), "a client hung past its own timeout"
        if self.crash is not None:
            raise self.crash

    # -- what happened --------------------------------------------------------

    def count(self, status: int | None, *, after: float = 0.0) -> int:
        return sum(1 for w in list(self.writes) if w.status == status and w.started >= after)

    def wait_for(self, what: str, pred: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if self.crash is not None:
                raise self.crash
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}: {self.summary()}\n{self.daemon.logs()[-3000:]}"
                )
            time.sleep(0.01)

    def settle(self, what: str, *, after: float = 0.0, acked: int = 100, seconds: float = 1.0) -> None:
        """Until ``acked`` writes since ``after`` were acknowledged and at
        least ``seconds`` have passed since then: a stretch of normal load."""
        self.wait_for(what, lambda: self.count(200, after=after) >= acked)
        time.sleep(max(0.0, after + seconds - time.monotonic()))

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for op in list(self.writes) + list(self.reads):
            key = f"{op.kind} {op.status or op.error}"
            out[key] = out.get(key, 0) + 1
        return out

    # -- the clients ----------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.crash = exc

    async def _main(self) -> None:
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
        unix = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.daemon.socket), timeout=timeout)
        tcp = aiohttp.ClientSession(timeout=timeout)
        async with unix, tcp:
            await asyncio.gather(*(
                self._client(n, unix, "http://localhost", "unix") if n % 2 == 0
                else self._client(n, tcp, self.daemon.url, "tcp")
                for n in range(self.clients)
            ))

    async def _client(self, n: int, session: aiohttp.ClientSession, base: str, transport: str) -> None:
        rng = random.Random(n)
        acked: list[Op] = []
        i = 0
        while not self._stop.is_set():
            i += 1
            if acked and i % 3 == 0:
                written = rng.choice(acked)
                op = Op("read", written.user_id, written.data, transport, time.monotonic())
                await _request(op, session, base, "GET", token=written.token)
                self.reads.append(op)
            else:
                data = secrets.token_hex(6) + "".join(rng.choices(ALPHABET, k=rng.randrange(1, 300)))
                op = Op("write", f"{self.prefix}{n}-{i}", data, transport, time.monotonic())
                await _request(op, session, base, "POST", {"user_id": op.user_id, "data": data})
                if op.status == 200 and isinstance(op.body, dict):
                    op.token = op.body.get("access_token")
                    acked.append(op)
                    if i % 40 == 1:  # a sample for the log scan: every one would take minutes
                        remember(data, op.token or "")
                self.writes.append(op)
            if op.status != 200:
                await asyncio.sleep(BACKOFF)


async def _request(
    op: Op, session: aiohttp.ClientSession, base: str, method: str, body: Any = None, *, token: str | None = None
) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with session.request(method, base + "/api/keys", json=body, headers=headers) as resp:
            raw = await resp.read()
            op.status, op.content_type = resp.status, resp.content_type
    except aiohttp.ClientConnectorError:
        op.error = "connect"
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        op.error = "timeout" if isinstance(exc, TimeoutError) else "lost"
    else:
        try:
            op.body = json.loads(raw)
        except ValueError:
            op.body = raw
    op.ended = time.monotonic()


# -- checks -------------------------------------------------------------------------


def outcome_unknown(op: Op) -> bool:
    """A 503 that says the write may have been applied (the database went
    away after the statement was sent)."""
    return op.status == 503 and isinstance(op.body, dict) and op.body.get("outcome") == "unknown"


def check_answers(load: Load, *, no_answer: bool = False, unknown: bool = False, bound: float = BOUND) -> None:
    """Every request was answered 200, or 503 with the JSON error shape
    (``no_answer``: or not at all, the daemon was killed; ``unknown``: or a
    503 of a write whose outcome the daemon cannot know), within ``bound``."""
    bad = []
    for op in list(load.writes) + list(load.reads):
        if op.status is None:
            if not no_answer or op.error == "timeout":
                bad.append(op)
        elif op.status == 503:
            body = op.body
            fields = {"error", "code", "outcome"} if unknown and op.kind == "write" else {"error", "code"}
            if not (
                op.content_type == "application/json" and isinstance(body, dict)
                and {"error", "code"} <= set(body) <= fields and body["code"] == "unavailable"
                and isinstance(body["error"], str) and body["error"]
                and body.get("outcome", "unknown") == "unknown"
            ):
                bad.append(op)
        elif op.status != 200 or not (op.body == {"data": op.data} if op.kind == "read" else op.token):
            # A read returns exactly what was written; a write, its token.
            bad.append(op)
        if op.seconds >= bound:
            bad.append(op)
    assert not bad, f"{len(bad)} bad answers, e.g. {bad[:5]}; {load.summary()}"


def verify_ledger(
    d: Daemon, load: Load, stored: set[str], *, unknown: Callable[[Op], bool] = lambda op: False
) -> dict[str, int]:
    """Every acknowledged write reads back exactly with its own token; every
    failed one is absent, unless ``unknown(op)`` (nobody can know whether
    it landed): then absent, or present and exactly what was written.
    ``stored``: the user ids of this load in the database, which must be
    exactly the writes found present."""
    return asyncio.run(_verify(d, load, stored, unknown))


async def _verify(d: Daemon, load: Load, stored: set[str], unknown: Callable[[Op], bool]) -> dict[str, int]:
    gate = asyncio.Semaphore(32)
    bad: list[str] = []
    present: set[str] = set()
    counts = {"acknowledged": 0, "absent": 0, "unknown_absent": 0, "unknown_present": 0}
    session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=d.socket))

    async def call(method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with session.request(method, "http://localhost" + path, json=body, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def one(w: Op) -> None:
        async with gate:
            if w.status == 200:
                answer = await call("GET", "/api/keys", token=w.token)
                if answer == (200, {"data": w.data}):
                    counts["acknowledged"] += 1
                    present.add(w.user_id)
                else:
                    bad.append(f"acknowledged {w}: reads {answer[0]} {answer[1] if answer[0] != 200 else ''}")
                return
            # No token came back: an admin (root on the Unix socket) issues one.
            status, issued = await call("POST", "/issue", {"id": w.user_id})
            assert status == 200, issued
            status, body = await call("GET", "/api/keys", token=issued["token"])
            if status == 404:
                counts["unknown_absent" if unknown(w) else "absent"] += 1
            elif unknown(w) and (status, body) == (200, {"data": w.data}):
                counts["unknown_present"] += 1
                present.add(w.user_id)
            else:
                bad.append(f"failed {w}: reads {status} {body if status != 200 else '(present)'}")

    async with session:
        await asyncio.gather(*(one(w) for w in list(load.writes)))
    # Shown with a failure: what the load did, and what the check found.
    print(f"{load.summary()}; {counts}")
    assert not bad, f"{len(bad)} writes not as the ledger says, e.g. {bad[:5]}"
    assert stored == present, (
        f"in the database but not readable: {sorted(stored - present)[:5]};"
        f" readable but not in the database: {sorted(present - stored)[:5]}"
    )
    return counts


def sqlite_ids(database: str, prefix: str) -> set[str]:
    conn = sqlite3.connect(database.removeprefix("sqlite:///"))
    try:
        return {r[0] for r in conn.execute("SELECT user_id FROM kms_keys WHERE user_id LIKE ?", (prefix + "%",))}
    finally:
        conn.close()


def stored_ids(database: str, prefix: str, request: pytest.FixtureRequest) -> set[str]:
    if database.startswith("sqlite:///"):
        return sqlite_ids(database, prefix)
    server = request.getfixturevalue("mariadb")
    rows = server.admin("SELECT user_id FROM kms_keys WHERE user_id LIKE %s", (prefix + "%",),
                        db=database.rsplit("/", 1)[1])
    return {r[0] for r in rows}


# -- the vault ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "mysql"], indirect=True)
def test_vault_killed_under_load(
    backend: str, database_url: str, daemon_factory: Any, request: pytest.FixtureRequest
) -> None:
    """Four times in a row: the later kills hit a vault that has just been
    restarted (its keys loaded less than a second ago), and the restarts
    back off (a vault that keeps dying must not spin)."""
    d = daemon_factory(database=database_url, extra_env=ADMIN)
    downtimes: list[float] = []
    up: list[tuple[float, float]] = []
    with Load(d, "vk-") as load:
        load.settle("the load to start", after=time.monotonic())
        for _ in range(4):
            vault = d.vault_pid()
            killed = time.monotonic()
            os.kill(vault, signal.SIGKILL)
            d.wait_vault(not_pid=vault)
            back = time.monotonic()
            downtimes.append(back - killed)
            load.wait_for("writes after the restart", lambda back=back: load.count(200, after=back) >= 30)
            up.append((back, time.monotonic()))

    # The daemon restarts it at once; the backoff stays under 2 s.
    assert downtimes[0] < 1.5 and max(downtimes) < 3.0, f"the vault came back after {downtimes} s"
    assert load.count(503) > 0, f"the kills hit no request: {load.summary()}"
    check_answers(load)
    late = [w for w in load.writes if any(a <= w.started and w.ended <= b for a, b in up) and w.status != 200]
    assert not late, f"failures while the vault was back: {late[:5]}"
    # Every failure happened before the store was touched: nothing of a 503 is stored.
    verify_ledger(d, load, stored_ids(database_url, "vk-", request))
    assert "vault_exited" in d.logs()


# -- MariaDB --------------------------------------------------------------------------


@pytest.fixture
def mysql_daemon(mariadb: Any, daemon_factory: Any) -> Iterator[Daemon]:
    d = daemon_factory(database=mariadb.new_database(), extra_env={**ADMIN, "KMSD_DATABASE_TIMEOUT": "1"})
    try:
        yield d
    finally:
        # Whatever a test did to the shared server, leave it running.
        mariadb.ensure_running()


def _may_have_landed(op: Op) -> bool:
    # The database went away with the statement sent: the daemon cannot
    # know whether it committed, and says so. Any other 503 wrote nothing.
    return outcome_unknown(op) or op.error == "lost"


def test_mariadb_hang_under_load(mysql_daemon: Daemon, mariadb: Any, request: pytest.FixtureRequest) -> None:
    d = mysql_daemon
    pid = d.pid
    with Load(d, "mh-") as load:
        load.settle("the load to start", after=time.monotonic())
        mariadb.pause()
        paused = time.monotonic()
        try:
            load.wait_for("503s while MariaDB hangs", lambda: load.count(503, after=paused) >= 20)
            time.sleep(max(0.0, paused + 1.5 - time.monotonic()))
            status, ready = d.get("/readyz")
            assert status == 503 and ready["checks"]["store"] is False, ready
        finally:
            mariadb.resume()
        resumed = time.monotonic()
        # Recovery without restarting kmsd.
        load.settle("writes after the resume", after=resumed)
        recovered = min(w.ended for w in load.writes if w.started >= resumed and w.status == 200) - resumed

    # KMSD_DATABASE_TIMEOUT=1: a hung server is a 503 in about a second.
    check_answers(load, unknown=True, bound=3.0)
    assert recovered < 2.0, f"first write after the resume took {recovered:.2f}s"
    late = [w for w in load.writes if w.started >= resumed + 1.0 and w.status != 200]
    assert not late, f"failures after the server came back: {late[:5]}"
    # Recovered by itself: the same daemon process.
    assert d.get("/readyz")[0] == 200 and d.proc is not None and d.proc.poll() is None and d.pid == pid
    verify_ledger(d, load, stored_ids(d.database, "mh-", request), unknown=_may_have_landed)


@pytest.mark.parametrize("how", ["shutdown", "crash"])
def test_mariadb_stopped_under_load(
    how: str, mysql_daemon: Daemon, mariadb: Any, request: pytest.FixtureRequest
) -> None:
    """A clean shutdown (SIGTERM) or a crash (SIGKILL, then InnoDB recovery)
    of the server, and a start of the same datadir on the same port."""
    d = mysql_daemon
    pid = d.pid
    prefix = f"m{how[0]}-"
    with Load(d, prefix) as load:
        load.settle("the load to start", after=time.monotonic())
        if how == "shutdown":
            mariadb.stop()
        else:
            mariadb.kill()
        gone = time.monotonic()
        load.wait_for("503s while MariaDB is down", lambda: load.count(503, after=gone) >= 20)
        time.sleep(max(0.0, gone + 1.0 - time.monotonic()))
        status, ready = d.get("/readyz")
        assert status == 503 and ready["checks"]["store"] is False, ready
        restarting = time.monotonic()
        mariadb.start()
        started = time.monotonic()
        load.settle("writes after the start", after=started)
        recovered = min(w.ended for w in load.writes if w.started >= started and w.status == 200) - started

    check_answers(load, unknown=True, bound=3.0)
    # While the server is down: refused at once, not after the time budget.
    down = [w for w in load.writes if gone <= w.started and w.ended <= restarting]
    assert down and max(w.seconds for w in down) < 0.9, down[:5]
    assert recovered < 2.0, f"first write after the start took {recovered:.2f}s"
    late = [w for w in load.writes if w.started >= started + 1.0 and w.status != 200]
    assert not late, f"failures after the server came back: {late[:5]}"
    assert d.get("/readyz")[0] == 200 and d.proc is not None and d.proc.poll() is None and d.pid == pid
    verify_ledger(d, load, stored_ids(d.database, prefix, request), unknown=_may_have_landed)


# -- SQLite: the disk fills up ------------------------------------------------------------


@pytest.fixture
def small_fs(workdir: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs of its own, to fill up. Mounting needs root (CI runs
    as root). A read-only remount is refused (EBUSY) while a file on it is
    open for writing, as the database is: a full disk is the fault that
    really happens under a running daemon."""
    path = workdir / f"fs-{secrets.token_hex(3)}"
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m,mode=0755", "kmsd-test", str(path)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs for the disk-full test (needs root): {result.stderr.strip()}")
    try:
        yield path
    finally:
        # Lazy: a daemon that still has the database open lets go later.
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill(directory: Path) -> Path:
    """Take every free block of the filesystem; the file that holds them."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1):
            chunk = b"\0" * size
            try:
                while os.write(fd, chunk) == size:
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def test_sqlite_disk_full_under_load(small_fs: Path, daemon_factory: Any) -> None:
    d = daemon_factory(database=f"sqlite:///{small_fs / 'kmsd.db'}", extra_env=ADMIN)
    with Load(d, "df-") as load:
        load.settle("the load to start", after=time.monotonic(), acked=200)
        filler = fill(small_fs)
        full = time.monotonic()
        # The WAL's free frames take a few writes more; then every commit fails.
        load.wait_for("503s while the disk is full", lambda: load.count(503, after=full) >= 30)
        failing = time.monotonic()
        time.sleep(0.5)
        # Reads need no space: they go on.
        reads_while_full = [r for r in load.reads if r.started >= failing]
        filler.unlink()
        freed = time.monotonic()
        load.settle("writes after space came back", after=freed)
        recovered = min(w.ended for w in load.writes if w.started >= freed and w.status == 200) - freed

    check_answers(load)
    failed = {json.dumps(w.body) for w in load.writes if w.status == 503}
    assert failed == {'{"error": "storage unavailable", "code": "unavailable"}'}, failed
    assert reads_while_full and all(r.status == 200 for r in reads_while_full), reads_while_full[:5]
    assert recovered < 1.0, f"first write after space came back took {recovered:.2f}s"
    late = [w for w in load.writes if w.started >= freed + 0.5 and w.status != 200]
    assert not late, f"failures after space came back: {late[:5]}"
    # A failed commit is rolled back whole: a 503 left nothing behind.
    verify_ledger(d, load, sqlite_ids(d.database, "df-"))
    # The log says why (the client is told only that storage is unavailable).
    assert "database or disk is full" in d.logs(), "the log should say why writes fail"
    d.stop()
    conn = sqlite3.connect(d.database.removeprefix("sqlite:///"))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


# -- the daemon itself ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "mysql"], indirect=True)
def test_daemon_killed_under_load(
    backend: str, database_url: str, daemon_factory: Any, request: pytest.FixtureRequest
) -> None:
    d = daemon_factory(database=database_url, extra_env=ADMIN)
    with Load(d, "dk-") as load:
        load.settle("the load to start", after=time.monotonic(), acked=150)
        d.stop(signal.SIGKILL)
        killed = time.monotonic()
        load.wait_for("refused connections", lambda: load.count(None, after=killed) >= 10)
        d.start()
        back = time.monotonic()
        load.settle("writes after the restart", after=back)

    check_answers(load, no_answer=True)
    lost = [w for w in load.writes if w.error == "lost"]
    late = [w for w in load.writes if w.started >= back and w.status != 200]
    assert not late, f"failures after the restart: {late[:5]}"
    # On the same database: every acknowledged write is there. A refused
    # connection wrote nothing; a request the kill cut off is whole or absent.
    counts = verify_ledger(
        d, load, stored_ids(database_url, "dk-", request), unknown=lambda op: op.error == "lost"
    )
    assert counts["acknowledged"] >= 250, counts
    assert len(lost) <= CLIENTS, lost
