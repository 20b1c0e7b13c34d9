"""The composition root: every entry point that works on keys (the daemon,
the direct ``kmsd mk`` commands, ``migrate-legacy``, ``root-key rotate``)
builds its parts here, from settings, in one order: the store, the vault
client, the token service and the KMS on top of them, the rotator. It
starts them in that order (the vault loads its keys from the store) and
stops them in reverse.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .auth import TokenService
from .config import DatabaseURL, Settings
from .rotation import Rotator
from .service import KMS
from .store import Store
from .vault import VaultClient

__all__ = ["Runtime", "open_store"]


def open_store(database: DatabaseURL, *, pool_size: int = 10, timeout: float = 3.0, log: Any = None) -> Store:
    """The store for a parsed database URL (not yet opened)."""
    if database.scheme == "sqlite":
        from .store_sqlite import SQLiteStore

        return SQLiteStore(database.path)
    # Imported here so that an SQLite deployment never loads the MySQL driver.
    from .store_mysql import MySQLStore

    return MySQLStore(database, pool_size=pool_size, timeout=timeout, log=log)


def _vault_logger(log: Any) -> Callable[..., None]:
    # A (re)start is routine; everything else the vault client reports is
    # not, and a launcher that died leaves the daemon unable to restart its
    # vault.
    levels = {"vault_started": log.info, "launcher_exited": log.error}
    return lambda event, **kw: levels.get(event, log.warning)(event, **kw)


class Runtime:
    """The parts of one process that works on keys, built but not started."""

    def __init__(
        self,
        settings: Settings,
        *,
        log: Any,
        store: Store | None = None,
        pool_size: int | None = None,
        wrap_store: Callable[[Store], Store] | None = None,
        new_root_key_file: str | None = None,
    ) -> None:
        self.settings = settings
        self.log = log
        if store is None:
            store = open_store(
                settings.database,
                pool_size=pool_size or settings.database_pool_size,
                timeout=settings.database_timeout,
                log=log,
            )
        self.store: Store = wrap_store(store) if wrap_store else store
        self.vault = VaultClient(
            settings.root_key,
            user=settings.vault_user,
            timeout=settings.vault_timeout,
            log=_vault_logger(log),
            new_root_key_file=new_root_key_file,
        )
        tokens = TokenService(
            issuer=settings.issuer,
            audience=settings.audience,
            lifetime=settings.token_lifetime,
            max_session_age=settings.max_session_age,
            legacy_secret=settings.legacy_jwt_secret,
            cache_size=settings.token_cache_size,
        )
        self.kms = KMS(self.store, self.vault, tokens)
        # Rotations run only where ``start`` is called (the daemon); the
        # direct commands use it to rotate once and report.
        self.rotator = Rotator(
            self.kms,
            lease_ttl=settings.rotation_lease_ttl,
            batch_size=settings.rotation_batch_size,
            refresh_interval=settings.key_refresh_interval,
            period=settings.rotation_period,
            log=log,
        )

    @contextlib.asynccontextmanager
    async def store_open(self) -> AsyncIterator[Store]:
        await self.store.open()
        try:
            yield self.store
        finally:
            await self.store.close()

    @contextlib.asynccontextmanager
    async def vault_started(self) -> AsyncIterator[KMS]:
        """The vault, with every key row of the (open) store loaded."""
        await self.vault.start()
        try:
            yield self.kms
        finally:
            await self.vault.close()

    @contextlib.asynccontextmanager
    async def running(self, *, check: Callable[[Store], Awaitable[None]] | None = None) -> AsyncIterator[Runtime]:
        """Open the store, run ``check`` on it (before the vault starts),
        start the vault; on the way out, the reverse."""
        async with self.store_open() as store:
            if check is not None:
                await check(store)
            async with self.vault_started():
                try:
                    yield self
                finally:
                    # Before the vault: a rotation in progress stops and
                    # hands its lease over while the vault still answers.
                    await self.rotator.close()
