"""Scheduled key deletion: a retired master key is scheduled, listed as
pending with its date, cancelled, or destroyed once its window has passed
and no stored record uses it.

On the storage contract (SQLite and a private MariaDB), in-process on a real
store and a real vault process with a clock the test moves (the window is
days long), and against the real daemon over HTTP and ``kmsd mk``. The
refusal to unwrap under a pending key is tested with the service that
raises it; here only the pending set it reads from is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import API, Daemon, open_api, remember
from support.store import T0, keyed, mk, open_url, rec, rewrapped
from test_admin_cli import FAST, mk_json
from test_admin_cli import mk as mk_cli

from devtools.mariadb_server import MariaDBServer
from kmsd.config import load_settings, parse_database_url
from kmsd.errors import BadRequest, Conflict, NotFound
from kmsd.logs import get_logger
from kmsd.rotation import Rotator
from kmsd.runtime import Runtime
from kmsd.service import KMS
from kmsd.store import KeyDeletion, Record, Store

DAY = 86400.0


def deletion(key_id: str, after: float = 1000.0, by: str | None = "admin") -> KeyDeletion:
    return KeyDeletion(key_id, after, by, T0)


# -- the storage contract ------------------------------------------------------------------


async def test_only_a_retired_key_can_be_scheduled_once(store: Store) -> None:
    await store.add_master_key(mk("key-1"))
    await store.add_master_key(mk("key-2"))  # key-1 retired
    assert await store.list_key_deletions() == []
    # The active key, an unknown key, a look-alike of a retired one: nothing written.
    assert await store.schedule_key_deletion(deletion("key-2")) is False
    assert await store.schedule_key_deletion(deletion("key-9")) is False
    assert await store.schedule_key_deletion(deletion("KEY-1")) is False
    assert await store.list_key_deletions() == []

    assert await store.schedule_key_deletion(deletion("key-1", 1234.5, "uid=0")) is True
    assert await store.list_key_deletions() == [KeyDeletion("key-1", 1234.5, "uid=0", T0)]
    with pytest.raises(Conflict):
        await store.schedule_key_deletion(deletion("key-1", 99.0))
    assert await store.list_key_deletions() == [KeyDeletion("key-1", 1234.5, "uid=0", T0)]
    # master_keys is the original's: the key stays 'retired' there.
    assert [(r.key_id, r.status) for r in await store.list_master_keys()] == [("key-1", "retired"), ("key-2", "active")]

    assert await store.cancel_key_deletion("KEY-1") is False
    assert await store.cancel_key_deletion("key-1") is True
    assert await store.cancel_key_deletion("key-1") is False
    assert await store.list_key_deletions() == []
    # And again after a cancellation, without requested_by.
    assert await store.schedule_key_deletion(deletion("key-1", 5.0, None)) is True
    assert await store.list_key_deletions() == [KeyDeletion("key-1", 5.0, None, T0)]


async def test_a_scheduled_key_is_destroyed_only_when_due_unused_and_still_scheduled(store: Store) -> None:
    for key_id in ("key-1", "key-2", "key-3"):
        await store.add_master_key(mk(key_id))
    await store.insert_record(keyed("u1", "key-1"))
    await store.insert_record(keyed("u3", "key-3"))
    assert await store.schedule_key_deletion(deletion("key-1", 1000.0))
    assert await store.schedule_key_deletion(deletion("key-2", 1000.0))

    # Not due yet; not scheduled at all; active.
    assert await store.destroy_scheduled_key("key-2", 999.0) is False
    assert await store.destroy_scheduled_key("key-3", 5000.0) is False
    # Due, but a record is under it.
    assert await store.destroy_scheduled_key("key-1", 1000.0) is False
    # Due and unused, but a record is unclassified (it may be under it).
    await store.insert_record(rec("legacy"))
    assert await store.destroy_scheduled_key("key-2", 1000.0) is False
    assert await store.rewrap_records([rewrapped(rec("legacy"), "key-3")]) == 1
    # A cancelled deletion is never carried out, due or not.
    assert await store.cancel_key_deletion("key-2")
    assert await store.destroy_scheduled_key("key-2", 1000.0) is False
    assert [r.key_id for r in await store.list_master_keys()] == ["key-1", "key-2", "key-3"]

    assert await store.schedule_key_deletion(deletion("key-2", 1000.0))
    assert await store.destroy_scheduled_key("key-2", 1000.0) is True
    assert [r.key_id for r in await store.list_master_keys()] == ["key-1", "key-3"]
    assert [d.key_id for d in await store.list_key_deletions()] == ["key-1"]
    assert await store.destroy_scheduled_key("key-2", 1000.0) is False

    # Once the rewrap has moved its record off it, the pending key goes too.
    assert await store.rewrap_records([rewrapped(keyed("u1", "key-1"), "key-3")]) == 1
    assert await store.destroy_scheduled_key("key-1", 1000.0) is True
    assert [r.key_id for r in await store.list_master_keys()] == ["key-3"]
    assert await store.list_key_deletions() == []
    assert await store.count_records_by_key() == {"key-3": 3}  # records are never touched


async def test_delete_master_key_takes_its_scheduled_deletion_along(store: Store) -> None:
    await store.add_master_key(mk("key-1"))
    await store.add_master_key(mk("key-2"))
    await store.add_master_key(mk("key-3"))
    assert await store.schedule_key_deletion(deletion("key-1"))
    assert await store.schedule_key_deletion(deletion("key-2"))
    await store.insert_record(keyed("u", "key-2"))
    assert await store.delete_master_key("key-1") is True
    # Refused: its deletion stays scheduled.
    assert await store.delete_master_key("key-2") is False
    assert [d.key_id for d in await store.list_key_deletions()] == ["key-2"]
    # A key with the same id later starts with no deletion scheduled.
    await store.add_master_key(mk("key-1", 1))
    assert await store.destroy_scheduled_key("key-1", 1e12) is False


async def test_concurrent_schedules_of_one_key_exactly_one_wins(store: Store) -> None:
    await store.add_master_key(mk("key-1"))
    await store.add_master_key(mk("key-2"))
    results = await asyncio.gather(
        *(store.schedule_key_deletion(deletion("key-1", float(i))) for i in range(6)), return_exceptions=True
    )
    assert results.count(True) == 1 and all(isinstance(r, Conflict) for r in results if r is not True), results
    (only,) = await store.list_key_deletions()
    assert only.delete_after == float(results.index(True))


async def test_the_deletions_table_is_added_to_an_existing_database_and_master_keys_kept(
    backend: str, database_url: str, request: pytest.FixtureRequest
) -> None:
    """The migration on a database of the previous schema: the table comes,
    the original's master_keys (its status still 'active'/'retired') stays."""
    store = await open_url(database_url)
    try:
        await store.add_master_key(mk("key-1"))
        await store.add_master_key(mk("key-2"))
    finally:
        await store.close()
    parsed = parse_database_url(database_url)
    if backend == "sqlite":
        conn = sqlite3.connect(parsed.path)
        conn.execute("DROP TABLE kmsd_key_deletions")
        conn.execute("DELETE FROM kmsd_schema_migrations WHERE version = 7")
        conn.commit()
        conn.close()
    else:
        server: MariaDBServer = request.getfixturevalue("mariadb")
        server.admin("DROP TABLE kmsd_key_deletions", db=parsed.database)
        server.admin("DELETE FROM kmsd_schema_migrations WHERE version = 8", db=parsed.database)
    store = await open_url(database_url)
    try:
        assert await store.list_key_deletions() == []
        assert await store.schedule_key_deletion(deletion("key-1"))
        assert [(r.key_id, r.status) for r in await store.list_master_keys()] == [
            ("key-1", "retired"), ("key-2", "active"),
        ]
    finally:
        await store.close()
    if backend == "mysql":
        server = request.getfixturevalue("mariadb")
        assert server.admin(
            "SELECT COLUMN_TYPE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s"
            " AND TABLE_NAME = 'master_keys' AND COLUMN_NAME = 'status'", (parsed.database,),
        ) == [("enum('active','retired')",)]


