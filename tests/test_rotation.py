"""Master-key rotation for real: background rewrap in the vault, compare-and-
set against concurrent clients, kill -9 of the vault and of the daemon in
the middle, several daemons on one MariaDB database, scheduled rotation."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import API, Daemon, open_api, remember

# Fast settling for tests: a job ends 2 * refresh + 1 s after it started.
FAST = {
    "KMSD_KEY_REFRESH_INTERVAL": "0.3",
    "KMSD_ROTATION_LEASE_TTL": "2",
}


class DB:
    """Read-only SQL on the database a daemon uses, by the test itself."""

    def __init__(self, url: str, request: pytest.FixtureRequest) -> None:
        self.url = url
        self.request = request

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.url.startswith("sqlite:///"):
            conn = sqlite3.connect(self.url[len("sqlite:///"):])
            try:
                return list(conn.execute(sql.replace("%s", "?"), params))
            finally:
                conn.close()
        server = self.request.getfixturevalue("mariadb")
        return server.admin(sql, params or None, db=self.url.rsplit("/", 1)[1])

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        if self.url.startswith("sqlite:///"):
            conn = sqlite3.connect(self.url[len("sqlite:///"):])
            try:
                conn.execute(sql.replace("%s", "?"), params)
                conn.commit()
            finally:
                conn.close()
        else:
            self.rows(sql, params)

    def active_keys(self) -> list[str]:
        return [r[0] for r in self.rows("SELECT key_id FROM master_keys WHERE status = 'active'")]

    def keys_of_records(self) -> dict[Any, int]:
        return {r[0]: int(r[1]) for r in self.rows("SELECT master_key_id, COUNT(*) FROM kms_keys GROUP BY master_key_id")}


async def store_many(api: API, n: int, prefix: str, *, concurrency: int = 64) -> dict[str, tuple[str, str]]:
    """n records; user id -> (token, data). Only a sample goes to the log
    scan: checking 20,000 secrets against every log would take minutes."""
    gate = asyncio.Semaphore(concurrency)
    out: dict[str, tuple[str, str]] = {}

    async def one(i: int) -> None:
        user_id, data = f"{prefix}{i:05d}", f"value-{i}-{os.urandom(4).hex()}"
        async with gate:
            status, body = await api.call("POST", "/api/keys", {"user_id": user_id, "data": data})
        assert status == 200, body
        out[user_id] = (body["access_token"], data)
        if i % 500 == 0:
            remember(data, body["access_token"])

    await asyncio.gather(*(one(i) for i in range(n)))
    return out


async def check_all(api: API, records: dict[str, tuple[str, str]], *, concurrency: int = 64) -> None:
    gate = asyncio.Semaphore(concurrency)
    bad: list[str] = []

    async def one(user_id: str, token: str, data: str) -> None:
        async with gate:
            status, body = await api.call("GET", "/api/keys", token=token)
        if (status, body) != (200, {"data": data}):
            bad.append(f"{user_id}: {status} {body}")

    await asyncio.gather(*(one(u, t, d) for u, (t, d) in records.items()))
    assert not bad, f"{len(bad)} records do not read back, e.g. {bad[:3]}"


def wait_status(d: Daemon, pred: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        status, body = d.get("/api/rotate-mk")
        if status == 200:
            last = body
            if pred(body):
                return body
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}; last status: {last}\n{d.logs()[-3000:]}")


def finished(job_id: int) -> Any:
    return lambda s: s["job"] and s["job"]["id"] == job_id and s["job"]["state"] == "finished"


# -- one daemon -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "mysql"], indirect=True)
async def test_rotation_rewraps_every_record_and_leaves_client_updates_alone(
    backend: str, database_url: str, daemon_factory: Any, request: pytest.FixtureRequest
) -> None:
    d = daemon_factory(database=database_url, extra_env={**FAST, "KMSD_ROTATION_BATCH_SIZE": "50"})
    db = DB(database_url, request)
    session, api = open_api(d, "unix")
    async with session:
        records = await store_many(api, 1500, "rot")
        before = {r[0]: r for r in db.rows("SELECT user_id, encrypted_key, encrypted_dek FROM kms_keys")}
        old_key = db.active_keys()[0]

        status, body = await api.call("POST", "/api/rotate-mk")
        assert status == 200, body
        new_key, job_id = body["active_key_id"], body["job"]["id"]
        assert body["previous_key_id"] == old_key and body["state"] == "running"
        # A second request while the job runs: 409, with the running job's status.
        status, again = await api.call("POST", "/api/rotate-mk")
        assert status == 409 and again["rotation"]["job"]["id"] == job_id, again

        # Clients replace some of their records while the rewrap runs: the
        # rewrap must not overwrite them (compare-and-set).
        replaced = {}
        for user_id in list(records)[::15]:
            token, _ = records[user_id]
            data = f"replaced-{os.urandom(4).hex()}"
            assert (await api.call("POST", "/api/keys", {"user_id": user_id, "data": data}, token=token))[0] == 200
            replaced[user_id] = (token, data)
        records.update(replaced)

        done = await asyncio.to_thread(wait_status, d, finished(job_id), 60, "the rewrap to finish")
        job = done["job"]
        assert done["active_key_id"] == new_key and done["remaining_total"] == 0, done
        assert job["rewrapped"] + job["changed"] >= len(records) - len(replaced)
        assert job["unreadable"] == 0 and job["rate_per_second"] > 0
        assert job["started_at"] and job["finished_at"]
        counts = {k["key_id"]: k["records"] for k in done["master_keys"]}
        assert counts == {old_key: 0, new_key: len(records)}
        assert db.active_keys() == [new_key]
        assert db.keys_of_records() == {new_key: len(records)}

        # Rewrapped rows: same data ciphertext, new wrapped DEK naming the new key.
        after = {r[0]: r for r in db.rows("SELECT user_id, encrypted_key, encrypted_dek FROM kms_keys")}
        for user_id, row in after.items():
            if user_id not in replaced:
                assert row[1] == before[user_id][1] and row[2] != before[user_id][2]
        await check_all(api, records)


async def test_destroy_is_refused_while_a_key_is_in_use(daemon_factory: Any) -> None:
    d = daemon_factory(extra_env=FAST)
    session, api = open_api(d, "unix")
    async with session:
        records = await store_many(api, 40, "dst")
        status, listing = await api.call("GET", "/api/master-keys")
        first = listing["active_key_id"]
        assert status == 200 and listing["master_keys"][0]["records"] == 40

        status, body = await api.call("DELETE", f"/api/master-keys/{first}?now=true")
        assert status == 409 and body["records"] == 40 and "active" in body["error"], body
        # Added without a rewrap: the old key still wraps every record.
        status, added = await api.call("POST", "/api/master-keys", {"description": "by hand"})
        assert status == 200 and added["previous_key_id"] == first
        status, body = await api.call("DELETE", f"/api/master-keys/{first}?now=true")
        assert status == 409 and body["records"] == 40 and "40 records" in body["error"], body
        assert (await api.call("DELETE", "/api/master-keys/no-such-key?now=true"))[0] == 404
        assert (await api.call("DELETE", "/api/master-keys/" + "x" * 65))[0] == 400
        assert (await api.call("POST", "/api/master-keys", {"description": 5}))[0] == 400

        status, body = await api.call("POST", "/api/rotate-mk")
        assert status == 200
        await asyncio.to_thread(wait_status, d, finished(body["job"]["id"]), 30, "the rewrap")
        for key in (first, added["active_key_id"]):
            status, gone = await api.call("DELETE", f"/api/master-keys/{key}?now=true")
            assert status == 200 and gone["key_id"] == key
        status, listing = await api.call("GET", "/api/master-keys")
        assert [k["key_id"] for k in listing["master_keys"]] == [body["active_key_id"]]
        await check_all(api, records)
        # The non-admin side: TCP callers are anonymous.
        tcp_session, tcp = open_api(d, "tcp")
        async with tcp_session:
            for method, path in (("GET", "/api/master-keys"), ("POST", "/api/master-keys"),
                                 ("DELETE", f"/api/master-keys/{first}")):
                assert (await tcp.call(method, path))[0] == 403


@pytest.mark.parametrize("backend", ["sqlite", "mysql"], indirect=True)
async def test_kill_9_of_vault_and_daemon_mid_rotation_loses_nothing(
    backend: str, database_url: str, daemon_factory: Any, request: pytest.FixtureRequest
) -> None:
    """20,000 records; the vault is killed during the rewrap, then the
    daemon; the restarted daemon resumes the job from the data."""
    d = daemon_factory(database=database_url, extra_env={**FAST, "KMSD_ROTATION_BATCH_SIZE": "250"})
    db = DB(database_url, request)
    session, api = open_api(d, "unix")
    async with session:
        records = await store_many(api, 20_000, "crash")
        status, body = await api.call("POST", "/api/rotate-mk")
        assert status == 200, body
        new_key, job_id = body["active_key_id"], body["job"]["id"]

    await asyncio.to_thread(wait_status, d, lambda s: s["job"]["rewrapped"] >= 1000, 60, "first batches")
    vault = d.vault_pid()
    os.kill(vault, signal.SIGKILL)
    await asyncio.to_thread(d.wait_vault, vault)
    progress = await asyncio.to_thread(
        wait_status, d, lambda s: s["job"]["rewrapped"] >= 4000, 60, "progress after the vault restart"
    )
    assert progress["job"]["state"] == "running"
    d.stop(signal.SIGKILL)
    left = db.keys_of_records()
    assert left.get(new_key, 0) < len(records), "the job should have been interrupted mid-way"

    d.start()
    done = await asyncio.to_thread(wait_status, d, finished(job_id), 120, "the resumed rewrap")
    assert done["remaining_total"] == 0 and done["job"]["unreadable"] == 0
    assert db.keys_of_records() == {new_key: len(records)}
    assert "rotation_resumed" in d.logs()
    session, api = open_api(d, "unix")
    async with session:
        await check_all(api, records)


async def test_scheduled_rotation(daemon_factory: Any, request: pytest.FixtureRequest) -> None:
    d = daemon_factory(extra_env=FAST)
    session, api = open_api(d, "unix")
    async with session:
        records = await store_many(api, 30, "sched")
    d.stop()
    db = DB(d.database, request)
    old_key = db.active_keys()[0]
    # The active key is two days old; the period is one day.
    db.execute("UPDATE master_keys SET created_at = '2020-01-01 00:00:00' WHERE key_id = %s", (old_key,))
    d.env["KMSD_ROTATION_PERIOD"] = "1d"
    d.start()
    done = await asyncio.to_thread(
        wait_status, d, lambda s: s["job"] and s["job"]["state"] == "finished", 30, "the scheduled rotation"
    )
    assert done["job"]["requested_by"] == "schedule" and done["active_key_id"] != old_key
    assert db.keys_of_records() == {done["active_key_id"]: 30}
    # Not again: the new key is young.
    time.sleep(1.0)
    assert d.get("/api/rotate-mk")[1]["job"]["id"] == done["job"]["id"]
    session, api = open_api(d, "unix")
    async with session:
        await check_all(api, records)


async def test_vault_down_during_a_batch_writes_nothing(daemon_factory: Any, request: pytest.FixtureRequest) -> None:
    """The vault keeps dying while a rotation runs: no record is written
    half-way, and the rewrap completes once the vault stays up."""
    d = daemon_factory(extra_env={**FAST, "KMSD_ROTATION_BATCH_SIZE": "100"})
    db = DB(d.database, request)
    session, api = open_api(d, "unix")
    async with session:
        records = await store_many(api, 3000, "vd")
        status, body = await api.call("POST", "/api/rotate-mk")
        job_id = body["job"]["id"]
        for _ in range(3):
            try:
                os.kill(d.vault_pid(), signal.SIGKILL)
            except (AssertionError, OSError):
                pass
            await asyncio.sleep(0.1)
        await asyncio.to_thread(wait_status, d, finished(job_id), 60, "the rewrap")
        assert db.keys_of_records() == {body["active_key_id"]: 3000}
        assert "rotation_batch_failed" in d.logs()
        await check_all(api, records)


# -- several daemons on one MariaDB database ----------------------------------------------


@pytest.fixture
def cluster(mariadb: Any, daemon_factory: Any, workdir: Path) -> tuple[list[Daemon], str]:
    url = mariadb.new_database()
    key_file = workdir / f"root-{os.urandom(3).hex()}.key"
    key_file.write_text(os.urandom(32).hex() + "\n")
    key_file.chmod(0o600)
    env = {**FAST, "KMSD_ROOT_KEY_FILE": str(key_file), "KMSD_ROTATION_BATCH_SIZE": "100"}
    daemons = [daemon_factory(database=url, dev=False, extra_env=env, start=False) for _ in range(3)]
    for d in daemons:
        d.start()
    return daemons, url


async def test_three_daemons_share_one_rotation(
    cluster: tuple[list[Daemon], str], request: pytest.FixtureRequest
) -> None:
    daemons, url = cluster
    db = DB(url, request)
    apis = [open_api(d, "unix") for d in daemons]
    try:
        records: dict[str, tuple[str, str]] = {}
        for i, (_, api) in enumerate(apis):
            records.update(await store_many(api, 1500, f"c{i}-"))
        old_key = db.active_keys()[0]

        # Two rotations requested at once on two daemons: one runs, one is 409.
        (s1, b1), (s2, b2) = await asyncio.gather(
            apis[0][1].call("POST", "/api/rotate-mk"), apis[1][1].call("POST", "/api/rotate-mk")
        )
        assert sorted([s1, s2]) == [200, 409], (b1, b2)
        winner = 0 if s1 == 200 else 1
        started = b1 if s1 == 200 else b2
        new_key, job_id = started["active_key_id"], started["job"]["id"]
        assert db.active_keys() == [new_key]

        # Every daemon uses the new key within the refresh interval.
        t0 = time.monotonic()
        for d in daemons:
            await asyncio.to_thread(wait_status, d, lambda s: s["active_key_id"] == new_key, 3, "the new key")
        staleness = time.monotonic() - t0
        fresh = await store_many(apis[2][1], 20, "fresh-")
        records.update(fresh)
        rows = db.rows("SELECT DISTINCT master_key_id FROM kms_keys WHERE user_id LIKE 'fresh-%%'")
        assert rows == [(new_key,)], rows

        # Exactly one daemon holds the lease; kill it mid-rewrap and another
        # takes the job over once the lease has run out.
        status = await asyncio.to_thread(
            wait_status, daemons[winner], lambda s: s["lease"] is not None, 10, "the lease"
        )
        holder = status["lease"]["holder"]
        assert f":{daemons[winner].pid}:" in holder
        # A job stays running for at least 2 * refresh + 1 s (see rotation.py).
        assert status["job"]["state"] == "running"
        daemons[winner].stop(signal.SIGKILL)
        survivors = [d for i, d in enumerate(daemons) if i != winner]
        done = await asyncio.to_thread(wait_status, survivors[0], finished(job_id), 90, "the rewrap")
        assert sum("rotation_resumed" in d.logs() for d in survivors) == 1
        assert done["remaining_total"] == 0 and db.keys_of_records() == {new_key: len(records)}
        assert db.active_keys() == [new_key] and old_key != new_key
        await check_all(apis[2][1], records)
    finally:
        for session, _ in apis:
            await session.close()
    assert staleness < 3


async def test_the_original_master_key_functions_as_a_library(workdir: Path) -> None:
    """addMasterKey, getActiveMasterKey, getRetiredMasterKeys, listMasterKeys
    of the original, on a real store and a real vault."""
    from kmsd.config import load_settings
    from kmsd.logs import get_logger
    from kmsd.runtime import Runtime

    base = workdir / f"lib-{os.urandom(3).hex()}"
    base.mkdir()
    settings = load_settings(
        overrides={"database_url": f"sqlite:///{base / 'kmsd.db'}", "dev": True, "socket": str(base / "s.sock")},
        environ={},
    )
    async with Runtime(settings, log=get_logger(process="test")).running() as runtime:
        kms = runtime.kms
        first = await kms.keyring.active()
        assert first is not None and await kms.keyring.retired() == []
        new_id, previous = await kms.keyring.add("by the library")
        assert previous == first.key_id
        active = await kms.keyring.active()
        assert active is not None and active.key_id == new_id and active.description == "by the library"
        assert [r.key_id for r in await kms.keyring.retired()] == [first.key_id]
        listing = await kms.keyring.listing()
        assert [(k["key_id"], k["status"], k["records"]) for k in listing] == [
            (first.key_id, "retired", 0), (new_id, "active", 0),
        ]
        # The rows never carry a plaintext key: only the wrapped material.
        assert "key_material" not in listing[0]
