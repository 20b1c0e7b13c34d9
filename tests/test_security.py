"""The security model (docs/security.md): tokens, cross-user access, admin
peers, moved ciphertexts. Each test drives the real daemon."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pwd
import socket
import sqlite3
import time

import jwt
import pytest
from conftest import API, Daemon, open_api, remember
from support.ids import uid

ROOT = os.geteuid() == 0


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge(header: dict, payload: dict, signature: bytes = b"") -> str:
    return ".".join([b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode()), b64url(signature)])


async def test_cross_user_read_is_impossible(api: API) -> None:
    alice, bob = uid("s"), uid("s")
    a_token = await api.store(alice, "alice-secret-value")
    b_token = await api.store(bob, "bob-secret-value")
    assert await api.call("GET", "/api/keys", token=a_token) == (200, {"data": "alice-secret-value"})
    assert await api.call("GET", "/api/keys", token=b_token) == (200, {"data": "bob-secret-value"})
    # Alice's token cannot replace or delete Bob's record.
    status, _ = await api.call("POST", "/api/keys", {"user_id": bob, "data": "overwrite"}, token=a_token)
    assert status == 409
    assert await api.call("GET", "/api/keys", token=b_token) == (200, {"data": "bob-secret-value"})


@pytest.mark.parametrize("column", ["encrypted_dek", "encrypted_key", "both"])
async def test_row_copied_to_another_user_does_not_decrypt(api: API, shared_daemon: Daemon, column: str) -> None:
    victim, thief = uid("s"), uid("s")
    await api.store(victim, "victim-secret-" + column)
    thief_token = await api.store(thief, "thief-own-value")
    db = sqlite3.connect(shared_daemon.database.removeprefix("sqlite:///"))
    ek, edek = db.execute("SELECT encrypted_key, encrypted_dek FROM kms_keys WHERE user_id=?", (victim,)).fetchone()
    if column in ("encrypted_dek", "both"):
        db.execute("UPDATE kms_keys SET encrypted_dek=? WHERE user_id=?", (edek, thief))
    if column in ("encrypted_key", "both"):
        db.execute("UPDATE kms_keys SET encrypted_key=? WHERE user_id=?", (ek, thief))
    db.commit()
    status, body = await api.call("GET", "/api/keys", token=thief_token)
    assert status == 422 and body == {"error": "decryption failed", "code": "decryption_failed"}


async def test_envelope_dek_of_another_user_is_refused(api: API) -> None:
    alice, bob = uid("s"), uid("s")
    a_token = await api.store(alice, "a-env")
    b_token = await api.store(bob, "b-env")
    dek = os.urandom(32)
    remember(dek)
    _, enc = await api.call("POST", "/api/encrypt", {"data": "eA==", "dek": dek.hex()}, token=a_token)
    status, body = await api.call("POST", "/api/decrypt-dek", {"encrypted_dek": enc["encrypted_dek"]}, token=b_token)
    assert status == 422 and "dek" not in body


async def _valid_token(api: API) -> str:
    return await api.store(uid("s"), "token-source")


async def test_forged_tokens_are_401(api: API, shared_daemon: Daemon) -> None:
    token = await _valid_token(api)
    header = jwt.get_unverified_header(token)
    payload = jwt.decode(token, options={"verify_signature": False})
    _, jwks = await api.call("GET", "/.well-known/jwks.json")
    public_raw = base64.urlsafe_b64decode(jwks["keys"][0]["x"] + "==")
    forged = {
        "alg none": forge({"alg": "none", "typ": "JWT"}, payload),
        "alg none kid": forge({"alg": "none", "kid": header["kid"]}, payload),
        "hs256 with public key": jwt.encode(payload, public_raw, algorithm="HS256", headers={"kid": header["kid"]}),
        "hs256 with jwk x": jwt.encode(payload, jwks["keys"][0]["x"], algorithm="HS256", headers={"kid": header["kid"]}),
        "tampered payload": token.split(".")[0] + "." + b64url(json.dumps({**payload, "sub": "other"}).encode())
        + "." + token.split(".")[2],
        "wrong kid": forge({**header, "kid": "sig-unknown"}, payload, b"x" * 64),
        "no kid": forge({"alg": "EdDSA"}, payload, b"x" * 64),
        "bad signature": token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"),
        "oversized": token + "A" * 5000,
        "empty segments": "..",
        "not base64": "***.***.***",
    }
    for name, bad in forged.items():
        status, body = await api.call("GET", "/api/keys", token=bad)
        assert status == 401, (name, body)
        status, body = await api.call("POST", "/verify", {"token": bad})
        assert status == 401 and body["valid"] is False, name
        assert body["error"] == "invalid token", name


async def test_claims_are_enforced(shared_daemon: Daemon) -> None:
    """Tokens signed with the daemon's real key (taken from the vault's
    wrapped row with the dev root key) but with bad claims."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from kmsd import envelope as env

    base = shared_daemon.dir
    rk = env.RootKey((base / "root-key.dev").read_text())
    db = sqlite3.connect(shared_daemon.database.removeprefix("sqlite:///"))
    kid, material = db.execute("SELECT kid, key_material FROM kmsd_signing_keys WHERE status='active'").fetchone()
    key = Ed25519PrivateKey.from_private_bytes(env.unwrap_master_key(rk.kek, "jwt:" + kid, env.b64d(material)))
    now = int(time.time())
    good = {"id": "c-user", "sub": "c-user", "iss": "kmsd", "aud": "kmsd", "iat": now, "nbf": now, "exp": now + 60}

    def sign(claims: dict) -> str:
        return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})

    session, api = open_api(shared_daemon, "unix")
    async with session:
        assert (await api.call("POST", "/verify", {"token": sign(good)}))[0] == 200
        bad = {
            "expired": {**good, "exp": now - 10},
            "not yet valid": {**good, "nbf": now + 600},
            "wrong aud": {**good, "aud": "other"},
            "wrong iss": {**good, "iss": "evil"},
            "no exp": {k: v for k, v in good.items() if k != "exp"},
            "no iat": {k: v for k, v in good.items() if k != "iat"},
            "no sub": {k: v for k, v in good.items() if k != "sub"},
            "no iss": {k: v for k, v in good.items() if k != "iss"},
            "no aud": {k: v for k, v in good.items() if k != "aud"},
            "id differs from sub": {**good, "id": "someone-else"},
            "numeric sub": {**good, "sub": 5, "id": 5},
        }
        for name, claims in bad.items():
            status, body = await api.call("POST", "/verify", {"token": sign(claims)})
            assert status == 401, (name, body)


