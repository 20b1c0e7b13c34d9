"""Wire-level tests of kmsd_client against a fake server that only speaks the
protocol: canned JSON answers keyed by method and path, every request recorded.

The fake runs for real, over TCP and over a Unix socket, so these tests also
cover connecting, keep-alive reuse and reconnecting after an idle close. The
tests against the real daemon live elsewhere.
"""

from __future__ import annotations

import base64
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import kmsd_client
from kmsd.errors import InternalError, MethodNotAllowed
from kmsd_client import (
    BadRequest,
    Conflict,
    DecryptionFailed,
    Forbidden,
    KMSClient,
    KMSError,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
)

SECRET_TOKEN = "c2VjcmV0.dG9rZW4.c2ln"  # shaped like a JWT; must never leak
DEK = bytes(range(32))


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    conn_id: int

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Canned:
    status: int
    body: bytes
    close: bool = False  # answer with "Connection: close"
    delay: float = 0.0
    hangups: int = 0  # take the request, then hang up without a byte this many times


class FakeKMS:
    """Shared state of a fake server: routes, recorded requests, open connections."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Canned] = {}
        self.requests: list[Recorded] = []
        self._conns: dict[int, socket.socket] = {}
        self._next_id = 0
        self._cond = threading.Condition()

    def answer(self, method: str, path: str, status: int, doc: Any = None, **kw: Any) -> None:
        body = (
            doc if isinstance(doc, bytes) else json.dumps(doc if doc is not None else {}).encode()
        )
        self.routes[(method, path)] = Canned(status, body, **kw)

    def error(self, method: str, path: str, status: int, code: str, message: str) -> None:
        self.answer(method, path, status, {"error": message, "code": code})

    def last(self) -> Recorded:
        return self.requests[-1]

    def open_connections(self) -> int:
        with self._cond:
            return len(self._conns)

    def drop_idle(self) -> None:
        """Hang up every open connection, as a server does after its keep-alive
        timeout, and wait until the handlers are gone."""
        with self._cond:
            for sock in self._conns.values():
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            assert self._cond.wait_for(lambda: not self._conns, timeout=2)

    def wait_closed(self) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: not self._conns, timeout=2)

    # Called from handler threads.
    def register(self, sock: socket.socket) -> int:
        with self._cond:
            self._next_id += 1
            self._conns[self._next_id] = sock
            return self._next_id

    def unregister(self, conn_id: int) -> None:
        with self._cond:
            self._conns.pop(conn_id, None)
            self._cond.notify_all()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive by default
    fake: FakeKMS  # set on a per-server subclass

    def setup(self) -> None:
        super().setup()
        self.conn_id = self.fake.register(self.request)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.fake.unregister(self.conn_id)

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self.fake.requests.append(
            Recorded(
                self.command,
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                body,
                self.conn_id,
            )
        )
        canned = self.fake.routes.get(
            (self.command, self.path),
            Canned(404, b'{"error": "not found", "code": "not_found"}'),
        )
        if canned.hangups:
            canned.hangups -= 1
            self.close_connection = True
            return
        if canned.delay:
            time.sleep(canned.delay)
        self.send_response(canned.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(canned.body)))
        if canned.close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(canned.body)

    do_GET = do_POST = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output quiet (and Unix peers have no address to log)


class ThreadingUnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@dataclass
class Served:
    fake: FakeKMS
    make_client: Callable[..., KMSClient]
    expected_host: str


@pytest.fixture
def tcp_server() -> Iterator[Served]:
    fake = FakeKMS()
    # The fake writes headers and body separately; without this, Nagle plus
    # delayed ACK adds 40 ms to every answer.
    handler = type("TCPHandler", (Handler,), {"fake": fake, "disable_nagle_algorithm": True})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    host, port = "127.0.0.1", server.server_address[1]
    url = f"http://{host}:{port}"
    try:
        yield Served(fake, lambda **kw: KMSClient(url=url, **kw), f"{host}:{port}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def unix_server(tmp_path: Path) -> Iterator[Served]:
    fake = FakeKMS()
    handler = type("UnixHandler", (Handler,), {"fake": fake})
    path = str(tmp_path / "kmsd.sock")
    server = ThreadingUnixHTTPServer(path, handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    try:
        yield Served(fake, lambda **kw: KMSClient(path, **kw), "localhost")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(params=["tcp", "unix"])
def served(request: pytest.FixtureRequest) -> Served:
    return request.getfixturevalue(f"{request.param}_server")  # type: ignore[no-any-return]


# -- request encoding ---------------------------------------------------------


def test_every_call_encodes_path_headers_and_body(served: Served) -> None:
    fake = served.fake
    fake.answer("POST", "/issue", 200, {"token": "issued.tok.en"})
    fake.answer("POST", "/verify", 200, {"valid": True, "payload": {"id": "alice", "sub": "alice"}})
    fake.answer(
        "POST",
        "/api/keys",
        200,
        {"message": "Key stored successfully", "access_token": "acc.ess.tok"},
    )
    fake.answer("GET", "/api/keys", 200, {"data": "4111111111111111"})
    fake.answer("DELETE", "/api/keys", 200, {"message": "deleted"})
    fake.answer("POST", "/api/encrypt", 200, {"encrypted_key": "ek", "encrypted_dek": "ed"})
    fake.answer("POST", "/api/decrypt-dek", 200, {"dek": DEK.hex()})
    fake.answer("GET", "/api/rotate-mk", 200, {"state": "idle"})
    fake.answer("POST", "/api/rotate-mk", 200, {"state": "running"})
    fake.answer("GET", "/healthz", 200, {"status": "ok"})
    fake.answer("GET", "/readyz", 200, {"ready": True})
    fake.answer("GET", "/.well-known/jwks.json", 200, {"keys": []})

    with served.make_client() as client:
        assert client.issue("alice") == "issued.tok.en"
        req = fake.last()
        assert (req.method, req.path, req.json()) == ("POST", "/issue", {"id": "alice"})
        assert req.headers["content-type"] == "application/json"
        assert req.headers["host"] == served.expected_host
        assert "authorization" not in req.headers

        assert client.verify(SECRET_TOKEN) == {"id": "alice", "sub": "alice"}
        req = fake.last()
        assert (req.method, req.path, req.json()) == ("POST", "/verify", {"token": SECRET_TOKEN})
        assert "authorization" not in req.headers

        assert client.store("alice", "4111111111111111") == "acc.ess.tok"
        req = fake.last()
        assert (req.method, req.path) == ("POST", "/api/keys")
        assert req.json() == {"data": "4111111111111111", "user_id": "alice"}
        assert "authorization" not in req.headers
        assert client.token is None  # store() keeps nothing

        client.store("alice", "5500000000000004", token=SECRET_TOKEN)
        assert fake.last().headers["authorization"] == f"Bearer {SECRET_TOKEN}"

        assert client.fetch(SECRET_TOKEN) == "4111111111111111"
        req = fake.last()
        assert (req.method, req.path, req.body) == ("GET", "/api/keys", b"")
        assert req.headers["authorization"] == f"Bearer {SECRET_TOKEN}"
        assert "content-type" not in req.headers

        client.delete(SECRET_TOKEN)
        req = fake.last()
        assert (req.method, req.path) == ("DELETE", "/api/keys")
        assert req.headers["authorization"] == f"Bearer {SECRET_TOKEN}"

        assert client.encrypt(b"\x00\xffdata", DEK, user_id="alice", token=SECRET_TOKEN) == (
            "ek",
            "ed",
        )
        req = fake.last()
        assert (req.method, req.path) == ("POST", "/api/encrypt")
        assert req.json() == {
            "data": base64.b64encode(b"\x00\xffdata").decode(),
            "dek": DEK.hex(),
            "user_id": "alice",
        }
        assert req.headers["authorization"] == f"Bearer {SECRET_TOKEN}"
        client.encrypt(b"x", DEK)
        assert fake.last().json() == {"data": "eA==", "dek": DEK.hex()}
        assert "authorization" not in fake.last().headers

        assert client.decrypt_dek("wrapped-dek", SECRET_TOKEN) == DEK
        req = fake.last()
        assert (req.method, req.path, req.json()) == (
            "POST",
            "/api/decrypt-dek",
            {"encrypted_dek": "wrapped-dek"},
        )
        assert req.headers["authorization"] == f"Bearer {SECRET_TOKEN}"

        assert client.rotation_status() == {"state": "idle"}
        assert (fake.last().method, fake.last().path) == ("GET", "/api/rotate-mk")
        assert client.rotate() == {"state": "running"}
        assert (fake.last().method, fake.last().path) == ("POST", "/api/rotate-mk")

        assert client.health() == {"status": "ok"}
        assert fake.last().path == "/healthz"
        assert client.ready() is True
        assert fake.last().path == "/readyz"
        fake.answer("GET", "/readyz", 503, {"error": "vault restarting", "code": "unavailable"})
        assert client.ready() is False
        assert client.jwks() == {"keys": []}
        assert fake.last().path == "/.well-known/jwks.json"

    # Keep-alive: everything above went over one connection.
    assert {r.conn_id for r in fake.requests} == {fake.requests[0].conn_id}
    fake.wait_closed()  # and close() hung it up


def test_client_token_is_the_default_bearer(served: Served) -> None:
    fake = served.fake
    fake.answer("GET", "/api/keys", 200, {"data": "d"})
    fake.answer("POST", "/api/keys", 200, {"message": "ok", "access_token": "new"})
    fake.answer("GET", "/api/rotate-mk", 200, {})
    with served.make_client(token=SECRET_TOKEN) as client:
        client.fetch()
        assert fake.last().headers["authorization"] == f"Bearer {SECRET_TOKEN}"
        client.fetch("other.tok")
        assert fake.last().headers["authorization"] == "Bearer other.tok"
        client.store("alice", "d")
        assert fake.last().headers["authorization"] == f"Bearer {SECRET_TOKEN}"
        assert client.token == SECRET_TOKEN  # not replaced by the returned token
        client.rotation_status()
        assert fake.last().headers["authorization"] == f"Bearer {SECRET_TOKEN}"


def test_url_path_prefix_is_kept(tcp_server: Served) -> None:
    tcp_server.fake.answer("GET", "/kms/healthz", 200, {"status": "ok"})
    url = f"http://{tcp_server.expected_host}/kms/"
    with KMSClient(url=url) as client:
        assert client.health() == {"status": "ok"}


# -- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "bad_request", BadRequest),
        (401, "unauthorized", Unauthorized),
        (403, "forbidden", Forbidden),
        (404, "not_found", NotFound),
        (405, "method_not_allowed", MethodNotAllowed),
        (409, "conflict", Conflict),
        (413, "too_large", PayloadTooLarge),
        (422, "decryption_failed", DecryptionFailed),
        (500, "internal", InternalError),
        (503, "unavailable", Unavailable),
    ],
)
def test_error_is_rebuilt_from_code(
    served: Served, status: int, code: str, cls: type[KMSError]
) -> None:
    served.fake.error("POST", "/api/decrypt-dek", status, code, "server says no")
    with served.make_client() as client:
        with pytest.raises(KMSError) as info:
            client.decrypt_dek("wrapped", SECRET_TOKEN)
        assert type(info.value) is cls
        assert info.value.message == str(info.value) == "server says no"
        # The connection stays usable after an error answer.
        served.fake.answer("GET", "/healthz", 200, {"status": "ok"})
        assert client.health() == {"status": "ok"}
    assert len({r.conn_id for r in served.fake.requests}) == 1


def test_code_wins_over_status_and_status_is_the_fallback(tcp_server: Served) -> None:
    fake = tcp_server.fake
    with tcp_server.make_client() as client:
        fake.error("GET", "/api/keys", 400, "conflict", "odd but explicit")
        with pytest.raises(Conflict):
            client.fetch(SECRET_TOKEN)
        fake.error("GET", "/api/keys", 409, "no_such_code", "unknown code")
        with pytest.raises(Conflict, match="unknown code"):
            client.fetch(SECRET_TOKEN)
        fake.answer("GET", "/api/keys", 413, b"<html>too large</html>")
        with pytest.raises(PayloadTooLarge) as info:
            client.fetch(SECRET_TOKEN)
        assert str(info.value) == PayloadTooLarge.default_message
        fake.answer("GET", "/api/keys", 418, b"teapot")
        with pytest.raises(KMSError, match="418") as info2:
            client.fetch(SECRET_TOKEN)
        assert type(info2.value) is KMSError


def test_verify_invalid_token_raises_unauthorized(served: Served) -> None:
    served.fake.answer(
        "POST", "/verify", 401, {"valid": False, "error": "invalid token", "code": "unauthorized"}
    )
    with served.make_client() as client:
        with pytest.raises(Unauthorized, match="invalid token") as info:
            client.verify(SECRET_TOKEN)
    assert SECRET_TOKEN not in repr(info.value)


def test_verify_200_without_valid_true_is_not_accepted(tcp_server: Served) -> None:
    tcp_server.fake.answer("POST", "/verify", 200, {"valid": False, "payload": {"id": "x"}})
    with tcp_server.make_client() as client, pytest.raises(Unauthorized):
        client.verify(SECRET_TOKEN)


def test_malformed_success_answer_does_not_echo_the_body(tcp_server: Served) -> None:
    fake = tcp_server.fake
    with tcp_server.make_client() as client:
        fake.answer("GET", "/api/keys", 200, {"data": 4111111111111111})
        with pytest.raises(KMSError, match="malformed") as info:
            client.fetch(SECRET_TOKEN)
        assert "4111" not in str(info.value)
        fake.answer("GET", "/api/keys", 200, b'{"data": "4111111111111111"')  # truncated
        with pytest.raises(KMSError, match="malformed") as info:
            client.fetch(SECRET_TOKEN)
        assert "4111" not in str(info.value)
        assert info.value.__cause__ is None and info.value.__context__ is None
        fake.answer("POST", "/api/decrypt-dek", 200, {"dek": "not hex"})
        with pytest.raises(KMSError, match="malformed"):
            client.decrypt_dek("w", SECRET_TOKEN)


def test_bad_token_is_refused_locally_without_echo(tcp_server: Served) -> None:
    bad = "abc\r\nX-Injected: 1"
    with tcp_server.make_client() as client:
        with pytest.raises(Unauthorized) as info:
            client.fetch(bad)
    assert "abc" not in str(info.value) and "abc" not in repr(info.value)
    assert tcp_server.fake.requests == []


def test_repr_hides_the_token(tmp_path: Path) -> None:
    client = KMSClient(str(tmp_path / "s.sock"), token=SECRET_TOKEN)
    assert SECRET_TOKEN not in repr(client)
    assert "redacted" in repr(client)
    assert "8000" in repr(KMSClient(url="http://127.0.0.1:8000"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"url": "https://127.0.0.1:8000"},
        {"url": "http://user:pw@127.0.0.1:8000"},
        {"url": "http://"},
        {"socket_path": "/run/kmsd/kmsd.sock", "url": "http://127.0.0.1:8000"},
    ],
)
def test_bad_target_is_a_value_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as info:
        KMSClient(**kwargs)
    assert "pw" not in str(info.value)


def test_public_names() -> None:
    for name in kmsd_client.__all__:
        assert hasattr(kmsd_client, name)
    assert kmsd_client.Unavailable is __import__("kmsd.errors").errors.Unavailable
    assert KMSClient().__repr__() == "KMSClient(socket_path='/run/kmsd/kmsd.sock')"


# -- unreachable daemon ----------------------------------------------------------


def test_missing_socket_is_unavailable(tmp_path: Path) -> None:
    with KMSClient(str(tmp_path / "absent.sock"), token=SECRET_TOKEN) as client:
        with pytest.raises(Unavailable) as info:
            client.fetch()
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert "absent.sock" in str(info.value)
    assert SECRET_TOKEN not in str(info.value)


def test_refused_tcp_port_is_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with KMSClient(url=f"http://127.0.0.1:{port}") as client:
        with pytest.raises(Unavailable) as info:
            client.health()
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_timeout_is_unavailable_and_drops_the_connection(served: Served) -> None:
    fake = served.fake
    fake.answer("GET", "/healthz", 200, {"status": "slow"}, delay=0.5)
    with served.make_client(timeout=0.1) as client:
        with pytest.raises(Unavailable, match="timed out") as info:
            client.health()
        assert isinstance(info.value.__cause__, TimeoutError)
        # The late answer must not be read as the reply to the next request.
        fake.answer("GET", "/readyz", 200, {})
        assert client.ready() is True
    assert fake.requests[0].conn_id != fake.requests[1].conn_id


# -- keep-alive -------------------------------------------------------------------


def test_reconnects_after_server_closed_idle_connection(served: Served) -> None:
    fake = served.fake
    fake.answer("GET", "/healthz", 200, {"status": "ok"})
    fake.answer("POST", "/issue", 200, {"token": "t"})
    with served.make_client() as client:
        client.health()
        fake.drop_idle()
        assert client.issue("alice") == "t"  # a POST, found stale before sending
        fake.drop_idle()
        assert client.health() == {"status": "ok"}
    conn_ids = [r.conn_id for r in fake.requests]
    assert [r.path for r in fake.requests] == ["/healthz", "/issue", "/healthz"]
    assert len(set(conn_ids)) == 3


def test_connection_close_answer_is_honoured(served: Served) -> None:
    fake = served.fake
    fake.answer("GET", "/healthz", 200, {"status": "ok"}, close=True)
    with served.make_client() as client:
        client.health()
        client.health()
    assert len({r.conn_id for r in fake.requests}) == 2


@pytest.fixture
def no_staleness_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the idle close went unnoticed, as when it races with our send."""
    monkeypatch.setattr(kmsd_client, "_peer_closed", lambda sock: False)


