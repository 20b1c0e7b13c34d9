"""Rate limits by peer: token buckets, and who a peer is for them.

A peer is what the kernel can tell apart: a uid on the Unix socket, and
the TCP side as a whole (every TCP caller is an anonymous loopback client;
a port says nothing about who is behind it). Knows nothing of HTTP.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

__all__ = ["TCP_PEER", "RateLimiter", "peer_key", "retry_after"]

TCP_PEER = ("tcp",)
# Buckets kept at most; a bucket dropped is a full one (as a new peer's).
_MAX_BUCKETS = 10_000


def peer_key(transport: str, uid: int | None) -> Hashable:
    return ("unix", uid) if transport == "unix" else TCP_PEER


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """``rate`` events a second per peer, in bursts of up to ``burst``; a
    rate of 0 turns it off."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._clock = clock
        self._buckets: dict[Hashable, _Bucket] = {}

    def take(self, key: Hashable) -> float:
        """Spend one event of ``key``'s: 0.0 if it may happen now, else the
        seconds until it may (and nothing is spent)."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                self._buckets.clear()
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate


def retry_after(seconds: float) -> int:
    """Whole seconds for a Retry-After header (at least 1)."""
    return max(1, math.ceil(seconds))
