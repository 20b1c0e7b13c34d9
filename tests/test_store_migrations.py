"""The schema's migrations: applied once, resumable when interrupted, and on
a database the original system created (its tables kept, user ids made
exact, two active master keys a clear error)."""

from __future__ import annotations

import pytest
from support.store import (
    T0,
    active,
    all_records,
    db_name,
    expected_versions,
    fields,
    keyed,
    mk,
    open_url,
    rec,
    rewrapped,
    schema_versions,
    sk,
)

from devtools.mariadb_server import MariaDBServer
from kmsd.store import Record, StoreError

# -- migrations ------------------------------------------------------------------------------


async def test_reopening_keeps_the_lifecycle_data_and_applies_nothing_again(
    backend: str, database_url: str, request: pytest.FixtureRequest
) -> None:
    store = await open_url(database_url)
    try:
        await store.add_master_key(mk("key-1"))
        await store.add_master_key(mk("key-2"))
        await store.insert_record(keyed("a", "key-1"))
        await store.insert_record(keyed("b", "key-2"))
        await store.insert_record(rec("c"))
        assert await store.acquire_lease("rotation", "host-a", 60.0) is True
        job = await store.start_rotation_job("key-2", "admin")
    finally:
        await store.close()

    for _ in range(2):
        store = await open_url(database_url)
        try:
            assert schema_versions(database_url, request) == expected_versions(database_url)
            assert await all_records(store) == {
                "a": fields(keyed("a", "key-1")), "b": fields(keyed("b", "key-2")), "c": fields(keyed("c", None)),
            }
            assert await store.count_records_by_key() == {"key-1": 1, "key-2": 1, None: 1}
            assert (await store.get_lease("rotation"))[0] == "host-a"  # type: ignore[index]
            assert await store.latest_rotation_job() == job
            assert active(await store.list_master_keys()) == ["key-2"]
            assert [r.user_id for r in await store.scan_records_to_rewrap("key-2", None, 10)] == ["a", "c"]
        finally:
            await store.close()
    # And the reopened database takes every lifecycle write.
    store = await open_url(database_url)
    try:
        assert await store.rewrap_records([rewrapped(keyed("a", "key-1"), "key-2")]) == 1
        assert await store.count_records_by_key() == {"key-2": 2, None: 1}
        assert await store.delete_master_key("key-1") is False  # "c" is unclassified
        await store.update_rotation_job(type(job)(job.id, "finished", "key-2", "admin", job.started_at, T0, 1, 0, 0, 0.1))
        assert (await store.latest_rotation_job()).state == "finished"  # type: ignore[union-attr]
    finally:
        await store.close()


async def test_mysql_an_interrupted_lifecycle_migration_completes_on_the_next_open(
    mysql_server: MariaDBServer,
) -> None:
    """MySQL commits DDL at once: a migration interrupted after some of its
    steps is applied again, step by step, on the next open."""
    from kmsd.mysql_schema import MIGRATIONS as _MIGRATIONS

    url = mysql_server.new_database()
    name = db_name(url)
    store = await open_url(url)
    try:
        await store.add_master_key(mk("key-1"))
        await store.insert_record(keyed("a", "key-1"))
        await store.insert_record(rec("b"))
    finally:
        await store.close()
    last = len(_MIGRATIONS)
    lifecycle = 3
    # As if the lifecycle migration stopped half way (and the ones after it
    # never ran): the column is there, its index and the jobs table are not,
    # and no version from it on is recorded.
    mysql_server.admin("DELETE FROM kmsd_schema_migrations WHERE version >= %s", (lifecycle,), db=name)
    mysql_server.admin("ALTER TABLE kms_keys DROP INDEX kms_keys_master_key_id", db=name)
    mysql_server.admin("ALTER TABLE kms_keys DROP INDEX kms_keys_encrypted_dek", db=name)
    mysql_server.admin("DROP TABLE kmsd_rotation_jobs", db=name)

    for round_ in range(2):
        store = await open_url(url)
        try:
            assert [r[0] for r in mysql_server.admin(
                "SELECT version FROM kmsd_schema_migrations ORDER BY version", db=name
            )] == list(range(1, last + 1))
            assert await all_records(store) == {"a": fields(keyed("a", "key-1")), "b": fields(keyed("b", None))}
            assert await store.count_records_by_key() == {"key-1": 1, None: 1}
            # The jobs table is back (empty the first time round).
            assert (await store.latest_rotation_job() is None) == (round_ == 0)
            await store.start_rotation_job("key-1", None)
        finally:
            await store.close()
    assert mysql_server.admin(
        "SELECT COUNT(DISTINCT INDEX_NAME) FROM information_schema.STATISTICS"
        " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'kms_keys'"
        " AND INDEX_NAME IN ('kms_keys_master_key_id', 'kms_keys_encrypted_dek')",
        (name,),
    ) == [(2,)]


