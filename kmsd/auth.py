"""Who is calling: JWT verification and the peer-credential policy.

Knows nothing of HTTP. Tokens are signed in the vault (EdDSA) and verified
here with the public keys only, against a fixed algorithm allow-list: the
``alg`` in a token's header never chooses the algorithm.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
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
# Verified tokens cached per subject: a client that renews keeps its newest
# few; one that renews in a loop cannot take more.
CACHE_PER_SUBJECT = 4
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
    # What a token is tied to, checked at every use against the store:
    # the subject's generation ("" for tokens that predate one: the
    # original's, and kmsd's before it set any), the first authentication
    # the session grew from, and the id a revocation names it by.
    generation: str = ""
    auth_time: int = 0
    # A renewal keeps its token's session (sid): revoking a token revokes
    # the renewals made from it too, or a thief who renewed would keep it.
    revocation_id: str = ""
    session: str | None = None

    @property
    def expires(self) -> int:
        return int(self.payload["exp"])


class _Cache:
    """Verified tokens by SHA-256 digest (never the token itself) -> claims.

    Bounded in total and per subject. A new subject's token is always
    admitted: expired entries are swept first (at most once a second), then
    a random entry makes room. Random, not LRU or FIFO: clients that cycle
    through more tokens than fit would miss every time under those, and a
    flood cannot choose what it evicts."""

    def __init__(self, size: int, clock: Callable[[], float]) -> None:
        self.size = size
        self._clock = clock
        self._entries: dict[bytes, tuple[Claims, int]] = {}
        self._slots: list[bytes] = []  # for a random victim in O(1)
        self._by_subject: dict[str, list[bytes]] = {}
        self._last_sweep = float("-inf")

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Any:
        return iter(self._entries)

    def get(self, digest: bytes) -> Claims | None:
        entry = self._entries.get(digest)
        return entry[0] if entry is not None else None

    def clear(self) -> None:
        self._entries.clear()
        self._slots.clear()
        self._by_subject.clear()

    def put(self, digest: bytes, claims: Claims) -> None:
        if self.size <= 0 or digest in self._entries:
            return
        mine = self._by_subject.get(claims.subject)
        if mine is not None and len(mine) >= CACHE_PER_SUBJECT:
            self.discard(mine[0])  # the subject's oldest
        elif len(self._entries) >= self.size:
            self._sweep()
            if len(self._entries) >= self.size:
                self.discard(random.choice(self._slots))
        self._entries[digest] = (claims, len(self._slots))
        self._slots.append(digest)
        self._by_subject.setdefault(claims.subject, []).append(digest)

    def discard(self, digest: bytes) -> None:
        entry = self._entries.pop(digest, None)
        if entry is None:
            return
        claims, slot = entry
        last = self._slots.pop()
        if last != digest:  # move the last slot into the freed one
            self._slots[slot] = last
            self._entries[last] = (self._entries[last][0], slot)
        mine = self._by_subject[claims.subject]
        mine.remove(digest)
        if not mine:
            del self._by_subject[claims.subject]

    def _sweep(self) -> None:
        now = self._clock()
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        for digest in [d for d, (c, _) in self._entries.items() if c.expires <= now]:
            self.discard(digest)


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
        max_session_age: int = 30 * 86400,
        legacy_secret: str | None = None,
        clock: Callable[[], float] = time.time,
        cache_size: int = 50_000,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.lifetime = lifetime
        self.max_session_age = max_session_age
        self._legacy_secret = legacy_secret.encode("utf-8") if legacy_secret else None
        self._clock = clock
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._jwks: list[dict[str, Any]] = []
        # A signature check is most of a read's CPU, and clients present the
        # same token many times. An entry is used only until the token's
        # exp; emptied whenever the keys change. It says only that the
        # signature and claims are good: whether the token is still tied to
        # its subject is the store's word, asked at every use (service.py).
        self._cache = _Cache(cache_size, clock)
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

    @property
    def cache_size(self) -> int:
        return self._cache.size

    @property
    def cache_entries(self) -> int:
        return len(self._cache)

    def claims_for(
        self,
        user_id: str,
        *,
        id_claim: int | None = None,
        generation: str = "",
        auth_time: int | None = None,
        session: str | None = None,
    ) -> dict[str, Any]:
        """``id_claim``: the ``id`` as the caller gave it (a JSON integer
        stays one, as the original's tokens had it); ``sub`` is its decimal
        string either way. ``generation``: the subject's, which the token
        is tied to. ``auth_time`` and ``session``: when the session this
        token renews began (now for a new one) and its id (a new one); it
        never lives past ``max_session_age`` of its start. ``Unauthorized``
        when that leaves it no time at all."""
        now = int(self._clock())
        started = now if auth_time is None else auth_time
        exp = min(now + self.lifetime, started + self.max_session_age)
        if exp <= now:
            raise Unauthorized()
        claims: dict[str, Any] = {
            "id": user_id if id_claim is None else id_claim,  # the original's claim, kept for its clients
            "sub": user_id,
            "iss": self.issuer,
            "aud": self.audience,
            "iat": now,
            "nbf": now,
            "exp": exp,
            "auth_time": started,
            "sid": session or secrets.token_urlsafe(12),
            "jti": secrets.token_urlsafe(12),
        }
        if generation:
            claims["gen"] = generation
        return claims

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
        if not len(self._cache) or not isinstance(token, str):
            return None
        digest = _digest(token)
        claims = self._cache.get(digest)
        if claims is None:
            return None
        if claims.expires <= self._clock() or not self._session_ok(claims):
            self._cache.discard(digest)
            raise Unauthorized()
        return claims

    def forget(self, token: str) -> None:
        """Drop a (revoked) token from the cache."""
        self._cache.discard(_digest(token))

    def verify(self, token: str) -> Claims:
        """The token's signature and claims, or ``Unauthorized`` (never
        saying why). Not whether its subject still has it: see
        ``KMS.verify_token``."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized()
        claims = self.cached(token)
        if claims is None:
            claims = self._verify(token)
            if not self._session_ok(claims):
                raise Unauthorized()
            self._cache.put(_digest(token), claims)
        return claims

    def _session_ok(self, claims: Claims) -> bool:
        """Within ``max_session_age`` of the session's first authentication
        (checked at use too: the setting may have been lowered since)."""
        return self._clock() - claims.auth_time <= self.max_session_age

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
        sid = payload.get("sid")
        generation = payload.get("gen", "")
        auth_time = payload.get("auth_time", payload["iat"])
        for value in (jti, sid):
            if value is not None and (not isinstance(value, str) or not value or len(value) > 64):
                raise Unauthorized()
        if not isinstance(generation, str) or not isinstance(auth_time, int) or isinstance(auth_time, bool):
            raise Unauthorized()
        if auth_time > payload["iat"]:
            raise Unauthorized()
        return Claims(subject, jti, payload, generation, auth_time, sid or jti or _revocation_id(token), sid)

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
        # It has no jti: a revocation names it by its digest. No generation:
        # it belongs to the records as the original left them.
        return Claims(subject, None, payload, "", payload["iat"], _revocation_id(token))

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


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _revocation_id(token: str) -> str:
    """What a revocation names a token without a sid or jti by: a digest
    of its signed part and its signature's bytes, not of its text (the
    same token with "=" padding, or other spare bits in the last base64
    character, verifies as well and must stay revoked)."""
    signed, _, signature = token.rpartition(".")
    try:
        raw = _b64url_decode(signature)
    except (ValueError, TypeError):
        raw = signature.encode("utf-8", "surrogatepass")
    return "sha256:" + hashlib.sha256(signed.encode("utf-8", "surrogatepass") + b"." + raw).hexdigest()[:48]


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
