"""A 200 means durable: acknowledged writes survive a closed store, a crashed
database server and a writer killed in the middle of a burst, on both
backends."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from support.store import crash_server, mk, open_url, rec, sk

# -- durability ------------------------------------------------------------------------------


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
from kmsd.runtime import open_store
from kmsd.store import Record

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
