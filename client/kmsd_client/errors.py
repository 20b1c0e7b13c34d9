"""The errors of kmsd's wire contract, shared by the daemon and the client.

Each class carries the HTTP status it maps to and a stable ``code`` that goes
into every error response, so that the client can rebuild the same class from
the wire (``error_for_code``). Messages are fixed, short and never carry a
payload: authentication and decryption failures never say why.

They live in the client's distribution (which has no dependencies) so that
the daemon depends on the client and never the other way round;
``kmsd.errors`` re-exports them beside the daemon's own errors.
"""

from __future__ import annotations

__all__ = [
    "KMSError",
    "BadRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "MethodNotAllowed",
    "Conflict",
    "RequestTimeout",
    "PayloadTooLarge",
    "URITooLong",
    "UnsupportedMediaType",
    "TooManyRequests",
    "DecryptionFailed",
    "KeyPendingDeletion",
    "Unavailable",
    "InternalError",
    "ERRORS_BY_CODE",
    "error_for_code",
]


class KMSError(Exception):
    """Base of every error kmsd raises on purpose."""

    status: int = 500
    code: str = "internal"
    default_message: str = "internal error"

    def __init__(self, message: str | None = None, *, extra: dict[str, object] | None = None) -> None:
        self.message = message or self.default_message
        # Fields a route's documented error shape adds next to "error"
        # (e.g. ``{"valid": false}`` for /verify). Never a payload.
        self.extra = extra or {}
        super().__init__(self.message)


class BadRequest(KMSError):
    status = 400
    code = "bad_request"
    default_message = "bad request"


class Unauthorized(KMSError):
    status = 401
    code = "unauthorized"
    default_message = "invalid or missing token"


class Forbidden(KMSError):
    status = 403
    code = "forbidden"
    default_message = "forbidden"


class NotFound(KMSError):
    status = 404
    code = "not_found"
    default_message = "not found"


class MethodNotAllowed(KMSError):
    status = 405
    code = "method_not_allowed"
    default_message = "method not allowed"


class Conflict(KMSError):
    status = 409
    code = "conflict"
    default_message = "conflict"


class RequestTimeout(KMSError):
    """The request (its head or its body) did not arrive in time: a slow or
    stalled client. The connection is closed after this answer."""

    status = 408
    code = "timeout"
    default_message = "request timed out"


class PayloadTooLarge(KMSError):
    status = 413
    code = "too_large"
    default_message = "request body too large"


class URITooLong(KMSError):
    """A request target longer than any route needs: refused before routing,
    whose cost grows with the length of the path."""

    status = 414
    code = "uri_too_long"
    default_message = "request target too long"


class UnsupportedMediaType(KMSError):
    """A body that does not say it is JSON. A web page can send a
    cross-site POST with ``text/plain`` without asking first (a CORS simple
    request), never with ``application/json``."""

    status = 415
    code = "unsupported_media_type"
    default_message = "request body must be application/json"


class TooManyRequests(KMSError):
    """A peer (a uid on the Unix socket, the TCP side as a whole) went over
    one of its rate limits: retry after ``retry_after`` seconds (also the
    Retry-After header). Its connections are paused until then."""

    status = 429
    code = "rate_limited"
    default_message = "too many requests"


class DecryptionFailed(KMSError):
    """A ciphertext did not authenticate: tampered, truncated, moved to another
    owner, or wrapped under a key that is gone. Never says which."""

    status = 422
    code = "decryption_failed"
    default_message = "decryption failed"


class KeyPendingDeletion(KMSError):
    """The wrapped DEK is under a master key scheduled for deletion: nothing
    unwraps under it until an operator cancels the deletion (``kmsd mk
    cancel-deletion``). Its own code, so a caller can tell it from a
    ciphertext that does not authenticate."""

    status = 409
    code = "key_pending_deletion"
    default_message = "the master key of this ciphertext is scheduled for deletion"


class Unavailable(KMSError):
    """A dependency (vault, database, audit trail) is down; retry later."""

    status = 503
    code = "unavailable"
    default_message = "service unavailable"


class InternalError(KMSError):
    status = 500
    code = "internal"
    default_message = "internal error"


ERRORS_BY_CODE: dict[str, type[KMSError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        Conflict,
        RequestTimeout,
        PayloadTooLarge,
        URITooLong,
        UnsupportedMediaType,
        TooManyRequests,
        DecryptionFailed,
        KeyPendingDeletion,
        Unavailable,
        InternalError,
    )
}


def error_for_code(code: str | None, status: int) -> type[KMSError]:
    """The error class for a wire ``code``, falling back on the HTTP status."""
    if code in ERRORS_BY_CODE:
        return ERRORS_BY_CODE[code]
    for cls in ERRORS_BY_CODE.values():
        if cls.status == status:
            return cls
    return KMSError
