"""The storage contract: every method of ``kmsd.store.Store``, written once
and run against both backends (SQLite, and a private MariaDB server).

Real databases only, no mocks: each test gets a fresh, empty database (the
``store`` fixture, in conftest.py). Durability, the MySQL server's faults and
the migrations have files of their own (test_store_durability.py,
test_store_mysql_faults.py, test_store_migrations.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from typing import Any

import pytest
from support.store import (
    T0,
    active,
    after_rewrap,
    all_records,
    fields,
    keyed,
    mk,
    open_url,
    rec,
    rewrapped,
    sk,
)

from devtools.mariadb_server import MariaDBServer
from kmsd.config import parse_database_url
from kmsd.errors import Conflict
from kmsd.store import Record, RotationJob, Store, StoreError
from kmsd.store_sql import REVOCATION_MARGIN

# -- open ------------------------------------------------------------------------------------


async def test_record_owners_finds_a_wrapped_dek_by_its_exact_text(store: Store) -> None:
    long_dek = "AQ" + "x" * 100 + "=="  # longer than the indexed prefix
    await store.insert_record(Record("alice", "ek", long_dek, T0))
    await store.insert_record(Record("bob", "ek", long_dek, T0))  # the same envelope stored twice
    await store.insert_record(Record("carol", "ek", "AQ" + "x" * 100 + "Y=", T0))  # same prefix, other text
    await store.insert_record(Record("dave", "ek", None, T0))
    assert sorted(await store.record_owners(long_dek)) == ["alice", "bob"]
    assert await store.record_owners("AQ" + "x" * 100 + "Y=") == ["carol"]
    # Exact: the original's MySQL column is case-insensitive, base64 is not.
    assert await store.record_owners(long_dek.upper()) == []
    assert await store.record_owners("AQ" + "x" * 100) == []
    assert await store.record_owners("") == []
    await store.delete_record("alice")
    assert await store.record_owners(long_dek) == ["bob"]


async def test_a_replaced_or_deleted_records_dek_can_be_released_to_its_owner(store: Store) -> None:
    digest_a, digest_b = b"a" * 32, b"b" * 32
    await store.insert_record(rec("alice"))
    await store.insert_record(rec("bob"))
    assert await store.released_owners(digest_a) == []
    # Compare-and-set that does not match: no change, nothing released.
    assert not await store.replace_record(rec("alice", 9), rec("alice", 1), release=digest_a)
    assert await store.released_owners(digest_a) == []
    assert await store.replace_record(rec("alice"), rec("alice", 1), release=digest_a)
    assert await store.released_owners(digest_a) == ["alice"]
    assert await store.get_record("alice") == rec("alice", 1)
    # Delete, compare-and-set on the ciphertexts.
    assert not await store.delete_record("bob", only_if=rec("bob", 9), release=digest_b)
    assert await store.get_record("bob") == rec("bob")
    assert await store.delete_record("bob", only_if=rec("bob"), release=digest_b)
    assert await store.get_record("bob") is None and await store.released_owners(digest_b) == ["bob"]
    # Released once, the first owner stays.
    await store.insert_record(rec("carol"))
    assert await store.replace_record(rec("carol"), rec("carol", 1), release=digest_a)
    assert await store.released_owners(digest_a) == ["alice"]
    # Without release, nothing is remembered.
    assert await store.delete_record("carol")
    assert await store.released_owners(b"c" * 32) == []


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


async def test_token_generations_move_with_records_in_the_same_transaction(store: Store) -> None:
    assert await store.token_state("gina", "jti-1") == ("", False)
    await store.insert_record(rec("gina"), generation="g1")
    assert await store.token_state("gina", "jti-1") == ("g1", False)
    # A duplicate changes neither the row nor the generation.
    with pytest.raises(Conflict):
        await store.insert_record(rec("gina", 1), generation="g2")
    assert await store.token_state("gina", "") == ("g1", False)
    # Compare-and-set on the generation: a voided token replaces and deletes nothing.
    assert await store.replace_record(rec("gina"), rec("gina", 3), expect_generation="g0") is False
    assert await store.delete_record("gina", only_if=rec("gina"), expect_generation="g0", generation="gx") is False
    assert await store.get_record("gina") == rec("gina") and await store.token_state("gina", "") == ("g1", False)
    assert await store.replace_record(rec("gina"), rec("gina", 3), expect_generation="g1") is True
    assert await store.delete_record("gina", expect_generation="g1", generation="g4") is True
    assert await store.get_record("gina") is None and await store.token_state("gina", "") == ("g4", False)
    await store.set_generation("hank", "h1")
    assert await store.token_state("hank", "") == ("h1", False)


async def test_token_states_answer_each_caller_of_a_batch(store: Store) -> None:
    """Concurrent checks (MySQL answers them in one statement): each gets
    its own subject's generation and its own token's revocation, ids that
    differ only in case or trailing space included."""
    users = ["Ünï", "ünï", "ünï ", "plain", "never-set"]
    for i, user in enumerate(users[:-1]):
        await store.set_generation(user, f"gen{i}")
    await store.revoke_token("revoked-1", int(time.time()) + 600)
    asks = [(u, t) for u in users for t in ("revoked-1", "live-1")] * 5
    answers = await asyncio.gather(*(store.token_state(u, t) for u, t in asks))
    for (user, token), (generation, revoked) in zip(asks, answers, strict=True):
        assert generation == (f"gen{users.index(user)}" if user != "never-set" else "")
        assert revoked is (token == "revoked-1")


async def test_revoked_tokens_are_kept_until_they_expire(store: Store) -> None:
    now = int(time.time())
    await store.revoke_token("old-jti", now - REVOCATION_MARGIN - 5)
    await store.revoke_token("live-jti", now + 600)
    await store.revoke_token("live-jti", now + 600)  # twice is once
    assert (await store.token_state("ivy", "live-jti"))[1] is True
    assert (await store.token_state("ivy", "other-jti"))[1] is False
    await store.revoke_token("another-jti", now + 600)  # forgets what expired
    assert (await store.token_state("ivy", "old-jti"))[1] is False


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
        for got, want in zip(rows, added, strict=False):
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


async def test_first_keys_are_added_only_once_even_by_concurrent_callers(store: Store) -> None:
    """Daemons starting on a new database at once each try to add the first
    master and signing key: one of each is written."""
    results = await asyncio.gather(*(store.add_first_master_key(mk(f"key-{i}")) for i in range(6)))
    assert sorted(results) == [False] * 5 + [True]
    rows = await store.list_master_keys()
    assert [r.key_id for r in rows] == [f"key-{results.index(True)}"] and active(rows) == [rows[0].key_id]
    assert await store.add_first_master_key(mk("key-9")) is False
    results = await asyncio.gather(*(store.add_first_signing_key(sk(f"kid-{i}")) for i in range(6)))
    assert sorted(results) == [False] * 5 + [True]
    assert [r.kid for r in await store.list_signing_keys()] == [f"kid-{results.index(True)}"]
    # After a signing-key rotation there is still an active key: no first key.
    await store.add_signing_key(sk("kid-new"))
    assert await store.add_first_signing_key(sk("kid-x")) is False


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


async def test_concurrent_mix_of_new_and_taken_ids_answers_each_caller(store: Store) -> None:
    """Concurrent calls may share a statement (MySQL coalesces them): a
    duplicate among them fails only its own caller, and ids that differ
    only in case or a trailing space stay distinct records."""
    await store.insert_record(rec("taken-1"))
    await store.insert_record(rec("taken-2"))
    ids = ["mix-a", "taken-1", "Mix-A", "mix-a ", "taken-2", "mix-b"]
    attempts = [rec(u, i + 10) for i, u in enumerate(ids)]
    results = await asyncio.gather(*(store.insert_record(r) for r in attempts), return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["NoneType", "Conflict", "NoneType", "NoneType", "Conflict", "NoneType"]
    lookups = ["mix-a", "Mix-A", "mix-a ", "MIX-A", "taken-1", "mix-b", "nobody"]
    got = await asyncio.gather(*(store.get_record(u) for u in lookups))
    assert got == [attempts[0], attempts[2], attempts[3], None, rec("taken-1"), attempts[5], None]


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


# -- master_key_id on records ------------------------------------------------------------


async def test_master_key_id_round_trips_through_every_record_write(store: Store) -> None:
    # Omitted: NULL (as the original system, and kmsd before the column, wrote).
    await store.insert_record(rec("plain"))
    assert fields(await store.get_record("plain")) == fields(Record("plain", "ek:plain:0", "dek:plain:0", T0, None))

    await store.insert_record(keyed("ins", "key-1"))
    assert fields(await store.get_record("ins")) == fields(keyed("ins", "key-1"))

    # upsert: inserts with the key, then replaces it (also back to NULL).
    await store.upsert_record(keyed("ups", "key-1"))
    assert fields(await store.get_record("ups")) == fields(keyed("ups", "key-1"))
    await store.upsert_record(keyed("ups", "key-2", 1))
    assert fields(await store.get_record("ups")) == fields(keyed("ups", "key-2", 1))
    await store.upsert_record(keyed("ups", None, 2))
    assert fields(await store.get_record("ups")) == fields(keyed("ups", None, 2))

    # replace_record writes new's key; the compare part ignores old's key.
    assert await store.replace_record(keyed("ins", "some-other-key"), keyed("ins", "key-2", 1)) is True
    assert fields(await store.get_record("ins")) == fields(keyed("ins", "key-2", 1))
    assert await store.replace_record(keyed("ins", "key-2", 1), keyed("ins", None, 2)) is True
    assert fields(await store.get_record("ins")) == fields(keyed("ins", None, 2))
    assert await store.replace_record(keyed("plain", None), keyed("plain", "key-3", 1)) is True

    # Exact key ids, four-byte characters included.
    await store.insert_record(keyed("odd", "KEY-1 🔑"))
    assert (await store.get_record("odd")).master_key_id == "KEY-1 🔑"  # type: ignore[union-attr]

    assert await all_records(store) == {
        "ins": fields(keyed("ins", None, 2)),
        "odd": fields(keyed("odd", "KEY-1 🔑")),
        "plain": fields(keyed("plain", "key-3", 1)),
        "ups": fields(keyed("ups", None, 2)),
    }


async def test_count_records_by_key(store: Store) -> None:
    assert await store.count_records_by_key() == {}
    await store.insert_record(rec("legacy-1"))
    await store.insert_record(Record("legacy-2", None, None, None))
    for i in range(3):
        await store.insert_record(keyed(f"k1-{i}", "key-1"))
    await store.insert_record(keyed("k2-0", "key-2"))
    # Key ids that differ by case or a trailing space are different keys.
    await store.insert_record(keyed("case", "KEY-1"))
    await store.insert_record(keyed("pad", "key-1 "))
    assert await store.count_records_by_key() == {None: 2, "key-1": 3, "key-2": 1, "KEY-1": 1, "key-1 ": 1}

    await store.upsert_record(keyed("legacy-1", "key-2", 1))
    await store.delete_record("k1-0")
    assert await store.replace_record(keyed("k1-1", "key-1"), keyed("k1-1", "key-2", 1)) is True
    assert await store.rewrap_records([rewrapped(keyed("k1-2", "key-1"), "key-2")]) == 1
    await store.delete_record("case")
    assert await store.count_records_by_key() == {None: 1, "key-2": 4, "key-1 ": 1}
    assert sum((await store.count_records_by_key()).values()) == await store.count_records()


# -- scan_records_to_rewrap ---------------------------------------------------------------------


async def test_scan_records_to_rewrap_skips_the_active_key_and_walks_in_binary_order(store: Store) -> None:
    assert await store.scan_records_to_rewrap("key-2", None, 10) == []
    # Round-robin over the active key, an old key, NULL and look-alikes of
    # the active key id (which are other keys).
    keys: list[str | None] = ["key-2", "key-1", None, "KEY-2", "key-2 ", "key-2"]
    for i, user_id in enumerate(SCAN_IDS):
        await store.insert_record(keyed(user_id, keys[i % len(keys)]))
    by_id = {u: keys[i % len(keys)] for i, u in enumerate(SCAN_IDS)}
    expected = sorted(u for u, k in by_id.items() if k != "key-2")
    assert 0 < len(expected) < len(SCAN_IDS)

    for limit in (1, 2, 5, len(expected), 100):
        seen: list[str] = []
        after: str | None = None
        pages = 0
        while page := await store.scan_records_to_rewrap("key-2", after, limit):
            pages += 1
            assert len(page) <= limit
            if len(seen) + len(page) < len(expected):
                assert len(page) == limit  # the filter comes before the limit
            for r in page:
                assert fields(r) == fields(keyed(r.user_id, by_id[r.user_id])), r.user_id
            seen += [r.user_id for r in page]
            after = page[-1].user_id
            assert pages <= len(SCAN_IDS) + 1, "the walk does not end"
        assert seen == expected, limit

    # Resumable from any id, listed or not (an id under the active key too).
    for user_id in sorted(SCAN_IDS):
        got = [r.user_id for r in await store.scan_records_to_rewrap("key-2", user_id, 1000)]
        assert got == [u for u in expected if u > user_id], repr(user_id)

    # Another active key: everything not under it.
    assert [r.user_id for r in await store.scan_records_to_rewrap("key-1", None, 1000)] == sorted(
        u for u, k in by_id.items() if k != "key-1"
    )
    # Once rewrapped, a row is no longer listed; a row moved off the active key is.
    rows = await store.scan_records_to_rewrap("key-2", None, 3)
    assert await store.rewrap_records([rewrapped(r, "key-2") for r in rows]) == 3
    assert [r.user_id for r in await store.scan_records_to_rewrap("key-2", None, 1000)] == expected[3:]
    first_active = sorted(u for u, k in by_id.items() if k == "key-2")[0]
    await store.upsert_record(keyed(first_active, None, 1))
    assert first_active in [r.user_id for r in await store.scan_records_to_rewrap("key-2", None, 1000)]


# -- rewrap_records --------------------------------------------------------------------------


async def test_rewrap_records_sets_the_dek_and_key_and_counts_the_matches(store: Store) -> None:
    rows = {u: keyed(u, "key-1", created_at=f"2023-0{i + 1}-01 00:00:00") for i, u in enumerate("abcdef")}
    for r in rows.values():
        await store.insert_record(r)
    await store.insert_record(Record("legacy", "ek:legacy", "dek:legacy", None))

    assert await store.rewrap_records([]) == 0
    assert await store.count_records_by_key() == {"key-1": 6, None: 1}

    # Changed meanwhile (upsert, replace), deleted meanwhile, never there.
    await store.upsert_record(keyed("c", "key-1", 1))
    assert await store.replace_record(rows["d"], keyed("d", "key-9", 1)) is True
    await store.delete_record("e")
    # `old` as the scan returned it may carry another created_at or key id:
    # only its ciphertexts are compared.
    seen_b = Record("b", rows["b"].encrypted_key, rows["b"].encrypted_dek, "1999-01-01 00:00:00", "key-x")
    changes = [
        rewrapped(rows["a"], "key-2"),
        rewrapped(seen_b, "key-2"),
        rewrapped(rows["c"], "key-2"),
        rewrapped(rows["d"], "key-2"),
        rewrapped(rows["e"], "key-2"),
        rewrapped(keyed("never", "key-1"), "key-2"),
        rewrapped(Record("legacy", "ek:legacy", "dek:legacy", None), "key-2"),
    ]
    assert await store.rewrap_records(changes) == 3

    assert await all_records(store) == {
        # encrypted_key and created_at untouched.
        "a": fields(after_rewrap(rows["a"], "key-2")),
        "b": fields(after_rewrap(rows["b"], "key-2")),
        "c": fields(keyed("c", "key-1", 1)),
        "d": fields(keyed("d", "key-9", 1)),
        "f": fields(rows["f"]),
        "legacy": fields(after_rewrap(Record("legacy", "ek:legacy", "dek:legacy", None), "key-2")),
    }
    # The same batch again: every row changed since (its DEK is the new one).
    assert await store.rewrap_records(changes) == 0
    # A rewrap that writes what is already there still matched.
    now_a = after_rewrap(rows["a"], "key-2")
    assert await store.rewrap_records([(now_a, now_a.encrypted_dek, "key-2")]) == 1  # type: ignore[list-item]
    assert fields(await store.get_record("a")) == fields(now_a)


async def test_rewrap_records_compares_exactly_and_null_safe(store: Store) -> None:
    rows = [
        Record("nulls", None, None, None),
        Record("no-dek", "ek", None, T0),
        Record("no-ek", None, "dek", T0),
        Record("b64", "QUJD", "ZGVr", T0),
    ]
    for r in rows:
        await store.insert_record(r)
    before = await all_records(store)
    stale = [
        Record("nulls", "", None, None),  # '' is not NULL
        Record("nulls", None, "", None),
        Record("nulls", "ek", None, None),
        Record("no-dek", "ek", "", T0),
        Record("no-dek", None, None, T0),
        Record("no-dek", "EK", None, T0),
        Record("no-ek", "", "dek", T0),
        Record("no-ek", None, "dek ", T0),
        Record("b64", "qujd", "ZGVr", T0),
        Record("b64", "QUJD", "zgvr", T0),
        Record("b64", "QUJD ", "ZGVr", T0),
        Record("b64", "QUJD", "ZGVr ", T0),
        Record("b64", "QUJD", None, T0),
        Record("B64", "QUJD", "ZGVr", T0),
        Record("b64 ", "QUJD", "ZGVr", T0),
    ]
    for old in stale:
        assert await store.rewrap_records([rewrapped(old, "key-2")]) == 0, fields(old)
    assert await store.rewrap_records([rewrapped(old, "key-2") for old in stale]) == 0
    assert await all_records(store) == before

    # The exact values, NULLs included, match.
    assert await store.rewrap_records([rewrapped(r, "key-2") for r in rows]) == len(rows)
    assert await all_records(store) == {r.user_id: fields(after_rewrap(r, "key-2")) for r in rows}


async def test_rewrap_records_touches_only_exactly_the_named_users(store: Store) -> None:
    # Same ciphertexts under ids that a case- or pad-insensitive comparison
    # would take for one another: only the named one is rewrapped.
    ids = ["SMOKE1", "smoke1", "smoke1 ", "Smoke1", "josé", "jose\u0301", "🔑"]
    for user_id in ids:
        await store.insert_record(Record(user_id, "same-ek", "same-dek", T0, "key-1"))
    for target in ("smoke1", "jose\u0301", "🔑"):
        old = Record(target, "same-ek", "same-dek", T0, "key-1")
        assert await store.rewrap_records([rewrapped(old, "key-2")]) == 1, target
    assert await all_records(store) == {
        u: fields(
            after_rewrap(Record(u, "same-ek", "same-dek", T0, "key-1"), "key-2")
            if u in ("smoke1", "jose\u0301", "🔑")
            else Record(u, "same-ek", "same-dek", T0, "key-1")
        )
        for u in ids
    }


async def test_rewrap_records_of_a_large_batch(store: Store) -> None:
    rows = [keyed(f"big-{i:04d}", "key-1" if i % 3 else None, i) for i in range(400)]
    await asyncio.gather(*(store.insert_record(r) for r in rows))
    # One stale entry in the middle of the batch does not stop the others.
    await store.upsert_record(keyed("big-0200", "key-1", 9999))
    assert await store.rewrap_records([rewrapped(r, "key-2") for r in rows]) == 399
    got = await all_records(store)
    for r in rows:
        want = keyed("big-0200", "key-1", 9999) if r.user_id == "big-0200" else after_rewrap(r, "key-2")
        assert got[r.user_id] == fields(want), r.user_id
    assert await store.count_records_by_key() == {"key-2": 399, "key-1": 1}


async def test_rewrap_records_racing_client_writes_never_overwrites_them(database_url: str) -> None:
    """A rewrap (batches, as the rotation runs them) racing client upserts,
    replaces and deletes of the same rows, through two stores on one
    database: a row a client wrote keeps exactly the client's values, a
    deleted row stays deleted, every other row is rewrapped."""
    first = await open_url(database_url)
    second = await open_url(database_url)
    try:
        rows = [keyed(f"race-{i:03d}", "key-1", i, created_at=f"2024-01-01 00:00:{i % 60:02d}") for i in range(120)]
        await asyncio.gather(*(first.insert_record(r) for r in rows))
        scanned = await first.scan_records_to_rewrap("key-2", None, 1000)
        assert [fields(r) for r in scanned] == [fields(r) for r in rows]

        upserted = {r.user_id: keyed(r.user_id, "key-client", 1000 + i) for i, r in enumerate(rows) if i % 3 == 0}
        replaced = {r.user_id: keyed(r.user_id, "key-2", 2000 + i) for i, r in enumerate(rows) if i % 3 == 1 and i % 4 == 0}
        deleted = {r.user_id for i, r in enumerate(rows) if i % 3 == 1 and i % 4 == 1}
        untouched = [r for r in rows if r.user_id not in upserted and r.user_id not in replaced and r.user_id not in deleted]
        by_id = {r.user_id: r for r in rows}
        replaced_won: dict[str, bool] = {}

        async def client(i: int, user_id: str) -> None:
            await asyncio.sleep(0.001 * (i % 7))
            if user_id in upserted:
                await second.upsert_record(upserted[user_id])
            elif user_id in replaced:
                # A compare-and-set on the row as first read: it loses to a
                # rewrap that got there first (the row is not what it read).
                replaced_won[user_id] = await second.replace_record(by_id[user_id], replaced[user_id])
            else:
                assert await second.delete_record(user_id) is True

        async def rewrap(batch: list[Record], i: int) -> int:
            await asyncio.sleep(0.001 * (i % 5))
            return await first.rewrap_records([rewrapped(r, "key-2") for r in batch])

        batches = [scanned[i:i + 10] for i in range(0, len(scanned), 10)]
        touched = [*upserted, *replaced, *deleted]
        results = await asyncio.gather(
            *(rewrap(b, i) for i, b in enumerate(batches)),
            *(client(i, u) for i, u in enumerate(touched)),
        )
        matched = sum(results[: len(batches)])

        got = await all_records(second)
        expected = {r.user_id: fields(after_rewrap(r, "key-2")) for r in untouched}
        expected.update({u: fields(r) for u, r in upserted.items()})
        expected.update(
            {u: fields(r if replaced_won[u] else after_rewrap(by_id[u], "key-2")) for u, r in replaced.items()}
        )
        assert got == expected
        # The rewrap matched every untouched row and every row whose replace
        # lost to it, none whose replace won, and at most the upserted and
        # deleted rows it reached before the client did.
        lost = list(replaced_won.values()).count(False)
        assert len(untouched) + lost <= matched <= len(untouched) + lost + len(upserted) + len(deleted)
    finally:
        await first.close()
        await second.close()


# -- replace_key_materials ------------------------------------------------------------------


async def seed_keys(store: Store) -> None:
    for key_id in ("key-1", "key-2", "key-3"):
        await store.add_master_key(mk(key_id))
    for kid in ("kid-1", "kid-2"):
        await store.add_signing_key(sk(kid))


async def key_materials(store: Store) -> tuple[dict[str, str], dict[str, str]]:
    return (
        {r.key_id: r.key_material for r in await store.list_master_keys()},
        {r.kid: r.key_material for r in await store.list_signing_keys()},
    )


async def test_replace_key_materials_replaces_all(store: Store) -> None:
    await seed_keys(store)
    master_before = await store.list_master_keys()
    assert await store.replace_key_materials(
        [(k, f"material:{k}:0", f"rewrapped:{k}") for k in ("key-1", "key-2", "key-3")],
        [(k, f"material:{k}", f"rewrapped:{k}") for k in ("kid-1", "kid-2")],
    ) is True
    assert await key_materials(store) == (
        {k: f"rewrapped:{k}" for k in ("key-1", "key-2", "key-3")},
        {k: f"rewrapped:{k}" for k in ("kid-1", "kid-2")},
    )
    # Only the material changes: status, created_at, description, public key stay.
    assert [(r.key_id, r.status, r.created_at, r.description) for r in await store.list_master_keys()] == [
        (r.key_id, r.status, r.created_at, r.description) for r in master_before
    ]
    assert [(r.kid, r.public_key, r.status) for r in await store.list_signing_keys()] == [
        ("kid-1", "pub:kid-1", "retired"), ("kid-2", "pub:kid-2", "active"),
    ]
    # Only some of them, only one table, the same material again: all fine.
    assert await store.replace_key_materials([("key-2", "rewrapped:key-2", "again:key-2")], []) is True
    assert await store.replace_key_materials([], [("kid-1", "rewrapped:kid-1", "again:kid-1")]) is True
    assert await store.replace_key_materials([("key-3", "rewrapped:key-3", "rewrapped:key-3")], []) is True
    masters, signing = await key_materials(store)
    assert masters == {"key-1": "rewrapped:key-1", "key-2": "again:key-2", "key-3": "rewrapped:key-3"}
    assert signing == {"kid-1": "again:kid-1", "kid-2": "rewrapped:kid-2"}


async def test_replace_key_materials_is_all_or_nothing(store: Store) -> None:
    await seed_keys(store)
    before = await key_materials(store)
    masters_ok = [(k, f"material:{k}:0", f"new:{k}") for k in ("key-1", "key-2", "key-3")]
    signing_ok = [(k, f"material:{k}", f"new:{k}") for k in ("kid-1", "kid-2")]

    def with_master(i: int, entry: tuple[str, str, str]) -> list[tuple[str, str, str]]:
        return [entry if j == i else m for j, m in enumerate(masters_ok)]

    def with_signing(i: int, entry: tuple[str, str, str]) -> list[tuple[str, str, str]]:
        return [entry if j == i else s for j, s in enumerate(signing_ok)]

    refused = [
        # One stale material, first, in the middle, last of the master keys...
        (with_master(0, ("key-1", "stale", "new:key-1")), signing_ok),
        (with_master(1, ("key-2", "stale", "new:key-2")), signing_ok),
        (with_master(2, ("key-3", "stale", "new:key-3")), signing_ok),
        # ...or of the signing keys, after every master key matched.
        (masters_ok, with_signing(0, ("kid-1", "stale", "new:kid-1"))),
        (masters_ok, with_signing(1, ("kid-2", "stale", "new:kid-2"))),
        # Exact comparison: case and a trailing space differ.
        (with_master(1, ("key-2", "MATERIAL:KEY-2:0", "new:key-2")), signing_ok),
        (with_master(2, ("key-3", "material:key-3:0 ", "new:key-3")), signing_ok),
        (masters_ok, with_signing(1, ("kid-2", "Material:kid-2", "new:kid-2"))),
        # Unknown ids; a key looked up in the wrong table.
        (with_master(2, ("key-9", "material:key-9:0", "new:key-9")), signing_ok),
        (masters_ok, with_signing(1, ("kid-9", "material:kid-9", "new:kid-9"))),
        ([*masters_ok, ("kid-1", "material:kid-1", "x")], signing_ok),
        (masters_ok, [*signing_ok, ("key-1", "material:key-1:0", "x")]),
        # The same key twice: its second old value no longer matches.
        ([*masters_ok, ("key-1", "material:key-1:0", "other")], signing_ok),
    ]
    for master, signing in refused:
        assert await store.replace_key_materials(master, signing) is False, (master, signing)
        assert await key_materials(store) == before, (master, signing)

    # After all those refusals the store works, and the good set applies.
    assert await store.replace_key_materials(masters_ok, signing_ok) is True
    assert await key_materials(store) == (
        {k: f"new:{k}" for k in ("key-1", "key-2", "key-3")}, {k: f"new:{k}" for k in ("kid-1", "kid-2")},
    )
    # The old values are stale now.
    assert await store.replace_key_materials(masters_ok, signing_ok) is False


async def test_concurrent_replace_key_materials_exactly_one_wins_whole(store: Store) -> None:
    await seed_keys(store)

    def attempt(n: int) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
        return (
            [(k, f"material:{k}:0", f"try{n}:{k}") for k in ("key-1", "key-2", "key-3")],
            [(k, f"material:{k}", f"try{n}:{k}") for k in ("kid-1", "kid-2")],
        )

    results = await asyncio.gather(*(store.replace_key_materials(*attempt(n)) for n in range(8)))
    assert results.count(True) == 1, results
    n = results.index(True)
    # Every material from the one winner: never a mix of two attempts.
    assert await key_materials(store) == (
        {k: f"try{n}:{k}" for k in ("key-1", "key-2", "key-3")}, {k: f"try{n}:{k}" for k in ("kid-1", "kid-2")},
    )


# -- delete_master_key ---------------------------------------------------------------------


async def test_delete_master_key(store: Store) -> None:
    assert await store.delete_master_key("key-1") is False  # none at all
    await store.add_master_key(mk("key-1"))
    # The active key, even with no record at all.
    assert await store.delete_master_key("key-1") is False
    await store.add_master_key(mk("key-2"))
    await store.add_master_key(mk("key-3"))
    await store.insert_record(keyed("u1", "key-1"))
    await store.insert_record(keyed("u3", "key-3"))

    # Retired, but a record is under it.
    assert await store.delete_master_key("key-1") is False
    # Retired and unused, but a record is unclassified (it may be under it).
    await store.insert_record(rec("legacy"))
    assert await store.delete_master_key("key-2") is False
    assert [r.key_id for r in await store.list_master_keys()] == ["key-1", "key-2", "key-3"]

    # Once the unclassified record is classified: the unused retired key goes.
    assert await store.rewrap_records([rewrapped(rec("legacy"), "key-3")]) == 1
    assert await store.delete_master_key("key-2") is True
    assert await store.delete_master_key("key-2") is False
    assert await store.delete_master_key("key-1") is False  # still used by u1
    assert await store.delete_master_key("key-3") is False  # active
    assert await store.delete_master_key("key-9") is False
    assert [(r.key_id, r.status) for r in await store.list_master_keys()] == [("key-1", "retired"), ("key-3", "active")]

    # Records under keys that merely look like key-1 do not hold it back.
    await store.upsert_record(keyed("u1", "key-3", 1))
    await store.insert_record(keyed("look-alike-1", "KEY-1"))
    await store.insert_record(keyed("look-alike-2", "key-1 "))
    assert await store.delete_master_key("key-1") is True
    assert [(r.key_id, r.status) for r in await store.list_master_keys()] == [("key-3", "active")]
    # Records are never touched by it.
    assert await store.count_records_by_key() == {"key-3": 3, "KEY-1": 1, "key-1 ": 1}
    # And a new key after a deletion works.
    await store.add_master_key(mk("key-4"))
    assert active(await store.list_master_keys()) == ["key-4"]


async def test_delete_master_key_compares_the_key_id_exactly(
    store: Store, backend: str, request: pytest.FixtureRequest
) -> None:
    await store.add_master_key(mk("key-1"))
    await store.add_master_key(mk("key-2"))
    await store.insert_record(keyed("u1", "key-1"))
    for look_alike in ("KEY-1", "key-1 ", "Key-1"):
        assert await store.delete_master_key(look_alike) is False, repr(look_alike)
        assert [r.key_id for r in await store.list_master_keys()] == ["key-1", "key-2"], repr(look_alike)


# -- leases ---------------------------------------------------------------------------------


async def test_lease_take_renew_refuse_release(store: Store) -> None:
    assert await store.get_lease("rotation") is None
    assert await store.acquire_lease("rotation", "host-a", 5.0) is True
    holder, left = await store.get_lease("rotation")  # type: ignore[misc]
    assert holder == "host-a" and 4.0 < left <= 5.0, (holder, left)

    # Another holder while it runs: refused, nothing changes.
    assert await store.acquire_lease("rotation", "host-b", 60.0) is False
    holder, left = await store.get_lease("rotation")  # type: ignore[misc]
    assert holder == "host-a" and left <= 5.0

    # The holder renews (longer, then shorter).
    assert await store.acquire_lease("rotation", "host-a", 30.0) is True
    holder, left = await store.get_lease("rotation")  # type: ignore[misc]
    assert holder == "host-a" and 29.0 < left <= 30.0, left
    assert await store.acquire_lease("rotation", "host-a", 10.0) is True
    assert 9.0 < (await store.get_lease("rotation"))[1] <= 10.0  # type: ignore[index]

    # Other names are other leases.
    assert await store.get_lease("other") is None
    assert await store.acquire_lease("other", "host-b", 5.0) is True
    assert (await store.get_lease("other"))[0] == "host-b"  # type: ignore[index]
    assert (await store.get_lease("rotation"))[0] == "host-a"  # type: ignore[index]

    # Only the holder's release counts.
    await store.release_lease("rotation", "host-b")
    await store.release_lease("never-taken", "host-a")
    assert (await store.get_lease("rotation"))[0] == "host-a"  # type: ignore[index]
    await store.release_lease("rotation", "host-a")
    assert await store.get_lease("rotation") is None
    await store.release_lease("rotation", "host-a")  # twice: nothing
    assert await store.get_lease("never-taken") is None

    # Released: free for anyone.
    assert await store.acquire_lease("rotation", "host-b", 5.0) is True
    assert (await store.get_lease("rotation"))[0] == "host-b"  # type: ignore[index]
    assert await store.acquire_lease("rotation", "host-a", 5.0) is False
    assert (await store.get_lease("other"))[0] == "host-b"  # type: ignore[index]


async def test_lease_expires(store: Store) -> None:
    ttl = 0.4
    assert await store.acquire_lease("rotation", "host-a", ttl) is True
    assert await store.acquire_lease("own", "host-c", ttl) is True
    assert await store.acquire_lease("rotation", "host-b", ttl) is False
    assert (await store.get_lease("rotation"))[0] == "host-a"  # type: ignore[index]
    await asyncio.sleep(ttl + 0.15)

    # Run out: nobody holds it, and another holder takes it.
    assert await store.get_lease("rotation") is None
    assert await store.acquire_lease("rotation", "host-b", 5.0) is True
    holder, left = await store.get_lease("rotation")  # type: ignore[misc]
    assert holder == "host-b" and 4.0 < left <= 5.0
    # The former holder can neither renew it nor release it now.
    assert await store.acquire_lease("rotation", "host-a", 5.0) is False
    await store.release_lease("rotation", "host-a")
    assert (await store.get_lease("rotation"))[0] == "host-b"  # type: ignore[index]

    # A holder may take its own run-out lease again.
    assert await store.get_lease("own") is None
    assert await store.acquire_lease("own", "host-c", 5.0) is True
    assert (await store.get_lease("own"))[0] == "host-c"  # type: ignore[index]


async def test_lease_holders_compare_exactly(store: Store, backend: str, request: pytest.FixtureRequest) -> None:
    assert await store.acquire_lease("rotation", "host-a", 30.0) is True
    for other in ("HOST-A", "host-a ", "Host-A"):
        assert await store.acquire_lease("rotation", other, 30.0) is False, repr(other)
        await store.release_lease("rotation", other)
        assert (await store.get_lease("rotation"))[0] == "host-a", repr(other)  # type: ignore[index]


async def race_for_lease(stores: list[Store], takers: int, rounds: int) -> list[list[Any]]:
    """``takers`` holders (spread over ``stores``) take one lease at once:
    a new lease, then one whose holder's time ran out, ``rounds`` times
    each. Every race's outcomes, exceptions included."""
    outcomes = []
    for r in range(rounds):
        for expired in (False, True):
            name = f"race-{r}-{expired}"
            if expired:
                assert await stores[0].acquire_lease(name, "gone", 0.05) is True
                await asyncio.sleep(0.08)
            results = await asyncio.gather(
                *(stores[i % len(stores)].acquire_lease(name, f"holder-{i}", 30.0) for i in range(takers)),
                return_exceptions=True,
            )
            outcomes.append(results)
            if results.count(True) == 1:
                winner = f"holder-{results.index(True)}"
                for s in stores:
                    assert (await s.get_lease(name))[0] == winner  # type: ignore[index]
    return outcomes


