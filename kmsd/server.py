"""The HTTP face of kmsd: app factory, routes, the one error middleware, and
the listeners (a Unix socket and loopback TCP side by side).

The only module that imports ``aiohttp.web`` (``connections`` holds the
limits on connections, below it). Handlers validate input at
the edge and call the service; every error is an exception rendered once,
in ``error_middleware``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import functools
import importlib.resources
import json
import os
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from .audit import AuditTrail
from .auth import MAX_USER_ID, Claims, Peer, PeerPolicy, peer_from_socket, user_id_of
from .config import Settings
from .connections import GuardedRunner, GuardedServer, Limits, raise_fd_limit
from .limits import RateLimiter, peer_key, retry_after
from .errors import (
    BadRequest,
    Forbidden,
    InternalError,
    KMSError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from .logs import get_logger, raised_at, set_log_level
from .metrics import CONTENT_TYPE, Metrics, instrument_store
from .privileges import harden, switch_user, user_exists
from .rotation import Rotator
from .runtime import Runtime
from .service import KMS
from .store import Store
from .systemd import ListenSocket, Notifier, listen_fds, watchdog_interval
from .vault import VaultClient
from .vault_protocol import Kind

__all__ = ["AppState", "STATE", "create_app", "serve"]

DEK_HEX_LENGTH = 64
# A request line logs at most this much of its path (they are at most
# connections.MAX_TARGET long; a log line need not be).
LOGGED_PATH = 256
_HEX_DEK = re.compile(f"[0-9a-fA-F]{{{DEK_HEX_LENGTH}}}")


@dataclass
class AppState:
    settings: Settings
    store: Store
    vault: VaultClient
    kms: KMS
    rotator: Rotator
    policy: PeerPolicy
    log: Any
    metrics: Metrics
    audit: AuditTrail | None
    # Per peer: invalid tokens presented, records created (limits.py).
    invalid_tokens: RateLimiter
    creations: RateLimiter
    runtime: Runtime
    # The listeners' connections, once they are open (not in app-only tests).
    connections: GuardedServer | None = None


STATE = web.AppKey("state", AppState)
PEER = "kmsd.peer"
# What the audit line of a request names: set by the handler once known.
AUDIT_SUBJECT = "kmsd.audit.subject"
AUDIT_TOKEN = "kmsd.audit.token_id"
AUDIT_ISSUED = "kmsd.audit.issued_token_id"  # the jti of a token the request minted
AUDIT_DETAIL = "kmsd.audit.detail"  # what else the audit line says (not secret)
# Set by a handler that let a request through only because of compat = "original".
COMPAT = "kmsd.compat"

# Key operations: one audit line each. (method, route template) -> name.
AUDITED = {
    ("POST", "/issue"): "issue",
    ("POST", "/api/keys"): "store",
    ("GET", "/api/keys"): "fetch",
    ("DELETE", "/api/keys"): "delete",
    ("POST", "/api/encrypt"): "encrypt",
    ("POST", "/api/decrypt-dek"): "decrypt_dek",
    ("POST", "/api/rewrap"): "rewrap",
    ("POST", "/api/tokens/revoke"): "revoke_tokens",
    ("GET", "/api/rotate-mk"): "rotation_status",
    ("POST", "/api/rotate-mk"): "rotate_master_key",
    ("POST", "/api/master-keys"): "add_master_key",
    ("DELETE", "/api/master-keys/{key_id}"): "destroy_master_key",
}
# Routes only clients of the policy may use (the admin routes check admins).
CLIENT_ROUTES = {
    "/issue", "/verify", "/api/keys", "/api/encrypt", "/api/decrypt-dek", "/api/rewrap", "/api/tokens/revoke",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- input validation -------------------------------------------------------------


class _RepeatedKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # {"user_id": "a", "user_id": "b"}: a proxy or log reader that takes the
    # first would see another request than kmsd, which would take the last.
    body = dict(pairs)
    if len(body) != len(pairs):
        raise _RepeatedKey
    return body


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or a 4xx (408 if it does not arrive
    within body_timeout; 415 unless it is declared application/json)."""
    settings = request.app[STATE].settings
    # Before a byte of the body is read. (The original's JSON parser ignored
    # a body of any other type too.)
    if request.content_type != "application/json":
        raise UnsupportedMediaType()
    if request.content_length is not None and request.content_length > settings.max_body_size:
        raise PayloadTooLarge()
    try:
        if request.content.is_eof():  # it came with the head: no timer needed
            raw = await request.read()
        else:
            async with asyncio.timeout(settings.body_timeout):
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge() from None
    except TimeoutError:
        raise RequestTimeout() from None
    try:
        body = json.loads(raw, object_pairs_hook=_unique_keys)
    except _RepeatedKey:
        raise BadRequest("body must not repeat a key") from None
    except (ValueError, RecursionError, LookupError):  # LookupError: a codec json guessed and could not load
        raise BadRequest("body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:  # lone surrogates from "\ud800" escapes
        return False


def require_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        raise BadRequest(f"{name} is required")
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    if not value:
        raise BadRequest(f"{name} must not be empty")
    if not _utf8(value):
        raise BadRequest(f"{name} must be valid Unicode")
    return value


def require_user_id(body: dict[str, Any], name: str = "user_id") -> str:
    """A user id: a string, or a JSON integer taken as its decimal string
    (the original stored one in a VARCHAR column, where MySQL made it that)."""
    raw = body.get(name)
    number = user_id_of(raw) if not isinstance(raw, str) else None
    value = number if number is not None else require_str(body, name)
    if len(value) > MAX_USER_ID:
        raise BadRequest(f"{name} must be at most {MAX_USER_ID} characters")
    if _has_controls(value):
        raise BadRequest(f"{name} must not contain control characters")
    return value


def _has_controls(value: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in value)


def require_base64(body: dict[str, Any], name: str) -> bytes:
    value = require_str(body, name)
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise BadRequest(f"{name} must be standard base64") from None


def require_dek(body: dict[str, Any], name: str = "dek") -> bytes:
    value = require_str(body, name)
    # fullmatch, not fromhex alone: fromhex skips whitespace, so 62 digits
    # and two spaces would pass as a 31-byte key.
    if not _HEX_DEK.fullmatch(value):
        raise BadRequest(f"{name} must be 32 bytes as 64 hex digits")
    return bytes.fromhex(value)


def bearer_token(request: web.Request) -> str | None:
    """``Authorization: Bearer <jwt>``, or ``Authorization: <jwt>`` with no
    scheme (the original's services strip a leading "Bearer " and take the
    rest, so its clients send either)."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, space, token = header.strip().partition(" ")
    if not space:
        token = scheme  # no scheme: the header is the token
    elif scheme.lower() != "bearer":
        raise Unauthorized()
    token = token.strip()
    if not token:
        raise Unauthorized()
    return token


async def caller_claims(request: web.Request, *, required: bool) -> Claims | None:
    token = bearer_token(request)
    if token is None:
        if required:
            raise Unauthorized("missing bearer token")
        return None
    claims = await verified(request, token)
    request.setdefault(AUDIT_SUBJECT, claims.subject)
    request[AUDIT_TOKEN] = claims.token_id
    return claims


async def verified(request: web.Request, token: str) -> Claims:
    """The token's claims; an invalid one costs its peer one of its
    ``invalid_token_rate`` (429 once they are spent)."""
    try:
        return await request.app[STATE].kms.verify_token(token)
    except Unauthorized:
        rate_limit(request, request.app[STATE].invalid_tokens)
        raise


def rate_limit(request: web.Request, limiter: RateLimiter) -> None:
    """Spend one event of the caller's peer (admin peers are not limited);
    ``TooManyRequests`` when it has none left. The middleware then pauses
    the peer's connections until its Retry-After."""
    state = request.app[STATE]
    peer = peer_of(request)
    if state.policy.is_admin(peer):
        return
    wait = limiter.take(peer_key(peer.transport, peer.uid))
    if wait > 0:
        raise TooManyRequests(extra={"retry_after": retry_after(wait)})


def policy_from(settings: Settings) -> PeerPolicy:
    return PeerPolicy(
        settings.admin_uids,
        settings.admin_gids,
        settings.allow_admin_over_tcp,
        settings.client_uids,
        settings.client_gids,
        settings.allow_tcp_clients,
    )


# A connection's peer does not change: read SO_PEERCRED once per connection,
# not once per request on it.
_PEERS: weakref.WeakKeyDictionary[Any, Peer] = weakref.WeakKeyDictionary()


def peer_of(request: web.Request) -> Peer:
    peer = request.get(PEER)
    if peer is None:
        transport = request.transport
        peer = _PEERS.get(transport) if transport is not None else None
        if peer is None:
            peer = peer_from_socket(transport.get_extra_info("socket") if transport else None)
            if transport is not None:
                with contextlib.suppress(TypeError):  # a transport without weak references
                    _PEERS[transport] = peer
        request[PEER] = peer
    return peer


def require_admin(request: web.Request) -> Peer:
    peer = peer_of(request)
    if not request.app[STATE].policy.is_admin(peer):
        raise Forbidden("admin operation: requires an admin peer on the Unix socket")
    return peer


# -- middleware --------------------------------------------------------------------

_HTTP_ERRORS: dict[int, type[KMSError]] = {
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}


def json_response(body: Any, status: int = 200) -> web.Response:
    """aiohttp's json_response with orjson: every answer goes through here,
    and the standard encoder cost more than the rest of building one."""
    try:
        raw = orjson.dumps(body)
    except TypeError:  # e.g. an integer claim beyond 64 bits in a legacy token
        raw = json.dumps(body).encode()
    return web.Response(body=raw, status=status, content_type="application/json", charset="utf-8")


def _error_response(exc: KMSError, headers: Mapping[str, str] | None = None) -> web.Response:
    response = json_response({**exc.extra, "error": exc.message, "code": exc.code}, status=exc.status)
    if headers:
        response.headers.update(headers)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error as JSON, check the Host of TCP requests and the
    peer policy, and account for the request: one log line (never a body, a
    token or a header value), metrics, and an audit line for key operations."""
    state = request.app[STATE]
    started = time.perf_counter()
    peer = peer_of(request)
    route = _route(request)
    # aiohttp answers HEAD with the GET handler: audit it as that.
    operation = AUDITED.get(("GET" if request.method == "HEAD" else request.method, route))
    audit = state.audit if operation else None
    failure: dict[str, str] = {}
    try:
        if peer.transport == "tcp":
            _check_host(request, state.settings.allowed_hosts)
            _check_origin(request, state.settings.allowed_hosts)
        if route in CLIENT_ROUTES and not state.policy.is_client(peer):
            raise Forbidden("this peer may not use kmsd (not in client_uids or client_gids)")
        if state.connections is not None and route in CLIENT_ROUTES:
            # Requests its connections had sent before the hold began: a
            # 429 at once, before any token is looked at.
            held = state.connections.held(peer_key(peer.transport, peer.uid))
            if held > 0 and not state.policy.is_admin(peer):
                raise TooManyRequests(extra={"retry_after": retry_after(held)})
        if audit is not None and audit.fail_closed:
            # Nothing happens that the trail cannot show: the attempt is on
            # record (or the request is refused) before the operation runs.
            audit.record(
                operation=operation or "", outcome="started", status=0, caller=peer.audit(),
                subject=request.get(AUDIT_SUBJECT),
            )
        response = await handler(request)
    except TooManyRequests as exc:
        seconds = exc.extra["retry_after"]
        response = _error_response(exc, {"Retry-After": str(seconds)})
        if state.connections is not None:
            # Until then the peer costs nothing: its connections are not read.
            state.connections.hold(peer_key(peer.transport, peer.uid), seconds)
    except KMSError as exc:
        response = _error_response(exc)
        if exc.status >= 500:
            failure = _failure(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        cls = _HTTP_ERRORS.get(exc.status)
        if cls is not None:
            err: KMSError = cls()
        elif exc.status >= 500:
            err = InternalError()
        else:
            err = BadRequest(exc.reason)
            err.status = exc.status
        # A 405 must say what is allowed.
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        response = _error_response(err, allow)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        # The type and where it was raised, never its message (which may
        # quote data) nor a rendered traceback with the frames' values.
        state.log.error(
            "unhandled_error", path=request.path[:LOGGED_PATH], method=request.method,
            error_type=type(exc).__name__, where=raised_at(exc),
        )
        response = _error_response(InternalError())
    if COMPAT in request and response.status < 400:
        state.metrics.compat_requests.labels(route).inc()
    if audit is not None and operation is not None:
        response = _audit(request, audit, operation, peer, response)
    seconds = time.perf_counter() - started
    state.metrics.observe_request(route, request.method, response.status, seconds)
    (state.log.warning if failure else state.log.info)(
        "request",
        method=request.method,
        path=request.path[:LOGGED_PATH],
        status=response.status,
        ms=round(seconds * 1000, 2),
        **peer.describe(),
        **failure,
    )
    return response


def _failure(exc: KMSError) -> dict[str, str]:
    """For the log line of a 5xx: its code and why the dependency failed
    (the driver's exception and message: "database or disk is full", a
    refused connection), which the client is never told."""
    out = {"error": exc.code}
    # `raise ... from None` hid its context on purpose: so does the log.
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if cause is not None:
        out["cause"] = f"{type(cause).__name__}: {cause}"[:200]
    return out


def _audit(
    request: web.Request, audit: AuditTrail, operation: str, peer: Peer, response: web.StreamResponse
) -> web.StreamResponse:
    outcome = "ok"
    if response.status >= 400:
        try:
            outcome = json.loads(response.body)["code"]  # type: ignore[attr-defined]
        except (ValueError, KeyError, TypeError, AttributeError):
            outcome = "error"
    detail: dict[str, Any] = dict(request.get(AUDIT_DETAIL) or {})
    if AUDIT_ISSUED in request:
        detail["issued_token_id"] = request[AUDIT_ISSUED]
    if COMPAT in request:
        detail["compat"] = "original"  # allowed only because of compat = "original"
    try:
        audit.record(
            operation=operation,
            outcome=outcome,
            status=response.status,
            caller=peer.audit(),
            subject=request.get(AUDIT_SUBJECT),
            token_id=request.get(AUDIT_TOKEN),
            detail=detail or None,
        )
    except KMSError as exc:
        # Fail closed: no answer leaves without its audit line.
        return _error_response(exc)
    return response


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


# -- routes ------------------------------------------------------------------------

routes = web.RouteTableDef()


def _kms(request: web.Request) -> KMS:
    return request.app[STATE].kms


@routes.post("/issue")
async def issue(request: web.Request) -> web.Response:
    body = await read_json(request)
    user_id = require_user_id(body, "id")
    request[AUDIT_SUBJECT] = user_id
    peer = peer_of(request)
    state = request.app[STATE]
    renewing = None
    if not state.policy.is_admin(peer):
        # A non-admin may only renew a token for its own subject (the same
        # generation and session: never past max_session_age), unless
        # compat = "original" gives TCP callers the original's contract.
        claims = await caller_claims(request, required=False)
        if claims is not None and claims.subject == user_id:
            renewing = claims
        elif not _compat_over_tcp(request, peer):
            raise Forbidden("issuing a token for an arbitrary id requires an admin peer")
    token, token_id = await _kms(request).issue_token_with_id(
        user_id, id_claim=_id_claim(body, "id"), renewing=renewing
    )
    request[AUDIT_ISSUED] = token_id
    return json_response({"token": token})


def _compat_over_tcp(request: web.Request, peer: Peer) -> bool:
    """Whether compat = "original" lets this TCP request through; marks it
    (counted in /metrics, "compat" in its audit line) if so."""
    if peer.transport == "tcp" and request.app[STATE].settings.compat_original:
        request[COMPAT] = True
        return True
    return False


@routes.post("/verify")
async def verify(request: web.Request) -> web.Response:
    body = await read_json(request)
    token = body.get("token")
    if not isinstance(token, str) or not token:
        raise BadRequest("token is required", extra={"valid": False})
    try:
        claims = await verified(request, token)
    except Unauthorized:
        raise Unauthorized("invalid token", extra={"valid": False}) from None
    return json_response({"valid": True, "payload": claims.payload})


@routes.post("/api/keys")
async def store_key(request: web.Request) -> web.Response:
    body = await read_json(request)
    user_id = require_user_id(body)
    request[AUDIT_SUBJECT] = user_id
    data = require_str(body, "data")
    claims = await caller_claims(request, required=False)
    owner = claims if claims is not None and claims.subject == user_id else None
    if owner is None:
        rate_limit(request, request.app[STATE].creations)
    token, request[AUDIT_ISSUED] = await _kms(request).store_record(
        user_id, data, owner=owner, id_claim=_id_claim(body, "user_id")
    )
    return json_response({"message": "Key stored successfully", "access_token": token})


@routes.get("/api/keys")
async def fetch_key(request: web.Request) -> web.Response:
    claims = await caller_claims(request, required=True)
    assert claims is not None
    return json_response({"data": await _kms(request).fetch_record(claims.subject)})


@routes.delete("/api/keys")
async def delete_key(request: web.Request) -> web.Response:
    claims = await caller_claims(request, required=True)
    assert claims is not None
    await _kms(request).delete_record(claims)
    return json_response({"message": "Key deleted successfully"})


@routes.post("/api/tokens/revoke")
async def revoke_tokens(request: web.Request) -> web.Response:
    """Revoke the bearer token, or every token of its subject (``"all":
    true``); a token named in the body (whoever holds it may void it); or,
    for an admin peer, every token of ``user_id``."""
    body = await read_json(request)
    unknown = set(body) - {"token", "all", "user_id"}
    if unknown:
        # Never echoed: a field name is the caller's text, of any length.
        raise BadRequest("unknown field: the body may name token, all and user_id only")
    everything = body.get("all", False)
    if not isinstance(everything, bool):
        raise BadRequest("all must be true or false")
    named = require_str(body, "token") if "token" in body else None
    user_id = require_user_id(body) if "user_id" in body else None
    if user_id is not None and (named is not None or "all" in body):
        raise BadRequest("user_id names every token of a subject: give it alone")
    kms = _kms(request)
    if user_id is not None:
        request[AUDIT_SUBJECT] = user_id
        claims = await caller_claims(request, required=False)
        if (claims is None or claims.subject != user_id) and not request.app[STATE].policy.is_admin(peer_of(request)):
            raise Forbidden("revoking the tokens of another subject requires an admin peer")
        await kms.revoke_subject(user_id)
        return json_response({"revoked": "subject", "user_id": user_id})
    if named is not None:
        claims = await verified(request, named)  # only a live token needs revoking
        request[AUDIT_SUBJECT] = claims.subject
        request[AUDIT_TOKEN] = claims.token_id
    else:
        claims = await caller_claims(request, required=True)
        assert claims is not None
    if everything:
        await kms.revoke_subject(claims.subject)
        return json_response({"revoked": "subject", "user_id": claims.subject})
    await kms.revoke_token(claims)
    return json_response({"revoked": "token"})


@routes.post("/api/encrypt")
async def encrypt(request: web.Request) -> web.Response:
    body = await read_json(request)
    data = require_base64(body, "data")
    dek = require_dek(body)
    claims = await caller_claims(request, required=False)
    owner: str | None
    if body.get("user_id") is not None:
        owner = require_user_id(body)
    elif claims is not None:
        owner = claims.subject
    elif request.app[STATE].settings.unbound_envelopes == "refuse":
        raise BadRequest(
            "user_id or a bearer token is required to bind the DEK to its owner (unbound_envelopes = \"refuse\")"
        )
    else:
        owner = None  # the original's contract: an unbound envelope, in its format
    request[AUDIT_SUBJECT] = owner
    encrypted_key, encrypted_dek = await _kms(request).encrypt(data, dek, owner)
    if owner is None:
        _unbound(request, "encrypt", Kind.UNBOUND, allowed=True)
    return json_response({"encrypted_key": encrypted_key, "encrypted_dek": encrypted_dek})


UNBOUND_REFUSED = (
    'unbound and original-format envelopes are refused (unbound_envelopes = "refuse"); '
    "an admin peer can rewrap one with an owner (POST /api/rewrap)"
)


def _unbound(request: web.Request, operation: str, kind: Kind, *, allowed: bool) -> None:
    """An envelope with no owner was made, used or refused: said in the audit
    line and counted in /metrics (how an operator sees who still depends on
    them, before and after ``unbound_envelopes = "refuse"``)."""
    request[AUDIT_DETAIL] = {"envelope": kind.name.lower()}
    request.app[STATE].metrics.unbound_envelopes.labels(operation, kind.name.lower()).inc()
    if not allowed:
        raise Forbidden(UNBOUND_REFUSED)


def _id_claim(body: dict[str, Any], name: str) -> int | None:
    """A JSON integer id stays one in the token's ``id`` claim, as the
    original's tokens had it (``sub`` is its decimal string)."""
    value = body.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@routes.post("/api/decrypt-dek")
async def decrypt_dek(request: web.Request) -> web.Response:
    body = await read_json(request)
    encrypted_dek = require_str(body, "encrypted_dek")
    claims = await caller_claims(request, required=True)
    assert claims is not None
    # The original key-server sends the record's user_id beside its token:
    # checked as input, but the token alone decides whose DEK this may be.
    if body.get("user_id") is not None:
        require_user_id(body)
    dek = await _kms(request).decrypt_dek(encrypted_dek, claims.subject)
    if dek.kind.unbound:
        _unbound(request, "decrypt_dek", dek.kind, allowed=request.app[STATE].settings.unbound_envelopes == "allow")
    return json_response({"dek": dek.key.hex()})


@routes.post("/api/rewrap")
async def rewrap(request: web.Request) -> web.Response:
    """An envelope's DEK wrapped anew under the active master key, in kmsd's
    authenticated format, inside the vault: bound to ``user_id`` if given
    (another subject than the caller's own needs an admin peer), else bound
    as it was. How applications upgrade the envelopes in their own tables."""
    body = await read_json(request)
    encrypted_dek = require_str(body, "encrypted_dek")
    claims = await caller_claims(request, required=True)
    assert claims is not None
    target = require_user_id(body) if body.get("user_id") is not None else None
    admin = request.app[STATE].policy.is_admin(peer_of(request))
    if target is not None and target != claims.subject and not admin:
        raise Forbidden("binding an envelope to another subject than the token's requires an admin peer")
    request[AUDIT_SUBJECT] = target or claims.subject
    new, kind = await _kms(request).rewrap_envelope(encrypted_dek, claims.subject, target)
    if kind.unbound:
        # Under "refuse" an admin peer may still upgrade a straggler.
        allowed = admin or request.app[STATE].settings.unbound_envelopes == "allow"
        _unbound(request, "rewrap", kind, allowed=allowed)
    return json_response({"encrypted_dek": new})


def _requested_by(peer: Peer) -> str:
    return ", ".join(f"{k}={v}" for k, v in peer.describe().items())


@routes.get("/api/rotate-mk")
async def rotation_status(request: web.Request) -> web.Response:
    # The original answered GET /api/rotate-mk to anyone; the status holds
    # nothing secret, so compat = "original" gives it to TCP callers.
    peer = peer_of(request)
    if not request.app[STATE].policy.is_admin(peer) and not _compat_over_tcp(request, peer):
        require_admin(request)
    return json_response(await request.app[STATE].rotator.status())


@routes.post("/api/rotate-mk")
async def rotate(request: web.Request) -> web.Response:
    peer = require_admin(request)
    return json_response(await request.app[STATE].rotator.rotate(requested_by=_requested_by(peer)))


@routes.get("/api/master-keys")
async def list_master_keys(request: web.Request) -> web.Response:
    require_admin(request)
    kms = _kms(request)
    return json_response({"active_key_id": kms.keys.active_key_id, "master_keys": await kms.list_master_keys()})


@routes.post("/api/master-keys")
async def add_master_key(request: web.Request) -> web.Response:
    require_admin(request)
    body = await read_json(request) if request.can_read_body else {}
    description = body.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > 255 or not _utf8(description)):
        raise BadRequest("description must be a string of at most 255 characters")
    return json_response(await request.app[STATE].rotator.add_key(description))


