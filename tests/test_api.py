"""Every route over the Unix socket and TCP, against the real daemon and its
real vault, with the request and response shapes of docs/openapi.yaml; and bad
input answered with a JSON 4xx that changes nothing."""

from __future__ import annotations

import base64
import os

import jwt
import pytest
from conftest import API, remember
from support.ids import uid


async def test_store_and_fetch(api: API) -> None:
    user = uid("u")
    status, body = await api.call("POST", "/api/keys", {"user_id": user, "data": "4111 1111 1111 1111"})
    assert status == 200, body
    assert body["message"] == "Key stored successfully"
    token = body["access_token"]
    remember(token, "4111 1111 1111 1111")
    status, body = await api.call("GET", "/api/keys", token=token)
    assert (status, body) == (200, {"data": "4111 1111 1111 1111"})


async def test_unicode_and_large_data_round_trip(api: API) -> None:
    user = uid("ü")
    data = "päss-ƒ-🔑-" + "x" * 100_000
    token = await api.store(user, data)
    assert await api.call("GET", "/api/keys", token=token) == (200, {"data": data})


async def test_existing_user_is_conflict_without_its_token(api: API) -> None:
    user = uid("u")
    token = await api.store(user, "first-value")
    status, body = await api.call("POST", "/api/keys", {"user_id": user, "data": "hijack-value"})
    assert status == 409 and body["code"] == "conflict"
    other = await api.store(uid("u"), "other-value")
    status, _ = await api.call("POST", "/api/keys", {"user_id": user, "data": "hijack-value"}, token=other)
    assert status == 409
    assert await api.call("GET", "/api/keys", token=token) == (200, {"data": "first-value"})


async def test_replace_with_own_token_uses_a_new_dek(api: API, shared_daemon) -> None:  # noqa: ANN001
    import sqlite3

    user = uid("u")
    token = await api.store(user, "old-value")
    db = shared_daemon.database.removeprefix("sqlite:///")
    before = sqlite3.connect(db).execute("SELECT encrypted_dek FROM kms_keys WHERE user_id=?", (user,)).fetchone()
    token2 = await api.store(user, "new-value", token=token)
    after = sqlite3.connect(db).execute("SELECT encrypted_dek FROM kms_keys WHERE user_id=?", (user,)).fetchone()
    assert before != after
    for t in (token, token2):
        assert await api.call("GET", "/api/keys", token=t) == (200, {"data": "new-value"})


async def test_delete_shreds_the_record(api: API) -> None:
    user = uid("u")
    token = await api.store(user, "to-be-deleted")
    status, body = await api.call("DELETE", "/api/keys", token=token)
    assert status == 200 and body["message"]
    # The token died with its record (a new generation): 401, not 404.
    assert (await api.call("GET", "/api/keys", token=token))[0] == 401
    assert (await api.call("DELETE", "/api/keys", token=token))[0] == 401
    # The id is free again.
    await api.store(user, "again")


async def test_fetch_without_record_is_404(api: API, unix_api: API) -> None:
    user = uid("u")
    token = await api.store(user, "short-lived")
    assert (await api.call("DELETE", "/api/keys", token=token))[0] == 200
    # The deleted record's tokens died with it; an admin's new one is current.
    token = (await unix_api.call("POST", "/issue", {"id": user}))[1]["token"]
    status, body = await api.call("GET", "/api/keys", token=token)
    assert status == 404 and body == {"error": "no key stored for this user", "code": "not_found"}


async def test_issue_and_verify(unix_api: API) -> None:
    user = uid("u")
    status, body = await unix_api.call("POST", "/issue", {"id": user})
    assert status == 200, body
    token = body["token"]
    remember(token)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA" and header["kid"]
    status, body = await unix_api.call("POST", "/verify", {"token": token})
    assert status == 200 and body["valid"] is True
    payload = body["payload"]
    assert payload["id"] == payload["sub"] == user
    assert payload["iss"] == "kmsd" and payload["aud"] == "kmsd"
    assert payload["exp"] - payload["iat"] == 3600


async def test_verify_over_tcp_and_garbage(tcp_api: API) -> None:
    status, body = await tcp_api.call("POST", "/verify", {"token": "not.a.token"})
    assert status == 401 and body["valid"] is False and body["error"]


