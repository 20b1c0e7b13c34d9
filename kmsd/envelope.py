"""Ciphertext formats (docs/architecture.md, "Formats") and root-key derivation.

Every ciphertext is self-describing: a version byte first. v1 uses
AES-256-GCM with a 96-bit random nonce, and binds everything that gives the
ciphertext its meaning (version, purpose, master-key id, owner) as associated
data, so a blob moved to another row, owner or purpose fails to decrypt.

Like Fernet, every way a ciphertext can be wrong (bad base64, wrong version,
short, bad tag, other owner) raises the same bare ``InvalidToken``.

    wrapped master key  v1: 0x01 | nonce(12) | GCM(mk)            aad: "kmsd/mk/v1" | key_id
    wrapped DEK         v1: 0x01 | len(key_id) | key_id | nonce(12) | GCM(dek)
                                                            aad: "kmsd/dek/v1" | purpose | key_id | owner [| context]
    unbound wrapped DEK     0x02 | len(key_id) | key_id | nonce(12) | GCM(dek)
                                                            aad: "kmsd/dek/v1" | UNBOUND | key_id | "" [| context]
    data                v1: 0x01 | nonce(12) | GCM(data)          aad: "kmsd/data/v1" | owner

A wrapped DEK's encryption context (the caller's name/value pairs, as
``context_digest``) is a fifth part of its associated data when there is
one, and is not stored in the blob: whoever unwraps must name the same
context. With none, the associated data is the four parts it always was, so
every DEK wrapped before contexts existed still opens.

The legacy (original system) format is AES-256-CBC with the IV first, no MAC,
and PKCS#7 padding applied twice (docs/legacy-format.md). kmsd reads it, and
writes it in one place only: the ``encrypted_key`` of an unbound envelope,
which the original's clients decrypt themselves with their own DEK.

An unbound wrapped DEK has no owner (the original's ``/api/encrypt``
contract: any valid token may unwrap it). It gets its own version byte so
that the daemon can tell it apart without the vault (``unbound_envelopes =
"refuse"``, the rewrap of rows written through it); the purpose in the
associated data keeps the two versions from being swapped into each other.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import hashlib
import json
import os
import struct
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

__all__ = [
    "InvalidToken",
    "Purpose",
    "UNBOUND",
    "RootKey",
    "V1",
    "b64d",
    "b64e",
    "context_digest",
    "decrypt_data",
    "dek_key_id",
    "encrypt_data",
    "is_unbound_dek",
    "legacy_decrypt",
    "legacy_encrypt",
    "is_legacy_master_key",
    "LEGACY_MASTER_KEY_SIZE",
    "unwrap_dek",
    "unwrap_master_key",
    "wrap_dek",
    "wrap_master_key",
]

V1 = 0x01
UNBOUND = 0x02  # the version byte of an unbound wrapped DEK
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
MAX_KEY_ID = 64


class InvalidToken(Exception):
    """The ciphertext is not valid. Deliberately says nothing more."""


class Purpose(enum.IntEnum):
    """What a wrapped DEK is for: a DEK wrapped for one purpose does not
    unwrap for another (a record's DEK cannot be fished out of
    ``/api/decrypt-dek``)."""

    RECORD = 1  # kms_keys rows written by POST /api/keys
    ENVELOPE = 2  # DEKs wrapped for callers by POST /api/encrypt, bound to an owner
    UNBOUND = 3  # DEKs wrapped by POST /api/encrypt without an owner (the original's contract)


def b64e(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def b64d(text: str) -> bytes:
    """Strict standard base64; anything else is ``InvalidToken``."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise InvalidToken from None


def _lp(*parts: bytes) -> bytes:
    """Length-prefixed concatenation, so that no two different tuples of
    parts give the same associated data."""
    return b"".join(struct.pack(">H", len(p)) + p for p in parts)


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
    nonce = os.urandom(NONCE_SIZE)
    return nonce, AESGCM(key).encrypt(nonce, plaintext, aad)


