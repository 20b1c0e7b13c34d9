"""AsyncKMSClient against the real daemon, over the Unix socket and TCP:
every route the sync client has, typed errors, keep-alive, concurrency, a
restart between calls, timeouts, and nothing secret in reprs or errors.
Then the HTTP/1.1 framing it writes and reads itself, against a fake
server for what the daemon never does (chunked bodies, silent hang-ups)."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, remember

import kmsd_client
from kmsd_client import (
    AsyncKMSClient,
    BadRequest,
    Conflict,
    DecryptionFailed,
    Forbidden,
    KeyPendingDeletion,
    KMSClient,
    KMSError,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
)
from kmsd_client._http11 import Framing, ProtocolError, parse_chunk_size, parse_head

SECRET_TOKEN = "c2VjcmV0.dG9rZW4.c2ln"  # shaped like a JWT; must never leak


def uid() -> str:
    return "ac-" + uuid.uuid4().hex[:10]


@pytest.fixture(params=["unix", "tcp"])
async def aclient(request: pytest.FixtureRequest, shared_daemon: Daemon) -> AsyncIterator[AsyncKMSClient]:
    if request.param == "unix":
        client = AsyncKMSClient(shared_daemon.socket)
    else:
        client = AsyncKMSClient(url=shared_daemon.url)
    async with client:
        yield client


def listener(client: AsyncKMSClient) -> str:
    return "unix" if client._target.socket_path is not None else "tcp"


# -- the API against the daemon ------------------------------------------------------


async def test_every_route_round_trips(aclient: AsyncKMSClient) -> None:
    user = uid()
    token = await aclient.store(user, "async-plaintext")
    remember(token, "async-plaintext")
    assert await aclient.fetch(token) == "async-plaintext"
    assert (await aclient.verify(token))["sub"] == user
    new_token = await aclient.store(user, "async-replaced", token=token)
    remember(new_token, "async-replaced")
    assert await aclient.fetch(new_token) == "async-replaced"

    dek = os.urandom(32)
    remember(dek)
    encrypted_key, encrypted_dek = await aclient.encrypt(b"payload", dek, token=token)
    assert isinstance(encrypted_key, str)
    assert await aclient.decrypt_dek(encrypted_dek, token=token) == dek
    _, unbound = await aclient.encrypt(b"payload", dek)
    bound = await aclient.rewrap(unbound, user_id=user, token=token)
    assert await aclient.decrypt_dek(bound, token=token) == dek

    new_dek, wrapped = await aclient.datakey(token=token)
    assert new_dek is not None and len(new_dek) == 32
    remember(new_dek, wrapped)
    assert await aclient.decrypt_dek(wrapped, token=token) == new_dek
    other_user = user + "-b"
    other = await aclient.store(other_user, "b")
    remember(other)
    none, for_other = await aclient.datakey(user_id=other_user, plaintext=False)
    assert none is None
    remember(await aclient.decrypt_dek(for_other, token=other))

    assert await aclient.health() == {"status": "ok"}
    assert await aclient.ready() is True
    assert (await aclient.jwks())["keys"]

    await aclient.delete(token)
    with pytest.raises(Unauthorized):  # the record's tokens die with it
        await aclient.fetch(token)

    # A renewal over either listener (a token holder renews its own), then
    # revocations: of every token of a subject, of one token.
    renewed = await aclient.issue(other_user, token=other)
    remember(renewed)
    assert (await aclient.verify(renewed))["sub"] == other_user
    await aclient.revoke_subject(other_user, token=renewed)
    for gone in (other, renewed):
        with pytest.raises(Unauthorized):
            await aclient.fetch(gone)
    third = await aclient.store(uid(), "third")
    remember(third)
    await aclient.revoke(third)
    with pytest.raises(Unauthorized):
        await aclient.fetch(third)


async def test_admin_routes_on_the_socket_only(shared_daemon: Daemon) -> None:
    async with AsyncKMSClient(shared_daemon.socket) as unix:
        status = await unix.rotation_status()
        assert status["active_key_id"]
        keys = (await unix.list_master_keys())["master_keys"]
        assert status["active_key_id"] in {k["key_id"] for k in keys}
        issued = await unix.issue("ac-issued")
        remember(issued)
        assert (await unix.verify(issued))["id"] == "ac-issued"
    async with AsyncKMSClient(url=shared_daemon.url) as tcp:
        with pytest.raises(Forbidden):
            await tcp.rotation_status()
        with pytest.raises(Forbidden):
            await tcp.list_master_keys()


async def test_typed_errors(aclient: AsyncKMSClient) -> None:
    token = await aclient.store(uid(), "typed")
    other = await aclient.store(uid(), "typed2")
    remember(token, other)
    with pytest.raises(Unauthorized):  # 401
        await aclient.fetch("not.a.token")
    with pytest.raises(Conflict):  # 409
        await aclient.store((await aclient.verify(token))["sub"], "again")
    _, edek = await aclient.encrypt(b"x", os.urandom(32), token=token)
    with pytest.raises(DecryptionFailed):  # 422
        await aclient.decrypt_dek(edek, token=other)
    with pytest.raises(BadRequest):  # 400: a DEK is 32 bytes
        await aclient.encrypt(b"x", b"short", token=token)
    if listener(aclient) == "unix":
        with pytest.raises(NotFound):  # 404
            await aclient.destroy_master_key("no-such-key/../x", now=True)
    else:
        with pytest.raises(Forbidden):  # 403
            await aclient.rotate()
    # The connection survives error answers.
    assert aclient._pool.opened == 1


async def test_keep_alive_reuses_one_connection(aclient: AsyncKMSClient, shared_daemon: Daemon) -> None:
    for _ in range(30):
        assert await aclient.health() == {"status": "ok"}
    token = await aclient.store(uid(), "kept")
    remember(token)
    for _ in range(10):
        assert await aclient.fetch(token) == "kept"
    assert aclient._pool.opened == 1
    assert aclient._pool.open == 1
    # And the daemon sees it so: our one connection, among its open ones.
    status, text = await asyncio.to_thread(_metrics, shared_daemon)
    assert status == 200
    (gauge,) = [line for line in text.splitlines() if line.startswith("kmsd_open_connections ")]
    assert float(gauge.split()[1]) >= 1


def _metrics(daemon: Daemon) -> tuple[int, str]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


async def test_concurrent_calls_share_a_bounded_pool(aclient: AsyncKMSClient) -> None:
    users = [uid() for _ in range(50)]
    tokens = await asyncio.gather(*(aclient.store(u, f"value-{u}") for u in users))
    remember(*tokens)
    values = await asyncio.gather(*(aclient.fetch(t) for t in tokens))
    assert values == [f"value-{u}" for u in users]
    subjects = await asyncio.gather(*(aclient.verify(t) for t in tokens))
    assert [s["sub"] for s in subjects] == users
    assert 1 < aclient._pool.opened <= aclient._pool.size == 10
    assert aclient._pool.open <= 10


async def test_a_small_pool_queues_calls(shared_daemon: Daemon) -> None:
    async with AsyncKMSClient(shared_daemon.socket, max_connections=2) as client:
        results = await asyncio.gather(*(client.health() for _ in range(40)))
        assert results == [{"status": "ok"}] * 40
        assert client._pool.opened <= 2


async def test_a_restart_between_calls_reconnects_before_sending(daemon_factory: Any) -> None:
    d: Daemon = daemon_factory()
    for client in (AsyncKMSClient(d.socket), AsyncKMSClient(url=d.url)):
        async with client:
            token = await client.store(uid(), "before")
            remember(token)
            assert client._pool.open == 1
            await asyncio.to_thread(d.stop)
            await asyncio.to_thread(d.start)
            # The idle connection is dead; a POST is sent on a new one.
            token2 = await client.store(uid(), "after")
            remember(token2)
            assert await client.fetch(token2) == "after"
            assert client._pool.opened == 2


async def test_timeout_is_unavailable_and_drops_the_connection(daemon_factory: Any) -> None:
    d: Daemon = daemon_factory()
    for client in (AsyncKMSClient(d.socket, timeout=0.5), AsyncKMSClient(url=d.url, timeout=0.5)):
        async with client:
            assert await client.health() == {"status": "ok"}
            os.kill(d.pid, signal.SIGSTOP)
            try:
                with pytest.raises(Unavailable, match="timed out") as info:
                    await client.health()
                assert isinstance(info.value.__cause__, TimeoutError)
                assert client._pool.open == 0
            finally:
                os.kill(d.pid, signal.SIGCONT)
            # The late answer is never read as the next call's.
            assert await client.ready() is True
            assert client._pool.opened == 2


async def test_unreachable_daemon_is_unavailable(tmp_path: Path) -> None:
    async with AsyncKMSClient(str(tmp_path / "absent.sock"), token=SECRET_TOKEN) as client:
        with pytest.raises(Unavailable) as info:
            await client.fetch()
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert "absent.sock" in str(info.value) and SECRET_TOKEN not in str(info.value)
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with AsyncKMSClient(url=f"http://127.0.0.1:{port}") as client:
        with pytest.raises(Unavailable, match="refused") as info:
            await client.health()
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


async def test_no_token_in_repr_or_errors(shared_daemon: Daemon) -> None:
    client = AsyncKMSClient(shared_daemon.socket, token=SECRET_TOKEN)
    assert SECRET_TOKEN not in repr(client) and "redacted" in repr(client)
    assert repr(AsyncKMSClient(url="http://127.0.0.1:8000")) == "AsyncKMSClient(url='http://127.0.0.1:8000')"
    async with client:
        with pytest.raises(Unauthorized) as info:
            await client.fetch()  # a well-formed token the daemon does not know
        assert SECRET_TOKEN not in str(info.value) and SECRET_TOKEN not in repr(info.value)
        bad = "abc\r\nX-Injected: 1"
        with pytest.raises(Unauthorized) as info:
            await client.fetch(bad)  # refused before sending, without echo
        assert "abc" not in str(info.value) and "abc" not in repr(info.value)


def test_one_client_across_event_loops(shared_daemon: Daemon) -> None:
    # A script may keep one client and call asyncio.run() more than once.
    client = AsyncKMSClient(shared_daemon.socket)
    for _ in range(2):
        assert asyncio.run(client.health()) == {"status": "ok"}
    assert client._pool.opened == 2 and client._pool.open == 1


def test_both_clients_have_the_same_api() -> None:
    public = {n for n in dir(KMSClient) if not n.startswith("_")} - {"close"}
    assert public == {n for n in dir(AsyncKMSClient) if not n.startswith("_")} - {"aclose"}
    for name in public:
        sync, aio = getattr(KMSClient, name), getattr(AsyncKMSClient, name)
        if callable(sync):
            assert inspect.iscoroutinefunction(aio), name
            assert inspect.signature(sync) == inspect.signature(aio), name
    assert kmsd_client.AsyncKMSClient is AsyncKMSClient


# -- encryption context, batches, scheduled key deletion (issue 17) ---------------------


async def test_a_context_binds_the_wrapped_dek(aclient: AsyncKMSClient) -> None:
    user = uid()
    token = await aclient.store(user, "ctx")
    remember(token)
    ctx = {"table": "invoices", "id": "42", "région": "Île-de-France"}
    same = dict(reversed(list(ctx.items())))  # the order of pairs is irrelevant
    dek, wrapped = await aclient.datakey(token=token, context=ctx)
    assert dek is not None
    remember(dek, wrapped)
    assert await aclient.decrypt_dek(wrapped, token=token, context=same) == dek
    for wrong in (None, {}, {**ctx, "id": "43"}, {"table": "invoices", "id": "42"}):
        with pytest.raises(DecryptionFailed):
            await aclient.decrypt_dek(wrapped, token=token, context=wrong)

    own = os.urandom(32)
    remember(own)
    _, encrypted_dek = await aclient.encrypt(b"doc", own, token=token, context=ctx)
    assert await aclient.decrypt_dek(encrypted_dek, token=token, context=ctx) == own
    with pytest.raises(DecryptionFailed):
        await aclient.decrypt_dek(encrypted_dek, token=token)
    # A rewrap needs the context and binds the new wrapped DEK to it too.
    with pytest.raises(DecryptionFailed):
        await aclient.rewrap(encrypted_dek, token=token)
    rewrapped = await aclient.rewrap(encrypted_dek, token=token, context=same)
    assert rewrapped != encrypted_dek
    assert await aclient.decrypt_dek(rewrapped, token=token, context=ctx) == own
    with pytest.raises(DecryptionFailed):
        await aclient.decrypt_dek(rewrapped, token=token)
    # {} is no context: a DEK wrapped without one stays valid with {}.
    _, plain = await aclient.datakey(token=token, context={})
    remember(plain)
    assert await aclient.decrypt_dek(plain, token=token) == await aclient.decrypt_dek(plain, token=token, context={})

    for bad in ({"k": 1}, {"k": None}, {f"k{i}": "v" for i in range(33)}, {"k": "v" * 257}):
        with pytest.raises(BadRequest):
            await aclient.datakey(token=token, context=bad)  # type: ignore[arg-type]


async def test_a_context_within_its_bounds_is_any_strings(aclient: AsyncKMSClient) -> None:
    """The contract: up to 32 pairs, names and values of at most 256
    characters, any strings (only a digest is bound; audit lines escape)."""
    token = await aclient.store(uid(), f"ctx-bounds-{uid()}")
    remember(token)
    for bad in ({"k" * 257: "v"}, {"k": "v" * 257}, {f"k{n}": "" for n in range(33)}):
        with pytest.raises(BadRequest):
            await aclient.datakey(token=token, context=bad, plaintext=False)
    for odd in ({"": "v"}, {"k" * 256: "v" * 256}, {"k": "a\nb"}, {"k\x00": "v"}, {"k": "\ud800"}):
        dek, wrapped = await aclient.datakey(token=token, context=odd)
        remember(dek, wrapped)
        assert await aclient.decrypt_dek(wrapped, token=token, context=odd) == dek


async def test_batches_answer_each_item_in_order(aclient: AsyncKMSClient) -> None:
    user = uid()
    token = await aclient.store(user, f"batch-{uid()}")
    other = await aclient.store(user + "-o", f"batch-o-{uid()}")
    remember(token, other)
    ctx = {"doc": "1"}
    keys = await aclient.datakey_batch([{}, {"context": ctx}, {"plaintext": False}, {"user_id": user + "-o"}],
                                       token=token)
    assert len(keys) == 4 and not any(isinstance(k, KMSError) for k in keys)
    (d0, w0), (d1, w1), (d2, w2), (d3, w3) = keys  # type: ignore[misc]
    assert d0 and d1 and d2 is None and d3
    remember(d0, d1, d3, w0, w1, w2, w3)

    deks = await aclient.decrypt_dek_batch(
        [{"encrypted_dek": w0}, {"encrypted_dek": w1}, {"encrypted_dek": w1, "context": ctx},
         {"encrypted_dek": w3}, {"encrypted_dek": "garbage"}, {"encrypted_dek": w2}],
        token=token,
    )
    assert deks[0] == d0 and deks[2] == d1
    assert type(deks[1]) is DecryptionFailed  # no context: that item only
    assert type(deks[3]) is DecryptionFailed  # another subject's
    assert isinstance(deks[4], BadRequest | DecryptionFailed)
    assert isinstance(deks[5], bytes) and len(deks[5]) == 32

    mine = [os.urandom(32) for _ in range(3)]
    remember(*mine)
    sealed = await aclient.encrypt_batch(
        [{"data": b"a", "dek": mine[0]}, {"data": b"b", "dek": mine[1], "context": ctx},
         {"data": b"c", "dek": b"short"}, {"data": b"d", "dek": mine[2], "user_id": user}],
        token=token,
    )
    assert type(sealed[2]) is BadRequest
    e0, e1, e3 = (s for i, s in enumerate(sealed) if i != 2)
    assert isinstance(e0, tuple) and isinstance(e1, tuple) and isinstance(e3, tuple)
    rewrapped = await aclient.rewrap_batch(
        [{"encrypted_dek": e0[1]}, {"encrypted_dek": e1[1], "context": ctx}, {"encrypted_dek": e1[1]}],
        token=token,
    )
    assert isinstance(rewrapped[0], str) and isinstance(rewrapped[1], str)
    assert type(rewrapped[2]) is DecryptionFailed
    assert await aclient.decrypt_dek_batch(
        [{"encrypted_dek": rewrapped[0]}, {"encrypted_dek": rewrapped[1], "context": ctx},
         {"encrypted_dek": e3[1]}], token=token) == [mine[0], mine[1], mine[2]]

    # Refused as a whole: raised, not per item.
    with pytest.raises(BadRequest):
        await aclient.decrypt_dek_batch([], token=token)
    with pytest.raises(PayloadTooLarge):
        await aclient.decrypt_dek_batch([{"encrypted_dek": w0}] * 1001, token=token)
    with pytest.raises(Unauthorized):
        await aclient.decrypt_dek_batch([{"encrypted_dek": w0}], token="not.a.token")


async def test_key_deletion_through_the_client(daemon_factory: Any) -> None:
    d: Daemon = daemon_factory()
    async with AsyncKMSClient(d.socket) as kms:
        user = uid()
        token = await kms.issue(user)
        remember(token)
        old = (await kms.rotation_status())["active_key_id"]
        dek, wrapped = await kms.datakey(token=token)
        remember(dek, wrapped)
        new = (await kms.add_master_key("next"))["active_key_id"]
        assert new != old

        with pytest.raises(Conflict):  # the active key: rotate first
            await kms.schedule_key_deletion(new)
        with pytest.raises(NotFound):
            await kms.schedule_key_deletion("no-such-key")
        with pytest.raises(BadRequest):
            await kms.schedule_key_deletion(old, days=3)
        scheduled = await kms.schedule_key_deletion(old, days=7)
        assert scheduled["key_id"] == old and scheduled["status"] == "pending_deletion"
        assert scheduled["deletion_date"]
        with pytest.raises(Conflict):  # already pending
            await kms.schedule_key_deletion(old)
        listed = {k["key_id"]: k for k in (await kms.list_master_keys())["master_keys"]}
        assert listed[old]["status"] == "pending_deletion"

        with pytest.raises(KeyPendingDeletion):
            await kms.decrypt_dek(wrapped, token=token)
        (refused,) = await kms.decrypt_dek_batch([{"encrypted_dek": wrapped}], token=token)
        assert type(refused) is KeyPendingDeletion

        assert (await kms.cancel_key_deletion(old))["status"] == "retired"
        with pytest.raises(Conflict):  # not pending any more
            await kms.cancel_key_deletion(old)
        assert await kms.decrypt_dek(wrapped, token=token) == dek

        with pytest.raises(BadRequest):  # destroying needs now=True
            await kms.destroy_master_key(old)
        await kms.destroy_master_key(old, now=True)
        assert old not in {k["key_id"] for k in (await kms.list_master_keys())["master_keys"]}
        with pytest.raises(DecryptionFailed):
            await kms.decrypt_dek(wrapped, token=token)


# -- HTTP/1.1 framing against a fake server ------------------------------------------


Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[bool]]


class Fake:
    """A server whose every answer is written by the test: ``reply`` gets the
    request head and returns whether to keep the connection."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.requests: list[tuple[int, bytes]] = []  # (connection number, head)
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                self.requests.append((number, head))
                if not await self.reply(reader, writer, head):
                    return
        finally:
            writer.close()


