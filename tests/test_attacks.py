"""The attack suite (issue 6): what a hostile or broken client can do to the
real daemon, with its real vault, over its real sockets. Each attack must end
in a JSON 4xx or 503, or a closed connection: never a 500, a hang, a state
change, or a secret in a log line or the audit trail.

Cross-user reads, copied rows, forged tokens and bad claims are in
test_security.py; DNS rebinding, oversized bodies and bad input in
test_api.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    API,
    AUDIT_FILES,
    SECRETS,
    Daemon,
    find_leaks,
    make_daemon,
    open_api,
    remember,
    secret_files,
)
from support.ids import uid
from support.wire import connect, http, parse, read_answer, until_closed

from kmsd.connections import EVICT_AFTER

HEADER_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5
IDLE_TIMEOUT = 2.0
MAX_CONNECTIONS = 16


@pytest.fixture(scope="module")
def strict(workdir: Path) -> Iterator[Daemon]:
    """Short deadlines for slow clients, and no admin at all (not even root,
    which runs the suite in CI): every caller is a plain peer."""
    d = make_daemon(workdir / f"attack-strict-{uuid.uuid4().hex[:6]}", extra_env={
        "KMSD_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "KMSD_BODY_TIMEOUT": str(BODY_TIMEOUT),
        "KMSD_IDLE_TIMEOUT": str(IDLE_TIMEOUT),
        "KMSD_ADMIN_UIDS": "",
    })
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def capped(workdir: Path) -> Iterator[Daemon]:
    """A small connection cap; request heads get longer than the test runs."""
    d = make_daemon(workdir / f"attack-capped-{uuid.uuid4().hex[:6]}", extra_env={
        "KMSD_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "KMSD_HEADER_TIMEOUT": "5",
        "KMSD_IDLE_TIMEOUT": "30",
        # Admin peers are never refused: here no one on the socket is one.
        "KMSD_ADMIN_UIDS": "424242",
    })
    d.start()
    yield d
    d.stop()


# -- raw HTTP over the daemon's sockets (support.wire has the rest) -------------------


async def dribble(writer: asyncio.StreamWriter, data: bytes, answered: asyncio.Event, every: float) -> None:
    """Send ``data`` one byte at a time until the daemon answers or hangs up."""
    for i in range(len(data)):
        if answered.is_set():
            return
        try:
            writer.write(data[i : i + 1])
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(every)


def active_key(d: Daemon) -> str:
    db = sqlite3.connect(d.database.removeprefix("sqlite:///"))
    try:
        return str(db.execute("SELECT key_id FROM master_keys WHERE status = 'active'").fetchone()[0])
    finally:
        db.close()


def rows(d: Daemon) -> dict[str, list[tuple[Any, ...]]]:
    """What a request could change: records, master keys, signing keys,
    rotation jobs."""
    db = sqlite3.connect(d.database.removeprefix("sqlite:///"))
    try:
        tables = ("kms_keys", "master_keys", "kmsd_signing_keys", "kmsd_rotation_jobs")
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}
    finally:
        db.close()


# -- 1. slow clients -------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_slow_request_head_is_cut_off_with_408(strict: Daemon, transport: str) -> None:
    """Slowloris: a head sent a byte at a time (on a new connection or on a
    kept-alive one), or nothing at all, gets a 408 after header_timeout,
    long before idle_timeout; a head in a few quick pieces is served."""

    async def attack(after_a_request: bool, head: bytes) -> tuple[float, bytes]:
        reader, writer = await connect(strict, transport)
        try:
            if after_a_request:
                writer.write(http("GET", "/healthz"))
                assert (await read_answer(reader))[0] == 200
            started = time.monotonic()
            answered = asyncio.Event()
            sender = asyncio.create_task(dribble(writer, head, answered, every=0.05))
            answer = await until_closed(reader, IDLE_TIMEOUT + 3, answered)
            sender.cancel()
            return time.monotonic() - started, answer
        finally:
            writer.close()

    async def in_pieces() -> int:
        reader, writer = await connect(strict, transport)
        try:
            raw = http("GET", "/healthz")
            for piece in (raw[:10], raw[10:30], raw[30:]):
                writer.write(piece)
                await asyncio.sleep(0.1)
            return (await read_answer(reader))[0]
        finally:
            writer.close()

    head = http("GET", "/healthz", headers="X-Padding: " + "p" * 100 + "\r\n")
    *attacks, ok = await asyncio.gather(
        attack(False, head), attack(False, b""), attack(True, head), in_pieces()
    )
    for took, answer in attacks:
        status, body = parse(answer)
        assert (status, body) == (408, {"error": "request timed out", "code": "timeout"})
        assert HEADER_TIMEOUT - 0.05 <= took < HEADER_TIMEOUT + 1.0 < IDLE_TIMEOUT, took
    assert ok == 200


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_slow_request_body_is_408_and_closes_the_connection(strict: Daemon, transport: str) -> None:
    """A body sent a byte at a time, or a chunked body that stalls: 408 after
    body_timeout, the connection closed right after it, nothing stored."""
    user = uid("slowbody")
    data = f"slow-body-secret-{uuid.uuid4().hex}"
    remember(data)
    body = json.dumps({"user_id": user, "data": data}).encode()
    head = http("POST", "/api/keys", headers=f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")

    async def attack(first: bytes, rest: bytes) -> tuple[float, bytes]:
        reader, writer = await connect(strict, transport)
        try:
            writer.write(first)
            started = time.monotonic()
            answered = asyncio.Event()
            sender = asyncio.create_task(dribble(writer, rest, answered, every=0.05))
            # aiohttp alone would read the late body for another 10 s.
            answer = await until_closed(reader, BODY_TIMEOUT + 3, answered)
            sender.cancel()
            return time.monotonic() - started, answer
        finally:
            writer.close()

    chunked = http("POST", "/api/keys", headers="Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n")
    results = await asyncio.gather(
        attack(head + body[:1], body[1:]),
        attack(chunked + b"%x\r\n" % len(body) + body[:5], b""),
    )
    for took, answer in results:
        assert parse(answer) == (408, {"error": "request timed out", "code": "timeout"})
        assert b"Connection: close" in answer
        assert BODY_TIMEOUT - 0.05 <= took < BODY_TIMEOUT + 1.5, took
    assert not [r for r in rows(strict)["kms_keys"] if user in r]


async def test_idle_kept_alive_connection_is_closed_after_idle_timeout(strict: Daemon) -> None:
    """Between requests, idle_timeout applies (not the head deadline): the
    connection is closed quietly once it has passed. Both listeners."""

    async def idle(transport: str) -> float:
        reader, writer = await connect(strict, transport)
        try:
            writer.write(http("GET", "/healthz"))
            assert (await read_answer(reader))[0] == 200
            started = time.monotonic()
            assert await until_closed(reader, timeout=IDLE_TIMEOUT + 3) == b""
            return time.monotonic() - started
        finally:
            writer.close()

    for took in await asyncio.gather(idle("unix"), idle("tcp")):
        assert IDLE_TIMEOUT - 0.1 <= took < IDLE_TIMEOUT + 1.5, took


# -- 2. many idle connections ---------------------------------------------------------


async def test_connection_cap_holds_and_idle_connections_make_room(capped: Daemon) -> None:
    """max_connections counts both listeners. Over the cap, a newcomer is
    answered 503 while every open connection is recent; once idle ones have
    waited EVICT_AFTER, the oldest makes room and a real client is served
    at once. Busy and kept-alive connections keep working."""
    idle = [await connect(capped, "unix" if i % 2 else "tcp") for i in range(MAX_CONNECTIONS)]
    opened = time.monotonic()
    try:
        await asyncio.sleep(0.2)  # accepted
        # Over the cap, everyone recent: refused at once, with a JSON 503.
        for transport in ("unix", "tcp"):
            reader, writer = await connect(capped, transport)
            raw = await until_closed(reader, timeout=3)
            writer.close()
            assert parse(raw) == (503, {"error": "too many connections", "code": "unavailable"}), raw
            assert b"Retry-After: 1" in raw
        # An open connection is still served.
        reader, writer = idle[-1]
        writer.write(http("GET", "/healthz"))
        assert (await read_answer(reader))[0] == 200

        await asyncio.sleep(max(0.0, opened + EVICT_AFTER + 0.2 - time.monotonic()))
        session, api = open_api(capped, "unix")
        async with session:
            started = time.monotonic()
            assert await api.call("GET", "/healthz") == (200, {"status": "ok"})
            assert time.monotonic() - started < 1.0
            status, metrics = await api.call("GET", "/metrics")
        assert status == 200
        (gauge,) = [line for line in metrics.decode().splitlines() if line.startswith("kmsd_open_connections ")]
        assert float(gauge.split()[1]) <= MAX_CONNECTIONS

        # The oldest silent connections made room; the one that was just
        # served did not.
        async def is_closed(reader: asyncio.StreamReader) -> bool:
            try:
                return await asyncio.wait_for(reader.read(1), 0.2) == b""
            except TimeoutError:
                return False

        closed = await asyncio.gather(*(is_closed(reader) for reader, _ in idle[:-1]))
        # The /healthz and /metrics calls above (one connection) made room
        # for one: the oldest of their own peer's (the Unix socket's uid).
        assert closed[1] and sum(closed) <= 2, closed
        reader, writer = idle[-1]
        writer.write(http("GET", "/healthz"))
        assert (await read_answer(reader))[0] == 200
    finally:
        for _, writer in idle:
            writer.close()


# -- 3. hostile JSON --------------------------------------------------------------------

DEPTH = 100_000
# The field each route reads first; each must be refused whatever it holds.
JSON_ROUTES = {
    "/issue": "id",
    "/verify": "token",
    "/api/keys": "user_id",
    "/api/encrypt": "data",
    "/api/decrypt-dek": "encrypted_dek",
    "/api/master-keys": "description",
}


def hostile_bodies(field: str) -> dict[str, bytes]:
    f = field.encode()
    return {
        "nested lists": b"[" * DEPTH + b"]" * DEPTH,
        "nested objects": b'{"a":' * DEPTH + b"1" + b"}" * DEPTH,
        "nested in a field": b'{"%s":' % f + b"[" * DEPTH + b"]" * DEPTH + b"}",
        "objects in a field": b'{"%s":' % f + b'{"a":' * DEPTH + b"1" + b"}" * DEPTH + b"}",
        "huge integer": b'{"%s":' % f + b"9" * 200_000 + b"}",
        "huge exponent": b'{"%s":1e999999}' % f,
        "NaN": b'{"%s":NaN}' % f,
        "repeated key": b'{"%s":"first-value","%s":"second-value"}' % (f, f),
    }


async def test_hostile_json_is_400(shared_daemon: Daemon) -> None:
    """Deep nesting (a RecursionError in json.loads), numbers beyond any
    range, NaN, a repeated key and over-long strings: a JSON 400 on every
    route that reads a body, quickly, and nothing happens (the caller is an
    admin, so the master-key routes parse their body too)."""
    before = rows(shared_daemon)
    session, api = open_api(shared_daemon, "unix")
    async with session:
        for route, field in JSON_ROUTES.items():
            bodies = hostile_bodies(field)
            if route in ("/issue", "/api/keys", "/api/master-keys"):
                bodies["long string"] = b'{"%s":"%s"}' % (field.encode(), b"x" * 900_000)
            for name, raw in bodies.items():
                started = time.monotonic()
                status, body = await api.call("POST", route, raw=raw)
                assert status == 400 and body["code"] == "bad_request", (route, name, status, body)
                assert time.monotonic() - started < 2, (route, name)
            status, body = await api.call("POST", route, raw=bodies["repeated key"])
            assert body["error"] == "body must not repeat a key"
        assert (await api.call("GET", "/healthz"))[0] == 200
    assert rows(shared_daemon) == before


# -- malformed HTTP -------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_malformed_http_is_a_json_400_that_echoes_nothing(shared_daemon: Daemon, transport: str) -> None:
    """Requests aiohttp's parser refuses (a control character in a header,
    an over-long header or URL, too many headers, a bad method, ambiguous
    lengths, a bad chunk) carry a real token: the answer is a JSON 400 that
    does not quote it, and no log line carries it."""
    session, api = open_api(shared_daemon, transport)
    async with session:
        token = await api.store(uid("malformed"), f"malformed-secret-{uuid.uuid4().hex}")
    t = token.encode()
    requests = {
        "control character": b"GET /api/keys HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + t + b"\x01\r\n\r\n",
        "long header": b"GET /api/keys HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + t + b"A" * 9000
        + b"\r\n\r\n",
        "long url": b"GET /api/keys?t=" + t + b"A" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "too many headers": b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
        + b"".join(b"X-%d: %s\r\n" % (i, t) for i in range(200)) + b"\r\n",
        "bad method": b"G\x01T" + t + b" / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "length and chunked": b"POST /api/keys HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\nX-T: " + t + b"\r\n\r\n0\r\n\r\n",
        "two lengths": b"POST /api/keys HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
        + t,
        "bad chunk": b"POST /api/keys HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz" + t + b"\r\n",
    }
    for name, raw in requests.items():
        reader, writer = await connect(shared_daemon, transport)
        try:
            writer.write(raw)
            answer = await until_closed(reader, timeout=5)
        finally:
            writer.close()
        assert t not in answer and t[-40:] not in answer, name
        status, body = parse(answer)
        assert (status, body) == (400, {"error": "malformed HTTP request", "code": "bad_request"}), (name, answer)
        assert b"Content-Type: application/json" in answer, name
    await asyncio.sleep(0.1)  # the log lines are written
    assert not find_leaks([p for p in secret_files() if p.parent == shared_daemon.dir], {token, token[-40:]})
    assert shared_daemon.get("/healthz")[0] == 200


# -- 4. admin routes --------------------------------------------------------------------------


async def test_master_key_routes_refuse_non_admin_unix_peers_and_tcp(strict: Daemon) -> None:
    """Listing, adding and destroying master keys (test_security covers
    /issue and rotate-mk): 403 for a Unix peer that is not an admin and for
    every TCP caller, and the keys stay as they were."""
    before = rows(strict)
    active = active_key(strict)
    for transport in ("unix", "tcp"):
        session, api = open_api(strict, transport)
        async with session:
            token = await api.store(uid("admin"), "not-an-admin")
            for method, path, body in [
                ("GET", "/api/master-keys", None),
                ("POST", "/api/master-keys", None),
                ("POST", "/api/master-keys", {"description": "from a plain peer"}),
                ("DELETE", f"/api/master-keys/{active}", None),
                ("DELETE", "/api/master-keys/key-1", None),
            ]:
                for bearer in (None, token):  # a client's token makes no admin
                    status, answer = await api.call(method, path, body, token=bearer)
                    assert status == 403 and answer["code"] == "forbidden", (transport, method, path, answer)
                    assert "admin" in answer["error"]
    assert rows(strict)["master_keys"] == before["master_keys"]
    assert rows(strict)["kmsd_rotation_jobs"] == before["kmsd_rotation_jobs"]


# -- 5. secrets in logs and the audit trail ------------------------------------------------------


async def test_no_secret_reaches_a_log_line_or_the_audit_trail(daemon_factory: Any, workdir: Path) -> None:
    """Every key operation, failed ones too, with debug logging and an audit
    trail: no token, data or DEK sent or received shows up in either. The
    session-end check (conftest) covers this trail and every other one."""
    trail = workdir / f"attack-audit-{uuid.uuid4().hex[:6]}" / "audit.jsonl"
    d: Daemon = daemon_factory(extra_env={"KMSD_AUDIT_LOG": str(trail), "KMSD_LOG_LEVEL": "debug"})
    known = set(SECRETS)
    dek = os.urandom(32)
    for transport in ("unix", "tcp"):
        session, api = open_api(d, transport)
        async with session:
            await _every_key_operation(api, dek)
    mine = SECRETS - known
    # API.call remembered what went through it.
    assert dek.hex() in mine and len(mine) >= 12, len(mine)
    await asyncio.sleep(0.1)
    files = [p for p in secret_files(workdir) if p.parent in (d.dir, trail.parent)]
    assert trail in AUDIT_FILES and trail in files and d.log_path in files
    assert len(trail.read_text().splitlines()) >= 20
    assert find_leaks(files, mine) == []
    # The scan would see one.
    planted = trail.parent / "planted.txt"
    planted.write_text(trail.read_text() + json.dumps({"event": "oops", "detail": f"dek {dek.hex()}"}) + "\n")
    try:
        assert find_leaks([planted], mine) != []
    finally:
        planted.unlink()


async def _every_key_operation(api: API, dek: bytes) -> None:
    alice, bob = uid("alice"), uid("bob")
    a_token = await api.store(alice, f"alice-plain-{uuid.uuid4().hex}")
    b_token = await api.store(bob, f"bob-plain-{uuid.uuid4().hex}")
    assert (await api.call("GET", "/api/keys", token=a_token))[0] == 200
    assert (await api.call("HEAD", "/api/keys", token=a_token))[0] == 200
    assert (await api.call("POST", "/verify", {"token": a_token}))[0] == 200
    a_token = await api.store(alice, f"alice-replaced-{uuid.uuid4().hex}", token=a_token)
    conflict = {"user_id": alice, "data": f"hijack-{uuid.uuid4().hex}"}
    assert (await api.call("POST", "/api/keys", conflict, token=b_token))[0] == 409
    plain = f"envelope-{uuid.uuid4().hex}".encode().hex()
    status, enc = await api.call("POST", "/api/encrypt", {"data": plain, "dek": dek.hex()}, token=a_token)
    assert status == 400  # hex is not base64: refused, and its DEK still never logged
    b64 = base64.b64encode(bytes.fromhex(plain)).decode()
    remember(b64)
    status, enc = await api.call("POST", "/api/encrypt", {"data": b64, "dek": dek.hex()}, token=a_token)
    assert status == 200
    assert await api.call("POST", "/api/decrypt-dek", {"encrypted_dek": enc["encrypted_dek"]}, token=a_token) == (
        200, {"dek": dek.hex()})
    status, generated = await api.call("POST", "/api/datakey", {}, token=a_token)
    assert status == 200
    assert await api.call("POST", "/api/decrypt-dek", {"encrypted_dek": generated["encrypted_dek"]}, token=a_token) == (
        200, {"dek": generated["dek"]})
    assert (await api.call("POST", "/api/decrypt-dek", {"encrypted_dek": enc["encrypted_dek"]}, token=b_token))[0] == 422
    tampered = a_token[:-6] + ("AAAAAA" if not a_token.endswith("AAAAAA") else "BBBBBB")
    assert (await api.call("GET", "/api/keys", token=tampered))[0] == 401
    assert (await api.call("POST", "/verify", {"token": tampered}))[0] == 401
    status, issued = await api.call("POST", "/issue", {"id": alice}, token=a_token)  # a renewal
    assert status == 200
    # Another id: only an admin (on the Unix socket, where root is one by default).
    assert (await api.call("POST", "/issue", {"id": bob}, token=a_token))[0] in ((200, 403) if api.transport == "unix"
                                                                              else (403,))
    assert (await api.call("DELETE", "/api/keys", token=issued["token"]))[0] == 200
    assert (await api.call("GET", "/api/keys", token=a_token))[0] == 401  # its tokens died with it


# -- 6. GET and HEAD ----------------------------------------------------------------------------


async def test_get_and_head_never_change_state(shared_daemon: Daemon) -> None:
    """Every route by GET and HEAD, as an admin on the Unix socket and over
    TCP, with a valid token, a body that would change something, method
    override headers and a ?_method=: nothing in the database changes.
    (test_security checks the 405s of the POST-only routes.)"""
    d = shared_daemon
    unix_session, unix = open_api(d, "unix")
    tcp_session, tcp = open_api(d, "tcp")
    async with unix_session, tcp_session:
        token = await unix.store(uid("gethead"), "get-head-value")
        before = rows(d)
        active = active_key(d)
        body = {"user_id": uid("gethead"), "id": uid("gethead"), "data": "would-be-stored", "token": token,
                "description": "would be a key", "encrypted_dek": "AAAA"}
        paths = ["/issue", "/verify", "/api/keys", "/api/encrypt", "/api/decrypt-dek", "/api/rotate-mk",
                 "/api/master-keys", f"/api/master-keys/{active}", "/healthz", "/readyz", "/metrics",
                 "/.well-known/jwks.json"]
        overrides = [{"X-HTTP-Method-Override": m, "X-HTTP-Method": m, "X-Method-Override": m}
                     for m in ("POST", "DELETE", "PUT")]
        for api in (unix, tcp):
            for method in ("GET", "HEAD"):
                for path in paths:
                    for headers in overrides:
                        method_param = "DELETE" if headers["X-HTTP-Method"] == "DELETE" else "POST"
                        status, _ = await api.call(method, f"{path}?_method={method_param}", body, token=token,
                                                   headers=headers)
                        assert status < 500, (api.transport, method, path, status)
        assert rows(d) == before
        assert await tcp.call("GET", "/api/keys", token=token) == (200, {"data": "get-head-value"})
