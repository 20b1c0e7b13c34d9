"""Storage: one interface, and its embedded default on SQLite.

The schema is the original system's (``master_keys``, ``kms_keys``, same
column names and meaning) plus additive tables and columns, applied by
numbered migrations recorded in ``kmsd_schema_migrations``.

Durability rule: a write method returns only once its change is committed
to disk (SQLite: WAL with ``synchronous=FULL``). Concurrent writes are
group-committed: one transaction, one fsync, for every write that arrived
while the previous commit ran.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import itertools
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiosqlite

from .config import DatabaseURL
from .errors import Conflict, KMSError, StoreError, Unavailable

__all__ = [
    "MasterKeyRow",
    "Record",
    "RotationJob",
    "SigningKeyRow",
    "SQLiteStore",
    "Store",
    "StoreError",
    "now_utc",
    "open_store",
]

def now_utc() -> str:
    """DATETIME text, as the original stored it (UTC, second precision)."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True, repr=False)
class Record:
    """A ``kms_keys`` row: encrypted data and its wrapped DEK (base64 text)."""

    user_id: str
    # NULL is possible in a database the original system wrote.
    encrypted_key: str | None
    encrypted_dek: str | None
    created_at: str | None
    # kmsd's additive column: the master key that wraps ``encrypted_dek``,
    # so that rotation and ``kmsd mk list`` can count by key without
    # decrypting. NULL for rows kmsd has not classified yet (written by the
    # original system, or before the column existed).
    master_key_id: str | None = None

    def __repr__(self) -> str:
        return f"Record(user_id={self.user_id!r}, created_at={self.created_at!r})"


@dataclass(frozen=True, repr=False)
class MasterKeyRow:
    key_id: str
    key_material: str  # wrapped under the root key; never the plaintext key
    status: str  # 'active' | 'retired'
    created_at: str
    description: str | None = None

    def __repr__(self) -> str:
        return f"MasterKeyRow(key_id={self.key_id!r}, status={self.status!r})"


@dataclass(frozen=True, repr=False)
class SigningKeyRow:
    kid: str
    public_key: str  # base64 raw Ed25519 public key
    key_material: str  # wrapped private key
    status: str
    created_at: str

    def __repr__(self) -> str:
        return f"SigningKeyRow(kid={self.kid!r}, status={self.status!r})"


@dataclass(frozen=True)
class RotationJob:
    """A ``kmsd_rotation_jobs`` row: one rotation and its rewrap. The work
    left is never stored here: it is the records still under retired keys."""

    id: int
    state: str  # 'running' | 'finished'
    target_key_id: str
    requested_by: str | None
    started_at: str
    finished_at: str | None = None
    rewrapped: int = 0
    changed: int = 0  # replaced by a client meanwhile: left to that write
    unreadable: int = 0
    # Seconds spent rewrapping (not waiting): rewrapped / active_seconds is the rate.
    active_seconds: float = 0.0