@pytest.mark.usefixtures("no_staleness_check")
def test_get_is_resent_when_stale_connection_answers_nothing(served: Served) -> None:
    fake = served.fake
    fake.answer("GET", "/healthz", 200, {"status": "ok"})
    with served.make_client() as client:
        client.health()
        fake.drop_idle()
        assert client.health() == {"status": "ok"}
    assert len(fake.requests) == 2
    assert fake.requests[0].conn_id != fake.requests[1].conn_id


@pytest.mark.usefixtures("no_staleness_check")
def test_post_is_resent_only_when_sending_failed(unix_server: Served) -> None:
    # On a Unix socket, writing to a closed peer fails at once (EPIPE), so the
    # request provably never arrived and resending is safe.
    fake = unix_server.fake
    fake.answer("GET", "/healthz", 200, {"status": "ok"})
    fake.answer("POST", "/issue", 200, {"token": "t"})
    with unix_server.make_client() as client:
        client.health()
        fake.drop_idle()
        assert client.issue("alice") == "t"
    assert [r.path for r in fake.requests] == ["/healthz", "/issue"]


def test_post_is_not_resent_once_it_went_out(served: Served) -> None:
    # The server took the whole request and hung up without answering: it may
    # have acted on the POST, so it must not be sent twice.
    fake = served.fake
    fake.answer("GET", "/healthz", 200, {"status": "ok"})
    fake.answer("POST", "/issue", 200, {"token": "t"}, hangups=1)
    with served.make_client() as client:
        client.health()
        with pytest.raises(Unavailable) as info:
            client.issue("alice")
        assert isinstance(info.value.__cause__, ConnectionError)
        assert client.issue("alice") == "t"  # and the client recovers
    assert [r.path for r in fake.requests] == ["/healthz", "/issue", "/issue"]


