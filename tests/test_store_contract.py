"""The storage contract: every method of ``kmsd.store.Store``, written once
and run against both backends (SQLite, and a private MariaDB server), plus
what only a server can do to a client (go away, hang) on the MySQL leg.

Real databases only, no mocks: each test gets a fresh, empty database.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from mariadb import MariaDBServer

from kmsd.config import parse_database_url
from kmsd.errors import Conflict
from kmsd.store import MasterKeyRow, Record, SigningKeyRow, Store, StoreError, open_store

T0 = "2024-05-01 12:00:00"


def rec(user_id: str, n: int = 0, created_at: str | None = T0) -> Record:
    """A record whose two ciphertexts name the same write ``n``."""
    return Record(user_id, f"ek:{user_id}:{n}", f"dek:{user_id}:{n}", created_at)


def mk(key_id: str, n: int = 0, description: str | None = None, created_at: str = T0) -> MasterKeyRow:
    return MasterKeyRow(key_id, f"material:{key_id}:{n}", "active", created_at, description)


def sk(kid: str, created_at: str = T0) -> SigningKeyRow:
    return SigningKeyRow(kid, f"pub:{kid}", f"material:{kid}", "active", created_at)


async def open_url(url: str, **kw: Any) -> Store:
    store = open_store(parse_database_url(url), **kw)
    await store.open()
    return store


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    s = await open_url(database_url)
    try:
        yield s
    finally:
        await s.close()


def db_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def schema_versions(url: str, request: pytest.FixtureRequest) -> list[int]:
    parsed = parse_database_url(url)
    sql = "SELECT version FROM kmsd_schema_migrations ORDER BY version"
    if parsed.scheme == "sqlite":
        with contextlib.closing(sqlite3.connect(parsed.path)) as conn:
            return [r[0] for r in conn.execute(sql)]
    server: MariaDBServer = request.getfixturevalue("mariadb")
    return [r[0] for r in server.admin(sql, db=parsed.database)]


def expected_versions(url: str) -> list[int]:
    """Every migration the backend defines, numbered from 1."""
    if parse_database_url(url).scheme == "sqlite":
        from kmsd.store import _SQLITE_MIGRATIONS

        count = len(_SQLITE_MIGRATIONS)
    else:
        from kmsd.store_mysql import _MIGRATIONS

        count = len(_MIGRATIONS)
    return list(range(1, count + 1))


# -- open ------------------------------------------------------------------------------------


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


async def test_ping(store: Store) -> None:
    await store.ping()
    assert store.warnings == []


async def test_a_closed_store_raises_store_error(database_url: str) -> None:
    s = await open_url(database_url)
    await s.close()
    with pytest.raises(StoreError):
        await s.get_record("x")
    with pytest.raises(StoreError):
        await s.insert_record(rec("x"))


# -- records ------------------------------------------------------------------------------


async def test_get_insert_upsert_delete(store: Store) -> None:
    assert await store.get_record("alice") is None
    await store.insert_record(rec("alice"))
    assert await store.get_record("alice") == rec("alice")

    # upsert of a new user inserts it
    await store.upsert_record(rec("bob", 1))
    assert await store.get_record("bob") == rec("bob", 1)
    # upsert of an existing one replaces every column
    newer = rec("alice", 2, created_at="2025-01-02 03:04:05")
    await store.upsert_record(newer)
    assert await store.get_record("alice") == newer
    assert await store.get_record("bob") == rec("bob", 1)

    assert await store.delete_record("alice") is True
    assert await store.get_record("alice") is None
    assert await store.delete_record("alice") is False
    assert await store.delete_record("never-there") is False
    assert await store.get_record("bob") == rec("bob", 1)
    assert await store.count_records() == 1


async def test_null_columns_round_trip(store: Store) -> None:
    # The original system could leave NULLs behind.
    empty = Record("nulls", None, None, None)
    await store.insert_record(empty)
    assert await store.get_record("nulls") == empty
    await store.upsert_record(Record("nulls", "ek", None, None))
    assert await store.get_record("nulls") == Record("nulls", "ek", None, None)


async def test_insert_of_an_existing_user_id_is_a_conflict(store: Store) -> None:
    await store.insert_record(rec("carol", 1))
    with pytest.raises(Conflict):
        await store.insert_record(rec("carol", 2, created_at="2030-01-01 00:00:00"))
    assert await store.get_record("carol") == rec("carol", 1)
    assert await store.count_records() == 1
    # The store is still usable after a conflict.
    await store.insert_record(rec("dave"))
    assert await store.count_records() == 2


async def test_replace_record_is_compare_and_set(store: Store) -> None:
    old = rec("eve", 1)
    await store.insert_record(old)
    new = rec("eve", 2, created_at="2025-06-01 00:00:00")
    assert await store.replace_record(old, new) is True
    assert await store.get_record("eve") == new

    # The row changed meanwhile (it is `new` now): the stale `old` loses.
    assert await store.replace_record(old, rec("eve", 3)) is False
    assert await store.get_record("eve") == new

    # Someone else's upsert wins over a replace based on what it replaced.
    other = rec("eve", 4)
    await store.upsert_record(other)
    assert await store.replace_record(new, rec("eve", 5)) is False
    assert await store.get_record("eve") == other

    # Deleted meanwhile: False, and the row is not brought back.
    await store.delete_record("eve")
    assert await store.replace_record(other, rec("eve", 6)) is False
    assert await store.get_record("eve") is None
    assert await store.count_records() == 0


async def test_replace_record_compares_only_the_ciphertexts(store: Store) -> None:
    row = rec("frank", 1, created_at="2020-01-01 00:00:00")
    await store.insert_record(row)
    # `old` as the caller read it, with another created_at: still the same ciphertexts.
    seen = Record(row.user_id, row.encrypted_key, row.encrypted_dek, "2021-01-01 00:00:00")
    new = rec("frank", 2)
    assert await store.replace_record(seen, new) is True
    assert await store.get_record("frank") == new


async def test_replace_record_with_null_columns(store: Store) -> None:
    empty = Record("nully", None, None, None)
    await store.insert_record(empty)
    # A non-NULL `old` does not match a NULL row...
    assert await store.replace_record(rec("nully"), rec("nully", 1)) is False
    assert await store.get_record("nully") == empty
    # ...a NULL one does.
    assert await store.replace_record(empty, rec("nully", 1)) is True
    assert await store.get_record("nully") == rec("nully", 1)
    # NULL `old` against non-NULL row: no match.
    assert await store.replace_record(empty, rec("nully", 2)) is False
    # One column NULL, the other not.
    half = Record("nully", "ek-half", None, T0)
    assert await store.replace_record(rec("nully", 1), half) is True
    assert await store.get_record("nully") == half
    assert await store.replace_record(Record("nully", "ek-half", "dek", T0), rec("nully", 3)) is False
    assert await store.replace_record(Record("nully", None, None, T0), rec("nully", 3)) is False
    assert await store.replace_record(half, empty) is True
    assert await store.get_record("nully") == empty


async def test_replace_record_compares_ciphertexts_exactly(store: Store) -> None:
    # Base64 is case-sensitive and a trailing space is a different value:
    # a case- or pad-insensitive comparison would overwrite a row that changed.
    row = Record("grace", "QUJD", "ZGVr", T0)
    await store.insert_record(row)
    for stale in (
        Record("grace", "qujd", "ZGVr", T0),
        Record("grace", "QUJD", "zgvr", T0),
        Record("grace", "QUJD ", "ZGVr", T0),
        Record("grace", "QUJD", "ZGVr ", T0),
    ):
        assert await store.replace_record(stale, rec("grace", 9)) is False, stale.encrypted_key
        assert await store.get_record("grace") == row


async def test_replace_record_of_an_unchanged_row_with_the_same_values_succeeds(store: Store) -> None:
    # The row is exactly `old`: the compare part holds, so the answer is True
    # even when nothing needs to change (the caller must not think someone
    # else replaced the row).
    row = rec("heidi", 1)
    await store.insert_record(row)
    assert await store.replace_record(row, row) is True
    assert await store.get_record("heidi") == row


async def test_replace_master_key_material_with_the_same_material_succeeds(store: Store) -> None:
    await store.add_master_key(mk("key-1"))
    material = mk("key-1").key_material
    assert await store.replace_master_key_material("key-1", material, material) is True
    assert [r.key_material for r in await store.list_master_keys()] == [material]


async def test_count_records(store: Store) -> None:
    assert await store.count_records() == 0
    for i in range(7):
        await store.insert_record(rec(f"count-{i}"))
    assert await store.count_records() == 7
    await store.upsert_record(rec("count-0", 1))
    assert await store.count_records() == 7
    await store.delete_record("count-3")
    assert await store.count_records() == 6


SCAN_IDS = [
    "A", "B", "Z", "a", "a ", "a!", "aa", "b", "z", "0", "9", "user-01", "user-1", "user-10",
    "user-2", "é", "e\u0301", "ß", "ss", "用户", "🔑", "😀x", "\u00a0", "~", "SMOKE1", "smoke1",
    "smoke1 ", "x" * 64,
]


async def test_scan_records_walks_every_row_once_in_binary_order(store: Store) -> None:
    assert await store.scan_records(None, 10) == []
    for user_id in SCAN_IDS:
        await store.insert_record(rec(user_id))
    # Binary order: by code point (the order of the UTF-8 bytes).
    expected = sorted(SCAN_IDS)
    assert expected == sorted(SCAN_IDS, key=lambda s: s.encode())

    for limit in (1, 3, 7, len(SCAN_IDS), 100):
        seen: list[str] = []
        after: str | None = None
        pages = 0
        while page := await store.scan_records(after, limit):
            pages += 1
            assert len(page) <= limit
            if len(seen) + len(page) < len(SCAN_IDS):
                assert len(page) == limit  # only the last page is short
            assert all(r == rec(r.user_id) for r in page)
            seen += [r.user_id for r in page]
            after = page[-1].user_id
            assert pages <= len(SCAN_IDS) + 1, "the walk does not end"
        assert seen == expected, limit

    # Resumable from any id, present or not.
    for i, user_id in enumerate(expected):
        assert [r.user_id for r in await store.scan_records(user_id, 1000)] == expected[i + 1:]
    assert [r.user_id for r in await store.scan_records("user-0", 3)] == ["user-01", "user-1", "user-10"]
    assert [r.user_id for r in await store.scan_records("smoke1", 1)] == ["smoke1 "]
    assert await store.scan_records(expected[-1], 10) == []


# -- exact user ids ---------------------------------------------------------------------------


async def test_user_ids_compare_exactly(store: Store) -> None:
    ids = ["SMOKE1", "smoke1", "smoke1 ", "Smoke1", " smoke1", "smoke1  "]
    for i, user_id in enumerate(ids):
        await store.insert_record(rec(user_id, i))
    for i, user_id in enumerate(ids):
        assert await store.get_record(user_id) == rec(user_id, i), repr(user_id)
    assert await store.count_records() == len(ids)
    assert await store.get_record("smoke1   ") is None
    assert await store.get_record("SMOKE1 ") is None

    # Every write touches only its own user.
    await store.upsert_record(rec("smoke1 ", 10))
    assert await store.replace_record(rec("SMOKE1", 0), rec("SMOKE1", 11)) is True
    assert await store.replace_record(rec("smoke1", 1), rec("smoke1", 12)) is True
    assert await store.delete_record("Smoke1") is True
    assert await store.get_record("smoke1 ") == rec("smoke1 ", 10)
    assert await store.get_record("SMOKE1") == rec("SMOKE1", 11)
    assert await store.get_record("smoke1") == rec("smoke1", 12)
    assert await store.get_record("Smoke1") is None
    assert await store.get_record(" smoke1") == rec(" smoke1", 4)
    assert await store.delete_record("smoke1   ") is False


UNICODE_IDS = [
    "josé", "jose\u0301", "Ñandú", "straße", "strasse", "用户名", "пользователь", "🔑", "👩‍💻",
    "🔑key🗝️", "a\U0001f600", "\U0001f600a", "İ", "i̇", "ﬁ", "fi",
]


async def test_non_ascii_and_four_byte_user_ids_round_trip(store: Store) -> None:
    for i, user_id in enumerate(UNICODE_IDS):
        await store.insert_record(rec(user_id, i))
    assert await store.count_records() == len(UNICODE_IDS)
    for i, user_id in enumerate(UNICODE_IDS):
        got = await store.get_record(user_id)
        assert got == rec(user_id, i), repr(user_id)
        assert got is not None and got.user_id.encode() == user_id.encode()
    scanned = [r.user_id for r in await store.scan_records(None, 100)]
    assert scanned == sorted(UNICODE_IDS)
    # Four-byte characters in the other columns too.
    await store.upsert_record(Record("🔑", "ek-🔑", "dek-😀", T0))
    assert await store.get_record("🔑") == Record("🔑", "ek-🔑", "dek-😀", T0)
    assert await store.delete_record("👩‍💻") is True
    assert await store.get_record("👩‍💻") is None


async def test_a_64_character_user_id_works(store: Store) -> None:
    for user_id in ("u" * 64, "😀" * 64, "é" * 64):
        assert len(user_id) == 64
        await store.insert_record(rec(user_id))
        assert await store.get_record(user_id) == rec(user_id)
        assert await store.replace_record(rec(user_id), rec(user_id, 1)) is True
        assert await store.get_record(user_id) == rec(user_id, 1)
    # Ids of 64 characters that share a 63-character prefix stay apart.
    await store.insert_record(rec("u" * 63 + "v"))
    assert await store.get_record("u" * 64) == rec("u" * 64, 1)
    assert await store.count_records() == 4


# -- master keys and signing keys --------------------------------------------------------


def active(rows: list[Any]) -> list[str]:
    return [getattr(r, "key_id", None) or r.kid for r in rows if r.status == "active"]


async def test_master_keys_one_active_oldest_first(store: Store) -> None:
    assert await store.list_master_keys() == []
    added = []
    for i, (key_id, description) in enumerate([("key-1", "first master key"), ("key-2", None), ("key-3", "rotation 🔑")]):
        row = mk(key_id, description=description, created_at=f"2024-05-0{i + 1} 00:00:00")
        await store.add_master_key(row)
        added.append(row)
        rows = await store.list_master_keys()
        assert [r.key_id for r in rows] == [r.key_id for r in added]
        assert active(rows) == [key_id]
        for got, want in zip(rows, added):
            assert (got.key_material, got.created_at, got.description) == (
                want.key_material, want.created_at, want.description,
            )
            assert got.status == ("active" if got.key_id == key_id else "retired")


async def test_add_master_key_with_an_existing_id_is_a_conflict_and_changes_nothing(store: Store) -> None:
    await store.add_master_key(mk("key-1"))
    await store.add_master_key(mk("key-2"))
    before = await store.list_master_keys()
    for duplicate in ("key-1", "key-2"):
        with pytest.raises(Conflict):
            await store.add_master_key(mk(duplicate, n=99))
        # Nothing retired, nothing replaced: the transaction was undone whole.
        assert await store.list_master_keys() == before
    assert active(before) == ["key-2"]
    await store.add_master_key(mk("key-3"))
    assert active(await store.list_master_keys()) == ["key-3"]


async def test_replace_master_key_material_is_compare_and_set(store: Store) -> None:
    await store.add_master_key(mk("key-1"))
    await store.add_master_key(mk("key-2"))
    old = mk("key-1").key_material
    assert await store.replace_master_key_material("key-1", old, "rewrapped-1") is True
    rows = {r.key_id: r for r in await store.list_master_keys()}
    assert rows["key-1"].key_material == "rewrapped-1"
    assert rows["key-1"].status == "retired" and rows["key-2"].status == "active"
    assert rows["key-2"].key_material == mk("key-2").key_material
    # Stale `old`, exact comparison, unknown key: False, nothing changes.
    assert await store.replace_master_key_material("key-1", old, "again") is False
    assert await store.replace_master_key_material("key-1", "REWRAPPED-1", "again") is False
    assert await store.replace_master_key_material("key-1", "rewrapped-1 ", "again") is False
    assert await store.replace_master_key_material("key-9", old, "again") is False
    assert await store.replace_master_key_material("key-2", "rewrapped-1", "again") is False
    assert {r.key_id: r.key_material for r in await store.list_master_keys()} == {
        "key-1": "rewrapped-1", "key-2": mk("key-2").key_material,
    }


async def test_signing_keys(store: Store) -> None:
    assert await store.list_signing_keys() == []
    await store.add_signing_key(sk("kid-b", "2024-05-01 00:00:00"))
    rows = await store.list_signing_keys()
    assert [(r.kid, r.status, r.public_key, r.key_material, r.created_at) for r in rows] == [
        ("kid-b", "active", "pub:kid-b", "material:kid-b", "2024-05-01 00:00:00"),
    ]
    await store.add_signing_key(sk("kid-a", "2024-05-02 00:00:00"))
    await store.add_signing_key(sk("kid-c", "2024-05-02 00:00:00"))
    rows = await store.list_signing_keys()
    # Ordered by created_at, then kid.
    assert [r.kid for r in rows] == ["kid-b", "kid-a", "kid-c"]
    assert active(rows) == ["kid-c"]
    with pytest.raises(Conflict):
        await store.add_signing_key(sk("kid-b", "2024-05-03 00:00:00"))
    assert await store.list_signing_keys() == rows


# -- concurrency -----------------------------------------------------------------------------


async def test_concurrent_inserts_of_different_users_all_land(store: Store) -> None:
    records = [rec(f"par-{i:02d}", i) for i in range(50)]
    await asyncio.gather(*(store.insert_record(r) for r in records))
    assert await store.count_records() == 50
    got = await asyncio.gather(*(store.get_record(r.user_id) for r in records))
    assert got == records
    assert await store.scan_records(None, 100) == sorted(records, key=lambda r: r.user_id)


async def test_concurrent_inserts_of_one_user_exactly_one_wins(store: Store) -> None:
    attempts = [rec("same", i) for i in range(20)]
    results = await asyncio.gather(*(store.insert_record(r) for r in attempts), return_exceptions=True)
    winners = [r for r, res in zip(attempts, results, strict=True) if res is None]
    others = [res for res in results if res is not None]
    assert len(winners) == 1, results
    assert all(isinstance(e, Conflict) for e in others), others
    assert await store.get_record("same") == winners[0]
    assert await store.count_records() == 1


async def test_concurrent_upserts_of_one_user_leave_one_whole_write(store: Store) -> None:
    await store.insert_record(rec("hot", 0))
    writes = [rec("hot", i, created_at=f"2024-06-01 00:00:{i:02d}") for i in range(1, 31)]
    await asyncio.gather(*(store.upsert_record(r) for r in writes))
    final = await store.get_record("hot")
    # One write's row, whole: never the key of one and the DEK of another.
    assert final in writes
    assert await store.count_records() == 1


async def test_concurrent_master_key_additions_leave_exactly_one_active(store: Store) -> None:
    rows = [mk(f"key-{i}") for i in range(10)]
    await asyncio.gather(*(store.add_master_key(r) for r in rows))
    listed = await store.list_master_keys()
    assert sorted(r.key_id for r in listed) == sorted(r.key_id for r in rows)
    assert len(active(listed)) == 1, [(r.key_id, r.status) for r in listed]
    # And adding once more, after the burst, still leaves one.
    await store.add_master_key(mk("key-after"))
    assert active(await store.list_master_keys()) == ["key-after"]


async def test_concurrent_master_key_additions_on_a_database_with_keys(store: Store) -> None:
    await store.add_master_key(mk("key-first"))
    rows = [mk(f"key-{i}") for i in range(10)]
    await asyncio.gather(*(store.add_master_key(r) for r in rows))
    listed = await store.list_master_keys()
    assert len(listed) == 11
    assert len(active(listed)) == 1, [(r.key_id, r.status) for r in listed]


async def test_concurrent_mixed_writes_and_reads(store: Store) -> None:
    await asyncio.gather(*(store.insert_record(rec(f"mix-{i:02d}")) for i in range(20)))

    async def churn(i: int) -> None:
        user_id = f"mix-{i:02d}"
        assert await store.replace_record(rec(user_id), rec(user_id, 1)) is True
        assert await store.get_record(user_id) == rec(user_id, 1)
        if i % 2:
            assert await store.delete_record(user_id) is True
        await store.count_records()
        await store.scan_records(None, 5)

    await asyncio.gather(*(churn(i) for i in range(20)))
    assert await store.count_records() == 10
    assert [r.user_id for r in await store.scan_records(None, 100)] == [f"mix-{i:02d}" for i in range(0, 20, 2)]


# -- durability ------------------------------------------------------------------------------


async def crash_server(server: MariaDBServer) -> None:
    """kill -9 and start again. The event loop runs in between, as a
    daemon's would: the store may notice its connections closing."""
    try:
        server.kill()
        await asyncio.sleep(0.05)
    finally:
        server.start()


