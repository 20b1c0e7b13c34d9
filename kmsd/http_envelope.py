"""The envelope routes: ``/api/encrypt``, ``/api/datakey``,
``/api/decrypt-dek`` and ``/api/rewrap``, each for one item or for a batch.

A batch is ``{"batch": [item, ...]}``, each item the body a single request
would have. Every item is validated and answered on its own, in order: its
answer, or ``{"error", "code", "status"}`` for it alone. A single request is
a batch of one whose error is raised (and rendered by the middleware, as
everywhere). The bearer token, the peer's rights and the rate limits are the
request's, for every item; the vault is asked once per request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiohttp import web

from . import envelope as env
from .errors import BadRequest, Forbidden, KeyPendingDeletion, KMSError, PayloadTooLarge, error_fields
from .http_input import (
    caller_claims,
    read_json,
    require_base64,
    require_context,
    require_dek,
    require_str,
    require_user_id,
)
from .http_state import AUDIT_DETAIL, AUDIT_SUBJECT, STATE, json_response, peer_of
from .service import KMS
from .vault import DEK
from .vault_protocol import Kind

__all__ = ["MAX_BATCH", "UNBOUND_REFUSED", "envelope_routes", "pending_refused"]

envelope_routes = web.RouteTableDef()

# Items of one batch request: 1,000 envelopes of a page of documents in one
# round trip, while the body stays within max_body_size's default (1 MiB).
MAX_BATCH = 1000
# Distinct values an audit line lists for a batch (contexts, owners, keys),
# and the characters it keeps of a context's name or value.
_AUDIT_LIST = 16
_AUDIT_STRING = 64

UNBOUND_REFUSED = (
    'unbound and original-format envelopes are refused (unbound_envelopes = "refuse"); '
    "an admin peer can rewrap one with an owner (POST /api/rewrap)"
)

R = TypeVar("R")


@dataclass(slots=True)
class _Item:
    """One item's validated input."""

    body: dict[str, Any]  # the item as sent: its user_id is read once the caller is known
    context: dict[str, str]
    owner: str | None = None  # whose the envelope is (encrypt, datakey), or the rewrap's target
    data: bytes = b""
    dek: bytes = b""
    encrypted_dek: str = ""
    plaintext: bool = True

    @property
    def bound(self) -> bytes:
        return env.context_digest(self.context)


@dataclass
class _Call(Generic[R]):
    """One request of an envelope route: its items, and what its audit line
    will say of them (no secret: contexts, owners, key ids, envelope kinds)."""

    request: web.Request
    operation: str
    batched: bool
    items: list[_Item | KMSError]
    contexts: list[dict[str, str]] = field(default_factory=list)
    owners: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)

    def refine(self, step: Callable[[_Item], None]) -> None:
        """Once the caller is known: ``step`` completes each valid item (its
        owner, say) or refuses it (by raising) on its own."""
        for n, item in enumerate(self.items):
            if isinstance(item, KMSError):
                continue
            try:
                step(item)
            except KMSError as exc:
                if not self.batched:
                    raise
                self.items[n] = exc

    async def run(self, service: Callable[[list[_Item]], Awaitable[Sequence[R | KMSError]]]) -> list[R | KMSError]:
        """``service`` on the valid items, all at once; invalid ones keep their error."""
        good = [i for i in self.items if not isinstance(i, KMSError)]
        for item in good:
            if item.context and len(self.contexts) < _AUDIT_LIST:
                _note(self.contexts, {_audited(k): _audited(v) for k, v in sorted(item.context.items())})
            if item.owner is not None and len(self.owners) < _AUDIT_LIST:
                _note(self.owners, item.owner)
        answers = iter(await service(good) if good else ())
        return [i if isinstance(i, KMSError) else next(answers) for i in self.items]

    def unbound(self, kind: Kind, *, allowed: bool) -> KMSError | None:
        """An envelope with no owner was made, used or refused: said in the
        audit line and counted in /metrics (how an operator sees who still
        depends on them, before and after ``unbound_envelopes = "refuse"``)."""
        name = kind.name.lower()
        _note(self.kinds, name)
        self.request.app[STATE].metrics.unbound_envelopes.labels(self.operation, name).inc()
        return None if allowed else Forbidden(UNBOUND_REFUSED)

    def answer(self, results: list[R | KMSError], render: Callable[[R], dict[str, Any]]) -> web.Response:
        for r in results:
            if isinstance(r, KMSError) and r.status >= 500:
                # Not the item's fault (no active key, a vault bug): the
                # request fails whole, as when the vault is down.
                raise r
        for r in results:
            if isinstance(r, KeyPendingDeletion):
                pending_refused(self.request, self.operation)
                _note(self.pending, str(r.extra["key_id"]))
        self.request[AUDIT_DETAIL] = self._audit_detail(results)
        if not self.batched:
            (result,) = results
            if isinstance(result, KMSError):
                raise result
            return json_response(render(result))
        return json_response({"batch": [_entry(r, render) for r in results]})

    def _audit_detail(self, results: list[R | KMSError]) -> dict[str, Any]:
        detail: dict[str, Any] = {}
        if self.batched:
            detail["batch"] = len(results)
            detail["failed"] = sum(isinstance(r, KMSError) for r in results)
            for name, values in (("contexts", self.contexts), ("owners", self.owners),
                                 ("envelopes", self.kinds), ("key_ids", self.pending)):
                if values:
                    detail[name] = values
            return detail
        if self.contexts:
            detail["context"] = self.contexts[0]
        if self.kinds:
            detail["envelope"] = self.kinds[0]
        if self.pending:
            detail["key_id"] = self.pending[0]
        return detail


