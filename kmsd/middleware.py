"""The middlewares, outermost first, one job each:

- ``access_log``: one log line per request (never a body, a token or a
  header value), a warning with the cause for a 5xx;
- ``count_requests``: the request metrics;
- ``render_errors``: every error, whatever raised it, rendered here and
  nowhere else, as ``{"error", "code"}`` JSON with its status;
- ``audit_operations``: one audit line for each key operation, read from
  the exception it ended with (or "ok");
- ``guard``: what a request must pass before any handler looks at it (a
  loopback Host and Origin over TCP, the peer policy, a peer on hold).

Handlers raise ``KMSError``s; nothing below this module builds an error
answer.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any, cast
from urllib.parse import urlsplit

from aiohttp import web

from .audit import AuditTrail
from .auth import Peer
from .errors import (
    BadRequest,
    Forbidden,
    InternalError,
    KMSError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    error_body,
)
from .http_state import (
    AUDIT_DETAIL,
    AUDIT_ISSUED,
    AUDIT_SUBJECT,
    AUDIT_TOKEN,
    AUDITED,
    CLIENT_ROUTES,
    COMPAT,
    ERROR,
    LOGGED_PATH,
    STATE,
    Handler,
    peer_of,
    route_of,
)
from .limits import peer_key, retry_after
from .logs import raised_at

__all__ = ["MIDDLEWARES", "as_kms_error", "failure_of", "render_error"]

_HTTP_ERRORS: dict[int, type[KMSError]] = {
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}


@functools.cache
def _http_error(status: int) -> type[KMSError]:
    """The error of an aiohttp 4xx that kmsd has no class of its own for:
    a ``BadRequest`` with aiohttp's status, made once per status."""
    return type(f"HTTP{status}", (BadRequest,), {"status": status})


def as_kms_error(exc: BaseException) -> KMSError:
    """What an exception is on the wire: itself, or the ``KMSError`` of an
    aiohttp error, or an internal error (its message is never shown)."""
    if isinstance(exc, KMSError):
        return exc
    if isinstance(exc, web.HTTPException):
        if exc.status in _HTTP_ERRORS:
            return _HTTP_ERRORS[exc.status]()
        if exc.status < 500:
            return _http_error(exc.status)(exc.reason)
    return InternalError()


def render_error(exc: BaseException) -> web.Response:
    err = as_kms_error(exc)
    response = web.Response(body=error_body(err), status=err.status, content_type="application/json", charset="utf-8")
    if isinstance(err, TooManyRequests):
        response.headers["Retry-After"] = str(err.extra["retry_after"])
    elif err.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, web.HTTPException) and "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]  # a 405 must say what is allowed
    return response


def failure_of(exc: KMSError) -> dict[str, str]:
    """For the log line of a 5xx: its code and why the dependency failed
    (the driver's exception and message: "database or disk is full", a
    refused connection), which the client is never told."""
    out = {"error": exc.code}
    # `raise ... from None` hid its context on purpose: so does the log.
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if cause is not None:
        out["cause"] = f"{type(cause).__name__}: {cause}"[:200]
    return out


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    response = await handler(request)
    error = request.get(ERROR)
    failure = failure_of(error) if error is not None and error.status >= 500 else {}
    state = request.app[STATE]
    (state.log.warning if failure else state.log.info)(
        "request",
        method=request.method,
        path=request.path[:LOGGED_PATH],
        status=response.status,
        ms=round((time.perf_counter() - started) * 1000, 2),
        **peer_of(request).describe(),
        **failure,
    )
    return response


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    response = await handler(request)
    metrics = request.app[STATE].metrics
    route = route_of(request)
    if COMPAT in request and response.status < 400:
        metrics.compat_requests.labels(route).inc()
    metrics.observe_request(route, request.method, response.status, time.perf_counter() - started)
    return response


