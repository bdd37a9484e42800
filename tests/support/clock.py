"""A clock the test moves. ``now()`` stays close to real time (OpenSSL checks validity against the
real clock), shifted by what the test advanced; ``sleep()`` waits until the test releases it."""

from __future__ import annotations

import asyncio
import datetime as dt


class FakeClock:
    def __init__(self) -> None:
        self.offset = dt.timedelta(0)
        self.sleeps: list[float] = []
        self._wake = asyncio.Event()
        self._sleeping = asyncio.Event()

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self._sleeping.set()
        await self._wake.wait()
        self._wake.clear()

    async def next_sleep(self, timeout: float = 10.0) -> float:
        """Wait until the code under test sleeps; return how long it asked for."""
        await asyncio.wait_for(self._sleeping.wait(), timeout)
        self._sleeping.clear()
        return self.sleeps[-1]

    def wake(self, advance: float = 0.0) -> None:
        self.offset += dt.timedelta(seconds=advance)
        self._wake.set()
