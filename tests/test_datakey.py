"""POST /api/datakey: a DEK generated in the vault, wrapped for its owner
(the user id in the body, else the token's subject), with or without its
plaintext; what it refuses; its audit line. Over both listeners, against
the real daemon and vault."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from conftest import API, Daemon, open_api, remember
from support.ids import uid

HEX64 = re.compile(r"^[0-9a-f]{64}$")


async def test_a_data_key_unwraps_for_its_owner_only(api: API) -> None:
    alice, bob = uid("dk-alice"), uid("dk-bob")
    a_token = await api.store(alice, "alice's record")
    b_token = await api.store(bob, "bob's record")

    # Bound to the token's subject.
    status, body = await api.call("POST", "/api/datakey", {}, token=a_token)
    assert status == 200 and set(body) == {"dek", "encrypted_dek"} and HEX64.match(body["dek"]), body
    assert await api.call("POST", "/api/decrypt-dek", {"encrypted_dek": body["encrypted_dek"]}, token=a_token) == (
        200, {"dek": body["dek"]})
    assert (await api.call("POST", "/api/decrypt-dek", {"encrypted_dek": body["encrypted_dek"]}, token=b_token))[0] == 422

    # Bound to the user id in the body (no token needed, as /api/encrypt).
    status, for_bob = await api.call("POST", "/api/datakey", {"user_id": bob})
    assert status == 200
    assert await api.call("POST", "/api/decrypt-dek", {"encrypted_dek": for_bob["encrypted_dek"]}, token=b_token) == (
        200, {"dek": for_bob["dek"]})
    assert (await api.call("POST", "/api/decrypt-dek", {"encrypted_dek": for_bob["encrypted_dek"]}, token=a_token))[0] == 422

    # Every call a new key.
    deks = set()
    for _ in range(20):
        status, body = await api.call("POST", "/api/datakey", {}, token=a_token)
        deks.add(body["dek"])
    assert len(deks) == 20


async def test_without_plaintext_only_the_wrapped_key_comes_back(api: API) -> None:
    alice = uid("dk-producer")
    token = await api.store(alice, "x")
    status, body = await api.call("POST", "/api/datakey", {"user_id": alice, "plaintext": False})
    assert status == 200 and set(body) == {"encrypted_dek"}, body
    status, opened = await api.call("POST", "/api/decrypt-dek", {"encrypted_dek": body["encrypted_dek"]}, token=token)
    assert status == 200 and HEX64.match(opened["dek"])
    # It rewraps like any envelope, and still opens to the same key.
    status, again = await api.call("POST", "/api/rewrap", {"encrypted_dek": body["encrypted_dek"]}, token=token)
    assert status == 200 and again["encrypted_dek"] != body["encrypted_dek"]
    assert await api.call("POST", "/api/decrypt-dek", {"encrypted_dek": again["encrypted_dek"]}, token=token) == (
        200, opened)


async def test_refusals(api: API) -> None:
    token = await api.store(uid("dk-ref"), "x")
    for body, status, message in [
        ({}, 400, "user_id or a bearer token is required"),
        ({"plaintext": "no"}, 400, "plaintext must be true or false"),
        ({"plaintext": 0, "user_id": "u"}, 400, "plaintext must be true or false"),
        ({"user_id": "a\nb"}, 400, "user_id"),
        ({"user_id": ""}, 400, "user_id"),
        ({"user_id": ["u"]}, 400, "user_id"),
    ]:
        got, answer = await api.call("POST", "/api/datakey", body)
        assert got == status and message in answer["error"] and "dek" not in answer, (body, got, answer)
    # A bad token is 401 even with a user id; a body that is not an object is 400.
    got, answer = await api.call("POST", "/api/datakey", {"user_id": "u"}, token="garbage")
    assert got == 401 and set(answer) == {"error", "code"}
    got, answer = await api.call("POST", "/api/datakey", raw=b"[1]", token=token)
    assert got == 400
    got, answer = await api.call("GET", "/api/datakey", token=token)
    assert got == 405


async def test_a_data_key_is_audited_without_its_key(daemon_factory: Any, workdir: Path) -> None:
    trail = workdir / f"dk-audit-{uid('t')}" / "audit.jsonl"
    d: Daemon = daemon_factory(extra_env={"KMSD_AUDIT_LOG": str(trail)})
    owner = uid("dk-audited")
    session, api = open_api(d, "unix")
    async with session:
        status, body = await api.call("POST", "/api/datakey", {"user_id": owner})
        assert status == 200
        remember(body["dek"], body["encrypted_dek"])
        assert (await api.call("POST", "/api/datakey", {}))[0] == 400
    d.stop()
    lines = [json.loads(line) for line in trail.read_text().splitlines()]
    mine = [line for line in lines if line.get("operation") == "datakey"]
    assert [(line["subject"], line["outcome"], line["status"]) for line in mine] == [
        (owner, "ok", 200), (None, "bad_request", 400)], mine
    assert body["dek"] not in trail.read_text() and body["encrypted_dek"] not in trail.read_text()
