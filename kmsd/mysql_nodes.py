"""Which server of a cluster the MySQL store talks to.

A database URL may name several servers (the nodes of a Galera cluster),
tried in the order written: the first is the preferred one. The store talks
to one node at a time. When that node fails (its connection is lost, it
refuses connections, or it says it is not part of the primary component)
the store *leaves* it and moves to the next usable node. A node that was
left is not tried again for ``retry_after`` seconds unless nothing else
answers, and once it is usable again the store moves back to it if it comes
earlier in the URL: every daemon of a deployment then converges on the same
preferred node, which keeps certification conflicts between nodes rare.

This module only decides; ``store_mysql`` connects and probes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .config import format_server

__all__ = ["Health", "Nodes", "galera_health"]


class Health:
    """What a probe of one server found: usable or not, and why."""

    __slots__ = ("galera", "reason")

    def __init__(self, *, galera: bool, reason: str | None = None) -> None:
        self.galera = galera
        self.reason = reason

    @property
    def usable(self) -> bool:
        return self.reason is None


def galera_health(status: dict[str, str]) -> Health:
    """A Galera node is usable only while it is Synced in the primary
    component: a non-primary node refuses queries (error 1047), a joiner or
    donor may be blocked by a state transfer or serve an old snapshot."""
    if status.get("wsrep_cluster_status", "").lower() != "primary":
        return Health(galera=True, reason=f"not in the primary component ({status.get('wsrep_cluster_status')})")
    if status.get("wsrep_ready", "").upper() != "ON":
        return Health(galera=True, reason="wsrep_ready is OFF")
    if status.get("wsrep_local_state_comment", "") != "Synced":
        return Health(galera=True, reason=f"node is {status.get('wsrep_local_state_comment') or 'not synced'}")
    return Health(galera=True)


class Nodes:
    """The servers of a URL, which one is in use, and which were left when."""

    def __init__(
        self,
        servers: tuple[tuple[str, int], ...],
        *,
        retry_after: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not servers:
            raise ValueError("no database server")
        self.servers = servers
        self.names = tuple(format_server(h, p) for h, p in servers)
        self.retry_after = retry_after
        self._clock = clock
        self.current = 0
        self.failovers = 0
        self._left_at: dict[int, float] = {}

    @property
    def clustered(self) -> bool:
        return len(self.servers) > 1

    def name(self, index: int | None = None) -> str:
        return self.names[self.current if index is None else index]

    def leave(self, index: int) -> None:
        self._left_at[index] = self._clock()

    def resting(self, index: int) -> bool:
        left = self._left_at.get(index)
        return left is not None and self._clock() - left < self.retry_after

    def candidates(self) -> list[int]:
        """Every server, in the order to try them: those not left recently,
        in URL order; then those left recently, the longest ago first (when
        every node failed, the one that had the most time to recover)."""
        fresh = [i for i in range(len(self.servers)) if not self.resting(i)]
        rested = sorted((i for i in range(len(self.servers)) if self.resting(i)), key=lambda i: self._left_at[i])
        return fresh + rested

    def better_than_current(self) -> list[int]:
        """Servers earlier in the URL than the one in use and not resting:
        the ones to move back to once they answer."""
        return [i for i in range(self.current) if not self.resting(i)]

    def use(self, index: int) -> bool:
        """Start using ``index``; True when that is a move (a failover or a
        move back), counted in ``failovers``."""
        self._left_at.pop(index, None)
        if index == self.current:
            return False
        self.current = index
        self.failovers += 1
        return True
