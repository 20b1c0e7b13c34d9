"""The MySQL/MariaDB schema: kmsd's numbered migrations over the original
system's tables, each step written so that it can run again (MySQL commits
DDL at once, so an interrupted migration leaves a step half done)."""

from __future__ import annotations

from collections.abc import Sequence

import aiomysql

from .store_sql import DEK_PREFIX

__all__ = ["LEASES_TABLE", "MIGRATIONS", "NOPAD_COLLATIONS", "apply_step", "galera_checks"]

# Exact comparison needs a binary collation that does not pad: MariaDB's
# utf8mb4_bin and MySQL's utf8mb4_bin ignore trailing spaces.
NOPAD_COLLATIONS = ("utf8mb4_nopad_bin", "utf8mb4_0900_bin")

# Leases (rows taken by compare-and-set) are kmsd's only lock between
# daemons: GET_LOCK is local to one Galera node. The schema migrations run
# under one, so the table is made before them too (IF NOT EXISTS: the same
# definition as in migration 3, whichever comes first).
LEASES_TABLE = """CREATE TABLE IF NOT EXISTS kmsd_leases (
            name VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
            holder VARCHAR(255) CHARACTER SET utf8mb4 COLLATE {bin} NOT NULL,
            expires_at DOUBLE NOT NULL
        ) ENGINE=InnoDB"""

MIGRATIONS: Sequence[Sequence[str]] = (
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
        LEASES_TABLE,
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
    # 7: at most one active signing key, as for master keys: on Galera two
    # daemons starting at once on two nodes could each add one (a check
    # before the insert is not certified; a unique key is). A database that
    # has two already keeps the newest active (the others still verify).
    (
        "UPDATE kmsd_signing_keys s JOIN (SELECT kid FROM kmsd_signing_keys WHERE status = 'active'"
        " ORDER BY created_at DESC, kid DESC LIMIT 1) newest ON s.kid <> newest.kid"
        " SET s.status = 'retired' WHERE s.status = 'active'",
        "column kmsd_signing_keys kmsd_one_active TINYINT AS (IF(status = 'active', 1, NULL)) STORED",
        "index kmsd_signing_keys kmsd_signing_keys_one_active UNIQUE (kmsd_one_active)",
    ),
    # 8: scheduled key deletion. A table of its own, not a third value of
    # master_keys.status: the original system reads that ENUM and knows
    # only 'active' and 'retired'. delete_after is Unix time (DOUBLE), by
    # the scheduling daemon's clock.
    (
        """CREATE TABLE IF NOT EXISTS kmsd_key_deletions (
            key_id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE {bin} NOT NULL PRIMARY KEY,
            delete_after DOUBLE NOT NULL,
            requested_by VARCHAR(255),
            scheduled_at DATETIME NOT NULL
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
    ),
)


async def apply_step(cur: aiomysql.Cursor, statement: str) -> None:
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


async def galera_checks(cur: aiomysql.Cursor, sync_wait: int, *, clustered: bool) -> list[str]:
    """What kmsd needs of a Galera cluster, one line per problem found: row
    replication, InnoDB tables with primary keys (Galera replicates only
    InnoDB, and a table without a primary key replicates unreliably), the
    session's wsrep_sync_wait, and a cluster that can keep quorum."""
    problems: list[str] = []

    async def value(sql: str) -> str:
        await cur.execute(sql)
        row = await cur.fetchone()
        return "" if row is None else str(row[-1])

    binlog = await value("SELECT @@binlog_format")
    if binlog.upper() != "ROW":
        problems.append(f"galera: binlog_format={binlog}; Galera needs ROW (set binlog_format=ROW on every node)")
    await cur.execute(
        "SELECT TABLE_NAME, ENGINE FROM information_schema.TABLES"
        " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_TYPE = 'BASE TABLE' AND ENGINE <> 'InnoDB'"
    )
    for table, engine in await cur.fetchall():
        problems.append(f"galera: table {table} uses {engine}; Galera replicates InnoDB tables only")
    await cur.execute(
        "SELECT t.TABLE_NAME FROM information_schema.TABLES t WHERE t.TABLE_SCHEMA = DATABASE()"
        " AND t.TABLE_TYPE = 'BASE TABLE' AND NOT EXISTS (SELECT 1 FROM information_schema.TABLE_CONSTRAINTS c"
        " WHERE c.TABLE_SCHEMA = t.TABLE_SCHEMA AND c.TABLE_NAME = t.TABLE_NAME AND c.CONSTRAINT_TYPE = 'PRIMARY KEY')"
    )
    for (table,) in await cur.fetchall():
        problems.append(f"galera: table {table} has no primary key; Galera needs one on every table")
    session_wait = await value("SELECT @@SESSION.wsrep_sync_wait")
    if session_wait != str(sync_wait):
        problems.append(
            f"galera: wsrep_sync_wait is {session_wait} on kmsd's sessions, not {sync_wait}:"
            " reads on one node may miss writes made on another"
        )
    elif sync_wait == 0:
        problems.append("galera: wsrep_sync_wait=0 in the database URL: reads may miss writes made on another node")
    size = await value("SHOW GLOBAL STATUS LIKE 'wsrep_cluster_size'")
    if size.isdigit() and int(size) < 3:
        problems.append(
            f"galera: the cluster has {size} node(s); with fewer than 3 (or 2 and garbd) losing one loses quorum"
        )
    autoinc = await value("SELECT @@innodb_autoinc_lock_mode")
    if autoinc != "2":
        problems.append(f"galera: innodb_autoinc_lock_mode={autoinc}; Galera needs 2 (interleaved)")
    if not clustered:
        problems.append(
            "galera: the database URL names one node: list every node (mysql://user@h1,h2,h3/db)"
            " so that kmsd can move when that one fails"
        )
    return problems