async def test_acknowledged_writes_survive_close_and_a_server_crash(
    backend: str, database_url: str, request: pytest.FixtureRequest
) -> None:
    s = await open_url(database_url)
    try:
        records = [rec(f"dur-{i:03d}", i) for i in range(100)]
        await asyncio.gather(*(s.insert_record(r) for r in records))
        await s.upsert_record(rec("dur-000", 1000))
        assert await s.replace_record(rec("dur-001", 1), rec("dur-001", 1001)) is True
        assert await s.delete_record("dur-002") is True
        await s.add_master_key(mk("key-1"))
        await s.add_master_key(mk("key-2"))
        assert await s.replace_master_key_material("key-1", mk("key-1").key_material, "rewrapped") is True
        await s.add_signing_key(sk("kid-1"))
    finally:
        await s.close()
    if backend == "mysql":
        await crash_server(request.getfixturevalue("mariadb"))

    expected = {r.user_id: r for r in records}
    expected["dur-000"] = rec("dur-000", 1000)
    expected["dur-001"] = rec("dur-001", 1001)
    del expected["dur-002"]
    s = await open_url(database_url)
    try:
        assert await s.count_records() == len(expected)
        assert {r.user_id: r for r in await s.scan_records(None, 1000)} == expected
        assert [(r.key_id, r.status, r.key_material) for r in await s.list_master_keys()] == [
            ("key-1", "retired", "rewrapped"), ("key-2", "active", mk("key-2").key_material),
        ]
        assert [r.kid for r in await s.list_signing_keys()] == ["kid-1"]
    finally:
        await s.close()


