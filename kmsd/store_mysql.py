"""The production store: MySQL/MariaDB through an aiomysql connection pool,
on one server or on the nodes of a Galera cluster.

Works on a database the original system wrote: its tables and columns stay
as they are, kmsd only adds tables and switches ``kms_keys.user_id`` to a
binary, no-pad collation so that user ids compare exactly (the original's
``utf8mb4_general_ci`` made ``SMOKE1`` and ``smoke1 `` one user).

Durability: every write is an explicit transaction and returns after COMMIT;
with InnoDB's default ``innodb_flush_log_at_trx_commit=1`` that is on disk
(``open`` reports a server configured otherwise in ``warnings``). On Galera
a COMMIT returns once the cluster has certified the write set, which every
node then applies.

Failures: every call has one time budget (``timeout``); an unreachable or
hung server is ``StoreError`` (HTTP 503) within it, never a hang. A call is
retried only when nothing can have been committed: a connection lost before
the write could commit (a pooled connection the server closed when it
restarted), a node that is not part of the primary component (1047), a
deadlock, a lock-wait timeout, or a Galera certification failure (1213 at
COMMIT: the whole transaction was rolled back, and runs again from its first
statement, so a compare-and-set is decided again on the new state).

Clusters (``mysql_nodes``): a URL may name several servers. The store talks
to one at a time and moves to the next usable one when it fails; every
session on a Galera node sets ``wsrep_sync_wait`` so that a read sees every
write committed anywhere in the cluster before it (read-your-writes across
daemons on different nodes). Coordination uses rows and compare-and-set
only (leases, certification): ``GET_LOCK`` is local to one Galera node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import aiomysql
import pymysql
import pymysql.constants

from .config import DatabaseURL
from .errors import Conflict, KMSError, StoreError
from .mysql_batch import Coalescer
from .mysql_nodes import Health, Nodes, galera_health
from .mysql_schema import LEASES_TABLE, MIGRATIONS, NOPAD_COLLATIONS, apply_step, galera_checks
from .store import Record
from .store_sql import MYSQL, SQLStore, Statement, as_text, record_from_row

__all__ = ["MySQLStore"]

# Client-side "connection is gone" codes (CR_*) and server-side ones
# (shutdown in progress, connection killed).
_CONNECTION_LOST = {2002, 2003, 2006, 2013, 2055, 1053, 1927, 4031}
# A Galera node outside the primary component ("WSREP has not yet prepared
# node for application use"): it refused the statement, nothing was applied.
_NODE_NOT_READY = {1047}
# The server rolled the transaction back: running it again is safe. 1213 is
# also Galera's certification failure at COMMIT.
_ROLLED_BACK = {1205, 1213}
# Answers that say the write was not applied, even at COMMIT.
_NOT_APPLIED = _ROLLED_BACK | _NODE_NOT_READY
# "Got error N during COMMIT": the node failed while committing (Galera,
# leaving the primary component); the write set may have reached the others.
_COMMIT_FAILED = {1180}
_DUPLICATE_KEY = 1062
# Access denied (with and without a password: unix_socket says the latter).
_ACCESS_DENIED = {1045, 1698}
# Attempts of one call, within its time budget: enough for a few
# certification conflicts in a row and a failover across three nodes.
_ATTEMPTS = 8
# Jittered exponential backoff after a rolled-back attempt, so that two
# daemons that conflicted do not collide again in lockstep.
_BACKOFF_FIRST = 0.005
_BACKOFF_MAX = 0.25
# Where every node failed a moment ago, calls fail at once for this long
# instead of each probing every node again.
_ALL_DOWN_GRACE = 0.5
# Rewrap batches on Galera: one batch is one write set, and large write sets
# stall the cluster and conflict more.
GALERA_WRITE_BATCH = 100
_SCHEMA_LEASE = "schema-migrations"
_SCHEMA_LEASE_TTL = 60.0
# How long a starting daemon waits for another one's migration.
_SCHEMA_WAIT = 600.0


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


class _Attempt:
    """What one attempt of a call got to: past this point a lost
    connection leaves the write's outcome unknown."""

    __slots__ = ("maybe_committed",)

    def __init__(self) -> None:
        self.maybe_committed = False


class _Replaced:
    """An attempt found its pool replaced by a failover: nothing was sent."""