# -- the key ring, in-process, with a clock the test moves -----------------------------------


class Clock:
    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, days: float) -> None:
        self.now += days * DAY


@pytest.fixture
def root_key_file(workdir: Path) -> Path:
    path = workdir / f"deletion-root-{os.urandom(3).hex()}.key"
    key = os.urandom(32).hex()
    remember(key)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path


@contextlib.asynccontextmanager
async def key_ring(url: str, root_key_file: Path, clock: Clock) -> AsyncIterator[KMS]:
    """What a daemon runs on a database, in this process: the real store and
    a real vault process, with ``clock`` as the service's clock."""
    base = root_key_file.parent / f"kr-{os.urandom(3).hex()}"
    base.mkdir()
    settings = load_settings(
        overrides={"database_url": url, "root_key_file": str(root_key_file), "socket": str(base / "s.sock")},
        environ={},
    )
    runtime = Runtime(settings, log=get_logger(process="test"))
    # The composition root's parts, with a KMS of our clock: it becomes the
    # vault's loader (``on_start``) in place of the runtime's own.
    kms = KMS(runtime.store, runtime.vault, runtime.kms.tokens, clock=clock)
    async with runtime.running():
        yield kms


class Events:
    """A logger that keeps what the periodic duty says."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def _log(self, event: str, **kw: Any) -> None:
        self.lines.append((event, kw))

    info = warning = error = _log

    def named(self, event: str) -> list[dict[str, Any]]:
        return [kw for name, kw in self.lines if name == event]


async def test_the_window_passes_unused_keys_go_used_ones_stay_pending_with_why(
    backend: str, database_url: str, root_key_file: Path
) -> None:
    clock = Clock()
    async with key_ring(database_url, root_key_file, clock) as kms:
        ring = kms.keyring
        first = ring.state.active_key_id
        assert first is not None
        second, _ = await ring.add("second")
        third, _ = await ring.add("third")
        # A record under the second key keeps it.
        await kms.store.insert_record(Record("holder", "ek", "dek", T0, second))

        # Refusals.
        with pytest.raises(Conflict, match="rotate first"):
            await ring.schedule_deletion(third)
        with pytest.raises(NotFound):
            await ring.schedule_deletion("key-0")
        for days in (6, 31, 0, -1):
            with pytest.raises(BadRequest):
                await ring.schedule_deletion(first, days)
        with pytest.raises(Conflict, match="not scheduled"):
            await ring.cancel_deletion(first)
        with pytest.raises(NotFound):
            await ring.cancel_deletion("key-0")

        one = await ring.schedule_deletion(first, 7, "test")
        two = await ring.schedule_deletion(second)  # 30 days by default
        assert one["status"] == "pending_deletion" and two["status"] == "pending_deletion"
        with pytest.raises(Conflict, match="already scheduled"):
            await ring.schedule_deletion(first, 10)
        assert ring.state.pending_deletion == {first, second}
        listing = {k["key_id"]: k for k in await ring.listing()}
        assert listing[first]["status"] == listing[second]["status"] == "pending_deletion"
        assert listing[first]["deletion_date"] == one["deletion_date"] < two["deletion_date"]
        assert listing[third]["status"] == "active" and "deletion_date" not in listing[third]
        assert not any("deletion_blocked" in k for k in listing.values())

        # Before the window ends: nothing.
        clock.advance(6.9)
        report = await ring.destroy_due()
        assert report.destroyed == [] and report.blocked == {}
        assert {k["key_id"] for k in await ring.listing()} == {first, second, third}

        # After seven days the unused first key goes, from the store and the vault.
        clock.advance(0.2)
        report = await ring.destroy_due()
        assert report.destroyed == [first] and report.blocked == {}
        assert [r.key_id for r in ring.state.master_keys] == [second, third]
        assert ring.state.pending_deletion == {second}
        # After thirty, the second stays: a record uses it. The listing says why.
        clock.advance(30)
        report = await ring.destroy_due()
        assert report.destroyed == []
        assert report.blocked[second][1] == 1 and "still wraps 1 records" in report.blocked[second][0]
        (pending,) = [k for k in await ring.listing() if k["key_id"] == second]
        assert pending["status"] == "pending_deletion" and "still wraps 1 records" in pending["deletion_blocked"]
        assert ring.state.pending_deletion == {second}

        # Once the rotation's rewrap moved the record off it, the next run destroys it.
        old = await kms.store.get_record("holder")
        assert old is not None
        assert await kms.store.rewrap_records([(old, "dek2", third)]) == 1
        report = await ring.destroy_due()
        assert report.destroyed == [second]
        assert [k["key_id"] for k in await ring.listing()] == [third]
        assert ring.state.pending_deletion == frozenset()


async def test_another_daemons_schedule_and_cancel_reach_this_one_at_refresh(
    backend: str, database_url: str, root_key_file: Path
) -> None:
    clock = Clock()
    async with key_ring(database_url, root_key_file, clock) as a, key_ring(database_url, root_key_file, clock) as b:
        first = a.keyring.state.active_key_id
        assert first is not None
        await a.keyring.add("second")
        await b.keyring.refresh()
        assert b.keyring.state.pending_deletion == frozenset()

        await a.keyring.schedule_deletion(first, 7)
        assert a.keyring.state.pending_deletion == {first}
        assert await b.keyring.refresh() is True
        assert b.keyring.state.pending_deletion == {first}
        assert await b.keyring.refresh() is False  # nothing changed since

        await b.keyring.cancel_deletion(first)
        assert b.keyring.state.pending_deletion == frozenset()
        assert await a.keyring.refresh() is True
        assert a.keyring.state.pending_deletion == frozenset()
        assert {k["key_id"]: k["status"] for k in await a.keyring.listing()}[first] == "retired"

        # Two daemons carrying out one due deletion: destroyed once.
        await a.keyring.schedule_deletion(first, 7)
        clock.advance(8)
        reports = await asyncio.gather(a.keyring.destroy_due(), b.keyring.destroy_due())
        assert sorted(r.destroyed for r in reports) == [[], [first]]
        await a.keyring.refresh()
        await b.keyring.refresh()
        assert first not in {r.key_id for r in b.keyring.state.master_keys}


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_the_daemons_periodic_duty_destroys_and_reports_once(
    backend: str, database_url: str, root_key_file: Path
) -> None:
    clock = Clock()
    async with key_ring(database_url, root_key_file, clock) as kms:
        first = kms.keyring.state.active_key_id
        assert first is not None
        second, _ = await kms.keyring.add("second")
        await kms.keyring.add("third")
        await kms.store.insert_record(Record("holder", "ek", "dek", T0, second))
        await kms.keyring.schedule_deletion(first, 7)
        await kms.keyring.schedule_deletion(second, 7)
        events = Events()
        rotator = Rotator(kms, refresh_interval=0.02, deletion_interval=0.05, log=events)
        rotator.start()
        try:
            await asyncio.sleep(0.3)
            assert events.named("master_key_destroyed") == []
            clock.advance(7.01)
            for _ in range(100):
                if events.named("master_key_destroyed") and events.named("master_key_deletion_blocked"):
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # several more runs: said once
        finally:
            await rotator.close()
        assert events.named("master_key_destroyed") == [{"key_id": first, "reason": "scheduled deletion"}]
        (blocked,) = events.named("master_key_deletion_blocked")
        assert blocked["key_id"] == second and blocked["records"] == 1
        assert events.named("key_watch_failed") == []


# -- the real daemon: HTTP and kmsd mk ----------------------------------------------------


async def retired_key(api: API) -> str:
    """A retired key: the active one, retired by a new key."""
    status, added = await api.call("POST", "/api/master-keys", {"description": "deletion test"})
    assert status == 200, added
    return str(added["previous_key_id"])


def listed(body: dict[str, Any], key_id: str) -> dict[str, Any]:
    return next(k for k in body["master_keys"] if k["key_id"] == key_id)


@pytest.mark.parametrize("backend", ["sqlite", "mysql"], indirect=True)
async def test_schedule_list_cancel_and_destroy_over_http(
    backend: str, database_url: str, daemon_factory: Any, workdir: Path
) -> None:
    trail = workdir / f"deletion-audit-{os.urandom(3).hex()}.jsonl"
    d: Daemon = daemon_factory(database=database_url, extra_env={**FAST, "KMSD_AUDIT_LOG": str(trail)})
    session, api = open_api(d, "unix")
    async with session:
        await api.store("kd-alice", "kept under the first key")
        first = await retired_key(api)

        status, body = await api.call("POST", f"/api/master-keys/{first}/schedule-deletion", {"days": 7})
        assert status == 200, body
        assert body["key_id"] == first and body["status"] == "pending_deletion"
        date = body["deletion_date"]
        assert len(date) == 19 and date[4] == "-" and date[13] == ":", date
        status, keys = await api.call("GET", "/api/master-keys")
        entry = listed(keys, first)
        assert entry["status"] == "pending_deletion" and entry["deletion_date"] == date
        assert entry["records"] == 1 and "deletion_blocked" not in entry

        status, body = await api.call("POST", f"/api/master-keys/{first}/cancel-deletion")
        assert (status, body) == (200, {"key_id": first, "status": "retired"})
        entry = listed((await api.call("GET", "/api/master-keys"))[1], first)
        assert entry["status"] == "retired" and "deletion_date" not in entry

        # No body at all: 30 days.
        status, body = await api.call("POST", f"/api/master-keys/{first}/schedule-deletion")
        assert status == 200 and body["deletion_date"] > date, body

        # DELETE needs the confirmation; with it, an unused key goes at once.
        spare = await retired_key(api)
        status, body = await api.call("DELETE", f"/api/master-keys/{spare}")
        assert status == 400 and body["code"] == "bad_request", body
        assert "schedule" in body["error"] and "now=true" in body["error"], body
        for query in ("?now=1", "?now=TRUE", "?now=true&now=true", "?now="):
            assert (await api.call("DELETE", f"/api/master-keys/{spare}{query}"))[0] == 400, query
        assert {k["key_id"] for k in (await api.call("GET", "/api/master-keys"))[1]["master_keys"]} >= {spare}
        status, body = await api.call("DELETE", f"/api/master-keys/{spare}?now=true")
        assert (status, body) == (200, {"message": "Master key destroyed", "key_id": spare})
        assert (await api.call("DELETE", f"/api/master-keys/{spare}?now=true"))[0] == 404
        # A pending key that records still use: refused at once too.
        status, body = await api.call("DELETE", f"/api/master-keys/{first}?now=true")
        assert status == 409 and body["records"] == 1, body
        assert listed((await api.call("GET", "/api/master-keys"))[1], first)["status"] == "pending_deletion"

    audited = [json.loads(line) for line in trail.read_text().splitlines()]
    ops = [(a["operation"], a["subject"], a["status"]) for a in audited if "deletion" in a["operation"]]
    assert ops == [
        ("schedule_key_deletion", first, 200), ("cancel_key_deletion", first, 200),
        ("schedule_key_deletion", first, 200),
    ], ops


async def test_refusals_over_http(shared_daemon: Daemon) -> None:
    session, api = open_api(shared_daemon, "unix")
    tcp_session, tcp = open_api(shared_daemon, "tcp")
    async with session, tcp_session:
        key = await retired_key(api)
        active = (await api.call("GET", "/api/master-keys"))[1]["active_key_id"]
        schedule = f"/api/master-keys/{key}/schedule-deletion"

        async def refused(method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                          via: API = api) -> tuple[int, str]:
            status, answer = await via.call(method, path, body, raw=raw)
            assert isinstance(answer, dict) and set(answer) >= {"error", "code"}, answer
            return status, answer["code"]

        for days in (6, 31, 0, "x", 7.5, True, None, "10", [7]):
            assert await refused("POST", schedule, {"days": days}) == (400, "bad_request"), days
        assert await refused("POST", schedule, {"days": 7, "when": "now"}) == (400, "bad_request")
        assert await refused("POST", schedule, raw=b"[7]") == (400, "bad_request")
        assert await refused("POST", schedule, raw=b"{", ) == (400, "bad_request")
        assert await refused("POST", f"/api/master-keys/{active}/schedule-deletion") == (409, "conflict")
        assert await refused("POST", "/api/master-keys/key-0/schedule-deletion") == (404, "not_found")
        assert await refused("POST", "/api/master-keys/" + "k" * 65 + "/schedule-deletion") == (400, "bad_request")
        assert await refused("POST", "/api/master-keys/%09tab/cancel-deletion") == (400, "bad_request")
        assert await refused("POST", f"/api/master-keys/{key}/cancel-deletion") == (409, "conflict")
        assert await refused("POST", "/api/master-keys/key-0/cancel-deletion") == (404, "not_found")
        assert (await api.call("POST", schedule, {"days": 8}))[0] == 200
        status, code = await refused("POST", schedule, {"days": 8})
        assert (status, code) == (409, "conflict")
        # Not an admin peer (TCP callers never are, by default): 403 before anything.
        for method, path in (("POST", schedule), ("POST", f"/api/master-keys/{key}/cancel-deletion"),
                             ("DELETE", f"/api/master-keys/{key}?now=true")):
            assert await refused(method, path, via=tcp) == (403, "forbidden"), path
        assert listed((await api.call("GET", "/api/master-keys"))[1], key)["status"] == "pending_deletion"
        assert (await api.call("POST", f"/api/master-keys/{key}/cancel-deletion"))[0] == 200


@pytest.mark.parametrize("backend", ["sqlite", "mysql"], indirect=True)
def test_kmsd_mk_schedule_cancel_and_destroy(backend: str, database_url: str, daemon_factory: Any) -> None:
    d: Daemon = daemon_factory(database=database_url, extra_env=FAST)
    first = mk_json(d, "active")["key_id"]
    assert mk_cli(d, "add").returncode == 0
    second = mk_json(d, "active")["key_id"]

    proc = mk_cli(d, "schedule-deletion", first, "--days", "9")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"master key {first} will be destroyed after ") and " UTC" in proc.stdout
    (entry,) = [k for k in mk_json(d, "list") if k["key_id"] == first]
    assert entry["status"] == "pending_deletion" and entry["deletion_date"] in proc.stdout
    # A pending key is still a retired key.
    assert [k["key_id"] for k in mk_json(d, "retired")] == [first]
    table = mk_cli(d, "list").stdout
    assert any(line.split()[:2] == [first, "pending_deletion"] for line in table.splitlines()), table

    for args, says in (
        (("schedule-deletion", first), "already scheduled"),
        (("schedule-deletion", second), "rotate first"),
        (("schedule-deletion", "key-0"), "no such master key"),
        (("schedule-deletion", first, "--days", "6"), "days must be"),
        (("schedule-deletion", first, "--days", "31"), "days must be"),
        (("cancel-deletion", second), "not scheduled"),
    ):
        proc = mk_cli(d, *args)
        assert proc.returncode == 1 and says in proc.stderr, (args, proc.stderr)
    proc = mk_cli(d, "schedule-deletion", first, "--days", "x", strict=False)
    assert proc.returncode == 2 and "invalid int value" in proc.stderr, proc.stderr

    proc = mk_cli(d, "cancel-deletion", first)
    assert proc.returncode == 0 and "no longer scheduled" in proc.stdout, proc.stderr
    (entry,) = [k for k in mk_json(d, "list") if k["key_id"] == first]
    assert entry["status"] == "retired" and "deletion_date" not in entry

    # destroy needs --now; the refusal names the safe way.
    proc = mk_cli(d, "destroy", first)
    assert proc.returncode == 1 and "schedule-deletion" in proc.stderr and "--now" in proc.stderr, proc.stderr
    assert first in {k["key_id"] for k in mk_json(d, "list")}
    proc = mk_cli(d, "destroy", first, "--now")
    assert proc.returncode == 0 and proc.stdout.strip() == f"master key {first} destroyed", proc.stderr
    assert [k["key_id"] for k in mk_json(d, "list")] == [second]