_WRITER = r"""
import asyncio, sys
from kmsd.config import parse_database_url
from kmsd.store import Record, open_store

async def main(url, n):
    store = open_store(parse_database_url(url))
    await store.open()
    print("open", flush=True)

    async def one(i):
        user_id = f"crash-{i:04d}"
        await store.insert_record(Record(user_id, f"ek:{user_id}:0", f"dek:{user_id}:0", "2024-05-01 12:00:00"))
        print(user_id, flush=True)

    await asyncio.gather(*(one(i) for i in range(n)))
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_acknowledged_writes_survive_killing_the_writer_mid_burst(
    backend: str, database_url: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A writer process killed (-9, never closed) in the middle of a burst
    (and, on MySQL, the server killed right after): every write it had
    acknowledged is there, and nothing half-written."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), database_url, "400",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    acked: list[str] = []
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            assert (await proc.stdout.readline()).strip() == b"open", await proc.stderr.read()  # type: ignore[union-attr]
            while len(acked) < 60:
                line = await proc.stdout.readline()
                assert line, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
                acked.append(line.decode().strip())
    finally:
        proc.kill()
        await proc.wait()
    if backend == "mysql":
        await crash_server(request.getfixturevalue("mariadb"))

    s = await open_url(database_url)
    try:
        rows = {r.user_id: r for r in await s.scan_records(None, 1000)}
        missing = [u for u in acked if u not in rows]
        assert not missing, f"acknowledged but lost: {missing}"
        for user_id, row in rows.items():
            assert row == rec(user_id, 0), user_id
        assert await s.count_records() == len(rows)
    finally:
        await s.close()


# -- MySQL only: the server goes away or hangs ---------------------------------------------


@pytest.fixture
def mysql_server(mariadb: MariaDBServer) -> Any:
    """The shared server, left running whatever the test did to it."""
    try:
        yield mariadb
    finally:
        mariadb.ensure_running()


async def bounded(call: Awaitable[Any], limit: float) -> Any:
    """``call``, failing the test (not hanging the run) if it outlives ``limit``."""
    try:
        async with asyncio.timeout(limit):
            return await call
    except TimeoutError:
        pytest.fail(f"a store call hung for more than {limit}s instead of raising StoreError")


def every_call(store: Store, tag: str) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
    """Each method of the protocol once, with arguments that cannot conflict."""
    return [
        ("ping", lambda: store.ping()),
        ("get_record", lambda: store.get_record("before")),
        ("count_records", lambda: store.count_records()),
        ("scan_records", lambda: store.scan_records(None, 10)),
        ("list_master_keys", lambda: store.list_master_keys()),
        ("list_signing_keys", lambda: store.list_signing_keys()),
        ("insert_record", lambda: store.insert_record(rec(f"{tag}-insert"))),
        ("upsert_record", lambda: store.upsert_record(rec(f"{tag}-upsert"))),
        ("replace_record", lambda: store.replace_record(rec("before"), rec("before", 7))),
        ("delete_record", lambda: store.delete_record("before")),
        ("add_master_key", lambda: store.add_master_key(mk(f"{tag}-key"))),
        ("replace_master_key_material", lambda: store.replace_master_key_material("key-1", "material:key-1:0", "x")),
        ("add_signing_key", lambda: store.add_signing_key(sk(f"{tag}-kid"))),
    ]


async def seed(store: Store) -> None:
    await store.insert_record(rec("before"))
    await store.add_master_key(mk("key-1"))
    await store.add_signing_key(sk("kid-1"))
    # Several pooled connections, so that the pool holds some the server
    # will have closed.
    await asyncio.gather(*(store.get_record(f"warm-{i}") for i in range(8)))


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_mysql_server_down_every_call_fails_fast_and_the_same_store_recovers(
    mysql_server: MariaDBServer, transport: str
) -> None:
    url = mysql_server.new_database()
    if transport == "unix":
        url = mysql_server.socket_url(db_name(url))
    timeout = 2.0
    store = await open_url(url, timeout=timeout)
    try:
        await seed(store)
        mysql_server.kill()
        try:
            for name, call in every_call(store, "down"):
                start = time.monotonic()
                with pytest.raises(StoreError):
                    await bounded(call(), timeout + 5)
                took = time.monotonic() - start
                assert took < timeout + 1.0, (name, took)
            # Concurrently too.
            start = time.monotonic()
            results = await asyncio.gather(
                *(bounded(c(), timeout + 5) for _, c in every_call(store, "down2")), return_exceptions=True
            )
            assert all(isinstance(r, StoreError) for r in results), results
            assert time.monotonic() - start < timeout + 1.0
        finally:
            mysql_server.start()

        # The same store object, not reopened: every call works again.
        for _name, call in every_call(store, "after"):
            await bounded(call(), timeout + 5)
        assert await store.get_record("after-insert") == rec("after-insert")
        # Nothing written while the server was down landed.
        assert await store.get_record("down-insert") is None
        assert await store.get_record("down2-upsert") is None
        assert "down-key" not in [r.key_id for r in await store.list_master_keys()]
    finally:
        await store.close()


async def test_mysql_quick_server_restart_between_calls_is_invisible(mysql_server: MariaDBServer) -> None:
    """The server restarts (crash or clean) while the store is idle: its
    pooled connections are dead, and the next calls, writes first, work."""
    store = await open_url(mysql_server.new_database(), timeout=2.0)
    try:
        await seed(store)
        await crash_server(mysql_server)
        await store.insert_record(rec("after-crash"))
        await store.add_master_key(mk("key-2"))
        assert await store.get_record("after-crash") == rec("after-crash")

        await asyncio.gather(*(store.get_record(f"warm-{i}") for i in range(8)))
        mysql_server.stop()
        await asyncio.sleep(0.05)
        mysql_server.start()
        await store.upsert_record(rec("after-restart"))
        assert await store.get_record("after-restart") == rec("after-restart")
        assert await store.count_records() == 3
    finally:
        await store.close()


async def test_mysql_safe_calls_retry_on_connections_a_restarted_server_closed(mysql_server: MariaDBServer) -> None:
    """The server restarts and the store has not yet noticed (the event loop
    did not run in between): its pooled connections are dead. A read, and a
    transaction whose BEGIN fails, cannot have committed anything: they are
    retried on a fresh connection, not turned into a 503."""
    store = await open_url(mysql_server.new_database(), timeout=2.0)
    try:
        await seed(store)
        mysql_server.kill()
        mysql_server.start()
        assert await store.get_record("before") == rec("before")

        await asyncio.gather(*(store.get_record(f"warm-{i}") for i in range(8)))
        mysql_server.kill()
        mysql_server.start()
        await store.add_master_key(mk("key-2"))
        assert active(await store.list_master_keys()) == ["key-2"]
    finally:
        await store.close()


async def test_mysql_hung_server_is_a_store_error_within_the_timeout(mysql_server: MariaDBServer) -> None:
    timeout = 1.0
    store = await open_url(mysql_server.new_database(), timeout=timeout)
    try:
        await seed(store)
        mysql_server.pause()
        try:

            async def timed(name: str, call: Callable[[], Awaitable[Any]]) -> tuple[str, Any, float]:
                start = time.monotonic()
                try:
                    result: Any = await bounded(call(), timeout + 5)
                except Exception as exc:  # noqa: BLE001 - the outcome is what is checked
                    result = exc
                return name, result, time.monotonic() - start

            outcomes = await asyncio.gather(*(timed(n, c) for n, c in every_call(store, "hung")))
            for name, result, took in outcomes:
                assert isinstance(result, StoreError), (name, result)
                assert took < timeout + 0.5, (name, took)
        finally:
            mysql_server.resume()
        # The same store recovers without being reopened. (The writes that
        # timed out may or may not land once the server runs again: their
        # outcome is unknown, as a 503 says.)
        await store.ping()
        assert (await store.list_master_keys())[0].key_id == "key-1"
        await store.insert_record(rec("after-hang"))
        assert await store.get_record("after-hang") == rec("after-hang")
    finally:
        await store.close()


async def test_mysql_open_fails_with_store_error_on_a_bad_server_or_password(mysql_server: MariaDBServer) -> None:
    url = mysql_server.new_database()
    password = urlsplit(url).password or ""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = s.getsockname()[1]
    for bad, reason in [
        (url.replace(f":{mysql_server.port}/", f":{nobody}/"), "Can't connect"),
        (url.replace(f":{password}@", ":wrong@"), "Access denied for user 'kmsd'"),
        (url.rsplit("/", 1)[0] + "/not_granted", "not_granted"),
    ]:
        store = open_store(parse_database_url(bad), timeout=2.0)
        start = time.monotonic()
        with pytest.raises(StoreError) as info:
            await store.open()
        assert time.monotonic() - start < 2.0 * 2 + 1.0
        assert reason in info.value.message, info.value.message
        assert password not in info.value.message
        await store.close()


async def test_mysql_warns_when_commits_are_not_durable(mysql_server: MariaDBServer) -> None:
    url = mysql_server.new_database()
    mysql_server.admin("SET GLOBAL innodb_flush_log_at_trx_commit = 2")
    try:
        store = await open_url(url)
        try:
            assert any("innodb_flush_log_at_trx_commit=2" in w for w in store.warnings), store.warnings
        finally:
            await store.close()
    finally:
        mysql_server.admin("SET GLOBAL innodb_flush_log_at_trx_commit = 1")
    store = await open_url(url)
    try:
        assert store.warnings == []
    finally:
        await store.close()


async def test_mysql_several_stores_may_open_a_new_database_at_once(mysql_server: MariaDBServer) -> None:
    """Several daemons starting together on one new database: the named lock
    serializes the migrations, every open succeeds, each applies once."""
    url = mysql_server.new_database()
    stores = [open_store(parse_database_url(url)) for _ in range(4)]
    try:
        results = await asyncio.gather(*(s.open() for s in stores), return_exceptions=True)
        assert results == [None] * 4, results
        assert [r[0] for r in mysql_server.admin(
            "SELECT version FROM kmsd_schema_migrations ORDER BY version", db=db_name(url)
        )] == expected_versions(url)
        await asyncio.gather(*(s.insert_record(rec(f"opener-{i}")) for i, s in enumerate(stores)))
        assert await stores[0].count_records() == 4
    finally:
        for s in stores:
            await s.close()


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