@routes.delete("/api/master-keys/{key_id}")
async def destroy_master_key(request: web.Request) -> web.Response:
    require_admin(request)
    key_id = request.match_info["key_id"]
    # The rule of user ids, which the document can state as a pattern.
    if not 0 < len(key_id) <= 64 or not _utf8(key_id) or _has_controls(key_id):
        raise BadRequest("key_id must be 1 to 64 characters without control characters")
    request[AUDIT_SUBJECT] = key_id
    await _kms(request).destroy_master_key(key_id)
    return json_response({"message": "Master key destroyed", "key_id": key_id})


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@functools.cache
def _openapi_document() -> bytes | None:
    try:
        return importlib.resources.files(__package__).joinpath("openapi.yaml").read_bytes()
    except OSError:
        return None


@routes.get("/openapi.yaml")
async def openapi(request: web.Request) -> web.Response:
    document = _openapi_document()
    if document is None:  # an installation without its package data
        raise NotFound("this installation has no OpenAPI document")
    return web.Response(body=document, content_type="application/yaml", charset="utf-8")


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    checks = await _kms(request).readiness()
    ready = all(checks.values())
    body: dict[str, Any] = {"ready": ready, "checks": checks}
    if not ready:
        body.update(error="not ready", code="unavailable")
    return json_response(body, status=200 if ready else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.metrics.vault_up.set(1 if state.vault.is_up else 0)
    state.metrics.vault_restarts.set(state.vault.restarts)
    state.metrics.token_cache_entries.set(state.kms.tokens.cache_entries)
    try:
        state.metrics.set_rotation(await state.rotator.status())
    except KMSError:
        pass  # the database is down: the rotation gauges keep their last values
    return web.Response(body=state.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


@routes.get("/.well-known/jwks.json")
async def jwks(request: web.Request) -> web.Response:
    return json_response(_kms(request).tokens.jwks())


# -- app and listeners ---------------------------------------------------------------


def create_app(settings: Settings, *, runtime: Runtime | None = None) -> web.Application:
    log = get_logger(process="daemon")
    metrics = Metrics()
    runtime = runtime or Runtime(settings, log=log, wrap_store=lambda store: instrument_store(store, metrics))
    runtime.vault.observe = metrics.observe_vault
    policy = policy_from(settings)
    audit = AuditTrail(settings.audit_log, fail_closed=settings.audit_fail_closed, log=log) if settings.audit_log else None
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_size)
    app[STATE] = AppState(
        settings, runtime.store, runtime.vault, runtime.kms, runtime.rotator, policy, log, metrics, audit,
        invalid_tokens=RateLimiter(settings.invalid_token_rate, settings.invalid_token_burst),
        creations=RateLimiter(settings.record_creation_rate, settings.record_creation_burst),
        runtime=runtime,
    )
    # Read now, while the package's files are surely readable: after the
    # privilege drop they may not be (an interpreter under /root).
    _openapi_document()
    app.add_routes(routes)
    app.cleanup_ctx.append(_backend_ctx)
    app.cleanup_ctx.append(_rotator_ctx)
    return app


async def _rotator_ctx(app: web.Application) -> AsyncIterator[None]:
    rotator = app[STATE].rotator
    rotator.start()
    yield
    await rotator.close()


def _open_audit(state: AppState) -> None:
    if state.audit is None:
        state.log.warning("audit_disabled", warning="no audit_log configured: key operations are not audited")
        return
    try:
        state.audit.open()
    except OSError as exc:
        # Fail closed: refuse to start; otherwise serve, and say so.
        if state.audit.fail_closed:
            raise Unavailable(f"cannot open the audit trail {state.audit.path}: {exc.strerror}") from None
        state.log.error("audit_open_failed", path=state.audit.path, error=exc.strerror)


def _close_audit(state: AppState) -> None:
    if state.audit is not None:
        seq, head = state.audit.head
        # Anchors the end of the chain: `kmsd audit verify --head`.
        state.log.info("audit_head", path=state.audit.path, seq=seq, hash=head)
        state.audit.close()


async def _backend_ctx(app: web.Application) -> AsyncIterator[None]:
    """The audit trail, then the runtime (store, vault). On the way out,
    after every in-flight request has finished: the reverse."""
    state = app[STATE]
    _open_audit(state)
    try:
        async with state.runtime.store_open() as store:
            for warning in store.warnings:
                state.log.warning("database_warning", warning=warning)
            async with state.runtime.vault_started():
                if state.vault.is_passphrase:
                    state.log.warning(
                        "root_key_is_passphrase",
                        warning="the root key is a passphrase, not 32 random bytes; run `kmsd root-key rotate`",
                    )
                if state.settings.root_key.dev_file:
                    state.log.warning(
                        "development_root_key",
                        path=state.settings.root_key.dev_file,
                        warning="--dev: using a generated development root key; never use this in production",
                    )
                yield
    finally:
        _close_audit(state)


async def start_listeners(
    app: web.Application, settings: Settings, passed: Sequence[ListenSocket] = ()
) -> web.AppRunner:
    limits = Limits(
        header_timeout=settings.header_timeout,
        max_connections=settings.max_connections,
        connection_share=settings.connection_share,
        send_timeout=settings.send_timeout,
    )
    policy = app[STATE].policy

    def classify(transport: asyncio.BaseTransport) -> tuple[Hashable, bool]:
        peer = peer_from_socket(transport.get_extra_info("socket"))
        with contextlib.suppress(TypeError):  # a transport without weak references
            _PEERS[transport] = peer
        return peer_key(peer.transport, peer.uid), policy.is_admin(peer)

    runner = GuardedRunner(
        app, limits, app[STATE].log, classify, access_log=None, handle_signals=False, shutdown_timeout=10,
        keepalive_timeout=settings.idle_timeout,
    )
    try:
        await runner.setup()
        if passed:
            # Socket activation: systemd bound them (mode, owner, address
            # come from kmsd.socket); the settings' addresses are not used.
            for listener in passed:
                await web.SockSite(runner, listener.sock).start()
        else:
            await _bind(runner, settings)
    except BaseException:
        # Whatever started (store threads, the vault) must stop, or the
        # process would linger after a failed start.
        await runner.cleanup()
        raise
    if isinstance(runner.server, GuardedServer):
        app[STATE].connections = runner.server
    return runner


async def _bind(runner: web.AppRunner, settings: Settings) -> None:
    if settings.socket:
        directory = os.path.dirname(os.path.abspath(settings.socket))
        os.makedirs(directory, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if os.path.exists(settings.socket) and not os.path.isdir(settings.socket):
                os.unlink(settings.socket)
        site: web.BaseSite = web.UnixSite(runner, settings.socket, backlog=4096)
        await site.start()
        os.chmod(settings.socket, settings.socket_mode)
    for host, port in settings.listen:
        site = web.TCPSite(runner, host, port, reuse_address=True, backlog=4096)
        await site.start()


def _describe(listener: ListenSocket) -> str:
    address = listener.sock.getsockname()
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]} ({listener.name})"
    return f"{address or '?'} ({listener.name})"


