"""The SQL both backends share, written once.

A ``Dialect`` holds the few places where SQLite and MySQL/MariaDB spell a
thing differently (placeholders, a byte-exact comparison, the database's
clock, "insert unless present", an upsert, a bytes parameter); ``SQLStore``
builds every shared statement from it and implements each ``Store`` method
that is the same on both in terms of four primitives a backend provides:
``_read``, ``_write``, ``_write_then`` and ``_write_each_once``. What really
differs (migrations, connections, batching, the point reads) stays in
``store_sqlite`` and ``store_mysql``, so the backends cannot drift apart on
what a statement means.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .store import KeyDeletion, MasterKeyRow, Record, RotationJob, SigningKeyRow, now_utc

__all__ = [
    "DEK_PREFIX", "DELETION_COLUMNS", "JOB_COLUMNS", "MYSQL", "RECORD_COLUMNS", "REVOCATION_MARGIN", "SQLITE",
    "Dialect", "SQLStore", "Statement", "as_text", "record_from_row",
]

# The indexed prefix of kms_keys.encrypted_dek (both backends).
DEK_PREFIX = 32
# Seconds a revocation outlives its token's exp: the daemons' clocks and
# the database's may disagree by that much.
REVOCATION_MARGIN = 300

RECORD_COLUMNS = "user_id, encrypted_key, encrypted_dek, created_at, master_key_id"
JOB_COLUMNS = (
    "id, state, target_key_id, requested_by, started_at, finished_at, rewrapped, changed, unreadable, active_seconds"
)

DELETION_COLUMNS = "key_id, delete_after, requested_by, scheduled_at"

Statement = tuple[str, Sequence[Any]]


@dataclass(frozen=True)
class Dialect:
    mark: str  # a placeholder
    now: str  # seconds since the epoch, by the database's clock (leases agree across hosts)
    # "INSERT ... VALUES (...)" followed by this leaves the row whose key
    # ``key`` exists as it is (without the warning of MySQL's INSERT IGNORE).
    keep: Callable[[str], str]
    # A NULL-safe, byte-exact comparison of a column with a parameter (a
    # compare-and-set on text the original system's collation folds).
    exact: Callable[[str], str]
    # Byte-exact equality of a NOT NULL key column with a parameter.
    key: Callable[[str], str]
    # "INSERT ... VALUES (...)" followed by this updates ``columns`` of the
    # row whose key exists.
    upsert: Callable[[str, Sequence[str]], str]
    blob: str  # the placeholder of a bytes parameter
    blob_param: Callable[[bytes], Any]


# Where the two databases differ, side by side.
SQLITE = Dialect(
    mark="?",
    # julianday works on every version.
    now="((julianday('now') - 2440587.5) * 86400.0)",
    keep=lambda key: f" ON CONFLICT ({key}) DO NOTHING",
    # The BINARY collation compares bytes; IS is = that also matches NULL.
    exact=lambda column: f"{column} IS ?",
    key=lambda column: f"{column} = ?",
    upsert=lambda key, columns: f" ON CONFLICT ({key}) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in columns),
    blob="?",
    blob_param=bytes,
)

MYSQL = Dialect(
    mark="%s",
    now="UNIX_TIMESTAMP(NOW(6))",
    keep=lambda key: f" ON DUPLICATE KEY UPDATE {key} = {key}",
    # BINARY: the original's columns compare case- and pad-insensitively.
    exact=lambda column: f"BINARY {column} <=> BINARY %s",
    key=lambda column: f"BINARY {column} = %s",
    upsert=lambda _key, columns: " ON DUPLICATE KEY UPDATE " + ", ".join(f"{c} = VALUES({c})" for c in columns),
    # Hex: aiomysql cannot send a bytes parameter (pymysql 1.1 dropped what it calls).
    blob="UNHEX(%s)",
    blob_param=bytes.hex,
)


def as_text(value: Any) -> Any:
    # MySQL answers DATETIME columns as datetime; the contract speaks text.
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return value


def record_from_row(row: Sequence[Any]) -> Record:
    return Record(row[0], row[1], row[2], as_text(row[3]), row[4])


def _job(row: Sequence[Any]) -> RotationJob:
    return RotationJob(
        int(row[0]), row[1], row[2], row[3], as_text(row[4]) or "", as_text(row[5]),
        int(row[6]), int(row[7]), int(row[8]), float(row[9]),
    )


class SQLStore:
    """The ``Store`` methods that are the same statements on every backend.

    A backend supplies the primitives; each runs in one transaction, commits
    durably before it returns, turns a duplicate key into ``Conflict`` and
    a failing database into ``StoreError``."""

    dialect: Dialect

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        raise NotImplementedError

    async def _write(self, *statements: Statement) -> int:
        """Run the statements in one transaction; the rows the last changed."""
        raise NotImplementedError

    async def _write_then(self, first: Statement, then: Sequence[Statement]) -> bool:
        """``first``, and, only if it changed a row, ``then`` (one transaction)."""
        raise NotImplementedError

    async def _write_each_once(self, statements: Sequence[Statement]) -> bool:
        """All of ``statements``, each of which must change exactly one row,
        or none of them (one transaction): whether they all did."""
        raise NotImplementedError

    async def _insert_id(self, sql: str, params: Sequence[Any]) -> int:
        """One INSERT; the id of its row."""
        raise NotImplementedError

    # -- statements ----------------------------------------------------------------

    def _marks(self, n: int) -> str:
        return ", ".join([self.dialect.mark] * n)

    def _select_records(self, n: int) -> str:
        return f"SELECT {RECORD_COLUMNS} FROM kms_keys WHERE user_id IN ({self._marks(n)})"

    def _insert_statement(self, records: Sequence[Record]) -> Statement:
        rows = ", ".join([f"({self._marks(5)})"] * len(records))
        params = [v for r in records for v in (r.user_id, r.encrypted_key, r.encrypted_dek, r.created_at,
                                                r.master_key_id)]
        return f"INSERT INTO kms_keys ({RECORD_COLUMNS}) VALUES {rows}", params

    def _set_generations(self, pairs: Sequence[tuple[str, str]]) -> Statement:
        rows = ", ".join([f"({self._marks(2)})"] * len(pairs))
        return (
            f"INSERT INTO kmsd_subjects (user_id, generation) VALUES {rows}"
            + self.dialect.upsert("user_id", ["generation"]),
            [v for pair in pairs for v in pair],
        )

    def _same_generation(self, user_id: str, generation: str) -> Statement:
        # A condition on the row's user: its token generation is still this one.
        m = self.dialect.mark
        return f"COALESCE((SELECT generation FROM kmsd_subjects WHERE user_id = {m}), '') = {m}", [user_id, generation]

    def _same_ciphertexts(self, record: Record) -> Statement:
        d = self.dialect
        same = f"{d.exact('encrypted_key')} AND {d.exact('encrypted_dek')}"
        return same, [record.encrypted_key, record.encrypted_dek]

    def _releasing(self, user_id: str, release: bytes | None, generation: str | None) -> list[Statement]:
        """What a change of ``user_id``'s row does beside it: remember the
        digest of its old wrapped DEK as the user's, set its token generation."""
        then: list[Statement] = []
        if release is not None:
            then.append((
                f"INSERT INTO kmsd_released_deks (digest, user_id) VALUES ({self.dialect.blob}, {self.dialect.mark})"
                + self.dialect.keep("digest"),
                (self.dialect.blob_param(release), user_id),
            ))
        if generation is not None:
            then.append(self._set_generations([(user_id, generation)]))
        return then

    async def _change(self, sql: str, params: list[Any], user_id: str, release: bytes | None,
                      generation: str | None = None) -> bool:
        then = self._releasing(user_id, release, generation)
        if not then:
            return await self._write((sql, params)) > 0
        return await self._write_then((sql, params), then)

    # -- records ---------------------------------------------------------------------

    async def count_records(self) -> int:
        rows = await self._read("SELECT COUNT(*) FROM kms_keys")
        return int(rows[0][0])

    async def scan_records(self, after: str | None, limit: int) -> list[Record]:
        # '' sorts before every user id, and user ids are never empty.
        m = self.dialect.mark
        rows = await self._read(
            f"SELECT {RECORD_COLUMNS} FROM kms_keys WHERE user_id > {m} ORDER BY user_id LIMIT {m}",
            (after or "", limit),
        )
        return [record_from_row(r) for r in rows]

    async def count_records_by_key(self) -> dict[str | None, int]:
        rows = await self._read("SELECT master_key_id, COUNT(*) FROM kms_keys GROUP BY master_key_id")
        return {r[0]: int(r[1]) for r in rows}

    async def scan_records_to_rewrap(self, active_key_id: str, after: str | None, limit: int) -> list[Record]:
        m = self.dialect.mark
        rows = await self._read(
            f"SELECT {RECORD_COLUMNS} FROM kms_keys WHERE user_id > {m}"
            f" AND (master_key_id IS NULL OR master_key_id <> {m}) ORDER BY user_id LIMIT {m}",
            (after or "", active_key_id, limit),
        )
        return [record_from_row(r) for r in rows]

    async def upsert_record(self, record: Record) -> None:
        sql, params = self._insert_statement([record])
        await self._write(
            (sql + self.dialect.upsert("user_id", ["encrypted_key", "encrypted_dek", "created_at", "master_key_id"]),
             params)
        )

    async def delete_record(
        self,
        user_id: str,
        *,
        only_if: Record | None = None,
        release: bytes | None = None,
        expect_generation: str | None = None,
        generation: str | None = None,
    ) -> bool:
        sql, params = f"DELETE FROM kms_keys WHERE user_id = {self.dialect.mark}", [user_id]
        conditions = []
        if only_if is not None:
            conditions.append(self._same_ciphertexts(only_if))
        if expect_generation is not None:
            conditions.append(self._same_generation(user_id, expect_generation))
        for condition, values in conditions:
            sql += f" AND {condition}"
            params += values
        return await self._change(sql, params, user_id, release, generation)

    async def replace_record(
        self, old: Record, new: Record, *, release: bytes | None = None, expect_generation: str | None = None
    ) -> bool:
        m = self.dialect.mark
        same, values = self._same_ciphertexts(old)
        sql = (
            f"UPDATE kms_keys SET encrypted_key = {m}, encrypted_dek = {m}, created_at = {m}, master_key_id = {m}"
            f" WHERE user_id = {m} AND {same}"
        )
        params = [new.encrypted_key, new.encrypted_dek, new.created_at, new.master_key_id, old.user_id, *values]
        if expect_generation is not None:
            condition, more = self._same_generation(old.user_id, expect_generation)
            sql += f" AND {condition}"
            params += more
        return await self._change(sql, params, old.user_id, release)

    # -- tokens ------------------------------------------------------------------------

    async def set_generation(self, user_id: str, generation: str) -> None:
        await self._write(self._set_generations([(user_id, generation)]))

    async def revoke_token(self, token_id: str, expires_at: int) -> None:
        d = self.dialect
        await self._write(
            (f"INSERT INTO kmsd_revoked_tokens (token_id, expires_at) VALUES ({self._marks(2)})" + d.keep("token_id"),
             (token_id, expires_at)),
            (f"DELETE FROM kmsd_revoked_tokens WHERE expires_at < {d.now} - {REVOCATION_MARGIN}", ()),
        )

    async def released_owners(self, digest: bytes) -> list[str]:
        rows = await self._read(
            f"SELECT user_id FROM kmsd_released_deks WHERE digest = {self.dialect.blob}",
            (self.dialect.blob_param(digest),),
        )
        return [r[0] for r in rows]

    # -- master keys and signing keys -----------------------------------------------------

    async def list_master_keys(self) -> list[MasterKeyRow]:
        rows = await self._read(
            "SELECT key_id, key_material, status, created_at, description FROM master_keys ORDER BY id"
        )
        return [MasterKeyRow(r[0], r[1], r[2], as_text(r[3]) or "", r[4]) for r in rows]

    async def add_master_key(self, row: MasterKeyRow) -> None:
        # The UPDATE locks every active row first, so two concurrent
        # additions serialize and exactly one key ends up active.
        await self._write(
            ("UPDATE master_keys SET status = 'retired' WHERE status = 'active'", ()),
            (
                "INSERT INTO master_keys (key_id, key_material, created_at, status, description)"
                f" VALUES ({self._marks(3)}, 'active', {self.dialect.mark})",
                (row.key_id, row.key_material, row.created_at, row.description),
            ),
        )

    async def _insert_first(
        self, table: str, columns: str, before: Sequence[Any], after: Sequence[Any], where: str = ""
    ) -> bool:
        """INSERT one active row (``before``, 'active', ``after``, in the
        order of ``columns``) unless ``SELECT 1 FROM table where`` finds one:
        decided by the database in one statement."""
        return await self._write(
            (
                f"INSERT INTO {table} ({columns})"
                f" SELECT {self._marks(len(before))}, 'active', {self._marks(len(after))}"
                f" FROM (SELECT 1 AS one) AS first_row WHERE NOT EXISTS (SELECT 1 FROM {table}{where})",
                (*before, *after),
            )
        ) > 0

    async def add_first_master_key(self, row: MasterKeyRow) -> bool:
        # On Galera the unique one-active index makes two nodes' first keys
        # conflict at certification; the retry then finds one and inserts none.
        return await self._insert_first(
            "master_keys", "key_id, key_material, created_at, status, description",
            (row.key_id, row.key_material, row.created_at), (row.description,),
        )

    def _replace_material(self, table: str, column: str, key: str, old: str, new: str) -> Statement:
        d = self.dialect
        return (
            f"UPDATE {table} SET key_material = {d.mark} WHERE {d.key(column)} AND {d.exact('key_material')}",
            (new, key, old),
        )

    async def replace_master_key_material(self, key_id: str, old: str, new: str) -> bool:
        return await self._write(self._replace_material("master_keys", "key_id", key_id, old, new)) > 0

    async def replace_key_materials(
        self, master: Sequence[tuple[str, str, str]], signing: Sequence[tuple[str, str, str]]
    ) -> bool:
        return await self._write_each_once(
            [self._replace_material("master_keys", "key_id", *row) for row in master]
            + [self._replace_material("kmsd_signing_keys", "kid", *row) for row in signing]
        )

    def _delete_unused_key(self, key_id: str, *, due: float | None = None) -> Statement:
        """DELETE a retired master key only if no record is under it and
        none is unclassified (it may be under it); with ``due``, only if its
        scheduled deletion exists and is due by then. One statement: the
        database decides, not a read before it."""
        d, m = self.dialect, self.dialect.mark
        sql = (
            f"DELETE FROM master_keys WHERE {d.key('key_id')} AND status = 'retired' AND NOT EXISTS"
            f" (SELECT 1 FROM kms_keys WHERE master_key_id = {m} OR master_key_id IS NULL)"
        )
        params: list[Any] = [key_id, key_id]
        if due is not None:
            # The key id as a parameter, not a join: master_keys.key_id keeps
            # the original's collation, which MySQL will not compare with ours.
            sql += f" AND EXISTS (SELECT 1 FROM kmsd_key_deletions WHERE {d.key('key_id')} AND delete_after <= {m})"
            params += [key_id, due]
        return sql, params

    def _forget_deletion(self, key_id: str) -> Statement:
        return f"DELETE FROM kmsd_key_deletions WHERE {self.dialect.key('key_id')}", (key_id,)

    async def delete_master_key(self, key_id: str) -> bool:
        return await self._write_then(self._delete_unused_key(key_id), [self._forget_deletion(key_id)])

    async def destroy_scheduled_key(self, key_id: str, now: float) -> bool:
        return await self._write_then(self._delete_unused_key(key_id, due=now), [self._forget_deletion(key_id)])

    async def schedule_key_deletion(self, deletion: KeyDeletion) -> bool:
        # INSERT ... SELECT from the key's row: a key that is not retired
        # (or not there) selects nothing, in the same statement. A second
        # schedule of one key is the primary key's duplicate: Conflict.
        d = self.dialect
        return await self._write(
            (
                f"INSERT INTO kmsd_key_deletions ({DELETION_COLUMNS}) SELECT {self._marks(4)}"
                f" FROM master_keys WHERE {d.key('key_id')} AND status = 'retired'",
                (deletion.key_id, deletion.delete_after, deletion.requested_by, deletion.scheduled_at,
                 deletion.key_id),
            )
        ) > 0

    async def cancel_key_deletion(self, key_id: str) -> bool:
        return await self._write(self._forget_deletion(key_id)) > 0

    async def list_key_deletions(self) -> list[KeyDeletion]:
        rows = await self._read(f"SELECT {DELETION_COLUMNS} FROM kmsd_key_deletions ORDER BY key_id")
        return [KeyDeletion(r[0], float(r[1]), r[2], as_text(r[3]) or "") for r in rows]

    async def list_signing_keys(self) -> list[SigningKeyRow]:
        rows = await self._read(
            "SELECT kid, public_key, key_material, status, created_at FROM kmsd_signing_keys ORDER BY created_at, kid"
        )
        return [SigningKeyRow(r[0], r[1], r[2], r[3], as_text(r[4]) or "") for r in rows]

    async def add_signing_key(self, row: SigningKeyRow) -> None:
        await self._write(
            ("UPDATE kmsd_signing_keys SET status = 'retired' WHERE status = 'active'", ()),
            (
                "INSERT INTO kmsd_signing_keys (kid, public_key, key_material, status, created_at)"
                f" VALUES ({self._marks(3)}, 'active', {self.dialect.mark})",
                (row.kid, row.public_key, row.key_material, row.created_at),
            ),
        )

    async def add_first_signing_key(self, row: SigningKeyRow) -> bool:
        return await self._insert_first(
            "kmsd_signing_keys", "kid, public_key, key_material, status, created_at",
            (row.kid, row.public_key, row.key_material), (row.created_at,), " WHERE status = 'active'",
        )

    # -- leases and rotation jobs ------------------------------------------------------------

    def _take_lease(self, name: str, holder: str, ttl: float) -> Statement:
        d = self.dialect
        return (
            f"UPDATE kmsd_leases SET holder = {d.mark}, expires_at = {d.now} + {d.mark}"
            f" WHERE name = {d.mark} AND (holder = {d.mark} OR holder = '' OR expires_at < {d.now})",
            (holder, ttl, name, holder),
        )

    def _create_lease(self, name: str) -> Statement:
        return (
            f"INSERT INTO kmsd_leases (name, holder, expires_at) VALUES ({self.dialect.mark}, '', 0)"
            + self.dialect.keep("name"),
            (name,),
        )

    async def release_lease(self, name: str, holder: str) -> None:
        m = self.dialect.mark
        await self._write(
            (f"UPDATE kmsd_leases SET holder = '', expires_at = 0 WHERE name = {m} AND holder = {m}", (name, holder))
        )

    async def get_lease(self, name: str) -> tuple[str, float] | None:
        rows = await self._read(
            f"SELECT holder, expires_at - {self.dialect.now} FROM kmsd_leases WHERE name = {self.dialect.mark}", (name,)
        )
        if rows and rows[0][0] and float(rows[0][1]) > 0:
            return str(rows[0][0]), float(rows[0][1])
        return None

    async def start_rotation_job(self, target_key_id: str, requested_by: str | None) -> RotationJob:
        started = now_utc()
        job_id = await self._insert_id(
            "INSERT INTO kmsd_rotation_jobs (state, target_key_id, requested_by, started_at)"
            f" VALUES ('running', {self._marks(3)})",
            (target_key_id, requested_by, started),
        )
        return RotationJob(job_id, "running", target_key_id, requested_by, started)

    async def update_rotation_job(self, job: RotationJob) -> None:
        m = self.dialect.mark
        await self._write(
            (
                f"UPDATE kmsd_rotation_jobs SET state = {m}, finished_at = {m}, rewrapped = {m}, changed = {m},"
                f" unreadable = {m}, active_seconds = {m} WHERE id = {m}",
                (job.state, job.finished_at, job.rewrapped, job.changed, job.unreadable, job.active_seconds, job.id),
            )
        )

    async def latest_rotation_job(self) -> RotationJob | None:
        rows = await self._read(f"SELECT {JOB_COLUMNS} FROM kmsd_rotation_jobs ORDER BY id DESC LIMIT 1")
        return _job(rows[0]) if rows else None