async def test_issue_over_tcp_is_refused(tcp_api: API) -> None:
    status, body = await tcp_api.call("POST", "/issue", {"id": uid("u")})
    assert status == 403 and body["code"] == "forbidden"


async def test_token_holder_may_renew_own_token_over_tcp(tcp_api: API) -> None:
    user = uid("u")
    token = await tcp_api.store(user, "renew-me")
    status, body = await tcp_api.call("POST", "/issue", {"id": user}, token=token)
    assert status == 200
    remember(body["token"])
    assert (await tcp_api.call("POST", "/issue", {"id": uid("u")}, token=token))[0] == 403


async def test_encrypt_and_decrypt_dek(api: API) -> None:
    user = uid("u")
    token = await api.store(user, "envelope-owner")
    dek = os.urandom(32)
    remember(dek, "ZW52ZWxvcGUgcGF5bG9hZA==")
    status, body = await api.call(
        "POST", "/api/encrypt", {"data": base64.b64encode(b"envelope payload").decode(), "dek": dek.hex()},
        token=token,
    )
    assert status == 200, body
    assert set(body) == {"encrypted_key", "encrypted_dek"}
    status, out = await api.call("POST", "/api/decrypt-dek", {"encrypted_dek": body["encrypted_dek"]}, token=token)
    assert (status, out) == (200, {"dek": dek.hex()})
    # The data blob is v1: version byte, nonce, AES-GCM under the DEK, owner bound.
    from kmsd.envelope import decrypt_data

    assert decrypt_data(dek, base64.b64decode(body["encrypted_key"]), user) == b"envelope payload"


async def test_encrypt_binds_body_user_id(api: API) -> None:
    owner, other = uid("u"), uid("u")
    owner_token = await api.store(owner, "owner-x")
    other_token = await api.store(other, "other-x")
    dek = os.urandom(32)
    remember(dek)
    status, body = await api.call(
        "POST", "/api/encrypt", {"data": "aGVsbG8=", "dek": dek.hex(), "user_id": owner}, token=other_token
    )
    assert status == 200
    assert (await api.call("POST", "/api/decrypt-dek", body_of(body), token=other_token))[0] == 422
    assert (await api.call("POST", "/api/decrypt-dek", body_of(body), token=owner_token)) == (200, {"dek": dek.hex()})


def body_of(enc: dict[str, str]) -> dict[str, str]:
    return {"encrypted_dek": enc["encrypted_dek"]}


async def test_encrypt_without_an_owner_is_unbound(api: API) -> None:
    # The original's documented request: no owner, an envelope any valid
    # token unwraps (tests/test_dropin.py covers its format and rules).
    dek = os.urandom(32)
    status, body = await api.call("POST", "/api/encrypt", {"data": "aGVsbG8=", "dek": dek.hex()})
    assert status == 200 and set(body) == {"encrypted_key", "encrypted_dek"}
    token = await api.store(uid("u"), "a reader of unbound envelopes")
    assert await api.call("POST", "/api/decrypt-dek", body_of(body), token=token) == (200, {"dek": dek.hex()})


async def test_rotate_over_unix_as_admin(unix_api: API) -> None:
    user = uid("u")
    token = await unix_api.store(user, "survives-rotation")
    status, before = await unix_api.call("GET", "/api/rotate-mk")
    assert status == 200 and before["active_key_id"]
    status, body = await unix_api.call("POST", "/api/rotate-mk")
    assert status == 200 and body["previous_key_id"] == before["active_key_id"]
    status, after = await unix_api.call("GET", "/api/rotate-mk")
    assert after["active_key_id"] == body["active_key_id"] != before["active_key_id"]
    statuses = {k["key_id"]: k["status"] for k in after["master_keys"]}
    assert statuses[before["active_key_id"]] == "retired"
    assert list(statuses.values()).count("active") == 1
    # Written before the rotation, still readable; written after, too.
    assert await unix_api.call("GET", "/api/keys", token=token) == (200, {"data": "survives-rotation"})
    token2 = await unix_api.store(uid("u"), "after-rotation")
    assert await unix_api.call("GET", "/api/keys", token=token2) == (200, {"data": "after-rotation"})


