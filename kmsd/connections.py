"""Connection limits under the HTTP listeners: a deadline for every request
head, one cap on open connections across all listeners, and JSON (never an
echo of the request) for requests too malformed to reach the app.

aiohttp 3.14 closes a connection that sits idle between requests after its
``keepalive_timeout`` (kmsd's ``idle_timeout``) and bounds a request head by
size, but not by time: a client that sends one header byte every few seconds
(slowloris) keeps its connection, and a few thousand such clients keep every
file descriptor. Nor does it bound the number of connections. So:

- A connection must deliver a complete request head within
  ``header_timeout`` of being opened, and each later head within
  ``header_timeout`` of its first byte; otherwise it is answered 408 and
  closed. (Between requests, ``idle_timeout`` applies, as before.)
- Connections are admitted by peer (``classify``: a uid on the Unix
  socket, the TCP side as a whole). One peer may hold at most
  ``connection_share`` of ``max_connections``, so TCP callers can never
  take the Unix socket's capacity, nor one local user everyone else's. At
  its share, or at the cap, a newcomer first takes the place of the least
  recently active connection that waits for a request head and has done so
  for at least ``EVICT_AFTER`` (its own peer's first); if there is none, it
  is answered 503 and closed. A request in progress is never cut short for
  a newcomer. Admin peers always get in (over the cap, if need be).
- A client that does not read its answers (the transport's write buffer
  stays full) for ``send_timeout`` loses its connection: pipelining
  requests and never reading held a connection for as long as it liked.
- ``hold(peer, seconds)`` pauses reading on every connection of a peer
  (and on those it opens meanwhile): a peer over a rate limit costs the
  daemon nothing until its Retry-After.
- A 408 ends its connection at once: aiohttp would otherwise go on reading
  the rest of a body that did not arrive in time for another ten seconds.

The body deadline itself (``body_timeout``) is kmsd's reading of the body,
in ``server.read_json``. This module knows aiohttp's server, not kmsd's
routes; only ``server`` imports it. It reads two attributes of aiohttp's
``RequestHandler``: ``_waiter`` (set and pending while the connection waits
for a request head) and ``_request_count`` (heads parsed so far);
tests/test_attacks.py fails if an aiohttp upgrade changes them.
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import Response, StreamResponse
from aiohttp.web_runner import AppRunner
from aiohttp.web_server import Server

from .errors import (
    BadRequest,
    InternalError,
    KMSError,
    RequestTimeout,
    Unavailable,
    URITooLong,
    error_body,
    error_for_code,
)

__all__ = ["EVICT_AFTER", "MAX_TARGET", "GuardedRunner", "GuardedServer", "Limits", "raise_fd_limit"]

# The longest request target (path and query) answered: kmsd's longest route
# with a 64-character key id, percent-encoded, fits many times over. Routing
# costs more the longer the path is (aiohttp tries its prefixes), so a
# longer one is refused (414) before it reaches the router.
MAX_TARGET = 1024

# A connection waiting for a request head may give its place to a new one
# once it has waited this long (seconds); a fresh connection gets this much
# time to send its first bytes before a newcomer may displace it.
EVICT_AFTER = 1.0
# How long a refused connection may still send (what it sends is dropped)
# before it is closed: enough to read the 503 instead of a reset.
_REFUSED_LINGER = 1.0
# File descriptors beyond the connections: database pool, vault socket,
# listeners, log and audit files.
_FD_RESERVE = 256


def _raw_answer(status: int, reason: str, err: KMSError, extra: str = "") -> bytes:
    body = error_body(err)
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode() + body


_TIMED_OUT = _raw_answer(408, "Request Timeout", RequestTimeout())
_REFUSED = _raw_answer(503, "Service Unavailable", Unavailable("too many connections"), "Retry-After: 1\r\n")


@dataclass(frozen=True)
class Limits:
    header_timeout: float
    max_connections: int
    connection_share: float = 0.5
    send_timeout: float = 10.0

    @property
    def per_peer(self) -> int:
        return max(1, int(self.max_connections * self.connection_share))


# Who a connection's peer is, from its transport: (key, is an admin peer).
Classify = Callable[[asyncio.BaseTransport], tuple[Hashable, bool]]


class GuardedServer(Server):
    """aiohttp's ``Server`` (the protocol factory of every listener) whose
    connections keep ``Limits``."""

    def __init__(self, server: Server, limits: Limits, log: Any, classify: Classify) -> None:
        # The server aiohttp's AppRunner built for the app, re-made with our
        # protocol: same handler, request factory and handler arguments.
        super().__init__(
            _short_targets_only(server.request_handler),
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
        self.limits = limits
        self.log = log
        self.classify = classify
        # Every admitted connection -> when it was opened or last completed
        # a request head; least recently active first.
        self._open: dict[_Connection, float] = {}
        self._by_peer: dict[Hashable, dict[_Connection, None]] = {}
        # Peers whose connections are paused -> until when (loop time).
        self._held: dict[Hashable, float] = {}
        self.refused = 0
        self.evicted = 0
        self.send_timeouts = 0
        self._warned_at = -3600.0

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        # Admission waits for connection_made, which knows the peer. Every
        # accept of a burst gets there in turn, each seeing the ones before.
        return _Connection(self, loop=self._loop, **self._kwargs)

    def admit(self, conn: _Connection, peer: Hashable, admin: bool) -> float | None:
        """None: refused. Else until when (loop time) the new connection is
        held with its peer (0.0: not held)."""
        now = self._loop.time()
        if not admin:
            mine = self._by_peer.get(peer, {})
            if len(mine) >= self.limits.per_peer and not self._make_room(now, mine):
                self._refuse(now)
                return None
            if len(self._open) >= self.limits.max_connections and not self._make_room(now, self._open):
                self._refuse(now)
                return None
        self._open[conn] = now
        self._by_peer.setdefault(peer, {})[conn] = None
        return self._held.get(peer, 0.0)

    def _refuse(self, now: float) -> None:
        self.refused += 1
        self._warn(now)

    def held(self, peer: Hashable) -> float:
        """Seconds ``peer`` is still held (0.0 if it is not)."""
        until = self._held.get(peer)
        if until is None:
            return 0.0
        left = until - self._loop.time()
        if left <= 0:
            del self._held[peer]
            return 0.0
        return left

    def hold(self, peer: Hashable, seconds: float) -> None:
        """Pause reading on every connection of ``peer`` for ``seconds``."""
        until = self._loop.time() + seconds
        if self._held.get(peer, 0.0) >= until:
            return
        self._held[peer] = until
        for conn in self._by_peer.get(peer, {}):
            conn.pause_reading_until(until)

    def _touch(self, conn: _Connection) -> None:
        # Both orders stay least recently active first.
        if self._open.pop(conn, None) is not None:
            self._open[conn] = self._loop.time()
            mine = self._by_peer[conn.peer]
            del mine[conn]
            mine[conn] = None

    def _forget(self, conn: _Connection) -> None:
        self._open.pop(conn, None)
        mine = self._by_peer.get(conn.peer)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self._by_peer[conn.peer]

    def _make_room(self, now: float, among: dict[_Connection, Any]) -> bool:
        """Close the least recently active connection of ``among`` that
        waits for a request head (or was never set up); False if there is
        none."""
        cutoff = now - EVICT_AFTER
        victim = None
        for conn in among:
            if self._open[conn] > cutoff:
                break  # every later one is more recent still
            if conn.transport is None or conn.waiting_for_head():
                victim = conn
                break
        if victim is None:
            return False
        self._forget(victim)
        if victim.transport is not None:
            self.evicted += 1
            self._warn(now)
            victim.force_close()
        return True

    def _warn(self, now: float) -> None:
        # At most one line a minute: under a flood, one per connection would
        # drown the log.
        if now - self._warned_at >= 60:
            self._warned_at = now
            self.log.warning(
                "connection_limit_reached",
                max_connections=self.limits.max_connections,
                per_peer=self.limits.per_peer,
                refused=self.refused,
                closed_idle=self.evicted,
            )


def _short_targets_only(handler: Any) -> Any:
    async def handle(request: BaseRequest) -> StreamResponse:
        if len(request.raw_path) > MAX_TARGET:
            err = URITooLong()
            return Response(
                body=error_body(err),
                status=err.status,
                content_type="application/json",
            )
        response: StreamResponse = await handler(request)
        return response

    return handle


class _Connection(RequestHandler):
    """aiohttp's per-connection protocol with a deadline for request heads,
    one for sending answers, and admission by peer."""

    __slots__ = (
        "_guard", "_head_timer", "_heads", "_held_until", "_pending", "_refused", "_resume_timer", "_send_timer",
        "peer",
    )

    def __init__(self, guard: GuardedServer, **kwargs: Any) -> None:
        super().__init__(guard, **kwargs)
        self._guard = guard
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._resume_timer: asyncio.TimerHandle | None = None
        self._heads = 0
        self._refused: asyncio.TimerHandle | None = None
        self._held_until = 0.0
        self._pending: list[bytes] = []
        self.peer: Hashable = None

    def waiting_for_head(self) -> bool:
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.peer, admin = self._guard.classify(transport)
        held_until = self._guard.admit(self, self.peer, admin)
        if held_until is None:
            # Answered 503 at once, closed once the client has read it
            # (what it sends meanwhile is dropped). aiohttp never sees it.
            # uvloop's transports are not asyncio.WriteTransport subclasses.
            raw = cast(asyncio.Transport, transport)
            raw.write(_REFUSED)
            if raw.can_write_eof():
                raw.write_eof()
            self._refused = self._loop.call_later(_REFUSED_LINGER, raw.close)
            return
        super().connection_made(transport)
        self._arm()
        if held_until > self._loop.time():
            # Its peer is over a rate limit: a new connection waits with the others.
            self.pause_reading_until(held_until)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused is not None:
            self._refused.cancel()
            return
        for timer in (self._send_timer, self._resume_timer):
            if timer is not None:
                timer.cancel()
        self._disarm()
        self._guard._forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            return
        if self._held_until > self._loop.time():
            # Read although paused (uvloop starts reading after
            # connection_made, whatever it asked): kept for the end of the hold.
            self._pending.append(data)
            self._pause_transport_reading()
            return
        super().data_received(data)
        heads = self._request_count
        if heads != self._heads:
            # A head is complete: its clock stops.
            self._heads = heads
            self._disarm()
            self._guard._touch(self)
        elif self._head_timer is None and self.waiting_for_head():
            # The first bytes of the next head: it has header_timeout.
            self._arm()

    def pause_writing(self) -> None:
        # The client's receive buffer and ours are full: it does not read.
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self._loop.call_later(self._guard.limits.send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timed_out(self) -> None:
        self._send_timer = None
        if self.transport is not None:
            self._guard.send_timeouts += 1
            # Nothing more can reach a client that does not read.
            self.transport.abort()

    def pause_reading_until(self, until: float) -> None:
        """Read nothing until ``until`` (loop time), whatever aiohttp's own
        flow control does meanwhile (it resumes reading when its queue
        drains: ``_resume_transport_reading`` waits for the hold)."""
        if self.transport is None or until <= self._held_until:
            return
        self._held_until = until
        self._pause_transport_reading()
        if self._resume_timer is not None:
            self._resume_timer.cancel()
        self._resume_timer = self._loop.call_at(until, self._resume)

    def _resume_transport_reading(self) -> None:
        if self._held_until > self._loop.time():
            return
        super()._resume_transport_reading()

    def _resume(self) -> None:
        self._resume_timer = None
        self._held_until = 0.0
        pending, self._pending = b"".join(self._pending), []
        if pending and self.transport is not None:
            self.data_received(pending)
        # Only if aiohttp's flow control does not hold it back itself.
        if not self._reading_paused and not self._buffer_paused:
            self._resume_transport_reading()

    def _arm(self) -> None:
        self._head_timer = self._loop.call_later(self._guard.limits.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is not None and self.waiting_for_head():
            self.transport.write(_TIMED_OUT)
            self.force_close()  # the transport sends the 408, then closes

    async def finish_response(
        self, request: BaseRequest, resp: StreamResponse, start_time: float | None
    ) -> tuple[StreamResponse, bool]:
        if resp.status == 408:
            resp.force_close()
        result = await super().finish_response(request, resp, start_time)
        if resp.status == 408:
            # Sent: now close, instead of reading the late body for longer.
            self.force_close()
        return result

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> StreamResponse:
        """The answer to a request aiohttp could not parse (or to an error
        outside the app). aiohttp's own answer is text that quotes the
        offending bytes, and its log line carries them with a traceback:
        a malformed Authorization header would put a token in both."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started: no error answer possible")
        err: KMSError
        error_type = type(exc).__name__ if exc is not None else None
        if status >= 500:
            err = InternalError()
            self._guard.log.error("http_error", status=status, error_type=error_type)
        else:
            cls = error_for_code(None, status)
            err = cls() if cls.status == status and cls is not BadRequest else BadRequest("malformed HTTP request")
            self._guard.log.info("bad_http_request", status=err.status, error_type=error_type)
        body = error_body(err)
        resp = Response(body=body, status=err.status, content_type="application/json")
        resp.force_close()
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # aiohttp's unexpected errors go to kmsd's log, not to stderr
        # through the logging module's last-resort handler.
        exc = kw.get("exc_info")
        self._guard.log.error(
            "http_server_error", error=str(args[0]) if args else None,
            error_type=type(exc).__name__ if isinstance(exc, BaseException) else None,
        )


class GuardedRunner(AppRunner):
    """An ``AppRunner`` whose listeners share one ``GuardedServer``."""

    __slots__ = ("_classify", "_limits", "_log")

    def __init__(self, app: Any, limits: Limits, log: Any, classify: Classify, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits
        self._log = log
        self._classify = classify

    async def _make_server(self) -> Server:
        return GuardedServer(await super()._make_server(), self._limits, self._log, self._classify)


def raise_fd_limit(connections: int) -> tuple[int, int]:
    """Raise the soft limit on open files toward what ``connections`` need
    (never above the hard limit): (the limit now, what is wanted)."""
    want = connections + _FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    return (want if soft == resource.RLIM_INFINITY else soft), want
