"""``python -m kmsd_client encrypt|decrypt IN OUT``: documents encrypted in
this process under a data key from kmsd (``kmsd_client.envelope``), for
scripts. The bearer token comes from ``--token-file`` or ``KMSD_TOKEN``
(never from the command line, where ``ps`` would show it). On a terminal
a progress line is drawn on standard error.

Exit status: 0 done, 1 refused (an invalid envelope, kmsd said no),
2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kmsd_client import DEFAULT_SOCKET_PATH, KMSClient, KMSError


def _context(pairs: Sequence[str]) -> dict[str, str] | None:
    context: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"kmsd_client: --context takes NAME=VALUE, got {pair!r}")
        context[name] = value
    return context or None


def _token(path: str | None) -> str | None:
    if path:
        return Path(path).read_text().strip()
    return os.environ.get("KMSD_TOKEN") or None


def _progress(total: int | None) -> Callable[[int], None] | None:
    """A progress line on standard error, at most ten times a second, when
    standard error is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        return None
    last = [0.0]

    def show(done: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.1 and done != total:
            return
        last[0] = now
        mib = done / (1 << 20)
        if total:
            sys.stderr.write(f"\r{mib:10.1f} / {total / (1 << 20):.1f} MiB {100 * done // total:3d}%")
        else:
            sys.stderr.write(f"\r{mib:10.1f} MiB")
        sys.stderr.flush()

    return show


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kmsd_client", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["encrypt", "decrypt"])
    parser.add_argument("source", help="the file to read ('-': standard input)")
    parser.add_argument("target", help="the file to write ('-': standard output)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", help=f"kmsd's Unix socket (default {DEFAULT_SOCKET_PATH})")
    where.add_argument("--url", help="kmsd over TCP, e.g. http://127.0.0.1:8000")
    parser.add_argument("--token-file", help="a file holding the bearer token (else $KMSD_TOKEN)")
    parser.add_argument("--context", action="append", default=[], metavar="NAME=VALUE",
                        help="bound to the document; decrypt checks it (repeatable)")
    parser.add_argument("--user-id", help="encrypt: the data key's owner (default: the token's subject)")
    args = parser.parse_args(argv)

    from kmsd_client.envelope import InvalidEnvelope, decrypt, encrypt

    context = _context(args.context)
    token = _token(args.token_file)
    source = sys.stdin.buffer if args.source == "-" else args.source
    target = sys.stdout.buffer if args.target == "-" else args.target
    try:
        total: int | None = os.path.getsize(args.source) if args.source != "-" else None
    except OSError:
        total = None  # said below, when it is opened
    progress = _progress(total)
    if args.url:
        kms = KMSClient(url=args.url, token=token)
    else:
        kms = KMSClient(args.socket or DEFAULT_SOCKET_PATH, token=token)
    try:
        with kms:
            if args.command == "encrypt":
                encrypt(kms, source, target, context=context, user_id=args.user_id, progress=progress)
            else:
                decrypt(kms, source, target, context=context, progress=progress)
    except (InvalidEnvelope, KMSError) as exc:
        print(f"\nkmsd_client: {args.command} {args.source}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"\nkmsd_client: {args.command}: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 1
    if progress is not None:
        sys.stderr.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
