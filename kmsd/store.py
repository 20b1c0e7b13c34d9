"""The storage contract: the rows kmsd keeps and what a backend must do
with them. The backends are ``store_sqlite`` (the embedded default) and
``store_mysql`` (MySQL/MariaDB), sharing their statements in ``store_sql``;
``runtime.open_store`` picks one for a database URL.

The schema is the original system's (``master_keys``, ``kms_keys``, same
column names and meaning) plus additive tables and columns, applied by
numbered migrations recorded in ``kmsd_schema_migrations``.

Durability rule: a write method returns only once its change is committed
to disk, on every backend.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import StoreError

__all__ = [
    "KeyDeletion",
    "MasterKeyRow",
    "Record",
    "RotationJob",
    "SigningKeyRow",
    "Store",
    "StoreError",
    "now_utc",
    "utc_text",
]


def now_utc() -> str:
    """DATETIME text, as the original stored it (UTC, second precision)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def utc_text(seconds: float) -> str:
    """A Unix time as the same DATETIME text (UTC, second precision)."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True, repr=False)
class Record:
    """A ``kms_keys`` row: encrypted data and its wrapped DEK (base64 text)."""

    user_id: str
    # NULL is possible in a database the original system wrote.
    encrypted_key: str | None
    encrypted_dek: str | None
    created_at: str | None
    # kmsd's additive column: the master key that wraps ``encrypted_dek``,
    # so that rotation and ``kmsd mk list`` can count by key without
    # decrypting. NULL for rows kmsd has not classified yet (written by the
    # original system, or before the column existed).
    master_key_id: str | None = None

    def __repr__(self) -> str:
        return f"Record(user_id={self.user_id!r}, created_at={self.created_at!r})"


@dataclass(frozen=True, repr=False)
class MasterKeyRow:
    key_id: str
    key_material: str  # wrapped under the root key; never the plaintext key
    status: str  # 'active' | 'retired'
    created_at: str
    description: str | None = None

    def __repr__(self) -> str:
        return f"MasterKeyRow(key_id={self.key_id!r}, status={self.status!r})"


@dataclass(frozen=True, repr=False)
class SigningKeyRow:
    kid: str
    public_key: str  # base64 raw Ed25519 public key
    key_material: str  # wrapped private key
    status: str
    created_at: str

    def __repr__(self) -> str:
        return f"SigningKeyRow(kid={self.kid!r}, status={self.status!r})"


@dataclass(frozen=True)
class KeyDeletion:
    """A ``kmsd_key_deletions`` row: a retired master key scheduled for
    deletion. ``master_keys`` itself is the original system's table and
    keeps saying 'retired'; this row is what makes the key pending."""

    key_id: str
    # Unix time, by the clock of the daemon that scheduled it (not the
    # database's): the window is days long, clock skew is irrelevant to it.
    delete_after: float
    requested_by: str | None
    scheduled_at: str


@dataclass(frozen=True)
class RotationJob:
    """A ``kmsd_rotation_jobs`` row: one rotation and its rewrap. The work
    left is never stored here: it is the records still under retired keys."""

    id: int
    state: str  # 'running' | 'finished'
    target_key_id: str
    requested_by: str | None
    started_at: str
    finished_at: str | None = None
    rewrapped: int = 0
    changed: int = 0  # replaced by a client meanwhile: left to that write
    unreadable: int = 0
    # Seconds spent rewrapping (not waiting): rewrapped / active_seconds is the rate.
    active_seconds: float = 0.0


class Store(Protocol):
    """What kmsd needs from a database.

    Every method raises ``StoreError`` (HTTP 503) when the database cannot
    be reached or fails; the methods that say so raise ``Conflict``.
    Write methods return only after the change is durable.
    """

    # What the operator should know after ``open`` (a server set up so that
    # commits are not durable, say); the daemon logs them.
    warnings: list[str]
    @property
    def server(self) -> str:
        """The database in use, for /readyz and /metrics: the MySQL server
        (host:port; on a cluster the node in use, which may change at
        runtime), or the SQLite file."""

    @property
    def failovers(self) -> int:
        """How often the store moved to another server of a cluster."""

    @property
    def max_write_batch(self) -> int | None:
        """The most rows one write transaction should change (rotation's
        rewrap batches); None: no limit beyond the caller's own."""

    async def open(self) -> None:
        """Connect and apply pending migrations."""

    async def close(self) -> None: ...

    async def check_access(self) -> None:
        """Raise ``StoreError``, with a reason for the operator, unless this
        process can open the database afresh as the user it is now (called
        once after the privilege drop: the pool will open new connections)."""

    async def ping(self) -> None:
        """Raise ``StoreError`` unless the database answers."""

    async def get_record(self, user_id: str) -> Record | None:
        """The row whose ``user_id`` is exactly this one (binary comparison)."""

    async def insert_record(self, record: Record, *, generation: str | None = None) -> None:
        """Insert a new row; ``Conflict`` if the user id exists.
        ``generation``: in the same transaction, make it the user's token
        generation (``token_state``)."""

    async def upsert_record(self, record: Record) -> None:
        """Insert, or replace the existing row's ciphertexts atomically."""

    async def delete_record(
        self,
        user_id: str,
        *,
        only_if: Record | None = None,
        release: bytes | None = None,
        expect_generation: str | None = None,
        generation: str | None = None,
    ) -> bool:
        """Delete the row; False when there was none. ``only_if``: only while
        its ciphertexts are still exactly that record's (compare-and-set).
        ``release``: in the same transaction, remember this digest of the
        row's wrapped DEK as the user's (``released_owners``).
        ``expect_generation``: only while the user's token generation is
        still this one; ``generation``: make it the new one, in the same
        transaction."""

    async def replace_record(
        self, old: Record, new: Record, *, release: bytes | None = None, expect_generation: str | None = None
    ) -> bool:
        """Compare-and-set: replace the row of ``old.user_id`` with ``new``
        only if its ciphertexts are still exactly ``old``'s (and, with
        ``expect_generation``, the user's token generation still that one).
        False (and no change) otherwise. ``release``: as for
        ``delete_record``, when the row is replaced."""

    async def token_state(self, user_id: str, token_id: str) -> tuple[str, bool]:
        """The user's token generation ("" while none was ever set) and
        whether ``token_id`` was revoked: one read, made for every token use."""

    async def set_generation(self, user_id: str, generation: str) -> None:
        """Make ``generation`` the user's: every token of an older one is void."""

    async def revoke_token(self, token_id: str, expires_at: int) -> None:
        """Remember ``token_id`` as revoked until ``expires_at`` (Unix time,
        the token's own exp), and forget revocations whose token expired."""

    async def record_owners(self, encrypted_dek: str) -> list[str]:
        """The user ids of the rows whose ``encrypted_dek`` is exactly this
        text (an index lookup): whose stored record a wrapped DEK is."""

    async def released_owners(self, digest: bytes) -> list[str]:
        """Whose record a wrapped DEK was, by a digest given to ``release``
        when that record was replaced or deleted."""

    async def count_records(self) -> int: ...

    async def scan_records(self, after: str | None, limit: int) -> list[Record]:
        """Up to ``limit`` rows whose user id sorts after ``after`` (binary
        order), in that order: a resumable walk over every row."""

    async def count_records_by_key(self) -> dict[str | None, int]:
        """How many records each master key wraps; None: not classified."""

    async def scan_records_to_rewrap(self, active_key_id: str, after: str | None, limit: int) -> list[Record]:
        """Like ``scan_records``, but only rows not known to be under
        ``active_key_id`` (other keys, and unclassified rows)."""

    async def rewrap_records(self, changes: Sequence[tuple[Record, str, str]]) -> int:
        """For each ``(old, encrypted_dek, master_key_id)``: set the row's
        wrapped DEK and key id, compare-and-set on ``old``'s ciphertexts, all
        in one transaction. How many rows matched."""

    async def list_master_keys(self) -> list[MasterKeyRow]:
        """All master keys, oldest first."""

    async def add_master_key(self, row: MasterKeyRow) -> None:
        """Insert ``row`` as the active key and retire every other one, in
        one transaction. ``Conflict`` if the key id exists."""

    async def add_first_master_key(self, row: MasterKeyRow) -> bool:
        """Insert ``row`` as the active key only if there is no master key
        at all; False (nothing written) if there is one. Several daemons
        starting on a new database at once end up with one key."""

    async def replace_master_key_material(self, key_id: str, old: str, new: str) -> bool:
        """Compare-and-set of one master key's wrapped material."""

    async def replace_key_materials(
        self, master: Sequence[tuple[str, str, str]], signing: Sequence[tuple[str, str, str]]
    ) -> bool:
        """Compare-and-set of many ``(id, old, new)`` wrapped key materials
        (master keys, signing keys) in one transaction: all or nothing.
        False, and no change, if any of them changed meanwhile."""

    async def delete_master_key(self, key_id: str) -> bool:
        """Delete a retired master key, only if no record is under it and
        none is unclassified (checked in the same statement), and its
        scheduled deletion if it has one (same transaction)."""

    async def schedule_key_deletion(self, deletion: KeyDeletion) -> bool:
        """Insert ``deletion`` only if its key exists and is retired
        (decided in the same statement); False (nothing written) if not.
        ``Conflict`` if the key is already scheduled."""

    async def cancel_key_deletion(self, key_id: str) -> bool:
        """Forget the key's scheduled deletion; False if it had none."""

    async def list_key_deletions(self) -> list[KeyDeletion]:
        """Every scheduled deletion, by key id (binary order)."""

    async def destroy_scheduled_key(self, key_id: str, now: float) -> bool:
        """Delete a master key whose scheduled deletion is due
        (``delete_after <= now``), with the ``delete_master_key`` guard (no
        record under it, none unclassified), and its deletion row, in one
        transaction. False, and no change, when any condition fails: a
        deletion cancelled meanwhile by another daemon is never carried out."""

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Take or renew the lease ``name`` for ``ttl`` seconds of the
        database's clock; False while another holder's lease runs."""

    async def release_lease(self, name: str, holder: str) -> None: ...

    async def get_lease(self, name: str) -> tuple[str, float] | None:
        """(holder, seconds left) of a running lease, else None."""

    async def start_rotation_job(self, target_key_id: str, requested_by: str | None) -> RotationJob: ...

    async def update_rotation_job(self, job: RotationJob) -> None:
        """Write the job's state, finished time and counters."""

    async def latest_rotation_job(self) -> RotationJob | None: ...

    async def list_signing_keys(self) -> list[SigningKeyRow]: ...

    async def add_signing_key(self, row: SigningKeyRow) -> None:
        """Insert as the active signing key, retiring the others."""

    async def add_first_signing_key(self, row: SigningKeyRow) -> bool:
        """Insert as the active signing key only if there is no active one;
        False (nothing written) if there is."""
