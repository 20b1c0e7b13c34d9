"""The stdlib client against the real daemon, over the Unix socket and TCP;
and a full run whose logs must not contain anything secret."""

from __future__ import annotations

import os
import uuid

import pytest
from conftest import Daemon, remember

import kmsd_client
from kmsd_client import BadRequest, Conflict, DecryptionFailed, Forbidden, KMSClient, Unauthorized, Unavailable


@pytest.fixture(params=["unix", "tcp"])
def client(request: pytest.FixtureRequest, shared_daemon: Daemon) -> KMSClient:
    if request.param == "unix":
        return KMSClient(shared_daemon.socket)
    return KMSClient(url=shared_daemon.url)


def test_client_round_trip(client: KMSClient) -> None:
    user = "c-" + uuid.uuid4().hex[:10]
    with client:
        token = client.store(user, "client-plaintext")
        remember(token, "client-plaintext")
        assert client.fetch(token) == "client-plaintext"
        assert client.verify(token)["sub"] == user
        with pytest.raises(Conflict):
            client.store(user, "other")
        new_token = client.store(user, "client-replaced", token=token)
        remember(new_token, "client-replaced")
        assert client.fetch(new_token) == "client-replaced"
        dek = os.urandom(32)
        remember(dek)
        encrypted_key, encrypted_dek = client.encrypt(b"payload", dek, token=token)
        assert client.decrypt_dek(encrypted_dek, token=token) == dek
        # Unbound (no owner, no token), then rewrapped to the token's subject.
        _, unbound = client.encrypt(b"payload", dek)
        assert client.decrypt_dek(unbound, token=token) == dek
        bound = client.rewrap(unbound, user_id=user, token=token)
        assert client.decrypt_dek(bound, token=token) == dek
        other = client.store(user + "-b", "b")
        remember(other)
        with pytest.raises(DecryptionFailed):
            client.decrypt_dek(bound, token=other)
        # A data key kmsd generates: for the token's subject, or for a
        # user id without its plaintext (a producer for that owner).
        new_dek, wrapped = client.datakey(token=token)
        assert new_dek is not None and len(new_dek) == 32
        remember(new_dek, wrapped)
        assert client.decrypt_dek(wrapped, token=token) == new_dek
        none, for_other = client.datakey(user_id=user + "-b", plaintext=False)
        assert none is None
        remember(client.decrypt_dek(for_other, token=other))
        with pytest.raises(DecryptionFailed):
            client.decrypt_dek(for_other, token=token)
        client.revoke(other)
        with pytest.raises(Unauthorized):
            client.fetch(other)
        assert client.fetch(token)  # another subject's session lives
        client.delete(token)
        with pytest.raises(Unauthorized):  # the record's tokens die with it
            client.fetch(token)
        with pytest.raises(Unauthorized):
            client.fetch("garbage")
        assert client.health() == {"status": "ok"}
        assert client.ready() is True
        assert client.jwks()["keys"]


def test_client_typed_errors(shared_daemon: Daemon) -> None:
    with KMSClient(url=shared_daemon.url) as tcp:
        with pytest.raises(Forbidden):
            tcp.rotate()
        token = tcp.store("c-" + uuid.uuid4().hex[:10], "typed")
        remember(token)
        other = tcp.store("c-" + uuid.uuid4().hex[:10], "typed2")
        remember(other)
        dek = os.urandom(32)
        _, edek = tcp.encrypt(b"x", dek, token=token)
        with pytest.raises(DecryptionFailed):
            tcp.decrypt_dek(edek, token=other)
    with KMSClient(shared_daemon.socket) as unix:
        status = unix.rotation_status()
        assert status["active_key_id"]
        issued = unix.issue("c-issued")
        remember(issued)
        assert unix.verify(issued)["id"] == "c-issued"


def test_client_daemon_down_is_unavailable(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(Unavailable):
        KMSClient(str(tmp_path / "missing.sock")).health()
    assert kmsd_client.Unavailable is Unavailable


def test_full_run_leaves_no_secret_in_the_logs(daemon_factory) -> None:  # noqa: ANN001
    d: Daemon = daemon_factory()
    plaintext = "log-canary-" + uuid.uuid4().hex
    dek = os.urandom(32)
    with KMSClient(d.socket) as c:
        token = c.store("log-user", plaintext)
        assert c.fetch(token) == plaintext
        ek, edek = c.encrypt(plaintext.encode(), dek, token=token)
        assert c.decrypt_dek(edek, token=token) == dek
        issued = c.issue("log-user")
        c.verify(issued)
        with pytest.raises(Unauthorized):
            c.fetch(token + "x")
        c.rotate()
        c.delete(token)
    d.stop()
    logs = d.logs()
    assert '"path":"/api/keys"' in logs  # the request lines are there...
    for secret in (plaintext, dek.hex(), token, issued, ek, edek, token.split(".")[2]):
        assert secret not in logs  # ...and nothing secret is
    import base64

    assert base64.b64encode(dek).decode() not in logs
    root_key = (d.dir / "root-key.dev").read_text().strip()
    assert root_key not in logs


def test_client_context_batches_and_key_deletion(client: KMSClient, daemon_factory) -> None:  # noqa: ANN001
    with client:
        token = client.store("c-" + uuid.uuid4().hex[:10], "ctx")
        remember(token)
        ctx = {"table": "t", "id": "1"}
        dek, wrapped = client.datakey(token=token, context=ctx)
        remember(dek, wrapped)
        assert client.decrypt_dek(wrapped, token=token, context={"id": "1", "table": "t"}) == dek
        with pytest.raises(DecryptionFailed):
            client.decrypt_dek(wrapped, token=token)
        got = client.decrypt_dek_batch([{"encrypted_dek": wrapped, "context": ctx}, {"encrypted_dek": wrapped}],
                                       token=token)
        assert got[0] == dek and type(got[1]) is DecryptionFailed
        (sealed,) = client.encrypt_batch([{"data": b"x", "dek": dek, "context": ctx}], token=token)
        assert isinstance(sealed, tuple)
        (moved,) = client.rewrap_batch([{"encrypted_dek": sealed[1], "context": ctx}], token=token)
        assert isinstance(moved, str) and client.decrypt_dek(moved, token=token, context=ctx) == dek
        ((none, producer),) = client.datakey_batch([{"plaintext": False}], token=token)  # type: ignore[misc]
        assert none is None and producer
    if client._target.socket_path is None:
        return
    d: Daemon = daemon_factory()
    with KMSClient(d.socket) as admin:
        old = admin.rotation_status()["active_key_id"]
        admin.add_master_key()
        assert admin.schedule_key_deletion(old, days=7)["status"] == "pending_deletion"
        assert admin.cancel_key_deletion(old)["status"] == "retired"
        with pytest.raises(BadRequest):
            admin.destroy_master_key(old)
        admin.destroy_master_key(old, now=True)
        assert old not in {k["key_id"] for k in admin.list_master_keys()["master_keys"]}
