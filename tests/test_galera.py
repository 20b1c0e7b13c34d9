"""kmsd daemons on several hosts over a real 3-node MariaDB Galera cluster:
one daemon per node (each with the whole node list, its own node first),
the same root key everywhere. Read-your-writes across nodes, races between
nodes, schema migration by daemons starting at once, nodes killed and
restarted under load, quorum lost and regained, and a rotation that loses
a node midway. Every number a test measures is printed (``-s`` shows it)."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import API, Daemon, open_api, remember

from kmsd.mysql_schema import MIGRATIONS

pytestmark = pytest.mark.galera

# Fast settling, as in test_rotation: a job ends 2 * refresh + 1 s after it started.
FAST = {"KMSD_KEY_REFRESH_INTERVAL": "0.3", "KMSD_ROTATION_LEASE_TTL": "2"}


def root_key(workdir: Path) -> Path:
    key = workdir / f"root-{os.urandom(3).hex()}.key"
    key.write_text(os.urandom(32).hex() + "\n")
    key.chmod(0o600)
    return key


class Trio:
    """Three daemons, daemon i on node i first; their APIs over the Unix socket."""

    def __init__(self, daemons: list[Daemon], db: str) -> None:
        self.daemons = daemons
        self.db = db
        self.sessions: list[aiohttp.ClientSession] = []
        self.apis: list[API] = []

    async def __aenter__(self) -> Trio:
        for d in self.daemons:
            session, api = open_api(d, "unix")
            self.sessions.append(session)
            self.apis.append(api)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for s in self.sessions:
            await s.close()


def start_trio(galera: Any, daemon_factory: Any, workdir: Path, *, env: dict[str, str] | None = None) -> Trio:
    galera.ensure_healthy()
    db = f"kms_g{os.urandom(3).hex()}"
    galera.new_database(db)
    key = root_key(workdir)
    extra = {**FAST, "KMSD_ROOT_KEY_FILE": str(key), **(env or {})}
    daemons = [
        daemon_factory(database=galera.node_url(i, db), dev=False, extra_env=extra, start=False) for i in range(3)
    ]
    # The first migrates the empty database; the others find it done.
    for d in daemons:
        d.start(timeout=60)
    return Trio(daemons, db)


@pytest.fixture
def healthy(galera: Any) -> Iterator[Any]:
    """The cluster, whole again after the test whatever it did to it."""
    galera.ensure_healthy()
    yield galera
    galera.ensure_healthy()


def rows(galera: Any, db: str, sql: str, node: int = 0) -> list[tuple[Any, ...]]:
    return galera.admin(node, sql, db=db)


# -- read-your-writes and races ------------------------------------------------------------


async def test_a_record_stored_through_one_node_reads_back_through_the_others_at_once(
    healthy: Any, daemon_factory: Any, workdir: Path
) -> None:
    async with start_trio(healthy, daemon_factory, workdir) as trio:
        for i, d in enumerate(trio.daemons):
            ready = d.get("/readyz")[1]
            assert ready["database"] == f"127.0.0.1:{healthy.nodes[i].port}", ready
        stale: list[str] = []
        gate = asyncio.Semaphore(12)

        async def round_trip(n: int) -> None:
            writer = n % 3
            user_id, data = f"ryw-{n:04d}", f"value-{n}-{os.urandom(4).hex()}"
            async with gate:
                status, body = await trio.apis[writer].call("POST", "/api/keys", {"user_id": user_id, "data": data})
                assert status == 200, body
                token = body["access_token"]
                if n % 100 == 0:
                    remember(data, token)
                for reader in ((writer + 1) % 3, (writer + 2) % 3):
                    status, got = await trio.apis[reader].call("GET", "/api/keys", token=token)
                    if (status, got) != (200, {"data": data}):
                        stale.append(f"{user_id} via daemon {reader}: {status} {got}")

        started = time.monotonic()
        await asyncio.gather(*(round_trip(n) for n in range(1000)))
        took = time.monotonic() - started
        print(f"\n1000 cross-node round trips in {took:.1f}s, stale reads: {len(stale)}")
        assert not stale, f"{len(stale)} stale reads, e.g. {stale[:3]}"
        assert rows(healthy, trio.db, "SELECT COUNT(*) FROM kms_keys", node=2) == [(1000,)]


async def test_races_between_nodes(healthy: Any, daemon_factory: Any, workdir: Path) -> None:
    """The same new user id through two nodes at once: one 200, one 409,
    one row. One record replaced through two nodes at once: both answers
    are 200 and the record is one of the two values, whole. Two rotations
    at once: one runs, one is 409."""
    async with start_trio(healthy, daemon_factory, workdir) as trio:
        a, b, c = trio.apis
        outcomes: Counter[tuple[int, ...]] = Counter()
        for n in range(60):
            user_id = f"race-{n}"
            (s1, b1), (s2, b2) = await asyncio.gather(
                a.call("POST", "/api/keys", {"user_id": user_id, "data": f"from-a-{n}"}),
                b.call("POST", "/api/keys", {"user_id": user_id, "data": f"from-b-{n}"}),
            )
            outcomes[tuple(sorted((s1, s2)))] += 1
            winner = b1 if s1 == 200 else b2
            if (s1, s2) != (409, 409):
                status, got = await c.call("GET", "/api/keys", token=winner["access_token"])
                assert status == 200 and got["data"] in (f"from-a-{n}", f"from-b-{n}")
        assert outcomes == {(200, 409): 60}, outcomes
        dupes = rows(healthy, trio.db, "SELECT user_id FROM kms_keys WHERE user_id LIKE 'race-%%' GROUP BY user_id"
                     " HAVING COUNT(*) > 1")
        assert dupes == [] and rows(healthy, trio.db, "SELECT COUNT(*) FROM kms_keys WHERE user_id LIKE 'race-%%'") == [
            (60,)
        ]

        status, body = await a.call("POST", "/api/keys", {"user_id": "shared", "data": "v0"})
        assert status == 200
        token = body["access_token"]
        for n in range(30):
            values = (f"a-{n}-{os.urandom(3).hex()}", f"b-{n}-{os.urandom(3).hex()}")
            answers = await asyncio.gather(
                a.call("POST", "/api/keys", {"user_id": "shared", "data": values[0]}, token=token),
                b.call("POST", "/api/keys", {"user_id": "shared", "data": values[1]}, token=token),
            )
            assert [s for s, _ in answers] == [200, 200], answers
            token = answers[0][1]["access_token"]
            status, got = await c.call("GET", "/api/keys", token=token)
            assert status == 200 and got["data"] in values, (status, got)

        (s1, r1), (s2, r2) = await asyncio.gather(a.call("POST", "/api/rotate-mk"), b.call("POST", "/api/rotate-mk"))
        assert sorted((s1, s2)) == [200, 409], (r1, r2)
        assert rows(healthy, trio.db, "SELECT COUNT(*) FROM master_keys WHERE status = 'active'", node=2) == [(1,)]
        assert rows(healthy, trio.db, "SELECT COUNT(*) FROM kmsd_rotation_jobs") == [(1,)]


async def test_daemons_starting_at_once_on_an_empty_database_migrate_it_once(
    healthy: Any, daemon_factory: Any, workdir: Path
) -> None:
    for _ in range(2):
        db = f"kms_m{os.urandom(3).hex()}"
        healthy.new_database(db)
        extra = {**FAST, "KMSD_ROOT_KEY_FILE": str(root_key(workdir))}
        daemons = [
            daemon_factory(database=healthy.node_url(i, db), dev=False, extra_env=extra, start=False) for i in range(3)
        ]
        for d in daemons:
            d.start(expect_ready=False)
        for d in daemons:
            d.wait_ready(60)
        versions = rows(healthy, db, "SELECT version, COUNT(*) FROM kmsd_schema_migrations GROUP BY version", node=1)
        assert versions == [(v, 1) for v in range(1, len(MIGRATIONS) + 1)], versions
        assert rows(healthy, db, "SELECT COUNT(*) FROM master_keys", node=2) == [(1,)]
        assert rows(healthy, db, "SELECT COUNT(*) FROM kmsd_signing_keys WHERE status = 'active'") == [(1,)]
        # Nobody holds the migration lease once they are up.
        assert rows(healthy, db, "SELECT holder FROM kmsd_leases WHERE name = 'schema-migrations'") == [("",)]
        for d in daemons:
            d.stop()


def test_startup_checks_say_what_the_cluster_lacks(healthy: Any, daemon_factory: Any, workdir: Path) -> None:
    """A table Galera cannot replicate well, a URL naming one node, and
    read-your-writes turned off: one clear line each, and the daemon serves."""
    db = f"kms_c{os.urandom(3).hex()}"
    healthy.new_database(db)
    healthy.admin(0, "CREATE TABLE app_notes (note TEXT) ENGINE=MyISAM", db=db)
    url = healthy.node_url(0, db, order=[0]) + "?wsrep_sync_wait=0"
    d = daemon_factory(database=url, extra_env={"KMSD_ROOT_KEY_FILE": str(root_key(workdir))}, dev=False)
    warnings = [line for line in d.logs().splitlines() if '"database_warning"' in line]
    text = "\n".join(warnings)
    assert "table app_notes uses MyISAM" in text and "table app_notes has no primary key" in text, text
    assert "names one node" in text and "wsrep_sync_wait=0" in text, text
    # kmsd's own tables pass: every one InnoDB with a primary key.
    assert not any(t in text for t in ("kms_keys", "master_keys", "kmsd_")), text
    assert d.get("/readyz")[0] == 200


# -- nodes failing under load ----------------------------------------------------------------


class Load:
    """Twelve clients, four per daemon, each storing new records and
    reading them back until told to stop. Every answer is kept."""

    def __init__(self, trio: Trio) -> None:
        self.trio = trio
        self.acked: dict[str, tuple[str, str]] = {}  # user id -> (token, data)
        self.refused: set[str] = set()  # a plain 503: not written
        self.unknown: set[str] = set()  # a 503 with "outcome": "unknown"
        self.failures: Counter[tuple[int, int, str]] = Counter()  # (daemon, status, body)
        self.bad: list[str] = []
        # Per daemon: (sent, answered) of each 200.
        self.ok_at: list[list[tuple[float, float]]] = [[], [], []]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(i % 3, i)) for i in range(12)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def _failed(self, daemon: int, status: int, body: Any) -> None:
        if status not in (503,) or not isinstance(body, dict) or "error" not in body:
            self.bad.append(f"daemon {daemon}: {status} {body}")
        else:
            self.failures[(daemon, status, str(body.get("error")))] += 1

    async def _client(self, daemon: int, n: int) -> None:
        api = self.trio.apis[daemon]
        i = 0
        while not self._stop.is_set():
            i += 1
            user_id, data = f"load-{n}-{i}", f"v-{n}-{i}-{os.urandom(3).hex()}"
            sent = time.monotonic()
            try:
                status, body = await api.call("POST", "/api/keys", {"user_id": user_id, "data": data})
            except (TimeoutError, aiohttp.ClientError) as exc:
                self.bad.append(f"daemon {daemon}: {type(exc).__name__}")
                continue
            if status != 200:
                unknown = isinstance(body, dict) and body.get("outcome") == "unknown"
                (self.unknown if unknown else self.refused).add(user_id)
                self._failed(daemon, status, body)
                await asyncio.sleep(0.05)
                continue
            self.acked[user_id] = (body["access_token"], data)
            self.ok_at[daemon].append((sent, time.monotonic()))
            status, got = await api.call("GET", "/api/keys", token=body["access_token"])
            if status == 200:
                if got != {"data": data}:
                    self.bad.append(f"{user_id}: read back {got}")
            else:
                self._failed(daemon, status, got)

    def first_ok_after(self, daemon: int, t: float) -> float | None:
        """How long after ``t`` the first write sent after ``t`` got its 200."""
        later = [answered for sent, answered in self.ok_at[daemon] if sent > t]
        return min(later) - t if later else None

    async def every_daemon_writes_after(self, t: float) -> str:
        """Wait until each daemon got a 200 for a write sent after ``t``; how
        long each took."""
        await wait_until(lambda: all(self.first_ok_after(i, t) is not None for i in range(3)), 30,
                         "every daemon to write again")
        return ", ".join(f"{self.first_ok_after(i, t):.2f}s" for i in range(3))

    def oks_between(self, t0: float, t1: float) -> int:
        return sum(1 for times in self.ok_at for _, answered in times if t0 <= answered <= t1)


async def wait_until(pred: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await asyncio.to_thread(pred):
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out ({timeout}s) waiting for {what}")


async def test_nodes_killed_and_quorum_lost_under_load_lose_nothing(
    healthy: Any, daemon_factory: Any, workdir: Path
) -> None:
    async with start_trio(healthy, daemon_factory, workdir) as trio:
        load = Load(trio)
        load.start()
        report: list[str] = []
        try:
            await asyncio.sleep(2)
            # 1. kill -9 of node 1's server: daemon 1 moves to another node.
            killed_at = time.monotonic()
            await asyncio.to_thread(healthy.kill, 1)
            report.append(f"node 1 killed: daemons 0, 1 (whose node it was), 2 wrote again after "
                          f"{await load.every_daemon_writes_after(killed_at)}")
            assert trio.daemons[1].get("/readyz")[1]["database"] != f"127.0.0.1:{healthy.nodes[1].port}"
            await asyncio.sleep(2)
            # 2. It comes back (incremental transfer); daemon 1 moves back to it.
            t = time.monotonic()
            await asyncio.to_thread(healthy.start_node, 1)
            report.append(f"node 1 restarted and Synced in {time.monotonic() - t:.1f}s")
            back = await wait_until(
                lambda: trio.daemons[1].get("/readyz")[1]["database"] == f"127.0.0.1:{healthy.nodes[1].port}",
                30, "daemon 1 to move back to node 1",
            )
            report.append(f"  daemon 1 back on node 1 {back:.1f}s later")
            await asyncio.sleep(2)
            # 3. Node 2 stops, then node 1 dies: node 0 alone is no quorum.
            await asyncio.to_thread(healthy.stop_node, 2)
            await asyncio.sleep(1)
            lost_at = time.monotonic()
            await asyncio.to_thread(healthy.kill, 1)
            await wait_until(lambda: healthy.status(0, "wsrep_cluster_status") != "Primary", 30, "quorum loss")
            await asyncio.sleep(3)
            no_quorum_oks = load.oks_between(time.monotonic() - 2, time.monotonic())
            report.append(f"quorum lost: 200s in the last 2 s without quorum: {no_quorum_oks}")
            assert no_quorum_oks == 0
            # Every daemon answers fast meanwhile.
            for api in trio.apis:
                t = time.monotonic()
                status, body = await api.call("GET", "/api/keys", token=next(iter(load.acked.values()))[0])
                assert status == 503 and "error" in body and time.monotonic() - t < 4, (status, body)
            # 4. Back: node 0 bootstrapped, nodes 1 and 2 rejoin it.
            regained_at = time.monotonic()
            await asyncio.to_thread(healthy.bootstrap_survivor, 0)
            report.append(f"quorum back ({regained_at - lost_at:.1f}s after the loss): daemons wrote again after "
                          f"{await load.every_daemon_writes_after(regained_at)}")
            await asyncio.to_thread(healthy.start_node, 1)
            await asyncio.to_thread(healthy.start_node, 2)
            await asyncio.sleep(2)
        finally:
            await load.stop()
        print("\n" + "\n".join(report))
        print(f"acknowledged writes: {len(load.acked)}; failures: {dict(load.failures)}")
        assert not load.bad, load.bad[:5]
        assert len(load.acked) > 500

        # Every acknowledged write reads back exactly, through every daemon.
        for i, api in enumerate(trio.apis):
            wrong = []
            sample = list(load.acked.items()) if i == 0 else list(load.acked.items())[::7]
            for user_id, (token, data) in sample:
                status, got = await api.call("GET", "/api/keys", token=token)
                if (status, got) != (200, {"data": data}):
                    wrong.append(f"{user_id}: {status} {got}")
            assert not wrong, f"daemon {i}: {len(wrong)} acknowledged writes lost, e.g. {wrong[:3]}"
        # No id twice, on any node.
        for node in range(3):
            assert rows(healthy, trio.db, "SELECT user_id FROM kms_keys GROUP BY user_id HAVING COUNT(*) > 1",
                        node=node) == []
        # Every node holds the same rows: the acknowledged writes, and of the
        # 503s only some of those whose outcome was unknown.
        found = [
            {r[0] for r in rows(healthy, trio.db, "SELECT user_id FROM kms_keys WHERE user_id LIKE 'load-%%'", node=n)}
            for n in range(3)
        ]
        assert found[0] == found[1] == found[2]
        assert set(load.acked) <= found[0]
        assert found[0] - set(load.acked) <= load.unknown, sorted(found[0] - set(load.acked) - load.unknown)[:5]
        assert not (load.refused & found[0]), sorted(load.refused & found[0])[:5]
        print(f"503s whose outcome was unknown: {len(load.unknown)}, of which written: "
              f"{len(found[0] - set(load.acked))}; plain 503s (none written): {len(load.refused)}")
        # Each daemon recovered by itself: ready, on its own node again.
        for i, d in enumerate(trio.daemons):
            await wait_until(
                lambda d=d, i=i: d.get("/readyz")[1].get("database") == f"127.0.0.1:{healthy.nodes[i].port}",
                30, f"daemon {i} back on node {i}",
            )
        # Daemon 1 moved away from node 1 and back, twice; /metrics says so.
        status, text = await trio.apis[1].call("GET", "/metrics")
        assert status == 200
        text = text.decode() if isinstance(text, bytes) else str(text)
        assert f'kmsd_database_server{{server="127.0.0.1:{healthy.nodes[1].port}"}} 1.0' in text
        failovers = [line for line in text.splitlines() if line.startswith("kmsd_database_failovers ")]
        assert failovers and float(failovers[0].split()[1]) >= 2, failovers
        assert "database_server_changed" in trio.daemons[1].logs()


async def test_rotation_finishes_when_a_node_dies_midway(healthy: Any, daemon_factory: Any, workdir: Path) -> None:
    async with start_trio(healthy, daemon_factory, workdir) as trio:
        records: dict[str, tuple[str, str]] = {}
        gate = asyncio.Semaphore(32)

        async def store(n: int) -> None:
            user_id, data = f"rot-{n:05d}", f"value-{n}-{os.urandom(4).hex()}"
            async with gate:
                status, body = await trio.apis[n % 3].call("POST", "/api/keys", {"user_id": user_id, "data": data})
            assert status == 200, body
            records[user_id] = (body["access_token"], data)

        await asyncio.gather(*(store(n) for n in range(3000)))
        old_key = rows(healthy, trio.db, "SELECT key_id FROM master_keys WHERE status = 'active'")[0][0]
        status, started = await trio.apis[0].call("POST", "/api/rotate-mk")
        assert status == 200, started
        job_id, new_key = started["job"]["id"], started["active_key_id"]

        # Kill the node under the daemon that holds the rewrap's lease.
        def holder() -> int | None:
            lease = trio.daemons[0].get("/api/rotate-mk")[1].get("lease")
            if not lease:
                return None
            for i, d in enumerate(trio.daemons):
                if f":{d.pid}:" in lease["holder"]:
                    return i
            return None

        await wait_until(lambda: holder() is not None, 15, "the rewrap lease")
        victim = holder()
        assert victim is not None
        await asyncio.to_thread(healthy.kill, victim)
        survivor = trio.daemons[(victim + 1) % 3]

        def finished() -> bool:
            status, body = survivor.get("/api/rotate-mk")
            job = body.get("job") if status == 200 else None
            return bool(job and job["id"] == job_id and job["state"] == "finished")

        took = await wait_until(finished, 120, "the rewrap to finish on the survivors")
        print(f"\nrewrap of 3000 records finished {took:.1f}s after node {victim} was killed")
        by_key = dict(rows(healthy, trio.db, "SELECT master_key_id, COUNT(*) FROM kms_keys GROUP BY master_key_id",
                           node=(victim + 1) % 3))
        assert by_key == {new_key: 3000}, by_key
        api = trio.apis[(victim + 1) % 3]
        wrong = []
        for user_id, (token, data) in records.items():
            status, got = await api.call("GET", "/api/keys", token=token)
            if (status, got) != (200, {"data": data}):
                wrong.append(f"{user_id}: {status} {got}")
        assert not wrong, wrong[:3]
        status, body = await api.call("DELETE", f"/api/master-keys/{old_key}?now=true")
        assert status == 200, body
        await asyncio.to_thread(healthy.start_node, victim)
        assert rows(healthy, trio.db, "SELECT COUNT(*) FROM master_keys", node=victim) == [(1,)]

