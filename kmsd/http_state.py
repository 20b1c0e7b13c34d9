"""What the HTTP layer shares: the application's typed state, the keys a
request carries between the middlewares and the handlers, the peer of a
connection, and the one way an answer is encoded."""

from __future__ import annotations

import contextlib
import json
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .audit import AuditTrail
from .auth import Peer, PeerPolicy, peer_from_socket
from .config import Settings
from .connections import GuardedServer
from .errors import Forbidden, KMSError
from .limits import RateLimiter
from .metrics import Metrics
from .rotation import Rotator
from .runtime import Runtime
from .service import KMS
from .store import Store
from .vault import VaultClient

__all__ = [
    "AUDITED", "AUDIT_DETAIL", "AUDIT_ISSUED", "AUDIT_SUBJECT", "AUDIT_TOKEN", "CLIENT_ROUTES", "COMPAT", "ERROR",
    "LOGGED_PATH", "PEER", "STATE", "AppState", "Handler", "json_response", "peer_of", "policy_from", "remember_peer",
    "require_admin", "route_of",
]

# A request line logs at most this much of its path (they are at most
# connections.MAX_TARGET long; a log line need not be).
LOGGED_PATH = 256


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
PEER = web.RequestKey("kmsd.peer", Peer)
# The error a request ended with, as the error middleware rendered it.
ERROR = web.RequestKey("kmsd.error", KMSError)
# What the audit line of a request names: set by the handler once known.
AUDIT_SUBJECT: web.RequestKey[str | None] = web.RequestKey("kmsd.audit.subject")
AUDIT_TOKEN: web.RequestKey[str | None] = web.RequestKey("kmsd.audit.token_id")
AUDIT_ISSUED = web.RequestKey("kmsd.audit.issued_token_id", str)  # the jti of a token the request minted
AUDIT_DETAIL = web.RequestKey("kmsd.audit.detail", dict[str, Any])  # what else the audit line says (not secret)
# Set by a handler that let a request through only because of compat = "original".
COMPAT = web.RequestKey("kmsd.compat", bool)

# Key operations: one audit line each. (method, route template) -> name.
AUDITED = {
    ("POST", "/issue"): "issue",
    ("POST", "/api/keys"): "store",
    ("GET", "/api/keys"): "fetch",
    ("DELETE", "/api/keys"): "delete",
    ("POST", "/api/encrypt"): "encrypt",
    ("POST", "/api/datakey"): "datakey",
    ("POST", "/api/decrypt-dek"): "decrypt_dek",
    ("POST", "/api/rewrap"): "rewrap",
    ("POST", "/api/tokens/revoke"): "revoke_tokens",
    ("GET", "/api/rotate-mk"): "rotation_status",
    ("POST", "/api/rotate-mk"): "rotate_master_key",
    ("POST", "/api/master-keys"): "add_master_key",
    ("DELETE", "/api/master-keys/{key_id}"): "destroy_master_key",
    ("POST", "/api/master-keys/{key_id}/schedule-deletion"): "schedule_key_deletion",
    ("POST", "/api/master-keys/{key_id}/cancel-deletion"): "cancel_key_deletion",
}
# Routes only clients of the policy may use (the admin routes check admins).
CLIENT_ROUTES = {
    "/issue", "/verify", "/api/keys", "/api/encrypt", "/api/datakey", "/api/decrypt-dek", "/api/rewrap",
    "/api/tokens/revoke",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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


def remember_peer(transport: Any, peer: Peer) -> None:
    with contextlib.suppress(TypeError):  # a transport without weak references
        _PEERS[transport] = peer


def peer_of(request: web.Request) -> Peer:
    peer = request.get(PEER)
    if peer is None:
        transport = request.transport
        peer = _PEERS.get(transport) if transport is not None else None
        if peer is None:
            peer = peer_from_socket(transport.get_extra_info("socket") if transport else None)
            if transport is not None:
                remember_peer(transport, peer)
        request[PEER] = peer
    return peer


def require_admin(request: web.Request) -> Peer:
    peer = peer_of(request)
    if not request.app[STATE].policy.is_admin(peer):
        raise Forbidden("admin operation: requires an admin peer on the Unix socket")
    return peer


def json_response(body: Any, status: int = 200) -> web.Response:
    """aiohttp's json_response with orjson: every answer goes through here,
    and the standard encoder cost more than the rest of building one."""
    try:
        raw = orjson.dumps(body)
    except TypeError:  # e.g. an integer claim beyond 64 bits in a legacy token
        raw = json.dumps(body).encode()
    return web.Response(body=raw, status=status, content_type="application/json", charset="utf-8")


def route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"
