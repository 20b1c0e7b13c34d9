"""Master-key rotation: a new active key, then a background rewrap of every
record still under a retired key, shared safely by several daemons.

What makes it safe:

- The work left is never bookkept: it is the data, the records whose
  ``master_key_id`` is not the active key's. A job that stops anywhere (kill
  -9 of the daemon or the vault) is resumed by scanning for them again.
- Each batch is rewrapped inside the vault in one call, then written with
  compare-and-set on the old ciphertexts in one transaction: a record a
  client replaced meanwhile is left alone, a failed batch writes nothing.
- One rewrap at a time across all daemons: the job runs under a lease row
  in the database, renewed every third of its lifetime. When its holder
  dies the lease runs out and whichever daemon looks next takes the job
  over. Even two rewraps at once would be harmless (compare-and-set), only
  wasteful.
- Scheduled key deletions are carried out here too, by whichever daemons
  run (every ``deletion_interval``): each destruction is one guarded
  transaction in the database, so several daemons doing it at once destroy
  a key once, and never one whose deletion was cancelled meanwhile.
- Every daemon re-reads the key rows every ``key_refresh_interval``, so it
  stops wrapping under a retired key within that time; a job finishes only
  after a full pass that found nothing to do and more than twice that time
  after it started, so records written by a daemon that had not seen the
  new key yet are caught too.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import time
from dataclasses import asdict, replace
from typing import Any

from .errors import Conflict, KMSError
from .logs import raised_at
from .service import KMS
from .store import RotationJob, now_utc

__all__ = ["Rotator"]

LEASE = "master-key-rotation"


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    # fromisoformat, not strptime: strptime imports _strptime on first use,
    # which fails once the daemon has dropped to a user that cannot read
    # the interpreter's files (one under /root): the schedule never ran.
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


class Rotator:
    def __init__(
        self,
        kms: KMS,
        *,
        lease_ttl: float = 15.0,
        batch_size: int = 1000,
        refresh_interval: float = 2.0,
        period: float | None = None,
        deletion_interval: float = 60.0,
        log: Any,
    ) -> None:
        self.kms = kms
        self.store = kms.store
        self.lease_ttl = lease_ttl
        self.batch_size = batch_size
        self.refresh_interval = refresh_interval
        self.period = period
        self.log = log
        # Unique per process, readable in `GET /api/rotate-mk`.
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self._loop_task: asyncio.Task[None] | None = None
        self._job_task: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._last_error: str | None = None
        # A deletion window is days long: once a minute is prompt enough,
        # and keeps the extra queries off the refresh's every-2-s path.
        self.deletion_interval = deletion_interval
        self._deletions_checked = float("-inf")
        # Key id -> records last reported as blocking its deletion: said once
        # per change, not once a minute.
        self._blocked_reported: dict[str, int] = {}

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._watch(), name="key-watch")

    async def close(self) -> None:
        for task in (self._loop_task, self._job_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        # A clean stop hands the job over at once instead of after the TTL.
        with contextlib.suppress(KMSError, asyncio.TimeoutError):
            await asyncio.wait_for(self.store.release_lease(LEASE, self.holder), 2)

    @property
    def running_here(self) -> bool:
        return self._job_task is not None and not self._job_task.done()

    async def _watch(self) -> None:
        """Every ``refresh_interval``: pick up key changes made elsewhere,
        resume an orphaned job, start a scheduled rotation when one is due."""
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                if await self.kms.keyring.refresh():
                    self.log.info("master_keys_reloaded", active_key_id=self.kms.keyring.state.active_key_id)
                if not self.running_here:
                    await self._maybe_take_over()
                if time.monotonic() - self._deletions_checked >= self.deletion_interval:
                    await self.destroy_due()
                self._last_error = None
            except KMSError as exc:
                # The database or the vault is down: requests answer 503
                # meanwhile; say so once, not every interval.
                if exc.message != self._last_error:
                    self.log.warning("key_watch_failed", error=exc.message)
                self._last_error = exc.message
            except Exception as exc:  # noqa: BLE001 - the watch must outlive a bug, and say so
                message = f"{type(exc).__name__} at {raised_at(exc)}"
                if message != self._last_error:
                    self.log.error("key_watch_failed", error_type=type(exc).__name__, where=raised_at(exc))
                self._last_error = message

    async def _maybe_take_over(self) -> None:
        job = await self.store.latest_rotation_job()
        if job is not None and job.state == "running":
            if await self.store.get_lease(LEASE) is None and await self._acquire():
                self.log.warning("rotation_resumed", job_id=job.id, target_key_id=job.target_key_id)
                self._launch(job)
            return
        if self.period is not None and self._rotation_due():
            with contextlib.suppress(Conflict):
                await self.rotate(requested_by="schedule")

    async def destroy_due(self) -> None:
        """Carry out the scheduled deletions whose window has ended, and
        say which are held back by records still under their key."""
        self._deletions_checked = time.monotonic()
        report = await self.kms.keyring.destroy_due()
        for key_id in report.destroyed:
            self.log.warning("master_key_destroyed", key_id=key_id, reason="scheduled deletion")
            self._blocked_reported.pop(key_id, None)
        for key_id, (reason, records) in report.blocked.items():
            if self._blocked_reported.get(key_id) != records:
                self.log.warning("master_key_deletion_blocked", key_id=key_id, records=records, reason=reason)
                self._blocked_reported[key_id] = records

    def _rotation_due(self) -> bool:
        active = next((r for r in self.kms.keyring.state.master_keys if r.status == "active"), None)
        created = _parse_time(active.created_at) if active else None
        return created is not None and self.period is not None and time.time() - created >= self.period

    async def _acquire(self) -> bool:
        return await self.store.acquire_lease(LEASE, self.holder, self.lease_ttl)

    # -- requests ----------------------------------------------------------------

    async def rotate(self, *, requested_by: str | None) -> dict[str, Any]:
        """New active key, and the rewrap started in the background.
        ``Conflict`` (with the running job's status) while a rotation runs."""
        async with self._start_lock:
            if self.running_here or not await self._acquire():
                raise Conflict("a master key rotation is already running", extra={"rotation": await self.status()})
            try:
                previous_job = await self.store.latest_rotation_job()
                if previous_job is not None and previous_job.state == "running":
                    # Orphaned by a dead holder: the new job's rewrap covers
                    # what it left (every record not under the new key).
                    await self.store.update_rotation_job(
                        replace(previous_job, state="finished", finished_at=now_utc())
                    )
                key_id, previous = await self.kms.keyring.add(description="rotation")
                job = await self.store.start_rotation_job(key_id, requested_by)
            except BaseException:
                with contextlib.suppress(KMSError):
                    await self.store.release_lease(LEASE, self.holder)
                raise
            self.log.info("rotation_started", job_id=job.id, active_key_id=key_id, previous_key_id=previous)
            self._launch(job)
        return {
            "message": "Master key rotated",
            "active_key_id": key_id,
            "previous_key_id": previous,
            **await self.status(),
        }

    async def add_key(self, description: str | None) -> dict[str, Any]:
        """``kmsd mk add``: a new active key without a rewrap. Refused while
        a rotation runs, so the job's target stays the active key."""
        async with self._start_lock:
            if self.running_here or not await self._acquire():
                raise Conflict("a master key rotation is running", extra={"rotation": await self.status()})
            try:
                key_id, previous = await self.kms.keyring.add(description=description)
            finally:
                with contextlib.suppress(KMSError):
                    await self.store.release_lease(LEASE, self.holder)
        self.log.info("master_key_added", active_key_id=key_id, previous_key_id=previous)
        return {"message": "Master key added", "active_key_id": key_id, "previous_key_id": previous}

    async def status(self) -> dict[str, Any]:
        job = await self.store.latest_rotation_job()
        counts = await self.store.count_records_by_key()
        lease = await self.store.get_lease(LEASE)
        active = self.kms.keyring.state.active_key_id
        remaining = {(k if k is not None else "unattributed"): n for k, n in counts.items() if k != active}
        body: dict[str, Any] = {
            "state": job.state if job else "idle",
            "active_key_id": active,
            "master_keys": [
                {"key_id": r.key_id, "status": r.status, "created_at": r.created_at, "records": counts.get(r.key_id, 0)}
                for r in self.kms.keyring.state.master_keys
            ],
            "remaining": remaining,
            "remaining_total": sum(remaining.values()),
            "job": None,
            "lease": {"holder": lease[0], "expires_in": round(lease[1], 2)} if lease else None,
        }
        if job is not None:
            rate = job.rewrapped / job.active_seconds if job.active_seconds > 0 else 0.0
            body["job"] = {**asdict(job), "rate_per_second": round(rate, 1)}
        return body

    # -- the job -------------------------------------------------------------------

    def _launch(self, job: RotationJob) -> None:
        self._job_task = asyncio.create_task(self._run(job), name=f"rotation-{job.id}")

    async def _run(self, job: RotationJob) -> None:
        work = asyncio.create_task(self._rewrap(job))
        try:
            # Renew the lease while working; losing it stops the work (a
            # batch already written is complete and correct either way).
            last_renewed = time.monotonic()
            while not work.done():
                done, _ = await asyncio.wait({work}, timeout=self.lease_ttl / 3)
                if done:
                    break
                try:
                    if not await self._acquire():
                        self.log.warning("rotation_lease_lost", job_id=job.id)
                        work.cancel()
                        break
                    last_renewed = time.monotonic()
                except KMSError:
                    if time.monotonic() - last_renewed > self.lease_ttl:
                        self.log.warning("rotation_lease_expired", job_id=job.id)
                        work.cancel()
                        break
            with contextlib.suppress(asyncio.CancelledError):
                await work
        finally:
            work.cancel()
            with contextlib.suppress(KMSError, asyncio.TimeoutError):
                await asyncio.wait_for(self.store.release_lease(LEASE, self.holder), 2)

    async def _rewrap(self, job: RotationJob) -> None:
        started = time.monotonic()
        settle = 2 * self.refresh_interval + 1.0
        backoff = 0.2
        while True:
            active = self.kms.keyring.state.active_key_id
            assert active is not None
            after: str | None = None
            progress = unreadable = 0
            while True:
                batch_started = time.monotonic()
                try:
                    size = min(self.batch_size, self.store.max_write_batch or self.batch_size)
                    batch = await self.store.scan_records_to_rewrap(active, after, size)
                    if not batch:
                        break
                    result = await self.kms.rewrap_records(batch)
                except KMSError as exc:
                    # Vault or database down: nothing of this batch was
                    # written; try the same batch again later.
                    self.log.warning("rotation_batch_failed", job_id=job.id, error=exc.message)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.2
                after = batch[-1].user_id
                progress += result.rewrapped
                unreadable += result.unreadable
                job = replace(
                    job,
                    rewrapped=job.rewrapped + result.rewrapped,
                    changed=job.changed + result.changed,
                    active_seconds=job.active_seconds + (time.monotonic() - batch_started),
                )
                with contextlib.suppress(KMSError):
                    await self.store.update_rotation_job(job)
            if progress == 0 and time.monotonic() - started >= settle:
                break
            if progress == 0:
                await asyncio.sleep(self.refresh_interval)
        job = replace(job, state="finished", finished_at=now_utc(), unreadable=unreadable)
        while True:
            try:
                await self.store.update_rotation_job(job)
                break
            except KMSError:
                await asyncio.sleep(1.0)
        self.log.info(
            "rotation_finished", job_id=job.id, rewrapped=job.rewrapped, changed=job.changed, unreadable=unreadable
        )

