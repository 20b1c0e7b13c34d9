"""kmsd's HTTP API as data, without I/O: what each call sends and how its
answer reads. ``KMSClient`` and ``AsyncKMSClient`` both build their requests
and decode their answers here and only move bytes themselves, so the two
cannot drift apart on a route, a field, an error or a redaction.

Security invariants kept here once for both clients: a token is checked
against the bearer syntax before it goes into a header (a bad one raises
``Unauthorized`` without quoting it); no error message or ``repr`` carries
a token, a body, a DEK or data; an error answer becomes the class its wire
``code`` names (``error_for_code``). And the one thing both ask a socket
before reusing it (``readable_when_idle``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote, urlsplit

from .errors import KMSError, Unauthorized, Unavailable, error_for_code

__all__ = ["DEFAULT_SOCKET_PATH", "SAFE_TO_RESEND", "Call", "Calls", "Request", "Target"]

DEFAULT_SOCKET_PATH = "/run/kmsd/kmsd.sock"

# Only these are resent after the request went out and the server hung up
# without a byte of answer: the daemon never changes state on a GET, whereas a
# POST or DELETE may already have taken effect.
SAFE_TO_RESEND = frozenset({"GET", "HEAD"})

# RFC 6750 b64token. Checked before use because a transport's own check for
# bad header values (http.client's, for one) puts the whole value, i.e. the
# token, into its message; and a CR or LF would split our own header block.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

_T = TypeVar("_T")
_R = TypeVar("_R")

@dataclass(frozen=True, slots=True)
class Target:
    """Where the daemon listens: its Unix socket, or a loopback TCP address.

    ``host_header`` is what goes into ``Host`` (the daemon wants ``localhost``
    on its socket and a loopback name on TCP); ``prefix`` is a URL's path,
    put before every route; ``where`` names the target in error messages.
    """

    socket_path: str | None
    host: str
    port: int
    host_header: str
    prefix: str
    where: str

    @classmethod
    def parse(cls, socket_path: str | None, url: str | None) -> Target:
        if socket_path is not None and url is not None:
            raise ValueError("give either socket_path or url, not both")
        if url is None:
            path = socket_path or DEFAULT_SOCKET_PATH
            return cls(path, "localhost", 0, "localhost", "", path)
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError("url must start with http:// (kmsd listens on loopback TCP)")
        # Never quote the url back: it is refused precisely because it holds
        # a password.
        if parts.username is not None or parts.password is not None:
            raise ValueError("url must not carry credentials; use token=")
        if not parts.hostname:
            raise ValueError("url has no host")
        try:
            port = parts.port or 80
        except ValueError:
            raise ValueError("url has a bad port") from None
        prefix = parts.path.rstrip("/")
        return cls(None, parts.hostname, port, parts.netloc, prefix, f"http://{parts.netloc}{prefix}")

    def describe(self) -> str:
        """How a client's repr names this target."""
        return f"url={self.where!r}" if self.socket_path is None else f"socket_path={self.socket_path!r}"


@dataclass(frozen=True, slots=True, repr=False)
class Request:
    """One HTTP request, ready for any transport. ``target`` is the request
    target (the prefix, the quoted path and any query); ``headers`` may hold
    the token, ``body`` data or a DEK: the repr shows neither."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes | None

    def __repr__(self) -> str:
        return f"Request({self.method} {self.target})"


@dataclass(frozen=True, slots=True, repr=False)
class Call(Generic[_T]):
    """A request and how to read its answer (status and raw body) into the
    call's result; ``parse`` raises the call's ``KMSError``."""

    request: Request
    parse: Callable[[int, bytes], _T]

    def __repr__(self) -> str:
        return f"Call({self.request!r})"


def malformed() -> KMSError:
    # Never quote the body: a half-valid answer may still carry a secret.
    return KMSError("malformed response from kmsd")


def field(doc: Mapping[str, Any], name: str, kind: type[_T]) -> _T:
    value = doc.get(name)
    if not isinstance(value, kind):
        raise malformed()
    return value


def _hex(doc: Mapping[str, Any], name: str) -> bytes:
    try:
        return bytes.fromhex(field(doc, name, str))
    except ValueError:
        raise malformed() from None


def build_request(
    target: Target, method: str, path: str, body: Mapping[str, Any] | None = None, token: str | None = None
) -> Request:
    """The request for a route: JSON body (if any) and bearer token (if any).
    ``path`` is already quoted."""
    headers = [("Host", target.host_header), ("Accept", "application/json"), ("User-Agent", "kmsd-client")]
    payload: bytes | None = None
    if body is not None:
        payload = json.dumps(body).encode("utf-8")
        headers.append(("Content-Type", "application/json"))
    if token is not None:
        if not isinstance(token, str) or not _BEARER_TOKEN.fullmatch(token):
            raise Unauthorized()
        headers.append(("Authorization", f"Bearer {token}"))
    return Request(method, target.prefix + path, tuple(headers), payload)


def error_from(doc: Any, status: int) -> KMSError:
    """The error an answer (or a batch entry) stands for: the class of its
    ``code``, else of its status, with the daemon's own short message."""
    code = message = None
    if isinstance(doc, dict):
        if isinstance(doc.get("code"), str):
            code = doc["code"]
        if isinstance(doc.get("error"), str) and doc["error"]:
            message = doc["error"]
    cls = error_for_code(code, status)
    if cls is KMSError and message is None:
        message = f"unexpected HTTP status {status} from kmsd"
    return cls(message)


