"""Who is calling: JWT verification and the peer-credential policy.

Knows nothing of HTTP. Tokens are signed in the vault (EdDSA) and verified
here with the public keys only, against a fixed algorithm allow-list: the
``alg`` in a token's header never chooses the algorithm.
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import struct
import time
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
]

ALGORITHMS = ["EdDSA"]
MAX_TOKEN_LENGTH = 4096
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
    """Admins are Unix-socket peers with a configured uid or group (root by
    default). TCP callers are anonymous and never admins unless the
    deployment explicitly allows it."""

    admin_uids: tuple[int, ...] = (0,)
    admin_gids: tuple[int, ...] = ()
    allow_admin_over_tcp: bool = False

    def is_admin(self, peer: Peer) -> bool:
        if peer.transport == "tcp":
            return self.allow_admin_over_tcp
        if peer.transport != "unix":
            return False
        if peer.uid in self.admin_uids:
            return True
        gids = {peer.gid, *peer.groups}
        return any(g in gids for g in self.admin_gids)


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.lifetime = lifetime
        self._clock = clock
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._jwks: list[dict[str, Any]] = []

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

    def jwks(self) -> dict[str, Any]:
        return {"keys": list(self._jwks)}

    def claims_for(self, user_id: str) -> dict[str, Any]:
        now = int(self._clock())
        return {
            "id": user_id,  # the original's claim, kept for its clients
            "sub": user_id,
            "iss": self.issuer,
            "aud": self.audience,
            "iat": now,
            "nbf": now,
            "exp": now + self.lifetime,
            "jti": secrets.token_urlsafe(12),
        }

    def has_key(self, token: str) -> bool:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            return True  # let verify() reject it
        return isinstance(kid, str) and kid in self._keys

    def verify(self, token: str) -> Claims:
        """The token's claims, or ``Unauthorized`` (never saying why)."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized()
        try:
            header = jwt.get_unverified_header(token)
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
        if not isinstance(subject, str) or payload.get("id", subject) != subject:
            raise Unauthorized()
        # pyjwt checks exp and nbf against the real clock; an injected clock
        # (tests) must agree, so check against it too.
        now = self._clock()
        if payload["exp"] <= now or payload.get("nbf", 0) > now + 1:
            raise Unauthorized()
        jti = payload.get("jti")
        return Claims(subject, jti if isinstance(jti, str) else None, payload)


def random_kid() -> str:
    return "sig-" + os.urandom(8).hex()