@pytest.fixture
async def fake_server(tmp_path: Path) -> AsyncIterator[Callable[[Reply], Awaitable[tuple[Fake, str]]]]:
    servers: list[asyncio.Server] = []

    async def start(reply: Reply) -> tuple[Fake, str]:
        fake = Fake(reply)
        path = str(tmp_path / f"fake{len(servers)}.sock")
        servers.append(await asyncio.start_unix_server(fake.handle, path))
        return fake, path

    yield start
    for server in servers:
        server.close()


def answer(body: bytes, *extra: str, status: str = "200 OK") -> bytes:
    head = [f"HTTP/1.1 {status}", "Content-Type: application/json", *extra]
    if not any(h.lower().startswith("transfer-encoding") for h in extra):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def test_chunked_and_close_delimited_answers(fake_server: Any) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> bool:
        if head.startswith(b"GET /healthz"):
            writer.write(answer(b'4\r\n{"st\r\n0c;ext=1\r\natus": "ok"}\r\n0\r\nX-Trailer: 1\r\n\r\n',
                                "Transfer-Encoding: chunked"))
            return True
        writer.write(b'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\n\r\n{"keys": []}')
        await writer.drain()
        return False

    fake, path = await fake_server(reply)
    async with AsyncKMSClient(path) as client:
        assert await client.health() == {"status": "ok"}
        assert await client.health() == {"status": "ok"}
        assert client._pool.opened == 1  # chunked: the connection is kept
        assert await client.jwks() == {"keys": []}
        assert client._pool.open == 0  # read to the end: not kept
        assert await client.health() == {"status": "ok"}
    assert [n for n, _ in fake.requests] == [1, 1, 1, 2]


