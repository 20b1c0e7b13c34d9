"""The error table is pinned: class -> HTTP status -> wire code, and the
client rebuilds the same class from the code."""

from __future__ import annotations

import pytest

from kmsd import errors

TABLE = [
    (errors.BadRequest, 400, "bad_request"),
    (errors.Unauthorized, 401, "unauthorized"),
    (errors.Forbidden, 403, "forbidden"),
    (errors.NotFound, 404, "not_found"),
    (errors.MethodNotAllowed, 405, "method_not_allowed"),
    (errors.RequestTimeout, 408, "timeout"),
    (errors.Conflict, 409, "conflict"),
    (errors.PayloadTooLarge, 413, "too_large"),
    (errors.URITooLong, 414, "uri_too_long"),
    (errors.UnsupportedMediaType, 415, "unsupported_media_type"),
    (errors.TooManyRequests, 429, "rate_limited"),
    (errors.DecryptionFailed, 422, "decryption_failed"),
    (errors.KeyPendingDeletion, 409, "key_pending_deletion"),
    (errors.Unavailable, 503, "unavailable"),
    (errors.InternalError, 500, "internal"),
]


@pytest.mark.parametrize("cls, status, code", TABLE)
def test_error_table(cls: type[errors.KMSError], status: int, code: str) -> None:
    assert (cls.status, cls.code) == (status, code)
    assert errors.error_for_code(code, 599) is cls
    assert issubclass(cls, errors.KMSError)


def test_every_error_class_is_in_the_table() -> None:
    assert set(errors.ERRORS_BY_CODE.values()) == {c for c, _, _ in TABLE}


def test_unknown_code_falls_back_on_status() -> None:
    assert errors.error_for_code("no-such-code", 404) is errors.NotFound
    assert errors.error_for_code(None, 418) is errors.KMSError


def test_store_and_vault_errors_map_to_503() -> None:
    from kmsd.store import StoreError

    assert StoreError.status == 503 and issubclass(StoreError, errors.Unavailable)


def test_the_log_line_of_a_5xx_names_its_cause_unless_the_code_hid_it() -> None:
    from kmsd.middleware import failure_of as _failure
    from kmsd.store import StoreError

    try:
        try:
            raise OSError("database or disk is full")
        except OSError as exc:
            raise StoreError() from exc
    except StoreError as err:
        assert _failure(err) == {"error": "unavailable", "cause": "OSError: database or disk is full"}
    try:
        try:
            raise ValueError("a detail the code chose not to pass on")
        except ValueError:
            raise errors.Unavailable("vault timed out") from None
    except errors.Unavailable as err:
        assert _failure(err) == {"error": "unavailable"}
