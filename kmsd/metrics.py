"""Prometheus metrics (prometheus-client), in a registry of kmsd's own.

Labels are bounded: routes are the registered route templates (an unknown
path is "unmatched"), vault and store operations are method names. No label
ever carries a user id, a token or a key id.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .errors import Unavailable

__all__ = ["CONTENT_TYPE", "Metrics", "instrument_store"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Milliseconds matter here: a request is ~1 ms, a database call less.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kmsd_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "kmsd_http_request_duration_seconds", "Time to answer a request", ["route", "method"],
            buckets=_BUCKETS, registry=r,
        )
        self.vault_seconds = Histogram(
            "kmsd_vault_call_duration_seconds", "Round trip of one call to the vault process", ["op"],
            buckets=_BUCKETS, registry=r,
        )
        self.vault_errors = Counter("kmsd_vault_call_errors", "Vault calls that failed", ["op"], registry=r)
        self.store_seconds = Histogram(
            "kmsd_store_call_duration_seconds", "One storage operation", ["op"], buckets=_BUCKETS, registry=r
        )
        self.store_errors = Counter("kmsd_store_call_errors", "Storage operations that failed", ["op"], registry=r)
        self.open_connections = Gauge("kmsd_open_connections", "Open client connections", registry=r)
        self.database_server = Gauge(
            "kmsd_database_server", "1 for the database server in use (a cluster node, or the SQLite file)",
            ["server"], registry=r,
        )
        self.database_failovers = Gauge(
            "kmsd_database_failovers", "Moves from one database server of a cluster to another", registry=r
        )
        self._servers: set[str] = set()
        self.vault_up = Gauge("kmsd_vault_up", "1 while the vault process answers", registry=r)
        self.vault_restarts = Gauge("kmsd_vault_restarts", "Vault restarts since the daemon started", registry=r)
        self.master_keys = Gauge("kmsd_master_keys", "Master keys by status", ["status"], registry=r)
        self.rotation_running = Gauge("kmsd_rotation_running", "1 while a master-key rotation job runs", registry=r)
        self.rotation_remaining = Gauge(
            "kmsd_rotation_records_remaining", "Records not (yet) under the active master key", registry=r
        )
        self.rotation_rewrapped = Gauge(
            "kmsd_rotation_records_rewrapped", "Records the current or last rotation job rewrapped", registry=r
        )
        self.compat_requests = Counter(
            "kmsd_compat_requests", "Requests that succeeded only because of compat = original", ["route"],
            registry=r,
        )
        self.unbound_envelopes = Counter(
            "kmsd_unbound_envelopes",
            "Uses of envelopes with no owner: made, unwrapped, rewrapped or refused"
            " (kind: unbound, or original: the original's CBC)",
            ["operation", "kind"], registry=r,
        )
        self.pending_deletion_refusals = Counter(
            "kmsd_key_pending_deletion_refusals",
            "Unwraps refused because the master key is scheduled for deletion (who tried: the audit trail)",
            ["operation"], registry=r,
        )
        self.token_cache_entries = Gauge(
            "kmsd_token_cache_entries", "Verified tokens in the cache (at most a few per subject)", registry=r
        )
        self.rotation_rate = Gauge(
            "kmsd_rotation_records_per_second", "Rewrap rate of the current or last rotation job", registry=r
        )

        # Labelled children by label values: labels() costs more than the
        # observation itself, and these run on every request. Bounded like
        # the labels (routes x methods x statuses, vault operations).
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._vault_children: dict[str, Any] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        if method not in _METHODS:
            method = "OTHER"  # a client picks the method: never let it mint label values
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(route, method, str(status)), self.request_seconds.labels(route, method))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_vault(self, op: str, seconds: float, ok: bool) -> None:
        child = self._vault_children.get(op)
        if child is None:
            child = self._vault_children[op] = self.vault_seconds.labels(op)
        child.observe(seconds)
        if not ok:
            self.vault_errors.labels(op).inc()

    def set_rotation(self, status: dict[str, Any]) -> None:
        """From ``Rotator.status()``."""
        job = status.get("job") or {}
        self.rotation_running.set(1 if status.get("state") == "running" else 0)
        self.rotation_remaining.set(status.get("remaining_total", 0))
        self.rotation_rewrapped.set(job.get("rewrapped", 0))
        self.rotation_rate.set(job.get("rate_per_second", 0))
        counts: dict[str, int] = {"active": 0, "retired": 0}
        for key in status.get("master_keys", []):
            counts[key["status"]] = counts.get(key["status"], 0) + 1
        for name, n in counts.items():
            self.master_keys.labels(name).set(n)

    def set_database(self, server: str, failovers: int) -> None:
        """The server in use is 1, every other one this daemon used is 0."""
        for name in self._servers - {server}:
            self.database_server.labels(name).set(0)
        self._servers.add(server)
        self.database_server.labels(server).set(1)
        self.database_failovers.set(failovers)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _TimedStore:
    """The store, with every coroutine method timed. Everything else
    (attributes such as ``warnings``) passes through."""

    def __init__(self, store: Any, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self._cache: dict[str, Callable[..., Any]] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        cached = self._cache.get(name)
        if cached is None:
            seconds = self._metrics.store_seconds.labels(name)
            errors = self._metrics.store_errors.labels(name)

            @functools.wraps(attr)
            async def timed(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return await getattr(self._store, name)(*args, **kwargs)
                except Unavailable:
                    # The database failed (a Conflict is an answer, not a failure).
                    errors.inc()
                    raise
                finally:
                    seconds.observe(time.perf_counter() - started)

            self._cache[name] = cached = timed
        return cached


def instrument_store(store: Any, metrics: Metrics) -> Any:
    return _TimedStore(store, metrics)