def test_non_admin_unix_peer_cannot_issue_or_rotate(daemon_factory) -> None:  # noqa: ANN001
    # Nobody is an admin here, not even root: the test process is a plain peer.
    d: Daemon = daemon_factory(extra_env={"KMSD_ADMIN_UIDS": ""})

    async def go() -> None:
        session, api = open_api(d, "unix")
        async with session:
            status, body = await api.call("POST", "/issue", {"id": "anyone"})
            assert status == 403 and "admin" in body["error"]
            assert (await api.call("POST", "/api/rotate-mk"))[0] == 403
            assert (await api.call("GET", "/api/rotate-mk"))[0] == 403
            # Storing and reading stay open to every peer.
            token = await api.store("plain-peer", "plain-peer-value")
            assert (await api.call("GET", "/api/keys", token=token))[0] == 200

    asyncio.run(go())


def test_admin_by_group_and_tcp_admin_setting(daemon_factory) -> None:  # noqa: ANN001
    d: Daemon = daemon_factory(
        extra_env={"KMSD_ADMIN_UIDS": "", "KMSD_ADMIN_GIDS": str(os.getgid()), "KMSD_ALLOW_ADMIN_OVER_TCP": "true"}
    )

    async def go() -> None:
        for transport in ("unix", "tcp"):
            session, api = open_api(d, transport)
            async with session:
                status, body = await api.call("POST", "/issue", {"id": "by-group"})
                assert status == 200, (transport, body)
                remember(body["token"])

    asyncio.run(go())


@pytest.mark.skipif(not ROOT, reason="needs root to run a peer as another user")
def test_real_peer_of_another_uid_is_not_admin(daemon_factory) -> None:  # noqa: ANN001
    d: Daemon = daemon_factory(extra_env={"KMSD_SOCKET_MODE": "0666"})
    nobody = pwd.getpwnam("nobody")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, then ask for a token for "root"
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            s = socket.socket(socket.AF_UNIX)
            s.connect(d.socket)
            body = b'{"id": "root"}'
            s.sendall(b"POST /issue HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            os.write(write_fd, data)
        finally:
            os._exit(0)
    os.close(write_fd)
    os.waitpid(pid, 0)
    with os.fdopen(read_fd, "rb") as fh:
        answer = fh.read()
    assert answer.startswith(b"HTTP/1.1 403"), answer[:100]
    assert str(nobody.pw_uid).encode() in d.logs().encode()


async def test_state_never_changes_on_get(api: API) -> None:
    for path in ("/issue", "/verify", "/api/encrypt", "/api/decrypt-dek"):
        assert (await api.call("GET", path))[0] == 405
