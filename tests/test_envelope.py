"""Ciphertext formats: round trips, and every way a blob can be wrong fails
the same way (``InvalidToken``).

Each format kmsd reads gets the same properties: round trip, any
single-byte change, truncation, extension and version swap: v1 records
(data), v1 wrapped DEKs (both purposes), unbound wrapped DEKs (version
0x02, no owner), v1 master-key wraps, and the
original system's rows (read only; no version byte and no MAC, so only
what its layout guarantees is asserted). Hypothesis runs derandomized and
without an example database, so CI runs are reproducible."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsd import envelope as env

DATA = Path(__file__).parent / "data"
MK = bytes(range(32))
DEK = bytes(range(32, 64))
# Reproducible in CI: no random seed, nothing written to .hypothesis/.
PROPERTY = settings(deadline=None, derandomize=True, database=None)
# Purposes with an owner; Purpose.UNBOUND has none and a version of its own.
purposes = st.sampled_from([env.Purpose.RECORD, env.Purpose.ENVELOPE])
other_versions = st.integers(0, 255).filter(lambda v: v != env.V1)
key_ids = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=env.MAX_KEY_ID)


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


def test_unbound_dek_has_no_owner_and_its_own_version() -> None:
    unbound = env.wrap_dek(MK, "key-1", DEK, "", env.Purpose.UNBOUND)
    assert unbound[0] == env.UNBOUND and env.is_unbound_dek(unbound)
    assert env.dek_key_id(unbound) == "key-1"
    assert env.unwrap_dek(MK, unbound, "", env.Purpose.UNBOUND) == DEK
    with pytest.raises(ValueError):
        env.wrap_dek(MK, "key-1", DEK, "alice", env.Purpose.UNBOUND)
    bound = env.wrap_dek(MK, "key-1", DEK, "", env.Purpose.ENVELOPE)
    assert not env.is_unbound_dek(bound)
    # Neither opens as the other, even with its version byte swapped in.
    for purpose in env.Purpose:
        if purpose != env.Purpose.UNBOUND:
            for blob in (unbound, bytes([env.V1]) + unbound[1:]):
                with pytest.raises(env.InvalidToken):
                    env.unwrap_dek(MK, blob, "", purpose)
    for blob in (bound, bytes([env.UNBOUND]) + bound[1:]):
        with pytest.raises(env.InvalidToken):
            env.unwrap_dek(MK, blob, "", env.Purpose.UNBOUND)


def test_legacy_encrypt_is_the_originals_layout() -> None:
    for n in (0, 1, 15, 16, 17, 100):
        blob = env.legacy_encrypt(DEK, b"d" * n)
        assert len(blob) == 16 + 16 * (n // 16 + 1) + 16
        assert env.legacy_decrypt(DEK, blob) == b"d" * n


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


def _flip(blob: bytes, pos: int, flip: int) -> bytes:
    i = pos % len(blob)
    return blob[:i] + bytes([blob[i] ^ flip]) + blob[i + 1 :]


@settings(PROPERTY, max_examples=200)
@given(data=st.binary(max_size=300), owner=st.text(min_size=1, max_size=64), pos=st.integers(0, 10_000),
       flip=st.integers(1, 255), purpose=purposes, key_id=key_ids)
def test_any_single_byte_change_fails(
    data: bytes, owner: str, pos: int, flip: int, purpose: env.Purpose, key_id: str
) -> None:
    blob = env.encrypt_data(DEK, data, owner)
    assert env.decrypt_data(DEK, blob, owner) == data
    with pytest.raises(env.InvalidToken):
        env.decrypt_data(DEK, _flip(blob, pos, flip), owner)
    wrapped = env.wrap_dek(MK, key_id, DEK, owner, purpose)
    assert env.dek_key_id(wrapped) == key_id
    assert env.unwrap_dek(MK, wrapped, owner, purpose) == DEK
    with pytest.raises(env.InvalidToken):
        env.unwrap_dek(MK, _flip(wrapped, pos, flip), owner, purpose)
    unbound = env.wrap_dek(MK, key_id, DEK, "", env.Purpose.UNBOUND)
    with pytest.raises(env.InvalidToken):
        env.unwrap_dek(MK, _flip(unbound, pos, flip), "", env.Purpose.UNBOUND)
    kek = bytes(reversed(MK))
    sealed = env.wrap_master_key(kek, key_id, MK)
    assert env.unwrap_master_key(kek, key_id, sealed) == MK
    with pytest.raises(env.InvalidToken):
        env.unwrap_master_key(kek, key_id, _flip(sealed, pos, flip))


@settings(PROPERTY, max_examples=100)
@given(data=st.binary(max_size=100), cut=st.integers(1, 200), extra=st.binary(min_size=1, max_size=20),
       purpose=purposes)
def test_truncation_and_extension_fail(data: bytes, cut: int, extra: bytes, purpose: env.Purpose) -> None:
    blob = env.encrypt_data(DEK, data, "u")
    with pytest.raises(env.InvalidToken):
        env.decrypt_data(DEK, blob[: max(0, len(blob) - cut)], "u")
    with pytest.raises(env.InvalidToken):
        env.decrypt_data(DEK, blob + extra, "u")
    wrapped = env.wrap_dek(MK, "key-1", DEK, "u", purpose)
    for bad in (wrapped[: max(0, len(wrapped) - cut)], wrapped + extra):
        with pytest.raises(env.InvalidToken):
            env.unwrap_dek(MK, bad, "u", purpose)
    unbound = env.wrap_dek(MK, "key-1", DEK, "", env.Purpose.UNBOUND)
    for bad in (unbound[: max(0, len(unbound) - cut)], unbound + extra):
        with pytest.raises(env.InvalidToken):
            env.unwrap_dek(MK, bad, "", env.Purpose.UNBOUND)
    kek = bytes(reversed(MK))
    sealed = env.wrap_master_key(kek, "key-1", MK)
    for bad in (sealed[: max(0, len(sealed) - cut)], sealed + extra):
        with pytest.raises(env.InvalidToken):
            env.unwrap_master_key(kek, "key-1", bad)


@settings(PROPERTY, max_examples=100)
@given(version=other_versions, purpose=purposes)
def test_version_swap_fails(version: int, purpose: env.Purpose) -> None:
    blob = env.encrypt_data(DEK, b"x", "u")
    with pytest.raises(env.InvalidToken):
        env.decrypt_data(DEK, bytes([version]) + blob[1:], "u")
    wrapped = env.wrap_dek(MK, "key-1", DEK, "u", purpose)
    if version != env.UNBOUND:
        with pytest.raises(env.InvalidToken):
            env.dek_key_id(bytes([version]) + wrapped[1:])
    with pytest.raises(env.InvalidToken):
        env.unwrap_dek(MK, bytes([version]) + wrapped[1:], "u", purpose)
    unbound = env.wrap_dek(MK, "key-1", DEK, "", env.Purpose.UNBOUND)
    if version != env.UNBOUND:
        with pytest.raises(env.InvalidToken):
            env.unwrap_dek(MK, bytes([version]) + unbound[1:], "", env.Purpose.UNBOUND)
    kek = bytes(reversed(MK))
    sealed = env.wrap_master_key(kek, "key-1", MK)
    with pytest.raises(env.InvalidToken):
        env.unwrap_master_key(kek, "key-1", bytes([version]) + sealed[1:])


# -- the original system's rows (docs/legacy-format.md) ---------------------------------
#
# IV || AES-256-CBC, no version byte, no MAC. ``legacy`` builds rows as the
# original wrote them: master keys with one 16 x 0x10 block after the key,
# DEKs and data with a PKCS#7 pad and then that full block.

LEGACY_KINDS = {
    # kind: (layers, plaintext strategy)
    "master_key": (1, st.binary(min_size=32, max_size=32)),
    "encrypted_dek": (2, st.binary(min_size=32, max_size=32)),
    "encrypted_key": (2, st.binary(max_size=100)),
}


def legacy(key: bytes, plaintext: bytes, layers: int) -> bytes:
    padded = plaintext
    if layers == 2:
        padder = padding.PKCS7(128).padder()
        padded = padder.update(padded) + padder.finalize()
    padded += b"\x10" * 16
    iv = os.urandom(16)
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return iv + encryptor.update(padded) + encryptor.finalize()


@st.composite
def legacy_rows(draw: st.DrawFn) -> tuple[int, bytes, bytes]:
    layers, plaintexts = LEGACY_KINDS[draw(st.sampled_from(sorted(LEGACY_KINDS)))]
    plain = draw(plaintexts)
    return layers, plain, legacy(MK, plain, layers)


@settings(PROPERTY, max_examples=200)
@given(row=legacy_rows(), pos=st.integers(0, 10_000), flip=st.integers(1, 255))
def test_legacy_round_trip_and_single_byte_changes(row: tuple[int, bytes, bytes], pos: int, flip: int) -> None:
    layers, plain, blob = row
    assert env.legacy_decrypt(MK, blob, layers=layers) == plain
    if layers == 1:
        assert len(blob) == env.LEGACY_MASTER_KEY_SIZE and env.is_legacy_master_key(env.b64e(blob))
    # Without a MAC, a change before the last two blocks gives other
    # plaintext (which is why these rows are only read, and rewrapped into
    # v1); it never gives back the original. A change in the last two
    # blocks breaks the final 16 x 0x10 block, so it always fails.
    tampered = _flip(blob, pos, flip)
    try:
        assert env.legacy_decrypt(MK, tampered, layers=layers) != plain
    except env.InvalidToken:
        pass
    with pytest.raises(env.InvalidToken):
        env.legacy_decrypt(MK, _flip(blob, len(blob) - 32 + pos % 32, flip), layers=layers)


@settings(PROPERTY, max_examples=200)
@given(row=legacy_rows(), cut=st.integers(1, 200), extra=st.binary(min_size=1, max_size=40))
def test_legacy_truncation_and_extension_fail(row: tuple[int, bytes, bytes], cut: int, extra: bytes) -> None:
    layers, _, blob = row
    # Cut or extended by any length, whole blocks included: the final block
    # is then no longer the 16 x 0x10 block (or the length is not whole blocks).
    for bad in (blob[: max(0, len(blob) - cut)], blob + extra):
        with pytest.raises(env.InvalidToken):
            env.legacy_decrypt(MK, bad, layers=layers)


@settings(PROPERTY, max_examples=200)
@given(row=legacy_rows(), purpose=purposes, key_id=key_ids, data=st.binary(max_size=100))
def test_legacy_and_v1_are_never_confused(
    row: tuple[int, bytes, bytes], purpose: env.Purpose, key_id: str, data: bytes
) -> None:
    """The version swap of the legacy format: it has no version byte, so a
    v1 blob must not read as a legacy row, nor a legacy row as v1."""
    layers, _, blob = row
    kek = bytes(reversed(MK))
    for v1 in (env.encrypt_data(MK, data, "u"), env.wrap_dek(MK, key_id, DEK, "u", purpose),
               env.wrap_master_key(MK, key_id, DEK)):
        with pytest.raises(env.InvalidToken):
            env.legacy_decrypt(MK, v1, layers=layers)
    assert not env.is_legacy_master_key(env.b64e(env.wrap_master_key(kek, key_id, MK)))
    with pytest.raises(env.InvalidToken):
        env.decrypt_data(MK, blob, "u")
    with pytest.raises(env.InvalidToken):
        env.unwrap_dek(MK, blob, "u", purpose)
    with pytest.raises(env.InvalidToken):
        env.unwrap_master_key(MK, key_id, blob)


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
