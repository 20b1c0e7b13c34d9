"""The vault process: isolation, privilege drop, crash and restart; and the
daemon's startup rules for the root key."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import Daemon, open_api, remember

from kmsd import envelope as env

ROOT = os.geteuid() == 0


def status_fields(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def memory_contains(pid: int, needles: list[bytes]) -> list[bytes]:
    """Which needles appear anywhere in the readable memory of ``pid``."""
    found = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if "r" not in perms or "[vvar" in line or "[vsyscall" in line:
                continue
            start, end = (int(x, 16) for x in addr.split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
            for n in needles:
                if n in chunk:
                    found.add(n)
    return sorted(found)


def test_vault_is_a_separate_locked_down_process(daemon_factory) -> None:  # noqa: ANN001
    d: Daemon = daemon_factory()
    vault = d.vault_pid()
    assert vault != d.pid
    fields = status_fields(vault)
    assert fields["NoNewPrivs"] == "1"
    # A process that is not dumpable has its /proc entries owned by root.
    assert os.stat(f"/proc/{vault}/status").st_uid == 0
    limits = Path(f"/proc/{vault}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]
    cmdline = Path(f"/proc/{vault}/cmdline").read_bytes().split(b"\0")
    assert b"kmsd.vault_process" in cmdline and b"-I" in cmdline
    if ROOT:
        uid = int(fields["Uid"].split()[0])
        # The daemon keeps root unless a 'kmsd' user exists (make install).
        assert uid != 0 and int(status_fields(d.pid)["Uid"].split()[0]) == daemon_uid()
        assert Path(f"/proc/{vault}/environ").read_bytes() == b""
        assert fields["CapEff"] == "0000000000000000"
        # Every page is locked, those mapped after the drop (the keys) too;
        # where RLIMIT_MEMLOCK cannot be raised, the vault says so and how.
        assert _store_one(d, "locked-vault", "locked-vault-value") == 200
        fields = status_fields(vault)
        locked, resident = int(fields["VmLck"].split()[0]), int(fields["VmRSS"].split()[0])
        if can_lock_the_vault():
            assert locked >= resident > 0, (locked, resident)
            assert "memory_not_locked" not in d.logs()
        else:
            assert locked > 0 and "memory_not_locked" in d.logs() and "LimitMEMLOCK" in d.logs()


def daemon_uid() -> int:
    import pwd

    try:
        return pwd.getpwnam("kmsd").pw_uid
    except KeyError:
        return 0


def can_lock_the_vault() -> bool:
    import resource

    from kmsd.privileges import VAULT_MEMLOCK

    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    cap_sys_resource = int(status_fields(os.getpid())["CapEff"], 16) & (1 << 24)
    return bool(cap_sys_resource) or hard == resource.RLIM_INFINITY or hard >= VAULT_MEMLOCK


def test_root_key_and_master_keys_never_in_daemon(daemon_factory) -> None:  # noqa: ANN001
    if not ROOT and Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip() not in ("0", "1"):
        pytest.skip("cannot read the daemon's memory here")
    root_key = "daemon-must-never-see-this-" + os.urandom(6).hex()
    remember(root_key)
    d: Daemon = daemon_factory(extra_env={"ROOT_KEY": root_key}, dev=False)
    environ = Path(f"/proc/{d.pid}/environ").read_bytes()
    assert b"ROOT_KEY=" not in environ and root_key.encode() not in environ
    # Store something so that DEKs and the signing key have been used.
    session_status = _store_one(d, "memory-scan", "memory-scan-value")
    assert session_status == 200
    rk = env.RootKey(root_key)
    db = sqlite3.connect(d.database.removeprefix("sqlite:///"))
    master = [env.unwrap_master_key(rk.kek, kid, env.b64d(mat))
              for kid, mat in db.execute("SELECT key_id, key_material FROM master_keys")]
    signing = [env.unwrap_master_key(rk.kek, "jwt:" + kid, env.b64d(mat))
               for kid, mat in db.execute("SELECT kid, key_material FROM kmsd_signing_keys")]
    assert master and signing
    needles = [root_key.encode(), rk.kek, rk.legacy_key, *master, *signing]
    assert memory_contains(d.pid, needles) == []
    assert "passphrase" in d.logs()
    # Nor in any file the daemon holds open: ROOT_KEY's sealed memfd belongs
    # to the launcher (which starts the vaults) and the vaults only.
    assert open_files_containing(d.pid, needles) == []
    launcher = d.launcher_pid()
    assert launcher is not None
    if ROOT:  # the launcher is not dumpable: only root may look into it
        assert open_files_containing(launcher, [root_key.encode()]) != []
    # A vault restart still reads it (through the launcher).
    old = d.vault_pid()
    os.kill(old, signal.SIGKILL)
    assert d.wait_vault(not_pid=old) != old
    assert _store_one(d, "after-restart", "after-restart-value") == 200


def open_files_containing(pid: int, needles: list[bytes]) -> list[str]:
    """The open files (regular files and memfds) of ``pid`` that hold any
    of ``needles``: each fd is read through /proc, as code running as that
    process could."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            if target.startswith(("socket:", "pipe:", "anon_inode:")) or target.startswith("/dev/"):
                continue
            with open(fd, "rb") as fh:
                content = fh.read(1 << 24)
        except OSError:
            continue
        if any(n in content for n in needles):
            found.append(target)
    return found


