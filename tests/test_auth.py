"""TokenService on its own: the verified-token cache, with real Ed25519
keys and an injected clock."""

from __future__ import annotations

import base64
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kmsd.auth import CACHE_PER_SUBJECT, TokenService
from kmsd.errors import Unauthorized


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def public_b64(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.public_key().public_bytes_raw()).decode()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def signer() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def tokens(clock: Clock, signer: Ed25519PrivateKey) -> TokenService:
    service = TokenService(issuer="kmsd", audience="kmsd", lifetime=60, clock=clock, cache_size=4)
    service.set_public_keys([("sig-1", public_b64(signer))])
    return service


def sign(service: TokenService, key: Ed25519PrivateKey, user: str, kid: str = "sig-1", **extra: object) -> str:
    return jwt.encode({**service.claims_for(user), **extra}, key, algorithm="EdDSA", headers={"kid": kid})


def test_cache_keeps_digests_and_honours_exp(tokens: TokenService, signer: Ed25519PrivateKey, clock: Clock) -> None:
    token = sign(tokens, signer, "alice")
    assert tokens.cached(token) is None
    assert tokens.verify(token).subject == "alice"
    assert tokens.cached(token) is not None
    assert all(isinstance(k, bytes) and len(k) == 32 for k in tokens._cache)
    assert token.encode() not in tokens._cache and token not in tokens._cache  # type: ignore[comparison-overlap]
    clock.now += 61  # past exp: the cache must not outlive the token
    with pytest.raises(Unauthorized):
        tokens.cached(token)
    with pytest.raises(Unauthorized):
        tokens.verify(token)


def test_cache_is_emptied_when_the_keys_change(tokens: TokenService, signer: Ed25519PrivateKey) -> None:
    token = sign(tokens, signer, "bob")
    tokens.verify(token)
    tokens.set_public_keys([("sig-2", public_b64(Ed25519PrivateKey.generate()))])
    assert tokens.cached(token) is None
    with pytest.raises(Unauthorized):
        tokens.verify(token)


def test_full_cache_admits_a_new_token_by_evicting_a_random_one(
    tokens: TokenService, signer: Ed25519PrivateKey, clock: Clock
) -> None:
    first = [sign(tokens, signer, f"u{i}") for i in range(4)]
    for token in first:
        tokens.verify(token)
    late, later = (sign(tokens, signer, name, exp=int(clock.now) + 600) for name in ("late", "later"))
    assert tokens.verify(late).subject == "late"
    # Admitted: a full cache of live tokens still takes a newcomer (one
    # anonymous client filling it must not lock legitimate tokens out).
    assert tokens.cached(late) is not None and len(tokens._cache) == 4
    assert sum(tokens.cached(t) is not None for t in first) == 3
    clock.now += 61  # the first four expire: a sweep drops them, evicting nothing live
    tokens.verify(later)
    assert tokens.cached(late) is not None and tokens.cached(later) is not None and len(tokens._cache) == 2


def test_one_subject_holds_at_most_a_few_entries(clock: Clock, signer: Ed25519PrivateKey) -> None:
    """The review's flood: one anonymous subject renewing and verifying in a
    loop filled the whole cache. Now it keeps its newest few, and tokens of
    other subjects stay cached."""
    service = TokenService(issuer="kmsd", audience="kmsd", lifetime=60, clock=clock, cache_size=100)
    service.set_public_keys([("sig-1", public_b64(signer))])
    others = [sign(service, signer, f"legit-{i}") for i in range(10)]
    for token in others:
        service.verify(token)
    flood = [sign(service, signer, "squatter") for _ in range(500)]
    for token in flood:
        service.verify(token)
    assert len(service._cache) == 10 + CACHE_PER_SUBJECT
    assert all(service.cached(t) is not None for t in others)
    assert all(service.cached(t) is not None for t in flood[-CACHE_PER_SUBJECT:])
    assert service.cached(flood[0]) is None  # verified again when presented, still valid
    assert service.verify(flood[0]).subject == "squatter"


def test_renewal_never_passes_the_session_age(clock: Clock, signer: Ed25519PrivateKey) -> None:
    service = TokenService(issuer="kmsd", audience="kmsd", lifetime=60, max_session_age=100, clock=clock)
    service.set_public_keys([("sig-1", public_b64(signer))])
    first = service.claims_for("alice")
    started = first["auth_time"]
    clock.now += 70
    renewed = service.claims_for("alice", auth_time=started)
    assert renewed["auth_time"] == started and renewed["exp"] == started + 100  # not now + 60
    clock.now += 31
    with pytest.raises(Unauthorized):
        service.claims_for("alice", auth_time=started)  # nothing left to renew
    # A token whose session began too long ago is refused even before exp
    # (max_session_age lowered since it was issued).
    clock.now = time.time()
    token = jwt.encode(
        {**service.claims_for("bob"), "auth_time": int(clock.now) - 101}, signer, algorithm="EdDSA",
        headers={"kid": "sig-1"},
    )
    with pytest.raises(Unauthorized):
        service.verify(token)


def test_a_revoked_original_token_stays_revoked_in_another_spelling(clock: Clock) -> None:
    """The original's tokens have no jti: a revocation names them by a
    digest. PyJWT also accepts the token with "=" padding on its signature;
    that spelling must name the same revocation."""
    secret = "original-shared-secret"
    service = TokenService(issuer="kmsd", audience="kmsd", lifetime=60, legacy_secret=secret, clock=clock)
    now = int(clock.now)
    token = jwt.encode({"id": "legacy-user", "iat": now, "exp": now + 600}, secret, algorithm="HS256")
    claims, padded = service.verify(token), service.verify(token + "=")
    assert claims.subject == padded.subject == "legacy-user"
    assert claims.revocation_id == padded.revocation_id and claims.revocation_id.startswith("sha256:")
