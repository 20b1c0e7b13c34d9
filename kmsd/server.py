"""The HTTP face of kmsd: its routes and ``create_app``.

Each handler validates its input at the edge (``http_input``), calls the
service and answers JSON; every refusal is an exception, rendered once by
the middlewares (``middleware``), which also log, count and audit. The
process around the app (listeners, privilege drop, systemd, SIGHUP) is
``daemon``'s.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from .audit import AuditTrail
from .auth import Peer
from .config import Settings
from .errors import BadRequest, Forbidden, KeyPendingDeletion, KMSError, NotFound, Unauthorized, Unavailable
from .http_envelope import envelope_routes, pending_refused
from .http_input import (
    caller_claims,
    has_controls,
    rate_limit,
    read_json,
    require_str,
    require_user_id,
    utf8,
    verified,
)
from .http_state import (
    AUDIT_DETAIL,
    AUDIT_ISSUED,
    AUDIT_SUBJECT,
    AUDIT_TOKEN,
    COMPAT,
    STATE,
    AppState,
    json_response,
    peer_of,
    policy_from,
    require_admin,
)
from .limits import RateLimiter
from .logs import get_logger
from .metrics import CONTENT_TYPE, Metrics, instrument_store
from .middleware import MIDDLEWARES
from .runtime import Runtime
from .service import KMS

__all__ = ["create_app", "routes"]


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
    try:
        data = await _kms(request).fetch_record(claims.subject)
    except KeyPendingDeletion as exc:
        pending_refused(request, "fetch")
        request[AUDIT_DETAIL] = {"key_id": exc.extra["key_id"]}
        raise
    return json_response({"data": data})


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


def _id_claim(body: dict[str, Any], name: str) -> int | None:
    """A JSON integer id stays one in the token's ``id`` claim, as the
    original's tokens had it (``sub`` is its decimal string)."""
    value = body.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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
    return json_response(await _kms(request).keyring.overview())


@routes.post("/api/master-keys")
async def add_master_key(request: web.Request) -> web.Response:
    require_admin(request)
    body = await read_json(request) if request.can_read_body else {}
    description = body.get("description")
    valid = isinstance(description, str) and len(description) <= 255 and utf8(description)
    if description is not None and not valid:
        raise BadRequest("description must be a string of at most 255 characters")
    return json_response(await request.app[STATE].rotator.add_key(description))


def _key_id(request: web.Request) -> str:
    """The path's key id, named in the audit line."""
    key_id = request.match_info["key_id"]
    # The rule of user ids, which the document can state as a pattern.
    if not 0 < len(key_id) <= 64 or not utf8(key_id) or has_controls(key_id):
        raise BadRequest("key_id must be 1 to 64 characters without control characters")
    request[AUDIT_SUBJECT] = key_id
    return key_id


@routes.delete("/api/master-keys/{key_id}")
async def destroy_master_key(request: web.Request) -> web.Response:
    require_admin(request)
    key_id = _key_id(request)
    # Irreversible: a DEK a caller keeps under this key is lost with it.
    # The safe way is a scheduled deletion; at once only when asked for.
    if request.query.getall("now", []) != ["true"]:
        raise BadRequest(
            "destroying a master key is irreversible: schedule its deletion"
            " (POST /api/master-keys/{key_id}/schedule-deletion, `kmsd mk schedule-deletion`),"
            " or confirm with ?now=true"
        )
    await _kms(request).keyring.destroy(key_id)
    return json_response({"message": "Master key destroyed", "key_id": key_id})


@routes.post("/api/master-keys/{key_id}/schedule-deletion")
async def schedule_key_deletion(request: web.Request) -> web.Response:
    peer = require_admin(request)
    key_id = _key_id(request)
    body = await read_json(request) if request.can_read_body else {}
    if set(body) - {"days"}:
        raise BadRequest("the only field is days")
    # The key ring checks days for every caller (None: its default), so an
    # explicit null is refused here, where it can be told from absent.
    if "days" in body and body["days"] is None:
        raise BadRequest("days must be an integer; leave it out for the default")
    result = await _kms(request).keyring.schedule_deletion(key_id, body.get("days"), _requested_by(peer))
    request[AUDIT_DETAIL] = {"deletion_date": result["deletion_date"]}
    return json_response(result)


@routes.post("/api/master-keys/{key_id}/cancel-deletion")
async def cancel_key_deletion(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response(await _kms(request).keyring.cancel_deletion(_key_id(request)))


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
    # Which database server this daemon uses: on a cluster, the node it
    # moved to last.
    database = request.app[STATE].runtime.store.server
    if not all(checks.values()):
        raise Unavailable("not ready", extra={"ready": False, "checks": checks, "database": database})
    return json_response({"ready": True, "checks": checks, "database": database})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.metrics.vault_up.set(1 if state.vault.is_up else 0)
    state.metrics.vault_restarts.set(state.vault.restarts)
    state.metrics.token_cache_entries.set(state.kms.tokens.cache_entries)
    state.metrics.set_database(state.runtime.store.server, state.runtime.store.failovers)
    try:
        state.metrics.set_rotation(await state.rotator.status())
    except KMSError:
        pass  # the database is down: the rotation gauges keep their last values
    return web.Response(body=state.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


@routes.get("/.well-known/jwks.json")
async def jwks(request: web.Request) -> web.Response:
    return json_response(_kms(request).tokens.jwks())


# -- the app ------------------------------------------------------------------------


def create_app(settings: Settings, *, runtime: Runtime | None = None) -> web.Application:
    log = get_logger(process="daemon")
    metrics = Metrics()
    runtime = runtime or Runtime(settings, log=log, wrap_store=lambda store: instrument_store(store, metrics))
    runtime.vault.observe = metrics.observe_vault
    policy = policy_from(settings)
    audit = None
    if settings.audit_log:
        audit = AuditTrail(settings.audit_log, fail_closed=settings.audit_fail_closed, log=log)
    app = web.Application(middlewares=MIDDLEWARES, client_max_size=settings.max_body_size)
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
    app.add_routes(envelope_routes)
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
