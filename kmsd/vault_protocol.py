"""The wire protocol between the daemon and its vault process: one small
codec that both sides share. A frame is::

    u32 length | u8 version | u8 op-or-status | u32 request id | fields

where each field is ``u32 length | bytes``. Requests are pipelined: the
daemon may have many in flight and matches answers by request id.

The vault never opens a network socket or the database: the daemon hands it
wrapped key rows and it answers wrap / unwrap / generate / sign requests.
Plaintext master keys and the root key never leave it; plaintext DEKs do,
because the daemon encrypts data with them.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence

__all__ = [
    "BATCHABLE", "LENGTH", "MAX_FRAME", "PROTOCOL_VERSION", "Kind", "Op", "Rewrap", "Status", "decode_body",
    "encode_frame", "flatten", "unflatten",
]

PROTOCOL_VERSION = 1
_HEADER = struct.Struct(">IBBI")
# A frame's length prefix, and each field's.
LENGTH = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024


class Op(enum.IntEnum):
    PING = 1
    LOAD_MASTER_KEYS = 2
    NEW_MASTER_KEY = 3
    NEW_DEK = 4
    WRAP_DEK = 5
    UNWRAP_DEK = 6
    NEW_SIGNING_KEY = 7
    LOAD_SIGNING_KEY = 8
    SIGN_JWT = 9
    REWRAP_MASTER_KEY = 10  # a loaded key, wrapped anew in the v1 format
    REWRAP_DEKS = 11  # many wrapped DEKs, unwrapped and wrapped under the active key
    REKEY = 12  # a key row wrapped under the new root key (root-key rotation)
    REWRAP_DEK = 13  # one wrapped DEK opened as UNWRAP_DEK does, wrapped anew under the active key
    BATCH = 14  # many requests of the ops in BATCHABLE (``flatten``), one answer each, in one round trip


# The ops a BATCH may carry: each item is answered on its own, with its own status.
BATCHABLE = frozenset({Op.NEW_DEK, Op.WRAP_DEK, Op.UNWRAP_DEK, Op.REWRAP_DEK})


class Status(enum.IntEnum):
    OK = 0
    INVALID = 1  # a ciphertext did not authenticate
    UNKNOWN_KEY = 2  # names a master key the vault has not been given
    WRONG_ROOT_KEY = 3  # a master key row does not unwrap under this root key
    BAD_REQUEST = 4
    INTERNAL = 5
    NO_KEY = 6  # no active master key or signing key loaded yet


def encode_frame(op_or_status: int, req_id: int, fields: Sequence[bytes]) -> bytes:
    body = b"".join(LENGTH.pack(len(f)) + f for f in fields)
    return _HEADER.pack(_HEADER.size - 4 + len(body), PROTOCOL_VERSION, op_or_status, req_id) + body


def decode_body(body: bytes) -> tuple[int, int, list[bytes]]:
    """Decode a frame without its length prefix."""
    version, code, req_id = struct.unpack_from(">BBI", body)
    if version != PROTOCOL_VERSION:
        raise ValueError("vault protocol version mismatch")
    return code, req_id, _fields(body, 6)


def flatten(items: Iterable[tuple[int, Sequence[bytes]]]) -> list[bytes]:
    """The fields of a BATCH frame (or of its answer): for each item a
    header field ``u8 op-or-status | u8 count``, then its ``count`` fields.
    Flat, so that a thousand items cost one pass over one frame's fields."""
    out: list[bytes] = []
    for code, fields in items:
        out.append(_HEADS[code][len(fields)])
        out += fields
    return out


def unflatten(fields: list[bytes]) -> list[tuple[int, list[bytes]]]:
    """The items of a BATCH frame's fields; ``ValueError`` if they do not add up."""
    items: list[tuple[int, list[bytes]]] = []
    i, n = 0, len(fields)
    while i < n:
        head = fields[i]
        if len(head) != 2 or i + 1 + head[1] > n:
            raise ValueError("malformed batch")
        items.append((head[0], fields[i + 1 : i + 1 + head[1]]))
        i += 1 + head[1]
    return items


_HEADS = [[bytes([code, count]) for count in range(256)] for code in range(256)]


def _fields(body: bytes, pos: int) -> list[bytes]:
    fields: list[bytes] = []
    while pos < len(body):
        (n,) = LENGTH.unpack_from(body, pos)
        pos += 4
        if pos + n > len(body):
            raise ValueError("truncated field")
        fields.append(body[pos : pos + n])
        pos += n
    return fields


class Rewrap(enum.IntEnum):
    """The outcome of one item of a ``REWRAP_DEKS`` call."""

    OK = 0
    INVALID = 1  # does not unwrap under the key it names
    UNKNOWN_KEY = 2  # names a key the vault does not hold
    LEGACY = 3  # the original system's format: its data must be re-encrypted too


class Kind(enum.IntEnum):
    """How a wrapped DEK opened: bound to its owner for a purpose (the
    values of ``envelope.Purpose``), or with no owner at all."""

    RECORD = 1  # v1, a stored record's DEK, bound to the owner it was opened for
    ENVELOPE = 2  # v1, an envelope bound to that owner
    UNBOUND = 3  # kmsd's unbound layout (the original's contract, no owner)
    ORIGINAL = 4  # the original system's CBC (no owner, no MAC)

    @property
    def unbound(self) -> bool:
        """No owner: any valid token may have it (the original's rule), and
        the data under it is in the original's CBC format."""
        return self in (Kind.UNBOUND, Kind.ORIGINAL)
