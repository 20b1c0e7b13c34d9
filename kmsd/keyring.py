"""The keys the vault holds: every master key and the signing key, loaded
from the store at each vault (re)start and reloaded when another daemon of
the database changed them; adding, listing and destroying master keys, at
once or after a scheduled window. The key material only ever passes through
here wrapped under the root key."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import envelope as env
from .auth import TokenService, random_kid
from .errors import BadRequest, Conflict, NotFound
from .store import KeyDeletion, MasterKeyRow, SigningKeyRow, Store, now_utc, utc_text
from .vault import VaultClient

__all__ = ["DEFAULT_DELETION_DAYS", "MAX_DELETION_DAYS", "MIN_DELETION_DAYS", "DueDeletions", "KeyRing", "KeyState"]

# The window of a scheduled deletion, in days (AWS KMS's bounds are 7 and
# 30 too): long enough to notice a client that still needs the key, and
# cancel.
MIN_DELETION_DAYS = 7
MAX_DELETION_DAYS = 30
DEFAULT_DELETION_DAYS = 30
_DAY = 86400.0
# The requested_by column's width on MySQL.
_REQUESTED_BY_MAX = 255


@dataclass(frozen=True)
class KeyState:
    active_key_id: str | None
    master_keys: tuple[MasterKeyRow, ...]
    # Retired keys scheduled for deletion: nothing client-facing unwraps under them.
    pending_deletion: frozenset[str] = frozenset()


@dataclass
class DueDeletions:
    """What one ``destroy_due`` did: the keys destroyed, and the due ones
    left pending with why (the message and the records that hold them)."""

    destroyed: list[str] = field(default_factory=list)
    blocked: dict[str, tuple[str, int]] = field(default_factory=dict)


def _in_use(key_id: str, counts: dict[str | None, int]) -> tuple[str, int] | None:
    """Why a retired key cannot be destroyed now (and the records that hold
    it), or None. The same rule as the store's delete guard."""
    in_use = counts.get(key_id, 0)
    if in_use:
        return f"master key {key_id} still wraps {in_use} records; rotate and let the rewrap finish first", in_use
    unclassified = counts.get(None, 0)
    if unclassified:
        return (
            f"{unclassified} records are not yet attributed to a master key (written by the original"
            " system or before kmsd tracked keys); a rotation (`kmsd mk rotate`) attributes them",
            unclassified,
        )
    return None


