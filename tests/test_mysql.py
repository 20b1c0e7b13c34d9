"""The daemon on a real MariaDB server: startup errors, the server going
away or hanging under it, and acknowledged writes surviving restarts of the
daemon and of the database server (on both backends)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from conftest import API, Daemon, open_api, remember


def without_password(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    netloc = f"{parts.username}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc)), parts.password or ""


def startup_failure(d: Daemon) -> str:
    d.start(expect_ready=False)
    assert d.proc is not None
    assert d.proc.wait(30) == 1
    lines = [json.loads(line) for line in d.logs().splitlines() if line.startswith("{")]
    failed = [line for line in lines if line["event"] == "startup_failed"]
    assert len(failed) == 1, d.logs()
    return str(failed[0]["error"])


def test_wrong_password_is_a_clear_startup_error(mariadb: Any, daemon_factory: Any) -> None:
    url = mariadb.new_database()
    bad = url.replace(f":{urlsplit(url).password}@", ":not-the-password@")
    error = startup_failure(daemon_factory(database=bad, start=False))
    assert "Access denied for user 'kmsd'" in error
    assert "not-the-password" not in error


def test_unknown_database_is_a_clear_startup_error(mariadb: Any, daemon_factory: Any) -> None:
    url = mariadb.new_database()
    missing = url.rsplit("/", 1)[0] + "/no_such_db"
    error = startup_failure(daemon_factory(database=missing, start=False))
    # The application user may not even learn whether it exists (1044);
    # a user with wider grants is told it does not (1049).
    assert "'no_such_db'" in error
    assert "(1044)" in error or "(1049)" in error


def test_unreachable_server_is_a_clear_startup_error(daemon_factory: Any) -> None:
    from conftest import free_port

    error = startup_failure(
        daemon_factory(database=f"mysql://kmsd:x@127.0.0.1:{free_port()}/kms", start=False)
    )
    assert "cannot connect" in error and "x@" not in error


async def test_password_from_a_file_and_the_unix_socket_url(
    mariadb: Any, daemon_factory: Any, tmp_path: Path
) -> None:
    tcp, password = without_password(mariadb.new_database())
    # Each daemon generates its own development root key: one database each.
    other = urlsplit(mariadb.new_database()).path.lstrip("/")
    unix, _ = without_password(mariadb.socket_url(other))
    secret = tmp_path / "db-password"
    secret.write_text(password + "\n")
    for database in (tcp, unix):
        d = daemon_factory(database=database, extra_env={"KMSD_DATABASE_PASSWORD_FILE": str(secret)})
        session, api = open_api(d, "unix")
        async with session:
            token = await api.store(f"via-{len(database)}", "secret value")
            assert await api.call("GET", "/api/keys", token=token) == (200, {"data": "secret value"})
        d.stop()
        assert password not in d.logs()


@pytest.fixture
async def mysql_daemon(mariadb: Any, daemon_factory: Any) -> Any:
    d = daemon_factory(database=mariadb.new_database(), extra_env={"KMSD_DATABASE_TIMEOUT": "1"})
    session, api = open_api(d, "unix")
    async with session:
        yield d, api
    # Whatever a test did to the shared server, leave it running.
    mariadb.resume()
    if not mariadb.is_running():
        mariadb.start()


async def timed(api: API, method: str, path: str, **kw: Any) -> tuple[int, Any, float]:
    start = time.monotonic()
    status, body = await api.call(method, path, **kw)
    return status, body, time.monotonic() - start


async def test_server_down_is_a_fast_503_and_the_daemon_recovers(mysql_daemon: Any, mariadb: Any) -> None:
    d, api = mysql_daemon
    token = await api.store("down-1", "stored before the outage")
    mariadb.kill()
    try:
        for method, path, body in [
            ("GET", "/api/keys", None),
            # Not a word: the log names the driver's reason ("... during query").
            ("POST", "/api/keys", {"user_id": "down-2", "data": "value-while-down"}),
        ]:
            status, answer, took = await timed(api, method, path, body=body, token=token)
            assert status == 503 and answer == {"error": "storage unavailable", "code": "unavailable"}
            assert took < 1.0
        status, ready = d.get("/readyz")
        assert status == 503 and ready["checks"]["store"] is False
    finally:
        mariadb.start()
    # Pooled connections died with the server: the daemon replaces them itself.
    assert await api.call("GET", "/api/keys", token=token) == (200, {"data": "stored before the outage"})
    assert d.get("/readyz")[0] == 200
    await api.store("down-2", "after")


async def test_hung_server_is_a_503_within_the_budget(mysql_daemon: Any, mariadb: Any) -> None:
    d, api = mysql_daemon
    token = await api.store("hang-1", "value")
    mariadb.pause()
    try:
        status, body, took = await timed(api, "GET", "/api/keys", token=token)
        assert status == 503 and body["error"] == "storage unavailable"
        assert 0.9 < took < 2.5  # KMSD_DATABASE_TIMEOUT=1
    finally:
        mariadb.resume()
    assert await api.call("GET", "/api/keys", token=token) == (200, {"data": "value"})


async def test_no_half_written_record_when_the_server_dies_mid_burst(mysql_daemon: Any, mariadb: Any) -> None:
    d, api = mysql_daemon
    token = await api.store("burst", "v0")
    values = [f"v{i}" for i in range(1, 81)]
    remember(*values)

    async def replace(value: str) -> tuple[str, int]:
        status, _ = await api.call("POST", "/api/keys", {"user_id": "burst", "data": value}, token=token)
        return value, status

    async def fresh(i: int) -> tuple[str, int]:
        status, _ = await api.call("POST", "/api/keys", {"user_id": f"burst-{i}", "data": "x"})
        return f"burst-{i}", status

    tasks = [asyncio.ensure_future(replace(v)) for v in values]
    tasks += [asyncio.ensure_future(fresh(i)) for i in range(80)]
    await asyncio.sleep(0.05)
    mariadb.kill()
    results = await asyncio.gather(*tasks)
    mariadb.start()

    assert {status for _, status in results} <= {200, 503}
    # The record is one whole version, old or new: it decrypts to a value
    # that was written (a 503 write may or may not have landed).
    status, body = await api.call("GET", "/api/keys", token=token)
    assert status == 200 and body["data"] in ["v0", *values]
    # Every acknowledged new record is there.
    for user_id, status in results[len(values):]:
        if status == 200:
            issued = await api.call("POST", "/issue", {"id": user_id})
            remember(issued[1]["token"])
            assert (await api.call("GET", "/api/keys", token=issued[1]["token"]))[0] == 200, user_id


@pytest.mark.parametrize("backend", ["sqlite", "mysql"], indirect=True)
async def test_acknowledged_writes_survive_killing_daemon_and_database(
    backend: str, database_url: str, daemon_factory: Any, request: pytest.FixtureRequest
) -> None:
    d = daemon_factory(database=database_url)
    session, api = open_api(d, "unix")
    async with session:
        tokens = await asyncio.gather(*(api.store(f"durable-{i}", f"value-{i}") for i in range(60)))
    d.stop(signal.SIGKILL)
    if backend == "mysql":
        server = request.getfixturevalue("mariadb")
        server.kill()
        server.start()
    d.start()
    session, api = open_api(d, "unix")
    async with session:
        for i, token in enumerate(tokens):
            assert await api.call("GET", "/api/keys", token=token) == (200, {"data": f"value-{i}"})

