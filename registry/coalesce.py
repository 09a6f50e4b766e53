"""Concurrent reads of the same key share one call, and every caller still sees a read newer than itself.

Plain single-flight (join whatever call is in flight) would hand a caller a result read before it
arrived: a resolve that starts just after an alias moved could be answered with the old version by a
query that began before the move. So a caller joins only a call that has not started yet. If one is
already running, the caller queues for the next, which starts when the running one ends and serves
everyone who queued meanwhile. Each answer therefore comes from a read that began after its request
arrived, exactly as if every request had run its own, and under load there are at most two reads per
key at a time, one running and one gathering callers, instead of one per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class Coalescer(Generic[_K, _V]):
    """``await coalescer(key)`` is ``await read(key)``, with callers of one key sharing calls (see module).

    Touched only from the event loop's thread, so it needs no lock. The shared call runs in a task of
    its own: a caller that is cancelled (its client went away) cancels neither the read nor the others
    waiting for it.
    """

    def __init__(self, read: Callable[[_K], Awaitable[_V]]) -> None:
        self._read = read
        self._gathering: dict[_K, asyncio.Task[_V]] = {}  # not started: new callers join these
        self._running: dict[_K, asyncio.Task[_V]] = {}  # started: new callers wait for the next

    async def __call__(self, key: _K) -> _V:
        call = self._gathering.get(key)
        if call is None:
            call = asyncio.ensure_future(self._read_after(key, self._running.get(key)))
            self._gathering[key] = call
        return await asyncio.shield(call)

    def in_flight(self) -> int:
        """How many calls are running or gathering callers (for tests and for checking that none leak)."""
        return len(self._gathering) + len(self._running)

    async def _read_after(self, key: _K, previous: asyncio.Task[_V] | None) -> _V:
        try:
            if previous is not None:
                await asyncio.wait([previous])  # its outcome is its own callers'; this call reads afresh
        finally:
            this = self._gathering.pop(key)  # from here on, new callers wait for the next call
        self._running[key] = this
        try:
            return await self._read(key)
        finally:
            del self._running[key]