class Store(Protocol):
    """What kmsd needs from a database.

    Every method raises ``StoreError`` (HTTP 503) when the database cannot
    be reached or fails; the methods that say so raise ``Conflict``.
    Write methods return only after the change is durable.
    """

    # What the operator should know after ``open`` (a server set up so that
    # commits are not durable, say); the daemon logs them.
    warnings: list[str]

    async def open(self) -> None:
        """Connect and apply pending migrations."""

    async def close(self) -> None: ...

    async def check_access(self) -> None:
        """Raise ``StoreError``, with a reason for the operator, unless this
        process can open the database afresh as the user it is now (called
        once after the privilege drop: the pool will open new connections)."""

    async def ping(self) -> None:
        """Raise ``StoreError`` unless the database answers."""

    async def get_record(self, user_id: str) -> Record | None:
        """The row whose ``user_id`` is exactly this one (binary comparison)."""

    async def insert_record(self, record: Record, *, generation: str | None = None) -> None:
        """Insert a new row; ``Conflict`` if the user id exists.
        ``generation``: in the same transaction, make it the user's token
        generation (``token_state``)."""

    async def upsert_record(self, record: Record) -> None:
        """Insert, or replace the existing row's ciphertexts atomically."""

    async def delete_record(
        self,
        user_id: str,
        *,
        only_if: Record | None = None,
        release: bytes | None = None,
        expect_generation: str | None = None,
        generation: str | None = None,
    ) -> bool:
        """Delete the row; False when there was none. ``only_if``: only while
        its ciphertexts are still exactly that record's (compare-and-set).
        ``release``: in the same transaction, remember this digest of the
        row's wrapped DEK as the user's (``released_owners``).
        ``expect_generation``: only while the user's token generation is
        still this one; ``generation``: make it the new one, in the same
        transaction."""

    async def replace_record(
        self, old: Record, new: Record, *, release: bytes | None = None, expect_generation: str | None = None
    ) -> bool:
        """Compare-and-set: replace the row of ``old.user_id`` with ``new``
        only if its ciphertexts are still exactly ``old``'s (and, with
        ``expect_generation``, the user's token generation still that one).
        False (and no change) otherwise. ``release``: as for
        ``delete_record``, when the row is replaced."""

    async def token_state(self, user_id: str, token_id: str) -> tuple[str, bool]:
        """The user's token generation ("" while none was ever set) and
        whether ``token_id`` was revoked: one read, made for every token use."""

    async def set_generation(self, user_id: str, generation: str) -> None:
        """Make ``generation`` the user's: every token of an older one is void."""

    async def revoke_token(self, token_id: str, expires_at: int) -> None:
        """Remember ``token_id`` as revoked until ``expires_at`` (Unix time,
        the token's own exp), and forget revocations whose token expired."""

    async def record_owners(self, encrypted_dek: str) -> list[str]:
        """The user ids of the rows whose ``encrypted_dek`` is exactly this
        text (an index lookup): whose stored record a wrapped DEK is."""

    async def released_owners(self, digest: bytes) -> list[str]:
        """Whose record a wrapped DEK was, by a digest given to ``release``
        when that record was replaced or deleted."""

    async def count_records(self) -> int: ...

    async def scan_records(self, after: str | None, limit: int) -> list[Record]:
        """Up to ``limit`` rows whose user id sorts after ``after`` (binary
        order), in that order: a resumable walk over every row."""

    async def count_records_by_key(self) -> dict[str | None, int]:
        """How many records each master key wraps; None: not classified."""

    async def scan_records_to_rewrap(self, active_key_id: str, after: str | None, limit: int) -> list[Record]:
        """Like ``scan_records``, but only rows not known to be under
        ``active_key_id`` (other keys, and unclassified rows)."""

    async def rewrap_records(self, changes: Sequence[tuple[Record, str, str]]) -> int:
        """For each ``(old, encrypted_dek, master_key_id)``: set the row's
        wrapped DEK and key id, compare-and-set on ``old``'s ciphertexts, all
        in one transaction. How many rows matched."""

    async def list_master_keys(self) -> list[MasterKeyRow]:
        """All master keys, oldest first."""

    async def add_master_key(self, row: MasterKeyRow) -> None:
        """Insert ``row`` as the active key and retire every other one, in
        one transaction. ``Conflict`` if the key id exists."""

    async def replace_master_key_material(self, key_id: str, old: str, new: str) -> bool:
        """Compare-and-set of one master key's wrapped material."""

    async def replace_key_materials(
        self, master: Sequence[tuple[str, str, str]], signing: Sequence[tuple[str, str, str]]
    ) -> bool:
        """Compare-and-set of many ``(id, old, new)`` wrapped key materials
        (master keys, signing keys) in one transaction: all or nothing.
        False, and no change, if any of them changed meanwhile."""

    async def delete_master_key(self, key_id: str) -> bool:
        """Delete a retired master key, only if no record is under it and
        none is unclassified (checked in the same statement)."""

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Take or renew the lease ``name`` for ``ttl`` seconds of the
        database's clock; False while another holder's lease runs."""

    async def release_lease(self, name: str, holder: str) -> None: ...

    async def get_lease(self, name: str) -> tuple[str, float] | None:
        """(holder, seconds left) of a running lease, else None."""

    async def start_rotation_job(self, target_key_id: str, requested_by: str | None) -> RotationJob: ...

    async def update_rotation_job(self, job: RotationJob) -> None:
        """Write the job's state, finished time and counters."""

    async def latest_rotation_job(self) -> RotationJob | None: ...

    async def list_signing_keys(self) -> list[SigningKeyRow]: ...

    async def add_signing_key(self, row: SigningKeyRow) -> None:
        """Insert as the active signing key, retiring the others."""


