"""HTTP/1.1 framing for ``AsyncKMSClient``, without I/O: a request to bytes,
a response head from bytes, and how its body is delimited.

Only what talking to kmsd needs: the daemon (aiohttp) answers with a
``Content-Length`` body; chunked bodies and bodies delimited by the end of
the connection are read too, since a proxy in front of it, or a later
aiohttp, may send them. Header values are never quoted in errors: a reply
may echo anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ._protocol import Request

__all__ = ["MAX_BODY", "Framing", "ProtocolError", "ResponseHead", "encode_request", "parse_chunk_size", "parse_head"]

# No answer of kmsd's comes near this (a batch of 1000 items is a few
# hundred KiB); a larger length is a broken or hostile peer, not a reason to
# allocate.
MAX_BODY = 64 * 1024 * 1024

# Methods whose request has a body by definition: without one, say so
# (Content-Length: 0), as http.client does, so no server waits for one.
_BODY_EXPECTED = frozenset({"POST", "PUT", "PATCH"})


class ProtocolError(Exception):
    """The peer's bytes are not an HTTP/1.1 answer we can read. Its message
    names what was wrong, never what was received."""


class Framing(Enum):
    NONE = "none"  # no body (HEAD, 1xx, 204, 304)
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until_close"


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    framing: Framing
    length: int  # for Framing.LENGTH
    keep_alive: bool  # whether the connection may carry another request


def encode_request(request: Request) -> bytes:
    lines = [f"{request.method} {request.target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in request.headers]
    if request.body is not None:
        lines.append(f"Content-Length: {len(request.body)}")
    elif request.method in _BODY_EXPECTED:
        lines.append("Content-Length: 0")
    for line in lines:
        # The request line and headers are ours (quoted paths, a checked
        # token), but a CR or LF would let one value write others.
        if "\r" in line or "\n" in line:
            raise ValueError("line break in a request header")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + (request.body or b"")


def parse_head(raw: bytes, method: str) -> ResponseHead:
    """The status and framing of a response head (status line and headers,
    up to and including the empty line)."""
    text = raw.decode("latin-1")  # any byte decodes; odd ones fail below
    status_line, *header_lines = text.split("\r\n")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    well_formed = len(code) == 3 and code.isascii() and code.isdigit() and rest[3:4] in ("", " ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or not well_formed:
        raise ProtocolError("bad status line")
    status = int(code)
    headers: dict[str, list[str]] = {}
    for line in header_lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ProtocolError("bad header line")
        headers.setdefault(name.lower(), []).append(value.strip())

    tokens = {t.strip().lower() for v in headers.get("connection", []) for t in v.split(",")}
    keep_alive = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens

    if method == "HEAD" or 100 <= status < 200 or status in (204, 304):
        return ResponseHead(status, Framing.NONE, 0, keep_alive)
    encodings = [t.strip().lower() for v in headers.get("transfer-encoding", []) for t in v.split(",")]
    if encodings:
        if encodings[-1] != "chunked":
            # RFC 9112 6.3: the body then runs until the connection closes.
            return ResponseHead(status, Framing.UNTIL_CLOSE, 0, False)
        return ResponseHead(status, Framing.CHUNKED, 0, keep_alive)
    lengths = headers.get("content-length")
    if lengths is None:
        return ResponseHead(status, Framing.UNTIL_CLOSE, 0, False)
    if len(set(lengths)) != 1 or not (lengths[0].isascii() and lengths[0].isdigit()):
        # Two different lengths is how response smuggling starts.
        raise ProtocolError("bad Content-Length")
    length = int(lengths[0])
    if length > MAX_BODY:
        raise ProtocolError("answer too large")
    return ResponseHead(status, Framing.LENGTH, length, keep_alive)


def parse_chunk_size(line: bytes) -> int:
    """The size of the next chunk, from its size line (extensions ignored)."""
    size = line.split(b";", 1)[0].strip()
    if not size or any(c not in b"0123456789abcdefABCDEF" for c in size):
        raise ProtocolError("bad chunk size")
    value = int(size, 16)
    if value > MAX_BODY:
        raise ProtocolError("answer too large")
    return value