async def test_the_request_it_writes(fake_server: Any) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> bool:
        writer.write(answer(b'{"key_id": "k", "status": "pending_deletion"}'))
        return True

    fake, path = await fake_server(reply)
    async with AsyncKMSClient(path, token=SECRET_TOKEN) as client:
        await client.schedule_key_deletion("a/b?c", days=7)
        await client.cancel_key_deletion("k")
        await client.destroy_master_key("k", now=True)
        await client.destroy_master_key("k")
    heads = [h.decode() for _, h in fake.requests]
    assert heads[0].startswith("POST /api/master-keys/a%2Fb%3Fc/schedule-deletion HTTP/1.1\r\n")
    assert "\r\nHost: localhost\r\n" in heads[0]
    assert f"\r\nAuthorization: Bearer {SECRET_TOKEN}\r\n" in heads[0]
    assert "\r\nContent-Type: application/json\r\n" in heads[0]
    assert heads[1].startswith("POST /api/master-keys/k/cancel-deletion HTTP/1.1\r\n")
    assert "\r\nContent-Length: 0\r\n" in heads[1]
    assert heads[2].startswith("DELETE /api/master-keys/k?now=true HTTP/1.1\r\n")
    assert heads[3].startswith("DELETE /api/master-keys/k HTTP/1.1\r\n")


