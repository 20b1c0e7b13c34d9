"""Raw HTTP/1.1 over a daemon's sockets, for what a client library would
not send (a head a byte at a time, pipelined requests, malformed framing)
or would hide (a connection the daemon closes, its exact bytes)."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import Daemon


async def connect(
    d: Daemon, transport: str, rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to ``d``'s Unix socket or TCP port. ``rcvbuf``: a TCP
    receive buffer that small, for a client whose answers back up."""
    if transport == "unix":
        return await asyncio.open_unix_connection(d.socket)
    if rcvbuf is None:
        return await asyncio.open_connection("127.0.0.1", d.port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Before connect, so that the window the peer sees stays small.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", d.port))
    return await asyncio.open_connection(sock=sock)


def http(method: str, path: str, body: bytes = b"", headers: str = "") -> bytes:
    """One request. ``headers``: raw ``Name: value\\r\\n`` lines; a
    Content-Length is added only for a non-empty ``body``, so that a test
    can frame the body itself (its own length, chunked, none)."""
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}{length}\r\n".encode() + body


async def read_answer(reader: asyncio.StreamReader, timeout: float = 5) -> tuple[int, dict[str, str], Any]:
    """One answer on a kept-alive connection: status, headers (lower-case
    names) and JSON body (None when empty)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), timeout)
    return int(lines[0].split()[1]), headers, json.loads(body) if body else None


async def until_closed(reader: asyncio.StreamReader, timeout: float, answered: asyncio.Event | None = None) -> bytes:
    """Everything the daemon sends until it closes the connection; fails if
    it is still open after ``timeout``. Sets ``answered`` on the first byte."""
    data = b""

    async def drain() -> None:
        nonlocal data
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionError:
                return
            if not chunk:
                return
            data += chunk
            if answered is not None:
                answered.set()

    await asyncio.wait_for(drain(), timeout)
    return data


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True if the daemon closes (or resets) the connection within ``seconds``
    (what it sends meanwhile is read and dropped)."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(1 << 20):
                pass
        return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def parse(raw: bytes) -> tuple[int, Any]:
    """Status and JSON body of a whole answer (as ``until_closed`` returns it)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1."), raw[:200]
    return int(head.split()[1]), json.loads(body)
