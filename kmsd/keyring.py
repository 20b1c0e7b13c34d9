"""The keys the vault holds: every master key and the signing key, loaded
from the store at each vault (re)start and reloaded when another daemon of
the database changed them; adding, listing and destroying master keys.
The key material only ever passes through here wrapped under the root key."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import envelope as env
from .auth import TokenService, random_kid
from .errors import Conflict, NotFound
from .store import MasterKeyRow, SigningKeyRow, Store, now_utc
from .vault import VaultClient

__all__ = ["KeyRing", "KeyState"]


@dataclass(frozen=True)
class KeyState:
    active_key_id: str | None
    master_keys: tuple[MasterKeyRow, ...]
    # Retired keys scheduled for deletion: nothing client-facing unwraps under them.
    pending_deletion: frozenset[str] = frozenset()


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
            self.state = KeyState(active, tuple(rows))
            await self._load_signing()
            self._last_load = time.monotonic()

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
        an added or destroyed key). Every daemon calls this periodically:
        that period bounds how long it may keep wrapping under a key that
        another daemon retired. True if something changed."""
        rows = tuple(await self.store.list_master_keys())
        signing = tuple(await self.store.list_signing_keys())
        if rows == self.state.master_keys and signing == self._signing_loaded:
            return False
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
        still wraps."""
        counts = await self.store.count_records_by_key()
        return [
            {
                "key_id": r.key_id,
                "status": r.status,
                "created_at": r.created_at,
                "description": r.description,
                "records": counts.get(r.key_id, 0),
            }
            for r in await self.store.list_master_keys()
        ]

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
        in_use = counts.get(key_id, 0)
        if row.status == "active":
            raise Conflict(
                f"master key {key_id} is the active key ({in_use} records); rotate first",
                extra={"records": in_use},
            )
        if in_use:
            raise Conflict(
                f"master key {key_id} still wraps {in_use} records; rotate and let the rewrap finish first",
                extra={"records": in_use},
            )
        unclassified = counts.get(None, 0)
        if unclassified:
            raise Conflict(
                f"{unclassified} records are not yet attributed to a master key (written by the original"
                " system or before kmsd tracked keys); a rotation (`kmsd mk rotate`) attributes them",
                extra={"records": unclassified},
            )
        if not await self.store.delete_master_key(key_id):
            raise Conflict(f"master key {key_id} came into use meanwhile; try again")
        await self.load()

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