async def test_rotate_over_tcp_is_refused(tcp_api: API) -> None:
    assert (await tcp_api.call("POST", "/api/rotate-mk"))[0] == 403
    assert (await tcp_api.call("GET", "/api/rotate-mk"))[0] == 403


async def test_health_ready_jwks(api: API) -> None:
    assert await api.call("GET", "/healthz") == (200, {"status": "ok"})
    status, body = await api.call("GET", "/readyz")
    assert status == 200 and body["ready"] is True and all(body["checks"].values())
    status, body = await api.call("GET", "/.well-known/jwks.json")
    assert status == 200 and body["keys"][0]["kty"] == "OKP" and body["keys"][0]["crv"] == "Ed25519"
    assert "d" not in body["keys"][0]


async def test_jwks_verifies_issued_tokens(api: API) -> None:
    token = await api.store(uid("u"), "jwks-check")
    _, body = await api.call("GET", "/.well-known/jwks.json")
    jwk = {k["kid"]: k for k in body["keys"]}[jwt.get_unverified_header(token)["kid"]]
    key = jwt.PyJWK(jwk).key
    claims = jwt.decode(token, key, algorithms=["EdDSA"], audience="kmsd", issuer="kmsd")
    assert claims["sub"] == claims["id"]


# -- bad input ------------------------------------------------------------------

BAD_STORE_BODIES = [
    b"not json",
    b"[1, 2]",
    b'"string"',
    b"{}",
    b'{"user_id": "x"}',
    b'{"data": "x"}',
    b'{"user_id": "x", "data": 5}',
    b'{"user_id": "x", "data": {"a": 1}}',
    b'{"user_id": "x", "data": ["a"]}',
    b'{"user_id": "x", "data": ""}',
    b'{"user_id": "", "data": "x"}',
    b'{"user_id": 4.2, "data": "x"}',
    b'{"user_id": true, "data": "x"}',
    b'{"user_id": null, "data": "x"}',
    b'{"user_id": "' + b"a" * 65 + b'", "data": "x"}',
    b'{"user_id": "bad\\nid", "data": "x"}',
    b'{"user_id": "bad\\u0000id", "data": "x"}',
    b'{"user_id": "bad\\u007fid", "data": "x"}',
    b'{"user_id": "x", "data": "\\ud800"}',
    b"\xff\xfe",
    b"[" * 100_000,
]


@pytest.mark.parametrize("raw", BAD_STORE_BODIES, ids=range(len(BAD_STORE_BODIES)))
async def test_bad_store_bodies_are_400(api: API, raw: bytes) -> None:
    status, body = await api.call("POST", "/api/keys", raw=raw)
    assert status == 400, body
    assert body["code"] == "bad_request" and body["error"]


async def test_bad_input_writes_nothing(unix_api: API, shared_daemon) -> None:  # noqa: ANN001
    import sqlite3

    db = shared_daemon.database.removeprefix("sqlite:///")
    count = sqlite3.connect(db).execute("SELECT COUNT(*) FROM kms_keys").fetchone()[0]
    for raw in BAD_STORE_BODIES:
        await unix_api.call("POST", "/api/keys", raw=raw)
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM kms_keys").fetchone()[0] == count


async def test_user_id_of_64_characters_is_fine(api: API) -> None:
    user = uid("u") + "x" * (64 - 14)
    assert len(user) == 64
    await api.store(user, "max-length-id")


async def test_oversized_body_is_413(api: API) -> None:
    status, body = await api.call("POST", "/api/keys", raw=b'{"user_id":"big","data":"' + b"a" * (2 << 20) + b'"}')
    assert status == 413 and body["code"] == "too_large"


BAD_ENCRYPT = [
    {"data": "not base64!", "dek": "00" * 32, "user_id": "u"},
    {"data": "aGVsbG8", "dek": "00" * 32, "user_id": "u"},
    {"data": 5, "dek": "00" * 32, "user_id": "u"},
    {"data": "", "dek": "00" * 32, "user_id": "u"},
    {"data": "aGVsbG8=", "dek": "00" * 31, "user_id": "u"},
    {"data": "aGVsbG8=", "dek": "00" * 33, "user_id": "u"},
    {"data": "aGVsbG8=", "dek": "zz" * 32, "user_id": "u"},
    {"data": "aGVsbG8=", "dek": 1234, "user_id": "u"},
    {"data": "aGVsbG8=", "user_id": "u"},
    {"data": "aGVsbG8=", "dek": "00" * 32, "user_id": ""},
    {"data": "aGVsbG8=", "dek": "00" * 32, "user_id": ["u"]},
]


