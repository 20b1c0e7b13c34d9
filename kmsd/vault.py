"""The vault: a separate, privilege-dropped process that holds the root key,
the master keys and the JWT signing key, and the daemon's client for it.

Both sides share one small codec. A frame is::

    u32 length | u8 version | u8 op-or-status | u32 request id | fields

where each field is ``u32 length | bytes``. Requests are pipelined: the
daemon may have many in flight and matches answers by request id.

The vault never opens a network socket or the database: the daemon hands it
wrapped key rows and it answers wrap / unwrap / generate / sign requests.
Plaintext master keys and the root key never leave it; plaintext DEKs do,
because the daemon encrypts data with them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import enum
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import RootKeySource
from .privileges import MCL_CURRENT, MCL_FUTURE, VAULT_MEMLOCK, harden, libc, switch_user, syscall_filter, user_exists
from .errors import DecryptionFailed, InternalError, KMSError, Unavailable

if TYPE_CHECKING:
    from .launcher import LaunchedProcess, Launcher

__all__ = ["DEK", "Kind", "Op", "Rewrap", "Status", "UnknownKey", "VaultClient", "VaultError", "WrongRootKey", "stash_root_key"]

PROTOCOL_VERSION = 1
_HEADER = struct.Struct(">IBBI")
_FIELD = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024


class Op(enum.IntEnum):
    PING = 1
    LOAD_MASTER_KEYS = 2
    NEW_MASTER_KEY = 3
    NEW_DEK = 4
    WRAP_DEK = 5
    UNWRAP_DEK = 6
    NEW_SIGNING_KEY = 7
    LOAD_SIGNING_KEY = 8
    SIGN_JWT = 9
    REWRAP_MASTER_KEY = 10  # a loaded key, wrapped anew in the v1 format
    REWRAP_DEKS = 11  # many wrapped DEKs, unwrapped and wrapped under the active key
    REKEY = 12  # a key row wrapped under the new root key (root-key rotation)
    REWRAP_DEK = 13  # one wrapped DEK opened as UNWRAP_DEK does, wrapped anew under the active key


class Status(enum.IntEnum):
    OK = 0
    INVALID = 1  # a ciphertext did not authenticate
    UNKNOWN_KEY = 2  # names a master key the vault has not been given
    WRONG_ROOT_KEY = 3  # a master key row does not unwrap under this root key
    BAD_REQUEST = 4
    INTERNAL = 5
    NO_KEY = 6  # no active master key or signing key loaded yet


class VaultError(KMSError):
    """The vault refused a request for a reason the daemon must handle."""


class UnknownKey(VaultError):
    """The ciphertext names a master key the vault does not hold (yet)."""


class WrongRootKey(VaultError):
    # A 503: this daemon must be restarted with the current root key.
    status = 503
    code = "unavailable"
    default_message = "a master key does not unwrap under the configured root key"


def encode_frame(op_or_status: int, req_id: int, fields: Sequence[bytes]) -> bytes:
    body = b"".join(_FIELD.pack(len(f)) + f for f in fields)
    return _HEADER.pack(_HEADER.size - 4 + len(body), PROTOCOL_VERSION, op_or_status, req_id) + body


def decode_body(body: bytes) -> tuple[int, int, list[bytes]]:
    """Decode a frame without its length prefix."""
    version, code, req_id = struct.unpack_from(">BBI", body)
    if version != PROTOCOL_VERSION:
        raise ValueError("vault protocol version mismatch")
    fields: list[bytes] = []
    pos = 6
    while pos < len(body):
        (n,) = _FIELD.unpack_from(body, pos)
        pos += 4
        if pos + n > len(body):
            raise ValueError("truncated field")
        fields.append(body[pos : pos + n])
        pos += n
    return code, req_id, fields


class Rewrap(enum.IntEnum):
    """The outcome of one item of a ``REWRAP_DEKS`` call."""

    OK = 0
    INVALID = 1  # does not unwrap under the key it names
    UNKNOWN_KEY = 2  # names a key the vault does not hold
    LEGACY = 3  # the original system's format: its data must be re-encrypted too


class Kind(enum.IntEnum):
    """How a wrapped DEK opened: bound to its owner for a purpose (the
    values of ``envelope.Purpose``), or with no owner at all."""

    RECORD = 1  # v1, a stored record's DEK, bound to the owner it was opened for
    ENVELOPE = 2  # v1, an envelope bound to that owner
    UNBOUND = 3  # kmsd's unbound layout (the original's contract, no owner)
    ORIGINAL = 4  # the original system's CBC (no owner, no MAC)

    @property
    def unbound(self) -> bool:
        """No owner: any valid token may have it (the original's rule), and
        the data under it is in the original's CBC format."""
        return self in (Kind.UNBOUND, Kind.ORIGINAL)


@dataclass(frozen=True, repr=False)
class DEK:
    """A plaintext data key, its wrapped form, and how it opened. Never printed."""

    key: bytes
    wrapped: bytes
    kind: Kind = Kind.RECORD

    @property
    def legacy(self) -> bool:
        """The data under it is the original's CBC (an original row, or one
        a client of the original wrote through an unbound envelope)."""
        return self.kind.unbound

    def __repr__(self) -> str:
        return "<DEK redacted>"


# -- daemon side -----------------------------------------------------------------

# True in the supervisor while ``on_start`` loads the keys into a new vault.
_STARTING: contextvars.ContextVar[bool] = contextvars.ContextVar("kmsd_vault_starting", default=False)


class VaultClient:
    """Starts, supervises and talks to the vault process.

    ``on_start`` runs after every (re)start, before the vault counts as up:
    the daemon loads the key rows into it there. While the vault is down
    every call fails at once with ``Unavailable``; calls in flight when it
    dies fail as soon as its end of the socket closes.
    """

    def __init__(
        self,
        root_key: RootKeySource,
        *,
        user: str | None = None,
        timeout: float = 2.0,
        on_start: Callable[[], Awaitable[None]] | None = None,
        log: Callable[..., None] | None = None,
        new_root_key_file: str | None = None,
    ) -> None:
        self._source = root_key
        # Only for `kmsd root-key rotate`: the vault reads this one too, and
        # answers REKEY with rows wrapped under it.
        self._new_root_key_file = new_root_key_file
        self._user = user
        self._timeout = timeout
        self.on_start = on_start
        self._log = log or (lambda *a, **k: None)
        self._proc: asyncio.subprocess.Process | LaunchedProcess | None = None
        self._launcher: Launcher | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[tuple[int, list[bytes]]]] = {}
        # Frames of this loop iteration, sent together by _flush.
        self._outbox: list[bytes] = []
        self._outbox_ids: list[int] = []
        self._next_id = 0
        self._up = False
        self._ready_event = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self.restarts = 0
        self.is_passphrase = False
        # (op name, seconds, ok) after every call: metrics.
        self.observe: Callable[[str, float, bool], None] | None = None

    @property
    def is_up(self) -> bool:
        return self._up

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self) -> None:
        """Start the vault and wait until it is up (or raise why it is not)."""
        self._supervisor = asyncio.create_task(self._supervise(), name="vault-supervisor")
        waiter = asyncio.ensure_future(self._ready_event.wait())
        await asyncio.wait({waiter, self._supervisor}, return_when=asyncio.FIRST_COMPLETED)
        if not self._up:
            waiter.cancel()
            if self._supervisor.done() and self._supervisor.exception():
                raise self._supervisor.exception()  # type: ignore[misc]
            raise Unavailable("vault did not start")

    async def close(self) -> None:
        self._closing = True
        if self._supervisor:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor
        await self._stop_process()
        if self._launcher is not None:
            await self._launcher.close()

    async def _stop_process(self) -> None:
        proc = self._proc
        if proc and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 2)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    async def _supervise(self) -> None:
        backoff = 0.05
        first = True
        while not self._closing:
            started = time.monotonic()
            try:
                loop_task = await self._spawn()
            except WrongRootKey:
                raise
            except Exception as exc:
                if first:
                    raise
                self._log("vault_start_failed", error=type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            first = False
            try:
                await loop_task
            finally:
                self._up = False
                self._ready_event.clear()
                self._fail_pending()
                await self._stop_process()
            if self._closing:
                return
            self.restarts += 1
            self._log("vault_exited", returncode=self._proc.returncode if self._proc else None)
            # A vault that ran for a while restarts at once; one that keeps
            # dying backs off so it does not spin.
            backoff = 0.05 if time.monotonic() - started > 5 else min(backoff * 2, 2.0)
            await asyncio.sleep(backoff)

    def _vault_args(self) -> tuple[list[str], list[int]]:
        """The vault's arguments (but its socket) and the fds it inherits."""
        args: list[str] = []
        fds: list[int] = []
        if self._source.file:
            args += ["--root-key-file", self._source.file]
        elif self._source.fd is not None:
            args += ["--root-key-fd", str(self._source.fd)]
            fds.append(self._source.fd)
        elif self._source.dev_file:
            args += ["--dev-key-file", self._source.dev_file]
        if self._new_root_key_file:
            args += ["--new-root-key-file", self._new_root_key_file]
        if self._user:
            args += ["--user", self._user]
        return args, fds

    def start_launcher(self) -> None:
        """From now on, start vaults through a launcher that stays root, so
        that this process may drop its own privileges and still restart a
        vault that reads the root key and becomes its own user."""
        from .launcher import Launcher

        args, fds = self._vault_args()
        self._launcher = Launcher(
            args, fds,
            on_exit=lambda: self._log(
                "launcher_exited", pid=self.launcher_pid,
                error="the vault launcher died: no vault can be started again until kmsd is restarted",
            ),
        )
        self._launcher.start()

    @property
    def launcher_pid(self) -> int | None:
        return self._launcher.pid if self._launcher else None

    @property
    def launcher_up(self) -> bool | None:
        """None without a launcher."""
        return self._launcher.alive if self._launcher else None

    async def _spawn(self) -> asyncio.Future[None]:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self._launcher is not None:
                self._proc = await self._launcher.spawn(child.fileno())
            else:
                args, fds = self._vault_args()
                argv = [sys.executable, "-I", "-m", "kmsd.vault", "--fd", str(child.fileno()), *args]
                self._proc = await asyncio.create_subprocess_exec(
                    *argv, pass_fds=[child.fileno(), *fds], env={}, stdin=asyncio.subprocess.DEVNULL,
                    close_fds=True,
                )
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=MAX_FRAME)
        self._writer = writer
        # The vault says hello once its root key is loaded and it has dropped
        # its privileges: one field, JSON, with what it wants the daemon to know.
        try:
            code, _, fields = await asyncio.wait_for(self._read_frame(reader), 30)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            await self._stop_process()
            raise Unavailable("vault exited during startup (see its log)") from None
        if code != Status.OK:
            await self._stop_process()
            raise Unavailable("vault failed to start")
        hello = json.loads(fields[0])
        self.is_passphrase = bool(hello.get("passphrase"))
        loop_task = asyncio.ensure_future(self._read_loop(reader))
        try:
            if self.on_start:
                # Only on_start's own calls reach the new vault until it has
                # its keys: a request now would find none (a 422 for a sound
                # record, a record counted unreadable by a rewrap).
                starting = _STARTING.set(True)
                try:
                    await self.on_start()
                finally:
                    _STARTING.reset(starting)
        except BaseException:
            self._up = False
            loop_task.cancel()
            self._fail_pending()
            await self._stop_process()
            raise
        self._up = True
        self._ready_event.set()
        self._log("vault_started", pid=self._proc.pid if self._proc else None)
        return loop_task

    @staticmethod
    async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, int, list[bytes]]:
        (length,) = _FIELD.unpack(await reader.readexactly(4))
        if length > MAX_FRAME:
            raise ConnectionError("oversized vault frame")
        return decode_body(await reader.readexactly(length))

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ValueError):
            while True:
                code, req_id, fields = await self._read_frame(reader)
                fut = self._pending.pop(req_id, None)
                if fut is not None and not fut.done():
                    fut.set_result((code, fields))

    def _flush(self) -> None:
        """One write for every request made since the last flush: under load
        that is one send (and one vault wake-up) per loop iteration instead
        of one per request."""
        frames, ids = self._outbox, self._outbox_ids
        self._outbox, self._outbox_ids = [], []
        try:
            if self._writer is None:
                raise ConnectionError("vault gone")
            self._writer.write(b"".join(frames))
        except (ConnectionError, RuntimeError):
            for req_id in ids:
                fut = self._pending.pop(req_id, None)
                if fut is not None and not fut.done():
                    fut.set_exception(Unavailable("vault unavailable"))

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(Unavailable("vault unavailable"))

    async def call(self, op: Op, *fields: bytes) -> list[bytes]:
        if self.observe is None:
            return await self._call(op, fields)
        started = time.perf_counter()
        failed = False
        try:
            return await self._call(op, fields)
        except Unavailable:
            # Down or timed out; a refusal (bad ciphertext, unknown key) is an answer.
            failed = True
            raise
        finally:
            self.observe(op.name, time.perf_counter() - started, not failed)

    async def _call(self, op: Op, fields: Sequence[bytes]) -> list[bytes]:
        if not (self._up or _STARTING.get()) or self._writer is None:
            raise Unavailable("vault unavailable")
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        req_id = self._next_id
        fut: asyncio.Future[tuple[int, list[bytes]]] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(encode_frame(op, req_id, fields))
        self._outbox_ids.append(req_id)
        # A timer that fails the future: cheaper than wait_for, which
        # wraps every call in a task of its own.
        timer = asyncio.get_running_loop().call_later(self._timeout, _time_out, fut)
        try:
            code, out = await fut
        except asyncio.TimeoutError:
            self._pending.pop(req_id, None)
            # A vault that does not answer is as good as dead: kill it so
            # the supervisor starts a fresh one.
            self._log("vault_timeout", op=op.name)
            if self._proc and self._proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
            raise Unavailable("vault timed out") from None
        finally:
            timer.cancel()
        if code == Status.OK:
            return out
        if code == Status.INVALID:
            raise DecryptionFailed()
        if code == Status.UNKNOWN_KEY:
            raise UnknownKey("unknown master key")
        if code == Status.WRONG_ROOT_KEY:
            raise WrongRootKey()
        if code == Status.NO_KEY:
            raise Unavailable("no active key loaded in the vault")
        raise InternalError("vault error")

    # Typed operations -------------------------------------------------------

    async def ping(self) -> None:
        await self.call(Op.PING)

    async def load_master_keys(self, active: str | None, rows: Sequence[tuple[str, str]]) -> None:
        fields = [(active or "").encode()]
        for key_id, material in rows:
            fields += [key_id.encode(), material.encode()]
        await self.call(Op.LOAD_MASTER_KEYS, *fields)

    async def new_master_key(self, key_id: str) -> str:
        (wrapped,) = await self.call(Op.NEW_MASTER_KEY, key_id.encode())
        return wrapped.decode()

    async def rewrap_master_key(self, key_id: str) -> str:
        (wrapped,) = await self.call(Op.REWRAP_MASTER_KEY, key_id.encode())
        return wrapped.decode()

    async def new_dek(self, owner: str, purpose: int) -> DEK:
        key, wrapped = await self.call(Op.NEW_DEK, owner.encode(), bytes([purpose]))
        return DEK(key, wrapped)

    async def wrap_dek(self, owner: str, purpose: int, dek: bytes) -> bytes:
        (wrapped,) = await self.call(Op.WRAP_DEK, owner.encode(), bytes([purpose]), dek)
        return wrapped

    async def unwrap_dek(self, owner: str, purposes: Sequence[int], wrapped: bytes) -> DEK:
        """Open ``wrapped`` as bound to ``owner`` for the first of ``purposes``
        it authenticates under, else as unbound or as the original's CBC
        (the caller decides who may have those: ``DEK.kind``)."""
        key, kind = await self.call(Op.UNWRAP_DEK, owner.encode(), bytes(purposes), wrapped)
        return DEK(key, wrapped, Kind(kind[0]))

    async def rewrap_dek(
        self, owner: str, purposes: Sequence[int], wrapped: bytes, target: str | None
    ) -> tuple[bytes, Kind]:
        """Open ``wrapped`` as ``unwrap_dek`` does and wrap its DEK anew under
        the active master key, inside the vault: as an envelope bound to
        ``target``, or (``target`` None) bound as it was: to ``owner`` if it
        was bound, unbound if it had no owner. (new wrapped DEK, how it opened)."""
        new, kind = await self.call(
            Op.REWRAP_DEK, owner.encode(), bytes(purposes), wrapped, b"" if target is None else b"\x01" + target.encode()
        )
        return new, Kind(kind[0])

    async def rewrap_deks(self, items: Sequence[tuple[str, int, bytes]]) -> list[tuple[Rewrap, bytes]]:
        """Rewrap ``(owner, purpose, wrapped)`` DEKs under the active master
        key in one call: the plaintext DEKs never leave the vault. One
        ``(outcome, new wrapped DEK)`` per item, in order."""
        fields: list[bytes] = []
        for owner, purpose, wrapped in items:
            fields += [owner.encode(), bytes([purpose]), wrapped]
        out = await self.call(Op.REWRAP_DEKS, *fields)
        return [(Rewrap(out[i][0]), out[i + 1]) for i in range(0, len(out), 2)]

    async def rekey(self, aad_id: str, material: str) -> str:
        """A master-key (``key_id``) or signing-key (``jwt:kid``) row wrapped
        under the new root key; only a vault started with one answers."""
        (wrapped,) = await self.call(Op.REKEY, aad_id.encode(), material.encode())
        return wrapped.decode()

    async def new_signing_key(self, kid: str) -> tuple[str, bytes]:
        wrapped, public = await self.call(Op.NEW_SIGNING_KEY, kid.encode())
        return wrapped.decode(), public

    async def load_signing_key(self, kid: str, wrapped: str) -> None:
        await self.call(Op.LOAD_SIGNING_KEY, kid.encode(), wrapped.encode())

    async def sign_jwt(self, claims: dict[str, object]) -> str:
        (token,) = await self.call(Op.SIGN_JWT, json.dumps(claims).encode())
        return token.decode()


