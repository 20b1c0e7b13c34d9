"""Writes tests/data/envelope-vectors.json, the test vectors of
docs/envelope-format.md: valid blobs of the current version (sealed with a
fixed salt, so that sealing again reproduces them byte for byte), the
version-1 blobs kept from before (read, never written, any more), and
invalid blobs made from a valid one by each kind of tampering.

    .venv/bin/python devtools/envelope_vectors.py
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from kmsd_client.envelope import TAG, VERSION, seal_blob

PATH = Path(__file__).resolve().parent.parent / "tests" / "data" / "envelope-vectors.json"
DEK = bytes(range(32))
SALT = bytes(range(0xA0, 0xB0))
# An opaque wrapped key: only kmsd reads it, the vectors never unwrap it.
EDEK = "AQAAAAdrZXktMTc2NQ=="
VALID = [
    ("empty, no context", b"", {}, 16),
    ("one short segment with a context", b"hello, envelope", {"table": "invoices", "doc": "17"}, 16),
    ("exactly two segments", bytes(range(32)), {"doc": "17"}, 16),
    ("two and a half segments", bytes(range(40)), {}, 16),
]


def _split(blob: bytes, segment_size: int) -> tuple[bytes, list[bytes]]:
    wrapped, ctx = struct.unpack(">HH", blob[57:61])
    n = 61 + wrapped + ctx
    step = segment_size + TAG
    return blob[:n], [blob[i : i + step] for i in range(n, len(blob), step)]


def _invalid(blob: bytes, segment_size: int, context: dict[str, str]) -> list[dict[str, Any]]:
    header, segs = _split(blob, segment_size)

    def flip(data: bytes, at: int) -> bytes:
        return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]

    cases = [
        ("a bit flipped in the second segment", header + segs[0] + flip(segs[1], 3) + b"".join(segs[2:])),
        ("a bit flipped in the salt", flip(blob, 9)),
        ("a bit flipped in the key commitment", flip(blob, 25)),
        ("truncated after the second segment", header + b"".join(segs[:2])),
        ("the first two segments swapped", header + segs[1] + segs[0] + b"".join(segs[2:])),
        ("the second segment dropped", header + segs[0] + b"".join(segs[2:])),
        ("a segment appended after the final one", blob + segs[0]),
        ("version 3", blob[:4] + b"\x03" + blob[5:]),
        ("version 1 in a version-2 header", blob[:4] + b"\x01" + blob[5:]),
        ("not an envelope", b"PK\x03\x04 not kmsd"),
    ]
    out: list[dict[str, Any]] = [{"name": name, "blob": b.hex()} for name, b in cases]
    out.append({"name": "another context expected", "blob": blob.hex(), "expect_context": {**context, "doc": "18"}})
    return out


def vectors() -> dict[str, Any]:
    valid = []
    for name, plaintext, context, segment_size in VALID:
        blob = seal_blob(DEK, EDEK, plaintext, context=context, segment_size=segment_size, salt=SALT)
        valid.append({
            "name": name, "plaintext": plaintext.hex(), "context": context, "segment_size": segment_size,
            "salt": SALT.hex(), "encrypted_dek": EDEK, "blob": blob.hex(),
        })
    tampered = next(v for v in valid if v["name"] == "two and a half segments")
    with_context = next(v for v in valid if v["name"] == "one short segment with a context")
    invalid = _invalid(bytes.fromhex(tampered["blob"]), 16, {})
    invalid[-1] = {"name": "another context expected", "blob": with_context["blob"],
                   "expect_context": {**with_context["context"], "doc": "18"}}
    previous = json.loads(PATH.read_text()) if PATH.exists() else {}
    return {
        "about": f"kmsd client-side envelope, format version {VERSION} (and version 1, read only):"
                 " docs/envelope-format.md",
        "dek": DEK.hex(),
        "valid": valid,
        # Kept as they were written: no code writes version 1 any more.
        "valid_v1": previous.get("valid_v1") or [v for v in previous.get("valid", []) if v["blob"][8:10] == "01"],
        "invalid": invalid,
    }


if __name__ == "__main__":
    PATH.write_text(json.dumps(vectors(), indent=1) + "\n")
    print(f"wrote {PATH}")
