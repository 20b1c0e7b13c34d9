"""The admin commands: ``kmsd mk add|active|retired|list|rotate|destroy|
schedule-deletion|cancel-deletion`` and ``kmsd root-key rotate``.

``kmsd mk`` talks to the running daemon over its Unix socket (an admin peer:
root, or a configured admin uid/gid). When no daemon answers there it acts on
the database directly, with its own vault, and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from .config import ConfigError, Settings, settings_from_args
from .errors import KMSError
from .logs import get_logger

if TYPE_CHECKING:
    from .rotation import Rotator
    from .service import KMS
    from .store import Store

__all__ = ["add_parsers", "run_mk", "run_root_key"]


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: Callable[[argparse.ArgumentParser], None]
) -> None:
    mk = sub.add_parser(
        "mk",
        help="master keys: add, active, retired, list, rotate, schedule-deletion, cancel-deletion, destroy",
        description="Talks to the running daemon over its Unix socket; with no daemon there, "
        "acts on the database directly.",
    )
    mk_sub = mk.add_subparsers(dest="mk_command", required=True)

    def mk_command(name: str, **kw: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = mk_sub.add_parser(name, **kw)
        common(p)
        p.add_argument("--socket", help="the daemon's Unix socket (env KMSD_SOCKET)")
        return p

    add = mk_command("add", help="a new active master key; every other one retired (no rewrap)")
    add.add_argument("--description")
    for name, text in (
        ("active", "the active master key"),
        ("retired", "the retired master keys"),
        ("list", "every master key: id, status, created, records it still wraps"),
    ):
        p = mk_command(name, help=text)
        p.add_argument("--json", action="store_true", help="machine-readable output")
    rotate = mk_command("rotate", help="a new active key, then rewrap every record in the background")
    rotate.add_argument("--wait", action="store_true", help="show progress until the rewrap has finished")
    rotate.add_argument("--status", action="store_true", help="only show the current rotation's progress")
    schedule = mk_command(
        "schedule-deletion",
        help="destroy a retired key after a waiting period (the safe way)",
        description="Until the date, nothing unwraps under the key (a client that still needs it "
        "gets key_pending_deletion and can be found), and cancel-deletion undoes it. Then a daemon "
        "destroys it, if no stored record uses it.",
    )
    schedule.add_argument("key_id")
    # The range is the daemon's to check (or the key ring's, directly).
    schedule.add_argument("--days", type=int, help="waiting period, 7 to 30 days (default 30)")
    cancel = mk_command("cancel-deletion", help="take a key off the deletion schedule (retired again)")
    cancel.add_argument("key_id")
    destroy = mk_command(
        "destroy",
        help="delete a retired key that no stored record uses, at once (--now)",
        description="Refused for the active key and for a key that still wraps stored records. "
        "A DEK that a caller keeps itself (from /api/encrypt) under this key can never be "
        "decrypted again: prefer schedule-deletion; --now confirms an immediate destruction.",
    )
    destroy.add_argument("key_id")
    destroy.add_argument("--now", action="store_true", help="confirm: destroy at once, irreversibly")

    root = sub.add_parser(
        "root-key",
        help="root key: rotate",
        description="Rewraps every master key and the JWT signing keys under a new root key, on "
        "the database directly (daemons may keep running). Afterwards the old root key opens "
        "nothing: give every daemon the new one and restart it.",
    )
    root_sub = root.add_subparsers(dest="root_command", required=True)
    rr = root_sub.add_parser("rotate", help="rewrap the master keys under a new root key")
    common(rr)
    rr.add_argument("--new-key-file", required=True, help="the new root key (32 bytes, hex or base64)")
    rr.add_argument(
        "--generate", action="store_true", help="create --new-key-file with 32 random bytes (mode 0600) first"
    )


def _fail(message: str) -> int:
    print(f"kmsd: {message}", file=sys.stderr)
    return 1


# -- kmsd mk -------------------------------------------------------------------------


class _Daemon:
    """The mk operations through a running daemon."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.where = "daemon"

    async def list(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.client.list_master_keys)

    async def add(self, description: str | None) -> dict[str, Any]:
        return await asyncio.to_thread(self.client.add_master_key, description)

    async def rotate(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.client.rotate)

    async def status(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.client.rotation_status)

    async def destroy(self, key_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(lambda: self.client.destroy_master_key(key_id, now=True))

    async def schedule_deletion(self, key_id: str, days: int | None) -> dict[str, Any]:
        if days is None:
            return await asyncio.to_thread(self.client.schedule_key_deletion, key_id)
        return await asyncio.to_thread(self.client.schedule_key_deletion, key_id, days)

    async def cancel_deletion(self, key_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.client.cancel_key_deletion, key_id)


class _Direct:
    """The same operations on the database, with a vault of our own."""

    def __init__(self, kms: KMS, rotator: Rotator) -> None:
        self.kms = kms
        self.rotator = rotator
        self.where = "database"

    async def list(self) -> dict[str, Any]:
        return await self.kms.keyring.overview()

    async def add(self, description: str | None) -> dict[str, Any]:
        return await self.rotator.add_key(description)

    async def rotate(self) -> dict[str, Any]:
        return await self.rotator.rotate(requested_by="kmsd mk rotate (direct)")

    async def status(self) -> dict[str, Any]:
        return await self.rotator.status()

    async def destroy(self, key_id: str) -> dict[str, Any]:
        await self.kms.keyring.destroy(key_id)
        return {"message": "Master key destroyed", "key_id": key_id}

    async def schedule_deletion(self, key_id: str, days: int | None) -> dict[str, Any]:
        return await self.kms.keyring.schedule_deletion(key_id, days, requested_by="kmsd mk (direct)")

    async def cancel_deletion(self, key_id: str) -> dict[str, Any]:
        return await self.kms.keyring.cancel_deletion(key_id)


def _daemon_client(settings: Settings) -> Any | None:
    from kmsd_client import KMSClient

    client = KMSClient(settings.socket, timeout=30)
    try:
        client.health()
    except KMSError:
        client.close()
        return None
    return client


@asynccontextmanager
async def _direct(settings: Settings) -> AsyncIterator[_Direct]:
    from .runtime import Runtime

    async def kmsd_database(store: Store) -> None:
        if not await store.list_master_keys():
            # Most likely the wrong database: do not make it a kmsd one.
            raise KMSError(f"{settings.database.masked()} has no master keys: is it kmsd's database?")

    runtime = Runtime(settings, log=get_logger(process="kmsd-mk"))
    async with runtime.running(check=kmsd_database):
        yield _Direct(runtime.kms, runtime.rotator)


def run_mk(args: argparse.Namespace) -> int:
    if args.mk_command == "destroy" and not args.now:
        # Before anything is contacted: the safe way is one command away.
        return _fail(
            f"destroying master key {args.key_id} is irreversible: schedule its deletion"
            f" (`kmsd mk schedule-deletion {args.key_id} [--days N]`), or confirm with --now"
        )
    try:
        settings = settings_from_args(args, require_root_key=False)
    except ConfigError as exc:
        return _fail(exc.message)
    client = _daemon_client(settings)
    if client is None:
        if not settings.root_key.configured:
            return _fail(
                f"no daemon answers on {settings.socket}, and no root key is configured to act on the"
                " database directly (KMSD_ROOT_KEY_FILE, ROOT_KEY or a 'root-key' credential)"
            )
        if settings.root_key.file and not os.access(settings.root_key.file, os.R_OK):
            return _fail(f"cannot read the root key file {settings.root_key.file}")
        if settings.database.scheme == "sqlite" and not os.path.exists(settings.database.path):
            return _fail(f"no database at {settings.database.path} (and no daemon on {settings.socket})")
        print(
            f"kmsd: no daemon answers on {settings.socket}: acting on {settings.database.masked()} directly",
            file=sys.stderr,
        )
    import uvloop

    async def run() -> int:
        if client is not None:
            return await _mk(args, _Daemon(client))
        async with _direct(settings) as direct:
            return await _mk(args, direct)

    try:
        return uvloop.run(run())
    except KMSError as exc:
        return _fail(exc.message)
    finally:
        if client is not None:
            client.close()


async def _mk(args: argparse.Namespace, ops: _Daemon | _Direct) -> int:
    command = args.mk_command
    if command in ("list", "active", "retired"):
        listing = await ops.list()
        keys = listing["master_keys"]
        if command == "active":
            keys = [k for k in keys if k["status"] == "active"]
        elif command == "retired":
            # A key pending deletion is still a retired key.
            keys = [k for k in keys if k["status"] in ("retired", "pending_deletion")]
        if args.json:
            print(json.dumps((keys[0] if keys else None) if command == "active" else keys))
        else:
            _print_keys(keys)
        return 0
    if command == "add":
        result = await ops.add(args.description)
        print(f"master key {result['active_key_id']} is active; {result['previous_key_id']} retired (no rewrap)")
        return 0
    if command == "destroy":
        await ops.destroy(args.key_id)
        print(f"master key {args.key_id} destroyed")
        return 0
    if command == "schedule-deletion":
        result = await ops.schedule_deletion(args.key_id, args.days)
        print(
            f"master key {args.key_id} will be destroyed after {result['deletion_date']} UTC"
            f" (`kmsd mk cancel-deletion {args.key_id}` undoes it); nothing unwraps under it meanwhile"
        )
        return 0
    if command == "cancel-deletion":
        await ops.cancel_deletion(args.key_id)
        print(f"master key {args.key_id} is no longer scheduled for deletion (retired)")
        return 0
    if command == "rotate":
        if args.status:
            print(json.dumps(await ops.status(), indent=2))
            return 0
        result = await ops.rotate()
        print(
            f"master key {result['active_key_id']} is active; rewrapping {result['remaining_total']} records"
            f" from the retired keys in the background (job {result['job']['id']})"
        )
        # Without a daemon the rewrap runs in this process: it must finish here.
        if args.wait or isinstance(ops, _Direct):
            return await _follow(ops, result["job"]["id"])
        return 0
    return 2


def _print_keys(keys: list[dict[str, Any]]) -> None:
    print(f"{'KEY_ID':<24} {'STATUS':<16} {'CREATED (UTC)':<20} {'RECORDS':>9}  {'DELETION (UTC)':<20} DESCRIPTION")
    for k in keys:
        print(
            f"{k['key_id']:<24} {k['status']:<16} {k['created_at']:<20} {k['records']:>9}"
            f"  {k.get('deletion_date') or '-':<20} {k.get('description') or ''}"
        )
        if k.get("deletion_blocked"):
            print(f"{'':<24} deletion blocked: {k['deletion_blocked']}")


async def _follow(ops: _Daemon | _Direct, job_id: int) -> int:
    """A progress bar until the job has finished."""
    from tqdm import tqdm

    status = await ops.status()
    done = status["job"]["rewrapped"] if status["job"] else 0
    bar = tqdm(total=done + status["remaining_total"], initial=done, unit="rec", desc="rewrap", file=sys.stderr)
    try:
        while True:
            job = status["job"] or {}
            if job.get("id") != job_id:
                print(f"kmsd: job {job_id} was superseded by job {job.get('id')}", file=sys.stderr)
                return 1
            bar.total = max(bar.total or 0, job["rewrapped"] + status["remaining_total"])
            bar.update(job["rewrapped"] - bar.n)
            if job["state"] == "finished":
                break
            await asyncio.sleep(0.5)
            status = await ops.status()
    finally:
        bar.close()
    print(
        f"rotation finished: {job['rewrapped']} records rewrapped ({job['rate_per_second']}/s),"
        f" {job['changed']} replaced by clients meanwhile, {job['unreadable']} unreadable"
    )
    left = {k: n for k, n in status["remaining"].items() if n}
    if left:
        print(f"still under retired keys (unreadable rows): {left}")
    return 1 if job["unreadable"] else 0


# -- kmsd root-key rotate ----------------------------------------------------------------


def run_root_key(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args, require_root_key=True)
    except ConfigError as exc:
        return _fail(exc.message)
    import uvloop

    from .rootkey import prepare_new_root_key, rotate_root_key

    try:
        created = prepare_new_root_key(args.new_key_file, generate=args.generate)
    except (OSError, ValueError) as exc:
        return _fail(f"new root key: {exc}")
    if created:
        print(f"kmsd: generated a new root key in {args.new_key_file} (mode 0600)", file=sys.stderr)
    started = time.monotonic()
    try:
        report = uvloop.run(rotate_root_key(settings, args.new_key_file, log=get_logger(process="root-key")))
    except KMSError as exc:
        if created:
            # Nothing uses it: a second attempt may --generate again.
            os.unlink(args.new_key_file)
        return _fail(f"root-key rotation stopped, nothing changed: {exc.message}")
    print(
        f"root key rotated in {time.monotonic() - started:.1f}s: {report.master_keys} master keys and"
        f" {report.signing_keys} signing keys rewrapped under {args.new_key_file}, and checked with it alone."
    )
    print(
        "Now give every daemon the new root key (KMSD_ROOT_KEY_FILE or the 'root-key' credential) and"
        " restart it; the old root key opens nothing any more. Running daemons keep serving meanwhile."
    )
    return 0
