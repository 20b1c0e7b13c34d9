"""The envelope routes beyond one plain item: an encryption context bound
into the wrapped DEK (/api/encrypt, /api/datakey, /api/decrypt-dek,
/api/rewrap), and batches of items on all four, each item judged on its
own. Over both listeners, against the real daemon and vault; the audit
lines from a daemon of its own."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import API, Daemon, open_api, remember
from support.ids import uid

DOC = {"table": "documents", "document_id": "42"}


def _value() -> str:
    # A stored value is a secret the logs are searched for: never a plain word.
    return f"stored-{os.urandom(6).hex()}"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


async def _decrypt(api: API, token: str, encrypted_dek: str, context: Any = None) -> tuple[int, Any]:
    body: dict[str, Any] = {"encrypted_dek": encrypted_dek}
    if context is not None:
        body["context"] = context
    return await api.call("POST", "/api/decrypt-dek", body, token=token)


# -- context ---------------------------------------------------------------------------


async def test_a_context_must_be_named_again_exactly_and_in_any_order(api: API) -> None:
    alice = uid("ctx-alice")
    token = await api.store(alice, _value())
    status, key = await api.call("POST", "/api/datakey", {"context": DOC}, token=token)
    assert status == 200, key
    # The same pairs in another order open it.
    reordered = dict(reversed(list(DOC.items())))
    assert await _decrypt(api, token, key["encrypted_dek"], reordered) == (200, {"dek": key["dek"]})
    # No context, another value, a pair more or less, another name: all 422, the same answer.
    for wrong in (None, {}, {**DOC, "document_id": "43"}, {**DOC, "extra": ""}, {"table": "documents"},
                  {"Table": "documents", "document_id": "42"}):
        status, body = await _decrypt(api, token, key["encrypted_dek"], wrong)
        assert (status, body["code"]) == (422, "decryption_failed"), (wrong, body)
    # A key made without a context does not open with one.
    status, plain = await api.call("POST", "/api/datakey", {}, token=token)
    assert (await _decrypt(api, token, plain["encrypted_dek"], DOC))[0] == 422
    assert await _decrypt(api, token, plain["encrypted_dek"], {}) == (200, {"dek": plain["dek"]})


async def test_encrypt_and_rewrap_keep_the_context(api: API) -> None:
    alice, bob = uid("ctx-enc"), uid("ctx-enc-bob")
    token = await api.store(alice, _value())
    bob_token = await api.store(bob, _value())
    dek = os.urandom(32).hex()
    remember(dek)
    status, enc = await api.call(
        "POST", "/api/encrypt", {"data": _b64(b"doc body"), "dek": dek, "context": DOC}, token=token
    )
    assert status == 200, enc
    assert (await _decrypt(api, token, enc["encrypted_dek"]))[0] == 422
    assert await _decrypt(api, token, enc["encrypted_dek"], DOC) == (200, {"dek": dek})
    # Another subject with the right context: still no.
    assert (await _decrypt(api, bob_token, enc["encrypted_dek"], DOC))[0] == 422

    # Rewrapping needs the context, and binds the new one to it too.
    status, body = await api.call("POST", "/api/rewrap", {"encrypted_dek": enc["encrypted_dek"]}, token=token)
    assert (status, body["code"]) == (422, "decryption_failed")
    status, again = await api.call(
        "POST", "/api/rewrap", {"encrypted_dek": enc["encrypted_dek"], "context": DOC}, token=token
    )
    assert status == 200 and again["encrypted_dek"] != enc["encrypted_dek"]
    assert await _decrypt(api, token, again["encrypted_dek"], DOC) == (200, {"dek": dek})
    assert (await _decrypt(api, token, again["encrypted_dek"]))[0] == 422


async def test_a_context_is_validated(api: API) -> None:
    token = await api.store(uid("ctx-bad"), _value())
    too_many = {f"k{n}": "v" for n in range(33)}
    for context, message in [
        ("table=documents", "context must be an object"),
        (["table", "documents"], "context must be an object"),
        ({"n": 1}, "context values must be strings"),
        ({"n": {"nested": "v"}}, "context values must be strings"),
        ({"n" * 257: "v"}, "at most 256 characters"),
        ({"n": "v" * 257}, "at most 256 characters"),
        (too_many, "at most 32 pairs"),
    ]:
        status, body = await api.call("POST", "/api/datakey", {"context": context}, token=token)
        assert status == 400 and message in body["error"], (context, body)
    # The largest allowed context works, and so do names and values that
    # are odd but strings: empty, control characters, lone surrogates (only
    # their digest is bound; audit lines escape them).
    for context in (
        {f"{n:03d}" + "n" * 253: "\U0001f600" * 256 for n in range(32)},
        {"": "", "tab\tname": "line\nbreak", "\ud800": "\udfff"},
    ):
        status, key = await api.call("POST", "/api/datakey", {"context": context}, token=token)
        assert status == 200, key
        assert await _decrypt(api, token, key["encrypted_dek"], context) == (200, {"dek": key["dek"]})
        assert (await _decrypt(api, token, key["encrypted_dek"], {**context, next(iter(context)): "?"}))[0] == 422
    # An unbound envelope (no owner at all) has nothing to bind a context to.
    status, body = await api.call(
        "POST", "/api/encrypt", {"data": _b64(b"x"), "dek": "00" * 32, "context": DOC}
    )
    assert status == 400 and "context binds an envelope with an owner" in body["error"]


# -- batches ------------------------------------------------------------------------------


async def test_a_batch_of_data_keys_then_unwrapped_in_one_batch(api: API) -> None:
    alice = uid("batch-alice")
    token = await api.store(alice, _value())
    items = [{"context": {"doc": str(n)}} for n in range(300)]
    status, made = await api.call("POST", "/api/datakey", {"batch": items}, token=token)
    assert status == 200 and len(made["batch"]) == 300, made
    for entry in made["batch"]:
        remember(entry["dek"])
    assert len({entry["dek"] for entry in made["batch"]}) == 300
    # Unwrapped in one batch, in order; one item with another document's context fails alone.
    ask = [{"encrypted_dek": e["encrypted_dek"], "context": {"doc": str(n)}} for n, e in enumerate(made["batch"])]
    ask[7]["context"] = {"doc": "8"}
    status, opened = await api.call("POST", "/api/decrypt-dek", {"batch": ask}, token=token)
    assert status == 200 and len(opened["batch"]) == 300
    for n, (entry, got) in enumerate(zip(made["batch"], opened["batch"], strict=True)):
        if n == 7:
            assert got == {"error": "decryption failed", "code": "decryption_failed", "status": 422}
        else:
            assert got == {"dek": entry["dek"]}, n


async def test_each_item_of_a_batch_is_judged_on_its_own(api: API) -> None:
    alice, bob = uid("batch-mixed"), uid("batch-mixed-bob")
    token = await api.store(alice, _value())
    bob_token = await api.store(bob, _value())
    status, mine = await api.call("POST", "/api/datakey", {}, token=token)
    status, bobs = await api.call("POST", "/api/datakey", {}, token=bob_token)
    remember(mine["dek"], bobs["dek"])
    items: list[Any] = [
        {"encrypted_dek": mine["encrypted_dek"]},
        {"encrypted_dek": bobs["encrypted_dek"]},  # another subject's
        {"encrypted_dek": "not base64!"},
        {"encrypted_dek": 5},  # not a string
        "not an object",
        {"encrypted_dek": mine["encrypted_dek"], "context": "x"},  # a bad context
        {"encrypted_dek": mine["encrypted_dek"], "user_id": "a\nb"},  # a bad user id
        {},
        {"encrypted_dek": mine["encrypted_dek"]},
    ]
    status, answer = await api.call("POST", "/api/decrypt-dek", {"batch": items}, token=token)
    assert status == 200, answer
    got = answer["batch"]
    assert got[0] == got[8] == {"dek": mine["dek"]}
    assert [e.get("code") for e in got[1:8]] == [
        "decryption_failed", "decryption_failed", "bad_request", "bad_request", "bad_request", "bad_request",
        "bad_request",
    ], got
    assert all(e["status"] in (400, 422) and set(e) == {"error", "code", "status"} for e in got[1:8])

    # encrypt: an item binding to another user id is bound to it; a bad DEK fails alone.
    dek = os.urandom(32).hex()
    remember(dek)
    status, answer = await api.call("POST", "/api/encrypt", {"batch": [
        {"data": _b64(b"a"), "dek": dek},
        {"data": _b64(b"b"), "dek": "zz"},
        {"data": _b64(b"c"), "dek": dek, "user_id": bob, "context": DOC},
    ]}, token=token)
    assert status == 200
    first, bad, for_bob = answer["batch"]
    assert bad["code"] == "bad_request" and "dek" in bad["error"]
    assert await _decrypt(api, token, first["encrypted_dek"]) == (200, {"dek": dek})
    assert await _decrypt(api, bob_token, for_bob["encrypted_dek"], DOC) == (200, {"dek": dek})

    # rewrap: another subject's envelope fails alone.
    status, answer = await api.call("POST", "/api/rewrap", {"batch": [
        {"encrypted_dek": mine["encrypted_dek"]},
        {"encrypted_dek": bobs["encrypted_dek"]},
    ]}, token=token)
    assert status == 200
    renewed, refused = answer["batch"]
    assert refused["code"] == "decryption_failed"
    assert await _decrypt(api, token, renewed["encrypted_dek"]) == (200, {"dek": mine["dek"]})

    # datakey: plaintext false per item.
    status, answer = await api.call("POST", "/api/datakey", {"batch": [
        {"plaintext": False}, {"plaintext": "no"}, {"user_id": bob},
    ]}, token=token)
    assert status == 200
    only_wrapped, bad, for_bob = answer["batch"]
    remember(for_bob["dek"])
    assert set(only_wrapped) == {"encrypted_dek"} and bad["code"] == "bad_request"
    assert await _decrypt(api, bob_token, for_bob["encrypted_dek"]) == (200, {"dek": for_bob["dek"]})


@pytest.mark.parametrize("route", ["/api/encrypt", "/api/decrypt-dek", "/api/datakey", "/api/rewrap"])
async def test_a_batch_request_is_refused_whole_only_for_its_shape(api: API, route: str) -> None:
    token = await api.store(uid("batch-shape"), _value())
    item = {"encrypted_dek": "AAAA"} if route in ("/api/decrypt-dek", "/api/rewrap") else {}
    for body, status, code in [
        ({"batch": []}, 400, "bad_request"),
        ({"batch": {"a": 1}}, 400, "bad_request"),
        ({"batch": None}, 400, "bad_request"),
        ({"batch": [item], "context": DOC}, 400, "bad_request"),
        ({"batch": [item] * 1001}, 413, "too_large"),
    ]:
        got, answer = await api.call("POST", route, body, token=token)
        assert (got, answer["code"]) == (status, code), (route, body if len(str(body)) < 200 else "1001", answer)
    # Exactly the limit is fine: every item answered (here, each refused on its own or served).
    got, answer = await api.call("POST", route, {"batch": [item] * 1000}, token=token)
    assert got == 200 and len(answer["batch"]) == 1000
    if route in ("/api/decrypt-dek", "/api/rewrap"):
        # A batch needs the token as a single request does: 401 whole.
        got, answer = await api.call("POST", route, {"batch": [item]})
        assert got == 401


# -- audit ----------------------------------------------------------------------------------


async def test_the_audit_line_names_the_context_and_counts_a_batch(daemon_factory: Any, workdir: Path) -> None:
    d, trail = _audited_daemon(daemon_factory, workdir, "ctx-audit")
    owner = uid("ctx-audited")
    session, api = open_api(d, "unix")
    async with session:
        token = await api.store(owner, _value())
        status, key = await api.call("POST", "/api/datakey", {"context": DOC}, token=token)
        remember(key["dek"], key["encrypted_dek"])
        assert (await _decrypt(api, token, key["encrypted_dek"], {"document_id": "42", "table": "documents"}))[0] == 200
        assert (await _decrypt(api, token, key["encrypted_dek"]))[0] == 422
        status, batch = await api.call("POST", "/api/decrypt-dek", {"batch": [
            {"encrypted_dek": key["encrypted_dek"], "context": DOC},
            {"encrypted_dek": key["encrypted_dek"], "context": {"doc": "other"}},
            {"encrypted_dek": key["encrypted_dek"]},
        ]}, token=token)
        assert status == 200
        # A long context is shortened in the line (the binding is whole).
        long = {"n" * 100: "v" * 256}
        assert (await api.call("POST", "/api/datakey", {"context": long, "plaintext": False}, token=token))[0] == 200
        # A context no UTF-8 can spell still makes a line the chain holds.
        odd = {"\ud800": "bell\x07"}
        assert (await api.call("POST", "/api/datakey", {"context": odd, "plaintext": False}, token=token))[0] == 200
    d.stop()
    from kmsd.audit import verify_file

    assert verify_file(str(trail)).ok
    text = trail.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    made = next(line for line in lines if line["operation"] == "datakey")
    assert made["subject"] == owner and made["detail"]["context"] == DOC
    decrypts = [line for line in lines if line["operation"] == "decrypt_dek"]
    assert [(line["status"], line.get("detail", {}).get("context")) for line in decrypts[:2]] == [(200, DOC), (422, None)]
    last = decrypts[2]
    assert last["subject"] == owner and last["status"] == 200
    assert last["detail"] == {"batch": 3, "failed": 2, "contexts": [DOC, {"doc": "other"}]}, last
    assert key["dek"] not in text and key["encrypted_dek"] not in text
    assert lines[-1]["detail"] == {"context": odd}, lines[-1]
    assert lines[-2]["detail"] == {"context": {"n" * 63 + "…": "v" * 63 + "…"}}, lines[-2]


# -- one vault round trip per batch ---------------------------------------------------------


def _metric(metrics: bytes, sample: str) -> float:
    """A sample's value in /metrics' text (0 before its first count)."""
    prefix = sample + " "
    return next((float(line[len(prefix):]) for line in metrics.decode().splitlines() if line.startswith(prefix)), 0.0)


def _vault_calls(metrics: bytes, op: str) -> float:
    return _metric(metrics, f'kmsd_vault_call_duration_seconds_count{{op="{op}"}}')


async def test_a_batch_is_one_vault_round_trip(unix_api: API) -> None:
    token = await unix_api.store(uid("batch-trip"), _value())
    status, made = await unix_api.call("POST", "/api/datakey", {"batch": [{}] * 50}, token=token)
    assert status == 200
    ask = {"batch": [{"encrypted_dek": e["encrypted_dek"]} for e in made["batch"]]}
    _, before = await unix_api.call("GET", "/metrics")
    status, opened = await unix_api.call("POST", "/api/decrypt-dek", ask, token=token)
    assert status == 200 and [e["dek"] for e in opened["batch"]] == [e["dek"] for e in made["batch"]]
    _, after = await unix_api.call("GET", "/metrics")
    # Token verification asks the store, never the vault: the batch is the only vault call.
    assert _vault_calls(after, "BATCH") - _vault_calls(before, "BATCH") == 1
    assert _vault_calls(after, "UNWRAP_DEK") == _vault_calls(before, "UNWRAP_DEK")


def test_the_vault_answers_each_batch_item_on_its_own() -> None:
    from kmsd import envelope as env
    from kmsd.vault_process import VaultState
    from kmsd.vault_protocol import Op, Status, flatten, unflatten

    vault = VaultState(env.RootKey(os.urandom(32).hex()))
    vault.handle(Op.NEW_MASTER_KEY, [b"key-1"])
    vault.active = "key-1"
    ctx = env.context_digest(DOC)
    envelope = bytes([env.Purpose.ENVELOPE])
    status, fields = vault.handle(Op.NEW_DEK, [b"alice", envelope, ctx])
    assert status == Status.OK
    dek, wrapped = fields
    items = [
        (Op.UNWRAP_DEK, [b"alice", envelope, wrapped, ctx]),
        (Op.UNWRAP_DEK, [b"alice", envelope, wrapped]),  # no context
        (Op.UNWRAP_DEK, [b"alice"]),  # too few fields: a bug's answer, for it alone
        (Op.UNWRAP_DEK, [b"alice", b"\x09", wrapped]),  # not a purpose
        (Op.LOAD_MASTER_KEYS, [b""]),  # not an op a batch may carry
        (Op.BATCH, []),  # nor a batch in a batch
        (Op.UNWRAP_DEK, [b"alice", envelope, wrapped, ctx]),
    ]
    status, answers = vault.handle(Op.BATCH, flatten(items))
    assert status == Status.OK
    got = unflatten(answers)
    assert [code for code, _ in got] == [
        Status.OK, Status.INVALID, Status.INTERNAL, Status.INTERNAL, Status.BAD_REQUEST, Status.BAD_REQUEST, Status.OK,
    ]
    assert got[0][1] == got[6][1] == [dek, bytes([env.Purpose.ENVELOPE]), b"key-1"]  # what opened it
    assert vault.active == "key-1" and list(vault.master) == ["key-1"] and "key-1" in vault._aeads
    # A key no longer given to the vault (destroyed) leaves no copy in it.
    vault.handle(Op.NEW_MASTER_KEY, [b"key-2"])
    material = vault.materials["key-2"].encode()
    assert vault.handle(Op.LOAD_MASTER_KEYS, [b"key-2", b"key-2", material]) == (Status.OK, [])
    assert list(vault.master) == ["key-2"] and "key-1" not in vault._aeads
    # Fields that do not add up to items: the whole frame is refused, nothing runs.
    assert vault.handle(Op.BATCH, [bytes([Op.UNWRAP_DEK, 3]), b"alice"]) == (Status.BAD_REQUEST, [])
    assert vault.handle(Op.BATCH, [b"\x06"]) == (Status.BAD_REQUEST, [])


# -- a key pending deletion opens nothing ---------------------------------------------------


def _refusals(metrics: bytes, operation: str) -> float:
    return _metric(metrics, f'kmsd_key_pending_deletion_refusals_total{{operation="{operation}"}}')


def _audited_daemon(daemon_factory: Any, workdir: Path, name: str) -> tuple[Daemon, Path]:
    """A daemon of its own whose audit trail the test reads after stopping it."""
    trail = workdir / f"{name}-{uid('t')}" / "audit.jsonl"
    return daemon_factory(extra_env={"KMSD_AUDIT_LOG": str(trail)}), trail


async def test_a_key_pending_deletion_refuses_to_unwrap_until_cancelled(daemon_factory: Any, workdir: Path) -> None:
    d, trail = _audited_daemon(daemon_factory, workdir, "pending-audit")
    alice = uid("pending-alice")
    session, api = open_api(d, "unix")
    async with session:
        token = await api.store(alice, "a record under the first key")
        status, old = await api.call("POST", "/api/datakey", {"context": DOC}, token=token)
        first = (await api.call("GET", "/api/master-keys"))[1]["active_key_id"]
        assert (await api.call("POST", "/api/master-keys", {"description": "second"}))[0] == 200
        status, new = await api.call("POST", "/api/datakey", {}, token=token)
        status, body = await api.call("POST", f"/api/master-keys/{first}/schedule-deletion", {"days": 7})
        assert status == 200, body
        _, before = await api.call("GET", "/metrics")

        refusal = {"error": "the master key of this ciphertext is scheduled for deletion",
                   "code": "key_pending_deletion", "key_id": first}
        assert await _decrypt(api, token, old["encrypted_dek"], DOC) == (409, refusal)
        assert await api.call("GET", "/api/keys", token=token) == (409, refusal)
        status, body = await api.call(
            "POST", "/api/rewrap", {"encrypted_dek": old["encrypted_dek"], "context": DOC}, token=token
        )
        assert (status, body) == (409, refusal)
        # In a batch, only the item under that key.
        status, body = await api.call("POST", "/api/decrypt-dek", {"batch": [
            {"encrypted_dek": new["encrypted_dek"]}, {"encrypted_dek": old["encrypted_dek"], "context": DOC},
        ]}, token=token)
        assert status == 200 and body["batch"] == [{"dek": new["dek"]}, {**refusal, "status": 409}]
        # Even with the wrong context: the key is refused before anything is opened.
        assert (await _decrypt(api, token, old["encrypted_dek"]))[0] == 409
        # Nothing new is wrapped under it (it is retired), and other keys work.
        assert await _decrypt(api, token, new["encrypted_dek"]) == (200, {"dek": new["dek"]})

        _, after = await api.call("GET", "/metrics")
        assert _refusals(after, "decrypt_dek") - _refusals(before, "decrypt_dek") == 3
        assert _refusals(after, "fetch") - _refusals(before, "fetch") == 1
        assert _refusals(after, "rewrap") - _refusals(before, "rewrap") == 1

        # Cancelled: usable again at once.
        assert (await api.call("POST", f"/api/master-keys/{first}/cancel-deletion"))[0] == 200
        assert await _decrypt(api, token, old["encrypted_dek"], DOC) == (200, {"dek": old["dek"]})
        assert await api.call("GET", "/api/keys", token=token) == (200, {"data": "a record under the first key"})
    d.stop()
    lines = [json.loads(line) for line in trail.read_text().splitlines()]
    refused = [line for line in lines if line["status"] == 409]
    assert [(line["operation"], line["subject"], line["detail"].get("key_id")) for line in refused] == [
        ("decrypt_dek", alice, first), ("fetch", alice, first), ("rewrap", alice, first),
        ("decrypt_dek", alice, first),
    ], refused
    batch = next(line for line in lines if line.get("detail", {}).get("batch") == 2)
    assert batch["detail"]["key_ids"] == [first] and batch["detail"]["failed"] == 1