@pytest.mark.parametrize("body", BAD_ENCRYPT, ids=range(len(BAD_ENCRYPT)))
async def test_bad_encrypt_bodies_are_400(api: API, body: dict) -> None:  # noqa: ANN001
    status, out = await api.call("POST", "/api/encrypt", body)
    assert status == 400, out


async def test_tampered_and_truncated_deks_fail(api: API) -> None:
    user = uid("u")
    token = await api.store(user, "tamper-owner")
    dek = os.urandom(32)
    remember(dek)
    _, enc = await api.call("POST", "/api/encrypt", {"data": "aGk=", "dek": dek.hex()}, token=token)
    raw = base64.b64decode(enc["encrypted_dek"])
    variants = [
        raw[:-1],
        raw[:10],
        raw + b"\x00",
        bytes([raw[0] ^ 1]) + raw[1:],
        raw[:-1] + bytes([raw[-1] ^ 1]),
        raw[:20] + bytes([raw[20] ^ 0x80]) + raw[21:],
    ]
    for v in variants:
        status, body = await api.call("POST", "/api/decrypt-dek", {"encrypted_dek": base64.b64encode(v).decode()},
                                      token=token)
        assert status == 422 and "dek" not in body, body
    for garbage in ["!!!", "", 5, None]:
        status, body = await api.call("POST", "/api/decrypt-dek", {"encrypted_dek": garbage}, token=token)
        assert 400 <= status < 500, body


async def test_record_dek_is_its_owners_only_via_decrypt_dek(api: API, shared_daemon) -> None:  # noqa: ANN001
    import sqlite3

    user = uid("u")
    token = await api.store(user, "record-dek")
    other = await api.store(uid("u"), "someone else")
    db = shared_daemon.database.removeprefix("sqlite:///")
    (edek,) = sqlite3.connect(db).execute("SELECT encrypted_dek FROM kms_keys WHERE user_id=?", (user,)).fetchone()
    status, body = await api.call("POST", "/api/decrypt-dek", {"encrypted_dek": edek}, token=other)
    assert status == 422 and "dek" not in body
    # Its owner gets it (the original key-server's read flow).
    status, body = await api.call("POST", "/api/decrypt-dek", {"encrypted_dek": edek}, token=token)
    assert status == 200 and len(bytes.fromhex(body["dek"])) == 32


@pytest.mark.parametrize(
    "header",
    ["", "Bearer", "Bearer ", "Basic abc", "Bearer garbage", "Bearer a.b.c", "bearer " + "a" * 5000],
)
async def test_bad_tokens_are_401(api: API, header: str) -> None:
    status, body = await api.call("GET", "/api/keys", headers={"Authorization": header})
    assert status == 401 and body["code"] == "unauthorized"


async def test_missing_token_is_401(api: API) -> None:
    for method, path, body in [("GET", "/api/keys", None), ("DELETE", "/api/keys", None),
                               ("POST", "/api/decrypt-dek", {"encrypted_dek": "AAAA"})]:
        status, out = await api.call(method, path, body)
        assert status == 401, (method, path, out)


async def test_unknown_route_and_method_are_json(api: API) -> None:
    status, body = await api.call("GET", "/nope")
    assert status == 404 and body["code"] == "not_found"
    status, body = await api.call("PUT", "/api/keys", {"a": 1})
    assert status == 405 and body["code"] == "method_not_allowed"
    # State never changes on a GET: there is no GET that writes.
    status, body = await api.call("GET", "/issue")
    assert status == 405


async def test_dns_rebinding_host_is_refused(tcp_api: API) -> None:
    status, body = await tcp_api.call("GET", "/healthz", headers={"Host": "evil.example"})
    assert status == 403 and body["code"] == "forbidden"
    status, _ = await tcp_api.call("GET", "/healthz", headers={"Host": "localhost:8000"})
    assert status == 200