def decode(status: int, raw: bytes) -> dict[str, Any]:
    """A 2xx answer's JSON object; any other status raised as its error."""
    try:
        doc = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError):
        doc = None
    if 200 <= status < 300:
        if not isinstance(doc, dict):
            raise malformed()
        return doc
    raise error_from(doc, status)


def _reading(read: Callable[[dict[str, Any]], _T]) -> Callable[[int, bytes], _T]:
    return lambda status, raw: read(decode(status, raw))


def _document(doc: dict[str, Any]) -> dict[str, Any]:
    return doc


def _nothing(doc: dict[str, Any]) -> None:
    return None


def _quoted(key_id: str) -> str:
    # A key id is the daemon's, but quoting keeps a "/" or "?" in a caller's
    # value from naming another route.
    return quote(key_id, safe="")


# -- request bodies: one builder per envelope route, used by the single call
# and, item by item, by its batch ---------------------------------------------


def _with_context(body: dict[str, Any], context: Mapping[str, str] | None) -> dict[str, Any]:
    # Sent only when given: an envelope wrapped without a context must keep
    # the exact request the daemon always had.
    if context is not None:
        body["context"] = dict(context)
    return body


def encrypt_body(
    data: bytes, dek: bytes, user_id: str | None = None, *, context: Mapping[str, str] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"data": base64.b64encode(data).decode("ascii"), "dek": bytes(dek).hex()}
    if user_id is not None:
        body["user_id"] = user_id
    return _with_context(body, context)