def _preload() -> None:
    """Load now what the standard library loads on first use: after the
    privilege drop the interpreter's own files may be unreadable (one under
    /root). json.loads of a body in UTF-16 or UTF-32 (which JSON allows)
    looks its codec up then, and failed with LookupError: a 500."""
    import codecs

    for name in ("utf-16", "utf-16-be", "utf-16-le", "utf-32", "utf-32-be", "utf-32-le", "ascii", "latin-1",
                 "idna", "punycode"):
        codecs.lookup(name)
    import _strptime  # noqa: F401  (datetime.strptime's, in any library)


def _hand_over(settings: Settings, user: str, created_dirs: Sequence[str] = ()) -> None:
    import pwd

    pw = pwd.getpwnam(user)
    paths = [*created_dirs, *([settings.audit_log] if settings.audit_log else [])]
    if settings.database.scheme == "sqlite":
        paths += [settings.database.path + suffix for suffix in ("", "-wal", "-shm")]
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.chown(path, pw.pw_uid, pw.pw_gid)


def daemon_user(settings: Settings) -> str | None:
    """The user a daemon started as root drops to, or None."""
    if os.geteuid() != 0:
        return None
    if settings.daemon_user:
        return settings.daemon_user
    return "kmsd" if user_exists("kmsd") else None