async def test_mysql_open_migrates_an_original_database_to_the_lifecycle_schema(mysql_server: MariaDBServer) -> None:
    url = mysql_server.new_database(original_schema=True)
    name = db_name(url)
    mysql_server.admin(
        "INSERT INTO kms_keys (user_id, encrypted_key, encrypted_dek, created_at) VALUES"
        " ('SMOKE1', 'ek:SMOKE1:0', 'dek:SMOKE1:0', %s), ('alice', 'ek:alice:0', 'dek:alice:0', %s),"
        " ('legacy', NULL, NULL, NULL)",
        (T0, T0), db=name,
    )
    mysql_server.admin(
        "INSERT INTO master_keys (key_id, key_material, created_at, status) VALUES"
        " ('key-0', 'm0', %s, 'retired'), ('key-1', 'm1', %s, 'active')",
        (T0, T0), db=name,
    )

    store = await open_url(url)
    try:
        # The old rows: readable, unclassified.
        assert await all_records(store) == {
            "SMOKE1": fields(keyed("SMOKE1", None)),
            "alice": fields(keyed("alice", None)),
            "legacy": ("legacy", None, None, None, None),
        }
        assert await store.count_records_by_key() == {None: 3}
        assert [r.user_id for r in await store.scan_records_to_rewrap("key-1", None, 10)] == ["SMOKE1", "alice", "legacy"]
        assert [(r.key_id, r.status) for r in await store.list_master_keys()] == [("key-0", "retired"), ("key-1", "active")]
        # An unused retired key cannot go while records are unclassified.
        assert await store.delete_master_key("key-0") is False

        # Classify them all, then the retired key can go.
        old = await store.scan_records_to_rewrap("key-1", None, 10)
        assert await store.rewrap_records([rewrapped(r, "key-1") for r in old]) == 3
        assert await store.count_records_by_key() == {"key-1": 3}
        assert await store.scan_records_to_rewrap("key-1", None, 10) == []
        assert await store.delete_master_key("key-0") is True
        # New writes, leases, jobs; one active key.
        await store.insert_record(keyed("smoke1", "key-1", 1))
        assert await store.acquire_lease("rotation", "host-a", 30.0) is True
        job = await store.start_rotation_job("key-2", None)
        await store.add_master_key(mk("key-2"))
        assert active(await store.list_master_keys()) == ["key-2"]
    finally:
        await store.close()

    columns = mysql_server.admin(
        "SELECT TABLE_NAME, COLUMN_NAME, IS_NULLABLE, COLLATION_NAME FROM information_schema.COLUMNS"
        " WHERE TABLE_SCHEMA = %s AND COLUMN_NAME IN ('master_key_id', 'kmsd_one_active') ORDER BY TABLE_NAME",
        (name,),
    )
    assert columns == [
        ("kmsd_signing_keys", "kmsd_one_active", "YES", None),
        ("kms_keys", "master_key_id", "YES", "utf8mb4_nopad_bin"),
        ("master_keys", "kmsd_one_active", "YES", None),
    ]
    tables = {r[0] for r in mysql_server.admin(
        "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s", (name,)
    )}
    assert {"kms_keys", "master_keys", "kmsd_leases", "kmsd_rotation_jobs", "kmsd_signing_keys"} <= tables

    # Opened again: nothing applied twice, nothing lost.
    store = await open_url(url)
    try:
        assert [r[0] for r in mysql_server.admin(
            "SELECT version FROM kmsd_schema_migrations ORDER BY version", db=name
        )] == expected_versions(url)
        assert await store.count_records_by_key() == {"key-1": 4}
        assert (await store.get_lease("rotation"))[0] == "host-a"  # type: ignore[index]
        assert await store.latest_rotation_job() == job
    finally:
        await store.close()


