"""Client-side document encryption: kmsd makes and wraps the data key, the
document is encrypted here and never leaves the application's process.

``encrypt(kms, document)`` asks kmsd for a data key (``POST /api/datakey``),
encrypts locally and returns (or writes) one self-describing blob holding
the wrapped key, the context and the ciphertext. ``decrypt(kms, blob)``
has kmsd unwrap the key for the caller's token and reverses it. Both stream:
memory stays flat (a few segments) for files of any size.

The format (version 2; ``docs/envelope-format.md`` has it byte by byte, with
test vectors): a header, then the plaintext in fixed-size segments, each
AES-256-GCM under a key derived from the data key and a per-blob salt, with
its index and a final-segment flag in the nonce and a digest of the header
as associated data, so segments cannot be reordered, dropped, duplicated or
truncated, nor the header changed, unnoticed. The header carries a key
commitment (also derived from the data key and salt): a blob opens under
one data key only. Every way a blob can be wrong raises the same
``InvalidEnvelope``, as cryptography's Fernet does, so nothing leaks through
the message.

Needs ``cryptography`` (the ``kmsd-client[crypto]`` extra); the rest of
kmsd_client does not.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from kmsd_client import KMSClient

__all__ = ["DEFAULT_SEGMENT_SIZE", "InvalidEnvelope", "decrypt", "encrypt", "open_blob", "seal_blob"]

MAGIC = b"KMSE"
# 2: the wrapped key is bound to the context by kmsd too. 1 (the same
# layout; its key bound to no context) is still read.
VERSION = 2
_READABLE = frozenset({1, 2})
DEFAULT_SEGMENT_SIZE = 1 << 20
MIN_SEGMENT_SIZE = 16
MAX_SEGMENT_SIZE = 1 << 24
TAG = 16
SALT = 16
# The header's fixed part: magic, version, segment size, salt, commitment,
# then the lengths of the wrapped key and of the context.
_FIXED = struct.Struct(">4sBI16s32sHH")
_MAX_SEGMENTS = 1 << 32
_KEY_INFO = b"kmsd envelope v1 segment key"
_COMMIT_INFO = b"kmsd envelope v1 key commitment"

Source = bytes | bytearray | memoryview | BinaryIO | str | os.PathLike[str]
Sink = BinaryIO | str | os.PathLike[str]


class InvalidEnvelope(ValueError):
    """The blob is not a well-formed, authentic envelope for this key and
    context: tampered with, truncated, extended, another blob's key, the
    wrong context, or not an envelope at all. Deliberately says no more.
    (Not a KMSError: kmsd never answers it, it is found here.)"""

    def __init__(self) -> None:
        super().__init__("invalid envelope")


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    except ImportError:  # pragma: no cover - depends on the installation
        raise ImportError(
            "kmsd_client.envelope needs the 'cryptography' package: pip install 'kmsd-client[crypto]'"
        ) from None
    return hashes, AESGCM, HKDF


def canonical_context(context: Mapping[str, str] | None) -> bytes:
    """The context as the blob stores it: JSON with sorted keys, no spaces,
    UTF-8, so that the same pairs in any order are the same bytes."""
    if not context:
        return b""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in context.items()):
        raise ValueError("context must map strings to strings")
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _derive(dek: bytes, salt: bytes) -> tuple[Any, bytes]:
    """(the segments' AEAD, the key commitment) for this data key and salt."""
    hashes, aesgcm, hkdf = _crypto()
    key = hkdf(algorithm=hashes.SHA256(), length=32, salt=salt, info=_KEY_INFO).derive(dek)
    commitment = hkdf(algorithm=hashes.SHA256(), length=32, salt=salt, info=_COMMIT_INFO).derive(dek)
    return aesgcm(key), commitment


def _nonce(index: int, last: bool) -> bytes:
    # A key is used for one blob only (a fresh salt each time), so the
    # segment's position makes a unique nonce.
    return struct.pack(">IB7x", index, 1 if last else 0)


def _header_digest(header: bytes) -> bytes:
    return hashlib.sha256(header).digest()


def _chunks(read: Callable[[int], bytes], size: int) -> Iterator[tuple[bytes, bool]]:
    """(chunk, is_last) of exactly ``size`` bytes each, the last one
    possibly shorter (or empty when there was nothing at all)."""
    current = _read_full(read, size)
    while True:
        following = _read_full(read, size) if len(current) == size else b""
        yield current, not following
        if not following:
            return
        current = following


def _read_full(read: Callable[[int], bytes], size: int) -> bytes:
    parts: list[bytes] = []
    wanted = size
    while wanted:
        part = read(wanted)
        if not part:
            break
        parts.append(part)
        wanted -= len(part)
    return b"".join(parts)


def seal_stream(
    dek: bytes,
    encrypted_dek: str,
    read: Callable[[int], bytes],
    write: Callable[[bytes], Any],
    *,
    context: Mapping[str, str] | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    salt: bytes | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Encrypt what ``read`` gives under ``dek`` into ``write``. ``salt`` is
    for test vectors only: leave it out."""
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise ValueError(f"segment_size must be between {MIN_SEGMENT_SIZE} and {MAX_SEGMENT_SIZE}")
    if len(dek) != 32:
        raise ValueError("a data key is 32 bytes")
    salt = os.urandom(SALT) if salt is None else salt
    aead, commitment = _derive(dek, salt)
    wrapped, ctx = encrypted_dek.encode("ascii"), canonical_context(context)
    if len(wrapped) > 0xFFFF or len(ctx) > 0xFFFF:
        raise ValueError("the wrapped key and the context must each fit in 65535 bytes")
    header = _FIXED.pack(MAGIC, VERSION, segment_size, salt, commitment, len(wrapped), len(ctx)) + wrapped + ctx
    write(header)
    aad = _header_digest(header)
    done = 0
    for index, (chunk, last) in enumerate(_chunks(read, segment_size)):
        if index >= _MAX_SEGMENTS:
            raise ValueError("too many segments for one envelope: use a larger segment_size")
        write(aead.encrypt(_nonce(index, last), chunk, aad))
        done += len(chunk)
        if progress is not None:
            progress(done)


def read_header(read: Callable[[int], bytes]) -> tuple[bytes, int, bytes, bytes, str, dict[str, str]]:
    """(header bytes, segment size, salt, commitment, encrypted_dek, context)."""
    fixed = _read_full(read, _FIXED.size)
    if len(fixed) != _FIXED.size:
        raise InvalidEnvelope()
    magic, version, segment_size, salt, commitment, wrapped_len, ctx_len = _FIXED.unpack(fixed)
    if magic != MAGIC or version not in _READABLE or not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise InvalidEnvelope()
    rest = _read_full(read, wrapped_len + ctx_len)
    if len(rest) != wrapped_len + ctx_len:
        raise InvalidEnvelope()
    try:
        encrypted_dek = rest[:wrapped_len].decode("ascii")
        context = json.loads(rest[wrapped_len:]) if ctx_len else {}
    except (UnicodeDecodeError, ValueError):
        raise InvalidEnvelope() from None
    if not isinstance(context, dict) or canonical_context(context) != rest[wrapped_len:]:
        raise InvalidEnvelope()
    return fixed + rest, segment_size, salt, commitment, encrypted_dek, context


def open_stream(
    dek: bytes,
    read: Callable[[int], bytes],
    write: Callable[[bytes], Any],
    *,
    header: tuple[bytes, int, bytes, bytes, str, dict[str, str]] | None = None,
    context: Mapping[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Decrypt a blob from ``read`` into ``write``, segment by segment, each
    authenticated before it is written. A stream cut short raises
    ``InvalidEnvelope`` after the segments before the cut were written:
    ``decrypt`` to a path writes a temporary file and keeps it only whole."""
    raw, segment_size, salt, commitment, _, stored = header or read_header(read)
    if context is not None and canonical_context(context) != canonical_context(stored):
        raise InvalidEnvelope()
    from cryptography.exceptions import InvalidTag

    aead, expected = _derive(dek, salt)
    if not hmac.compare_digest(expected, commitment):
        raise InvalidEnvelope()
    aad = _header_digest(raw)
    done = 0
    for index, (chunk, last) in enumerate(_chunks(read, segment_size + TAG)):
        if len(chunk) < TAG or index >= _MAX_SEGMENTS:
            raise InvalidEnvelope()
        try:
            plain = aead.decrypt(_nonce(index, last), chunk, aad)
        except InvalidTag:
            raise InvalidEnvelope() from None
        write(plain)
        done += len(plain)
        if progress is not None:
            progress(done)


def seal_blob(dek: bytes, encrypted_dek: str, plaintext: bytes, **kw: Any) -> bytes:
    """The envelope of ``plaintext`` under a data key already at hand."""
    out = io.BytesIO()
    seal_stream(dek, encrypted_dek, io.BytesIO(plaintext).read, out.write, **kw)
    return out.getvalue()


def open_blob(dek: bytes, blob: bytes, *, context: Mapping[str, str] | None = None) -> bytes:
    """The plaintext of a blob under a data key already at hand."""
    out = io.BytesIO()
    open_stream(dek, io.BytesIO(blob).read, out.write, context=context)
    return out.getvalue()


# -- with kmsd -------------------------------------------------------------------------


def _reader(source: Source) -> tuple[Callable[[int], bytes], Callable[[], None]]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source)).read, lambda: None
    if isinstance(source, (str, os.PathLike)):
        fh = open(source, "rb")  # noqa: SIM115 - closed by the caller through the second value
        return fh.read, fh.close
    return source.read, lambda: None