def hangs_up_once(path: bytes) -> Reply:
    """Takes a request for ``path`` and hangs up without a byte, the first
    time; answers everything else."""
    state = {"hung": False}

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> bool:
        if path in head.split(b"\r\n")[0] and not state["hung"]:
            state["hung"] = True
            return False
        writer.write(answer(b'{"status": "ok", "token": "t", "data": "d"}'))
        return True

    return reply


async def test_a_get_is_resent_once_after_a_silent_hangup(fake_server: Any) -> None:
    fake, path = await fake_server(hangs_up_once(b"/api/keys"))
    async with AsyncKMSClient(path) as client:
        await client.health()
        assert await client.fetch(SECRET_TOKEN) == "d"
    assert [n for n, _ in fake.requests] == [1, 1, 2]


async def test_a_post_is_not_resent_once_it_went_out(fake_server: Any) -> None:
    fake, path = await fake_server(hangs_up_once(b"/issue"))
    async with AsyncKMSClient(path) as client:
        await client.health()
        with pytest.raises(Unavailable, match="without an answer"):
            await client.issue("alice")
        assert await client.issue("alice") == "t"  # and the client recovers
    assert [h.split(b" ")[1] for _, h in fake.requests] == [b"/healthz", b"/issue", b"/issue"]


async def test_a_request_on_a_fresh_connection_is_never_resent(fake_server: Any) -> None:
    fake, path = await fake_server(hangs_up_once(b"/healthz"))
    async with AsyncKMSClient(path) as client:
        with pytest.raises(Unavailable):
            await client.health()
    assert len(fake.requests) == 1


