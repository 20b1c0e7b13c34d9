#!/usr/bin/env python3
"""Client-side envelope throughput: kmsd_client.envelope sealing and opening
one large document against a running daemon (which only makes and unwraps
the data key: one request each way; the rest is this process).

Four cases, each timed on its own, plaintext megabytes (10^6 bytes) per
second of wall time:

  disk seal     encrypt(kms, PLAIN, BLOB): a file in --dir to a file in --dir
  disk open     decrypt(kms, BLOB, OUT): the same back (OUT.part, renamed
                when whole), then OUT compared with PLAIN byte for byte
  memory seal   encrypt from an in-memory reader into /dev/null
  memory open   decrypt from the blob held in memory into /dev/null

The disk cases start with their input evicted from the page cache
(fsync, then posix_fadvise DONTNEED on that file only), so they read from
the device; their output goes to the page cache, and the fsync that puts it
on the device is timed apart ("with fsync"). The memory cases are the
envelope's own speed; the difference is the disk's. --profile runs the
memory cases once more under cProfile and keeps the functions that took the
most time.

  python bench/envelope_bench.py --unix /tmp/k.sock --size-mib 1024 --dir /tmp --json out.json

Only a Unix socket is accepted as the daemon's address.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kmsd_client import KMSClient
from kmsd_client.envelope import DEFAULT_SEGMENT_SIZE, decrypt, encrypt

MIB = 1 << 20
BLOCK = 16 * MIB
CONTEXT = {"table": "bench", "id": "1"}


class PatternReader:
    """``size`` bytes of a 16 MiB random block, repeated: ``read(n)``
    returns a new bytes object of n bytes, as a BytesIO would, without
    holding the whole document in memory."""

    def __init__(self, block: bytes, size: int) -> None:
        self.block = block
        self.left = size
        self.offset = 0

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        if n <= 0:
            return b""
        if n > len(self.block):  # never with the envelope's segments (at most 16 MiB)
            out = (self.block * (n // len(self.block) + 1))[:n]
        else:
            if self.offset + n > len(self.block):
                self.offset = 0
            out = self.block[self.offset:self.offset + n]
            self.offset += n
        self.left -= n
        return out


def evict(path: Path) -> float:
    """fsync the file, then drop its pages (only its own) from the page
    cache; the seconds the fsync took."""
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.perf_counter()
        os.fsync(fd)
        took = time.perf_counter() - t
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return took


def timed(fn: Callable[[], Any], size: int) -> dict[str, Any]:
    """Wall time, and this process's CPU time in user space and in the
    kernel (page-cache copies and allocation show there)."""
    t, c = time.perf_counter(), os.times()
    fn()
    wall, c1 = time.perf_counter() - t, os.times()
    return {"bytes": size, "wall_s": round(wall, 3), "cpu_user_s": round(c1.user - c.user, 3),
            "cpu_sys_s": round(c1.system - c.system, 3), "mb_s": round(size / wall / 1e6, 1)}


def with_fsync(r: dict[str, Any], path: Path) -> None:
    r["fsync_s"] = round(evict(path), 3)
    r["mb_s_with_fsync"] = round(r["bytes"] / (r["wall_s"] + r["fsync_s"]) / 1e6, 1)


def same_files(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(BLOCK), fb.read(BLOCK)
            if x != y:
                return False
            if not x:
                return True


def top_functions(profile: cProfile.Profile, n: int = 8) -> list[dict[str, Any]]:
    """The n functions with the most time of their own, and their share."""
    stats = pstats.Stats(profile)
    total = sum(v[2] for v in stats.stats.values()) or 1.0  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]  # type: ignore[attr-defined]
    out = []
    for (filename, line, name), (_, calls, tottime, cumtime, _) in rows:
        if line:
            function = f"{Path(filename).name}:{line}({name})"
        else:  # a builtin: "<method 'encrypt' of '...AESGCM' objects>" -> "AESGCM.encrypt"
            m = re.fullmatch(r"<method '(\w+)' of '([\w.]+)' objects>", name)
            function = f"{m[2].rsplit('.', 1)[-1]}.{m[1]}" if m else name.removeprefix("<built-in method ").rstrip(">")
        out.append({"function": function, "calls": calls, "tottime_s": round(tottime, 3),
                    "cumtime_s": round(cumtime, 3), "share": round(tottime / total, 3)})
    return out


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    size = args.size_mib * MIB
    block = os.urandom(BLOCK)
    plain, blob, out = work / "plain.bin", work / "plain.kmse", work / "plain.out"
    doc: dict[str, Any] = {"size_mib": args.size_mib, "segment_size": args.segment_size, "dir": str(work),
                           "context": CONTEXT}
    with KMSClient(args.unix) as kms:
        token = kms.store(f"envelope-{secrets.token_hex(4)}", "envelope bench")

        def seal(source: Any, sink: Any) -> None:
            encrypt(kms, source, sink, context=CONTEXT, token=token, segment_size=args.segment_size)

        def unseal(source: Any, sink: Any) -> None:
            decrypt(kms, source, sink, context=CONTEXT, token=token)

        # The plaintext file, and how fast this directory takes a plain write.
        t = time.perf_counter()
        with open(plain, "wb") as fh:
            reader = PatternReader(block, size)
            while chunk := reader.read(BLOCK):
                fh.write(chunk)
        written = time.perf_counter() - t
        flushed = evict(plain)
        doc["plain_write"] = {"mb_s": round(size / written / 1e6, 1),
                              "mb_s_with_fsync": round(size / (written + flushed) / 1e6, 1)}
        try:
            r = doc["disk_seal"] = timed(lambda: seal(plain, blob), size)
            with_fsync(r, blob)
            r["blob_bytes"] = blob.stat().st_size
            evict(plain)  # the seal read it back into the cache
            r = doc["disk_open"] = timed(lambda: unseal(blob, out), size)
            with_fsync(r, out)
            doc["identical"] = same_files(plain, out)
            out.unlink()
            plain.unlink()
            with open(os.devnull, "wb") as null:
                doc["memory_seal"] = timed(lambda: seal(PatternReader(block, size), null), size)
                sealed = blob.read_bytes()
                blob.unlink()
                doc["memory_open"] = timed(lambda: unseal(sealed, null), size)
                if args.profile:
                    doc["profile"] = {}
                    for name, fn in (("seal", lambda: seal(PatternReader(block, size), null)),
                                     ("open", lambda: unseal(sealed, null))):
                        prof = cProfile.Profile()
                        prof.runcall(fn)
                        doc["profile"][name] = top_functions(prof)
                sealed = b""  # free the blob before the files are removed
        finally:
            for path in (plain, blob, out, out.with_name(out.name + ".part")):
                path.unlink(missing_ok=True)
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unix", metavar="PATH", required=True, help="the daemon's Unix socket")
    p.add_argument("--size-mib", type=int, default=1024, help="document size in MiB (default 1024)")
    p.add_argument("--dir", help="where the files go (default: a new temporary directory)")
    p.add_argument("--segment-size", type=int, default=DEFAULT_SEGMENT_SIZE, help="envelope segment size, bytes")
    p.add_argument("--profile", action="store_true", help="profile the memory cases once more (cProfile)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = p.parse_args(argv)
    if args.size_mib < 1:
        p.error("--size-mib must be >= 1")
    with tempfile.TemporaryDirectory(prefix="envelope-", dir=args.dir) as work:
        doc = run(args, Path(work))
    line = ", ".join(f"{k} {doc[k]['mb_s']:.0f} MB/s" for k in ("disk_seal", "disk_open", "memory_seal", "memory_open"))
    print(f"{args.size_mib} MiB: {line}; identical after open: {doc['identical']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
    return 0 if doc["identical"] else 3


if __name__ == "__main__":
    sys.exit(main())
