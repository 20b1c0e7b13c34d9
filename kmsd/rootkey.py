"""Root-key rotation: every master key and every JWT signing key rewrapped
under a new root key, without touching a data row.

A vault started with both root keys does the rewrapping (the keys never
leave it); the new rows are written in one transaction with compare-and-set
on the old ones, so the database holds either all old rows or all new ones.
A second vault, started with the new root key alone, then loads them, which
proves the new root key opens everything before the command says so. The
rotation lease is held throughout, so no rotation adds a master key under
the old root key meanwhile.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from typing import Any

from .config import RootKeySource, Settings
from .errors import Conflict, KMSError
from .runtime import Runtime

__all__ = ["RootKeyReport", "prepare_new_root_key", "rotate_root_key"]

LEASE = "master-key-rotation"  # the same lease as master-key rotation


@dataclass
class RootKeyReport:
    master_keys: int
    signing_keys: int


def prepare_new_root_key(path: str, *, generate: bool) -> bool:
    """Create ``path`` with 32 random bytes (hex, mode 0600) when asked to;
    check that it holds a real key, not a passphrase. True if created."""
    from .envelope import RootKey

    created = False
    if generate:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(os.urandom(32).hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        created = True
    with open(path, encoding="utf-8") as fh:
        key = RootKey(fh.read())
    if key.is_passphrase:
        if created:
            os.unlink(path)
        raise ValueError(f"{path} does not hold 32 bytes in hex or base64 (a passphrase is not accepted here)")
    return created


async def rotate_root_key(settings: Settings, new_key_file: str, *, log: Any) -> RootKeyReport:
    path = os.path.abspath(new_key_file)
    runtime = Runtime(settings, log=log, pool_size=2, new_root_key_file=path)
    holder = f"root-key-rotate:{socket.gethostname()}:{os.getpid()}"
    async with runtime.store_open() as store:
        if not await store.acquire_lease(LEASE, holder, max(settings.rotation_lease_ttl, 60.0)):
            raise Conflict("a master key rotation is running; wait for it to finish (kmsd mk rotate --status)")
        try:
            return await _rotate(runtime, path)
        finally:
            await store.release_lease(LEASE, holder)


async def _rotate(runtime: Runtime, path: str) -> RootKeyReport:
    store = runtime.store
    # Starting the vault loads every key row under the old root key: a row
    # it cannot open stops the rotation here, before anything is written.
    async with runtime.vault_started() as kms:
        masters = await store.list_master_keys()
        signing = await store.list_signing_keys()
        new_masters = [(r.key_id, r.key_material, await kms.vault.rekey(r.key_id, r.key_material)) for r in masters]
        new_signing = [(s.kid, s.key_material, await kms.vault.rekey("jwt:" + s.kid, s.key_material)) for s in signing]
    if not await store.replace_key_materials(new_masters, new_signing):
        raise Conflict("a key changed during the rotation; run it again")

    # Proof: a vault with the new root key alone opens every row now stored.
    check = Runtime(replace(runtime.settings, root_key=RootKeySource(file=path)), log=runtime.log, store=store)
    try:
        async with check.vault_started():
            pass
    except KMSError as exc:
        raise KMSError(f"the rows were rewrapped, but the new root key does not open them: {exc.message}") from None
    return RootKeyReport(len(new_masters), len(new_signing))
