"""The production store: MySQL/MariaDB through an aiomysql connection pool.

Works on a database the original system wrote: its tables and columns stay
as they are, kmsd only adds tables and switches ``kms_keys.user_id`` to a
binary, no-pad collation so that user ids compare exactly (the original's
``utf8mb4_general_ci`` made ``SMOKE1`` and ``smoke1 `` one user).

Durability: every write is an explicit transaction and returns after COMMIT;
with InnoDB's default ``innodb_flush_log_at_trx_commit=1`` that is on disk
(``open`` reports a server configured otherwise in ``warnings``).

Failures: every call has one time budget (``timeout``); an unreachable or
hung server is ``StoreError`` (HTTP 503) within it, never a hang. A call is
retried on a fresh connection only when nothing can have been committed: a
connection lost before the write could commit (a pooled connection the
server closed when it restarted), a deadlock or a lock-wait timeout.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import datetime as dt
import functools
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiomysql
import pymysql
import pymysql.constants

from .config import DatabaseURL
from .errors import Conflict, KMSError
from .store import DEK_PREFIX, REVOCATION_MARGIN, MasterKeyRow, Record, RotationJob, SigningKeyRow, StoreError, now_utc

__all__ = ["MySQLStore"]

# Client-side "connection is gone" codes (CR_*) and server-side ones
# (shutdown in progress, connection killed).
_CONNECTION_LOST = {2002, 2003, 2006, 2013, 2055, 1053, 1927, 4031}
# The server rolled the transaction back: running it again is safe.
_ROLLED_BACK = {1205, 1213}
_DUPLICATE_KEY = 1062
# Access denied (with and without a password: unix_socket says the latter).
_ACCESS_DENIED = {1045, 1698}
_ATTEMPTS = 3

# Exact comparison needs a binary collation that does not pad: MariaDB's
# utf8mb4_bin and MySQL's utf8mb4_bin ignore trailing spaces.
_NOPAD_COLLATIONS = ("utf8mb4_nopad_bin", "utf8mb4_0900_bin")

_MIGRATIONS: Sequence[Sequence[str]] = (
    # 1: the original schema, byte for byte where it exists already (IF NOT
    # EXISTS leaves an original database untouched), plus kmsd's signing keys.
    (
        """CREATE TABLE IF NOT EXISTS master_keys (
            id INT AUTO_INCREMENT PRIMARY KEY,
            key_id VARCHAR(64) UNIQUE NOT NULL,
            key_material TEXT NOT NULL,
            created_at DATETIME NOT NULL,
            status ENUM('active','retired') NOT NULL,
            description TEXT
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
        """CREATE TABLE IF NOT EXISTS kms_keys (
            user_id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE {bin} NOT NULL PRIMARY KEY,
            encrypted_key TEXT,
            encrypted_dek TEXT,
            created_at DATETIME
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
        """CREATE TABLE IF NOT EXISTS kmsd_signing_keys (
            kid VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
            public_key TEXT NOT NULL,
            key_material TEXT NOT NULL,
            status ENUM('active','retired') NOT NULL,
            created_at DATETIME NOT NULL
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    ),
    # 2: user ids compare exactly in a database the original created. No row
    # is lost: ids distinct under the old collation stay distinct under this.
    ("ALTER TABLE kms_keys MODIFY user_id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE {bin} NOT NULL",),
    # 3: master-key lifecycle. Which key wraps each record (counted without
    # decrypting); at most one active master key, enforced by a unique index
    # on a generated column that is NULL for retired keys; leases; jobs.
    (
        "column kms_keys master_key_id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE {bin} NULL",
        "index kms_keys kms_keys_master_key_id (master_key_id)",
        "column master_keys kmsd_one_active TINYINT AS (IF(status = 'active', 1, NULL)) STORED",
        "index master_keys kmsd_master_keys_one_active UNIQUE (kmsd_one_active)",
        """CREATE TABLE IF NOT EXISTS kmsd_leases (
            name VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
            holder VARCHAR(255) CHARACTER SET utf8mb4 COLLATE {bin} NOT NULL,
            expires_at DOUBLE NOT NULL
        ) ENGINE=InnoDB""",
        """CREATE TABLE IF NOT EXISTS kmsd_rotation_jobs (
            id INT AUTO_INCREMENT PRIMARY KEY,
            state ENUM('running','finished') NOT NULL,
            target_key_id VARCHAR(64) NOT NULL,
            requested_by VARCHAR(255),
            started_at DATETIME NOT NULL,
            finished_at DATETIME NULL,
            rewrapped BIGINT NOT NULL DEFAULT 0,
            changed BIGINT NOT NULL DEFAULT 0,
            unreadable BIGINT NOT NULL DEFAULT 0,
            active_seconds DOUBLE NOT NULL DEFAULT 0
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    ),
    # 4: whose record a wrapped DEK is (record_owners): a prefix index, as
    # a TEXT column allows (the prefix of a wrapped DEK is random enough).
    (f"index kms_keys kms_keys_encrypted_dek (encrypted_dek({DEK_PREFIX}))",),
    # 5: whose record a wrapped DEK used to be (released_owners): a digest,
    # never the wrapped DEK itself, so a deleted record stays shredded.
    (
        """CREATE TABLE IF NOT EXISTS kmsd_released_deks (
            digest BINARY(32) NOT NULL PRIMARY KEY,
            user_id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE {bin} NOT NULL
        ) ENGINE=InnoDB""",
    ),
    # 6: tokens tied to a record (a generation that a delete and a new
    # record change, and a revoke-all) and revoked one by one.
    (
        """CREATE TABLE IF NOT EXISTS kmsd_subjects (
            user_id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE {bin} NOT NULL PRIMARY KEY,
            generation VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL
        ) ENGINE=InnoDB""",
        """CREATE TABLE IF NOT EXISTS kmsd_revoked_tokens (
            token_id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
            expires_at BIGINT NOT NULL,
            KEY kmsd_revoked_tokens_expires_at (expires_at)
        ) ENGINE=InnoDB""",
    ),
)


async def _apply(cur: aiomysql.Cursor, statement: str) -> None:
    """Run one migration step so that it can run again: MySQL commits DDL
    at once, so a step may be half done when a migration was interrupted.
    "column T C DDL" and "index T NAME [UNIQUE] (COLS)" are added only if
    missing (MySQL has no ADD COLUMN IF NOT EXISTS); anything else is SQL."""
    kind, _, rest = statement.partition(" ")
    if kind not in ("column", "index"):
        await cur.execute(statement)
        return
    table, name, ddl = rest.split(" ", 2)
    view = "COLUMNS" if kind == "column" else "STATISTICS"
    field = "COLUMN_NAME" if kind == "column" else "INDEX_NAME"
    await cur.execute(
        f"SELECT COUNT(*) FROM information_schema.{view}"
        f" WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s AND {field} = %s",
        (table, name),
    )
    if (await cur.fetchone())[0]:
        return
    if kind == "column":
        await cur.execute(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}")
    else:
        unique = "UNIQUE " if ddl.startswith("UNIQUE ") else ""
        await cur.execute(f"ALTER TABLE {table} ADD {unique}INDEX {name} {ddl.removeprefix('UNIQUE ')}")

# Compare-and-set on a record's ciphertexts: byte-exact, NULL-safe.
_SAME_CIPHERTEXTS = "BINARY encrypted_key <=> BINARY %s AND BINARY encrypted_dek <=> BINARY %s"
# ... and on its user's token generation (parameters: user_id, generation).
_SAME_GENERATION = "COALESCE((SELECT generation FROM kmsd_subjects WHERE user_id = %s), '') = %s"
_SET_GENERATION = (
    "INSERT INTO kmsd_subjects (user_id, generation) VALUES (%s, %s)"
    " ON DUPLICATE KEY UPDATE generation = VALUES(generation)"
)

_Work = Callable[[aiomysql.Cursor], Awaitable[Any]]

# Set by a coalescer's flusher around a batch of writes: called once the
# statement may reach the server, from when on no answer leaves it unknown.
_ON_SEND: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("kmsd_on_send", default=None)


def _sending() -> None:
    notify = _ON_SEND.get()
    if notify is not None:
        notify()


# Coalesced point reads and inserts: at most this many in one statement,
# and (inserts) at most this many bytes of ciphertext, well under the
# server's max_allowed_packet.
_MAX_BATCH = 128
_MAX_BATCH_BYTES = 1 << 20


class _Coalescer:
    """Calls that queue while earlier batches are on their way to the
    server leave together: one statement (and for inserts one commit) for
    many requests. aiomysql parses every result in Python, so under load
    the per-statement cost, not the server, bounds the daemon. With no
    load a call leaves at once, alone."""

    def __init__(
        self,
        run: Callable[[list[Any]], Awaitable[list[Any]]],
        *,
        flushers: int,
        timeout: float,
        size: Callable[[Any], int] = lambda _: 0,
        writes: bool = False,
    ) -> None:
        self._run = run
        self._writes = writes
        # Writes whose statement went to the server (each caller removes its
        # own): one that times out after that may have been applied.
        self._sent: set[asyncio.Future[Any]] = set()
        self._timeout = timeout
        self._flushers = flushers
        self._size = size
        self._active = 0
        self._queue: collections.deque[tuple[Any, asyncio.Future[Any]]] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: Any) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        if self._active < self._flushers:
            self._active += 1
            task = asyncio.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            # The caller's budget covers its wait in the queue too: a hung
            # server is a 503 within the time limit, however long the queue.
            async with asyncio.timeout(self._timeout):
                return await fut
        except TimeoutError:
            if fut in self._sent:
                raise StoreError.outcome_unknown() from None
            raise StoreError() from None
        finally:
            self._sent.discard(fut)

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch: list[tuple[Any, asyncio.Future[Any]]] = []
                size = 0
                while self._queue and len(batch) < _MAX_BATCH and (not batch or size < _MAX_BATCH_BYTES):
                    item, fut = self._queue.popleft()
                    if fut.done():  # its caller went away
                        continue
                    batch.append((item, fut))
                    size += self._size(item)
                if not batch:
                    continue
                on_send = _ON_SEND.set(
                    functools.partial(self._sent.update, [fut for _, fut in batch]) if self._writes else None
                )
                try:
                    results = await self._run([item for item, _ in batch])
                except BaseException as exc:  # noqa: BLE001 - every caller gets the failure
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                finally:
                    _ON_SEND.reset(on_send)
                for (_, fut), result in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(result, BaseException):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
        finally:
            self._active -= 1

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._queue:
            _, fut = self._queue.popleft()
            if not fut.done():
                fut.set_exception(StoreError())

_RECORD_COLUMNS = "user_id, encrypted_key, encrypted_dek, created_at, master_key_id"
_JOB_COLUMNS = (
    "id, state, target_key_id, requested_by, started_at, finished_at, rewrapped, changed, unreadable, active_seconds"
)
# The database's clock, so that daemons on several hosts agree on leases.
_NOW = "UNIX_TIMESTAMP(NOW(6))"


def _text(value: Any) -> str | None:
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return value


def _record(row: Sequence[Any]) -> Record:
    return Record(row[0], row[1], row[2], _text(row[3]), row[4])


def _job(row: Sequence[Any]) -> RotationJob:
    return RotationJob(
        int(row[0]), row[1], row[2], row[3], _text(row[4]) or "", _text(row[5]),
        int(row[6]), int(row[7]), int(row[8]), float(row[9]),
    )


def _code(exc: BaseException) -> int:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else 0


def describe_error(exc: BaseException) -> str:
    """The server's reason, for startup errors. pymysql's messages name the
    user and host, never the password."""
    if isinstance(exc, pymysql.MySQLError) and len(exc.args) >= 2:
        return f"({exc.args[0]}) {exc.args[1]}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


class MySQLStore:
    def __init__(self, url: DatabaseURL, *, pool_size: int = 10, timeout: float = 3.0) -> None:
        self.url = url
        self._pool_size = pool_size
        self._timeout = timeout
        self._pool: aiomysql.Pool | None = None
        # aiomysql hands a released connection to whoever asks next, not to
        # the longest waiter: under load some requests starve (p99 of seconds
        # at 256 concurrent reads). A FIFO gate in front of it keeps order.
        self._gate = asyncio.Semaphore(pool_size)
        self.collation = _NOPAD_COLLATIONS[0]
        self.warnings: list[str] = []
        # Half the pool each: reads and inserts keep going side by side.
        flushers = max(1, pool_size // 2)
        self._reads = _Coalescer(self._get_records, flushers=flushers, timeout=timeout)
        # Every use of a token asks for its subject's state: batched too.
        self._states = _Coalescer(self._token_states, flushers=flushers, timeout=timeout)
        self._inserts = _Coalescer(
            self._insert_records, flushers=flushers, timeout=timeout, writes=True,
            size=lambda item: len(item[0].encrypted_key or "") + len(item[0].encrypted_dek or ""),
        )

    def _connect_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "user": self.url.user or None,
            "password": self.url.password,
            "db": self.url.database,
            "charset": "utf8mb4",
            "autocommit": True,
            # rowcount of an UPDATE counts the rows matched, not only those
            # whose values changed: a compare-and-set that writes the same
            # values is a success.
            "client_flag": pymysql.constants.CLIENT.FOUND_ROWS,
            "connect_timeout": self._timeout,
            # Strict: a value that does not fit is an error, never truncated.
            "init_command": "SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'",
        }
        if self.url.unix_socket:
            args["unix_socket"] = self.url.unix_socket
        else:
            args.update(host=self.url.host, port=self.url.port)
        return args

    async def open(self) -> None:
        where = self.url.masked()
        try:
            async with asyncio.timeout(self._timeout * 2):
                self._pool = await aiomysql.create_pool(
                    minsize=1, maxsize=self._pool_size, **self._connect_args()
                )
        except (pymysql.MySQLError, OSError) as exc:
            raise StoreError(f"cannot connect to {where}: {describe_error(exc)}") from None
        try:
            await self._prepare()
        except KMSError as exc:
            await self.close()
            raise StoreError(f"cannot prepare database {where}: {exc.message}") from None

    async def _prepare(self) -> None:
        async def inspect(cur: aiomysql.Cursor) -> tuple[list[str], Any]:
            await cur.execute(
                "SELECT COLLATION_NAME FROM information_schema.COLLATIONS WHERE COLLATION_NAME IN (%s, %s)",
                _NOPAD_COLLATIONS,
            )
            found = [r[0] for r in await cur.fetchall()]
            await cur.execute("SELECT @@innodb_flush_log_at_trx_commit")
            return found, (await cur.fetchone())[0]

        found, flush = await self._run(inspect, detail=True)
        usable = [c for c in _NOPAD_COLLATIONS if c in found]
        if not usable:
            raise StoreError("the server has no binary no-pad utf8mb4 collation (MariaDB >= 10.2 or MySQL >= 8.0 needed)")
        self.collation = usable[0]
        if str(flush) != "1":
            self.warnings.append(
                f"innodb_flush_log_at_trx_commit={flush}: a committed write can be lost in a crash; set it to 1"
            )
        await self._migrate()

    async def _migrate(self) -> None:
        """Apply pending migrations under a named lock, so that several
        daemons starting on one database do not race. DDL commits
        implicitly in MySQL, so every step is written to be re-runnable."""

        async def migrate(cur: aiomysql.Cursor) -> None:
            await cur.execute("SELECT GET_LOCK('kmsd_schema_migrations', %s)", (self._timeout * 10,))
            if (await cur.fetchone())[0] != 1:
                raise StoreError("another process holds the schema migration lock")
            # "Table already exists" notes are expected on an original database.
            await cur.execute("SET SESSION sql_notes = 0")
            try:
                await cur.execute(
                    "CREATE TABLE IF NOT EXISTS kmsd_schema_migrations ("
                    " version INT PRIMARY KEY, applied_at DATETIME NOT NULL) ENGINE=InnoDB"
                )
                await cur.execute("SELECT version FROM kmsd_schema_migrations")
                done = {r[0] for r in await cur.fetchall()}
                for version, statements in enumerate(_MIGRATIONS, start=1):
                    if version in done:
                        continue
                    if version == 3:
                        await cur.execute("SELECT COUNT(*) FROM master_keys WHERE status = 'active'")
                        actives = (await cur.fetchone())[0]
                        if actives > 1:
                            raise StoreError(
                                f"master_keys has {actives} active keys; exactly one may be: set all but the"
                                " newest to 'retired' (UPDATE master_keys SET status = 'retired' WHERE ...)"
                                " and start again"
                            )
                    for statement in statements:
                        await _apply(cur, statement.format(bin=self.collation))
                    await cur.execute(
                        "INSERT INTO kmsd_schema_migrations (version, applied_at) VALUES (%s, UTC_TIMESTAMP())",
                        (version,),
                    )
            finally:
                await cur.execute("SET SESSION sql_notes = 1")
                await cur.execute("DO RELEASE_LOCK('kmsd_schema_migrations')")

        # DDL waits for metadata locks; give it more than one request's budget.
        await self._run(migrate, detail=True, timeout=self._timeout * 20)

    async def close(self) -> None:
        await self._reads.close()
        await self._states.close()
        await self._inserts.close()
        if self._pool is not None:
            self._pool.close()
            await self._pool.wait_closed()
            self._pool = None

    # -- the one place that talks to the driver ------------------------------------

    async def _run(
        self,
        work: _Work,
        *,
        write: str | None = None,
        detail: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """Run ``work`` on a pooled connection and translate the driver's
        errors. ``write`` is "statement" for one autocommitted statement and
        "transaction" for several in one transaction. ``detail`` keeps the
        server's reason in the message (startup only: never sent to a client)."""
        pool = self._pool
        if pool is None:
            raise StoreError()
        maybe_committed = False
        try:
            async with asyncio.timeout(timeout or self._timeout):
                for attempt in range(1, _ATTEMPTS + 1):
                    # Once a write may have reached COMMIT, a lost connection
                    # leaves its outcome unknown: never run it again then.
                    maybe_committed = False
                    try:
                        async with self._gate:
                            try:
                                conn = await pool.acquire()
                            except RuntimeError as exc:
                                # aiomysql, when the server goes away while it
                                # connects: "Transport does not expose socket
                                # instance". A lost connection, nothing sent.
                                raise pymysql.OperationalError(2013, "lost connection while connecting") from exc
                            try:
                                if write == "transaction":
                                    await conn.begin()
                                maybe_committed = write == "statement"
                                if maybe_committed:
                                    _sending()
                                async with conn.cursor() as cur:
                                    result = await work(cur)
                                if write == "transaction":
                                    maybe_committed = True
                                    _sending()
                                    await conn.commit()
                            except BaseException:
                                # Its state is unknown: never hand it out again.
                                conn.close()
                                raise
                            finally:
                                pool.release(conn)
                            return result
                    except pymysql.IntegrityError as exc:
                        if _code(exc) == _DUPLICATE_KEY:
                            raise Conflict() from None
                        raise
                    except (pymysql.OperationalError, pymysql.InterfaceError) as exc:
                        code = _code(exc)
                        lost = code in _CONNECTION_LOST or isinstance(exc, pymysql.InterfaceError)
                        # A deadlock or lock-wait timeout rolled it back: always safe.
                        retry = code in _ROLLED_BACK or (lost and not maybe_committed)
                        if attempt == _ATTEMPTS or not retry:
                            raise
        except (Conflict, StoreError):
            raise
        except (pymysql.MySQLError, OSError) as exc:
            # TimeoutError is an OSError: the budget ran out. An error the
            # server answered undid the statement; no answer leaves it open.
            if maybe_committed and (
                isinstance(exc, (OSError, pymysql.InterfaceError)) or _code(exc) in _CONNECTION_LOST
            ):
                raise StoreError.outcome_unknown() from exc
            raise StoreError(describe_error(exc) if detail else None) from exc

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        async def work(cur: aiomysql.Cursor) -> list[Any]:
            await cur.execute(sql, params)
            return list(await cur.fetchall())

        return await self._run(work)

    async def _write(self, *statements: tuple[str, Sequence[Any]]) -> int:
        """Run the statements in one transaction; the rows the last changed."""

        async def work(cur: aiomysql.Cursor) -> int:
            for sql, params in statements:
                await cur.execute(sql, params)
            return int(cur.rowcount)

        return int(await self._run(work, write="transaction" if len(statements) > 1 else "statement"))

    # -- the Store protocol ----------------------------------------------------------

    async def ping(self) -> None:
        await self._read("SELECT 1")

    async def check_access(self) -> None:
        try:
            async with asyncio.timeout(self._timeout * 2):
                conn = await aiomysql.connect(**self._connect_args())
            conn.close()
        except (pymysql.MySQLError, OSError) as exc:
            if _code(exc) in _ACCESS_DENIED:
                import pwd

                user = pwd.getpwuid(os.geteuid()).pw_name
                raise StoreError(
                    f"the database refused a new connection now that the daemon runs as the OS user {user!r}"
                    f" ({describe_error(exc)}): an account that authenticates by unix_socket is the OS user's;"
                    f" give the database account a password (database_password_file), or create one for"
                    f" {user!r} IDENTIFIED VIA unix_socket"
                ) from None
            raise StoreError(f"cannot connect to {self.url.masked()}: {describe_error(exc)}") from None

    async def get_record(self, user_id: str) -> Record | None:
        record: Record | None = await self._reads.submit(user_id)
        return record

    async def _get_records(self, user_ids: list[str]) -> list[Record | None]:
        marks = ", ".join(["%s"] * len(user_ids))
        rows = await self._read(f"SELECT {_RECORD_COLUMNS} FROM kms_keys WHERE user_id IN ({marks})", user_ids)
        # user_id compares exactly (binary, no pad), so it is the key back.
        found = {r.user_id: r for r in map(_record, rows)}
        return [found.get(u) for u in user_ids]

    async def record_owners(self, encrypted_dek: str) -> list[str]:
        # The original's column compares case-insensitively: the index finds
        # the candidates, the binary comparison the exact text.
        rows = await self._read(
            "SELECT user_id FROM kms_keys WHERE encrypted_dek = %s AND BINARY encrypted_dek = BINARY %s",
            (encrypted_dek, encrypted_dek),
        )
        return [r[0] for r in rows]

    async def count_records(self) -> int:
        rows = await self._read("SELECT COUNT(*) FROM kms_keys")
        return int(rows[0][0])

    async def scan_records(self, after: str | None, limit: int) -> list[Record]:
        rows = await self._read(
            f"SELECT {_RECORD_COLUMNS} FROM kms_keys WHERE user_id > %s ORDER BY user_id LIMIT %s",
            (after or "", limit),
        )
        return [_record(r) for r in rows]

    async def insert_record(self, record: Record, *, generation: str | None = None) -> None:
        await self._inserts.submit((record, generation))

    async def _insert_records(self, items: list[tuple[Record, str | None]]) -> list[BaseException | None]:
        """One multi-row INSERT (and one for the generations, in the same
        transaction): it commits whole or not at all. If any row is a
        duplicate nothing was written, and each record is tried on its own
        so that only that caller gets 409."""
        records = [r for r, _ in items]
        marks = ", ".join(["(%s, %s, %s, %s, %s)"] * len(records))
        params = [v for r in records for v in (r.user_id, r.encrypted_key, r.encrypted_dek, r.created_at,
                                                r.master_key_id)]
        statements: list[tuple[str, Sequence[Any]]] = [
            (f"INSERT INTO kms_keys ({_RECORD_COLUMNS}) VALUES {marks}", params)
        ]
        generations = [(r.user_id, g) for r, g in items if g is not None]
        if generations:
            rows = ", ".join(["(%s, %s)"] * len(generations))
            statements.append(
                (
                    _SET_GENERATION.replace("VALUES (%s, %s)", f"VALUES {rows}"),
                    [v for pair in generations for v in pair],
                )
            )
        try:
            await self._write(*statements)
            return [None] * len(records)
        except Conflict:
            if len(records) == 1:
                raise
        results: list[BaseException | None] = []
        for item in items:
            try:
                await self._insert_records([item])
                results.append(None)
            except (Conflict, StoreError) as exc:
                results.append(exc)
        return results

    async def upsert_record(self, record: Record) -> None:
        await self._write(
            (
                f"INSERT INTO kms_keys ({_RECORD_COLUMNS}) VALUES (%s, %s, %s, %s, %s)"
                " ON DUPLICATE KEY UPDATE encrypted_key = VALUES(encrypted_key),"
                " encrypted_dek = VALUES(encrypted_dek), created_at = VALUES(created_at),"
                " master_key_id = VALUES(master_key_id)",
                (record.user_id, record.encrypted_key, record.encrypted_dek, record.created_at,
                 record.master_key_id),
            )
        )

    async def replace_record(
        self, old: Record, new: Record, *, release: bytes | None = None, expect_generation: str | None = None
    ) -> bool:
        sql = (
            "UPDATE kms_keys SET encrypted_key = %s, encrypted_dek = %s, created_at = %s, master_key_id = %s"
            f" WHERE user_id = %s AND {_SAME_CIPHERTEXTS}"
        )
        params = [new.encrypted_key, new.encrypted_dek, new.created_at, new.master_key_id,
                  old.user_id, old.encrypted_key, old.encrypted_dek]
        if expect_generation is not None:
            sql += f" AND {_SAME_GENERATION}"
            params += [old.user_id, expect_generation]
        return await self._change_releasing(sql, params, release, old.user_id)

    async def _change_releasing(
        self, sql: str, params: Sequence[Any], release: bytes | None, user_id: str, generation: str | None = None
    ) -> bool:
        """One change of a row; if it changed, in the same transaction, the
        digest ``release`` remembered as ``user_id``'s and ``generation``
        made the user's."""
        if release is None and generation is None:
            return await self._write((sql, params)) > 0

        async def work(cur: aiomysql.Cursor) -> bool:
            await cur.execute(sql, params)
            if cur.rowcount <= 0:
                return False
            if release is not None:
                # Hex: aiomysql cannot send a bytes parameter (pymysql 1.1 dropped what it calls).
                await cur.execute(
                    "INSERT IGNORE INTO kmsd_released_deks (digest, user_id) VALUES (UNHEX(%s), %s)",
                    (release.hex(), user_id),
                )
            if generation is not None:
                await cur.execute(_SET_GENERATION, (user_id, generation))
            return True

        return bool(await self._run(work, write="transaction"))

    async def token_state(self, user_id: str, token_id: str) -> tuple[str, bool]:
        state: tuple[str, bool] = await self._states.submit((user_id, token_id))
        return state

    async def _token_states(self, items: list[tuple[str, str]]) -> list[tuple[str, bool]]:
        """One statement for the whole batch: the subjects' generations and
        the revoked token ids, as bytes (so the union needs no common
        collation)."""
        users = sorted({u for u, _ in items})
        tokens = sorted({t for _, t in items})
        rows = await self._read(
            f"SELECT 0, CAST(user_id AS BINARY), generation FROM kmsd_subjects"
            f" WHERE user_id IN ({', '.join(['%s'] * len(users))})"
            f" UNION ALL SELECT 1, CAST(token_id AS BINARY), '' FROM kmsd_revoked_tokens"
            f" WHERE token_id IN ({', '.join(['%s'] * len(tokens))})",
            [*users, *tokens],
        )
        generations: dict[str, str] = {}
        revoked: set[str] = set()
        for kind, key, generation in rows:
            name = bytes(key).decode("utf-8")
            if kind:
                revoked.add(name)
            else:
                generations[name] = _text(generation) or ""
        # user_id compares exactly (binary, no pad), so it is the key back.
        return [(generations.get(u, ""), t in revoked) for u, t in items]

    async def set_generation(self, user_id: str, generation: str) -> None:
        await self._write((_SET_GENERATION, (user_id, generation)))

    async def revoke_token(self, token_id: str, expires_at: int) -> None:
        await self._write(
            ("INSERT IGNORE INTO kmsd_revoked_tokens (token_id, expires_at) VALUES (%s, %s)", (token_id, expires_at)),
            (f"DELETE FROM kmsd_revoked_tokens WHERE expires_at < {_NOW} - {REVOCATION_MARGIN}", ()),
        )

    async def released_owners(self, digest: bytes) -> list[str]:
        rows = await self._read("SELECT user_id FROM kmsd_released_deks WHERE digest = UNHEX(%s)", (digest.hex(),))
        return [r[0] for r in rows]

    async def count_records_by_key(self) -> dict[str | None, int]:
        rows = await self._read("SELECT master_key_id, COUNT(*) FROM kms_keys GROUP BY master_key_id")
        return {r[0]: int(r[1]) for r in rows}

    async def scan_records_to_rewrap(self, active_key_id: str, after: str | None, limit: int) -> list[Record]:
        rows = await self._read(
            f"SELECT {_RECORD_COLUMNS} FROM kms_keys WHERE user_id > %s"
            " AND (master_key_id IS NULL OR master_key_id <> %s) ORDER BY user_id LIMIT %s",
            (after or "", active_key_id, limit),
        )
        return [_record(r) for r in rows]

    async def rewrap_records(self, changes: Sequence[tuple[Record, str, str]]) -> int:
        if not changes:
            return 0
        # One statement for the whole batch (one round trip, not one per
        # row): a join against the batch as a derived table, compare-and-set
        # on each row's old ciphertexts in the join condition.
        rows = " UNION ALL ".join(["SELECT %s AS u, %s AS ek, %s AS od, %s AS nd, %s AS kid"] * len(changes))
        params: list[Any] = []
        for old, dek, key_id in changes:
            params += [old.user_id, old.encrypted_key, old.encrypted_dek, dek, key_id]
        return await self._write(
            (
                f"UPDATE kms_keys k JOIN ({rows}) v ON k.user_id = v.u"
                " AND BINARY k.encrypted_key <=> BINARY v.ek AND BINARY k.encrypted_dek <=> BINARY v.od"
                " SET k.encrypted_dek = v.nd, k.master_key_id = v.kid",
                params,
            )
        )

    async def replace_key_materials(
        self, master: Sequence[tuple[str, str, str]], signing: Sequence[tuple[str, str, str]]
    ) -> bool:
        class _Changed(Exception):
            pass

        async def work(cur: aiomysql.Cursor) -> None:
            for table, column, rows in (("master_keys", "key_id", master), ("kmsd_signing_keys", "kid", signing)):
                for key, old, new in rows:
                    await cur.execute(
                        f"UPDATE {table} SET key_material = %s WHERE BINARY {column} = %s"
                        " AND BINARY key_material = BINARY %s",
                        (new, key, old),
                    )
                    if cur.rowcount != 1:
                        # Raised inside the transaction: _run rolls it back.
                        raise _Changed

        try:
            await self._run(work, write="transaction")
        except _Changed:
            return False
        return True

    async def delete_master_key(self, key_id: str) -> bool:
        changed = await self._write(
            (
                "DELETE FROM master_keys WHERE BINARY key_id = %s AND status = 'retired' AND NOT EXISTS"
                " (SELECT 1 FROM kms_keys WHERE master_key_id = %s OR master_key_id IS NULL)",
                (key_id, key_id),
            )
        )
        return changed > 0

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        take = (
            f"UPDATE kmsd_leases SET holder = %s, expires_at = {_NOW} + %s"
            f" WHERE name = %s AND (holder = %s OR holder = '' OR expires_at < {_NOW})"
        )
        params = (holder, ttl, name, holder)

        async def work(cur: aiomysql.Cursor) -> bool:
            # Each statement on its own (autocommit): one row lock at a time,
            # so concurrent takers queue instead of deadlocking.
            await cur.execute(take, params)
            if cur.rowcount:
                return True
            await cur.execute(
                "INSERT INTO kmsd_leases (name, holder, expires_at) VALUES (%s, '', 0)"
                " ON DUPLICATE KEY UPDATE name = name",
                (name,),
            )
            await cur.execute(take, params)
            return cur.rowcount > 0

        return bool(await self._run(work, write="statement"))

    async def release_lease(self, name: str, holder: str) -> None:
        await self._write(
            ("UPDATE kmsd_leases SET holder = '', expires_at = 0 WHERE name = %s AND holder = %s", (name, holder))
        )

    async def get_lease(self, name: str) -> tuple[str, float] | None:
        rows = await self._read(f"SELECT holder, expires_at - {_NOW} FROM kmsd_leases WHERE name = %s", (name,))
        if rows and rows[0][0] and float(rows[0][1]) > 0:
            return str(rows[0][0]), float(rows[0][1])
        return None

    async def start_rotation_job(self, target_key_id: str, requested_by: str | None) -> RotationJob:
        started = now_utc()

        async def work(cur: aiomysql.Cursor) -> int:
            await cur.execute(
                "INSERT INTO kmsd_rotation_jobs (state, target_key_id, requested_by, started_at)"
                " VALUES ('running', %s, %s, %s)",
                (target_key_id, requested_by, started),
            )
            return int(cur.lastrowid)

        job_id = await self._run(work, write="statement")
        return RotationJob(job_id, "running", target_key_id, requested_by, started)

    async def update_rotation_job(self, job: RotationJob) -> None:
        await self._write(
            (
                "UPDATE kmsd_rotation_jobs SET state = %s, finished_at = %s, rewrapped = %s, changed = %s,"
                " unreadable = %s, active_seconds = %s WHERE id = %s",
                (job.state, job.finished_at, job.rewrapped, job.changed, job.unreadable, job.active_seconds, job.id),
            )
        )

    async def latest_rotation_job(self) -> RotationJob | None:
        rows = await self._read(f"SELECT {_JOB_COLUMNS} FROM kmsd_rotation_jobs ORDER BY id DESC LIMIT 1")
        return _job(rows[0]) if rows else None

    async def delete_record(
        self,
        user_id: str,
        *,
        only_if: Record | None = None,
        release: bytes | None = None,
        expect_generation: str | None = None,
        generation: str | None = None,
    ) -> bool:
        sql, params = "DELETE FROM kms_keys WHERE user_id = %s", [user_id]
        if only_if is not None:
            sql += f" AND {_SAME_CIPHERTEXTS}"
            params += [only_if.encrypted_key, only_if.encrypted_dek]
        if expect_generation is not None:
            sql += f" AND {_SAME_GENERATION}"
            params += [user_id, expect_generation]
        return await self._change_releasing(sql, params, release, user_id, generation)

    async def list_master_keys(self) -> list[MasterKeyRow]:
        rows = await self._read(
            "SELECT key_id, key_material, status, created_at, description FROM master_keys ORDER BY id"
        )
        return [MasterKeyRow(r[0], r[1], r[2], _text(r[3]) or "", r[4]) for r in rows]

    async def add_master_key(self, row: MasterKeyRow) -> None:
        # The UPDATE locks every active row first, so two concurrent
        # additions serialize and exactly one key ends up active.
        await self._write(
            ("UPDATE master_keys SET status = 'retired' WHERE status = 'active'", ()),
            (
                "INSERT INTO master_keys (key_id, key_material, created_at, status, description)"
                " VALUES (%s, %s, %s, 'active', %s)",
                (row.key_id, row.key_material, row.created_at, row.description),
            ),
        )

    async def replace_master_key_material(self, key_id: str, old: str, new: str) -> bool:
        changed = await self._write(
            (
                "UPDATE master_keys SET key_material = %s WHERE BINARY key_id = %s AND BINARY key_material = BINARY %s",
                (new, key_id, old),
            )
        )
        return changed > 0

    async def list_signing_keys(self) -> list[SigningKeyRow]:
        rows = await self._read(
            "SELECT kid, public_key, key_material, status, created_at FROM kmsd_signing_keys"
            " ORDER BY created_at, kid"
        )
        return [SigningKeyRow(r[0], r[1], r[2], r[3], _text(r[4]) or "") for r in rows]

    async def add_signing_key(self, row: SigningKeyRow) -> None:
        await self._write(
            ("UPDATE kmsd_signing_keys SET status = 'retired' WHERE status = 'active'", ()),
            (
                "INSERT INTO kmsd_signing_keys (kid, public_key, key_material, status, created_at)"
                " VALUES (%s, %s, %s, 'active', %s)",
                (row.kid, row.public_key, row.key_material, row.created_at),
            ),
        )