def _open(key: bytes | AESGCM, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return (key if isinstance(key, AESGCM) else AESGCM(key)).decrypt(nonce, ciphertext, aad)
    except (InvalidTag, ValueError):
        raise InvalidToken from None


# -- root key ------------------------------------------------------------------

_HKDF_INFO = b"kmsd/root-key/kek/v1"
_SCRYPT_SALT = b"kmsd/root-key/passphrase/v1"


class RootKey:
    """The root key as configured, and the keys derived from it.

    A root key that is 32 bytes in hex or base64 is a real key and the KEK is
    derived with HKDF. Anything else is a passphrase (the original system
    accepted any string): the KEK is then derived with scrypt, and
    ``is_passphrase`` tells the vault to warn.
    """

    __slots__ = ("kek", "legacy_key", "is_passphrase")

    def __init__(self, text: str) -> None:
        text = text.strip()
        if not text:
            raise ValueError("empty root key")
        raw = _parse_key_text(text)
        self.is_passphrase = raw is None
        if raw is not None:
            self.kek = HKDF(hashes.SHA256(), KEY_SIZE, salt=None, info=_HKDF_INFO).derive(raw)
        else:
            self.kek = Scrypt(salt=_SCRYPT_SALT, length=KEY_SIZE, n=2**15, r=8, p=1).derive(
                text.encode("utf-8")
            )
        # The original system keyed master-key wrapping with SHA-256 of the string.
        self.legacy_key = hashlib.sha256(text.encode("utf-8")).digest()

    def __repr__(self) -> str:
        return "<RootKey redacted>"


def _parse_key_text(text: str) -> bytes | None:
    if len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    if len(text) == 44:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(raw) == KEY_SIZE:
            return raw
    return None


# -- master keys ---------------------------------------------------------------


def wrap_master_key(kek: bytes, key_id: str, mk: bytes) -> bytes:
    nonce, ct = _seal(kek, mk, _lp(b"kmsd/mk/v1", key_id.encode()))
    return bytes([V1]) + nonce + ct


# The original system's master-key rows (docs/legacy-format.md): IV + two CBC
# blocks. A v1 row is 61 bytes, so the length tells the two apart.
LEGACY_MASTER_KEY_SIZE = 64


def is_legacy_master_key(material: str) -> bool:
    try:
        return len(b64d(material)) == LEGACY_MASTER_KEY_SIZE
    except InvalidToken:
        return False


def unwrap_master_key(kek: bytes, key_id: str, blob: bytes) -> bytes:
    if len(blob) != 1 + NONCE_SIZE + KEY_SIZE + TAG_SIZE or blob[0] != V1:
        raise InvalidToken
    return _open(kek, blob[1:13], blob[13:], _lp(b"kmsd/mk/v1", key_id.encode()))


# -- data keys -----------------------------------------------------------------


def context_digest(context: Mapping[str, str] | None) -> bytes:
    """What a wrapped DEK binds of its encryption context: SHA-256 of its
    canonical form (JSON with sorted names, no spaces, ASCII with \\u
    escapes, so that any string a JSON body can hold has one spelling); b""
    for none. A digest, so the associated data has one size whatever the
    context's."""
    if not context:
        return b""
    return hashlib.sha256(b"kmsd/context/v1" + _CANONICAL.encode(dict(context)).encode("ascii")).digest()


# Made once: json.dumps with options builds an encoder at every call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _dek_aad(purpose: Purpose, key_id: bytes, owner: str, context: bytes) -> bytes:
    prefix = _dek_aad_prefix(purpose, key_id, owner)
    return prefix + _lp(context) if context else prefix


@functools.lru_cache(maxsize=1024)
def _dek_aad_prefix(purpose: Purpose, key_id: bytes, owner: str) -> bytes:
    # The same for every DEK of one owner under one key: a batch of a
    # thousand builds it once.
    return _lp(b"kmsd/dek/v1", bytes([purpose]), key_id, owner.encode("utf-8"))


def _dek_version(purpose: Purpose) -> int:
    return UNBOUND if purpose == Purpose.UNBOUND else V1


def wrap_dek(mk: bytes, key_id: str, dek: bytes, owner: str, purpose: Purpose, context: bytes = b"") -> bytes:
    """An unbound DEK (``Purpose.UNBOUND``) has no owner: ``owner`` must be "".
    ``context``: a ``context_digest``, bound as associated data."""
    kid = key_id.encode()
    if not 0 < len(kid) <= MAX_KEY_ID or len(dek) != KEY_SIZE:
        raise ValueError("bad key id or DEK size")
    if purpose == Purpose.UNBOUND and owner:
        raise ValueError("an unbound DEK has no owner")
    nonce, ct = _seal(mk, dek, _dek_aad(purpose, kid, owner, context))
    return bytes([_dek_version(purpose), len(kid)]) + kid + nonce + ct


def is_unbound_dek(blob: bytes) -> bool:
    """Whether a wrapped DEK is in the unbound layout (not whether it is valid)."""
    return len(blob) > 1 and blob[0] == UNBOUND


def dek_key_id(blob: bytes) -> str:
    """The id of the master key a v1 (or unbound) wrapped DEK names."""
    if len(blob) < 2 or blob[0] not in (V1, UNBOUND):
        raise InvalidToken
    n = blob[1]
    if n == 0 or len(blob) != 2 + n + NONCE_SIZE + KEY_SIZE + TAG_SIZE:
        raise InvalidToken
    try:
        return blob[2 : 2 + n].decode("ascii")
    except UnicodeDecodeError:
        raise InvalidToken from None


def unwrap_dek(mk: bytes | AESGCM, blob: bytes, owner: str, purpose: Purpose, context: bytes = b"") -> bytes:
    """``mk``: the master key, or an ``AESGCM`` of it made once (the vault's)."""
    kid = dek_key_id(blob).encode()
    if blob[0] != _dek_version(purpose):
        raise InvalidToken
    body = blob[2 + len(kid) :]
    return _open(mk, body[:NONCE_SIZE], body[NONCE_SIZE:], _dek_aad(purpose, kid, owner, context))


# -- data ----------------------------------------------------------------------


def _data_aad(owner: str) -> bytes:
    return _lp(b"kmsd/data/v1", owner.encode("utf-8"))


def encrypt_data(dek: bytes, plaintext: bytes, owner: str) -> bytes:
    nonce, ct = _seal(dek, plaintext, _data_aad(owner))
    return bytes([V1]) + nonce + ct


def decrypt_data(dek: bytes, blob: bytes, owner: str) -> bytes:
    if len(blob) < 1 + NONCE_SIZE + TAG_SIZE or blob[0] != V1:
        raise InvalidToken
    return _open(dek, blob[1:13], blob[13:], _data_aad(owner))


# -- legacy (the original system's CBC) ------------------------------------------


def legacy_encrypt(key: bytes, plaintext: bytes) -> bytes:
    """What the original's ``/api/encrypt`` answered as ``encrypted_key``: a
    random IV, then AES-256-CBC of the data padded twice (its own PKCS#7
    pad, then the library's, a full block of 0x10). No MAC: only for the
    unbound envelopes of the original's clients, under their own DEK."""
    if len(key) != KEY_SIZE:
        raise ValueError("bad key size")
    for _ in range(2):
        padder = padding.PKCS7(128).padder()
        plaintext = padder.update(plaintext) + padder.finalize()
    iv = os.urandom(16)
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return iv + encryptor.update(plaintext) + encryptor.finalize()


def legacy_decrypt(key: bytes, blob: bytes, *, layers: int = 2) -> bytes:
    """AES-256-CBC with the IV first and ``layers`` strict PKCS#7 pads.

    The original padded twice (its own pad, then the library's), so the
    first unpad must remove a full block of 0x10: that and a strict second
    unpad make a wrong key practically always fail here.
    """
    if len(blob) < 32 or len(blob) % 16:
        raise InvalidToken
    decryptor = Cipher(algorithms.AES(key), modes.CBC(blob[:16])).decryptor()
    plain = decryptor.update(blob[16:]) + decryptor.finalize()
    if plain[-16:] != b"\x10" * 16:
        raise InvalidToken
    plain = plain[:-16]
    for _ in range(layers - 1):
        unpadder = padding.PKCS7(128).unpadder()
        try:
            plain = unpadder.update(plain) + unpadder.finalize()
        except ValueError:
            raise InvalidToken from None
    return plain