def datakey_body(
    user_id: str | None = None, *, plaintext: bool = True, context: Mapping[str, str] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {} if plaintext else {"plaintext": False}
    if user_id is not None:
        body["user_id"] = user_id
    return _with_context(body, context)


def decrypt_dek_body(encrypted_dek: str, *, context: Mapping[str, str] | None = None) -> dict[str, Any]:
    return _with_context({"encrypted_dek": encrypted_dek}, context)


def rewrap_body(
    encrypted_dek: str, user_id: str | None = None, *, context: Mapping[str, str] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"encrypted_dek": encrypted_dek}
    if user_id is not None:
        body["user_id"] = user_id
    return _with_context(body, context)


# -- answers ------------------------------------------------------------------


def read_encrypt(doc: Mapping[str, Any]) -> tuple[str, str]:
    return field(doc, "encrypted_key", str), field(doc, "encrypted_dek", str)


def datakey_reader(plaintext: bool) -> Callable[[Mapping[str, Any]], tuple[bytes | None, str]]:
    def read(doc: Mapping[str, Any]) -> tuple[bytes | None, str]:
        encrypted_dek = field(doc, "encrypted_dek", str)
        return (_hex(doc, "dek") if plaintext else None), encrypted_dek

    return read


def read_decrypt_dek(doc: Mapping[str, Any]) -> bytes:
    return _hex(doc, "dek")


def read_rewrap(doc: Mapping[str, Any]) -> str:
    return field(doc, "encrypted_dek", str)


def read_verify(doc: Mapping[str, Any]) -> dict[str, Any]:
    if doc.get("valid") is not True:
        raise Unauthorized()
    return field(doc, "payload", dict)


def read_ready(status: int, raw: bytes) -> bool:
    # 503 is the daemon's "not ready yet", an answer rather than a failure.
    if status == 503:
        return False
    decode(status, raw)
    return True


def batch_reader(
    readers: Sequence[Callable[[Mapping[str, Any]], _R]],
) -> Callable[[int, bytes], list[_R | KMSError]]:
    """Reads ``{"batch": [entry, ...]}``: one entry per item, in order, each
    read by its item's reader, or turned into that item's ``KMSError``
    (returned in place: one item's failure is not the call's). A batch the
    daemon refused as a whole (401, 413, ...) raises like any call."""

    def read(doc: dict[str, Any]) -> list[_R | KMSError]:
        entries = field(doc, "batch", list)
        if len(entries) != len(readers):
            raise malformed()
        results: list[_R | KMSError] = []
        for entry, read_one in zip(entries, readers, strict=True):
            if not isinstance(entry, dict):
                raise malformed()
            if "error" in entry:
                status = entry.get("status")
                results.append(error_from(entry, status if isinstance(status, int) else 0))
            else:
                results.append(read_one(entry))
        return results

    return _reading(read)


class Calls:
    """The ``Call`` of every API operation for one target. Both clients hold
    one and only do I/O with what it builds; ``token`` is the bearer already
    resolved (the argument, else the client's default)."""

    def __init__(self, target: Target) -> None:
        self.target = target

    def _call(
        self,
        method: str,
        path: str,
        read: Callable[[dict[str, Any]], _T],
        body: Mapping[str, Any] | None = None,
        token: str | None = None,
    ) -> Call[_T]:
        return Call(build_request(self.target, method, path, body, token), _reading(read))

    def issue(self, user_id: str, token: str | None) -> Call[str]:
        return self._call("POST", "/issue", lambda d: field(d, "token", str), {"id": user_id}, token)

    def verify(self, token: str) -> Call[dict[str, Any]]:
        # The token travels in the body here, never as this call's bearer.
        return self._call("POST", "/verify", read_verify, {"token": token})

    def store(self, user_id: str, data: str, token: str | None) -> Call[str]:
        return self._call(
            "POST", "/api/keys", lambda d: field(d, "access_token", str), {"data": data, "user_id": user_id}, token
        )

    def fetch(self, token: str | None) -> Call[str]:
        return self._call("GET", "/api/keys", lambda d: field(d, "data", str), token=token)

    def delete(self, token: str | None) -> Call[None]:
        return self._call("DELETE", "/api/keys", _nothing, token=token)

    def revoke(self, token: str | None, everything: bool) -> Call[None]:
        return self._call("POST", "/api/tokens/revoke", _nothing, {"all": True} if everything else {}, token)

    def revoke_subject(self, user_id: str, token: str | None) -> Call[None]:
        return self._call("POST", "/api/tokens/revoke", _nothing, {"user_id": user_id}, token)

    def encrypt(self, body: dict[str, Any], token: str | None) -> Call[tuple[str, str]]:
        return self._call("POST", "/api/encrypt", read_encrypt, body, token)

    def datakey(self, body: dict[str, Any], plaintext: bool, token: str | None) -> Call[tuple[bytes | None, str]]:
        return self._call("POST", "/api/datakey", datakey_reader(plaintext), body, token)

    def decrypt_dek(self, body: dict[str, Any], token: str | None) -> Call[bytes]:
        return self._call("POST", "/api/decrypt-dek", read_decrypt_dek, body, token)

    def rewrap(self, body: dict[str, Any], token: str | None) -> Call[str]:
        return self._call("POST", "/api/rewrap", read_rewrap, body, token)

    def encrypt_batch(
        self, items: Sequence[Mapping[str, Any]], token: str | None
    ) -> Call[list[tuple[str, str] | KMSError]]:
        bodies = [encrypt_body(**item) for item in items]
        return self._batch("/api/encrypt", bodies, [read_encrypt] * len(bodies), token)

    def datakey_batch(
        self, items: Sequence[Mapping[str, Any]], token: str | None
    ) -> Call[list[tuple[bytes | None, str] | KMSError]]:
        bodies = [datakey_body(**item) for item in items]
        readers = [datakey_reader(bool(item.get("plaintext", True))) for item in items]
        return self._batch("/api/datakey", bodies, readers, token)

    def decrypt_dek_batch(self, items: Sequence[Mapping[str, Any]], token: str | None) -> Call[list[bytes | KMSError]]:
        bodies = [decrypt_dek_body(**item) for item in items]
        return self._batch("/api/decrypt-dek", bodies, [read_decrypt_dek] * len(bodies), token)

    def rewrap_batch(self, items: Sequence[Mapping[str, Any]], token: str | None) -> Call[list[str | KMSError]]:
        bodies = [rewrap_body(**item) for item in items]
        return self._batch("/api/rewrap", bodies, [read_rewrap] * len(bodies), token)

    def _batch(
        self,
        path: str,
        bodies: list[dict[str, Any]],
        readers: Sequence[Callable[[Mapping[str, Any]], _R]],
        token: str | None,
    ) -> Call[list[_R | KMSError]]:
        return Call(build_request(self.target, "POST", path, {"batch": bodies}, token), batch_reader(readers))

    def rotation_status(self, token: str | None) -> Call[dict[str, Any]]:
        return self._call("GET", "/api/rotate-mk", _document, token=token)

    def rotate(self, token: str | None) -> Call[dict[str, Any]]:
        return self._call("POST", "/api/rotate-mk", _document, token=token)

    def list_master_keys(self, token: str | None) -> Call[dict[str, Any]]:
        return self._call("GET", "/api/master-keys", _document, token=token)

    def add_master_key(self, description: str | None, token: str | None) -> Call[dict[str, Any]]:
        body = {"description": description} if description is not None else {}
        return self._call("POST", "/api/master-keys", _document, body, token)

    def destroy_master_key(self, key_id: str, now: bool, token: str | None) -> Call[dict[str, Any]]:
        query = "?now=true" if now else ""
        return self._call("DELETE", f"/api/master-keys/{_quoted(key_id)}{query}", _document, token=token)

    def schedule_key_deletion(self, key_id: str, days: int, token: str | None) -> Call[dict[str, Any]]:
        path = f"/api/master-keys/{_quoted(key_id)}/schedule-deletion"
        return self._call("POST", path, _document, {"days": days}, token)

    def cancel_key_deletion(self, key_id: str, token: str | None) -> Call[dict[str, Any]]:
        return self._call("POST", f"/api/master-keys/{_quoted(key_id)}/cancel-deletion", _document, token=token)

    def health(self) -> Call[dict[str, Any]]:
        return self._call("GET", "/healthz", _document)

    def ready(self) -> Call[bool]:
        return Call(build_request(self.target, "GET", "/readyz"), read_ready)

    def jwks(self) -> Call[dict[str, Any]]:
        return self._call("GET", "/.well-known/jwks.json", _document)


class BaseClient:
    """What ``KMSClient`` and ``AsyncKMSClient`` share: the target, the
    default token, the timeout, the repr and the ``Calls`` to send. The
    subclasses only do I/O.

    ``socket_path`` selects the Unix socket (default ``DEFAULT_SOCKET_PATH``);
    ``url`` (``http://127.0.0.1:8000``) selects TCP instead. ``token`` is the
    bearer token used by every call that takes a ``token`` argument when that
    argument is left out; no call ever changes it.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._target = Target.parse(socket_path, url)
        self._calls = Calls(self._target)
        self.token = token
        self.timeout = timeout

    def __repr__(self) -> str:
        token = ", token=<redacted>" if self.token is not None else ""
        return f"{type(self).__name__}({self._target.describe()}{token})"

    def _bearer(self, token: str | None) -> str | None:
        return token if token is not None else self.token


def reason(exc: BaseException) -> str:
    """A short, secret-free word on why a transport failed."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno:
        # From the number, not the message: asyncio's messages name the
        # address, and ours already does.
        return os.strerror(exc.errno).lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


def unreachable(target: Target, why: str) -> Unavailable:
    return Unavailable(f"cannot reach kmsd at {target.where}: {why}")


def readable_when_idle(fileno: int) -> bool:
    """Whether an idle keep-alive socket has something to read, i.e. is no
    longer usable: between requests the daemon has nothing to say, so that
    means it hung up (or sent something never asked for). Asked before
    sending, it is what makes reconnecting safe even for a POST. A socket
    that cannot be asked counts as gone."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fileno, select.POLLIN)
            return bool(poller.poll(0))
        readable, _, _ = select.select([fileno], [], [], 0)
        return bool(readable)
    except (OSError, ValueError):
        return True
