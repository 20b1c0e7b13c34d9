"""A tiny client for kmsd (standard library only).

One ``KMSClient`` talks HTTP/1.1 to the daemon over its Unix socket (the
default) or over TCP, keeping one keep-alive connection open. It is meant for
one thread: give each thread its own client. ``AsyncKMSClient``
(``kmsd_client.aio``) is the same API for asyncio, with a small pool of
connections shared by the tasks of one event loop.

Both build their requests and read their answers in ``kmsd_client._protocol``
and only move bytes themselves. Every error the daemon answers with is rebuilt
as the same class from ``kmsd_client.errors`` (the wire ``code`` decides it),
and anything that keeps us from getting an answer at all (socket missing,
connection refused, timeout) raises ``Unavailable``. Tokens, data and DEKs
never appear in exception messages or in ``repr()``.
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from ._protocol import (
    DEFAULT_SOCKET_PATH,
    SAFE_TO_RESEND,
    BaseClient,
    Call,
    Request,
    datakey_body,
    decrypt_dek_body,
    encrypt_body,
    readable_when_idle,
    reason,
    rewrap_body,
    unreachable,
)
from .aio import AsyncKMSClient
from .errors import (
    BadRequest,
    Conflict,
    DecryptionFailed,
    Forbidden,
    KeyPendingDeletion,
    KMSError,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "AsyncKMSClient",
    "BadRequest",
    "Conflict",
    "DecryptionFailed",
    "Forbidden",
    "KMSClient",
    "KMSError",
    "KeyPendingDeletion",
    "NotFound",
    "PayloadTooLarge",
    "TooManyRequests",
    "Unauthorized",
    "Unavailable",
]

_T = TypeVar("_T")


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTPConnection over an AF_UNIX stream socket.

    The host name only feeds the ``Host`` header, which the daemon expects to
    be ``localhost`` on its Unix socket.
    """

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _peer_closed(sock: socket.socket) -> bool:
    return readable_when_idle(sock.fileno())