def _store_one(d: Daemon, user: str, data: str) -> int:
    async def go() -> int:
        session, api = open_api(d, "unix")
        async with session:
            status, body = await api.call("POST", "/api/keys", {"user_id": user, "data": data})
            remember(data, body.get("access_token", ""))
            return status

    remember(data)
    return asyncio.run(go())


async def test_vault_crash_gives_fast_503_and_recovers(daemon_factory) -> None:  # noqa: ANN001
    d: Daemon = daemon_factory()
    session, api = open_api(d, "unix")
    async with session:
        tokens = {}
        for i in range(20):
            tokens[f"crash-{i}"] = await api.store(f"crash-{i}", f"crash-value-{i}")
        old = d.vault_pid()

        async def one(i: int) -> tuple[int, float]:
            started = time.monotonic()
            status, _ = await api.call("GET", "/api/keys", token=tokens[f"crash-{i % 20}"])
            return status, time.monotonic() - started

        tasks = [asyncio.create_task(one(i)) for i in range(300)]
        await asyncio.sleep(0.01)
        os.kill(old, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        statuses = {s for s, _ in results}
        assert statuses <= {200, 503}, statuses
        assert max(t for _, t in results) < 1.5
        # Back by itself, with every record readable.
        new = await asyncio.to_thread(d.wait_vault, old)
        assert new != old
        for user, token in tokens.items():
            i = user.split("-")[1]
            assert await api.call("GET", "/api/keys", token=token) == (200, {"data": f"crash-value-{i}"})


async def test_readyz_reports_not_ready_while_vault_is_down(daemon_factory) -> None:  # noqa: ANN001
    d: Daemon = daemon_factory(extra_env={"KMSD_VAULT_TIMEOUT": "0.5"})
    session, api = open_api(d, "unix")
    async with session:
        token = await api.store("hang-user", "hang-value")
        vault = d.vault_pid()
        os.kill(vault, signal.SIGSTOP)  # a hung vault, not a dead one
        try:
            started = time.monotonic()
            status, body = await api.call("GET", "/api/keys", token=token)
            assert status == 503 and body["code"] == "unavailable"
            assert time.monotonic() - started < 1.5
            status, body = await api.call("GET", "/readyz")
            if status == 503:
                assert body["ready"] is False
        finally:
            try:
                os.kill(vault, signal.SIGCONT)
            except ProcessLookupError:
                pass
        await asyncio.to_thread(d.wait_vault, vault)
        assert await api.call("GET", "/api/keys", token=token) == (200, {"data": "hang-value"})


def test_restart_keeps_every_record(daemon_factory) -> None:  # noqa: ANN001
    d: Daemon = daemon_factory()

    async def write() -> dict[str, str]:
        session, api = open_api(d, "tcp")
        async with session:
            return {f"r-{i}": await api.store(f"r-{i}", f"restart-value-{i}") for i in range(50)}

    tokens = asyncio.run(write())
    d.stop(signal.SIGKILL)
    d.start()

    async def read() -> None:
        session, api = open_api(d, "unix")
        async with session:
            for user, token in tokens.items():
                i = user.split("-")[1]
                assert await api.call("GET", "/api/keys", token=token) == (200, {"data": f"restart-value-{i}"})

    asyncio.run(read())


def test_missing_root_key_is_a_clear_startup_error(daemon_factory) -> None:  # noqa: ANN001
    d: Daemon = daemon_factory(dev=False, start=False)
    d.start(expect_ready=False)
    assert d.proc is not None and d.proc.wait(15) == 2
    assert "no root key configured" in d.logs()


def test_wrong_root_key_is_a_clear_startup_error(daemon_factory, tmp_path: Path) -> None:  # noqa: ANN001
    key_file = tmp_path / "root-key"
    key_file.write_text(os.urandom(32).hex())
    d: Daemon = daemon_factory(extra_env={"KMSD_ROOT_KEY_FILE": str(key_file)}, dev=False)
    d.stop()
    key_file.write_text(os.urandom(32).hex())
    d.start(expect_ready=False)
    assert d.proc is not None and d.proc.wait(15) == 1
    assert "does not unwrap under the configured root key" in d.logs()


def test_dev_mode_generates_a_private_root_key(daemon_factory) -> None:  # noqa: ANN001
    d: Daemon = daemon_factory()
    key_file = Path(d.database.removeprefix("sqlite:///")).parent / "root-key.dev"
    assert key_file.exists() and key_file.stat().st_mode & 0o777 == 0o600
    assert "development" in d.logs()
    remember(key_file.read_text().strip())


def test_root_key_file_hex(daemon_factory, tmp_path: Path) -> None:  # noqa: ANN001
    key = base64.b64encode(os.urandom(32)).decode()
    remember(key)
    key_file = tmp_path / "root-key"
    key_file.write_text(key + "\n")
    d: Daemon = daemon_factory(extra_env={"KMSD_ROOT_KEY_FILE": str(key_file)}, dev=False)
    assert _store_one(d, "file-key-user", "file-key-value") == 200
    assert "passphrase" not in d.logs()
