"""Who is calling: JWT verification and the peer-credential policy.

Knows nothing of HTTP. Tokens are signed in the vault (EdDSA) and verified
here with the public keys only, against a fixed algorithm allow-list: the
``alg`` in a token's header never chooses the algorithm.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import socket
import struct
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import Unauthorized

__all__ = [
    "Claims",
    "Peer",
    "PeerPolicy",
    "TokenService",
    "peer_from_socket",
    "user_id_of",
]

ALGORITHMS = ["EdDSA"]
# The original auth service's tokens: verified only with its shared secret,
# and only when that secret is configured as a migration option.
LEGACY_ALGORITHMS = ["HS256"]
MAX_TOKEN_LENGTH = 4096
# The original auth service issued 30-day tokens: one of its tokens that
# claims to live longer is not one of them (exp = 10**300, say).
LEGACY_MAX_LIFETIME = 31 * 86400
MAX_USER_ID = 64
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


@dataclass(frozen=True)
class Peer:
    """The caller as the kernel or the network sees it."""

    transport: str  # "unix" | "tcp"
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    groups: tuple[int, ...] = ()
    address: str | None = None

    def describe(self) -> dict[str, Any]:
        if self.transport == "unix":
            return {"peer_uid": self.uid, "peer_pid": self.pid}
        return {"peer_addr": self.address}

    def audit(self) -> dict[str, Any]:
        if self.transport == "unix":
            return {"transport": "unix", "uid": self.uid, "gid": self.gid, "pid": self.pid}
        return {"transport": self.transport, "address": self.address}


def peer_from_socket(sock: socket.socket | None) -> Peer:
    """Read SO_PEERCRED (and SO_PEERGROUPS) of a Unix-socket connection."""
    if sock is None:
        return Peer("unknown")
    if sock.family == socket.AF_UNIX:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        groups: tuple[int, ...] = ()
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
            groups = struct.unpack(f"{len(raw) // 4}I", raw)
        except OSError:
            pass
        return Peer("unix", uid=uid, gid=gid, pid=pid, groups=groups)
    try:
        host, port = sock.getpeername()[:2]
        return Peer("tcp", address=f"{host}:{port}")
    except OSError:
        return Peer("tcp")


@dataclass(frozen=True)
class PeerPolicy:
    """Who may do what, by the kernel's word on a Unix-socket peer.

    Clients (store, read, encrypt; empty lists: anyone who can connect to
    the socket, whose mode and group are the first gate) and admins (issue
    tokens for any id, master keys; root by default). TCP callers are
    anonymous: clients unless ``allow_tcp_clients`` is off, never admins
    unless the deployment explicitly allows it."""

    admin_uids: tuple[int, ...] = (0,)
    admin_gids: tuple[int, ...] = ()
    allow_admin_over_tcp: bool = False
    client_uids: tuple[int, ...] = ()
    client_gids: tuple[int, ...] = ()
    allow_tcp_clients: bool = True

    def is_admin(self, peer: Peer) -> bool:
        if peer.transport == "tcp":
            return self.allow_admin_over_tcp
        if peer.transport != "unix":
            return False
        if peer.uid in self.admin_uids:
            return True
        gids = {peer.gid, *peer.groups}
        return any(g in gids for g in self.admin_gids)

    def is_client(self, peer: Peer) -> bool:
        if peer.transport == "tcp":
            return self.allow_tcp_clients or self.allow_admin_over_tcp
        if peer.transport != "unix":
            return False
        if not (self.client_uids or self.client_gids) or self.is_admin(peer):
            return True
        if peer.uid in self.client_uids:
            return True
        gids = {peer.gid, *peer.groups}
        return any(g in gids for g in self.client_gids)


@dataclass(frozen=True)
class Claims:
    subject: str
    token_id: str | None
    payload: dict[str, Any]


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenService:
    """Builds claims for the vault to sign, and verifies tokens."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        lifetime: int,
        legacy_secret: str | None = None,
        clock: Callable[[], float] = time.time,
        cache_size: int = 50_000,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.lifetime = lifetime
        self._legacy_secret = legacy_secret.encode("utf-8") if legacy_secret else None
        self._clock = clock
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._jwks: list[dict[str, Any]] = []
        # Verified tokens: SHA-256 of the token -> its claims (never the
        # token itself). A signature check is most of a read's CPU, and
        # clients present the same token many times. Bounded; an entry is
        # used only until the token's exp; emptied whenever the keys change.
        self._cache: dict[bytes, Claims] = {}
        self.cache_size = cache_size
        self._last_sweep = float("-inf")
        self._last_header: tuple[str, dict[str, Any]] | None = None

    def set_public_keys(self, keys: Iterable[tuple[str, str]]) -> None:
        """(kid, base64 raw Ed25519 public key) pairs that may verify tokens."""
        loaded: dict[str, Ed25519PublicKey] = {}
        jwks: list[dict[str, Any]] = []
        for kid, public in keys:
            raw = base64.b64decode(public)
            loaded[kid] = Ed25519PublicKey.from_public_bytes(raw)
            jwks.append(
                {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "alg": "EdDSA",
                    "use": "sig",
                    "kid": kid,
                    "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode(),
                }
            )
        self._keys = loaded
        self._jwks = jwks
        self._cache.clear()

    def jwks(self) -> dict[str, Any]:
        return {"keys": list(self._jwks)}

    def claims_for(self, user_id: str, *, id_claim: int | None = None) -> dict[str, Any]:
        """``id_claim``: the ``id`` as the caller gave it (a JSON integer
        stays one, as the original's tokens had it); ``sub`` is its decimal
        string either way."""
        now = int(self._clock())
        return {
            "id": user_id if id_claim is None else id_claim,  # the original's claim, kept for its clients
            "sub": user_id,
            "iss": self.issuer,
            "aud": self.audience,
            "iat": now,
            "nbf": now,
            "exp": now + self.lifetime,
            "jti": secrets.token_urlsafe(12),
        }

    def _header(self, token: str) -> dict[str, Any]:
        """The unverified header; the last one is kept because has_key and
        _verify look at the same token one after the other (a parse is ~10 us
        of pyjwt's Python)."""
        last = self._last_header
        if last is not None and last[0] is token:
            return last[1]
        header = jwt.get_unverified_header(token)
        self._last_header = (token, header)
        return header

    def has_key(self, token: str) -> bool:
        try:
            header = self._header(token)
        except jwt.PyJWTError:
            return True  # let verify() reject it
        kid = header.get("kid")
        return header.get("alg") in LEGACY_ALGORITHMS or (isinstance(kid, str) and kid in self._keys)

    def cached(self, token: str) -> Claims | None:
        """The claims of a token verified before and not expired since."""
        if not self._cache or not isinstance(token, str):
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        claims = self._cache.get(digest)
        if claims is None:
            return None
        if claims.payload["exp"] <= self._clock():
            self._cache.pop(digest, None)
            raise Unauthorized()
        return claims

    def verify(self, token: str) -> Claims:
        """The token's claims, or ``Unauthorized`` (never saying why)."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized()
        claims = self.cached(token)
        if claims is None:
            claims = self._verify(token)
            if self.cache_size > 0 and (len(self._cache) < self.cache_size or self._sweep()):
                self._cache[hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()] = claims
        return claims

    def _sweep(self) -> bool:
        """Make room by dropping expired entries (at most once a second);
        True if there is room now. A full cache of live tokens admits no
        more: evicting one to admit another would make clients that cycle
        through more tokens than fit miss every time (LRU and FIFO do)."""
        now = self._clock()
        if now - self._last_sweep < 1.0:
            return False
        self._last_sweep = now
        for digest in [d for d, c in self._cache.items() if c.payload["exp"] <= now]:
            del self._cache[digest]
        return len(self._cache) < self.cache_size

    def _verify(self, token: str) -> Claims:
        try:
            header = self._header(token)
            self._last_header = None  # no token stays behind in the memo
            if header.get("alg") in LEGACY_ALGORITHMS:
                return self._verify_legacy(token)
            kid = header.get("kid")
            key = self._keys.get(kid) if isinstance(kid, str) else None
            if key is None:
                raise Unauthorized()
            payload = jwt.decode(
                token,
                key,
                algorithms=ALGORITHMS,
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
                leeway=0,
            )
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Unauthorized() from None
        subject = payload.get("sub")
        if not isinstance(subject, str) or user_id_of(payload.get("id", subject)) != subject:
            raise Unauthorized()
        # pyjwt checks exp and nbf against the real clock; an injected clock
        # (tests) must agree, so check against it too.
        now = self._clock()
        if payload["exp"] <= now or payload.get("nbf", 0) > now + 1:
            raise Unauthorized()
        jti = payload.get("jti")
        return Claims(subject, jti if isinstance(jti, str) else None, payload)

    def _verify_legacy(self, token: str) -> Claims:
        """A token of the original auth service: HS256 with its shared
        secret, payload ``{id, iat, exp}``. The header only picks this path;
        the algorithm and the key are fixed here."""
        if self._legacy_secret is None:
            raise Unauthorized()
        with warnings.catch_warnings():
            # The original's secrets are often shorter than RFC 7518 wants;
            # they are what its tokens were signed with.
            warnings.simplefilter("ignore")
            payload = jwt.decode(
                token,
                self._legacy_secret,
                algorithms=LEGACY_ALGORITHMS,
                options={"require": ["exp", "iat"], "verify_aud": False},
                leeway=0,
            )
        # A numeric id is the user whose id is its decimal string: the
        # original stored it in a VARCHAR column, where MySQL made it that.
        subject = user_id_of(payload.get("id"))
        if subject is None or not subject or len(subject) > MAX_USER_ID or not self._legacy_claims_ok(payload, subject):
            raise Unauthorized()
        return Claims(subject, None, payload)

    def _legacy_claims_ok(self, payload: dict[str, Any], subject: str) -> bool:
        """The checks of kmsd's own tokens, minus what the original never set
        (``aud``, ``iss``, ``sub``: checked when present), and a lifetime no
        longer than the original ever gave (30 days)."""
        now = self._clock()
        exp, iat = payload["exp"], payload["iat"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (exp, iat)):
            return False
        if exp <= now or iat > now + 60 or exp - iat > LEGACY_MAX_LIFETIME:
            return False
        if "nbf" in payload and not (isinstance(payload["nbf"], int) and payload["nbf"] <= now + 1):
            return False
        aud = payload.get("aud", self.audience)
        if aud != self.audience and not (isinstance(aud, list) and self.audience in aud):
            return False
        return payload.get("iss", self.issuer) == self.issuer and user_id_of(payload.get("sub", subject)) == subject


def user_id_of(value: Any) -> str | None:
    """A user id as the original's clients send it: a string, or a JSON
    integer taken as its decimal string (never a bool or a float). None
    for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def random_kid() -> str:
    return "sig-" + os.urandom(8).hex()
