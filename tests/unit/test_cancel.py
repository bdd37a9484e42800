"""A retry loop that grpc.aio answers a cancellation with an error must still stop: the workload
identity's renewal loop and the sidecar's controller stream (tests/unit/proxy/
test_config_client_backoff.py) both end when they are cancelled, whatever comes out of the call."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from sidemesh.cancel import stop_if_cancelling
from sidemesh.identity.client import CAClientError
from sidemesh.identity.workload import WorkloadIdentity
from sidemesh.spiffe import WorkloadId


class _CancelledByGrpc:
    """A CA client whose first cancelled call comes out as an error (later ones as cancellations)."""

    def __init__(self) -> None:
        self.calling = asyncio.Event()
        self.converted = False

    async def sign(self, *args: Any) -> Any:
        self.calling.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            if self.converted:
                raise
            self.converted = True
            raise CAClientError(grpc.StatusCode.CANCELLED, "the call was cancelled") from None


async def test_the_renewal_loop_stops_when_the_cancel_comes_back_as_an_error() -> None:
    ca = _CancelledByGrpc()
    identity = WorkloadIdentity(WorkloadId("shop", "cart").spiffe_id("cluster.local"), ca, lambda: "t")  # type: ignore[arg-type]
    await identity.start()
    await ca.calling.wait()
    task = identity._tasks[0]
    task.cancel()
    await asyncio.wait({task}, timeout=3)
    stopped = task.done()
    if not stopped:  # the bug: it went on to its retry backoff
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stopped and ca.converted


async def test_outside_a_cancellation_an_error_is_left_to_the_handler() -> None:
    stop_if_cancelling(ValueError("x"))  # no task being cancelled: nothing raised