def open_store(database: DatabaseURL, *, pool_size: int = 10, timeout: float = 3.0) -> Store:
    """The store for a parsed database URL (not yet opened)."""
    if database.scheme == "sqlite":
        return SQLiteStore(database.path)
    # Imported here so that an SQLite deployment never loads the MySQL driver.
    from .store_mysql import MySQLStore

    return MySQLStore(database, pool_size=pool_size, timeout=timeout)


# -- SQLite ----------------------------------------------------------------------

_SQLITE_MIGRATIONS: Sequence[str] = (
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
)
# The indexed prefix of kms_keys.encrypted_dek (both backends).
DEK_PREFIX = 32
# Seconds a revocation outlives its token's exp: the daemons' clocks and
# the database's may disagree by that much.
REVOCATION_MARGIN = 300

_RECORD_COLUMNS = "user_id, encrypted_key, encrypted_dek, created_at, master_key_id"
_JOB_COLUMNS = (
    "id, state, target_key_id, requested_by, started_at, finished_at, rewrapped, changed, unreadable, active_seconds"
)
# Seconds since the epoch by SQLite's clock (julianday works on every version).
_SQLITE_NOW = "((julianday('now') - 2440587.5) * 86400.0)"

_WriteOp = Callable[[sqlite3.Connection], Any]

# Errors that mean "the database is not usable right now", as opposed to a
# constraint the caller violated.
_SQLITE_DOWN = (sqlite3.OperationalError, sqlite3.DatabaseError, sqlite3.ProgrammingError, ValueError)


def _released(
    conn: sqlite3.Connection, changed: bool, release: bytes | None, user_id: str, generation: str | None = None
) -> bool:
    """After a row changed: remember ``release`` as ``user_id``'s and set
    its token generation (the same transaction). ``changed`` passes through."""
    if changed and release is not None:
        conn.execute("INSERT OR IGNORE INTO kmsd_released_deks (digest, user_id) VALUES (?, ?)", (release, user_id))
    if changed and generation is not None:
        _set_generation(conn, user_id, generation)
    return changed


def _set_generation(conn: sqlite3.Connection, user_id: str, generation: str) -> None:
    conn.execute(
        "INSERT INTO kmsd_subjects (user_id, generation) VALUES (?, ?)"
        " ON CONFLICT (user_id) DO UPDATE SET generation = excluded.generation",
        (user_id, generation),
    )


# A condition on the row's user: its token generation is still this one
# (parameters: user_id, generation).
_SAME_GENERATION = "COALESCE((SELECT generation FROM kmsd_subjects WHERE user_id = ?), '') = ?"


