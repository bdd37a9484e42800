"""A stand-in for a grpc.aio call that turns a cancellation into an error, and the check that a
retry loop driving it still stops when cancelled (the loops' stop_if_cancelling)."""

from __future__ import annotations

import asyncio

import pytest


class CancelBecomesError:
    """The first cancellation that lands in :meth:`call` comes out as ``error``, as grpc.aio can
    answer one with StatusCode.CANCELLED; later ones come out as cancellations, so that a test can
    still stop the loop if the bug is there."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.started = asyncio.Event()
        self.converted = False

    async def call(self) -> None:
        self.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            if self.converted:
                raise
            self.converted = True
            raise self.error from None


async def stops_on_one_cancel(task: asyncio.Task[None], call: CancelBecomesError) -> bool:
    """Cancel ``task`` once while it is in ``call``: whether it ended (within 3 s, as a drain waits
    for it) instead of going on to its retry backoff. The task is stopped either way."""
    await call.started.wait()
    task.cancel()
    await asyncio.wait({task}, timeout=3)
    stopped = task.done()
    if not stopped:  # the bug: the cancel was swallowed and the loop went on to retry
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return stopped and call.converted
