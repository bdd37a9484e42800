"""A retry loop that grpc.aio answers a cancellation with an error must still stop: the workload
identity's renewal loop and the sidecar's controller stream (tests/unit/proxy/
test_config_client_backoff.py) both end when they are cancelled, whatever comes out of the call."""

from __future__ import annotations

from typing import Any

from sidemesh.cancel import stop_if_cancelling
from sidemesh.grpc_client import Status
from sidemesh.identity.client import CAClientError
from sidemesh.identity.workload import WorkloadIdentity
from sidemesh.spiffe import WorkloadId
from tests.support.cancel import CancelBecomesError, stops_on_one_cancel


class _CancelledByGrpc:
    """A CA client whose signing call answers a cancellation with an error."""

    def __init__(self) -> None:
        self.grpc = CancelBecomesError(CAClientError(Status.CANCELLED, "the call was cancelled"))

    async def sign(self, *args: Any) -> Any:
        await self.grpc.call()


async def test_the_renewal_loop_stops_when_the_cancel_comes_back_as_an_error() -> None:
    ca = _CancelledByGrpc()
    identity = WorkloadIdentity(WorkloadId("shop", "cart").spiffe_id("cluster.local"), ca, lambda: "t")  # type: ignore[arg-type]
    await identity.start()
    assert await stops_on_one_cancel(identity._tasks[0], ca.grpc)


async def test_outside_a_cancellation_an_error_is_left_to_the_handler() -> None:
    stop_if_cancelling(ValueError("x"))  # no task being cancelled: nothing raised
