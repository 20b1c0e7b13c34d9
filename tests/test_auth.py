"""TokenService on its own: the verified-token cache, with real Ed25519
keys and an injected clock."""

from __future__ import annotations

import base64
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kmsd.auth import TokenService
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


def test_full_cache_admits_nothing_until_entries_expire(
    tokens: TokenService, signer: Ed25519PrivateKey, clock: Clock
) -> None:
    first = [sign(tokens, signer, f"u{i}") for i in range(4)]
    for token in first:
        tokens.verify(token)
    late = sign(tokens, signer, "late", exp=int(clock.now) + 600)
    assert tokens.verify(late).subject == "late"  # verified, but not cached
    assert tokens.cached(late) is None and len(tokens._cache) == 4
    assert all(tokens.cached(t) is not None for t in first)  # nothing was evicted for it
    clock.now += 61  # the first four expire: a sweep makes room
    tokens.verify(late)
    assert tokens.cached(late) is not None and len(tokens._cache) == 1