def test_get_is_resent_once_after_a_silent_hangup(served: Served) -> None:
    fake = served.fake
    fake.answer("GET", "/healthz", 200, {"status": "ok"})
    fake.answer("GET", "/api/keys", 200, {"data": "d"}, hangups=1)
    with served.make_client() as client:
        client.health()
        assert client.fetch(SECRET_TOKEN) == "d"
    assert [r.path for r in fake.requests] == ["/healthz", "/api/keys", "/api/keys"]


def test_get_is_not_resent_on_a_fresh_connection_or_twice(served: Served) -> None:
    fake = served.fake
    fake.answer("GET", "/api/keys", 200, {"data": "d"}, hangups=1)
    with served.make_client() as client, pytest.raises(Unavailable):
        client.fetch(SECRET_TOKEN)  # first request, nothing stale about it
    assert len(fake.requests) == 1

    fake.requests.clear()
    fake.answer("GET", "/healthz", 200, {"status": "ok"})
    fake.answer("GET", "/api/keys", 200, {"data": "d"}, hangups=2)
    with served.make_client() as client:
        client.health()
        with pytest.raises(Unavailable):
            client.fetch(SECRET_TOKEN)
    assert [r.path for r in fake.requests] == ["/healthz", "/api/keys", "/api/keys"]