async def test_mysql_original_database_with_two_active_keys_is_a_clear_error(mysql_server: MariaDBServer) -> None:
    """kmsd allows one active master key (a unique index); a database with
    two is reported, not half-migrated, and nothing is left open."""
    url = mysql_server.new_database(original_schema=True)
    name = db_name(url)
    for key_id in ("key-1", "key-2"):
        mysql_server.admin(
            "INSERT INTO master_keys (key_id, key_material, created_at, status) VALUES (%s, 'm', %s, 'active')",
            (key_id, T0), db=name,
        )
    with pytest.raises(StoreError, match="2 active keys"):
        await open_url(url)
    mysql_server.admin("UPDATE master_keys SET status = 'retired' WHERE key_id = 'key-1'", db=name)
    store = await open_url(url)
    try:
        assert [k.key_id for k in await store.list_master_keys() if k.status == "active"] == ["key-2"]
    finally:
        await store.close()


async def test_mysql_open_migrates_an_original_database(mysql_server: MariaDBServer) -> None:
    """The original system's tables, under its case- and pad-insensitive
    collation: after open, user ids compare exactly and the rows are kept."""
    url = mysql_server.new_database(original_schema=True)
    name = db_name(url)
    mysql_server.admin(
        "INSERT INTO kms_keys (user_id, encrypted_key, encrypted_dek, created_at) VALUES"
        " ('SMOKE1', 'ek:SMOKE1:0', 'dek:SMOKE1:0', %s), ('legacy', NULL, NULL, NULL)",
        (T0,), db=name,
    )
    mysql_server.admin(
        "INSERT INTO master_keys (key_id, key_material, created_at, status) VALUES ('key-1', 'm', %s, 'active')",
        (T0,), db=name,
    )
    # Under the original collation these are one user.
    assert mysql_server.admin("SELECT COUNT(*) FROM kms_keys WHERE user_id = 'smoke1 '", db=name) == [(1,)]

    store = await open_url(url)
    try:
        assert await store.get_record("SMOKE1") == rec("SMOKE1")
        assert await store.get_record("legacy") == Record("legacy", None, None, None)
        assert await store.get_record("smoke1") is None
        assert await store.get_record("smoke1 ") is None
        await store.insert_record(rec("smoke1", 1))
        await store.insert_record(rec("smoke1 ", 2))
        assert await store.get_record("SMOKE1") == rec("SMOKE1")
        assert await store.get_record("smoke1") == rec("smoke1", 1)
        assert await store.get_record("smoke1 ") == rec("smoke1 ", 2)
        assert [r.user_id for r in await store.scan_records(None, 10)] == ["SMOKE1", "legacy", "smoke1", "smoke1 "]
        assert [(r.key_id, r.status) for r in await store.list_master_keys()] == [("key-1", "active")]
        await store.add_master_key(mk("key-2"))
        assert active(await store.list_master_keys()) == ["key-2"]
    finally:
        await store.close()
    # And opening it again changes nothing.
    store = await open_url(url)
    try:
        assert await store.count_records() == 4
    finally:
        await store.close()
    assert mysql_server.admin(
        "SELECT COLLATION_NAME FROM information_schema.COLUMNS"
        " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'kms_keys' AND COLUMN_NAME = 'user_id'",
        (name,),
    ) == [("utf8mb4_nopad_bin",)]