def _backoff(attempt: int) -> float:
    return random.uniform(0, min(_BACKOFF_MAX, _BACKOFF_FIRST * 2**attempt))  # noqa: S311 - jitter, not a secret


class MySQLStore(SQLStore):
    dialect = MYSQL

    def __init__(
        self, url: DatabaseURL, *, pool_size: int = 10, timeout: float = 3.0, log: Any = None
    ) -> None:
        self.url = url
        self._pool_size = pool_size
        self._timeout = timeout
        self._log = log
        self.nodes = Nodes(url.servers, retry_after=max(5.0, timeout))
        self._pool: aiomysql.Pool | None = None
        self._pool_node = 0
        self._switch = asyncio.Lock()
        self._all_down_at = -1e9
        self._all_down_reason = ""
        self._background: set[asyncio.Task[None]] = set()
        self._checking = False
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False
        # Whether the servers are Galera nodes (decided by the first probe).
        self.galera = False
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

    # -- which server --------------------------------------------------------------

    @property
    def server(self) -> str:
        """The server in use (host:port, or the Unix socket)."""
        return self.url.unix_socket or self.nodes.name()

    @property
    def failovers(self) -> int:
        return self.nodes.failovers

    @property
    def max_write_batch(self) -> int | None:
        return GALERA_WRITE_BATCH if self.galera else None

    def _connect_args(self, index: int | None = None, *, galera: bool = False) -> dict[str, Any]:
        session = "SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'"
        if galera:
            session += f", SESSION wsrep_sync_wait = {int(self.url.sync_wait)}"
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
            "init_command": session,
        }
        if self.url.unix_socket:
            args["unix_socket"] = self.url.unix_socket
        else:
            host, port = self.url.servers[self.nodes.current if index is None else index]
            args.update(host=host, port=port)
        return args

    @property
    def _probe_budget(self) -> float:
        """One probe of a cluster node: short, so that a failover can try
        every node within one call's budget."""
        return max(0.2, min(1.0, self._timeout / 3))

    async def _probe(self, index: int, budget: float) -> Health:
        """Connect to one server and ask whether it can serve: any server
        that answers can, a Galera node only while Synced in the primary
        component."""
        conn = None
        try:
            async with asyncio.timeout(budget):
                conn = await aiomysql.connect(**{**self._connect_args(index), "connect_timeout": budget})
                async with conn.cursor() as cur:
                    await cur.execute("SHOW VARIABLES LIKE 'wsrep_on'")
                    row = await cur.fetchone()
                    if not row or str(row[1]).upper() != "ON":
                        return Health(galera=False)
                    await cur.execute(
                        "SHOW GLOBAL STATUS WHERE Variable_name IN"
                        " ('wsrep_cluster_status', 'wsrep_ready', 'wsrep_local_state_comment')"
                    )
                    return galera_health({str(k): str(v) for k, v in await cur.fetchall()})
        except (pymysql.MySQLError, OSError, RuntimeError) as exc:
            # RuntimeError: aiomysql when the server goes away mid-connect.
            # Access denied on one node is a reason like any other: the
            # next node may let us in (and open() reports every reason).
            return Health(galera=self.galera, reason=describe_error(exc))
        finally:
            if conn is not None:
                conn.close()

    async def _use_node(self, avoid: aiomysql.Pool | None = None, *, only: list[int] | None = None) -> None:
        """Open a pool on the first usable server (of ``only``, else of
        every server in ``Nodes.candidates`` order) and make it current.
        ``avoid``: the pool whose node just failed; nothing happens if
        another call replaced it meanwhile (many calls fail at once on a
        dead node: one failover, not one each). Raises StoreError when no
        server is usable (with ``only``: returns quietly)."""
        async with self._switch:
            if self._closed:
                raise StoreError()
            if avoid is not None:
                if self._pool is not avoid:
                    return
                self.nodes.leave(self._pool_node)
            if only is None and time.monotonic() - self._all_down_at < _ALL_DOWN_GRACE:
                raise StoreError()
            reasons = []
            budget = self._probe_budget if self.nodes.clustered else self._timeout
            for index in only if only is not None else self.nodes.candidates():
                health = await self._probe(index, budget)
                if not health.usable:
                    reasons.append(f"{self.nodes.name(index)}: {health.reason}")
                    self.nodes.leave(index)
                    continue
                try:
                    async with asyncio.timeout(budget * 2):
                        pool = await aiomysql.create_pool(
                            minsize=1, maxsize=self._pool_size, **self._connect_args(index, galera=health.galera)
                        )
                except (pymysql.MySQLError, OSError, RuntimeError) as exc:
                    reasons.append(f"{self.nodes.name(index)}: {describe_error(exc)}")
                    self.nodes.leave(index)
                    continue
                self.galera = health.galera
                old, was = self._pool, self.nodes.name(self._pool_node)
                self._pool, self._pool_node = pool, index
                if self.nodes.use(index) and self._log is not None:
                    self._log.warning(
                        "database_server_changed", server=self.nodes.name(index), previous=was,
                        reason="; ".join(reasons) or "preferred server usable again",
                    )
                if old is not None:
                    self._spawn(self._drain(old))
                return
            if only is not None:
                return
            if self._log is not None and time.monotonic() - self._all_down_at > self.nodes.retry_after:
                self._log.warning("database_unavailable", reason="; ".join(reasons))
            self._all_down_at = time.monotonic()
            self._all_down_reason = "; ".join(reasons)
            # The reasons name servers and their errors: for the log and the
            # operator at startup, never for a client.
            raise StoreError()

    async def _drain(self, pool: aiomysql.Pool) -> None:
        """Close a pool that is no longer used: its idle connections now,
        the busy ones as their calls finish."""
        pool.close()
        try:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.wait_closed(), self._timeout * 4)
        finally:
            pool.terminate()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _leave_quietly(self, pool: aiomysql.Pool) -> None:
        with contextlib.suppress(StoreError):
            await self._use_node(avoid=pool)

    def _suspect(self, pool: aiomysql.Pool | None, index: int) -> None:
        """A call on ``index`` ran out of time: a hung node answers nothing,
        not even an error. Probe it in the background and leave it if it
        does not answer, so that the next calls go elsewhere."""
        if not self.nodes.clustered or self._checking:
            return
        self._checking = True

        async def check() -> None:
            try:
                if pool is not None and not (await self._probe(index, self._probe_budget)).usable:
                    await self._leave_quietly(pool)
            finally:
                self._checking = False

        self._spawn(check())

    async def _watch(self) -> None:
        """Every few seconds: move back to a preferred server that is
        usable again, and leave the current one if it stopped being usable
        while no call noticed (a node that fell out of the primary component)."""
        while True:
            await asyncio.sleep(self.nodes.retry_after)
            with contextlib.suppress(StoreError):
                better = self.nodes.better_than_current()
                if better:
                    await self._use_node(only=better)
                pool, current = self._pool, self._pool_node
                if self.galera and pool is not None:
                    if not (await self._probe(current, self._probe_budget)).usable:
                        await self._use_node(avoid=pool)

    async def open(self) -> None:
        where = self.url.masked()
        try:
            await self._use_node()
        except StoreError:
            raise StoreError(f"cannot connect to {where}: {self._all_down_reason}") from None
        try:
            await self._prepare()
        except KMSError as exc:
            await self.close()
            raise StoreError(f"cannot prepare database {where}: {exc.message}") from None
        if self.nodes.clustered:
            self._watcher = asyncio.create_task(self._watch(), name="database-watch")

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
        # On Galera a commit is durable once certified (every node applies
        # it); a node's own log flush matters less there.
        if str(flush) != "1" and not self.galera:
            self.warnings.append(
                f"innodb_flush_log_at_trx_commit={flush}: a committed write can be lost in a crash; set it to 1"
            )
        await self._migrate()
        if self.galera:
            self.warnings += await self._run(
                lambda cur: galera_checks(cur, self.url.sync_wait, clustered=self.nodes.clustered), detail=True
            )

    async def _migrate(self) -> None:
        """Apply pending migrations under a lease row, so that several
        daemons starting on one database (on one server or on several
        nodes of a cluster) do not race. DDL commits implicitly in MySQL,
        so every step is written to be re-runnable."""
        async def leases(cur: aiomysql.Cursor) -> None:
            await cur.execute("SET SESSION sql_notes = 0")  # "already exists" is expected
            try:
                await cur.execute(LEASES_TABLE.format(bin=self.collation))
            finally:
                await cur.execute("SET SESSION sql_notes = 1")

        await self._run(leases, write="statement", detail=True)
        holder = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}:schema"
        await self._take_schema_lease(holder)
        # Renewed in the background while any step runs: a long ALTER on a
        # large table must not let another daemon start the same steps.
        renewal = asyncio.create_task(self._renew_schema_lease(holder))
        # A step the server did not answer in time may still be running
        # there: then the lease is left to run out instead of released.
        unanswered = False
        try:
            async def versions(cur: aiomysql.Cursor) -> set[int]:
                # "Table already exists" notes are expected on an original database.
                await cur.execute("SET SESSION sql_notes = 0")
                await cur.execute(
                    "CREATE TABLE IF NOT EXISTS kmsd_schema_migrations ("
                    " version INT PRIMARY KEY, applied_at DATETIME NOT NULL) ENGINE=InnoDB"
                )
                await cur.execute("SET SESSION sql_notes = 1")
                await cur.execute("SELECT version FROM kmsd_schema_migrations")
                return {r[0] for r in await cur.fetchall()}

            done = await self._run(versions, detail=True)
            for version, statements in enumerate(MIGRATIONS, start=1):
                if version in done:
                    continue
                if renewal.done():
                    raise StoreError("lost the schema migration lease to another process")
                await self._run(
                    lambda cur, v=version, st=statements: self._apply(cur, v, st),  # type: ignore[misc]
                    detail=True, timeout=self._timeout * 20,
                )
        except StoreError as exc:
            unanswered = isinstance(exc.__cause__, (OSError, pymysql.InterfaceError))
            raise
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            if not unanswered:
                with contextlib.suppress(StoreError):
                    await self.release_lease(_SCHEMA_LEASE, holder)

    async def _take_schema_lease(self, holder: str) -> None:
        """Wait while another process migrates (its lease stays live while
        it works), at most ``_SCHEMA_WAIT``; take the lease when it is free
        or has run out (its holder died)."""
        started = time.monotonic()
        while not await self.acquire_lease(_SCHEMA_LEASE, holder, _SCHEMA_LEASE_TTL):
            if time.monotonic() - started > _SCHEMA_WAIT:
                lease = await self.get_lease(_SCHEMA_LEASE)
                raise StoreError(
                    f"another process ({lease[0] if lease else 'unknown'}) has been migrating the schema"
                    f" for over {_SCHEMA_WAIT:.0f}s"
                )
            await asyncio.sleep(0.1 + random.random() * 0.1)  # noqa: S311 - jitter

    async def _renew_schema_lease(self, holder: str) -> None:
        """Until cancelled; returns if another process took the lease."""
        while True:
            await asyncio.sleep(_SCHEMA_LEASE_TTL / 4)
            try:
                if not await self.acquire_lease(_SCHEMA_LEASE, holder, _SCHEMA_LEASE_TTL):
                    return
            except StoreError:
                continue  # the next try is well within the lease's lifetime

    async def _apply(self, cur: aiomysql.Cursor, version: int, statements: Sequence[str]) -> None:
        """One migration, then its row in kmsd_schema_migrations."""
        if version == 3:
            await cur.execute("SELECT COUNT(*) FROM master_keys WHERE status = 'active'")
            actives = (await cur.fetchone())[0]
            if actives > 1:
                raise StoreError(
                    f"master_keys has {actives} active keys; exactly one may be: set all but the"
                    " newest to 'retired' (UPDATE master_keys SET status = 'retired' WHERE ...)"
                    " and start again"
                )
        await cur.execute("SET SESSION sql_notes = 0")
        try:
            for statement in statements:
                await apply_step(cur, statement.format(bin=self.collation))
        finally:
            await cur.execute("SET SESSION sql_notes = 1")
        await cur.execute(
            "INSERT INTO kmsd_schema_migrations (version, applied_at) VALUES (%s, UTC_TIMESTAMP())"
            " ON DUPLICATE KEY UPDATE version = version",
            (version,),
        )

    async def close(self) -> None:
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await self._reads.close()
        await self._states.close()
        await self._inserts.close()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        # Under the switch lock: a failover in progress either finished
        # (its pool is closed here) or sees _closed and opens none.
        async with self._switch:
            if self._pool is not None:
                self._pool.close()
                await self._pool.wait_closed()
                self._pool = None

    # -- the one place that talks to the driver ------------------------------------

    async def _current(self) -> tuple[aiomysql.Pool, int]:
        if self._closed:
            raise StoreError()
        if self._pool is None or self._pool.closed:
            await self._use_node()
        assert self._pool is not None
        return self._pool, self._pool_node

    async def _recover(self, exc: BaseException, pool: aiomysql.Pool, maybe_committed: bool, attempt: int) -> bool:
        """After a failed attempt on ``pool``'s node: whether the call may
        run again, once this returns (after a failover or a backoff)."""
        code = _code(exc)
        lost = code in _CONNECTION_LOST or isinstance(exc, pymysql.InterfaceError)
        if maybe_committed and code not in _NOT_APPLIED:
            # The write may have reached the cluster (a lost connection, or
            # 1180 when a Galera node leaves the primary component during
            # COMMIT): never run it again. Later calls go elsewhere.
            if lost or code in _COMMIT_FAILED:
                self._spawn(self._leave_quietly(pool))
            return False
        if lost or code in _NODE_NOT_READY:
            # This node failed and nothing was applied: the next attempt
            # (and every later call) goes to the next usable one.
            await self._use_node(avoid=pool)
            return True
        if code in _ROLLED_BACK:
            # A deadlock, a lock-wait timeout or a certification failure
            # rolled the whole transaction back.
            await asyncio.sleep(_backoff(attempt))
            return True
        return False

    def _replaced(self, pool: aiomysql.Pool) -> bool:
        return pool is not self._pool

    async def _once(
        self, pool: aiomysql.Pool, work: Callable[[aiomysql.Cursor], Awaitable[T]], write: str | None, state: _Attempt
    ) -> T | _Replaced:
        """One attempt of ``_run`` on ``pool``; ``_Replaced`` when a failover
        replaced that pool before anything was sent."""
        async with self._gate:
            if self._replaced(pool):
                return _Replaced()
            try:
                conn = await pool.acquire()
            except RuntimeError as exc:
                if self._replaced(pool):
                    return _Replaced()  # closed by a failover while we waited
                # aiomysql, when the server goes away while it connects:
                # "Transport does not expose socket instance". A lost
                # connection, nothing sent.
                raise pymysql.OperationalError(2013, "lost connection while connecting") from exc
            try:
                if write == "transaction":
                    await conn.begin()
                state.maybe_committed = write == "statement"
                async with conn.cursor() as cur:
                    result = await work(cur)
                if write == "transaction":
                    state.maybe_committed = True
                    await conn.commit()
            except BaseException:
                # Its state is unknown: never hand it out again.
                conn.close()
                raise
            finally:
                pool.release(conn)
            return result

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
        state = _Attempt()
        pool: aiomysql.Pool | None = None
        node = self._pool_node
        try:
            async with asyncio.timeout(timeout or self._timeout):
                for attempt in range(1, _ATTEMPTS + 1):
                    # Once a write may have reached COMMIT, a lost connection
                    # leaves its outcome unknown: never run it again then.
                    state.maybe_committed = False
                    try:
                        pool, node = await self._current()
                        result = await self._once(pool, work, write, state)
                        if not isinstance(result, _Replaced):
                            return result
                    except pymysql.IntegrityError as exc:
                        if _code(exc) == _DUPLICATE_KEY:
                            raise Conflict() from None
                        raise
                    except (pymysql.OperationalError, pymysql.InterfaceError, pymysql.InternalError) as exc:
                        assert pool is not None
                        if attempt == _ATTEMPTS or not await self._recover(exc, pool, state.maybe_committed, attempt):
                            raise
                raise StoreError()  # every attempt found its pool replaced: failovers in a row
        except (Conflict, StoreError):
            raise
        except (pymysql.MySQLError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                self._suspect(pool, node)
            # TimeoutError is an OSError: the budget ran out. An error the
            # server answered before COMMIT undid the statement; no answer,
            # or an unexpected one at COMMIT, leaves it open.
            if state.maybe_committed and (
                isinstance(exc, (OSError, pymysql.InterfaceError))
                or (isinstance(exc, pymysql.OperationalError) and _code(exc) not in _NOT_APPLIED)
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
