"""A tiny synchronous client for kmsd (standard library only).

One ``KMSClient`` talks HTTP/1.1 to the daemon over its Unix socket (the
default) or over TCP, keeping one keep-alive connection open. It is meant for
one thread: give each thread its own client.

Every error the daemon answers with is rebuilt as the same class from
``kmsd_client.errors`` (the wire ``code`` decides it), and anything that keeps us from
getting an answer at all (socket missing, connection refused, timeout) raises
``Unavailable``. Tokens, data and DEKs never appear in exception messages or in
``repr()``.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import select
import socket
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from .errors import (
    BadRequest,
    Conflict,
    DecryptionFailed,
    Forbidden,
    KMSError,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    error_for_code,
)

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "BadRequest",
    "Conflict",
    "DecryptionFailed",
    "Forbidden",
    "KMSClient",
    "KMSError",
    "NotFound",
    "PayloadTooLarge",
    "TooManyRequests",
    "Unauthorized",
    "Unavailable",
]

DEFAULT_SOCKET_PATH = "/run/kmsd/kmsd.sock"

# Only these are resent after the request went out and the server hung up
# without a byte of answer: the daemon never changes state on a GET, whereas a
# POST or DELETE may already have taken effect.
_SAFE_TO_RESEND = frozenset({"GET", "HEAD"})

# RFC 6750 b64token. Checked before use because http.client's own check for
# bad header values puts the whole value, i.e. the token, into its message.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

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
    """Whether an idle keep-alive socket is no longer usable.

    Between requests the server has nothing to say, so a readable socket means
    it hung up (or sent something we never asked for). Finding that out before
    sending is what makes reconnecting safe even for a POST.
    """
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)
    except (OSError, ValueError):
        return True


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


def _malformed() -> KMSError:
    # Never quote the body: a half-valid answer may still carry a secret.
    return KMSError("malformed response from kmsd")


def _field(doc: dict[str, Any], name: str, kind: type[_T]) -> _T:
    value = doc.get(name)
    if not isinstance(value, kind):
        raise _malformed()
    return value


class KMSClient:
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
        if socket_path is not None and url is not None:
            raise ValueError("give either socket_path or url, not both")
        self.token = token
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._prefix = ""
        self._url: str | None = None
        self._socket_path: str | None = None
        if url is None:
            self._socket_path = socket_path or DEFAULT_SOCKET_PATH
            self._where = self._socket_path
            return
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError("url must start with http:// (kmsd listens on loopback TCP)")
        if parts.username is not None or parts.password is not None:
            raise ValueError("url must not carry credentials; use token=")
        if not parts.hostname:
            raise ValueError("url has no host")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._prefix = parts.path.rstrip("/")
        self._url = f"http://{parts.netloc}{self._prefix}"
        self._where = self._url

    def __repr__(self) -> str:
        target = (
            f"url={self._url!r}" if self._url is not None else f"socket_path={self._socket_path!r}"
        )
        token = ", token=<redacted>" if self.token is not None else ""
        return f"KMSClient({target}{token})"

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
        doc = self._call("POST", "/issue", {"id": user_id}, token=self._bearer(token))
        return _field(doc, "token", str)

    def verify(self, token: str) -> dict[str, Any]:
        """The payload of a valid ``token``; raises ``Unauthorized`` otherwise."""
        doc = self._call("POST", "/verify", {"token": token})
        if doc.get("valid") is not True:
            raise Unauthorized()
        return _field(doc, "payload", dict)

    def store(self, user_id: str, data: str, token: str | None = None) -> str:
        """Store ``data`` for ``user_id`` and return its access token.

        With a token of that user, an existing record is replaced; without
        one, an existing ``user_id`` raises ``Conflict``. The returned token is
        not kept on the client.
        """
        doc = self._call(
            "POST", "/api/keys", {"data": data, "user_id": user_id}, token=self._bearer(token)
        )
        return _field(doc, "access_token", str)

    def fetch(self, token: str | None = None) -> str:
        """The data stored for the token's subject."""
        doc = self._call("GET", "/api/keys", token=self._bearer(token))
        return _field(doc, "data", str)

    def delete(self, token: str | None = None) -> None:
        """Crypto-shred the record of the token's subject. Every token of
        that subject dies with it."""
        self._call("DELETE", "/api/keys", token=self._bearer(token))

    def revoke(self, token: str | None = None, *, everything: bool = False) -> None:
        """Revoke ``token`` (else the client's), or with ``everything`` every
        token of its subject, on every daemon of the database."""
        body = {"all": True} if everything else {}
        self._call("POST", "/api/tokens/revoke", body, token=self._bearer(token))

    def revoke_subject(self, user_id: str, *, token: str | None = None) -> None:
        """Revoke every token of ``user_id`` (an admin peer, or a token of
        that subject)."""
        self._call("POST", "/api/tokens/revoke", {"user_id": user_id}, token=self._bearer(token))

    def encrypt(
        self,
        data: bytes,
        dek: bytes,
        user_id: str | None = None,
        token: str | None = None,
    ) -> tuple[str, str]:
        """Encrypt ``data`` under ``dek``; returns ``(encrypted_key, encrypted_dek)``.

        ``user_id`` (else the token's subject) is bound to both ciphertexts as
        associated data; with neither the envelope is unbound, in the original
        system's format (any valid token unwraps its DEK).
        """
        body: dict[str, Any] = {"data": base64.b64encode(data).decode("ascii"), "dek": dek.hex()}
        if user_id is not None:
            body["user_id"] = user_id
        doc = self._call("POST", "/api/encrypt", body, token=self._bearer(token))
        return _field(doc, "encrypted_key", str), _field(doc, "encrypted_dek", str)

    def datakey(
        self, user_id: str | None = None, token: str | None = None, *, plaintext: bool = True
    ) -> tuple[bytes | None, str]:
        """A new data key generated by kmsd: ``(dek, encrypted_dek)``, bound to
        ``user_id`` (else the token's subject). Encrypt with ``dek``, keep
        ``encrypted_dek`` beside the ciphertext, forget ``dek``; the owner's
        token unwraps it later (``decrypt_dek``). ``plaintext=False`` asks
        for the wrapped key only (``dek`` is then None)."""
        body: dict[str, Any] = {} if plaintext else {"plaintext": False}
        if user_id is not None:
            body["user_id"] = user_id
        doc = self._call("POST", "/api/datakey", body, token=self._bearer(token))
        encrypted_dek = _field(doc, "encrypted_dek", str)
        if not plaintext:
            return None, encrypted_dek
        try:
            return bytes.fromhex(_field(doc, "dek", str)), encrypted_dek
        except ValueError:
            raise _malformed() from None

    def decrypt_dek(self, encrypted_dek: str, token: str | None = None) -> bytes:
        """Unwrap a DEK bound to the token's subject (or an unbound one)."""
        doc = self._call(
            "POST", "/api/decrypt-dek", {"encrypted_dek": encrypted_dek}, token=self._bearer(token)
        )
        try:
            return bytes.fromhex(_field(doc, "dek", str))
        except ValueError:
            raise _malformed() from None

    def rewrap(self, encrypted_dek: str, user_id: str | None = None, token: str | None = None) -> str:
        """The envelope's DEK wrapped anew under the active master key (inside
        the vault): bound to ``user_id`` if given (another subject than the
        token's needs an admin peer), else bound as it was. The new
        ``encrypted_dek``."""
        body: dict[str, Any] = {"encrypted_dek": encrypted_dek}
        if user_id is not None:
            body["user_id"] = user_id
        return _field(self._call("POST", "/api/rewrap", body, token=self._bearer(token)), "encrypted_dek", str)

    def rotation_status(self, *, token: str | None = None) -> dict[str, Any]:
        """Master-key rotation progress (admin only)."""
        return self._call("GET", "/api/rotate-mk", token=self._bearer(token))

    def rotate(self, *, token: str | None = None) -> dict[str, Any]:
        """Start a master-key rotation (admin only)."""
        return self._call("POST", "/api/rotate-mk", token=self._bearer(token))

    def list_master_keys(self, *, token: str | None = None) -> dict[str, Any]:
        """Every master key with its status and how many records it wraps (admin only)."""
        return self._call("GET", "/api/master-keys", token=self._bearer(token))

    def add_master_key(self, description: str | None = None, *, token: str | None = None) -> dict[str, Any]:
        """A new active master key, without a rewrap (admin only)."""
        body = {"description": description} if description is not None else {}
        return self._call("POST", "/api/master-keys", body, token=self._bearer(token))

    def destroy_master_key(self, key_id: str, *, token: str | None = None) -> dict[str, Any]:
        """Delete a retired master key no record uses any more (admin only)."""
        return self._call("DELETE", "/api/master-keys/" + quote(key_id, safe=""), token=self._bearer(token))

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/healthz")

    def ready(self) -> bool:
        """True when the daemon can serve requests, False while it says 503."""
        status, raw = self._exchange("GET", "/readyz")
        if status == 503:
            return False
        self._decode(status, raw)
        return True

    def jwks(self) -> dict[str, Any]:
        return self._call("GET", "/.well-known/jwks.json")

    # -- plumbing ----------------------------------------------------------

    def _bearer(self, token: str | None) -> str | None:
        return token if token is not None else self.token

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: str | None = None,
    ) -> dict[str, Any]:
        return self._decode(*self._exchange(method, path, body, token))

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._socket_path is not None:
                self._conn = _UnixHTTPConnection(self._socket_path, self.timeout)
            else:
                self._conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self.timeout
                )
        return self._conn

    def _exchange(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        token: str | None = None,
    ) -> tuple[int, bytes]:
        headers = {"Accept": "application/json", "User-Agent": "kmsd-client"}
        payload: bytes | None = None
        if body is not None:
            payload = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if token is not None:
            if not _BEARER_TOKEN.fullmatch(token):
                raise Unauthorized()
            headers["Authorization"] = f"Bearer {token}"

        conn = self._connection()
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
                    conn.request(method, self._prefix + path, body=payload, headers=headers)
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
                    if reused and may_retry and method in _SAFE_TO_RESEND:
                        conn.close()
                        may_retry = False
                        continue
                    raise
                return response.status, response.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise Unavailable(f"cannot reach kmsd at {self._where}: {_reason(exc)}") from exc
            except BaseException:
                # Anything else (e.g. KeyboardInterrupt) leaves the connection
                # mid-exchange; it must not be reused.
                conn.close()
                raise

    @staticmethod
    def _decode(status: int, raw: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(raw) if raw else {}
        except (ValueError, UnicodeDecodeError):
            doc = None
        if 200 <= status < 300:
            if not isinstance(doc, dict):
                raise _malformed()
            return doc
        code = message = None
        if isinstance(doc, dict):
            if isinstance(doc.get("code"), str):
                code = doc["code"]
            if isinstance(doc.get("error"), str) and doc["error"]:
                message = doc["error"]
        cls = error_for_code(code, status)
        if cls is KMSError and message is None:
            message = f"unexpected HTTP status {status} from kmsd"
        raise cls(message)