class SQLiteStore:
    """SQLite in WAL mode. One writer connection with group commit, a few
    reader connections that read in parallel with it."""

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
        for version, script in enumerate(_SQLITE_MIGRATIONS, start=1):
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

    async def get_record(self, user_id: str) -> Record | None:
        sql = f"SELECT {_RECORD_COLUMNS} FROM kms_keys WHERE user_id = ?"
        if self._point is not None:
            try:
                row = self._point.execute(sql, (user_id,)).fetchone()
                return Record(*row) if row else None
            except sqlite3.OperationalError:
                pass  # busy (a checkpoint, a recovery): the threaded reader waits
        rows = await self._read(sql, (user_id,))
        return Record(*rows[0]) if rows else None

    async def record_owners(self, encrypted_dek: str) -> list[str]:
        # The prefix alone, so that the planner takes the index (with the
        # full comparison beside it, SQLite 3.40 scans the table).
        rows = await self._read(
            f"SELECT user_id, encrypted_dek FROM kms_keys WHERE substr(encrypted_dek, 1, {DEK_PREFIX}) = ?",
            (encrypted_dek[:DEK_PREFIX],),
        )
        return [user_id for user_id, text in rows if text == encrypted_dek]

    async def count_records(self) -> int:
        rows = await self._read("SELECT COUNT(*) FROM kms_keys")
        return int(rows[0][0])

    async def scan_records(self, after: str | None, limit: int) -> list[Record]:
        # '' sorts before every user id, and user ids are never empty.
        rows = await self._read(
            f"SELECT {_RECORD_COLUMNS} FROM kms_keys WHERE user_id > ? ORDER BY user_id LIMIT ?",
            (after or "", limit),
        )
        return [Record(*r) for r in rows]

    async def count_records_by_key(self) -> dict[str | None, int]:
        rows = await self._read("SELECT master_key_id, COUNT(*) FROM kms_keys GROUP BY master_key_id")
        return {r[0]: int(r[1]) for r in rows}

    async def scan_records_to_rewrap(self, active_key_id: str, after: str | None, limit: int) -> list[Record]:
        rows = await self._read(
            f"SELECT {_RECORD_COLUMNS} FROM kms_keys WHERE user_id > ?"
            " AND (master_key_id IS NULL OR master_key_id != ?) ORDER BY user_id LIMIT ?",
            (after or "", active_key_id, limit),
        )
        return [Record(*r) for r in rows]

    async def get_lease(self, name: str) -> tuple[str, float] | None:
        rows = await self._read(
            f"SELECT holder, expires_at - {_SQLITE_NOW} FROM kmsd_leases WHERE name = ?", (name,)
        )
        if rows and rows[0][0] and rows[0][1] > 0:
            return str(rows[0][0]), float(rows[0][1])
        return None

    async def latest_rotation_job(self) -> RotationJob | None:
        rows = await self._read(f"SELECT {_JOB_COLUMNS} FROM kmsd_rotation_jobs ORDER BY id DESC LIMIT 1")
        return RotationJob(*rows[0]) if rows else None

    async def list_master_keys(self) -> list[MasterKeyRow]:
        rows = await self._read(
            "SELECT key_id, key_material, status, created_at, description FROM master_keys ORDER BY id"
        )
        return [MasterKeyRow(*r) for r in rows]

    async def list_signing_keys(self) -> list[SigningKeyRow]:
        rows = await self._read(
            "SELECT kid, public_key, key_material, status, created_at FROM kmsd_signing_keys"
            " ORDER BY created_at, kid"
        )
        return [SigningKeyRow(*r) for r in rows]

    # -- writes (group commit) -------------------------------------------------

    async def _write(self, op: _WriteOp, *, multi: bool = False) -> Any:
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
            for (_, _, fut), (ok, value) in zip(batch, results):
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

    async def insert_record(self, record: Record, *, generation: str | None = None) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO kms_keys ({_RECORD_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (record.user_id, record.encrypted_key, record.encrypted_dek, record.created_at,
                 record.master_key_id),
            )
            if generation is not None:
                _set_generation(conn, record.user_id, generation)

        await self._write(op, multi=generation is not None)

    async def upsert_record(self, record: Record) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO kms_keys ({_RECORD_COLUMNS}) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (user_id) DO UPDATE SET"
                " encrypted_key = excluded.encrypted_key, encrypted_dek = excluded.encrypted_dek,"
                " created_at = excluded.created_at, master_key_id = excluded.master_key_id",
                (record.user_id, record.encrypted_key, record.encrypted_dek, record.created_at,
                 record.master_key_id),
            )

        await self._write(op)

    async def delete_record(
        self,
        user_id: str,
        *,
        only_if: Record | None = None,
        release: bytes | None = None,
        expect_generation: str | None = None,
        generation: str | None = None,
    ) -> bool:
        sql, params = "DELETE FROM kms_keys WHERE user_id = ?", [user_id]
        if only_if is not None:
            sql += " AND encrypted_key IS ? AND encrypted_dek IS ?"
            params += [only_if.encrypted_key, only_if.encrypted_dek]
        if expect_generation is not None:
            sql += f" AND {_SAME_GENERATION}"
            params += [user_id, expect_generation]

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(sql, params)
            return _released(conn, cur.rowcount > 0, release, user_id, generation)

        return bool(await self._write(op, multi=generation is not None))

    async def replace_record(
        self, old: Record, new: Record, *, release: bytes | None = None, expect_generation: str | None = None
    ) -> bool:
        sql = (
            "UPDATE kms_keys SET encrypted_key = ?, encrypted_dek = ?, created_at = ?, master_key_id = ?"
            " WHERE user_id = ? AND encrypted_key IS ? AND encrypted_dek IS ?"
        )
        params = [new.encrypted_key, new.encrypted_dek, new.created_at, new.master_key_id,
                  old.user_id, old.encrypted_key, old.encrypted_dek]
        if expect_generation is not None:
            sql += f" AND {_SAME_GENERATION}"
            params += [old.user_id, expect_generation]

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(sql, params)
            return _released(conn, cur.rowcount > 0, release, old.user_id)

        return bool(await self._write(op))

    async def token_state(self, user_id: str, token_id: str) -> tuple[str, bool]:
        sql = (
            "SELECT COALESCE((SELECT generation FROM kmsd_subjects WHERE user_id = ?), ''),"
            " EXISTS (SELECT 1 FROM kmsd_revoked_tokens WHERE token_id = ?)"
        )
        row = None
        if self._point is not None:
            try:
                row = self._point.execute(sql, (user_id, token_id)).fetchone()
            except sqlite3.OperationalError:
                pass  # busy: the threaded reader waits
        if row is None:
            row = (await self._read(sql, (user_id, token_id)))[0]
        return str(row[0]), bool(row[1])

    async def set_generation(self, user_id: str, generation: str) -> None:
        await self._write(lambda conn: _set_generation(conn, user_id, generation))

    async def revoke_token(self, token_id: str, expires_at: int) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO kmsd_revoked_tokens (token_id, expires_at) VALUES (?, ?)",
                (token_id, expires_at),
            )
            conn.execute(f"DELETE FROM kmsd_revoked_tokens WHERE expires_at < {_SQLITE_NOW} - {REVOCATION_MARGIN}")

        await self._write(op, multi=True)

    async def released_owners(self, digest: bytes) -> list[str]:
        rows = await self._read("SELECT user_id FROM kmsd_released_deks WHERE digest = ?", (digest,))
        return [r[0] for r in rows]

    async def rewrap_records(self, changes: Sequence[tuple[Record, str, str]]) -> int:
        def op(conn: sqlite3.Connection) -> int:
            # One call into the driver's thread for the whole batch; rowcount
            # of executemany is the sum over its rows.
            cur = conn.executemany(
                "UPDATE kms_keys SET encrypted_dek = ?, master_key_id = ?"
                " WHERE user_id = ? AND encrypted_key IS ? AND encrypted_dek IS ?",
                [(dek, key_id, old.user_id, old.encrypted_key, old.encrypted_dek) for old, dek, key_id in changes],
            )
            return int(cur.rowcount)

        return int(await self._write(op, multi=True))

    async def replace_key_materials(
        self, master: Sequence[tuple[str, str, str]], signing: Sequence[tuple[str, str, str]]
    ) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            for table, column, rows in (("master_keys", "key_id", master), ("kmsd_signing_keys", "kid", signing)):
                for key, old, new in rows:
                    cur = conn.execute(
                        f"UPDATE {table} SET key_material = ? WHERE {column} = ? AND key_material = ?",
                        (new, key, old),
                    )
                    if cur.rowcount != 1:
                        # Undo every update of this op (the savepoint of ``multi``).
                        raise Conflict("a key changed during the root-key rotation")
            return True

        try:
            return bool(await self._write(op, multi=True))
        except Conflict:
            return False

    async def delete_master_key(self, key_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "DELETE FROM master_keys WHERE key_id = ? AND status = 'retired'"
                " AND NOT EXISTS (SELECT 1 FROM kms_keys WHERE master_key_id = ? OR master_key_id IS NULL)",
                (key_id, key_id),
            )
            return cur.rowcount > 0

        return bool(await self._write(op))

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            conn.execute(
                "INSERT OR IGNORE INTO kmsd_leases (name, holder, expires_at) VALUES (?, '', 0)", (name,)
            )
            cur = conn.execute(
                f"UPDATE kmsd_leases SET holder = ?, expires_at = {_SQLITE_NOW} + ?"
                f" WHERE name = ? AND (holder = ? OR holder = '' OR expires_at < {_SQLITE_NOW})",
                (holder, ttl, name, holder),
            )
            return cur.rowcount > 0

        return bool(await self._write(op, multi=True))

    async def release_lease(self, name: str, holder: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE kmsd_leases SET holder = '', expires_at = 0 WHERE name = ? AND holder = ?", (name, holder)
            )

        await self._write(op)

    async def start_rotation_job(self, target_key_id: str, requested_by: str | None) -> RotationJob:
        started = now_utc()

        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO kmsd_rotation_jobs (state, target_key_id, requested_by, started_at)"
                " VALUES ('running', ?, ?, ?)",
                (target_key_id, requested_by, started),
            )
            return int(cur.lastrowid or 0)

        job_id = await self._write(op)
        return RotationJob(job_id, "running", target_key_id, requested_by, started)

    async def update_rotation_job(self, job: RotationJob) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE kmsd_rotation_jobs SET state = ?, finished_at = ?, rewrapped = ?, changed = ?,"
                " unreadable = ?, active_seconds = ? WHERE id = ?",
                (job.state, job.finished_at, job.rewrapped, job.changed, job.unreadable, job.active_seconds, job.id),
            )

        await self._write(op)

    async def replace_master_key_material(self, key_id: str, old: str, new: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE master_keys SET key_material = ? WHERE key_id = ? AND key_material = ?",
                (new, key_id, old),
            )
            return cur.rowcount > 0

        return bool(await self._write(op))

    async def add_master_key(self, row: MasterKeyRow) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE master_keys SET status = 'retired' WHERE status = 'active'")
            conn.execute(
                "INSERT INTO master_keys (key_id, key_material, created_at, status, description)"
                " VALUES (?, ?, ?, 'active', ?)",
                (row.key_id, row.key_material, row.created_at, row.description),
            )

        await self._write(op, multi=True)

    async def add_signing_key(self, row: SigningKeyRow) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE kmsd_signing_keys SET status = 'retired' WHERE status = 'active'")
            conn.execute(
                "INSERT INTO kmsd_signing_keys (kid, public_key, key_material, status, created_at)"
                " VALUES (?, ?, ?, 'active', ?)",
                (row.kid, row.public_key, row.key_material, row.created_at),
            )

        await self._write(op, multi=True)