class KeyRing:
    def __init__(
        self, store: Store, vault: VaultClient, tokens: TokenService, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.vault = vault
        self.tokens = tokens
        self._clock = clock
        self.state = KeyState(None, ())
        self._lock = asyncio.Lock()
        self._last_load = float("-inf")
        self._signing_loaded: tuple[SigningKeyRow, ...] = ()
        self._deletions_loaded: tuple[KeyDeletion, ...] = ()
        self._vault_signing: tuple[int | None, str] | None = None
        vault.on_start = self.load

    async def load(self) -> None:
        """Give the vault every master key and the signing key from the
        store, creating the first ones on a new database. Runs at every
        vault (re)start and after a rotation."""
        async with self._lock:
            rows = await self.store.list_master_keys()
            if not rows:
                await self._create(description="first master key", first=True)
                rows = await self.store.list_master_keys()
            active = next((r.key_id for r in rows if r.status == "active"), None)
            await self.vault.load_master_keys(active, [(r.key_id, r.key_material) for r in rows])
            deletions = tuple(await self.store.list_key_deletions())
            self.state = KeyState(active, tuple(rows), self._pending(rows, deletions))
            self._deletions_loaded = deletions
            await self._load_signing()
            self._last_load = time.monotonic()

    @staticmethod
    def _pending(rows: Sequence[MasterKeyRow], deletions: Sequence[KeyDeletion]) -> frozenset[str]:
        # Only keys that exist and are retired: a deletion row left behind
        # (its key deleted by other means) names nothing to refuse.
        retired = {r.key_id for r in rows if r.status == "retired"}
        return frozenset(d.key_id for d in deletions if d.key_id in retired)

    async def _reload_deletions(self) -> None:
        """The pending set anew, without a vault round trip (the key rows
        did not change)."""
        async with self._lock:
            deletions = tuple(await self.store.list_key_deletions())
            self.state = replace(self.state, pending_deletion=self._pending(self.state.master_keys, deletions))
            self._deletions_loaded = deletions

    async def _load_signing(self) -> None:
        signing = await self.store.list_signing_keys()
        if not any(s.status == "active" for s in signing):
            kid = random_kid()
            wrapped, public = await self.vault.new_signing_key(kid)
            # Only if still none: another daemon may be starting too.
            await self.store.add_first_signing_key(
                SigningKeyRow(kid, base64.b64encode(public).decode(), wrapped, "active", now_utc())
            )
            signing = await self.store.list_signing_keys()
        current = next(s for s in signing if s.status == "active")
        # The same key in the same vault process needs no reload (after a
        # root-key rotation, its new row would not open under the old root).
        loaded = (self.vault.pid, current.kid)
        if loaded != self._vault_signing:
            await self.vault.load_signing_key(current.kid, current.key_material)
            self._vault_signing = loaded
        self.tokens.set_public_keys((s.kid, s.public_key) for s in signing)
        self._signing_loaded = tuple(signing)

    async def refresh(self) -> bool:
        """Reload the key rows if another process changed them (a rotation,
        an added or destroyed key, a deletion scheduled or cancelled). Every
        daemon calls this periodically:
        that period bounds how long it may keep wrapping under a key that
        another daemon retired. True if something changed."""
        rows = tuple(await self.store.list_master_keys())
        signing = tuple(await self.store.list_signing_keys())
        deletions = tuple(await self.store.list_key_deletions())
        if rows == self.state.master_keys and signing == self._signing_loaded:
            if deletions == self._deletions_loaded:
                return False
            # Another daemon scheduled or cancelled a deletion.
            await self._reload_deletions()
            return True
        await self.load()
        return True

    async def reload_if_stale(self) -> bool:
        """Reload key rows when something names a key this daemon has not
        loaded; at most once a second, so garbage input cannot turn into a
        database query per request."""
        if time.monotonic() - self._last_load < 1.0:
            return False
        await self.load()
        return True

    async def _create(self, description: str | None, *, first: bool = False) -> str | None:
        """A new active master key; ``first``: only if there is none yet
        (another daemon starting at the same time may win: None)."""
        # key-<unix ms> as the original named them; a clash within one
        # millisecond takes the next one.
        ms = int(self._clock() * 1000)
        for attempt in range(5):
            key_id = f"key-{ms + attempt}"
            wrapped = await self.vault.new_master_key(key_id)
            row = MasterKeyRow(key_id, wrapped, "active", now_utc(), description)
            try:
                if first:
                    return key_id if await self.store.add_first_master_key(row) else None
                await self.store.add_master_key(row)
                return key_id
            except Conflict:
                continue
        raise Conflict("could not allocate a master key id")

    async def add(self, description: str | None = None) -> tuple[str, str | None]:
        """The original's ``addMasterKey``: a new active master key, every
        other one retired (and still loaded, so everything wrapped before
        still decrypts). (new key id, previous active key id)."""
        # Start from the rows as they are now: a root key that no longer
        # unwraps them (rotated elsewhere) fails here, before a key is added
        # that other daemons could not read.
        await self.load()
        previous = self.state.active_key_id
        async with self._lock:
            key_id = await self._create(description=description)
        assert key_id is not None  # only a first key can lose to another daemon
        await self.load()
        return key_id, previous

    async def active(self) -> MasterKeyRow | None:
        """The original's ``getActiveMasterKey`` (the row, never the key)."""
        return next((r for r in await self.store.list_master_keys() if r.status == "active"), None)

    async def retired(self) -> list[MasterKeyRow]:
        """The original's ``getRetiredMasterKeys``."""
        return [r for r in await self.store.list_master_keys() if r.status == "retired"]

    async def listing(self) -> list[dict[str, Any]]:
        """The original's ``listMasterKeys``, with how many records each key
        still wraps; a key scheduled for deletion has the status
        "pending_deletion", its "deletion_date", and once that has passed
        while records still hold it, "deletion_blocked" (why)."""
        counts = await self.store.count_records_by_key()
        deletions = {d.key_id: d for d in await self.store.list_key_deletions()}
        now = self._clock()
        listed = []
        for r in await self.store.list_master_keys():
            entry: dict[str, Any] = {
                "key_id": r.key_id,
                "status": r.status,
                "created_at": r.created_at,
                "description": r.description,
                "records": counts.get(r.key_id, 0),
            }
            deletion = deletions.get(r.key_id)
            if deletion is not None and r.status == "retired":
                entry["status"] = "pending_deletion"
                entry["deletion_date"] = utc_text(deletion.delete_after)
                held = _in_use(r.key_id, counts) if deletion.delete_after <= now else None
                if held is not None:
                    entry["deletion_blocked"] = held[0]
            listed.append(entry)
        return listed

    async def overview(self) -> dict[str, Any]:
        """The answer of ``GET /api/master-keys`` and ``kmsd mk list``."""
        return {"active_key_id": self.state.active_key_id, "master_keys": await self.listing()}

    async def destroy(self, key_id: str) -> None:
        """Delete a retired master key that no stored record uses. Anything
        still wrapped under it (a DEK a caller keeps from /api/encrypt) can
        never be decrypted again."""
        row = next((r for r in await self.store.list_master_keys() if r.key_id == key_id), None)
        if row is None:
            raise NotFound("no such master key")
        counts = await self.store.count_records_by_key()
        if row.status == "active":
            in_use = counts.get(key_id, 0)
            raise Conflict(
                f"master key {key_id} is the active key ({in_use} records); rotate first",
                extra={"records": in_use},
            )
        held = _in_use(key_id, counts)
        if held is not None:
            raise Conflict(held[0], extra={"records": held[1]})
        if not await self.store.delete_master_key(key_id):
            raise Conflict(f"master key {key_id} came into use meanwhile; try again")
        await self.load()

    # -- scheduled deletion ----------------------------------------------------------

    async def _row(self, key_id: str) -> MasterKeyRow:
        row = next((r for r in await self.store.list_master_keys() if r.key_id == key_id), None)
        if row is None:
            raise NotFound("no such master key")
        return row

    async def schedule_deletion(
        self, key_id: str, days: int | None = None, requested_by: str | None = None
    ) -> dict[str, Any]:
        """Schedule a retired key for deletion ``days`` from now (by the
        injected clock). Until then it wraps nothing (it is retired) and
        nothing client-facing unwraps under it, so a client that still needs
        it shows up while the deletion can be cancelled; afterwards
        ``destroy_due`` deletes it, if no stored record uses it. ``days``:
        ``DEFAULT_DELETION_DAYS`` when None."""
        if days is None:
            days = DEFAULT_DELETION_DAYS
        if isinstance(days, bool) or not isinstance(days, int) or not MIN_DELETION_DAYS <= days <= MAX_DELETION_DAYS:
            raise BadRequest(f"days must be an integer from {MIN_DELETION_DAYS} to {MAX_DELETION_DAYS}")
        if (await self._row(key_id)).status == "active":
            raise Conflict(f"master key {key_id} is the active key; rotate first, then schedule its deletion")
        pending = {d.key_id: d for d in await self.store.list_key_deletions()}
        if key_id in pending:
            raise Conflict(
                f"master key {key_id} is already scheduled for deletion on"
                f" {utc_text(pending[key_id].delete_after)} UTC"
            )
        now = self._clock()
        deletion = KeyDeletion(
            key_id, now + days * _DAY, (requested_by or "")[:_REQUESTED_BY_MAX] or None, utc_text(now)
        )
        try:
            scheduled = await self.store.schedule_key_deletion(deletion)
        except Conflict:
            raise Conflict(f"master key {key_id} is already scheduled for deletion") from None
        if not scheduled:
            # Destroyed (or, impossibly, made active) since the look above.
            raise NotFound("no such master key")
        await self._reload_deletions()
        return {"key_id": key_id, "status": "pending_deletion", "deletion_date": utc_text(deletion.delete_after)}

    async def cancel_deletion(self, key_id: str) -> dict[str, Any]:
        """Take a key off the deletion schedule: retired again, usable to
        unwrap as before."""
        await self._row(key_id)
        if not await self.store.cancel_key_deletion(key_id):
            raise Conflict(f"master key {key_id} is not scheduled for deletion")
        await self._reload_deletions()
        return {"key_id": key_id, "status": "retired"}

    async def destroy_due(self) -> DueDeletions:
        """Destroy every pending key whose window has ended and that no
        stored record uses; leave the others pending, with why. Safe on
        several daemons at once: each destruction is decided by the
        database (a deletion cancelled meanwhile is not carried out)."""
        report = DueDeletions()
        now = self._clock()
        due = [d for d in await self.store.list_key_deletions() if d.delete_after <= now]
        if not due:
            return report
        rows = {r.key_id for r in await self.store.list_master_keys()}
        for deletion in due:
            if deletion.key_id not in rows:
                # Its key went by other means (destroyed by the original
                # system): nothing to wait for.
                await self.store.cancel_key_deletion(deletion.key_id)
            elif await self.store.destroy_scheduled_key(deletion.key_id, now):
                report.destroyed.append(deletion.key_id)
        left = [d.key_id for d in due if d.key_id in rows and d.key_id not in report.destroyed]
        if left:
            counts = await self.store.count_records_by_key()
            for key_id in left:
                # None: cancelled or destroyed by another daemon meanwhile.
                held = _in_use(key_id, counts)
                if held is not None:
                    report.blocked[key_id] = held
        if report.destroyed:
            await self.load()
        return report

    async def upgrade_legacy(self) -> list[str]:
        """Rewrap master-key rows of the original system (CBC, no MAC) in the
        v1 format (AES-GCM, key id bound). The key itself does not change,
        so every DEK wrapped under it still unwraps. The ids upgraded."""
        upgraded = []
        for row in self.state.master_keys:
            if not env.is_legacy_master_key(row.key_material):
                continue
            wrapped = await self.vault.rewrap_master_key(row.key_id)
            if await self.store.replace_master_key_material(row.key_id, row.key_material, wrapped):
                upgraded.append(row.key_id)
        if upgraded:
            await self.load()
        return upgraded