@contextlib.contextmanager
def _writer(out: Sink | None, *, whole_only: bool = False) -> Iterator[tuple[Callable[[bytes], Any], io.BytesIO]]:
    """(write, buffer): into ``buffer`` when ``out`` is None, else into
    ``out`` (a file object, or a path opened here). ``whole_only``: a path
    is written as ``PATH.part`` and renamed only if the block succeeds."""
    buffer = io.BytesIO()
    if out is None:
        yield buffer.write, buffer
    elif isinstance(out, (str, os.PathLike)):
        target = Path(out)
        partial = target.with_name(target.name + ".part") if whole_only else target
        try:
            with open(partial, "wb") as fh:
                yield fh.write, buffer
            if whole_only:
                partial.replace(target)
        finally:
            if whole_only:
                partial.unlink(missing_ok=True)
    else:
        yield out.write, buffer


def encrypt(
    kms: KMSClient,
    source: Source,
    out: Sink | None = None,
    *,
    context: Mapping[str, str] | None = None,
    token: str | None = None,
    user_id: str | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    progress: Callable[[int], None] | None = None,
) -> bytes | None:
    """Encrypt a document (bytes, a binary file object, or a path) under a
    new data key from kmsd, bound to ``user_id`` (else the token's subject).
    Returns the blob, or writes it to ``out`` (a file object or a path) and
    returns None. The plaintext data key is dropped when this returns.
    ``context`` is bound twice: into the wrapped key by kmsd (which unwraps
    it only given the same context) and into every segment here."""
    dek, encrypted_dek = kms.datakey(user_id=user_id, token=token, context=context)
    assert dek is not None
    read, close = _reader(source)
    try:
        with _writer(out) as (write, buffer):
            seal_stream(dek, encrypted_dek, read, write, context=context, segment_size=segment_size,
                        progress=progress)
    finally:
        close()
    return buffer.getvalue() if out is None else None


def decrypt(
    kms: KMSClient,
    source: Source,
    out: Sink | None = None,
    *,
    context: Mapping[str, str] | None = None,
    token: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> bytes | None:
    """Decrypt a blob (bytes, a binary file object, or a path): kmsd unwraps
    its data key for the token's subject. ``context``: the context the blob
    must carry (any order); None accepts the one it carries. Returns the
    plaintext, or writes it to ``out`` and returns None; to a path, only a
    whole, authentic plaintext is ever left there."""
    read, close = _reader(source)
    try:
        header = read_header(read)
        # The context the header carries is the one kmsd bound the key to
        # (from version 2): a header given another one gets no key (and its
        # segments would not authenticate either).
        bound = header[5] if header[0][4] >= 2 else None
        dek = kms.decrypt_dek(header[4], token=token, context=bound)
        with _writer(out, whole_only=True) as (write, buffer):
            open_stream(dek, read, write, header=header, context=context, progress=progress)
    finally:
        close()
    return buffer.getvalue() if out is None else None