async def test_open_applies_the_migrations_and_is_idempotent(
    database_url: str, request: pytest.FixtureRequest
) -> None:
    first = await open_url(database_url)
    try:
        assert schema_versions(database_url, request) == expected_versions(database_url)
        assert await first.count_records() == 0
        assert await first.list_master_keys() == []
        assert await first.list_signing_keys() == []
        await first.insert_record(rec("kept"))
        await first.add_master_key(mk("mk-1"))
        await first.add_signing_key(sk("sk-1"))

        # A second open on the same database (a restart, another daemon)
        # applies nothing again and loses nothing; both stores work.
        second = await open_url(database_url)
        try:
            assert schema_versions(database_url, request) == expected_versions(database_url)
            assert await second.get_record("kept") == rec("kept")
            assert [r.key_id for r in await second.list_master_keys()] == ["mk-1"]
            assert [r.kid for r in await second.list_signing_keys()] == ["sk-1"]
            await second.insert_record(rec("from-second"))
            assert await first.get_record("from-second") == rec("from-second")
        finally:
            await second.close()
        assert await first.count_records() == 2
    finally:
        await first.close()
    third = await open_url(database_url)
    try:
        assert await third.count_records() == 2
    finally:
        await third.close()


async def test_two_active_signing_keys_keep_the_newest_and_then_stay_one(
    backend: str, database_url: str, request: pytest.FixtureRequest
) -> None:
    """Before the one-active-signing-key migration, two daemons starting at
    once on two Galera nodes could each add one: the migration keeps the
    newest active, and from then on the database refuses a second."""
    import sqlite3

    from kmsd.config import parse_database_url
    from kmsd.errors import Conflict

    store = await open_url(database_url)
    await store.close()
    parsed = parse_database_url(database_url)
    rows = [
        ("kid-old", "pub:kid-old", "material:kid-old", "active", "2024-05-01 00:00:00"),
        ("kid-new", "pub:kid-new", "material:kid-new", "active", "2024-05-02 00:00:00"),
        ("kid-gone", "pub:kid-gone", "material:kid-gone", "retired", "2024-04-01 00:00:00"),
    ]
    insert = "INSERT INTO kmsd_signing_keys (kid, public_key, key_material, status, created_at) VALUES (%s, %s, %s, %s, %s)"
    if backend == "sqlite":
        version = 6
        conn = sqlite3.connect(parsed.path)
        conn.execute("DROP INDEX kmsd_signing_keys_one_active")
        conn.execute("DELETE FROM kmsd_schema_migrations WHERE version = ?", (version,))
        conn.executemany(insert.replace("%s", "?"), rows)
        conn.commit()
        conn.close()
    else:
        version = 7
        server: MariaDBServer = request.getfixturevalue("mariadb")
        name = parsed.database
        server.admin("ALTER TABLE kmsd_signing_keys DROP INDEX kmsd_signing_keys_one_active", db=name)
        server.admin("ALTER TABLE kmsd_signing_keys DROP COLUMN kmsd_one_active", db=name)
        server.admin("DELETE FROM kmsd_schema_migrations WHERE version = %s", (version,), db=name)
        for row in rows:
            server.admin(insert, row, db=name)
    store = await open_url(database_url)
    try:
        keys = await store.list_signing_keys()
        assert {k.kid: k.status for k in keys} == {"kid-old": "retired", "kid-new": "active", "kid-gone": "retired"}
        assert await store.add_first_signing_key(sk("kid-first")) is False
        await store.add_signing_key(sk("kid-next"))
        assert active(await store.list_signing_keys()) == ["kid-next"]
        # The database itself refuses a second active key.
        with pytest.raises(Conflict):
            await store._write(  # type: ignore[attr-defined]
                ("UPDATE kmsd_signing_keys SET status = 'active' WHERE kid = 'kid-old'", ())
            )
    finally:
        await store.close()
    assert version in schema_versions(database_url, request)