async def test_an_idle_close_is_seen_before_sending(fake_server: Any) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> bool:
        writer.write(answer(b'{"token": "t"}'))
        await writer.drain()
        return False  # hang up after answering, without saying so

    fake, path = await fake_server(reply)
    async with AsyncKMSClient(path) as client:
        for _ in range(3):
            assert await client.issue("alice") == "t"
    assert [n for n, _ in fake.requests] == [1, 2, 3]


async def test_malformed_answers_are_unavailable_without_echo(fake_server: Any) -> None:
    replies = iter([
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nsecret",
        b"SMTP ready secret\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"secret\"",
    ])

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> bool:
        writer.write(next(replies))
        await writer.drain()
        return False

    fake, path = await fake_server(reply)
    async with AsyncKMSClient(path) as client:
        for _ in range(3):
            with pytest.raises(Unavailable) as info:
                await client.health()
            assert "secret" not in str(info.value)
    # A 2xx whose JSON is wrong is the client's malformed answer, as in sync.
    async def bad_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> bool:
        writer.write(answer(b'{"data": 4111111111111111}'))
        return True

    _, path2 = await fake_server(bad_json)
    async with AsyncKMSClient(path2) as client:
        with pytest.raises(KMSError, match="malformed") as err:
            await client.fetch(SECRET_TOKEN)
        assert "4111" not in str(err.value)


