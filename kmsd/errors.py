"""The one exception hierarchy of kmsd.

The errors of the wire contract (each with its HTTP status and stable
``code``) live in the client's distribution, ``kmsd_client.errors``, so that
the daemon depends on the client and not the other way round; they are
re-exported here beside the errors only the daemon raises. Every one of them
is rendered in one place, the server's error middleware.
"""

from __future__ import annotations

import json

from kmsd_client.errors import (
    ERRORS_BY_CODE,
    BadRequest,
    Conflict,
    DecryptionFailed,
    Forbidden,
    InternalError,
    KeyPendingDeletion,
    KMSError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    URITooLong,
    error_for_code,
)

__all__ = [
    "ERRORS_BY_CODE",
    "AuditUnavailable",
    "ConfigError",
    "BadRequest",
    "Conflict",
    "DecryptionFailed",
    "Forbidden",
    "InternalError",
    "KeyPendingDeletion",
    "KMSError",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "RequestTimeout",
    "StoreError",
    "TooManyRequests",
    "URITooLong",
    "Unauthorized",
    "Unavailable",
    "UnknownKey",
    "UnsupportedMediaType",
    "VaultError",
    "WrongRootKey",
    "error_body",
    "error_fields",
    "error_for_code",
]


def error_fields(exc: KMSError) -> dict[str, object]:
    """What every error answer says: the documented extra fields, then
    ``error`` and ``code`` (a batch item's adds its ``status``)."""
    return {**exc.extra, "error": exc.message, "code": exc.code}


def error_body(exc: KMSError) -> bytes:
    """The JSON body of every error answer, wherever it is rendered (the
    error middleware, and the connection layer for what never reaches a
    route)."""
    return json.dumps(error_fields(exc), separators=(",", ":")).encode()


class StoreError(Unavailable):
    """The database failed; the request may be retried later."""

    default_message = "storage unavailable"

    @classmethod
    def outcome_unknown(cls) -> StoreError:
        """A write that the database may have applied before it went away
        (the connection broke, or the time ran out, after the statement was
        sent): the client must not take this 503 to mean nothing was written."""
        return cls("storage unavailable; the write may have been applied", extra={"outcome": "unknown"})


class AuditUnavailable(Unavailable):
    default_message = "audit trail unavailable"


class ConfigError(KMSError):
    """Invalid configuration: reported at startup, never over HTTP."""

    code = "config"
    default_message = "invalid configuration"


class VaultError(KMSError):
    """The vault refused a request for a reason the daemon must handle."""


class UnknownKey(VaultError):
    """The ciphertext names a master key the vault does not hold (yet)."""


class WrongRootKey(VaultError):
    # A 503: this daemon must be restarted with the current root key.
    status = 503
    code = "unavailable"
    default_message = "a master key does not unwrap under the configured root key"
