"""The daemon's side of the vault: ``VaultClient`` starts the vault process
(``kmsd.vault_process``), supervises it, and turns typed calls into frames
of ``vault_protocol`` and its answers back into values or errors. Also the
sealed memfd that carries a ``ROOT_KEY`` root key to every vault start.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from .config import RootKeySource
from .errors import DecryptionFailed, InternalError, KMSError, Unavailable, UnknownKey, VaultError, WrongRootKey
from .vault_protocol import (
    LENGTH,
    MAX_FRAME,
    Kind,
    Op,
    Rewrap,
    Status,
    decode_body,
    encode_frame,
    flatten,
    unflatten,
)

if TYPE_CHECKING:
    from .launcher import LaunchedProcess, Launcher

__all__ = ["DEK", "Rewrapped", "UnknownKey", "VaultClient", "VaultError", "WrongRootKey", "stash_root_key"]


class DEK(NamedTuple):
    """A plaintext data key, its wrapped form, and how it opened. Never
    printed. A tuple: a batch makes a thousand at a time."""

    key: bytes
    wrapped: bytes
    kind: Kind = Kind.RECORD
    key_id: str = ""  # the master key that opened it (the original's DEKs do not name theirs)

    @property
    def legacy(self) -> bool:
        """The data under it is the original's CBC (an original row, or one
        a client of the original wrote through an unbound envelope)."""
        return self.kind in _UNBOUND

    def __repr__(self) -> str:
        return "<DEK redacted>"


class Rewrapped(NamedTuple):
    """An envelope's DEK wrapped anew: the new wrapped DEK, how the old one
    opened, and the master key that opened it."""

    wrapped: bytes
    kind: Kind
    key_id: str


_UNBOUND = frozenset(k for k in Kind if k.unbound)
_KINDS = {bytes([k]): k for k in Kind}


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
            except TimeoutError:
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
                argv = [sys.executable, "-I", "-m", "kmsd.vault_process", "--fd", str(child.fileno()), *args]
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
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
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
        (length,) = LENGTH.unpack(await reader.readexactly(4))
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
        """The answer's fields; a refusal raises its error."""
        code, out = await self._request(op, fields)
        error = _error_for(code)
        if error is not None:
            raise error
        return out

    async def _request(self, op: Op, fields: Sequence[bytes]) -> tuple[int, list[bytes]]:
        """(status, fields); ``Unavailable`` when the vault is down or does not answer."""
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

    async def _call(self, op: Op, fields: Sequence[bytes]) -> tuple[int, list[bytes]]:
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
        except TimeoutError:
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
        return code, out

    async def batch(self, requests: Sequence[tuple[Op, Sequence[bytes]]]) -> list[list[bytes] | KMSError]:
        """Many requests of the ops in ``BATCHABLE`` in one round trip (one
        alone goes as itself): each item's answer fields, or the error that
        item alone ended with. Down or timed out: ``Unavailable`` for all."""
        if len(requests) == 1:
            code, fields = await self._request(*requests[0])
            error = _error_for(code)
            return [fields if error is None else error]
        try:
            answers = unflatten(await self.call(Op.BATCH, *flatten(requests)))
        except ValueError:
            answers = []
        if len(answers) != len(requests):
            raise InternalError("vault error")
        return [fields if code == 0 else _error_for(code) or InternalError("vault error") for code, fields in answers]

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

    # One DEK or many: each list method is one round trip, and answers each
    # item with its value or the error it alone ended with. ``context`` is a
    # context's digest (envelope.context_digest), b"" for none: sent only
    # when there is one.

    async def new_dek(self, owner: str, purpose: int, context: bytes = b"") -> DEK:
        return _one(await self.new_deks([(owner, purpose, context)]))

    async def new_deks(self, items: Sequence[tuple[str, int, bytes]]) -> list[DEK | KMSError]:
        """Fresh DEKs, each wrapped for ``(owner, purpose, context)``."""
        answers = await self.batch([
            (Op.NEW_DEK, _with_context([owner.encode(), bytes([purpose])], context))
            for owner, purpose, context in items
        ])
        return [a if isinstance(a, KMSError) else DEK(a[0], a[1]) for a in answers]

    async def wrap_deks(self, items: Sequence[tuple[str, int, bytes, bytes]]) -> list[bytes | KMSError]:
        """The callers' DEKs, each wrapped for ``(owner, purpose, dek, context)``."""
        answers = await self.batch([
            (Op.WRAP_DEK, _with_context([owner.encode(), bytes([purpose]), dek], context))
            for owner, purpose, dek, context in items
        ])
        return [a if isinstance(a, KMSError) else a[0] for a in answers]

    async def unwrap_deks(self, items: Sequence[tuple[str, Sequence[int], bytes, bytes]]) -> list[DEK | KMSError]:
        """Open each ``(owner, purposes, wrapped, context)`` as bound to
        ``owner`` (and ``context``) for the first of ``purposes`` it
        authenticates under, else as unbound or as the original's CBC (the
        caller decides who may have those: ``DEK.kind``)."""
        # A batch's items share their owner and purposes: each encoded once.
        encoded: dict[tuple[str, tuple[int, ...]], tuple[bytes, bytes]] = {}
        requests: list[tuple[Op, Sequence[bytes]]] = []
        for owner, purposes, wrapped, context in items:
            key = (owner, tuple(purposes))
            head = encoded.get(key)
            if head is None:
                head = encoded[key] = (owner.encode(), bytes(purposes))
            requests.append((Op.UNWRAP_DEK, (*head, wrapped, context) if context else (*head, wrapped)))
        answers = await self.batch(requests)
        kinds, make = _KINDS, DEK._make
        return [
            a if isinstance(a, KMSError) else make((a[0], item[2], kinds[a[1]], a[2].decode()))
            for a, item in zip(answers, items, strict=True)
        ]

    async def rewrap_envelopes(
        self, items: Sequence[tuple[str, Sequence[int], bytes, str | None, bytes]]
    ) -> list[Rewrapped | KMSError]:
        """For each ``(owner, purposes, wrapped, target, context)``: open
        ``wrapped`` as ``unwrap_dek`` does and wrap its DEK anew under the
        active master key, inside the vault: as an envelope bound to
        ``target``, or (``target`` None) bound as it was: to ``owner`` if it
        was bound, unbound if it had no owner; to the same context."""
        answers = await self.batch([
            (
                Op.REWRAP_DEK,
                _with_context(
                    [owner.encode(), bytes(purposes), wrapped, b"" if target is None else b"\x01" + target.encode()],
                    context,
                ),
            )
            for owner, purposes, wrapped, target, context in items
        ])
        return [a if isinstance(a, KMSError) else Rewrapped(a[0], _KINDS[a[1]], a[2].decode()) for a in answers]

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


_T = TypeVar("_T")


def _error_for(code: int) -> KMSError | None:
    """The error of a vault status; None for OK."""
    if code == Status.OK:
        return None
    if code == Status.INVALID:
        return DecryptionFailed()
    if code == Status.UNKNOWN_KEY:
        return UnknownKey("unknown master key")
    if code == Status.WRONG_ROOT_KEY:
        return WrongRootKey()
    if code == Status.NO_KEY:
        return Unavailable("no active key loaded in the vault")
    return InternalError("vault error")


def _one(answers: Sequence[_T | KMSError]) -> _T:
    (answer,) = answers
    if isinstance(answer, KMSError):
        raise answer
    return answer


def _with_context(fields: list[bytes], context: bytes) -> list[bytes]:
    # A trailing field the vault reads as b"" when it is absent: requests
    # without a context stay as they were.
    return [*fields, context] if context else fields


def _time_out(fut: asyncio.Future[_T]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


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