def pending_refused(request: web.Request, operation: str) -> None:
    """Count an unwrap refused because its master key is pending deletion:
    /metrics shows that someone still depends on the key, the audit line
    (which names the key) shows who."""
    request.app[STATE].metrics.pending_deletion_refusals.labels(operation).inc()


def _audited(text: str) -> str:
    # A context's names and values as its audit line shows them: enough to
    # tell documents apart, a bounded line whatever the context's size.
    return text if len(text) <= _AUDIT_STRING else text[: _AUDIT_STRING - 1] + "…"


def _note(values: list[Any], value: Any) -> None:
    if len(values) < _AUDIT_LIST and value not in values:
        values.append(value)


def _entry(result: R | KMSError, render: Callable[[R], dict[str, Any]]) -> dict[str, Any]:
    if isinstance(result, KMSError):
        return {**error_fields(result), "status": result.status}
    return render(result)


def _start(
    request: web.Request, operation: str, body: dict[str, Any], parse: Callable[[dict[str, Any]], _Item]
) -> _Call[Any]:
    """The request's items, each parsed by ``parse`` or refused on its own."""
    if "batch" not in body:
        return _Call(request, operation, False, [parse(body)])
    if len(body) != 1:
        raise BadRequest("a batch request has one field, batch: each item carries its own fields")
    batch = body["batch"]
    if not isinstance(batch, list):
        raise BadRequest("batch must be a list of objects")
    if not batch:
        raise BadRequest("batch must not be empty")
    if len(batch) > MAX_BATCH:
        raise PayloadTooLarge(f"a batch holds at most {MAX_BATCH} items")
    items: list[_Item | KMSError] = []
    for raw in batch:
        try:
            if not isinstance(raw, dict):
                raise BadRequest("each batch item must be a JSON object")
            items.append(parse(raw))
        except KMSError as exc:
            items.append(exc)
    return _Call(request, operation, True, items)


def _user_id(item: dict[str, Any]) -> str | None:
    return require_user_id(item) if item.get("user_id") is not None else None


def _check_user_id(item: dict[str, Any]) -> None:
    _user_id(item)


def _envelope_item(item: dict[str, Any]) -> _Item:
    """An item naming a wrapped DEK (decrypt-dek, rewrap)."""
    encrypted_dek = require_str(item, "encrypted_dek")
    return _Item(item, require_context(item), encrypted_dek=encrypted_dek)


# -- the routes ------------------------------------------------------------------


@envelope_routes.post("/api/encrypt")
async def encrypt(request: web.Request) -> web.Response:
    """The caller's DEK wrapped under the active master key for its owner
    (``user_id``, else the token's subject) and its context, and the data
    encrypted under it. With no owner at all: the original's contract, an
    unbound envelope, unless ``unbound_envelopes = "refuse"``."""
    body = await read_json(request)

    def parse(item: dict[str, Any]) -> _Item:
        data, dek = require_base64(item, "data"), require_dek(item)
        return _Item(item, require_context(item), data=data, dek=dek)

    call = _start(request, "encrypt", body, parse)
    claims = await caller_claims(request, required=False)
    refuse = request.app[STATE].settings.unbound_envelopes == "refuse"

    def bind(item: _Item) -> None:
        item.owner = _user_id(item.body) or (claims.subject if claims is not None else None)
        if item.owner is None and refuse:
            raise BadRequest(
                'user_id or a bearer token is required to bind the DEK to its owner (unbound_envelopes = "refuse")'
            )
        if item.owner is None and item.context:
            raise BadRequest("a context binds an envelope with an owner: give user_id or a bearer token")

    call.refine(bind)
    _audit_subject(request, call)
    results = await call.run(lambda items: _kms(request).encrypt([(i.data, i.dek, i.owner, i.bound) for i in items]))
    for item, result in zip(call.items, results, strict=True):
        if isinstance(item, _Item) and item.owner is None and not isinstance(result, KMSError):
            call.unbound(Kind.UNBOUND, allowed=True)
    return call.answer(results, lambda r: {"encrypted_key": r[0], "encrypted_dek": r[1]})


