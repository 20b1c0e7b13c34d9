"""Started as root, both processes drop: the daemon to its user once it
serves, the vault to its own, with only a small root launcher left to
restart vaults. Checked on the real processes through /proc."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, open_api, remember
from support.ci import skip_or_fail

from kmsd.launcher import LAUNCHER_CAPABILITIES
from kmsd.privileges import CAPABILITIES


def _need_root() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root (to start the daemon as root and create users)")


@pytest.fixture
def users() -> Iterator[tuple[pwd.struct_passwd, pwd.struct_passwd]]:
    _need_root()
    tag = os.urandom(3).hex()
    names = [f"kmsdt-d{tag}", f"kmsdt-v{tag}"]
    for name in names:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        yield pwd.getpwnam(names[0]), pwd.getpwnam(names[1])
    finally:
        for name in names:
            subprocess.run(["userdel", name], check=False)


def status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def processes(d: Daemon) -> tuple[int, int]:
    """(launcher, vault) of a dropped daemon: the launcher is the daemon's
    child, the vault the launcher's."""
    (launcher,) = children(d.pid)
    assert "kmsd.launcher" in cmdline(launcher)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kids = children(launcher)
        if len(kids) == 1 and d.get("/readyz")[0] == 200:
            return launcher, kids[0]
        time.sleep(0.05)
    raise AssertionError("no vault under the launcher")


def ids(st: dict[str, str], key: str) -> set[int]:
    return {int(v) for v in st[key].split()}