@web.middleware
async def render_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        request[ERROR] = as_kms_error(exc)
        return render_error(exc)
    except asyncio.CancelledError:
        raise
    except KMSError as exc:
        request[ERROR] = exc
        return render_error(exc)
    except Exception as exc:
        # The type and where it was raised, never its message (which may
        # quote data) nor a rendered traceback with the frames' values.
        request.app[STATE].log.error(
            "unhandled_error", path=request.path[:LOGGED_PATH], method=request.method,
            error_type=type(exc).__name__, where=raised_at(exc),
        )
        request[ERROR] = InternalError()
        return render_error(request[ERROR])


@web.middleware
async def audit_operations(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    # aiohttp answers HEAD with the GET handler: audit it as that.
    operation = AUDITED.get(("GET" if request.method == "HEAD" else request.method, route_of(request)))
    audit = state.audit
    if operation is None or audit is None:
        return await handler(request)
    peer = peer_of(request)
    if audit.fail_closed:
        # Nothing happens that the trail cannot show: the attempt is on
        # record (or the request is refused) before the operation runs.
        audit.record(
            operation=operation, outcome="started", status=0, caller=peer.audit(),
            subject=request.get(AUDIT_SUBJECT),
        )
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        err = as_kms_error(exc)
        # Fail closed: no answer leaves without its audit line (the audit's
        # own error replaces the answer then).
        _record(request, audit, operation, peer, err.code, err.status)
        raise
    _record(request, audit, operation, peer, "ok" if response.status < 400 else "error", response.status)
    return response


def _record(request: web.Request, audit: AuditTrail, operation: str, peer: Peer, outcome: str, status: int) -> None:
    detail: dict[str, Any] = dict(request.get(AUDIT_DETAIL) or {})
    if AUDIT_ISSUED in request:
        detail["issued_token_id"] = request[AUDIT_ISSUED]
    if COMPAT in request:
        detail["compat"] = "original"  # allowed only because of compat = "original"
    audit.record(
        operation=operation,
        outcome=outcome,
        status=status,
        caller=peer.audit(),
        subject=request.get(AUDIT_SUBJECT),
        token_id=request.get(AUDIT_TOKEN),
        detail=detail or None,
    )


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    peer = peer_of(request)
    route = route_of(request)
    if peer.transport == "tcp":
        _check_host(request, state.settings.allowed_hosts)
        _check_origin(request, state.settings.allowed_hosts)
    if route in CLIENT_ROUTES and not state.policy.is_client(peer):
        raise Forbidden("this peer may not use kmsd (not in client_uids or client_gids)")
    key = peer_key(peer.transport, peer.uid)
    if state.connections is not None and route in CLIENT_ROUTES:
        # Requests its connections had sent before the hold began: a 429 at
        # once, before any token is looked at.
        held = state.connections.held(key)
        if held > 0 and not state.policy.is_admin(peer):
            raise TooManyRequests(extra={"retry_after": retry_after(held)})
    try:
        return await handler(request)
    except TooManyRequests as exc:
        if state.connections is not None:
            # Until then the peer costs nothing: its connections are not read.
            state.connections.hold(key, float(cast(int, exc.extra["retry_after"])))
        raise


def _check_host(request: web.Request, allowed: tuple[str, ...]) -> None:
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 may
    reach the TCP listener, but it cannot choose the Host header."""
    host = request.headers.get("Host", "")
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else ""
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name.lower() not in allowed:
        raise Forbidden("host not allowed")


def _check_origin(request: web.Request, allowed: tuple[str, ...]) -> None:
    """A browser names the page that sent a request in ``Origin``; kmsd
    serves no page, so only one of its own loopback names may send one (a
    page elsewhere cannot write through a user's browser)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return
    try:
        host = urlsplit(origin).hostname if "://" in origin else None
    except ValueError:  # "http://[::1", say
        host = None
    if host is None or host.lower() not in allowed:
        raise Forbidden("origin not allowed")


MIDDLEWARES = (access_log, count_requests, render_errors, audit_operations, guard)
