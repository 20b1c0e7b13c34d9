"""The embedded default store: SQLite in WAL mode.

Durability: a write returns only once its change is committed to disk (WAL
with ``synchronous=FULL``). Concurrent writes are group-committed: one
transaction, one fsync, for every write that arrived while the previous
commit ran. The statements it shares with MySQL live in ``store_sql``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import aiosqlite

from .errors import Conflict, KMSError, StoreError
from .store import Record, now_utc
from .store_sql import DEK_PREFIX, SQLITE, SQLStore, Statement, record_from_row

__all__ = ["SQLiteStore"]


MIGRATIONS: Sequence[str] = (
    # 1: the original schema (column names and meaning kept), plus kmsd's
    # signing keys. user_id compares exactly: SQLite's default BINARY collation.
    """
    CREATE TABLE IF NOT EXISTS master_keys (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key_id VARCHAR(64) UNIQUE NOT NULL,
        key_material TEXT NOT NULL,
        created_at DATETIME NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('active', 'retired')),
        description TEXT
    );
    CREATE UNIQUE INDEX IF NOT EXISTS master_keys_one_active
        ON master_keys (status) WHERE status = 'active';
    CREATE TABLE IF NOT EXISTS kms_keys (
        user_id VARCHAR(64) PRIMARY KEY,
        encrypted_key TEXT,
        encrypted_dek TEXT,
        created_at DATETIME
    );
    CREATE TABLE IF NOT EXISTS kmsd_signing_keys (
        kid VARCHAR(64) PRIMARY KEY,
        public_key TEXT NOT NULL,
        key_material TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('active', 'retired')),
        created_at DATETIME NOT NULL
    );
    """,
    # 2: master-key lifecycle: which key wraps each record, leases (one
    # rewrap at a time), rotation jobs.
    """
    ALTER TABLE kms_keys ADD COLUMN master_key_id VARCHAR(64);
    CREATE INDEX IF NOT EXISTS kms_keys_master_key_id ON kms_keys (master_key_id);
    CREATE TABLE IF NOT EXISTS kmsd_leases (
        name VARCHAR(64) PRIMARY KEY,
        holder VARCHAR(255) NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS kmsd_rotation_jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        state TEXT NOT NULL CHECK (state IN ('running', 'finished')),
        target_key_id VARCHAR(64) NOT NULL,
        requested_by TEXT,
        started_at DATETIME NOT NULL,
        finished_at DATETIME,
        rewrapped INTEGER NOT NULL DEFAULT 0,
        changed INTEGER NOT NULL DEFAULT 0,
        unreadable INTEGER NOT NULL DEFAULT 0,
        active_seconds REAL NOT NULL DEFAULT 0
    );
    """,
    # 3: whose record a wrapped DEK is (record_owners). A prefix is enough
    # to find it and keeps the index small.
    """
    CREATE INDEX IF NOT EXISTS kms_keys_encrypted_dek ON kms_keys (substr(encrypted_dek, 1, 32));
    """,
    # 4: whose record a wrapped DEK used to be (released_owners): a digest,
    # never the wrapped DEK itself, so a deleted record stays shredded.
    """
    CREATE TABLE IF NOT EXISTS kmsd_released_deks (
        digest BLOB PRIMARY KEY,
        user_id VARCHAR(64) NOT NULL
    );
    """,
    # 5: tokens tied to a record (a generation that a delete and a new
    # record change, and a revoke-all) and revoked one by one.
    """
    CREATE TABLE IF NOT EXISTS kmsd_subjects (
        user_id VARCHAR(64) PRIMARY KEY,
        generation VARCHAR(32) NOT NULL
    );
    CREATE TABLE IF NOT EXISTS kmsd_revoked_tokens (
        token_id VARCHAR(64) PRIMARY KEY,
        expires_at INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS kmsd_revoked_tokens_expires_at ON kmsd_revoked_tokens (expires_at);
    """,
    # 6: at most one active signing key, as for master keys (a database
    # that has two keeps the newest active; the others still verify).
    """
    UPDATE kmsd_signing_keys SET status = 'retired' WHERE status = 'active' AND kid <> (
        SELECT kid FROM kmsd_signing_keys WHERE status = 'active' ORDER BY created_at DESC, kid DESC LIMIT 1);
    CREATE UNIQUE INDEX IF NOT EXISTS kmsd_signing_keys_one_active
        ON kmsd_signing_keys (status) WHERE status = 'active';
    """,
    # 7: scheduled key deletion. A table of its own, not a third status in
    # master_keys: the original system reads that column and knows only
    # 'active' and 'retired'. delete_after is Unix time.
    """
    CREATE TABLE IF NOT EXISTS kmsd_key_deletions (
        key_id VARCHAR(64) PRIMARY KEY,
        delete_after REAL NOT NULL,
        requested_by TEXT,
        scheduled_at DATETIME NOT NULL
    );
    """,
)

_WriteOp = Callable[[sqlite3.Connection], Any]

# Errors that mean "the database is not usable right now", as opposed to a
# constraint the caller violated.
_SQLITE_DOWN = (sqlite3.OperationalError, sqlite3.DatabaseError, sqlite3.ProgrammingError, ValueError)



class SQLiteStore(SQLStore):
    """SQLite in WAL mode. One writer connection with group commit, a few
    reader connections that read in parallel with it."""

    dialect = SQLITE

    def __init__(self, path: str, *, readers: int = 2, max_batch: int = 256) -> None:
        self.path = path
        self._n_readers = readers
        self._max_batch = max_batch
        self._writer: aiosqlite.Connection | None = None
        self._readers: list[aiosqlite.Connection] = []
        self._reader_cycle: itertools.cycle[aiosqlite.Connection] | None = None
        self._queue: asyncio.Queue[tuple[_WriteOp, bool, asyncio.Future[Any]]] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        self._point: sqlite3.Connection | None = None
        self._wconn: sqlite3.Connection | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._inflight: list[tuple[_WriteOp, bool, asyncio.Future[Any]]] = []
        self.warnings: list[str] = []
        self.server = "sqlite"  # not the path: /readyz answers anyone on loopback
        self.failovers = 0
        self.max_write_batch: int | None = None

    async def open(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        try:
            self._writer = await self._connect()
            await self._writer.execute("PRAGMA journal_mode=WAL")
            await self._migrate(self._writer)
            for _ in range(self._n_readers):
                self._readers.append(await self._connect())
            # Group commits run in one thread of their own, on a plain
            # connection: a batch is one hop there and back, not one per op.
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
            self._wconn = await asyncio.get_running_loop().run_in_executor(self._executor, self._connect_writer)
        except _SQLITE_DOWN as exc:
            await self.close()
            raise StoreError(f"cannot open SQLite database: {type(exc).__name__}") from exc
        self._reader_cycle = itertools.cycle(self._readers)
        self._writer_task = asyncio.create_task(self._write_loop(), name="sqlite-writer")
        try:
            self._point = self._connect_point_reader()
        except _SQLITE_DOWN:
            self._point = None

    def _connect_writer(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # FULL: with WAL, a commit is on disk (fsync of the WAL) before it returns.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _connect_point_reader(self) -> sqlite3.Connection:
        """A plain connection for single-row reads on the event loop itself:
        an indexed lookup in WAL mode takes microseconds and never waits for
        the writer, while a hop to a driver thread and back costs more than
        the lookup. It never waits for a lock either (busy_timeout 0): then
        the read goes the threaded way."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=0")
        conn.execute("PRAGMA query_only=1")
        return conn

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        # FULL: with WAL, a commit is on disk (fsync of the WAL) before it returns.
        await conn.execute("PRAGMA synchronous=FULL")
        await conn.execute("PRAGMA busy_timeout=5000")
        return conn

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS kmsd_schema_migrations ("
            " version INTEGER PRIMARY KEY, applied_at DATETIME NOT NULL)"
        )
        rows = await conn.execute_fetchall("SELECT version FROM kmsd_schema_migrations")
        done = {r[0] for r in rows}
        for version, script in enumerate(MIGRATIONS, start=1):
            if version in done:
                continue
            await conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in filter(str.strip, script.split(";")):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO kmsd_schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, now_utc()),
                )
                await conn.execute("COMMIT")
            except BaseException:
                await conn.execute("ROLLBACK")
                raise

    async def close(self) -> None:
        if self._writer_task:
            self._writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
            self._writer_task = None
        if self._executor is not None:
            # Let a commit in progress finish first.
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
            self._executor = None
        if self._wconn is not None:
            self._wconn.close()
            self._wconn = None
        for _, _, fut in self._inflight:
            if not fut.done():
                fut.set_exception(StoreError())
        self._inflight = []
        while not self._queue.empty():
            _, _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(StoreError())
        for conn in [*self._readers, *([self._writer] if self._writer else [])]:
            with contextlib.suppress(Exception):
                await conn.close()
        self._readers, self._writer = [], None
        if self._point is not None:
            self._point.close()
            self._point = None

    # -- reads ---------------------------------------------------------------

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        if self._reader_cycle is None:
            raise StoreError()
        try:
            return list(await next(self._reader_cycle).execute_fetchall(sql, params))
        except _SQLITE_DOWN as exc:
            raise StoreError() from exc

    async def ping(self) -> None:
        await self._read("SELECT 1")

    async def check_access(self) -> None:
        # The daemon handed its files to its user before dropping.
        for path in (self.path + suffix for suffix in ("", "-wal", "-shm")):
            if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
                raise StoreError(f"the daemon's user cannot read and write {path}")

    def _point_read(self, sql: str, params: Sequence[Any]) -> Any:
        """One row on the event loop itself (see ``_connect_point_reader``),
        or ``None`` when that connection is busy (a checkpoint, a recovery)."""
        if self._point is not None:
            with contextlib.suppress(sqlite3.OperationalError):
                return self._point.execute(sql, params).fetchone() or ()
        return None

    async def get_record(self, user_id: str) -> Record | None:
        sql = self._select_records(1)
        row = self._point_read(sql, (user_id,))
        if row is None:
            rows = await self._read(sql, (user_id,))
            row = rows[0] if rows else ()
        return record_from_row(row) if row else None

    async def record_owners(self, encrypted_dek: str) -> list[str]:
        # The prefix alone, so that the planner takes the index (with the
        # full comparison beside it, SQLite 3.40 scans the table).
        rows = await self._read(
            f"SELECT user_id, encrypted_dek FROM kms_keys WHERE substr(encrypted_dek, 1, {DEK_PREFIX}) = ?",
            (encrypted_dek[:DEK_PREFIX],),
        )
        return [user_id for user_id, text in rows if text == encrypted_dek]

    async def token_state(self, user_id: str, token_id: str) -> tuple[str, bool]:
        sql = (
            "SELECT COALESCE((SELECT generation FROM kmsd_subjects WHERE user_id = ?), ''),"
            " EXISTS (SELECT 1 FROM kmsd_revoked_tokens WHERE token_id = ?)"
        )
        row = self._point_read(sql, (user_id, token_id))
        if not row:
            row = (await self._read(sql, (user_id, token_id)))[0]
        return str(row[0]), bool(row[1])

    # -- writes (group commit) -------------------------------------------------

    async def _submit(self, op: _WriteOp, *, multi: bool = False) -> Any:
        """Queue ``op`` for the next group commit and wait until it is on disk.
        ``multi`` ops run under a savepoint so a failure undoes all of them."""
        if self._writer_task is None or self._writer_task.done():
            raise StoreError()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, multi, fut))
        return await asyncio.shield(fut)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._inflight = batch
            try:
                # The whole batch in one trip to the writer thread: BEGIN,
                # every op, COMMIT (one fsync).
                ops = [(op, multi) for op, multi, _ in batch]
                results = await loop.run_in_executor(self._executor, self._commit, ops)
            except _SQLITE_DOWN as exc:
                error = StoreError()
                error.__cause__ = exc
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(error)
                continue
            finally:
                self._inflight = []
            for (_, _, fut), (ok, value) in zip(batch, results, strict=False):
                if fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

    def _commit(self, batch: list[tuple[_WriteOp, bool]]) -> list[tuple[bool, Any]]:
        """In the writer thread: one transaction for the batch."""
        conn = self._wconn
        if conn is None:
            raise sqlite3.ProgrammingError("store closed")
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = [self._run_op(conn, op, multi) for op, multi in batch]
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            raise
        return results

    @staticmethod
    def _run_op(conn: sqlite3.Connection, op: _WriteOp, multi: bool) -> tuple[bool, Any]:
        if multi:
            conn.execute("SAVEPOINT op")
        try:
            value = op(conn)
        except (sqlite3.IntegrityError, KMSError) as exc:
            if multi:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
            return False, exc if isinstance(exc, KMSError) else Conflict()
        if multi:
            conn.execute("RELEASE op")
        return True, value

    async def _write(self, *statements: Statement) -> int:
        def op(conn: sqlite3.Connection) -> int:
            count = 0
            for sql, params in statements:
                count = conn.execute(sql, params).rowcount
            return count

        return int(await self._submit(op, multi=len(statements) > 1))

    async def _write_then(self, first: Statement, then: Sequence[Statement]) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            if conn.execute(*first).rowcount <= 0:
                return False
            for sql, params in then:
                conn.execute(sql, params)
            return True

        return bool(await self._submit(op, multi=True))

    async def _write_each_once(self, statements: Sequence[Statement]) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            for sql, params in statements:
                if conn.execute(sql, params).rowcount != 1:
                    # Undoes every statement of this op (the savepoint of ``multi``).
                    raise Conflict("a row changed meanwhile")
            return True

        try:
            return bool(await self._submit(op, multi=True))
        except Conflict:
            return False

    async def _insert_id(self, sql: str, params: Sequence[Any]) -> int:
        return int(await self._submit(lambda conn: conn.execute(sql, params).lastrowid or 0))

    async def insert_record(self, record: Record, *, generation: str | None = None) -> None:
        statements = [self._insert_statement([record])]
        if generation is not None:
            statements.append(self._set_generations([(record.user_id, generation)]))
        await self._write(*statements)

    async def rewrap_records(self, changes: Sequence[tuple[Record, str, str]]) -> int:
        same = f"{self.dialect.exact('encrypted_key')} AND {self.dialect.exact('encrypted_dek')}"

        def op(conn: sqlite3.Connection) -> int:
            # One call into the driver's thread for the whole batch; rowcount
            # of executemany is the sum over its rows.
            cur = conn.executemany(
                f"UPDATE kms_keys SET encrypted_dek = ?, master_key_id = ? WHERE user_id = ? AND {same}",
                [(dek, key_id, old.user_id, old.encrypted_key, old.encrypted_dek) for old, dek, key_id in changes],
            )
            return int(cur.rowcount)

        return int(await self._submit(op, multi=True))

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        return await self._write(self._create_lease(name), self._take_lease(name, holder, ttl)) > 0