def test_response_heads() -> None:
    head = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", "GET")
    assert (head.status, head.framing, head.length, head.keep_alive) == (200, Framing.LENGTH, 12, True)
    head = parse_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n", "GET")
    assert (head.framing, head.keep_alive) == (Framing.CHUNKED, False)
    assert parse_head(b"HTTP/1.1 204 No Content\r\n\r\n", "DELETE").framing is Framing.NONE
    assert parse_head(b"HTTP/1.0 200 OK\r\n\r\n", "GET").framing is Framing.UNTIL_CLOSE
    for bad in (b"HTTP/1.1 2000 OK\r\n\r\n", b"HTTP/1.1 20x OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n",
                b"HTTP/1.1 200 OK\r\n no-name\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999\r\n\r\n"):
        with pytest.raises(ProtocolError):
            parse_head(bad, "GET")
    assert parse_chunk_size(b"1a;x=y\r\n") == 26
    with pytest.raises(ProtocolError):
        parse_chunk_size(b"-1\r\n")


async def test_a_get_answered_in_part_is_not_resent(fake_server: Any) -> None:
    """Part of an answer came: the daemon did answer, so even a GET is not
    sent again; the call fails and the connection is dropped."""
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> bool:
        if head.startswith(b"GET /api/keys"):
            writer.write(answer(b'{"data": "d"}')[:-5])
            await writer.drain()
            return False
        writer.write(answer(b'{"status": "ok"}'))
        return True

    fake, path = await fake_server(reply)
    async with AsyncKMSClient(path) as client:
        await client.health()
        with pytest.raises(Unavailable, match="mid-answer"):
            await client.fetch(SECRET_TOKEN)
        assert await client.health() == {"status": "ok"}
    assert [h.split(b" ")[1] for _, h in fake.requests] == [b"/healthz", b"/api/keys", b"/healthz"]