# -- context, batches, scheduled key deletion ------------------------------------------


def test_context_is_sent_only_when_given(served: Served) -> None:
    fake = served.fake
    fake.answer("POST", "/api/encrypt", 200, {"encrypted_key": "ek", "encrypted_dek": "ed"})
    fake.answer("POST", "/api/datakey", 200, {"dek": DEK.hex(), "encrypted_dek": "ed"})
    fake.answer("POST", "/api/decrypt-dek", 200, {"dek": DEK.hex()})
    fake.answer("POST", "/api/rewrap", 200, {"encrypted_dek": "ed2"})
    ctx = {"table": "contracts", "id": "7"}
    with served.make_client(token=SECRET_TOKEN) as client:
        client.encrypt(b"x", DEK, context=ctx)
        assert fake.last().json() == {"data": "eA==", "dek": DEK.hex(), "context": ctx}
        client.encrypt(b"x", DEK)
        assert "context" not in fake.last().json()
        assert client.datakey(context=ctx) == (DEK, "ed")
        assert fake.last().json() == {"context": ctx}
        client.datakey("bob", plaintext=False, context={})
        assert fake.last().json() == {"plaintext": False, "user_id": "bob", "context": {}}
        assert client.decrypt_dek("ed", context=ctx) == DEK
        assert fake.last().json() == {"encrypted_dek": "ed", "context": ctx}
        assert client.rewrap("ed", "bob", context=ctx) == "ed2"
        assert fake.last().json() == {"encrypted_dek": "ed", "user_id": "bob", "context": ctx}