def _time_out(fut: asyncio.Future[object]) -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


def stash_root_key(value: str) -> int:
    """Put a root key given as ``ROOT_KEY`` into a sealed in-memory file that
    survives exec, so that the daemon can drop the variable (and its own
    copy) and every vault start can still read it."""
    import fcntl

    fd = os.memfd_create("kmsd-root-key", os.MFD_ALLOW_SEALING)
    os.set_inheritable(fd, True)
    os.write(fd, value.encode("utf-8"))
    fcntl.fcntl(
        fd,
        fcntl.F_ADD_SEALS,
        fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE,
    )
    return fd


# -- vault side --------------------------------------------------------------------


def drop_privileges(user: str | None) -> None:
    """No core files, no new privileges, a dedicated user when root, not
    dumpable (so neither ptrace nor /proc/PID/mem by the same uid)."""
    locked = True
    seccomp = syscall_filter()
    if os.geteuid() == 0:
        locked = _lock_memory()
        switch_user(user or ("kmsd-vault" if user_exists("kmsd-vault") else "nobody"))
    harden()
    if not locked:
        _vault_log(
            "memory_not_locked", level="warning",
            warning=f"RLIMIT_MEMLOCK is below {VAULT_MEMLOCK >> 20} MiB and cannot be raised: only the pages mapped "
            "before the privilege drop are locked, the master keys may be swapped out; set LimitMEMLOCK=512M "
            "(systemd) or ulimit -l 524288",
        )
    # No network from here on: the vault talks to the daemon only, over the
    # socket it inherited.
    seccomp.load()


