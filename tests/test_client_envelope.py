"""kmsd_client.envelope: documents encrypted in the client under a data key
from kmsd. Round trips at the segment boundaries, every kind of tampering
refused, key commitment, the context, files written only when whole, the
real daemon over both listeners, and a 1 GiB stream in flat memory."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest
from conftest import Daemon, remember

from kmsd_client import DecryptionFailed, KMSClient
from kmsd_client.envelope import (
    InvalidEnvelope,
    canonical_context,
    decrypt,
    encrypt,
    open_blob,
    open_stream,
    read_header,
    seal_blob,
    seal_stream,
)

SEG = 64
DEK = bytes(range(32))
EDEK = "d3JhcHBlZC1kZWstZm9yLXRlc3Rz"  # any ASCII: the wrapped key is opaque here
TAG = 16


def header_length(blob: bytes) -> int:
    wrapped, ctx = struct.unpack(">HH", blob[57:61])
    return 61 + wrapped + ctx


def segments(blob: bytes) -> tuple[bytes, list[bytes]]:
    n = header_length(blob)
    body = blob[n:]
    return blob[:n], [body[i:i + SEG + TAG] for i in range(0, len(body), SEG + TAG)] or [b""]


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 3 * SEG, 3 * SEG + 5])
def test_round_trips_at_every_segment_boundary(size: int) -> None:
    plaintext = os.urandom(size)
    blob = seal_blob(DEK, EDEK, plaintext, segment_size=SEG, context={"doc": "7"})
    assert open_blob(DEK, blob) == plaintext
    assert open_blob(DEK, blob, context={"doc": "7"}) == plaintext
    # Exactly ceil(size / SEG) segments, one (empty) for nothing at all.
    _, segs = segments(blob)
    assert len(segs) == max(1, -(-size // SEG)), (size, len(segs))
    assert len(blob) == header_length(blob) + size + TAG * len(segs)


def test_every_kind_of_tampering_is_refused() -> None:
    plaintext = os.urandom(5 * SEG + 10)
    blob = seal_blob(DEK, EDEK, plaintext, segment_size=SEG, context={"table": "invoices", "id": "42"})
    header, segs = segments(blob)
    assert len(segs) == 6
    bad: list[bytes] = []
    # Any flipped bit, anywhere (one per byte, the bit moving along).
    for i in range(len(blob)):
        flipped = bytearray(blob)
        flipped[i] ^= 1 << (i % 8)
        bad.append(bytes(flipped))
    for i in range(len(segs)):
        bad.append(header + b"".join(segs[:i] + segs[i + 1:]))  # dropped
        bad.append(header + b"".join(segs[:i + 1] + [segs[i]] + segs[i + 1:]))  # duplicated
        if i + 1 < len(segs):
            swapped = segs[:i] + [segs[i + 1], segs[i]] + segs[i + 2:]
            bad.append(header + b"".join(swapped))  # reordered
    # Truncated at every segment boundary, inside the header, and mid-segment.
    bad += [header + b"".join(segs[:i]) for i in range(len(segs))]
    bad += [blob[:n] for n in (0, 3, 10, 60, len(header) - 1)]
    bad += [blob[:-1], blob[: len(header) + SEG // 2]]
    # Extended: another segment, or garbage, after the final one.
    bad += [blob + segs[-1], blob + b"\0" * (SEG + TAG), blob + b"x"]
    # Another context, re-encoded so the header still parses.
    bad.append(_with_context(blob, {"table": "invoices", "id": "43"}))
    bad.append(_with_context(blob, {}))
    for candidate in bad:
        with pytest.raises(InvalidEnvelope):
            open_blob(DEK, candidate)
    assert len(bad) > len(blob)
    # The right blob under the wrong key fails at the key commitment, and
    # the right blob with another expected context fails too.
    with pytest.raises(InvalidEnvelope):
        open_blob(bytes(32), blob)
    with pytest.raises(InvalidEnvelope):
        open_blob(DEK, blob, context={"table": "invoices", "id": "43"})
    assert open_blob(DEK, blob, context={"id": "42", "table": "invoices"}) == plaintext


def _with_context(blob: bytes, context: dict[str, str]) -> bytes:
    n = header_length(blob)
    wrapped_len, ctx_len = struct.unpack(">HH", blob[57:61])
    ctx = canonical_context(context)
    fixed = blob[:57] + struct.pack(">HH", wrapped_len, len(ctx))
    return fixed + blob[61:61 + wrapped_len] + ctx + blob[n:]


def test_the_documented_vectors(tmp_path: Path) -> None:
    """docs/envelope-format.md's vectors: the valid one opens to its
    plaintext, and every invalid one is refused."""
    vectors = json.loads((Path(__file__).parent / "data" / "envelope-vectors.json").read_text())
    dek = bytes.fromhex(vectors["dek"])
    valid = vectors["valid"]
    for v in valid:
        blob = bytes.fromhex(v["blob"])
        assert open_blob(dek, blob, context=v["context"]) == bytes.fromhex(v["plaintext"])
        again = seal_blob(dek, v["encrypted_dek"], bytes.fromhex(v["plaintext"]), context=v["context"],
                          segment_size=v["segment_size"], salt=bytes.fromhex(v["salt"]))
        assert again == blob, "the format changed: the vectors no longer match"
    # Version 1 (its key bound to no context by kmsd) is still read.
    assert len(vectors["valid_v1"]) == 4
    for v in vectors["valid_v1"]:
        assert open_blob(dek, bytes.fromhex(v["blob"]), context=v["context"]) == bytes.fromhex(v["plaintext"])
    for v in vectors["invalid"]:
        with pytest.raises(InvalidEnvelope):
            open_blob(dek, bytes.fromhex(v["blob"]), context=v.get("expect_context"))


@pytest.fixture(params=["unix", "tcp"])
def kms(request: pytest.FixtureRequest, shared_daemon: Daemon) -> KMSClient:
    return KMSClient(shared_daemon.socket) if request.param == "unix" else KMSClient(url=shared_daemon.url)


def test_documents_through_the_daemon(kms: KMSClient, tmp_path: Path) -> None:
    owner, other = f"env-{uuid.uuid4().hex[:10]}", f"env-{uuid.uuid4().hex[:10]}"
    with kms:
        token, other_token = kms.store(owner, "x"), kms.store(other, "y")
        remember(token, other_token)
        document = os.urandom(3 * 4096 + 17)
        blob = encrypt(kms, document, token=token, context={"doc": "a"}, segment_size=4096)
        assert isinstance(blob, bytes) and document not in blob
        assert decrypt(kms, blob, token=token) == document
        assert decrypt(kms, io.BytesIO(blob), token=token, context={"doc": "a"}) == document
        with pytest.raises(InvalidEnvelope):
            decrypt(kms, blob, token=token, context={"doc": "b"})
        # A header rewritten to carry another context: kmsd bound the data
        # key to the first one and does not unwrap it.
        with pytest.raises(DecryptionFailed):
            decrypt(kms, _with_context(blob, {"doc": "b"}), token=token)
        with pytest.raises(DecryptionFailed):
            kms.decrypt_dek(read_header(io.BytesIO(blob).read)[4], token=token)
        # Another subject's token: kmsd refuses to unwrap the data key.
        with pytest.raises(DecryptionFailed):
            decrypt(kms, blob, token=other_token)
        # For another owner: the producer cannot read it back, the owner can.
        for_other = encrypt(kms, document, user_id=other, token=token)
        assert isinstance(for_other, bytes)
        with pytest.raises(DecryptionFailed):
            decrypt(kms, for_other, token=token)
        assert decrypt(kms, for_other, token=other_token) == document
        # Another blob's wrapped key in this header: its key does not commit.
        mine = seal_blob(DEK, EDEK, b"")  # only to find the header's layout
        assert header_length(mine) == 61 + len(EDEK)
        # Bound to no context, it gets no key from kmsd under this header's;
        # bound to the same context, kmsd unwraps it and the commitment fails.
        with pytest.raises(DecryptionFailed):
            decrypt(kms, _swap_wrapped_key(blob, for_other), token=other_token)
        same_context = encrypt(kms, document, user_id=other, token=token, context={"doc": "a"})
        assert isinstance(same_context, bytes)
        with pytest.raises(InvalidEnvelope):
            decrypt(kms, _swap_wrapped_key(blob, same_context), token=other_token)

        # Files: path to path; a tampered blob leaves no output behind.
        source, sealed, opened = tmp_path / "doc.bin", tmp_path / "doc.kmse", tmp_path / "doc.out"
        source.write_bytes(document)
        assert encrypt(kms, source, sealed, token=token) is None
        assert decrypt(kms, sealed, opened, token=token) is None
        assert opened.read_bytes() == document
        opened.unlink()
        data = bytearray(sealed.read_bytes())
        data[-1] ^= 1
        sealed.write_bytes(bytes(data))
        with pytest.raises(InvalidEnvelope):
            decrypt(kms, sealed, opened, token=token)
        assert not opened.exists() and not list(tmp_path.glob("*.part"))


def test_a_version_1_blob_still_decrypts_and_a_downgrade_does_not(
    kms: KMSClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 1 blobs (written before kmsd bound the context to the key)
    are unwrapped without a context; a version-2 blob relabelled as
    version 1 gets no key (its key is bound to its context) and would not
    authenticate anyway (the header is the segments' associated data)."""
    import kmsd_client.envelope as envelope

    owner = f"env-v1-{uuid.uuid4().hex[:10]}"
    with kms:
        token = kms.store(owner, f"v1-{uuid.uuid4().hex}")
        remember(token)
        document = os.urandom(5000)
        dek, wrapped = kms.datakey(token=token)  # as the version-1 client asked: no context
        assert dek is not None
        with monkeypatch.context() as m:
            m.setattr(envelope, "VERSION", 1)
            old = seal_blob(dek, wrapped, document, context={"doc": "a"}, segment_size=1024)
        assert old[4] == 1
        assert decrypt(kms, old, token=token, context={"doc": "a"}) == document
        new = encrypt(kms, document, token=token, context={"doc": "a"}, segment_size=1024)
        assert isinstance(new, bytes) and new[4] == 2
        with pytest.raises(DecryptionFailed):
            decrypt(kms, new[:4] + b"\x01" + new[5:], token=token)


