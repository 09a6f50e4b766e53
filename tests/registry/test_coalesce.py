"""Concurrent reads of one key share a call, and no caller gets a read that began before it arrived."""

from __future__ import annotations

import asyncio

import pytest

from deltareg.registry.coalesce import Coalescer


class Table:
    """A value that writes change, and a read of it that waits to be released (so calls overlap)."""

    def __init__(self) -> None:
        self.value = 0
        self.reads_started = 0
        self.release = asyncio.Event()
        self.fail_with: Exception | None = None

    async def read(self, key: str) -> tuple[str, int]:
        self.reads_started += 1
        seen = self.value  # what the read sees is what the table held when it began
        await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return key, seen


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_callers_that_arrive_before_the_read_starts_share_it() -> None:
    async def scenario() -> None:
        table = Table()
        coalescer = Coalescer(table.read)
        table.release.set()
        results = await asyncio.gather(*(coalescer("prod") for _ in range(16)))
        assert results == [("prod", 0)] * 16
        assert table.reads_started == 1
        assert coalescer.in_flight() == 0

    asyncio.run(scenario())


def test_a_caller_that_arrives_during_a_read_gets_a_newer_one() -> None:
    async def scenario() -> None:
        table = Table()
        coalescer = Coalescer(table.read)
        first = asyncio.ensure_future(coalescer("prod"))
        await settle()
        assert table.reads_started == 1  # running, and it has seen value 0
        table.value = 1  # a write that commits after that read began
        later = [asyncio.ensure_future(coalescer("prod")) for _ in range(8)]
        await settle()
        assert table.reads_started == 1  # the later callers wait for the running read to end
        table.release.set()
        assert await first == ("prod", 0)
        assert [await call for call in later] == [("prod", 1)] * 8  # one newer read, shared
        assert table.reads_started == 2
        assert coalescer.in_flight() == 0

    asyncio.run(scenario())


def test_different_keys_do_not_share() -> None:
    async def scenario() -> None:
        table = Table()
        coalescer = Coalescer(table.read)
        table.release.set()
        results = await asyncio.gather(coalescer("prod"), coalescer("staging"), coalescer("prod"))
        assert results == [("prod", 0), ("staging", 0), ("prod", 0)]
        assert table.reads_started == 2

    asyncio.run(scenario())


def test_an_error_reaches_every_caller_of_that_read_and_the_next_read_is_fresh() -> None:
    async def scenario() -> None:
        table = Table()
        coalescer = Coalescer(table.read)
        table.fail_with = ConnectionError("database went away")
        table.release.set()
        results = await asyncio.gather(*(coalescer("prod") for _ in range(4)), return_exceptions=True)
        assert all(isinstance(result, ConnectionError) for result in results)
        assert table.reads_started == 1
        table.fail_with = None
        assert await coalescer("prod") == ("prod", 0)
        assert table.reads_started == 2
        assert coalescer.in_flight() == 0

    asyncio.run(scenario())


def test_a_cancelled_caller_cancels_neither_the_read_nor_the_others() -> None:
    async def scenario() -> None:
        table = Table()
        coalescer = Coalescer(table.read)
        leaving, staying = (asyncio.ensure_future(coalescer("prod")) for _ in range(2))
        await settle()
        leaving.cancel()
        await settle()
        table.release.set()
        assert await staying == ("prod", 0)
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert table.reads_started == 1
        assert coalescer.in_flight() == 0

    asyncio.run(scenario())
