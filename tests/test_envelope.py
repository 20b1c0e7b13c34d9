"""Ciphertext formats: round trips, and every way a blob can be wrong fails
the same way (``InvalidToken``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsd import envelope as env

DATA = Path(__file__).parent / "data"
MK = bytes(range(32))
DEK = bytes(range(32, 64))


def test_record_round_trip() -> None:
    wrapped = env.wrap_dek(MK, "key-1", DEK, "alice", env.Purpose.RECORD)
    assert wrapped[0] == env.V1
    assert env.dek_key_id(wrapped) == "key-1"
    assert env.unwrap_dek(MK, wrapped, "alice", env.Purpose.RECORD) == DEK
    blob = env.encrypt_data(DEK, b"4111 1111 1111 1111", "alice")
    assert env.decrypt_data(DEK, blob, "alice") == b"4111 1111 1111 1111"


@pytest.mark.parametrize(
    "owner, purpose",
    [("bob", env.Purpose.RECORD), ("alice", env.Purpose.ENVELOPE), ("Alice", env.Purpose.RECORD),
     ("alice ", env.Purpose.RECORD)],
)
def test_wrapped_dek_is_bound_to_owner_and_purpose(owner: str, purpose: env.Purpose) -> None:
    wrapped = env.wrap_dek(MK, "key-1", DEK, "alice", env.Purpose.RECORD)
    with pytest.raises(env.InvalidToken):
        env.unwrap_dek(MK, wrapped, owner, purpose)


def test_data_is_bound_to_owner() -> None:
    blob = env.encrypt_data(DEK, b"secret", "alice")
    with pytest.raises(env.InvalidToken):
        env.decrypt_data(DEK, blob, "bob")


def test_master_key_wrap_binds_key_id() -> None:
    kek = os.urandom(32)
    blob = env.wrap_master_key(kek, "key-1", MK)
    assert env.unwrap_master_key(kek, "key-1", blob) == MK
    with pytest.raises(env.InvalidToken):
        env.unwrap_master_key(kek, "key-2", blob)
    with pytest.raises(env.InvalidToken):
        env.unwrap_master_key(os.urandom(32), "key-1", blob)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), owner=st.text(min_size=1, max_size=64), pos=st.integers(0, 10_000),
       flip=st.integers(1, 255))
def test_any_single_byte_change_fails(data: bytes, owner: str, pos: int, flip: int) -> None:
    blob = env.encrypt_data(DEK, data, owner)
    assert env.decrypt_data(DEK, blob, owner) == data
    i = pos % len(blob)
    tampered = blob[:i] + bytes([blob[i] ^ flip]) + blob[i + 1 :]
    with pytest.raises(env.InvalidToken):
        env.decrypt_data(DEK, tampered, owner)
    wrapped = env.wrap_dek(MK, "key-1", DEK, owner, env.Purpose.RECORD)
    j = pos % len(wrapped)
    tampered = wrapped[:j] + bytes([wrapped[j] ^ flip]) + wrapped[j + 1 :]
    with pytest.raises(env.InvalidToken):
        env.unwrap_dek(MK, tampered, owner, env.Purpose.RECORD)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=100), cut=st.integers(1, 200), extra=st.binary(min_size=1, max_size=20))
def test_truncation_and_extension_fail(data: bytes, cut: int, extra: bytes) -> None:
    blob = env.encrypt_data(DEK, data, "u")
    with pytest.raises(env.InvalidToken):
        env.decrypt_data(DEK, blob[: max(0, len(blob) - cut)], "u")
    with pytest.raises(env.InvalidToken):
        env.decrypt_data(DEK, blob + extra, "u")
    wrapped = env.wrap_dek(MK, "key-1", DEK, "u", env.Purpose.RECORD)
    for bad in (wrapped[: max(0, len(wrapped) - cut)], wrapped + extra):
        with pytest.raises(env.InvalidToken):
            env.unwrap_dek(MK, bad, "u", env.Purpose.RECORD)


@pytest.mark.parametrize("version", [0x00, 0x02, 0xFF])
def test_version_swap_fails(version: int) -> None:
    blob = env.encrypt_data(DEK, b"x", "u")
    with pytest.raises(env.InvalidToken):
        env.decrypt_data(DEK, bytes([version]) + blob[1:], "u")
    wrapped = env.wrap_dek(MK, "key-1", DEK, "u", env.Purpose.RECORD)
    with pytest.raises(env.InvalidToken):
        env.unwrap_dek(MK, bytes([version]) + wrapped[1:], "u", env.Purpose.RECORD)


@pytest.mark.parametrize("text", ["!!!!", "YWJj\n", "YWJ", "é"])
def test_bad_base64_is_invalid_token(text: str) -> None:
    with pytest.raises(env.InvalidToken):
        env.b64d(text)


def test_root_key_forms() -> None:
    raw = os.urandom(32)
    hex_key = env.RootKey(raw.hex())
    b64_key = env.RootKey(env.b64e(raw))
    assert not hex_key.is_passphrase and hex_key.kek == b64_key.kek
    phrase = env.RootKey("correct horse battery staple")
    assert phrase.is_passphrase and phrase.kek != hex_key.kek
    assert "redacted" in repr(phrase)
    with pytest.raises(ValueError):
        env.RootKey("  ")


def test_legacy_rows_from_the_original_system_decrypt() -> None:
    sample = json.loads((DATA / "original-system-rows.json").read_text())
    root = env.RootKey(sample["root_key_env"])
    mks = {
        m["key_id"]: env.legacy_decrypt(root.legacy_key, env.b64d(m["key_material"]), layers=1)
        for m in sample["master_keys"]
    }
    assert all(len(k) == 32 for k in mks.values())
    for row in sample["kms_keys"]:
        found = []
        for key_id, mk in mks.items():
            try:
                dek = env.legacy_decrypt(mk, env.b64d(row["encrypted_dek"]))
            except env.InvalidToken:
                continue
            if len(dek) == 32:
                found.append((key_id, dek))
        assert [k for k, _ in found] == [row["wrapped_under"]]
        plain = env.legacy_decrypt(found[0][1], env.b64d(row["encrypted_key"]))
        assert plain.decode() == row["expected_data"]


def test_legacy_wrong_key_fails() -> None:
    sample = json.loads((DATA / "original-system-rows.json").read_text())
    blob = env.b64d(sample["master_keys"][0]["key_material"])
    with pytest.raises(env.InvalidToken):
        env.legacy_decrypt(os.urandom(32), blob, layers=1)
