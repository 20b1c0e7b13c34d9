"""Rows and helpers the storage tests share: made-up records and keys whose
ciphertexts say which write they are, a store opened on a URL, and the
schema versions a database records."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from typing import Any
from urllib.parse import urlsplit

import pytest

from devtools.mariadb_server import MariaDBServer
from kmsd.config import parse_database_url
from kmsd.runtime import open_store
from kmsd.store import MasterKeyRow, Record, SigningKeyRow, Store

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
        from kmsd.store_sqlite import MIGRATIONS as _SQLITE_MIGRATIONS

        count = len(_SQLITE_MIGRATIONS)
    else:
        from kmsd.mysql_schema import MIGRATIONS as _MIGRATIONS

        count = len(_MIGRATIONS)
    return list(range(1, count + 1))



def keyed(user_id: str, key_id: str | None, n: int = 0, created_at: str | None = T0) -> Record:
    """``rec`` under master key ``key_id``."""
    return Record(user_id, f"ek:{user_id}:{n}", f"dek:{user_id}:{n}", created_at, key_id)


def fields(r: Record | None) -> tuple[Any, ...] | None:
    """Every column of a record (its repr hides them), for readable failures."""
    if r is None:
        return None
    return (r.user_id, r.encrypted_key, r.encrypted_dek, r.created_at, r.master_key_id)


def rewrapped(old: Record, key_id: str) -> tuple[Record, str, str]:
    """One change for ``rewrap_records``: ``old``'s DEK wrapped under ``key_id``."""
    return old, f"rewrapped:{old.user_id}:{key_id}", key_id


def after_rewrap(old: Record, key_id: str) -> Record:
    """What ``rewrapped(old, key_id)`` leaves in the row."""
    return Record(old.user_id, old.encrypted_key, f"rewrapped:{old.user_id}:{key_id}", old.created_at, key_id)


async def all_records(store: Store) -> dict[str, tuple[Any, ...] | None]:
    return {r.user_id: fields(r) for r in await store.scan_records(None, 10_000)}


def active(rows: list[Any]) -> list[str]:
    return [getattr(r, "key_id", None) or r.kid for r in rows if r.status == "active"]


async def crash_server(server: MariaDBServer) -> None:
    """kill -9 and start again. The event loop runs in between, as a
    daemon's would: the store may notice its connections closing."""
    try:
        server.kill()
        await asyncio.sleep(0.05)
    finally:
        server.start()