def _lock_memory() -> bool:
    """As root: lock every page, those mapped later too (the master keys
    arrive after the privilege drop). That needs RLIMIT_MEMLOCK to cover the
    vault once it is no longer root, or its allocations would fail; where
    the limit is lower and cannot be raised, lock what is mapped now only.
    True if every future page is locked."""
    import resource

    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (VAULT_MEMLOCK, VAULT_MEMLOCK))
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if (soft == resource.RLIM_INFINITY or soft >= VAULT_MEMLOCK) and libc().mlockall(MCL_CURRENT | MCL_FUTURE) == 0:
        return True
    libc().mlockall(MCL_CURRENT)
    return False


def _read_root_key(args: argparse.Namespace) -> str:
    if args.root_key_file:
        with open(args.root_key_file, encoding="utf-8") as fh:
            return fh.read()
    if args.root_key_fd is not None:
        size = os.fstat(args.root_key_fd).st_size
        return os.pread(args.root_key_fd, size, 0).decode("utf-8")
    if args.dev_key_file:
        path = args.dev_key_file
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(os.urandom(32).hex() + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            _vault_log("dev_root_key_generated", path=path,
                       warning="development root key generated: do not use in production")
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    raise SystemExit("vault: no root key source")


def _vault_log(event: str, **fields: object) -> None:
    # The vault has no structlog configuration of its own worth the import
    # time; one JSON line on stderr in the daemon's shape is enough.
    line = {"event": event, "process": "vault", "level": "info", **fields}
    sys.stderr.write(json.dumps(line) + "\n")
    sys.stderr.flush()


class _Vault:
    """The key-holding state machine of the vault process."""

    def __init__(self, root: object) -> None:
        from .envelope import RootKey

        assert isinstance(root, RootKey)
        self.root = root
        self.new_root: RootKey | None = None  # set only for a root-key rotation
        self.master: dict[str, bytes] = {}
        self.materials: dict[str, str] = {}  # the row each master key was loaded from
        self.order: list[str] = []  # active first, then the retired, newest first
        self.active: str | None = None
        self.signing: tuple[str, object] | None = None

    def handle(self, op: int, f: list[bytes]) -> tuple[int, list[bytes]]:
        from . import envelope as env

        if op == Op.PING:
            return Status.OK, []
        if op == Op.LOAD_MASTER_KEYS:
            active = f[0].decode() or None
            keys: dict[str, bytes] = {}
            materials: dict[str, str] = {}
            for i in range(1, len(f) - 1, 2):
                key_id, material = f[i].decode(), f[i + 1].decode()
                materials[key_id] = material
                if key_id in self.master and self.materials.get(key_id) == material:
                    keys[key_id] = self.master[key_id]
                    continue
                # New, or its row changed (a root-key rotation elsewhere): it
                # must open under this vault's root key, or nothing changes
                # here and the caller learns that the root key is stale.
                try:
                    keys[key_id] = self._unwrap_mk(key_id, material)
                except env.InvalidToken:
                    return Status.WRONG_ROOT_KEY, [key_id.encode()]
            if active is not None and active not in keys:
                return Status.BAD_REQUEST, []
            self.master = keys
            self.materials = materials
            self.active = active
            ordered = [k for k in f[1::2][::-1] if k.decode() != active]
            self.order = ([active] if active else []) + [k.decode() for k in ordered]
            return Status.OK, []
        if op == Op.NEW_MASTER_KEY:
            key_id = f[0].decode()
            mk = os.urandom(32)
            wrapped = env.wrap_master_key(self.root.kek, key_id, mk)
            self.master[key_id] = mk
            self.materials[key_id] = env.b64e(wrapped)
            return Status.OK, [env.b64e(wrapped).encode()]
        if op == Op.REWRAP_MASTER_KEY:
            key_id = f[0].decode()
            if key_id not in self.master:
                return Status.UNKNOWN_KEY, []
            wrapped = env.wrap_master_key(self.root.kek, key_id, self.master[key_id])
            self.materials[key_id] = env.b64e(wrapped)
            return Status.OK, [env.b64e(wrapped).encode()]
        if op in (Op.NEW_DEK, Op.WRAP_DEK):
            if self.active is None:
                return Status.NO_KEY, []
            owner, purpose = f[0].decode(), env.Purpose(f[1][0])
            dek = os.urandom(32) if op == Op.NEW_DEK else f[2]
            if len(dek) != 32 or (purpose == env.Purpose.UNBOUND and owner):
                return Status.BAD_REQUEST, []
            wrapped = env.wrap_dek(self.master[self.active], self.active, dek, owner, purpose)
            return Status.OK, ([dek, wrapped] if op == Op.NEW_DEK else [wrapped])
        if op == Op.UNWRAP_DEK:
            status, opened = self._unwrap_dek(f[0].decode(), [env.Purpose(p) for p in f[1]], f[2])
            return status, ([opened[0], bytes([opened[1]])] if opened else [])
        if op == Op.REWRAP_DEK:
            if self.active is None:
                return Status.NO_KEY, []
            owner = f[0].decode()
            status, opened = self._unwrap_dek(owner, [env.Purpose(p) for p in f[1]], f[2])
            if not opened:
                return status, []
            dek, kind = opened
            if f[3]:  # bind to the target given
                target, purpose = f[3][1:].decode(), env.Purpose.ENVELOPE
            elif kind.unbound:
                target, purpose = "", env.Purpose.UNBOUND
            else:
                target, purpose = owner, env.Purpose.ENVELOPE
            if purpose != env.Purpose.UNBOUND and not target:
                return Status.BAD_REQUEST, []
            wrapped = env.wrap_dek(self.master[self.active], self.active, dek, target, purpose)
            return Status.OK, [wrapped, bytes([kind])]
        if op == Op.REWRAP_DEKS:
            if self.active is None:
                return Status.NO_KEY, []
            return Status.OK, self._rewrap_deks(f)
        if op == Op.REKEY:
            if self.new_root is None:
                return Status.BAD_REQUEST, []
            aad_id, material = f[0].decode(), f[1].decode()
            try:
                secret = self._unwrap_mk(aad_id, material)
            except env.InvalidToken:
                return Status.WRONG_ROOT_KEY, [aad_id.encode()]
            return Status.OK, [env.b64e(env.wrap_master_key(self.new_root.kek, aad_id, secret)).encode()]
        if op == Op.NEW_SIGNING_KEY:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            kid = f[0].decode()
            key = Ed25519PrivateKey.generate()
            seed = key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            public = key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            wrapped = env.wrap_master_key(self.root.kek, "jwt:" + kid, seed)
            return Status.OK, [env.b64e(wrapped).encode(), public]
        if op == Op.LOAD_SIGNING_KEY:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            kid = f[0].decode()
            try:
                seed = env.unwrap_master_key(self.root.kek, "jwt:" + kid, env.b64d(f[1].decode()))
            except env.InvalidToken:
                return Status.WRONG_ROOT_KEY, [("jwt:" + kid).encode()]
            self.signing = (kid, Ed25519PrivateKey.from_private_bytes(seed))
            return Status.OK, []
        if op == Op.SIGN_JWT:
            import jwt

            if self.signing is None:
                return Status.NO_KEY, []
            kid, signer = self.signing
            token = jwt.encode(json.loads(f[0]), signer, algorithm="EdDSA", headers={"kid": kid})  # type: ignore[arg-type]
            return Status.OK, [token.encode()]
        return Status.BAD_REQUEST, []

    def _rewrap_deks(self, f: list[bytes]) -> list[bytes]:
        from . import envelope as env

        assert self.active is not None
        active_key = self.master[self.active]
        out: list[bytes] = []
        for i in range(0, len(f) - 2, 3):
            owner, purpose, blob = f[i].decode(), env.Purpose(f[i + 1][0]), f[i + 2]
            try:
                key_id = env.dek_key_id(blob)
            except env.InvalidToken:
                key_id = None
            if key_id is None or env.is_unbound_dek(blob):
                # The original's CBC layout, or an unbound DEK a client of the
                # original stored itself: the data under it is CBC and must be
                # re-encrypted too (garbage the caller finds out when it upgrades).
                out += [bytes([Rewrap.LEGACY]), b""]
                continue
            mk = self.master.get(key_id)
            if mk is None:
                out += [bytes([Rewrap.UNKNOWN_KEY]), b""]
                continue
            try:
                dek = env.unwrap_dek(mk, blob, owner, purpose)
            except env.InvalidToken:
                out += [bytes([Rewrap.INVALID]), b""]
                continue
            out += [bytes([Rewrap.OK]), env.wrap_dek(active_key, self.active, dek, owner, purpose)]
        return out

    def _unwrap_mk(self, key_id: str, material: str) -> bytes:
        from . import envelope as env

        blob = env.b64d(material)
        if len(blob) == env.LEGACY_MASTER_KEY_SIZE:
            mk = env.legacy_decrypt(self.root.legacy_key, blob, layers=1)
            if len(mk) != 32:
                raise env.InvalidToken
            return mk
        return env.unwrap_master_key(self.root.kek, key_id, blob)

    def _unwrap_dek(
        self, owner: str, purposes: Sequence[object], blob: bytes
    ) -> tuple[int, tuple[bytes, Kind] | None]:
        """A v1 DEK bound to ``owner`` for one of ``purposes`` (in order), an
        unbound one, or one of the original's CBC: (status, (DEK, kind))."""
        from . import envelope as env

        try:
            key_id = env.dek_key_id(blob)
        except env.InvalidToken:
            key_id = None
        unknown = False
        if key_id is not None:
            mk = self.master.get(key_id)
            if mk is None:
                unknown = True
            elif env.is_unbound_dek(blob):
                with contextlib.suppress(env.InvalidToken):
                    return Status.OK, (env.unwrap_dek(mk, blob, "", env.Purpose.UNBOUND), Kind.UNBOUND)
            else:
                for purpose in purposes:
                    with contextlib.suppress(env.InvalidToken):
                        return Status.OK, (env.unwrap_dek(mk, blob, owner, purpose), Kind(purpose))  # type: ignore[arg-type]
        # The original's DEKs carry no key id and no owner binding: a reader
        # tries every master key, the active first.
        if len(blob) == 80:
            for kid in self.order:
                try:
                    dek = env.legacy_decrypt(self.master[kid], blob)
                except env.InvalidToken:
                    continue
                if len(dek) == 32:
                    return Status.OK, (dek, Kind.ORIGINAL)
        return (Status.UNKNOWN_KEY if unknown else Status.INVALID), None


def _preload() -> None:
    """Import everything the vault will use while it still can: after the
    privilege drop the interpreter's own directories may be unreadable (an
    interpreter under /root, for one)."""
    import jwt  # noqa: F401
    import jwt.algorithms  # noqa: F401
    from cryptography.hazmat.primitives import serialization  # noqa: F401
    from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: F401

    from . import envelope  # noqa: F401

    jwt.encode({"x": 1}, ed25519.Ed25519PrivateKey.generate(), algorithm="EdDSA")
    b"".decode("utf-8")
    "".encode("ascii")


def vault_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kmsd-vault")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--root-key-file")
    parser.add_argument("--root-key-fd", type=int)
    parser.add_argument("--dev-key-file")
    parser.add_argument("--new-root-key-file")
    parser.add_argument("--user")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)

    from .envelope import RootKey

    new_root = None
    try:
        text = _read_root_key(args)
        root = RootKey(text)
        if args.new_root_key_file:
            with open(args.new_root_key_file, encoding="utf-8") as fh:
                new_root = RootKey(fh.read())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        _vault_log("root_key_unreadable", level="error", error=type(exc).__name__)
        sock.sendall(encode_frame(Status.INTERNAL, 0, [b"root key unreadable"]))
        raise SystemExit(2) from None
    del text
    _preload()
    drop_privileges(args.user)
    if root.is_passphrase:
        _vault_log(
            "root_key_is_passphrase",
            level="warning",
            warning="ROOT_KEY is a passphrase, not 32 random bytes: derived with scrypt; "
            "replace it with `kmsd root-key rotate`",
        )
    vault = _Vault(root)
    vault.new_root = new_root
    sock.sendall(encode_frame(Status.OK, 0, [json.dumps({"passphrase": root.is_passphrase}).encode()]))
    _serve(sock, vault)


