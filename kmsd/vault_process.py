"""The vault: a separate, privilege-dropped process that holds the root key,
the master keys and the JWT signing key. The daemon starts it as
``python -I -m kmsd.vault_process`` (``VaultClient``, or the launcher once
the daemon dropped root) and talks to it over an inherited socket in the
codec of ``vault_protocol``.

It reads its root key, loads every module it will use, drops its
privileges, and only then says hello and answers requests: after the drop
the interpreter's own directories may be unreadable.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jwt
import jwt.algorithms  # noqa: F401 - loaded before the privilege drop
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import envelope as env
from .privileges import MCL_CURRENT, MCL_FUTURE, VAULT_MEMLOCK, harden, libc, switch_user, syscall_filter, user_exists
from .vault_protocol import (
    BATCHABLE,
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

__all__ = ["VaultState", "drop_privileges", "main", "serve"]

# (status, fields) of one answer.
Answer = tuple[int, list[bytes]]


class VaultState:
    """The key-holding state machine of the vault process."""

    def __init__(self, root: env.RootKey) -> None:
        self.root = root
        self.new_root: env.RootKey | None = None  # set only for a root-key rotation
        self.master: dict[str, bytes] = {}
        self.materials: dict[str, str] = {}  # the row each master key was loaded from
        self.order: list[str] = []  # active first, then the retired, newest first
        self.active: str | None = None
        self.signing: tuple[str, Ed25519PrivateKey] | None = None
        self._aeads: dict[str, tuple[bytes, AESGCM]] = {}  # key id -> (the key it was made of, its AES-GCM)
        self._handlers: dict[int, Callable[[list[bytes]], Answer]] = {
            Op.PING: self._op_ping,
            Op.LOAD_MASTER_KEYS: self._op_load_master_keys,
            Op.NEW_MASTER_KEY: self._op_new_master_key,
            Op.REWRAP_MASTER_KEY: self._op_rewrap_master_key,
            Op.NEW_DEK: self._op_new_dek,
            Op.WRAP_DEK: self._op_wrap_dek,
            Op.UNWRAP_DEK: self._op_unwrap_dek,
            Op.REWRAP_DEK: self._op_rewrap_dek,
            Op.REWRAP_DEKS: self._op_rewrap_deks,
            Op.REKEY: self._op_rekey,
            Op.NEW_SIGNING_KEY: self._op_new_signing_key,
            Op.LOAD_SIGNING_KEY: self._op_load_signing_key,
            Op.SIGN_JWT: self._op_sign_jwt,
            Op.BATCH: self._op_batch,
        }

    def handle(self, op: int, f: list[bytes]) -> Answer:
        handler = self._handlers.get(op)
        if handler is None:
            return Status.BAD_REQUEST, []
        return handler(f)

    # One method per op: f is the request's fields --------------------------------

    def _op_ping(self, f: list[bytes]) -> Answer:
        return Status.OK, []

    def _op_load_master_keys(self, f: list[bytes]) -> Answer:
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
        # A key no longer given (destroyed) leaves no copy behind.
        self._aeads = {k: v for k, v in self._aeads.items() if keys.get(k) is v[0]}
        ordered = [k for k in f[1::2][::-1] if k.decode() != active]
        self.order = ([active] if active else []) + [k.decode() for k in ordered]
        return Status.OK, []

    def _op_new_master_key(self, f: list[bytes]) -> Answer:
        key_id = f[0].decode()
        mk = os.urandom(32)
        wrapped = env.wrap_master_key(self.root.kek, key_id, mk)
        self.master[key_id] = mk
        self.materials[key_id] = env.b64e(wrapped)
        return Status.OK, [env.b64e(wrapped).encode()]

    def _op_rewrap_master_key(self, f: list[bytes]) -> Answer:
        key_id = f[0].decode()
        if key_id not in self.master:
            return Status.UNKNOWN_KEY, []
        wrapped = env.wrap_master_key(self.root.kek, key_id, self.master[key_id])
        self.materials[key_id] = env.b64e(wrapped)
        return Status.OK, [env.b64e(wrapped).encode()]

    def _op_new_dek(self, f: list[bytes]) -> Answer:
        return self._wrap_under_active(f, new=True)

    def _op_wrap_dek(self, f: list[bytes]) -> Answer:
        return self._wrap_under_active(f, new=False)

    def _wrap_under_active(self, f: list[bytes], *, new: bool) -> Answer:
        """NEW_DEK (owner, purpose[, context]: a fresh DEK and its wrapped
        form) and WRAP_DEK (owner, purpose, dek[, context]: the caller's
        DEK, wrapped)."""
        if self.active is None:
            return Status.NO_KEY, []
        owner, purpose = f[0].decode(), env.Purpose(f[1][0])
        dek = os.urandom(32) if new else f[2]
        context = _optional(f, 2 if new else 3)
        if len(dek) != 32 or (purpose == env.Purpose.UNBOUND and owner):
            return Status.BAD_REQUEST, []
        wrapped = env.wrap_dek(self.master[self.active], self.active, dek, owner, purpose, context)
        return Status.OK, ([dek, wrapped] if new else [wrapped])

    def _op_unwrap_dek(self, f: list[bytes]) -> Answer:
        """owner, purposes, wrapped[, context]."""
        status, opened = self._unwrap_dek(f[0].decode(), _purposes(f[1]), f[2], _optional(f, 3))
        if not opened:
            return status, []
        dek, kind, key_id = opened
        return status, [dek, _KIND_BYTES[kind], key_id.encode()]

    def _op_rewrap_dek(self, f: list[bytes]) -> Answer:
        """owner, purposes, wrapped, target[, context]: the new wrapped DEK
        is bound to the same context as the one it was opened with."""
        if self.active is None:
            return Status.NO_KEY, []
        owner = f[0].decode()
        context = _optional(f, 4)
        status, opened = self._unwrap_dek(owner, _purposes(f[1]), f[2], context)
        if not opened:
            return status, []
        dek, kind, key_id = opened
        if f[3]:  # bind to the target given
            target, purpose = f[3][1:].decode(), env.Purpose.ENVELOPE
        elif kind.unbound:
            target, purpose = "", env.Purpose.UNBOUND
        else:
            target, purpose = owner, env.Purpose.ENVELOPE
        if purpose != env.Purpose.UNBOUND and not target:
            return Status.BAD_REQUEST, []
        wrapped = env.wrap_dek(self.master[self.active], self.active, dek, target, purpose, context)
        return Status.OK, [wrapped, _KIND_BYTES[kind], key_id.encode()]

    def _op_batch(self, f: list[bytes]) -> Answer:
        """Requests of the ops in BATCHABLE (``flatten``); each answered on
        its own (one that fails, even with a bug, fails alone), in order."""
        try:
            items = unflatten(f)
        except ValueError:
            return Status.BAD_REQUEST, []
        answers: list[Answer] = []
        for op, fields in items:
            try:
                answers.append(self.handle(op, fields) if op in BATCHABLE else (Status.BAD_REQUEST, []))
            except Exception as exc:  # noqa: BLE001 - one bad item must not fail the others
                _vault_log("vault_request_failed", level="error", error=type(exc).__name__)
                answers.append((Status.INTERNAL, []))
        return Status.OK, flatten(answers)

    def _op_rewrap_deks(self, f: list[bytes]) -> Answer:
        if self.active is None:
            return Status.NO_KEY, []
        return Status.OK, self._rewrap_deks(f)

    def _op_rekey(self, f: list[bytes]) -> Answer:
        if self.new_root is None:
            return Status.BAD_REQUEST, []
        aad_id, material = f[0].decode(), f[1].decode()
        try:
            secret = self._unwrap_mk(aad_id, material)
        except env.InvalidToken:
            return Status.WRONG_ROOT_KEY, [aad_id.encode()]
        return Status.OK, [env.b64e(env.wrap_master_key(self.new_root.kek, aad_id, secret)).encode()]

    def _op_new_signing_key(self, f: list[bytes]) -> Answer:
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

    def _op_load_signing_key(self, f: list[bytes]) -> Answer:
        kid = f[0].decode()
        try:
            seed = env.unwrap_master_key(self.root.kek, "jwt:" + kid, env.b64d(f[1].decode()))
        except env.InvalidToken:
            return Status.WRONG_ROOT_KEY, [("jwt:" + kid).encode()]
        self.signing = (kid, Ed25519PrivateKey.from_private_bytes(seed))
        return Status.OK, []

    def _op_sign_jwt(self, f: list[bytes]) -> Answer:
        if self.signing is None:
            return Status.NO_KEY, []
        kid, signer = self.signing
        token = jwt.encode(json.loads(f[0]), signer, algorithm="EdDSA", headers={"kid": kid})
        return Status.OK, [token.encode()]

    # Helpers ------------------------------------------------------------------------

    def _rewrap_deks(self, f: list[bytes]) -> list[bytes]:
        assert self.active is not None
        active_key = self.master[self.active]
        out: list[bytes] = []
        for i in range(0, len(f) - 2, 3):
            owner, purpose, blob = f[i].decode(), env.Purpose(f[i + 1][0]), f[i + 2]
            try:
                key_id: str | None = env.dek_key_id(blob)
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

    def _aead(self, key_id: str) -> AESGCM | None:
        """The AES-GCM of a loaded master key, made once per key (its
        construction costs more than opening a DEK)."""
        mk = self.master.get(key_id)
        if mk is None:
            return None
        cached = self._aeads.get(key_id)
        if cached is None or cached[0] is not mk:
            cached = (mk, AESGCM(mk))
            self._aeads[key_id] = cached
        return cached[1]

    def _unwrap_mk(self, key_id: str, material: str) -> bytes:
        blob = env.b64d(material)
        if len(blob) == env.LEGACY_MASTER_KEY_SIZE:
            mk = env.legacy_decrypt(self.root.legacy_key, blob, layers=1)
            if len(mk) != 32:
                raise env.InvalidToken
            return mk
        return env.unwrap_master_key(self.root.kek, key_id, blob)

    def _unwrap_dek(
        self, owner: str, purposes: Sequence[env.Purpose], blob: bytes, context: bytes = b""
    ) -> tuple[int, tuple[bytes, Kind, str] | None]:
        """A v1 DEK bound to ``owner`` for one of ``purposes`` (in order), an
        unbound one, or one of the original's CBC: (status, (DEK, kind, the
        master key that opened it: the daemon refuses a key pending
        deletion, and the original's DEKs do not name theirs)). ``context``
        must be the one it was wrapped with (none for the original's, which
        bound nothing)."""
        try:
            key_id: str | None = env.dek_key_id(blob)
        except env.InvalidToken:
            key_id = None
        unknown = False
        if key_id is not None:
            aead = self._aead(key_id)
            if aead is None:
                unknown = True
            elif env.is_unbound_dek(blob):
                with contextlib.suppress(env.InvalidToken):
                    dek = env.unwrap_dek(aead, blob, "", env.Purpose.UNBOUND, context)
                    return Status.OK, (dek, Kind.UNBOUND, key_id)
            else:
                for purpose in purposes:
                    try:
                        return Status.OK, (env.unwrap_dek(aead, blob, owner, purpose, context), Kind(purpose), key_id)
                    except env.InvalidToken:
                        continue
        # The original's DEKs carry no key id and no owner binding: a reader
        # tries every master key, the active first.
        if len(blob) == 80 and not context:
            for kid in self.order:
                try:
                    dek = env.legacy_decrypt(self.master[kid], blob)
                except env.InvalidToken:
                    continue
                if len(dek) == 32:
                    return Status.OK, (dek, Kind.ORIGINAL, kid)
        return (Status.UNKNOWN_KEY if unknown else Status.INVALID), None


_KIND_BYTES = {k: bytes([k]) for k in Kind}
_PURPOSES: dict[bytes, tuple[env.Purpose, ...]] = {}


def _purposes(raw: bytes) -> tuple[env.Purpose, ...]:
    purposes = _PURPOSES.get(raw)
    if purposes is None:
        purposes = _PURPOSES[raw] = tuple(env.Purpose(p) for p in raw)  # ValueError: not a purpose
    return purposes


def _optional(f: list[bytes], index: int) -> bytes:
    """A trailing field a request may leave out (the context): b"" then."""
    return f[index] if len(f) > index else b""


def serve(sock: socket.socket, vault: VaultState) -> None:
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
            (length,) = LENGTH.unpack_from(buf, pos)
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
                req_id = LENGTH.unpack_from(body, 2)[0] if len(body) >= 6 else 0
                status, result = Status.INTERNAL, []
            answers.append(encode_frame(status, req_id, result))
        del buf[:pos]
        if answers:
            sock.sendall(b"".join(answers))


# -- starting up -------------------------------------------------------------------


@dataclass(frozen=True)
class _Args:
    fd: int
    root_key_file: str | None
    root_key_fd: int | None
    dev_key_file: str | None
    new_root_key_file: str | None
    user: str | None


def _parse_args(argv: Sequence[str] | None) -> _Args:
    parser = argparse.ArgumentParser(prog="kmsd-vault")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--root-key-file")
    parser.add_argument("--root-key-fd", type=int)
    parser.add_argument("--dev-key-file")
    parser.add_argument("--new-root-key-file")
    parser.add_argument("--user")
    ns = parser.parse_args(argv)
    return _Args(
        fd=ns.fd, root_key_file=ns.root_key_file, root_key_fd=ns.root_key_fd, dev_key_file=ns.dev_key_file,
        new_root_key_file=ns.new_root_key_file, user=ns.user,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    new_root: env.RootKey | None = None
    try:
        text = _read_root_key(args)
        root = env.RootKey(text)
        if args.new_root_key_file:
            with open(args.new_root_key_file, encoding="utf-8") as fh:
                new_root = env.RootKey(fh.read())
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
    vault = VaultState(root)
    vault.new_root = new_root
    # As the daemon does (daemon._tune_gc): a batch makes thousands of
    # short-lived objects and no cycles; what exists now is never scanned again.
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    sock.sendall(encode_frame(Status.OK, 0, [json.dumps({"passphrase": root.is_passphrase}).encode()]))
    serve(sock, vault)


def _read_root_key(args: _Args) -> str:
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


def _preload() -> None:
    """Load everything the vault will use while it still can: after the
    privilege drop the interpreter's own directories may be unreadable (an
    interpreter under /root, for one). The module's imports bring most of
    it; what those load only on first use (PyJWT's signing path, the
    codecs) is loaded here by using it once."""
    jwt.encode({"x": 1}, Ed25519PrivateKey.generate(), algorithm="EdDSA")
    b"".decode("utf-8")
    "".encode("ascii")


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
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (VAULT_MEMLOCK, VAULT_MEMLOCK))
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if (soft == resource.RLIM_INFINITY or soft >= VAULT_MEMLOCK) and libc().mlockall(MCL_CURRENT | MCL_FUTURE) == 0:
        return True
    libc().mlockall(MCL_CURRENT)
    return False


def _vault_log(event: str, **fields: object) -> None:
    # The vault has no structlog configuration of its own worth the import
    # time; one JSON line on stderr in the daemon's shape is enough.
    line = {"event": event, "process": "vault", "level": "info", **fields}
    sys.stderr.write(json.dumps(line) + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    main()