class KMSClient(BaseClient):
    """Synchronous kmsd client. One instance is for one thread.

    ``socket_path`` selects the Unix socket (default ``DEFAULT_SOCKET_PATH``);
    ``url`` (``http://127.0.0.1:8000``) selects TCP instead. ``token`` is the
    bearer token used by every call that takes a ``token`` argument when that
    argument is left out; ``timeout`` (seconds) applies to connecting and to
    each socket read or write.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(socket_path, url=url, token=token, timeout=timeout)
        self._conn: http.client.HTTPConnection | None = None

    def __enter__(self) -> KMSClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the kept-alive connection; a later call opens a new one."""
        if self._conn is not None:
            self._conn.close()

    # -- API ---------------------------------------------------------------

    def issue(self, user_id: str, *, token: str | None = None) -> str:
        """Issue a token for ``user_id`` (authorized callers only)."""
        return self._run(self._calls.issue(user_id, self._bearer(token)))

    def verify(self, token: str) -> dict[str, Any]:
        """The payload of a valid ``token``; raises ``Unauthorized`` otherwise."""
        return self._run(self._calls.verify(token))

    def store(self, user_id: str, data: str, token: str | None = None) -> str:
        """Store ``data`` for ``user_id`` and return its access token.

        With a token of that user, an existing record is replaced; without
        one, an existing ``user_id`` raises ``Conflict``. The returned token is
        not kept on the client.
        """
        return self._run(self._calls.store(user_id, data, self._bearer(token)))

    def fetch(self, token: str | None = None) -> str:
        """The data stored for the token's subject."""
        return self._run(self._calls.fetch(self._bearer(token)))

    def delete(self, token: str | None = None) -> None:
        """Crypto-shred the record of the token's subject. Every token of
        that subject dies with it."""
        self._run(self._calls.delete(self._bearer(token)))

    def revoke(self, token: str | None = None, *, everything: bool = False) -> None:
        """Revoke ``token`` (else the client's), or with ``everything`` every
        token of its subject, on every daemon of the database."""
        self._run(self._calls.revoke(self._bearer(token), everything))

    def revoke_subject(self, user_id: str, *, token: str | None = None) -> None:
        """Revoke every token of ``user_id`` (an admin peer, or a token of
        that subject)."""
        self._run(self._calls.revoke_subject(user_id, self._bearer(token)))

    def encrypt(
        self,
        data: bytes,
        dek: bytes,
        user_id: str | None = None,
        token: str | None = None,
        *,
        context: Mapping[str, str] | None = None,
    ) -> tuple[str, str]:
        """Encrypt ``data`` under ``dek``; returns ``(encrypted_key, encrypted_dek)``.

        ``user_id`` (else the token's subject) is bound to both ciphertexts as
        associated data; with neither the envelope is unbound, in the original
        system's format (any valid token unwraps its DEK). ``context`` (string
        pairs, not secret) is bound to the wrapped DEK too: unwrapping and
        rewrapping it then need the same pairs.
        """
        body = encrypt_body(data, dek, user_id, context=context)
        return self._run(self._calls.encrypt(body, self._bearer(token)))

    def datakey(
        self,
        user_id: str | None = None,
        token: str | None = None,
        *,
        plaintext: bool = True,
        context: Mapping[str, str] | None = None,
    ) -> tuple[bytes | None, str]:
        """A new data key generated by kmsd: ``(dek, encrypted_dek)``, bound to
        ``user_id`` (else the token's subject) and to ``context`` if given.
        Encrypt with ``dek``, keep ``encrypted_dek`` beside the ciphertext,
        forget ``dek``; the owner's token unwraps it later (``decrypt_dek``).
        ``plaintext=False`` asks for the wrapped key only (``dek`` is then
        None)."""
        body = datakey_body(user_id, plaintext=plaintext, context=context)
        return self._run(self._calls.datakey(body, plaintext, self._bearer(token)))

    def decrypt_dek(
        self, encrypted_dek: str, token: str | None = None, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Unwrap a DEK bound to the token's subject (or an unbound one), given
        the same ``context`` it was wrapped with (pairs in any order)."""
        body = decrypt_dek_body(encrypted_dek, context=context)
        return self._run(self._calls.decrypt_dek(body, self._bearer(token)))

    def rewrap(
        self,
        encrypted_dek: str,
        user_id: str | None = None,
        token: str | None = None,
        *,
        context: Mapping[str, str] | None = None,
    ) -> str:
        """The envelope's DEK wrapped anew under the active master key (inside
        the vault): bound to ``user_id`` if given (another subject than the
        token's needs an admin peer), else bound as it was, and to the same
        ``context``, which must be given. The new ``encrypted_dek``."""
        body = rewrap_body(encrypted_dek, user_id, context=context)
        return self._run(self._calls.rewrap(body, self._bearer(token)))

    # Batches: one request for many items, one vault round trip. Each item is
    # a dict of the single call's arguments (``token`` applies to the whole
    # batch). The answer is a list in the items' order: each entry is what
    # the single call returns, or the ``KMSError`` it would have raised,
    # returned in place. A batch refused as a whole (no valid token, too
    # many items) raises.

    def encrypt_batch(
        self, items: Sequence[Mapping[str, Any]], *, token: str | None = None
    ) -> list[tuple[str, str] | KMSError]:
        """``encrypt`` for each item (``data``, ``dek``, ``user_id``, ``context``)."""
        return self._run(self._calls.encrypt_batch(items, self._bearer(token)))

    def datakey_batch(
        self, items: Sequence[Mapping[str, Any]], *, token: str | None = None
    ) -> list[tuple[bytes | None, str] | KMSError]:
        """``datakey`` for each item (``user_id``, ``plaintext``, ``context``)."""
        return self._run(self._calls.datakey_batch(items, self._bearer(token)))

    def decrypt_dek_batch(
        self, items: Sequence[Mapping[str, Any]], *, token: str | None = None
    ) -> list[bytes | KMSError]:
        """``decrypt_dek`` for each item (``encrypted_dek``, ``context``)."""
        return self._run(self._calls.decrypt_dek_batch(items, self._bearer(token)))

    def rewrap_batch(self, items: Sequence[Mapping[str, Any]], *, token: str | None = None) -> list[str | KMSError]:
        """``rewrap`` for each item (``encrypted_dek``, ``user_id``, ``context``)."""
        return self._run(self._calls.rewrap_batch(items, self._bearer(token)))

    def rotation_status(self, *, token: str | None = None) -> dict[str, Any]:
        """Master-key rotation progress (admin only)."""
        return self._run(self._calls.rotation_status(self._bearer(token)))

    def rotate(self, *, token: str | None = None) -> dict[str, Any]:
        """Start a master-key rotation (admin only)."""
        return self._run(self._calls.rotate(self._bearer(token)))

    def list_master_keys(self, *, token: str | None = None) -> dict[str, Any]:
        """Every master key with its status and how many records it wraps (admin only)."""
        return self._run(self._calls.list_master_keys(self._bearer(token)))

    def add_master_key(self, description: str | None = None, *, token: str | None = None) -> dict[str, Any]:
        """A new active master key, without a rewrap (admin only)."""
        return self._run(self._calls.add_master_key(description, self._bearer(token)))

    def schedule_key_deletion(self, key_id: str, days: int = 30, *, token: str | None = None) -> dict[str, Any]:
        """Schedule a retired master key's destruction in ``days`` (7 to 30;
        admin only). Until then nothing unwraps under it
        (``KeyPendingDeletion``), and ``cancel_key_deletion`` undoes it."""
        return self._run(self._calls.schedule_key_deletion(key_id, days, self._bearer(token)))

    def cancel_key_deletion(self, key_id: str, *, token: str | None = None) -> dict[str, Any]:
        """Take a key off the deletion schedule: retired again (admin only)."""
        return self._run(self._calls.cancel_key_deletion(key_id, self._bearer(token)))

    def destroy_master_key(self, key_id: str, *, now: bool = False, token: str | None = None) -> dict[str, Any]:
        """Delete a retired master key no record uses any more (admin only).
        The daemon destroys at once only when ``now`` confirms it; otherwise
        schedule the deletion (``schedule_key_deletion``)."""
        return self._run(self._calls.destroy_master_key(key_id, now, self._bearer(token)))

    def health(self) -> dict[str, Any]:
        return self._run(self._calls.health())

    def ready(self) -> bool:
        """True when the daemon can serve requests, False while it says 503."""
        return self._run(self._calls.ready())

    def jwks(self) -> dict[str, Any]:
        return self._run(self._calls.jwks())

    # -- plumbing ----------------------------------------------------------

    def _run(self, call: Call[_T]) -> _T:
        return call.parse(*self._exchange(call.request))

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            target = self._target
            if target.socket_path is not None:
                self._conn = _UnixHTTPConnection(target.socket_path, self.timeout)
            else:
                self._conn = http.client.HTTPConnection(target.host, target.port, timeout=self.timeout)
        return self._conn

    def _exchange(self, request: Request) -> tuple[int, bytes]:
        conn = self._connection()
        headers = dict(request.headers)
        may_retry = True
        while True:
            # conn.sock is only set between requests when a previous answer
            # left the connection open, i.e. this is a kept-alive connection.
            reused = conn.sock is not None
            if reused and _peer_closed(conn.sock):
                conn.close()
                reused = False
            try:
                try:
                    conn.request(request.method, request.target, body=request.body, headers=headers)
                except ConnectionError:
                    # A write failing on a kept-alive connection means the server
                    # had already closed it: nothing was processed, resending is
                    # safe for any method. A fresh connection failing is real.
                    if reused and may_retry:
                        conn.close()
                        may_retry = False
                        continue
                    raise
                try:
                    response = conn.getresponse()
                except http.client.RemoteDisconnected:
                    # The request went out, no byte came back: the server may
                    # or may not have acted on it.
                    if reused and may_retry and request.method in SAFE_TO_RESEND:
                        conn.close()
                        may_retry = False
                        continue
                    raise
                return response.status, response.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise unreachable(self._target, reason(exc)) from exc
            except BaseException:
                # Anything else (e.g. KeyboardInterrupt) leaves the connection
                # mid-exchange; it must not be reused.
                conn.close()
                raise
