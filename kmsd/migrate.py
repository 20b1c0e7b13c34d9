"""``kmsd migrate-legacy``: rewrite every row the original system wrote in
the v1 format, in batches.

Resumable by construction: the walk is ordered by user id and every row is
judged by its own bytes, so a run that stops anywhere can simply be started
again; rows already in v1 cost one unwrap and are left alone. A row that no
master key reads is reported and never written. Writes are compare-and-set,
so running it beside live daemons is safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import DecryptionFailed
from .service import KMS
from .store import Record

__all__ = ["MigrationReport", "migrate_legacy"]


@dataclass
class MigrationReport:
    total: int = 0  # rows when the run started
    checked: int = 0
    upgraded: int = 0
    current: int = 0  # already v1
    changed: int = 0  # rewritten by someone else while we worked: left to them
    master_keys_upgraded: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # user ids, left unchanged


async def migrate_legacy(
    kms: KMS,
    *,
    batch_size: int = 500,
    concurrency: int = 16,
    progress: Callable[[MigrationReport], None] | None = None,
) -> MigrationReport:
    report = MigrationReport()
    report.master_keys_upgraded = await kms.keyring.upgrade_legacy()
    report.total = await kms.store.count_records()
    gate = asyncio.Semaphore(concurrency)

    async def one(record: Record) -> None:
        async with gate:
            try:
                outcome = await kms.upgrade_record(record)
            except DecryptionFailed:
                report.unreadable.append(record.user_id)
                return
        if outcome == "upgraded":
            report.upgraded += 1
        elif outcome == "current":
            report.current += 1
        else:
            report.changed += 1

    after: str | None = None
    while batch := await kms.store.scan_records(after, batch_size):
        await asyncio.gather(*(one(r) for r in batch))
        report.checked += len(batch)
        after = batch[-1].user_id
        if progress:
            progress(report)
    return report