@envelope_routes.post("/api/datakey")
async def datakey(request: web.Request) -> web.Response:
    """A fresh DEK generated in the vault and wrapped under the active master
    key, bound to its owner as ``/api/encrypt`` binds (``user_id``, else the
    token's subject) and to its context. ``"plaintext": false``: the wrapped
    DEK only (a producer that stores now and lets the owner decrypt later)."""

    def parse(item: dict[str, Any]) -> _Item:
        plaintext = item.get("plaintext", True)
        if not isinstance(plaintext, bool):
            raise BadRequest("plaintext must be true or false")
        return _Item(item, require_context(item), plaintext=plaintext)

    call = _start(request, "datakey", await read_json(request), parse)
    claims = await caller_claims(request, required=False)

    def bind(item: _Item) -> None:
        item.owner = _user_id(item.body) or (claims.subject if claims is not None else None)
        if item.owner is None:
            # No compatibility to keep here: a data key always has an owner.
            raise BadRequest("user_id or a bearer token is required: a data key is bound to its owner")

    call.refine(bind)
    _audit_subject(request, call)
    kms = _kms(request)
    results = await call.run(
        lambda items: _with_items(items, kms.datakey([(i.owner or "", i.bound) for i in items]))
    )
    return call.answer(results, lambda r: _datakey_answer(*r))


def _datakey_answer(item: _Item, result: tuple[bytes, str]) -> dict[str, Any]:
    dek, encrypted_dek = result
    if not item.plaintext:
        return {"encrypted_dek": encrypted_dek}
    return {"dek": dek.hex(), "encrypted_dek": encrypted_dek}


@envelope_routes.post("/api/decrypt-dek")
async def decrypt_dek(request: web.Request) -> web.Response:
    """The DEK of an envelope the token's subject may open, given the
    context it was bound to."""

    call = _start(request, "decrypt_dek", await read_json(request), _envelope_item)
    claims = await caller_claims(request, required=True)
    assert claims is not None
    # The original key-server sends the record's user_id beside its token:
    # checked as input, but the token alone decides whose DEK this may be.
    call.refine(lambda item: _check_user_id(item.body))
    allowed = request.app[STATE].settings.unbound_envelopes == "allow"
    results = await call.run(
        lambda items: _kms(request).decrypt_dek([(i.encrypted_dek, i.bound) for i in items], claims.subject)
    )

    def admit(dek: DEK | KMSError) -> DEK | KMSError:
        if isinstance(dek, DEK) and dek.legacy:
            return call.unbound(dek.kind, allowed=allowed) or dek
        return dek

    return call.answer([admit(r) for r in results], lambda dek: {"dek": dek.key.hex()})


@envelope_routes.post("/api/rewrap")
async def rewrap(request: web.Request) -> web.Response:
    """An envelope's DEK wrapped anew under the active master key, in kmsd's
    authenticated format, inside the vault: bound to ``user_id`` if given
    (another subject than the caller's own needs an admin peer), else bound
    as it was, and to the same context. How applications upgrade the
    envelopes in their own tables."""
    call = _start(request, "rewrap", await read_json(request), _envelope_item)
    claims = await caller_claims(request, required=True)
    assert claims is not None
    admin = request.app[STATE].policy.is_admin(peer_of(request))
    # Under "refuse" an admin peer may still upgrade a straggler.
    allowed = admin or request.app[STATE].settings.unbound_envelopes == "allow"

    def check(item: _Item) -> None:
        item.owner = _user_id(item.body)
        if item.owner is not None and item.owner != claims.subject and not admin:
            raise Forbidden("binding an envelope to another subject than the token's requires an admin peer")

    call.refine(check)
    _audit_subject(request, call, default=claims.subject)
    kms = _kms(request)

    async def service(items: list[_Item]) -> list[tuple[str, Kind] | KMSError]:
        return await kms.rewrap_envelope([(i.encrypted_dek, i.bound, i.owner) for i in items], claims.subject)

    results = await call.run(service)

    def admit(result: tuple[str, Kind] | KMSError) -> tuple[str, Kind] | KMSError:
        if not isinstance(result, KMSError) and result[1].unbound:
            return call.unbound(result[1], allowed=allowed) or result
        return result

    return call.answer([admit(r) for r in results], lambda r: {"encrypted_dek": r[0]})


def _kms(request: web.Request) -> KMS:
    return request.app[STATE].kms


def _audit_subject(request: web.Request, call: _Call[Any], *, default: str | None = None) -> None:
    """A single request's audit line names whose envelope it is; a batch's
    names the caller (the token's subject, if any) and lists the owners."""
    if call.batched:
        return
    (item,) = call.items
    if isinstance(item, _Item):
        request[AUDIT_SUBJECT] = item.owner or default


async def _with_items(
    items: list[_Item], answers: Awaitable[Sequence[R | KMSError]]
) -> list[tuple[_Item, R] | KMSError]:
    """Each answer beside its item (the rendering needs both)."""
    return [a if isinstance(a, KMSError) else (i, a) for i, a in zip(items, await answers, strict=True)]