async def test_two_daemons_racing_for_a_lease_exactly_one_wins(database_url: str) -> None:
    stores = [await open_url(database_url), await open_url(database_url)]
    try:
        for results in await race_for_lease(stores, 2, rounds=5):
            assert sorted(results, key=repr) == [False, True], results
        # The holder renews while the other tries to take it.
        assert await stores[0].acquire_lease("held", "a", 30.0) is True
        results = await asyncio.gather(*(
            s.acquire_lease("held", holder, 30.0) for _ in range(3) for s, holder in zip(stores, ("a", "b"), strict=False)
        ))
        assert results == [True, False] * 3, results
        assert (await stores[1].get_lease("held"))[0] == "a"  # type: ignore[index]
    finally:
        for s in stores:
            await s.close()


async def test_many_concurrent_lease_takers_exactly_one_wins_and_none_fails(
    database_url: str, backend: str, request: pytest.FixtureRequest
) -> None:
    stores = [await open_url(database_url), await open_url(database_url)]
    try:
        for results in await race_for_lease(stores, 10, rounds=3):
            assert results.count(True) == 1 and results.count(False) == 9, results
    finally:
        for s in stores:
            await s.close()


# -- rotation jobs ---------------------------------------------------------------------------


async def test_rotation_jobs(store: Store) -> None:
    import datetime as dt


    assert await store.latest_rotation_job() is None
    first = await store.start_rotation_job("key-2", "admin@example 🔑")
    assert (first.state, first.target_key_id, first.requested_by) == ("running", "key-2", "admin@example 🔑")
    assert (first.finished_at, first.rewrapped, first.changed, first.unreadable, first.active_seconds) == (
        None, 0, 0, 0, 0.0,
    )
    started = dt.datetime.strptime(first.started_at, "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.UTC)
    assert abs((dt.datetime.now(dt.UTC) - started).total_seconds()) < 60
    assert await store.latest_rotation_job() == first

    second = await store.start_rotation_job("key-3", None)
    assert second.id > first.id
    assert second.requested_by is None
    assert await store.latest_rotation_job() == second

    # Updating the older job does not make it the latest.
    await store.update_rotation_job(
        RotationJob(first.id, "finished", "key-2", "admin@example 🔑", first.started_at, "2024-05-01 12:30:00", 5, 1, 0, 0.5)
    )
    assert await store.latest_rotation_job() == second

    # Progress, then the end: every counter written, the rest kept.
    progress = RotationJob(second.id, "running", "key-3", None, second.started_at, None, 1000, 2, 1, 1.25)
    await store.update_rotation_job(progress)
    assert await store.latest_rotation_job() == progress
    done = RotationJob(
        second.id, "finished", "key-3", None, second.started_at, "2030-01-02 03:04:05", 3_000_000_000, 17, 3, 4321.5
    )
    await store.update_rotation_job(done)
    assert await store.latest_rotation_job() == done

    third = await store.start_rotation_job("key-4", "cli")
    assert third.id > second.id
    assert await store.latest_rotation_job() == third


async def test_concurrent_rotation_jobs_get_distinct_ids(store: Store) -> None:
    jobs = await asyncio.gather(*(store.start_rotation_job(f"key-{i}", f"req-{i}") for i in range(10)))
    assert len({j.id for j in jobs}) == 10
    latest = await store.latest_rotation_job()
    assert latest == max(jobs, key=lambda j: j.id)


# -- one active master key --------------------------------------------------------------


async def test_concurrent_master_key_additions_on_two_stores_leave_exactly_one_active(database_url: str) -> None:
    """Two daemons on one database add keys at once: each addition retires
    the others in its own transaction, so exactly one key is active."""
    first = await open_url(database_url)
    second = await open_url(database_url)
    try:
        for round_ in range(3):
            rows = [mk(f"key-{round_}-{i}") for i in range(8)]
            results = await asyncio.gather(
                *((first if i % 2 else second).add_master_key(r) for i, r in enumerate(rows)),
                return_exceptions=True,
            )
            assert results == [None] * len(rows), results
            for s in (first, second):
                listed = await s.list_master_keys()
                assert len(listed) == 8 * (round_ + 1)
                assert len(active(listed)) == 1, [(r.key_id, r.status) for r in listed]
            assert active(await first.list_master_keys()) == active(await second.list_master_keys())
        # Duplicates racing from both stores: one lands, the other is a Conflict.
        results = await asyncio.gather(
            first.add_master_key(mk("dup", 1)), second.add_master_key(mk("dup", 2)), return_exceptions=True
        )
        assert sorted(type(r).__name__ for r in results) == ["Conflict", "NoneType"], results
        listed = await first.list_master_keys()
        assert active(listed) == ["dup"]
        assert [r.key_material for r in listed if r.key_id == "dup"] in (
            [mk("dup", 1).key_material], [mk("dup", 2).key_material],
        )
    finally:
        await first.close()
        await second.close()


async def test_the_database_itself_refuses_a_second_active_master_key(
    backend: str, database_url: str, request: pytest.FixtureRequest
) -> None:
    store = await open_url(database_url)
    try:
        await store.add_master_key(mk("key-1"))
        await store.add_master_key(mk("key-2"))
    finally:
        await store.close()
    parsed = parse_database_url(database_url)
    sql = "UPDATE master_keys SET status = 'active' WHERE key_id = 'key-1'"
    if parsed.scheme == "sqlite":
        with contextlib.closing(sqlite3.connect(parsed.path)) as conn, pytest.raises(sqlite3.IntegrityError):
            conn.execute(sql)
    else:
        import pymysql

        server: MariaDBServer = request.getfixturevalue("mariadb")
        with pytest.raises(pymysql.IntegrityError):
            server.admin(sql, db=parsed.database)
    store = await open_url(database_url)
    try:
        assert [(r.key_id, r.status) for r in await store.list_master_keys()] == [
            ("key-1", "retired"), ("key-2", "active"),
        ]
    finally:
        await store.close()