def apply_reload(app: web.Application, new: Settings) -> list[str]:
    """SIGHUP: take the settings that can change at run time (log level,
    peer policy, allowed hosts); the others need a restart. What changed."""
    state = app[STATE]
    old = state.settings
    reloadable = (
        "log_level", "admin_uids", "admin_gids", "allow_admin_over_tcp", "allowed_hosts",
        "client_uids", "client_gids", "allow_tcp_clients", "unbound_envelopes",
    )
    changed = [name for name in reloadable if getattr(old, name) != getattr(new, name)]
    # Secrets and the root key are re-read by a restart only (the reload may
    # run without access to them after the privilege drop): not compared.
    unseen = ("root_key", "legacy_jwt_secret")
    ignored = [
        f.name for f in dataclasses.fields(Settings)
        if f.name not in reloadable and f.name not in unseen and f.name != "database"
        and getattr(old, f.name) != getattr(new, f.name)
    ]
    if old.database.masked() != new.database.masked():
        ignored.append("database")
    state.settings = dataclasses.replace(old, **{name: getattr(new, name) for name in reloadable})
    state.policy = policy_from(state.settings)
    set_log_level(new.log_level)
    if ignored:
        state.log.warning("reload_needs_restart", settings=sorted(ignored))
    return changed


async def serve(
    settings: Settings,
    *,
    stop: asyncio.Event,
    reload: Callable[[], Settings] | None = None,
    hup: asyncio.Event | None = None,
) -> None:
    """Run until ``stop`` is set, then shut down gracefully: stop accepting,
    let in-flight requests finish, stop the rotation, the store, the vault.
    Each time ``hup`` is set, ``reload()`` gives new settings to apply."""
    log = get_logger(process="daemon")
    passed = listen_fds()
    notifier = Notifier()
    # Files kmsd creates (SQLite database, audit trail) are its own.
    os.umask(0o077)
    drop_to = daemon_user(settings)
    fds, wanted = raise_fd_limit(settings.max_connections)
    if fds < wanted:
        log.warning("open_files_limit_low", limit=fds, wanted=wanted, max_connections=settings.max_connections)
    app = create_app(settings)
    root_key_fd = settings.root_key.fd
    if drop_to is not None or root_key_fd is not None:
        # A launcher starts the vaults: one that stays root when the daemon
        # drops, and the one process besides the vaults that holds ROOT_KEY's
        # sealed memfd, so that the daemon can let go of it.
        app[STATE].vault.start_launcher()
        if root_key_fd is not None:
            os.close(root_key_fd)
    runner = await start_listeners(app, settings, passed)
    if drop_to is not None:
        # Sockets bound, database open, vault started: root is not needed any
        # more. The files the daemon keeps writing become its own first, so
        # that it can reopen them (the audit trail after logrotate).
        _preload()
        audit = app[STATE].audit
        _hand_over(settings, drop_to, audit.created_dirs if audit is not None else ())
        pw = switch_user(drop_to)
        harden()
        log.info("privileges_dropped", user=drop_to, uid=pw.pw_uid, launcher_pid=app[STATE].vault.launcher_pid)
        try:
            # The pool opens new connections as this user from now on: one
            # that authenticates as the OS user (unix_socket) fails now,
            # clearly, and not as 503s later.
            await app[STATE].store.check_access()
        except BaseException:
            await runner.cleanup()
            raise
        if settings.audit_log and not os.access(os.path.dirname(os.path.abspath(settings.audit_log)), os.W_OK | os.X_OK):
            log.warning(
                "audit_directory_not_writable", path=os.path.dirname(os.path.abspath(settings.audit_log)),
                warning=f"{drop_to} cannot create the audit file anew after a logrotate: make the directory "
                f"{drop_to}'s (systemd: LogsDirectory=kmsd) or rotate with copytruncate",
            )
    elif os.geteuid() == 0:
        log.warning(
            "running_as_root",
            warning="no 'kmsd' user (make install creates it) and no daemon_user: the daemon keeps root",
        )
    server = runner.server
    if server is not None:
        app[STATE].metrics.open_connections.set_function(lambda: len(server.connections))
    if passed:
        addresses = [_describe(p) for p in passed]
    else:
        addresses = [settings.socket] + [f"{h}:{p}" for h, p in settings.listen]
    if settings.legacy_jwt_secret:
        log.warning(
            "legacy_tokens_accepted",
            warning="HS256 tokens of the original auth service are accepted (migration option)",
        )
    if settings.compat_original:
        log.warning(
            "compat_original",
            warning="compat = original: any TCP caller may get a token for ANY user id (POST /issue) "
            "and read the rotation status (GET /api/rotate-mk), as in the original system; anything "
            "that reaches the TCP listeners can then read every record. Only while original services "
            "still run; each such request is counted (kmsd_compat_requests_total) and audited",
        )
    log.info(
        "kmsd_started",
        listen=addresses,
        socket_activated=bool(passed),
        database=settings.database.masked(),
        root_key_source=settings.root_key.describe(),
        vault_pid=app[STATE].vault.pid,
    )
    notifier.ready(f"serving on {', '.join(addresses)}")
    tasks = []
    interval = watchdog_interval()
    if interval and notifier.enabled:
        tasks.append(asyncio.create_task(_watchdog(notifier, interval), name="watchdog"))
    if hup is not None and reload is not None:
        tasks.append(asyncio.create_task(_reloader(app, notifier, hup, reload), name="reload"))
    try:
        await stop.wait()
    finally:
        log.info("kmsd_stopping")
        notifier.stopping("finishing in-flight requests")
        for task in tasks:
            task.cancel()
        await runner.cleanup()
        log.info("kmsd_stopped")
        notifier.close()


async def _watchdog(notifier: Notifier, interval: float) -> None:
    # Sent from the event loop itself: a loop that hangs stops sending, and
    # systemd restarts the service.
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


def _reopen_files(app: web.Application) -> None:
    state = app[STATE]
    if state.audit is not None:
        try:
            state.audit.reopen()
        except OSError as exc:
            state.audit.healthy = False
            state.log.error("audit_reopen_failed", path=state.audit.path, error=exc.strerror)


async def _reloader(
    app: web.Application, notifier: Notifier, hup: asyncio.Event, reload: Callable[[], Settings]
) -> None:
    log = app[STATE].log
    while True:
        await hup.wait()
        hup.clear()
        notifier.reloading()
        # First, whatever the configuration says: logrotate moved the audit
        # file away, and the chain must go on in a new one.
        _reopen_files(app)
        try:
            changed = apply_reload(app, reload())
            log.info("config_reloaded", changed=changed)
        except KMSError as exc:
            # A broken file keeps the running settings.
            log.error("config_reload_failed", error=exc.message)
        except Exception as exc:  # noqa: BLE001 - the reloader must survive anything
            log.error("config_reload_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            # Always: systemd waits for READY=1 after RELOADING=1.
            notifier.ready("serving (reloaded)")
