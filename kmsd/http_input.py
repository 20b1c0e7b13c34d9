"""Input validation at the edge: a request's JSON body and its fields, its
bearer token and the claims it carries, the rate limits a request spends.
Every refusal is a ``KMSError`` (a 4xx) that the error middleware renders."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from typing import Any

from aiohttp import web

from .auth import MAX_USER_ID, Claims, user_id_of
from .errors import BadRequest, PayloadTooLarge, RequestTimeout, TooManyRequests, Unauthorized, UnsupportedMediaType
from .http_state import AUDIT_SUBJECT, AUDIT_TOKEN, STATE, peer_of
from .limits import RateLimiter, peer_key, retry_after

__all__ = [
    "DEK_HEX_LENGTH", "MAX_CONTEXT_PAIRS", "MAX_CONTEXT_STRING", "bearer_token", "caller_claims",
    "has_controls", "rate_limit", "read_json", "require_base64", "require_context", "require_dek", "require_str",
    "require_user_id", "utf8", "verified",
]

DEK_HEX_LENGTH = 64
_HEX_DEK = re.compile(f"[0-9a-fA-F]{{{DEK_HEX_LENGTH}}}")


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


def utf8(value: str) -> bool:
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
    if not utf8(value):
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
    if has_controls(value):
        raise BadRequest(f"{name} must not contain control characters")
    return value


def has_controls(value: str) -> bool:
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


# An encryption context: a few dozen short pairs (a document id, a table
# name), never a payload. Any strings within these bounds: only a digest of
# the context reaches the vault, and every log and audit line escapes
# control characters.
MAX_CONTEXT_PAIRS = 32
MAX_CONTEXT_STRING = 256


def require_context(body: dict[str, Any]) -> dict[str, str]:
    """The optional ``context`` object: at most MAX_CONTEXT_PAIRS names to
    string values, each name and value at most MAX_CONTEXT_STRING
    characters; {} when absent or null."""
    context = body.get("context")
    if context is None:
        return {}
    if not isinstance(context, dict):
        raise BadRequest("context must be an object of names to strings")
    if len(context) > MAX_CONTEXT_PAIRS:
        raise BadRequest(f"context must have at most {MAX_CONTEXT_PAIRS} pairs")
    for name, value in context.items():
        if not isinstance(value, str):
            raise BadRequest("context values must be strings")
        if len(name) > MAX_CONTEXT_STRING or len(value) > MAX_CONTEXT_STRING:
            raise BadRequest(f"context names and values must be at most {MAX_CONTEXT_STRING} characters")
    return context


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
