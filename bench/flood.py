"""A flood of invalid bearer tokens over TCP, for the "read-flood" point of
bench/runner.py: while it runs, a legitimate client reads over the Unix
socket, and the point shows how much of its unloaded rate it keeps.

Each of --connections keeps one keep-alive connection busy: it sends
GET /api/keys with a well-formed but unsigned token, reads the answer (401,
then 429 once kmsd's invalid_token_rate is spent, after which kmsd stops
reading the connection until Retry-After), and sends again; a connection
the daemon closes is opened anew. On SIGTERM (or after --duration) it
prints what it sent and what came back, as JSON.

  python bench/flood.py --tcp 127.0.0.1:8000 --connections 32 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import sys
import time

BOGUS = "eyJhbGciOiJFZERTQSIsImtpZCI6InNpZy1ib2d1cyJ9.eyJzdWIiOiJmbG9vZCJ9." + "A" * 86
REQUEST = (
    "GET /api/keys HTTP/1.1\r\nHost: localhost\r\n"
    f"Authorization: Bearer {BOGUS}\r\n\r\n"
).encode()


async def one(host: str, port: int, statuses: collections.Counter[str], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            statuses["connect_error"] += 1
            await asyncio.sleep(0.05)
            continue
        try:
            while not stop.is_set():
                writer.write(REQUEST)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                statuses[head.split()[1].decode()] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            statuses["closed"] += 1
        finally:
            writer.close()


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tcp", required=True, metavar="HOST:PORT")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--duration", type=float, default=600.0, help="upper bound, seconds (default 600)")
    args = p.parse_args(argv)
    host, _, port = args.tcp.rpartition(":")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.call_later(args.duration, stop.set)
    statuses: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    tasks = [asyncio.create_task(one(host, int(port), statuses, stop)) for _ in range(args.connections)]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    seconds = time.monotonic() - started
    answered = sum(n for k, n in statuses.items() if k.isdigit())
    json.dump({"connections": args.connections, "seconds": round(seconds, 2), "answers": dict(statuses),
               "answers_per_s": round(answered / seconds, 1) if seconds else 0.0}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