def _serve(sock: socket.socket, vault: _Vault) -> None:
    """Answer frames until the daemon goes away. Under load the daemon
    pipelines many requests; every frame that one recv brings is answered,
    and the answers leave in one send (one wake-up of the daemon, not one
    per request)."""
    buf = bytearray()
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return  # the daemon went away
        buf += chunk
        answers: list[bytes] = []
        pos = 0
        while len(buf) - pos >= 4:
            (length,) = _FIELD.unpack_from(buf, pos)
            if length > MAX_FRAME:
                return
            if len(buf) - pos - 4 < length:
                break
            body = bytes(buf[pos + 4 : pos + 4 + length])
            pos += 4 + length
            try:
                op, req_id, fields = decode_body(body)
                status, result = vault.handle(op, fields)
            except Exception as exc:  # noqa: BLE001 - one bad request must not kill the vault
                _vault_log("vault_request_failed", level="error", error=type(exc).__name__)
                # A frame too short to name its request still gets an answer.
                req_id = struct.unpack_from(">I", body, 2)[0] if len(body) >= 6 else 0
                status, result = Status.INTERNAL, []
            answers.append(encode_frame(status, req_id, result))
        del buf[:pos]
        if answers:
            sock.sendall(b"".join(answers))


if __name__ == "__main__":
    vault_main()
