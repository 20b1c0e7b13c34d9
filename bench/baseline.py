#!/usr/bin/env python3
"""The HTTP stack alone: a bare aiohttp app on uvloop that answers the
routes the benchmark uses with fixed small JSON bodies, on a Unix socket and
on loopback TCP, with the same server settings kmsd uses (AppRunner,
no access log). bench/run measures it at the same concurrencies and at the
same moment as kmsd, so kmsd's throughput can be read as a fraction of what
aiohttp itself does on this machine.

  POST /api/keys  -> {"message": "Key stored successfully", "access_token": <fixed, JWT-sized>}
                     (the request body is read, not parsed)
  GET  /api/keys  -> {"data": "test-data-0000"}
  POST /api/datakey -> {"dek": <64 hex digits>, "encrypted_dek": <fixed, kmsd's size>}
  POST /api/decrypt-dek -> {"dek": ...}, or for {"batch": [...]} one {"dek": ...}
                     per item (the items are counted in the raw body, not parsed)
  GET  /readyz    -> {"ready": true}

  python bench/baseline.py --socket /tmp/base.sock --listen 127.0.0.1:18500

Runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys

import uvloop
from aiohttp import web

# About the size of kmsd's EdDSA JWT, so both answers move the same bytes.
FAKE_TOKEN = "eyJhbGciOiJFZERTQSJ9." + "A" * 260 + "." + "B" * 86
POST_BODY = json.dumps({"message": "Key stored successfully", "access_token": FAKE_TOKEN}).encode()
GET_BODY = json.dumps({"data": "test-data-0000"}).encode()
READY_BODY = b'{"ready": true}'
# kmsd's answers are compact JSON; so are these, of the same sizes.
FAKE_DEK = "0123456789abcdef" * 4
FAKE_WRAPPED = "ARFrZXktMTc5NjQ4NjI4ODU3NN" + "A" * 76 + "=="  # a wrapped DEK is 104 characters
DATAKEY_BODY = json.dumps({"dek": FAKE_DEK, "encrypted_dek": FAKE_WRAPPED}, separators=(",", ":")).encode()
DEK_ENTRY = json.dumps({"dek": FAKE_DEK}, separators=(",", ":")).encode()
_batch_bodies: dict[int, bytes] = {}


def batch_body(n: int) -> bytes:
    """{"batch": [n × {"dek": ...}]}, built once per n."""
    body = _batch_bodies.get(n)
    if body is None:
        body = _batch_bodies[n] = b'{"batch":[' + b",".join([DEK_ENTRY] * n) + b"]}"
    return body


async def post_keys(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=POST_BODY, content_type="application/json")


async def get_keys(request: web.Request) -> web.Response:
    return web.Response(body=GET_BODY, content_type="application/json")


async def post_datakey(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=DATAKEY_BODY, content_type="application/json")


async def post_decrypt_dek(request: web.Request) -> web.Response:
    raw = await request.read()
    if raw.lstrip().startswith(b'{"batch"'):
        return web.Response(body=batch_body(raw.count(b'"encrypted_dek"')), content_type="application/json")
    return web.Response(body=DEK_ENTRY, content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    return web.Response(body=READY_BODY, content_type="application/json")


def make_app() -> web.Application:
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/api/keys", post_keys)
    app.router.add_get("/api/keys", get_keys)
    app.router.add_post("/api/datakey", post_datakey)
    app.router.add_post("/api/decrypt-dek", post_decrypt_dek)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/healthz", readyz)
    return app


async def serve(socket_path: str | None, listens: list[tuple[str, int]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(make_app(), access_log=None, handle_signals=False, shutdown_timeout=5)
    await runner.setup()
    try:
        if socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path)
            await web.UnixSite(runner, socket_path).start()
        for host, port in listens:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        print(f"baseline listening on {[socket_path] + [f'{h}:{p}' for h, p in listens]}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", help="Unix socket path")
    p.add_argument("--listen", action="append", default=[], metavar="HOST:PORT", help="TCP listener (repeatable)")
    args = p.parse_args(argv)
    listens = []
    for value in args.listen:
        host, _, port = value.rpartition(":")
        listens.append((host.strip("[]"), int(port)))
    if not args.socket and not listens:
        p.error("give --socket and/or --listen")
    uvloop.run(serve(args.socket, listens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
