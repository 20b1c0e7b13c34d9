"""What only a server can do to a client, on the MySQL leg: go away, restart,
hang, refuse a password, run with commits that are not durable; and several
stores opening one new database at once."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from support.store import active, crash_server, db_name, expected_versions, mk, open_url, rec, sk

from devtools.mariadb_server import MariaDBServer
from kmsd.config import parse_database_url
from kmsd.runtime import open_store
from kmsd.store import Store, StoreError

# -- MySQL only: the server goes away or hangs ---------------------------------------------


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


