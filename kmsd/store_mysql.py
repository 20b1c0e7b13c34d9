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
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiomysql
import pymysql
import pymysql.constants

from .config import DatabaseURL
from .errors import Conflict, KMSError, StoreError
from .mysql_batch import Coalescer
from .mysql_schema import MIGRATIONS, NOPAD_COLLATIONS, apply_step
from .store import Record
from .store_sql import MYSQL, SQLStore, Statement, as_text, record_from_row

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


T = TypeVar("T")

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


class MySQLStore(SQLStore):
    dialect = MYSQL

    def __init__(self, url: DatabaseURL, *, pool_size: int = 10, timeout: float = 3.0) -> None:
        self.url = url
        self._pool_size = pool_size
        self._timeout = timeout
        self._pool: aiomysql.Pool | None = None
        # aiomysql hands a released connection to whoever asks next, not to
        # the longest waiter: under load some requests starve (p99 of seconds
        # at 256 concurrent reads). A FIFO gate in front of it keeps order.
        self._gate = asyncio.Semaphore(pool_size)
        self.collation = NOPAD_COLLATIONS[0]
        self.warnings: list[str] = []
        # Half the pool each: reads and inserts keep going side by side.
        flushers = max(1, pool_size // 2)
        self._reads = Coalescer(self._get_records, flushers=flushers, timeout=timeout)
        # Every use of a token asks for its subject's state: batched too.
        self._states = Coalescer(self._token_states, flushers=flushers, timeout=timeout)
        self._inserts = Coalescer(
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
                NOPAD_COLLATIONS,
            )
            found = [r[0] for r in await cur.fetchall()]
            await cur.execute("SELECT @@innodb_flush_log_at_trx_commit")
            return found, (await cur.fetchone())[0]

        found, flush = await self._run(inspect, detail=True)
        usable = [c for c in NOPAD_COLLATIONS if c in found]
        if not usable:
            raise StoreError(
                "the server has no binary no-pad utf8mb4 collation (MariaDB >= 10.2 or MySQL >= 8.0 needed)"
            )
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
                for version, statements in enumerate(MIGRATIONS, start=1):
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
                        await apply_step(cur, statement.format(bin=self.collation))
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
        work: Callable[[aiomysql.Cursor], Awaitable[T]],
        *,
        write: str | None = None,
        detail: bool = False,
        timeout: float | None = None,
    ) -> T:
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
                                async with conn.cursor() as cur:
                                    result = await work(cur)
                                if write == "transaction":
                                    maybe_committed = True
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
                raise AssertionError("unreachable: the last attempt returns or raises")
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

    async def _write(self, *statements: Statement) -> int:
        async def work(cur: aiomysql.Cursor) -> int:
            for sql, params in statements:
                await cur.execute(sql, params)
            return int(cur.rowcount)

        return int(await self._run(work, write="transaction" if len(statements) > 1 else "statement"))

    # -- the Store protocol ----------------------------------------------------------

    async def _write_then(self, first: Statement, then: Sequence[Statement]) -> bool:
        async def work(cur: aiomysql.Cursor) -> bool:
            await cur.execute(*first)
            if cur.rowcount <= 0:
                return False
            for sql, params in then:
                await cur.execute(sql, params)
            return True

        return bool(await self._run(work, write="transaction"))

    async def _write_each_once(self, statements: Sequence[Statement]) -> bool:
        class _Changed(Exception):
            pass

        async def work(cur: aiomysql.Cursor) -> None:
            for sql, params in statements:
                await cur.execute(sql, params)
                if cur.rowcount != 1:
                    # Raised inside the transaction: _run rolls it back.
                    raise _Changed

        try:
            await self._run(work, write="transaction")
        except _Changed:
            return False
        return True

    async def _insert_id(self, sql: str, params: Sequence[Any]) -> int:
        async def work(cur: aiomysql.Cursor) -> int:
            await cur.execute(sql, params)
            return int(cur.lastrowid)

        return int(await self._run(work, write="statement"))

    # -- what only MySQL does this way ---------------------------------------------

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
        rows = await self._read(self._select_records(len(user_ids)), user_ids)
        # user_id compares exactly (binary, no pad), so it is the key back.
        found = {r.user_id: r for r in map(record_from_row, rows)}
        return [found.get(u) for u in user_ids]

    async def record_owners(self, encrypted_dek: str) -> list[str]:
        # The original's column compares case-insensitively: the index finds
        # the candidates, the binary comparison the exact text.
        rows = await self._read(
            "SELECT user_id FROM kms_keys WHERE encrypted_dek = %s AND BINARY encrypted_dek = BINARY %s",
            (encrypted_dek, encrypted_dek),
        )
        return [r[0] for r in rows]

    async def insert_record(self, record: Record, *, generation: str | None = None) -> None:
        await self._inserts.submit((record, generation))

    async def _insert_records(self, items: list[tuple[Record, str | None]]) -> list[BaseException | None]:
        """One multi-row INSERT (and one for the generations, in the same
        transaction): it commits whole or not at all. If any row is a
        duplicate nothing was written, and each record is tried on its own
        so that only that caller gets 409."""
        records = [r for r, _ in items]
        statements = [self._insert_statement(records)]
        generations = [(r.user_id, g) for r, g in items if g is not None]
        if generations:
            statements.append(self._set_generations(generations))
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
                generations[name] = as_text(generation) or ""
        # user_id compares exactly (binary, no pad), so it is the key back.
        return [(generations.get(u, ""), t in revoked) for u, t in items]

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

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        take = self._take_lease(name, holder, ttl)

        async def work(cur: aiomysql.Cursor) -> bool:
            # Each statement on its own (autocommit): one row lock at a time,
            # so concurrent takers queue instead of deadlocking.
            await cur.execute(*take)
            if cur.rowcount:
                return True
            await cur.execute(*self._create_lease(name))
            await cur.execute(*take)
            return bool(cur.rowcount > 0)

        return await self._run(work, write="statement")
