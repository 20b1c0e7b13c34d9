"""The admin command line for real: ``kmsd mk ...`` through a running daemon
and, with no daemon, on the database directly with its own vault; and
``kmsd root-key rotate`` beside a running daemon. Every command runs as a
subprocess, as an operator would run it (the tests run as root, an admin
peer of the daemon's Unix socket)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import API, Daemon, open_api, remember

# A rewrap job ends no sooner than 2 * refresh + 1 s after it started.
FAST = {"KMSD_KEY_REFRESH_INTERVAL": "0.2", "KMSD_ROTATION_LEASE_TTL": "2"}

Records = dict[str, tuple[str, str]]  # user id -> (token, data)


# -- helpers ------------------------------------------------------------------------------


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI run: like make_daemon's (no KMSD_*, no
    ROOT_KEY from the caller), plus fast settling and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSD_") and k != "ROOT_KEY"}
    env.update(FAST)
    env.update(extra or {})
    return env


def kmsd(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, strict: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m kmsd ARGS``. Never a traceback; a failure is one
    ``kmsd: ...`` line (after the direct-mode notice, which is one too);
    ``strict=False`` lets log lines of its own vault come before it."""
    proc = subprocess.run(
        [sys.executable, "-m", "kmsd", *args],
        env=env if env is not None else base_env(),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout, proc.stdout
    if proc.returncode != 0 and strict:
        # A vault of its own (direct mode) may log a line of its own first.
        lines = [line for line in proc.stderr.strip().splitlines() if not _vault_log_line(line)]
        assert lines, f"exit {proc.returncode} without a message; stdout: {proc.stdout}"
        assert all(line.startswith("kmsd: ") for line in lines), proc.stderr
    return proc


def _vault_log_line(line: str) -> bool:
    try:
        entry = json.loads(line)
    except ValueError:
        return False
    return isinstance(entry, dict) and entry.get("process") == "vault"


def mk(
    d: Daemon, *args: str, root_key: Path | None = None, env: dict[str, str] | None = None, strict: bool = True
) -> subprocess.CompletedProcess[str]:
    """``kmsd mk ARGS`` against ``d``'s socket and database."""
    extra = {"KMSD_ROOT_KEY_FILE": str(root_key)} if root_key is not None else {}
    return kmsd(
        "mk", *args, "--socket", d.socket, "--database", d.database,
        env=env if env is not None else base_env(extra), strict=strict,
    )


def mk_json(d: Daemon, command: str, **kw: Any) -> Any:
    proc = mk(d, command, "--json", **kw)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def new_root_key(path: Path) -> Path:
    key = os.urandom(32).hex()
    remember(key)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path


def db_rows(url: str, request: pytest.FixtureRequest, sql: str) -> list[tuple[Any, ...]]:
    """Read-only SQL on a daemon's database, by the test itself."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url[len("sqlite:///"):])
        try:
            return [tuple(r) for r in conn.execute(sql)]
        finally:
            conn.close()
    server = request.getfixturevalue("mariadb")
    return [tuple(r) for r in server.admin(sql, db=url.rsplit("/", 1)[1])]


def data_rows(url: str, request: pytest.FixtureRequest) -> list[tuple[Any, ...]]:
    return db_rows(url, request, "SELECT user_id, encrypted_key, encrypted_dek FROM kms_keys ORDER BY user_id")


def key_rows(url: str, request: pytest.FixtureRequest) -> dict[str, str]:
    rows = db_rows(url, request, "SELECT key_id, key_material FROM master_keys")
    rows += db_rows(url, request, "SELECT kid, key_material FROM kmsd_signing_keys")
    return {str(k): str(m) for k, m in rows}


async def store_some(api: API, n: int, prefix: str) -> Records:
    out: Records = {}
    for i in range(n):
        user_id, data = f"{prefix}{i:03d}", f"{prefix}-value-{i}-{os.urandom(4).hex()}"
        out[user_id] = (await api.store(user_id, data), data)
    return out


async def check_all(api: API, records: Records) -> None:
    bad = []
    for user_id, (token, data) in records.items():
        got = await api.call("GET", "/api/keys", token=token)
        if got != (200, {"data": data}):
            bad.append(f"{user_id}: {got}")
    assert not bad, f"{len(bad)} of {len(records)} records do not read back: {bad[:3]}"


def store_in(d: Daemon, n: int, prefix: str) -> Records:
    async def run() -> Records:
        session, api = open_api(d, "unix")
        async with session:
            return await store_some(api, n, prefix)

    return asyncio.run(run())


def check_in(d: Daemon, records: Records) -> None:
    async def run() -> None:
        session, api = open_api(d, "unix")
        async with session:
            await check_all(api, records)

    asyncio.run(run())


def counts(keys: list[dict[str, Any]]) -> dict[str, int]:
    return {k["key_id"]: k["records"] for k in keys}


def start_failure(d: Daemon) -> str:
    """Start ``d`` expecting it to refuse: exit 1 and one startup_failed line."""
    d.start(expect_ready=False)
    assert d.proc is not None
    assert d.proc.wait(30) == 1, d.logs()
    failed = [
        json.loads(line) for line in d.logs().splitlines()
        if line.startswith("{") and json.loads(line).get("event") == "startup_failed"
    ]
    assert len(failed) == 1, d.logs()
    return str(failed[0]["error"])


# -- kmsd mk through the daemon -------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "mysql"], indirect=True)
def test_mk_through_the_daemon(backend: str, database_url: str, daemon_factory: Any) -> None:
    d: Daemon = daemon_factory(database=database_url, extra_env=FAST)
    records = store_in(d, 12, "mkd")

    # list: a table and JSON; active and retired.
    proc = mk(d, "list")
    assert proc.returncode == 0, proc.stderr
    assert "directly" not in proc.stderr  # the daemon answered
    header, *lines = proc.stdout.strip().splitlines()
    assert header.split()[:4] == ["KEY_ID", "STATUS", "CREATED", "(UTC)"]
    (only,) = mk_json(d, "list")
    first = only["key_id"]
    assert only["status"] == "active" and only["records"] == 12 and only["created_at"]
    (line,) = lines
    key_id, status, _date, _time, records_column, *_ = line.split()
    assert (key_id, status, records_column) == (first, "active", "12"), line
    assert mk_json(d, "active")["key_id"] == first
    assert mk_json(d, "retired") == []

    # add: a new active key, the previous one retired, no rewrap.
    proc = mk(d, "add", "--description", "second key")
    assert proc.returncode == 0, proc.stderr
    active = mk_json(d, "active")
    second = active["key_id"]
    assert second != first and active["status"] == "active" and active["description"] == "second key"
    assert proc.stdout.strip() == f"master key {second} is active; {first} retired (no rewrap)"
    (retired,) = mk_json(d, "retired")
    assert retired["key_id"] == first and retired["status"] == "retired" and retired["records"] == 12
    check_in(d, records)
    records |= store_in(d, 3, "mke")  # under the new active key
    assert counts(mk_json(d, "list")) == {first: 12, second: 3}

    # destroy: refused for the active key, and for a retired key in use, with
    # the count; an unknown key fails cleanly.
    proc = mk(d, "destroy", second, "--now")
    assert proc.returncode == 1
    assert "active key" in proc.stderr and "3 records" in proc.stderr, proc.stderr
    proc = mk(d, "destroy", first, "--now")
    assert proc.returncode == 1
    assert "still wraps 12 records" in proc.stderr, proc.stderr
    proc = mk(d, "destroy", "key-1", "--now")
    assert proc.returncode == 1 and "no such master key" in proc.stderr, proc.stderr
    assert counts(mk_json(d, "list")) == {first: 12, second: 3}

    # rotate --wait: progress on stderr, then every record under the new key.
    proc = mk(d, "rotate", "--wait")
    assert proc.returncode == 0, proc.stderr
    assert "rewrap" in proc.stderr and "rec" in proc.stderr, proc.stderr
    assert "rotation finished: " in proc.stdout and "0 unreadable" in proc.stdout, proc.stdout
    third = mk_json(d, "active")["key_id"]
    assert third not in (first, second)
    assert counts(mk_json(d, "list")) == {first: 0, second: 0, third: 15}
    status = json.loads(mk(d, "rotate", "--status").stdout)
    assert status["state"] == "finished" and status["remaining_total"] == 0, status
    check_in(d, records)

    # destroy after the rotation: the retired keys go, the data stays.
    for key_id in (first, second):
        proc = mk(d, "destroy", key_id, "--now")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"master key {key_id} destroyed"
    listing = mk_json(d, "list")
    assert counts(listing) == {third: 15} and listing[0]["status"] == "active"
    assert mk_json(d, "retired") == []
    proc = mk(d, "destroy", first, "--now")
    assert proc.returncode == 1 and "no such master key" in proc.stderr, proc.stderr
    check_in(d, records)


# -- kmsd mk without a daemon ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "mysql"], indirect=True)
def test_mk_directly_on_the_database(
    backend: str, database_url: str, daemon_factory: Any, tmp_path: Path
) -> None:
    root_key = new_root_key(tmp_path / "root-key")
    env = {**FAST, "KMSD_ROOT_KEY_FILE": str(root_key)}
    d: Daemon = daemon_factory(database=database_url, extra_env=env, dev=False)
    records = store_in(d, 10, "dir")
    first = mk_json(d, "active")["key_id"]
    assert d.stop() == 0

    # No daemon and no root key: one clear line, nothing done.
    proc = mk(d, "list")
    assert proc.returncode == 1
    assert "no daemon answers" in proc.stderr and "no root key is configured" in proc.stderr, proc.stderr
    proc = mk(d, "rotate")
    assert proc.returncode == 1 and "no root key is configured" in proc.stderr, proc.stderr

    # With the root key: on the database directly, and it says so.
    proc = mk(d, "list", root_key=root_key)
    assert proc.returncode == 0, proc.stderr
    assert f"no daemon answers on {d.socket}: acting on" in proc.stderr and "directly" in proc.stderr
    assert first in proc.stdout and "active" in proc.stdout
    assert counts(mk_json(d, "list", root_key=root_key)) == {first: 10}

    # rotate: the rewrap runs in this process and is finished when it exits.
    started = time.monotonic()
    proc = mk(d, "rotate", root_key=root_key)
    assert proc.returncode == 0, proc.stderr
    assert "rotation finished: 10 records rewrapped" in proc.stdout, proc.stdout
    assert time.monotonic() - started >= 1.4  # 2 * refresh + 1 s
    second = mk_json(d, "active", root_key=root_key)["key_id"]
    assert counts(mk_json(d, "list", root_key=root_key)) == {first: 0, second: 10}
    status = json.loads(mk(d, "rotate", "--status", root_key=root_key).stdout)
    assert status["state"] == "finished" and status["remaining_total"] == 0, status

    # schedule-deletion and cancel-deletion directly too.
    proc = mk(d, "schedule-deletion", first, "--days", "7", root_key=root_key)
    assert proc.returncode == 0 and f"master key {first} will be destroyed after" in proc.stdout, proc.stderr
    assert {k["key_id"]: k["status"] for k in mk_json(d, "list", root_key=root_key)}[first] == "pending_deletion"
    proc = mk(d, "cancel-deletion", first, root_key=root_key)
    assert proc.returncode == 0 and "no longer scheduled" in proc.stdout, proc.stderr

    # destroy directly: refused for the active key, done for the emptied one.
    proc = mk(d, "destroy", second, "--now", root_key=root_key)
    assert proc.returncode == 1 and "active key" in proc.stderr and "10 records" in proc.stderr, proc.stderr
    proc = mk(d, "destroy", first, "--now", root_key=root_key)
    assert proc.returncode == 0 and f"master key {first} destroyed" in proc.stdout, proc.stderr
    proc = mk(d, "destroy", "no-such-key", "--now", root_key=root_key)
    assert proc.returncode == 1 and "no such master key" in proc.stderr, proc.stderr

    # A root key file that cannot be read: a clear failure, no traceback.
    proc = mk(d, "list", root_key=tmp_path / "missing-root-key", strict=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("kmsd: "), proc.stderr

    # The daemon again: everything decrypts, and the CLI talks to it.
    d.start()
    check_in(d, records)
    proc = mk(d, "list", "--json")
    assert proc.returncode == 0 and "directly" not in proc.stderr
    assert counts(json.loads(proc.stdout)) == {second: 10}


# -- kmsd root-key rotate ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "mysql"], indirect=True)
def test_root_key_rotation_beside_a_running_daemon(
    backend: str, database_url: str, daemon_factory: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    key_a = new_root_key(tmp_path / "root-key-a")
    key_b = tmp_path / "root-key-b"
    with_a = {**FAST, "KMSD_ROOT_KEY_FILE": str(key_a)}
    d: Daemon = daemon_factory(database=database_url, extra_env=with_a, dev=False)
    records = store_in(d, 8, "rka")
    assert mk(d, "add").returncode == 0  # two master keys: one retired, one active
    records |= store_in(d, 4, "rkb")
    data_before, keys_before = data_rows(database_url, request), key_rows(database_url, request)

    # Refused: a passphrase as the new key; nothing changes.
    weak = tmp_path / "passphrase"
    weak.write_text("hunter2\n")
    proc = kmsd("root-key", "rotate", "--new-key-file", str(weak), "--database", database_url, env=base_env(with_a))
    assert proc.returncode == 1 and "passphrase is not accepted" in proc.stderr, proc.stderr
    assert weak.read_text() == "hunter2\n"
    # Refused: no current root key to open the rows with.
    proc = kmsd("root-key", "rotate", "--new-key-file", str(key_b), "--generate", "--database", database_url)
    assert proc.returncode == 1 and "no root key configured" in proc.stderr, proc.stderr
    assert not key_b.exists()
    assert key_rows(database_url, request) == keys_before

    # The rotation, with a generated key file.
    proc = kmsd(
        "root-key", "rotate", "--new-key-file", str(key_b), "--generate", "--database", database_url,
        env=base_env(with_a),
    )
    assert proc.returncode == 0, proc.stderr
    assert f"generated a new root key in {key_b}" in proc.stderr
    assert "root key rotated" in proc.stdout and "2 master keys and 1 signing keys" in proc.stdout, proc.stdout
    assert key_b.stat().st_mode & 0o777 == 0o600
    remember(key_b.read_text().strip())
    keys_after = key_rows(database_url, request)
    assert keys_after.keys() == keys_before.keys()
    assert all(keys_after[k] != keys_before[k] for k in keys_before), "a key row was not rewrapped"
    assert data_rows(database_url, request) == data_before  # data rows untouched

    # --generate never overwrites an existing file.
    content, mtime = key_b.read_bytes(), key_b.stat().st_mtime_ns
    proc = kmsd(
        "root-key", "rotate", "--new-key-file", str(key_b), "--generate", "--database", database_url,
        env=base_env({"KMSD_ROOT_KEY_FILE": str(key_b)}),
    )
    assert proc.returncode == 1 and "File exists" in proc.stderr, proc.stderr
    assert key_b.read_bytes() == content and key_b.stat().st_mtime_ns == mtime
    assert key_rows(database_url, request) == keys_after

    # The running daemon keeps serving reads and writes, also after it has
    # re-read the (rewrapped) key rows a few times.
    time.sleep(1.0)
    check_in(d, records)
    records |= store_in(d, 3, "rkc")
    check_in(d, records)
    assert d.proc is not None and d.proc.poll() is None
    assert d.stop() == 0

    # The old root key opens nothing any more ...
    with_old = daemon_factory(database=database_url, extra_env=with_a, dev=False, start=False)
    assert "does not unwrap under the configured root key" in start_failure(with_old)
    # ... the new one opens everything.
    with_b = daemon_factory(
        database=database_url, extra_env={**FAST, "KMSD_ROOT_KEY_FILE": str(key_b)}, dev=False
    )
    check_in(with_b, records)
    records |= store_in(with_b, 2, "rkd")
    check_in(with_b, records)


def test_root_key_rotation_waits_for_a_running_master_key_rotation(
    daemon_factory: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A running rewrap holds the rotation lease: root-key rotate refuses and
    changes nothing. Deterministic: with a 1.5 s refresh interval the job
    holds the lease for at least 2 * 1.5 + 1 s after `mk rotate` has
    returned; root-key rotate asks for it within a fraction of a second."""
    key_a = new_root_key(tmp_path / "root-key-a")
    key_b = new_root_key(tmp_path / "root-key-b")
    slow = {"KMSD_KEY_REFRESH_INTERVAL": "1.5", "KMSD_ROOT_KEY_FILE": str(key_a)}
    d: Daemon = daemon_factory(extra_env=slow, dev=False)
    records = store_in(d, 5, "lease")
    keys_before = key_rows(d.database, request)

    proc = mk(d, "rotate", env=base_env(slow))
    assert proc.returncode == 0 and "in the background" in proc.stdout, proc.stderr
    proc = kmsd("root-key", "rotate", "--new-key-file", str(key_b), "--database", d.database, env=base_env(slow))
    assert proc.returncode == 1, proc.stdout
    assert "nothing changed" in proc.stderr and "rotation is running" in proc.stderr, proc.stderr
    keys_mid = key_rows(d.database, request)
    assert {k: keys_mid[k] for k in keys_before} == keys_before  # only the new master key was added

    # Once the rewrap has finished, the same command goes through.
    deadline = time.monotonic() + 20
    while json.loads(mk(d, "rotate", "--status").stdout)["state"] != "finished":
        assert time.monotonic() < deadline, "the rewrap did not finish"
        time.sleep(0.2)
    proc = kmsd("root-key", "rotate", "--new-key-file", str(key_b), "--database", d.database, env=base_env(slow))
    assert proc.returncode == 0, proc.stderr
    check_in(d, records)


def test_master_key_added_by_a_daemon_after_a_root_key_rotation_opens_under_the_new_root_key(
    daemon_factory: Any, tmp_path: Path
) -> None:
    key_a = new_root_key(tmp_path / "root-key-a")
    key_b = tmp_path / "root-key-b"
    with_a = {**FAST, "KMSD_ROOT_KEY_FILE": str(key_a)}
    d: Daemon = daemon_factory(extra_env=with_a, dev=False)
    records = store_in(d, 3, "late")
    proc = kmsd(
        "root-key", "rotate", "--new-key-file", str(key_b), "--generate", "--database", d.database,
        env=base_env(with_a),
    )
    assert proc.returncode == 0, proc.stderr
    remember(key_b.read_text().strip())
    time.sleep(0.6)  # the daemon has re-read the rewrapped rows

    # The daemon still runs with root key A. Adding a key there must either
    # be refused, or give a key that the new root key opens.
    proc = mk(d, "add")
    d.stop()
    if proc.returncode != 0:
        assert "root key" in proc.stderr, proc.stderr
        return
    with_b = daemon_factory(
        database=d.database, extra_env={**FAST, "KMSD_ROOT_KEY_FILE": str(key_b)}, dev=False, start=False
    )
    with_b.start(expect_ready=False)
    try:
        with_b.wait_ready(20)
    except RuntimeError:
        pytest.fail(f"a daemon with the new root key does not start:\n{with_b.logs()[-500:]}")
    check_in(with_b, records)