def _swap_wrapped_key(blob: bytes, donor: bytes) -> bytes:
    n, d = header_length(blob), header_length(donor)
    wrapped_len, ctx_len = struct.unpack(">HH", blob[57:61])
    donor_len, _ = struct.unpack(">HH", donor[57:61])
    fixed = blob[:57] + struct.pack(">HH", donor_len, ctx_len)
    return fixed + donor[61:61 + donor_len] + blob[61 + wrapped_len:n] + blob[n:] if d else blob


class _Zeros:
    """A large stream read in chunks, never held whole."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.block = os.urandom(1 << 20)

    def read(self, n: int) -> bytes:
        n = min(n, self.left)
        self.left -= n
        if n == len(self.block):
            return self.block
        return (self.block * (n // len(self.block) + 1))[:n]


def test_a_1_gib_stream_in_flat_memory(tmp_path: Path) -> None:
    size = 1 << 30
    sealed = tmp_path / "big.kmse"
    digest_in = hashlib.sha256()
    source = _Zeros(size)

    def read(n: int) -> bytes:
        chunk = source.read(n)
        digest_in.update(chunk)
        return chunk

    tracemalloc.start()
    try:
        started = time.perf_counter()
        with open(sealed, "wb") as fh:
            seal_stream(DEK, EDEK, read, fh.write)
        sealed_s = time.perf_counter() - started
        _, peak_seal = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        digest_out = hashlib.sha256()
        started = time.perf_counter()
        with open(sealed, "rb") as fh:
            open_stream(DEK, fh.read, digest_out.update)
        opened_s = time.perf_counter() - started
        _, peak_open = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest_out.digest() == digest_in.digest()
    assert sealed.stat().st_size == header_length(sealed.read_bytes()[:200]) + size + TAG * (size >> 20)
    print(f"\n1 GiB: sealed in {sealed_s:.1f}s ({size / sealed_s / 1e6:.0f} MB/s), opened in {opened_s:.1f}s"
          f" ({size / opened_s / 1e6:.0f} MB/s); peak Python memory {peak_seal >> 20} / {peak_open >> 20} MiB")
    # A few 1 MiB segments in flight, never the stream.
    assert peak_seal < 16 << 20 and peak_open < 16 << 20, (peak_seal, peak_open)


def test_bad_arguments_say_so() -> None:
    with pytest.raises(ValueError, match="segment_size"):
        seal_blob(DEK, EDEK, b"x", segment_size=8)
    with pytest.raises(ValueError, match="32 bytes"):
        seal_blob(b"short", EDEK, b"x")
    with pytest.raises(ValueError, match="strings"):
        seal_blob(DEK, EDEK, b"x", context={"n": 1})  # type: ignore[dict-item]
