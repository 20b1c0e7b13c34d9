"""``AsyncKMSClient``: kmsd's API for asyncio, standard library only.

The same methods, arguments, results and errors as ``KMSClient`` (both build
their requests and read their answers in ``kmsd_client._protocol``); this
module only moves the bytes, HTTP/1.1 over asyncio streams, on the daemon's
Unix socket or loopback TCP.

Connections. The client keeps a small pool: at most ``max_connections``
(default 10) open at once, which is also how many calls are in flight at
once; further calls wait for a connection to come free, and that wait counts
toward their timeout. A connection carries one request at a time and goes
back to the pool after a complete answer unless the daemon said
``Connection: close``. A pool belongs to one event loop: use a client from
the loop it was first used in.

Timeouts. ``timeout`` (seconds) bounds each call as a whole, waiting for a
connection, connecting, sending and reading the answer included; past it the
call raises ``Unavailable`` and its connection is closed, since a late answer
must not be read as the next request's.

Resending. Before a kept-alive connection is reused it is checked: a daemon
that closed it (its idle timeout, a restart) has made it readable. Such a
connection is dropped and another taken before a byte is sent, which is safe
for any method. Once a request has gone out, it is resent (once, on a new
connection) only if it is a GET or HEAD that got no byte of answer on a
reused connection: the daemon never changes state on those, whereas a POST
or DELETE may already have taken effect, and then raises ``Unavailable``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from ._http11 import MAX_BODY, Framing, ProtocolError, ResponseHead, encode_request, parse_chunk_size, parse_head
from ._protocol import (
    SAFE_TO_RESEND,
    BaseClient,
    Call,
    Request,
    Target,
    datakey_body,
    decrypt_dek_body,
    encrypt_body,
    readable_when_idle,
    reason,
    rewrap_body,
    unreachable,
)
from .errors import KMSError

__all__ = ["DEFAULT_MAX_CONNECTIONS", "AsyncKMSClient"]

DEFAULT_MAX_CONNECTIONS = 10

_T = TypeVar("_T")

# A response head larger than this is not kmsd's (its heads are a few
# hundred bytes); asyncio's StreamReader refuses to buffer more for one line.
_HEAD_LIMIT = 64 * 1024


class _NoAnswer(Exception):
    """The connection ended before the first byte of an answer: the request
    may or may not have been acted on."""


class _Connection:
    """One HTTP/1.1 connection: a stream pair and the pool generation it was
    opened in (``aclose`` ends a generation)."""

    __slots__ = ("reader", "writer", "generation")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, generation: int) -> None:
        self.reader = reader
        self.writer = writer
        self.generation = generation

    def usable_when_idle(self) -> bool:
        """Whether a connection that sat idle can carry a request.

        Between requests the daemon has nothing to say, so anything to read,
        an end of file above all, means it hung up (or is out of step with
        us). The loop may not have run since then, so the socket itself is
        asked as well as the stream.
        """
        if self.writer.is_closing() or self.reader.at_eof() or self.reader.exception() is not None:
            return False
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return True
        return not readable_when_idle(sock.fileno())

    def close(self) -> None:
        # Not awaited: closing must also work from a cancelled task, and the
        # transport finishes closing by itself.
        self.writer.close()


class _Pool:
    """Connections to one target, at most ``size`` open at once."""

    def __init__(self, target: Target, size: int) -> None:
        if size < 1:
            raise ValueError("max_connections must be at least 1")
        self._target = target
        self.size = size
        # Created on first use: in the running loop, not wherever the client
        # object happened to be built.
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[_Connection] = []  # most recently used last
        self._generation = 0
        self.open = 0  # idle and in use: tests and callers may watch it
        self.opened = 0  # connections made since the client was created

    def slot(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A client kept across asyncio.run() calls: the old loop's
            # connections and semaphore cannot work in this one. Its
            # transports cannot be closed from here either (their loop is
            # gone); dropping them lets their sockets be collected.
            if self._loop is not None:
                self._generation += 1
                self._idle.clear()
                self.open = 0
            self._loop = loop
            self._slots = asyncio.Semaphore(self.size)
        assert self._slots is not None
        return self._slots

    async def take(self, *, fresh: bool = False) -> tuple[_Connection, bool]:
        """A connection, and whether it was kept alive from an earlier call.
        Hold a slot first. Idle ones the daemon has closed are dropped
        here, before anything is sent on them."""
        while self._idle and not fresh:
            conn = self._idle.pop()
            if conn.usable_when_idle():
                return conn, True
            self.discard(conn)
        target = self._target
        if target.socket_path is not None:
            reader, writer = await asyncio.open_unix_connection(target.socket_path, limit=_HEAD_LIMIT)
        else:
            reader, writer = await asyncio.open_connection(target.host, target.port, limit=_HEAD_LIMIT)
        self.open += 1
        self.opened += 1
        return _Connection(reader, writer, self._generation), False

    def give_back(self, conn: _Connection) -> None:
        if conn.generation != self._generation or conn.writer.is_closing():
            self.discard(conn)
        else:
            self._idle.append(conn)

    def discard(self, conn: _Connection) -> None:
        conn.close()
        self.open -= 1

    def close_idle(self) -> None:
        """Close every idle connection; those in use close when their call
        ends. A later call opens new ones."""
        self._generation += 1
        idle, self._idle = self._idle, []
        for conn in idle:
            self.discard(conn)


async def _read_answer(reader: asyncio.StreamReader, method: str) -> tuple[ResponseHead, bytes]:
    """One response from the stream: its head (interim 1xx ones skipped)
    and its whole body."""
    head = await _read_head(reader, method, first=True)
    while 100 <= head.status < 200:
        head = await _read_head(reader, method, first=False)
    try:
        if head.framing is Framing.LENGTH:
            return head, await reader.readexactly(head.length)
        if head.framing is Framing.CHUNKED:
            return head, await _read_chunked(reader)
        if head.framing is Framing.UNTIL_CLOSE:
            return head, await _read_until_close(reader)
        return head, b""
    except (asyncio.IncompleteReadError, ConnectionResetError):
        # Part of the answer came: the request was answered, so it is never
        # resent, not even a GET.
        raise ProtocolError("connection closed mid-answer") from None
    except asyncio.LimitOverrunError:
        raise ProtocolError("chunk line too long") from None


async def _read_head(reader: asyncio.StreamReader, method: str, *, first: bool) -> ResponseHead:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if first and not exc.partial:
            raise _NoAnswer() from exc
        raise ProtocolError("connection closed mid-answer") from None
    except ConnectionResetError as exc:
        if first:
            raise _NoAnswer() from exc
        raise
    except asyncio.LimitOverrunError:
        raise ProtocolError("response head too large") from None
    return parse_head(raw, method)


async def _read_until_close(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while len(body) <= MAX_BODY:
        more = await reader.read(MAX_BODY + 1 - len(body))
        if not more:
            return body
        body += more
    raise ProtocolError("answer too large")


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        size = parse_chunk_size(await reader.readuntil(b"\r\n"))
        if size == 0:
            break
        total += size
        if total > MAX_BODY:
            raise ProtocolError("answer too large")
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise ProtocolError("bad chunk end")
    # Trailers, if any, up to the empty line: read and ignored.
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass
    return b"".join(parts)


class AsyncKMSClient(BaseClient):
    """Asynchronous kmsd client: ``KMSClient``'s API, every method a
    coroutine. Safe to share among the tasks of one event loop.

    ``socket_path`` / ``url`` / ``token`` as for ``KMSClient``; ``timeout``
    (seconds) bounds each call as a whole; ``max_connections`` bounds the
    pool, hence the calls in flight at once.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 10.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        super().__init__(socket_path, url=url, token=token, timeout=timeout)
        self._pool = _Pool(self._target, max_connections)

    async def __aenter__(self) -> AsyncKMSClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the idle connections (those in use close when their call
        ends); a later call opens new ones."""
        self._pool.close_idle()

    # -- API ---------------------------------------------------------------

    async def issue(self, user_id: str, *, token: str | None = None) -> str:
        """Issue a token for ``user_id`` (authorized callers only)."""
        return await self._run(self._calls.issue(user_id, self._bearer(token)))

    async def verify(self, token: str) -> dict[str, Any]:
        """The payload of a valid ``token``; raises ``Unauthorized`` otherwise."""
        return await self._run(self._calls.verify(token))

    async def store(self, user_id: str, data: str, token: str | None = None) -> str:
        """Store ``data`` for ``user_id`` and return its access token.

        With a token of that user, an existing record is replaced; without
        one, an existing ``user_id`` raises ``Conflict``. The returned token is
        not kept on the client.
        """
        return await self._run(self._calls.store(user_id, data, self._bearer(token)))

    async def fetch(self, token: str | None = None) -> str:
        """The data stored for the token's subject."""
        return await self._run(self._calls.fetch(self._bearer(token)))

    async def delete(self, token: str | None = None) -> None:
        """Crypto-shred the record of the token's subject. Every token of
        that subject dies with it."""
        await self._run(self._calls.delete(self._bearer(token)))

    async def revoke(self, token: str | None = None, *, everything: bool = False) -> None:
        """Revoke ``token`` (else the client's), or with ``everything`` every
        token of its subject, on every daemon of the database."""
        await self._run(self._calls.revoke(self._bearer(token), everything))

    async def revoke_subject(self, user_id: str, *, token: str | None = None) -> None:
        """Revoke every token of ``user_id`` (an admin peer, or a token of
        that subject)."""
        await self._run(self._calls.revoke_subject(user_id, self._bearer(token)))

    async def encrypt(
        self,
        data: bytes,
        dek: bytes,
        user_id: str | None = None,
        token: str | None = None,
        *,
        context: Mapping[str, str] | None = None,
    ) -> tuple[str, str]:
        """Encrypt ``data`` under ``dek``; returns ``(encrypted_key, encrypted_dek)``.

        ``user_id`` (else the token's subject) is bound to both ciphertexts as
        associated data; with neither the envelope is unbound, in the original
        system's format (any valid token unwraps its DEK). ``context`` (string
        pairs, not secret) is bound to the wrapped DEK too: unwrapping and
        rewrapping it then need the same pairs.
        """
        body = encrypt_body(data, dek, user_id, context=context)
        return await self._run(self._calls.encrypt(body, self._bearer(token)))

    async def datakey(
        self,
        user_id: str | None = None,
        token: str | None = None,
        *,
        plaintext: bool = True,
        context: Mapping[str, str] | None = None,
    ) -> tuple[bytes | None, str]:
        """A new data key generated by kmsd: ``(dek, encrypted_dek)``, bound to
        ``user_id`` (else the token's subject) and to ``context`` if given.
        Encrypt with ``dek``, keep ``encrypted_dek`` beside the ciphertext,
        forget ``dek``; the owner's token unwraps it later (``decrypt_dek``).
        ``plaintext=False`` asks for the wrapped key only (``dek`` is then
        None)."""
        body = datakey_body(user_id, plaintext=plaintext, context=context)
        return await self._run(self._calls.datakey(body, plaintext, self._bearer(token)))

    async def decrypt_dek(
        self, encrypted_dek: str, token: str | None = None, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Unwrap a DEK bound to the token's subject (or an unbound one), given
        the same ``context`` it was wrapped with (pairs in any order)."""
        body = decrypt_dek_body(encrypted_dek, context=context)
        return await self._run(self._calls.decrypt_dek(body, self._bearer(token)))

    async def rewrap(
        self,
        encrypted_dek: str,
        user_id: str | None = None,
        token: str | None = None,
        *,
        context: Mapping[str, str] | None = None,
    ) -> str:
        """The envelope's DEK wrapped anew under the active master key (inside
        the vault): bound to ``user_id`` if given (another subject than the
        token's needs an admin peer), else bound as it was, and to the same
        ``context``, which must be given. The new ``encrypted_dek``."""
        body = rewrap_body(encrypted_dek, user_id, context=context)
        return await self._run(self._calls.rewrap(body, self._bearer(token)))

    # Batches: one request for many items, one vault round trip. Each item is
    # a dict of the single call's arguments (``token`` applies to the whole
    # batch). The answer is a list in the items' order: each entry is what
    # the single call returns, or the ``KMSError`` it would have raised,
    # returned in place. A batch refused as a whole (no valid token, too
    # many items) raises.

    async def encrypt_batch(
        self, items: Sequence[Mapping[str, Any]], *, token: str | None = None
    ) -> list[tuple[str, str] | KMSError]:
        """``encrypt`` for each item (``data``, ``dek``, ``user_id``, ``context``)."""
        return await self._run(self._calls.encrypt_batch(items, self._bearer(token)))

    async def datakey_batch(
        self, items: Sequence[Mapping[str, Any]], *, token: str | None = None
    ) -> list[tuple[bytes | None, str] | KMSError]:
        """``datakey`` for each item (``user_id``, ``plaintext``, ``context``)."""
        return await self._run(self._calls.datakey_batch(items, self._bearer(token)))

    async def decrypt_dek_batch(
        self, items: Sequence[Mapping[str, Any]], *, token: str | None = None
    ) -> list[bytes | KMSError]:
        """``decrypt_dek`` for each item (``encrypted_dek``, ``context``)."""
        return await self._run(self._calls.decrypt_dek_batch(items, self._bearer(token)))

    async def rewrap_batch(
        self, items: Sequence[Mapping[str, Any]], *, token: str | None = None
    ) -> list[str | KMSError]:
        """``rewrap`` for each item (``encrypted_dek``, ``user_id``, ``context``)."""
        return await self._run(self._calls.rewrap_batch(items, self._bearer(token)))

    async def rotation_status(self, *, token: str | None = None) -> dict[str, Any]:
        """Master-key rotation progress (admin only)."""
        return await self._run(self._calls.rotation_status(self._bearer(token)))

    async def rotate(self, *, token: str | None = None) -> dict[str, Any]:
        """Start a master-key rotation (admin only)."""
        return await self._run(self._calls.rotate(self._bearer(token)))

    async def list_master_keys(self, *, token: str | None = None) -> dict[str, Any]:
        """Every master key with its status and how many records it wraps (admin only)."""
        return await self._run(self._calls.list_master_keys(self._bearer(token)))

    async def add_master_key(self, description: str | None = None, *, token: str | None = None) -> dict[str, Any]:
        """A new active master key, without a rewrap (admin only)."""
        return await self._run(self._calls.add_master_key(description, self._bearer(token)))

    async def schedule_key_deletion(self, key_id: str, days: int = 30, *, token: str | None = None) -> dict[str, Any]:
        """Schedule a retired master key's destruction in ``days`` (7 to 30;
        admin only). Until then nothing unwraps under it
        (``KeyPendingDeletion``), and ``cancel_key_deletion`` undoes it."""
        return await self._run(self._calls.schedule_key_deletion(key_id, days, self._bearer(token)))

    async def cancel_key_deletion(self, key_id: str, *, token: str | None = None) -> dict[str, Any]:
        """Take a key off the deletion schedule: retired again (admin only)."""
        return await self._run(self._calls.cancel_key_deletion(key_id, self._bearer(token)))

    async def destroy_master_key(self, key_id: str, *, now: bool = False, token: str | None = None) -> dict[str, Any]:
        """Delete a retired master key no record uses any more (admin only).
        The daemon destroys at once only when ``now`` confirms it; otherwise
        schedule the deletion (``schedule_key_deletion``)."""
        return await self._run(self._calls.destroy_master_key(key_id, now, self._bearer(token)))

    async def health(self) -> dict[str, Any]:
        return await self._run(self._calls.health())

    async def ready(self) -> bool:
        """True when the daemon can serve requests, False while it says 503."""
        return await self._run(self._calls.ready())

    async def jwks(self) -> dict[str, Any]:
        return await self._run(self._calls.jwks())

    # -- plumbing ----------------------------------------------------------

    async def _run(self, call: Call[_T]) -> _T:
        return call.parse(*await self._exchange(call.request))

    async def _exchange(self, request: Request) -> tuple[int, bytes]:
        payload = encode_request(request)
        try:
            async with asyncio.timeout(self.timeout), self._pool.slot():
                return await self._exchange_on_a_connection(request, payload)
        except TimeoutError as exc:
            # asyncio.timeout's own, or a connect() that timed out.
            raise unreachable(self._target, "timed out") from exc

    async def _exchange_on_a_connection(self, request: Request, payload: bytes) -> tuple[int, bytes]:
        pool = self._pool
        may_resend = request.method in SAFE_TO_RESEND
        fresh = False
        while True:
            try:
                conn, reused = await pool.take(fresh=fresh)
            except OSError as exc:
                raise unreachable(self._target, reason(exc)) from exc
            try:
                conn.writer.write(payload)
                await conn.writer.drain()
                head, body = await _read_answer(conn.reader, request.method)
            except (_NoAnswer, ConnectionError) as exc:
                pool.discard(conn)
                # Sent, or partly sent, on a connection the daemon dropped: a
                # GET can go again, once; anything else may have been done.
                if reused and may_resend:
                    may_resend, fresh = False, True
                    continue
                cause = exc.__cause__ if isinstance(exc, _NoAnswer) else exc
                why = "connection closed without an answer" if isinstance(exc, _NoAnswer) else reason(exc)
                raise unreachable(self._target, why) from cause
            except OSError as exc:
                pool.discard(conn)
                raise unreachable(self._target, reason(exc)) from exc
            except ProtocolError as exc:
                pool.discard(conn)
                raise unreachable(self._target, str(exc)) from exc
            except BaseException:
                # A timeout, a cancellation: the answer may still come, and
                # must never be read as another request's.
                pool.discard(conn)
                raise
            if head.keep_alive:
                pool.give_back(conn)
            else:
                pool.discard(conn)
            return head.status, body
