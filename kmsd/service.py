"""What kmsd does, independent of HTTP: store and read records, wrap and
unwrap DEKs, issue tokens, move records under the active master key. It
joins the store, the vault, the key ring (keyring.py: which keys the vault
holds) and the token service; the HTTP layer (server.py, http_input.py)
only validates input and renders output."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from . import envelope as env
from .auth import Claims, TokenService
from .errors import Conflict, DecryptionFailed, KeyPendingDeletion, KMSError, NotFound, Unauthorized, Unavailable
from .keyring import KeyRing
from .store import Record, Store, now_utc
from .vault import DEK, UnknownKey, VaultClient
from .vault_protocol import Kind, Rewrap

__all__ = ["KMS", "RewrapResult"]

X = TypeVar("X")


class _Opened(Protocol):
    @property
    def key_id(self) -> str: ...


OpenedT = TypeVar("OpenedT", bound=_Opened)

# How an envelope opens for a caller: bound to it as an envelope, or as the
# DEK of its own stored record (the original key-server's read flow).
_ENVELOPE_PURPOSES = (env.Purpose.ENVELOPE, env.Purpose.RECORD)
_RECORD_PURPOSES = (env.Purpose.RECORD,)


@dataclass
class RewrapResult:
    rewrapped: int = 0  # now under the active key (v1 rows rewrapped in the vault, legacy rows upgraded)
    changed: int = 0  # replaced by a client meanwhile: left to that write
    unreadable: int = 0  # no master key reads it: left as it is


class KMS:
    def __init__(
        self,
        store: Store,
        vault: VaultClient,
        tokens: TokenService,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.vault = vault
        self.tokens = tokens
        self._clock = clock
        self.keyring = KeyRing(store, vault, tokens, clock=clock)

    # -- master keys ---------------------------------------------------------

    async def rewrap_records(self, records: Sequence[Record], *, concurrency: int = 16) -> RewrapResult:
        """Move ``records`` under the active master key. v1 rows are rewrapped
        inside the vault in one call (the DEK never reaches the daemon) and
        written with one compare-and-set per row, in one transaction; rows of
        the original system are upgraded one by one (their data is CBC, so it
        is re-encrypted, as ``migrate-legacy`` does)."""
        active = self.keyring.state.active_key_id
        result = RewrapResult()
        if active is None:
            raise Unavailable("no active master key")
        known: list[tuple[Record, str, str]] = []  # v1 under the active key already: attribute it
        to_vault: list[tuple[Record, bytes]] = []
        legacy: list[Record] = []
        for record in records:
            try:
                wrapped = env.b64d(record.encrypted_dek or "")
            except env.InvalidToken:
                result.unreadable += 1
                continue
            try:
                key_id = env.dek_key_id(wrapped)
            except env.InvalidToken:
                legacy.append(record)
                continue
            if env.is_unbound_dek(wrapped):
                # Written by a client of the original through an unbound
                # envelope: its data is CBC, so it is upgraded like an original row.
                legacy.append(record)
                continue
            if key_id == active:
                known.append((record, record.encrypted_dek or "", active))
            else:
                to_vault.append((record, wrapped))
        changes = list(known)
        if to_vault:
            outcomes = await self.vault.rewrap_deks(
                [(r.user_id, env.Purpose.RECORD, w) for r, w in to_vault]
            )
            for (record, _), (outcome, new) in zip(to_vault, outcomes, strict=False):
                if outcome == Rewrap.OK:
                    changes.append((record, env.b64e(new), active))
                else:
                    result.unreadable += 1
        if changes:
            matched = await self.store.rewrap_records(changes)
            result.rewrapped += matched
            result.changed += len(changes) - matched
        if legacy:
            gate = asyncio.Semaphore(concurrency)

            async def upgrade(record: Record) -> None:
                async with gate:
                    try:
                        outcome = await self.upgrade_record(record)
                    except DecryptionFailed:
                        result.unreadable += 1
                        return
                if outcome == "changed":
                    result.changed += 1
                else:
                    result.rewrapped += 1

            await asyncio.gather(*(upgrade(r) for r in legacy))
        return result

    # -- tokens --------------------------------------------------------------

    async def issue_token(self, user_id: str) -> str:
        return (await self.issue_token_with_id(user_id))[0]

    async def issue_token_with_id(
        self, user_id: str, *, id_claim: int | None = None, renewing: Claims | None = None
    ) -> tuple[str, str]:
        """A token for ``user_id`` and its ``jti`` (for the audit trail);
        ``id_claim``: the integer the caller named the user by, if it did.
        A new session (an admin's word) is tied to the subject's generation
        now; ``renewing`` (a token of that subject, checked current) keeps
        its generation and its session's start."""
        if renewing is not None:
            return await self._sign(user_id, id_claim, renewing.generation, renewing)
        generation, _ = await self.store.token_state(user_id, "")
        return await self._sign(user_id, id_claim, generation, None)

    async def _sign(
        self, user_id: str, id_claim: int | None, generation: str, continuing: Claims | None
    ) -> tuple[str, str]:
        """A token; ``continuing``: the token whose session it continues
        (its start and its id), else a new session."""
        claims = self.tokens.claims_for(
            user_id, id_claim=id_claim, generation=generation,
            auth_time=continuing.auth_time if continuing is not None else None,
            session=continuing.session if continuing is not None else None,
        )
        return await self.vault.sign_jwt(claims), str(claims["jti"])

    async def verify_token(self, token: str) -> Claims:
        """The claims of a token that is good now: signed by one of the
        signing keys, unexpired, within its session's age, not revoked, and
        of its subject's current generation (the store's word, asked at
        every use, so every daemon of the database agrees at once)."""
        claims = self.tokens.cached(token)
        if claims is None:
            if not self.tokens.has_key(token):
                # Signed with a key this daemon has not loaded (another daemon
                # may have added one): reload, then judge.
                await self.keyring.reload_if_stale()
            claims = self.tokens.verify(token)
        try:
            await self._check_current(claims)
        except Unauthorized:
            self.tokens.forget(token)
            raise
        return claims

    async def _check_current(self, claims: Claims) -> None:
        generation, revoked = await self.store.token_state(claims.subject, claims.revocation_id)
        # Not a secret (it is in the token's payload): a plain comparison,
        # which also takes any text a signed claim may hold.
        if revoked or generation != claims.generation:
            raise Unauthorized()

    async def revoke_token(self, claims: Claims) -> None:
        """Void a token and every renewal made from it (its session), on
        every daemon of the database. Remembered until every token of the
        session has expired: a renewal made before now expires within
        token_lifetime, and none can be made after (renewing needs a live
        token of the session)."""
        expires = max(claims.expires, int(self._clock()) + self.tokens.lifetime)
        await self.store.revoke_token(claims.revocation_id, expires)

    async def revoke_subject(self, user_id: str) -> None:
        """Void every token of ``user_id``: a new generation (its record, if
        any, stays; only an admin can issue its tokens now)."""
        await self.store.set_generation(user_id, _new_generation())

    # -- records -------------------------------------------------------------

    async def store_record(
        self, user_id: str, data: str, *, owner: Claims | None = None, id_claim: int | None = None
    ) -> tuple[str, str]:
        """Encrypt ``data`` under a new DEK and store it; the answer is a
        token for ``user_id`` and its ``jti``. Without ``owner`` (a current
        token of ``user_id``) an existing user id is ``Conflict``; with it
        the row is replaced atomically (``_replace``).

        A new record starts a new generation of its user's tokens: a token
        issued before it (say, to whoever held the id before it was deleted)
        never opens it."""
        dek = await self.vault.new_dek(user_id, env.Purpose.RECORD)
        record = Record(
            user_id,
            env.b64e(env.encrypt_data(dek.key, data.encode("utf-8"), user_id)),
            env.b64e(dek.wrapped),
            now_utc(),
            env.dek_key_id(dek.wrapped),
        )
        if owner is not None:
            return await self._replace(record, owner, id_claim)
        generation = _new_generation()
        # Sign first: a write that succeeded must not be followed by a
        # failure that makes the client believe it did not.
        signed = await self._sign(user_id, id_claim, generation, None)
        try:
            await self.store.insert_record(record, generation=generation)
        except Conflict:
            raise Conflict("user_id already has a stored key; present its token to replace it") from None
        return signed

    async def _replace(self, record: Record, owner: Claims, id_claim: int | None) -> tuple[str, str]:
        """Insert or replace, compare-and-set on the row it replaces and on
        the owner's generation, so that the wrapped DEK it drops is released
        (``_release``) if it has no owner, and a token voided meanwhile
        replaces nothing. The answer's token continues the owner's session."""
        for _ in range(_CAS_ATTEMPTS):
            old = await self.store.get_record(record.user_id)
            if old is None:
                generation = _new_generation()
                signed = await self._sign(record.user_id, id_claim, generation, owner)
                try:
                    await self.store.insert_record(record, generation=generation)
                    return signed
                except Conflict:
                    continue  # created meanwhile: replace that one
            signed = await self._sign(record.user_id, id_claim, owner.generation, owner)
            if await self.store.replace_record(
                old, record, release=_release(old), expect_generation=owner.generation
            ):
                return signed
            await self._check_current(owner)  # a new generation voided the token
        raise Conflict("the record changed concurrently; try again")

    async def fetch_record(self, user_id: str) -> str:
        record = await self.store.get_record(user_id)
        if record is None:
            raise NotFound("no key stored for this user")
        try:
            blob = env.b64d(record.encrypted_key or "")
        except env.InvalidToken:
            raise DecryptionFailed() from None
        dek = await self._unwrap(user_id, record.encrypted_dek or "", refuse_pending=True)
        try:
            if dek.legacy:
                plain = env.legacy_decrypt(dek.key, blob)
            else:
                plain = env.decrypt_data(dek.key, blob, user_id)
            return plain.decode("utf-8")
        except (env.InvalidToken, UnicodeDecodeError):
            raise DecryptionFailed() from None

    async def upgrade_record(self, record: Record) -> Literal["upgraded", "current", "changed"]:
        """Rewrite a row of the original system in the v1 format: a new DEK
        from the vault, the same plaintext, the same ``created_at``.
        "current" when the row is v1 already; "changed" when another writer
        replaced it meanwhile (the write is compare-and-set, so a concurrent
        update is never clobbered).
        ``DecryptionFailed`` when no master key reads it; it is then left
        as it is."""
        try:
            blob = env.b64d(record.encrypted_key or "")
        except env.InvalidToken:
            raise DecryptionFailed() from None
        # The rotation moves records off a key pending deletion: not refused.
        dek = await self._unwrap(record.user_id, record.encrypted_dek or "", refuse_pending=False)
        if not dek.legacy:
            return "current"
        try:
            plain = env.legacy_decrypt(dek.key, blob)
        except env.InvalidToken:
            raise DecryptionFailed() from None
        fresh = await self.vault.new_dek(record.user_id, env.Purpose.RECORD)
        upgraded = Record(
            record.user_id,
            env.b64e(env.encrypt_data(fresh.key, plain, record.user_id)),
            env.b64e(fresh.wrapped),
            record.created_at,
            env.dek_key_id(fresh.wrapped),
        )
        replaced = await self.store.replace_record(record, upgraded, release=_release(record))
        return "upgraded" if replaced else "changed"

    async def delete_record(self, owner: Claims) -> None:
        """Delete the owner's record. Its tokens die with it (a new
        generation in the same transaction): one kept from before cannot
        read a record created under the same id later."""
        user_id = owner.subject
        for _ in range(_CAS_ATTEMPTS):
            old = await self.store.get_record(user_id)
            if old is None:
                break
            if await self.store.delete_record(
                user_id,
                only_if=old,
                release=_release(old),
                expect_generation=owner.generation,
                generation=_new_generation(),
            ):
                return
            await self._check_current(owner)
        raise NotFound("no key stored for this user")

    async def _unwrap(self, owner: str, encrypted_dek: str, *, refuse_pending: bool) -> DEK:
        """The DEK of ``owner``'s stored record, as ``_open_each`` opens it."""
        (dek,) = await self._open_each(
            [(encrypted_dek, b"")],
            lambda todo: self.vault.unwrap_deks([(owner, _RECORD_PURPOSES, w, c) for w, c in todo]),
            refuse_pending=refuse_pending,
        )
        if isinstance(dek, KMSError):
            raise dek
        return dek

    # -- envelope API ----------------------------------------------------------
    #
    # Each takes a list of items and answers each with its value or the error
    # it alone ended with (a batch request; a single one is a list of one),
    # in one vault round trip. ``context``: a context's digest
    # (envelope.context_digest), b"" for none, bound into the wrapped DEK.

    async def encrypt(
        self, items: Sequence[tuple[bytes, bytes, str | None, bytes]]
    ) -> list[tuple[str, str] | KMSError]:
        """For each ``(data, dek, owner, context)``: ``(encrypted_key,
        encrypted_dek)``. With an owner: kmsd's format, bound to it. Without:
        the original's answer, an *unbound* envelope (``encrypted_key`` is
        the original's CBC, which its clients decrypt themselves;
        ``encrypted_dek`` has no owner)."""
        wrapped = await self.vault.wrap_deks([
            (owner or "", env.Purpose.ENVELOPE if owner is not None else env.Purpose.UNBOUND, dek, context)
            for _, dek, owner, context in items
        ])
        out: list[tuple[str, str] | KMSError] = []
        for (data, dek, owner, _), w in zip(items, wrapped, strict=True):
            if isinstance(w, KMSError):
                out.append(w)
            elif owner is None:
                out.append((env.b64e(env.legacy_encrypt(dek, data)), env.b64e(w)))
            else:
                out.append((env.b64e(env.encrypt_data(dek, data, owner)), env.b64e(w)))
        return out

    async def datakey(self, items: Sequence[tuple[str, bytes]]) -> list[tuple[bytes, str] | KMSError]:
        """For each ``(owner, context)``: a new DEK from the vault and its
        wrapped form, an envelope bound to ``owner`` and ``context`` (what
        ``decrypt_dek`` gives back to that owner, with that context, only)."""
        deks = await self.vault.new_deks([(owner, env.Purpose.ENVELOPE, context) for owner, context in items])
        return [d if isinstance(d, KMSError) else (d.key, env.b64e(d.wrapped)) for d in deks]

    async def decrypt_dek(self, items: Sequence[tuple[str, bytes]], caller: str) -> list[DEK | KMSError]:
        """For each ``(encrypted_dek, context)``: the DEK of an envelope bound
        to ``caller``, of ``caller``'s own stored record, or of an envelope
        with no owner (``DEK.kind`` says which: the caller decides whether it
        admits those) that is not another user's stored record."""
        opened = await self._open_each(
            items, lambda todo: self.vault.unwrap_deks([(caller, _ENVELOPE_PURPOSES, w, c) for w, c in todo])
        )
        refused = await self._refused_unbound(
            [(n, d.kind, d.wrapped) for n, d in enumerate(opened) if isinstance(d, DEK) and d.legacy], caller
        )
        return [refused.get(n, d) for n, d in enumerate(opened)]

    async def rewrap_envelope(
        self, items: Sequence[tuple[str, bytes, str | None]], caller: str
    ) -> list[tuple[str, Kind] | KMSError]:
        """For each ``(encrypted_dek, context, target)``: the envelope's DEK
        wrapped anew under the active master key, in the vault (the DEK
        never reaches the daemon), bound to ``target`` or (None) as it was,
        and to the same context. The caller must be one ``decrypt_dek``
        would give the DEK to. (new encrypted_dek, how the old one opened)."""
        opened = await self._open_each(
            [(e, (c, t)) for e, c, t in items],
            lambda todo: self.vault.rewrap_envelopes(
                [(caller, _ENVELOPE_PURPOSES, w, t, c) for w, (c, t) in todo]
            ),
        )
        refused = await self._refused_unbound(
            [(n, o.kind, env.b64d(text)) for n, ((text, _, _), o) in enumerate(zip(items, opened, strict=True))
             if not isinstance(o, KMSError) and o.kind.unbound],
            caller,
        )
        return [
            o if isinstance(o, KMSError) else refused.get(n) or (env.b64e(o.wrapped), o.kind)
            for n, o in enumerate(opened)
        ]

    async def _open_each(
        self,
        items: Sequence[tuple[str, X]],
        call: Callable[[list[tuple[bytes, X]]], Awaitable[list[OpenedT | KMSError]]],
        *,
        refuse_pending: bool = True,
    ) -> list[OpenedT | KMSError]:
        """``call`` on every ``(wrapped, extra)`` that may be opened: not
        malformed (``DecryptionFailed``), not under a key pending deletion
        (``KeyPendingDeletion``: by the key the blob names before the vault
        is asked, and by the key that opened it after, for the original's
        DEKs name none). Items naming a master key this daemon has not
        loaded (another daemon added it) are tried once more after the key
        rows were reloaded; still unknown, they failed to decrypt."""
        # None: not answered yet (still None at the end: its key is unknown).
        out: list[OpenedT | KMSError | None] = []
        todo: list[tuple[int, tuple[bytes, X]]] = []
        pending = self.keyring.state.pending_deletion if refuse_pending else frozenset()
        for text, extra in items:
            wrapped = _wrapped_dek(text)
            if isinstance(wrapped, KMSError):
                refusal: KMSError | None = wrapped
            else:
                refusal = self._pending_refusal(wrapped, pending) if pending else None
            if refusal is None:
                assert not isinstance(wrapped, KMSError)
                todo.append((len(out), (wrapped, extra)))
            out.append(refusal)
        for attempt in range(2):
            if not todo:
                break
            answers = await call([item for _, item in todo])
            unknown: list[tuple[int, tuple[bytes, X]]] = []
            for (index, item), answer in zip(todo, answers, strict=True):
                if isinstance(answer, UnknownKey):
                    unknown.append((index, item))
                elif not isinstance(answer, KMSError) and answer.key_id in pending:
                    out[index] = KeyPendingDeletion(extra={"key_id": answer.key_id})
                else:
                    out[index] = answer
            todo = unknown if attempt == 0 and unknown and await self.keyring.reload_if_stale() else []
        return [DecryptionFailed() if o is None else o for o in out]

    @staticmethod
    def _pending_refusal(wrapped: bytes, pending: frozenset[str]) -> KMSError | None:
        """A wrapped DEK under a master key scheduled for deletion opens for
        nobody until the deletion is cancelled: its own error, naming the
        key (it is in the blob), so the caller and the operator can tell."""
        try:
            key_id = env.dek_key_id(wrapped)
        except env.InvalidToken:
            return None
        if key_id in pending:
            return KeyPendingDeletion(extra={"key_id": key_id})
        return None

    async def _refused_unbound(self, opened: Sequence[tuple[int, Kind, bytes]], caller: str) -> dict[int, KMSError]:
        """Of the ``(index, kind, wrapped)`` that opened with no owner, those
        that are another user's stored record's DEK: each costs two reads,
        so a batch of them runs a few at a time, not one after another."""
        gate = asyncio.Semaphore(_OWNER_CHECKS)
        refused: dict[int, KMSError] = {}

        async def check(index: int, kind: Kind, wrapped: bytes) -> None:
            async with gate:
                try:
                    await self._check_unbound(kind, wrapped, caller)
                except DecryptionFailed as exc:
                    refused[index] = exc

        await asyncio.gather(*(check(*item) for item in opened))
        return refused

    async def _check_unbound(self, kind: Kind, wrapped: bytes, caller: str) -> None:
        """An envelope with no owner is anyone's (the original's rule) unless
        it is a stored record's DEK: then it is its owner's only."""
        if not kind.unbound:
            return
        # The canonical text: a client could send the same bytes in another
        # base64 spelling (unused trailing bits) to miss the row. And a
        # record's wrapped DEK stays its owner's after the record was
        # upgraded, replaced or deleted: a copy of the old row (a backup)
        # still has the data that DEK opens.
        owners = await self.store.record_owners(env.b64e(wrapped))
        owners += await self.store.released_owners(_digest(wrapped))
        if owners and caller not in owners:
            raise DecryptionFailed()

    # -- health ----------------------------------------------------------------

    async def readiness(self) -> dict[str, bool]:
        store_ok = True
        try:
            await asyncio.wait_for(self.store.ping(), 1.0)
        except (TimeoutError, Unavailable):
            store_ok = False
        checks = {
            "vault": self.vault.is_up,
            "store": store_ok,
            "active_master_key": self.keyring.state.active_key_id is not None,
        }
        launcher = self.vault.launcher_up
        if launcher is not None:
            checks["launcher"] = launcher
        return checks


# Owner checks of unbound DEKs a batch runs at once (two reads each).
_OWNER_CHECKS = 16
# Rounds of read-then-compare-and-set before a concurrent writer wins.
_CAS_ATTEMPTS = 5


def _new_generation() -> str:
    return secrets.token_hex(8)


def _digest(wrapped: bytes) -> bytes:
    return hashlib.sha256(b"kmsd/released-dek/v1" + wrapped).digest()


def _release(record: Record) -> bytes | None:
    """The digest to remember when ``record`` leaves ``kms_keys``, if its
    wrapped DEK has no owner binding (the original's CBC, or an unbound one a
    client of the original stored): any valid token could unwrap it
    otherwise. None for kmsd's own v1 records, bound to their owner."""
    try:
        wrapped = env.b64d(record.encrypted_dek or "")
    except env.InvalidToken:
        return None  # nothing unwraps it anyway
    if not wrapped:
        return None
    try:
        if env.dek_key_id(wrapped) and not env.is_unbound_dek(wrapped):
            return None
    except env.InvalidToken:
        pass
    return _digest(wrapped)


def _wrapped_dek(text: str) -> bytes | KMSError:
    try:
        return env.b64d(text)
    except env.InvalidToken:
        return DecryptionFailed()