def test_batches_keep_order_and_return_item_errors_in_place(tcp_server: Served) -> None:
    fake = tcp_server.fake
    failed = {"error": "decryption failed", "code": "decryption_failed", "status": 422}
    fake.answer("POST", "/api/decrypt-dek", 200, {"batch": [{"dek": DEK.hex()}, failed, {"dek": "00" * 32}]})
    fake.answer("POST", "/api/encrypt", 200, {"batch": [{"encrypted_key": "ek", "encrypted_dek": "ed"},
                                                         {"error": "bad", "code": "bad_request", "status": 400}]})
    fake.answer("POST", "/api/datakey", 200, {"batch": [{"encrypted_dek": "w1"}, {"dek": DEK.hex(), "encrypted_dek": "w2"}]})
    fake.answer("POST", "/api/rewrap", 200, {"batch": [{"encrypted_dek": "n1"}, {"error": "gone", "code": "key_pending_deletion", "status": 409}]})
    with tcp_server.make_client() as client:
        got = client.decrypt_dek_batch([{"encrypted_dek": "a"}, {"encrypted_dek": "b", "context": {"k": "v"}},
                                        {"encrypted_dek": "c"}], token=SECRET_TOKEN)
        assert got[0] == DEK and got[2] == bytes(32)
        assert type(got[1]) is DecryptionFailed and got[1].message == "decryption failed"
        req = fake.last()
        assert req.json() == {"batch": [{"encrypted_dek": "a"}, {"encrypted_dek": "b", "context": {"k": "v"}},
                                        {"encrypted_dek": "c"}]}
        assert req.headers["authorization"] == f"Bearer {SECRET_TOKEN}"

        got_e = client.encrypt_batch([{"data": b"x", "dek": DEK, "user_id": "bob"}, {"data": b"y", "dek": b"short"}])
        assert got_e[0] == ("ek", "ed") and type(got_e[1]) is BadRequest
        assert fake.last().json()["batch"][0] == {"data": "eA==", "dek": DEK.hex(), "user_id": "bob"}

        got_d = client.datakey_batch([{"user_id": "bob", "plaintext": False}, {"context": {"k": "v"}}])
        assert got_d == [(None, "w1"), (DEK, "w2")]
        assert fake.last().json() == {"batch": [{"plaintext": False, "user_id": "bob"}, {"context": {"k": "v"}}]}

        got_r = client.rewrap_batch([{"encrypted_dek": "o1"}, {"encrypted_dek": "o2", "user_id": "bob"}])
        assert got_r[0] == "n1" and type(got_r[1]) is kmsd_client.KeyPendingDeletion

        # An item with what the single call does not take is refused here.
        count = len(fake.requests)
        with pytest.raises(TypeError):
            client.decrypt_dek_batch([{"encrypted_dek": "a", "token": SECRET_TOKEN}])
        assert len(fake.requests) == count

        # An answer that does not match the items is malformed, not a guess.
        fake.answer("POST", "/api/decrypt-dek", 200, {"batch": [{"dek": DEK.hex()}]})
        with pytest.raises(KMSError, match="malformed"):
            client.decrypt_dek_batch([{"encrypted_dek": "a"}, {"encrypted_dek": "b"}])
        # A batch refused as a whole raises.
        fake.error("POST", "/api/decrypt-dek", 401, "unauthorized", "invalid or missing token")
        with pytest.raises(Unauthorized):
            client.decrypt_dek_batch([{"encrypted_dek": "a"}])


def test_key_deletion_routes(served: Served) -> None:
    fake = served.fake
    fake.answer("POST", "/api/master-keys/mk%2F1/schedule-deletion", 200,
                {"key_id": "mk/1", "status": "pending_deletion", "deletion_date": "2030-01-01 00:00:00"})
    fake.answer("POST", "/api/master-keys/mk%2F1/cancel-deletion", 200, {"key_id": "mk/1", "status": "retired"})
    fake.answer("DELETE", "/api/master-keys/mk%2F1?now=true", 200, {"key_id": "mk/1"})
    fake.answer("DELETE", "/api/master-keys/mk%2F1", 400, {"error": "schedule it", "code": "bad_request"})
    with served.make_client() as client:
        assert client.schedule_key_deletion("mk/1")["status"] == "pending_deletion"
        assert fake.last().json() == {"days": 30}
        client.schedule_key_deletion("mk/1", days=7)
        assert fake.last().json() == {"days": 7}
        assert client.cancel_key_deletion("mk/1")["status"] == "retired"
        assert fake.last().body == b""
        assert client.destroy_master_key("mk/1", now=True) == {"key_id": "mk/1"}
        with pytest.raises(BadRequest):
            client.destroy_master_key("mk/1")