def probe_as(user: pwd.struct_passwd, path: str) -> dict[str, str]:
    """What a process with exactly this user's credentials can do: open the
    file, open a TCP socket. Forked, so that no interpreter has to be
    readable by that user."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            result = []
            try:
                os.close(os.open(path, os.O_RDONLY))
                result.append("file:opened")
            except OSError as exc:
                result.append(f"file:{exc.errno}")
            os.write(w, ",".join(result).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 1024).decode()
    os.close(r)
    os.waitpid(pid, 0)
    return dict(item.split(":") for item in data.split(","))


def test_daemon_and_vault_drop_privileges(users: Any, daemon_factory: Any) -> None:
    daemon_user, vault_user = users
    d = daemon_factory(extra_env={"KMSD_DAEMON_USER": daemon_user.pw_name, "KMSD_VAULT_USER": vault_user.pw_name})
    launcher, vault = processes(d)
    assert "privileges_dropped" in d.logs()

    st = status(d.pid)
    assert ids(st, "Uid") == {daemon_user.pw_uid} and ids(st, "Gid") == {daemon_user.pw_gid}
    assert st["Groups"] == "" and st["NoNewPrivs"] == "1"
    assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0

    st = status(vault)
    assert ids(st, "Uid") == {vault_user.pw_uid} and ids(st, "Gid") == {vault_user.pw_gid}
    assert st["Groups"] == "" and st["NoNewPrivs"] == "1"
    assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
    # The vault's seccomp filter: Unix sockets only.
    assert st["Seccomp"] == "2", st.get("Seccomp")

    # Its seccomp filter and the launcher's, inherited (both must allow).
    assert int(st["Seccomp_filters"]) == 2, st.get("Seccomp_filters")

    # The launcher keeps root for starting and signalling vaults only.
    st = status(launcher)
    assert ids(st, "Uid") == {0} and st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
    kept = sum(1 << CAPABILITIES[name] for name in LAUNCHER_CAPABILITIES)
    assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == kept & int(status(os.getpid())["CapEff"], 16)
    assert int(st["CapInh"], 16) == 0 and int(st.get("CapAmb", "0"), 16) == 0
    assert int(st["CapBnd"], 16) & ~kept == 0 or not int(status(os.getpid())["CapEff"], 16) >> 8 & 1

    # Neither the vault's user nor the daemon's can read the root key; the
    # vault's user cannot open the database.
    database = d.database.removeprefix("sqlite:///")
    assert probe_as(vault_user, database)["file"] == "13"
    key_file = str(Path(database).parent / "root-key.dev")
    assert probe_as(vault_user, key_file)["file"] == "13"
    assert probe_as(daemon_user, key_file)["file"] == "13"
    assert oct(os.stat(database).st_mode & 0o777) == "0o600"


def test_the_vault_filter_refuses_network_sockets() -> None:
    """The filter itself, in a child process: AF_UNIX works, AF_INET and
    AF_INET6 fail with EACCES."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            from kmsd.privileges import harden, restrict_syscalls

            harden()
            restrict_syscalls()
            out = []
            for family in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
                try:
                    socket.socket(family).close()
                    out.append("ok")
                except OSError as exc:
                    out.append(str(exc.errno))
            os.write(w, ",".join(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    result = os.read(r, 100).decode()
    os.waitpid(pid, 0)
    assert result == "ok,13,13", result


async def test_vault_restarts_as_its_user_after_the_daemon_dropped(users: Any, daemon_factory: Any) -> None:
    daemon_user, vault_user = users
    d = daemon_factory(extra_env={"KMSD_DAEMON_USER": daemon_user.pw_name, "KMSD_VAULT_USER": vault_user.pw_name})
    session, api = open_api(d, "unix")
    async with session:
        token = await api.store("dropped-1", "kept across vault restarts")
        launcher, vault = processes(d)
        for _ in range(2):
            os.kill(vault, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                kids = children(launcher)
                if kids and kids[0] != vault and d.get("/readyz")[0] == 200:
                    break
                time.sleep(0.05)
            (new_vault,) = children(launcher)
            assert new_vault != vault
            st = status(new_vault)
            assert ids(st, "Uid") == {vault_user.pw_uid} and st["Seccomp"] == "2"
            vault = new_vault
            assert await api.call("GET", "/api/keys", token=token) == (200, {"data": "kept across vault restarts"})
    # SIGTERM: daemon, launcher and vault all gone, cleanly and quickly.
    t = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t < 5
    for pid in (launcher, vault):
        assert not Path(f"/proc/{pid}").exists() or "zombie" in status(pid).get("State", "")


async def test_audit_trail_continues_after_logrotate_once_dropped(users: Any, daemon_factory: Any, workdir: Path) -> None:
    """The daemon, no longer root, still writes and reopens its files."""
    import hashlib
    import json

    daemon_user, vault_user = users
    logs = workdir / f"audit-{os.urandom(3).hex()}"
    logs.mkdir()
    os.chown(logs, daemon_user.pw_uid, daemon_user.pw_gid)
    trail = logs / "audit.jsonl"
    # A secret file only root may read, as the README shows them: the
    # reload after the drop must not need it.
    secret = logs / "legacy-jwt-secret"
    secret.write_text("a secret only root may read\n")
    secret.chmod(0o600)
    d = daemon_factory(
        extra_env={
            "KMSD_DAEMON_USER": daemon_user.pw_name,
            "KMSD_VAULT_USER": vault_user.pw_name,
            "KMSD_AUDIT_LOG": str(trail),
            "KMSD_LEGACY_JWT_SECRET_FILE": str(secret),
        }
    )
    session, api = open_api(d, "unix")
    async with session:
        await api.store("rotated-1", "before logrotate")
        trail.rename(logs / "audit.jsonl.1")
        os.kill(d.pid, signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "config_reloaded" not in d.logs() and time.monotonic() < deadline:
            time.sleep(0.05)
        await api.store("rotated-2", "after logrotate")
    assert "config_reload_failed" not in d.logs()
    old = (logs / "audit.jsonl.1").read_bytes().splitlines()
    new = trail.read_bytes().splitlines()
    assert json.loads(new[0])["prev"] == hashlib.sha256(old[-1]).hexdigest()
    assert json.loads(new[0])["subject"] == "rotated-2"
    assert os.stat(trail).st_uid == daemon_user.pw_uid


def test_a_database_account_of_the_os_user_fails_at_startup_not_later(
    users: Any, daemon_factory: Any, mariadb: Any
) -> None:
    """MariaDB's unix_socket authentication takes the OS user as the account:
    root at startup, the daemon's user for every pool connection after the
    drop. That used to be 503s for most requests; now it is one clear line
    and exit status 1."""
    daemon_user, vault_user = users
    url = mariadb.new_database()
    name = url.rsplit("/", 1)[1]
    # root@localhost by unix_socket only, as Debian sets it up: the OS user
    # root may connect as it, with no password, and nobody else.
    mariadb.admin("ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket")
    d = daemon_factory(
        start=False,
        database=f"mysql://root@localhost/{name}?unix_socket={mariadb.socket}",
        extra_env={"KMSD_DAEMON_USER": daemon_user.pw_name, "KMSD_VAULT_USER": vault_user.pw_name},
    )
    d.start(expect_ready=False)
    try:
        assert d.proc is not None and d.proc.wait(30) == 1
    except subprocess.TimeoutExpired:
        raise AssertionError(d.logs()) from None
    failed = [json.loads(line) for line in d.logs().splitlines()
              if line.startswith("{") and '"startup_failed"' in line]
    assert len(failed) == 1 and "unix_socket" in failed[0]["error"] and daemon_user.pw_name in failed[0]["error"]
    assert "privileges_dropped" in d.logs()


def test_a_dead_launcher_is_said_loudly_and_in_readyz(users: Any, daemon_factory: Any) -> None:
    """The launcher is the only process that can still start a vault once
    the daemon dropped root: without it, the next vault death is final."""
    daemon_user, vault_user = users
    d = daemon_factory(extra_env={"KMSD_DAEMON_USER": daemon_user.pw_name, "KMSD_VAULT_USER": vault_user.pw_name})
    launcher, vault = processes(d)
    assert d.get("/readyz") == (200, {"ready": True, "checks": {
        "vault": True, "store": True, "active_master_key": True, "launcher": True}, "database": "sqlite"})
    os.kill(launcher, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while d.get("/readyz")[0] != 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    status, body = d.get("/readyz")
    assert status == 503 and body["checks"]["launcher"] is False and body["checks"]["vault"] is True
    exited = [json.loads(line) for line in d.logs().splitlines() if '"launcher_exited"' in line]
    assert len(exited) == 1 and exited[0]["level"] == "error" and "restarted" in exited[0]["error"]
    # The vault it had started still serves.
    assert d.get("/healthz")[0] == 200


async def test_a_body_in_utf16_is_read_after_the_privilege_drop(users: Any, daemon_factory: Any) -> None:
    """Found by the fuzzing with the kmsd users present: json.loads of a
    body in UTF-16 looks its codec up on first use, from an interpreter
    directory the daemon's user may not read (one under /root): a 500.
    The daemon loads those codecs before it drops."""
    daemon_user, vault_user = users
    d = daemon_factory(extra_env={"KMSD_DAEMON_USER": daemon_user.pw_name, "KMSD_VAULT_USER": vault_user.pw_name})
    session, api = open_api(d, "tcp")
    async with session:
        body = json.dumps({"user_id": "utf16-" + os.urandom(3).hex(), "data": "sent as utf-16"}).encode("utf-16-be")
        status, answer = await api.call("POST", "/api/keys", raw=body)
        assert status == 200, answer
        remember(answer["access_token"])
        for raw in (b"\x00\xef\x1c\\i\x1d\xaf\x99\xdd\x8fk\x1e:E", b"\x00\x00\x00{\x00\x00\x00\xff"):
            status, answer = await api.call("POST", "/api/keys", raw=raw)
            assert (status, answer["code"]) == (400, "bad_request"), raw
        # A Host (or Origin) that is not ASCII goes through the idna codec.
        for header in ("Host", "Origin"):
            value = "\u00e9xample.localhost" if header == "Host" else "http://\u00e9xample.localhost"
            status, answer = await api.call("GET", "/healthz", headers={header: value})
            assert status in (400, 403), (header, status, answer)
    assert "unhandled_error" not in d.logs()
