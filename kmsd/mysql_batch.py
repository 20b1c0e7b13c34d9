"""Batching for the MySQL store: calls that queue while earlier batches are
on their way to the server leave together, one statement (and for writes
one commit) for many requests."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import StoreError

__all__ = ["Coalescer"]

# Coalesced point reads and inserts: at most this many in one statement,
# and (inserts) at most this many bytes of ciphertext, well under the
# server's max_allowed_packet.
_MAX_BATCH = 128
_MAX_BATCH_BYTES = 1 << 20


class Coalescer:
    """Calls that queue while earlier batches are on their way to the
    server leave together: one statement (and for inserts one commit) for
    many requests. aiomysql parses every result in Python, so under load
    the per-statement cost, not the server, bounds the daemon. With no
    load a call leaves at once, alone."""

    def __init__(
        self,
        run: Callable[[list[Any]], Awaitable[list[Any]]],
        *,
        flushers: int,
        timeout: float,
        size: Callable[[Any], int] = lambda _: 0,
        writes: bool = False,
    ) -> None:
        self._run = run
        self._writes = writes
        # Writes taken into a batch (each caller removes its own): one whose
        # caller times out after that may still be sent, and applied, by
        # the flusher, so its outcome is unknown; one still queued is not.
        self._taken: set[asyncio.Future[Any]] = set()
        self._timeout = timeout
        self._flushers = flushers
        self._size = size
        self._active = 0
        self._queue: collections.deque[tuple[Any, asyncio.Future[Any]]] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: Any) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        if self._active < self._flushers:
            self._active += 1
            task = asyncio.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            # The caller's budget covers its wait in the queue too: a hung
            # server is a 503 within the time limit, however long the queue.
            async with asyncio.timeout(self._timeout):
                return await fut
        except TimeoutError:
            if fut in self._taken:
                raise StoreError.outcome_unknown() from None
            raise StoreError() from None
        finally:
            self._taken.discard(fut)

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch: list[tuple[Any, asyncio.Future[Any]]] = []
                size = 0
                while self._queue and len(batch) < _MAX_BATCH and (not batch or size < _MAX_BATCH_BYTES):
                    item, fut = self._queue.popleft()
                    if fut.done():  # its caller went away
                        continue
                    batch.append((item, fut))
                    size += self._size(item)
                    if self._writes:
                        self._taken.add(fut)
                if not batch:
                    continue
                try:
                    results = await self._run([item for item, _ in batch])
                except BaseException as exc:  # noqa: BLE001 - every caller gets the failure
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                for (_, fut), result in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(result, BaseException):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
        finally:
            self._active -= 1

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._queue:
            _, fut = self._queue.popleft()
            if not fut.done():
                fut.set_exception(StoreError())

