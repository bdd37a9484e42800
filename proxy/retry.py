"""Timeouts and retries per destination, and the budget that keeps retries from multiplying an
outage (no I/O: time comes from ``clock``).

How the HTTP layer uses it, per request::

    policy, budget, tried = RoutePolicy.of(dest), budgets.of(dest), []
    budget.deposit()                                    # once per original request
    for attempt in itertools.count():
        lease = balancer.acquire(dest, avoid=tried)     # a retry goes elsewhere when it can
        ...send to lease.endpoint; lease.release(ok)...
        if attempt < policy.retries_for(error) and retryable(method, status, error, policy) \\
                and body_replayable and budget.try_withdraw():
            tried.append(lease.endpoint)
            await asyncio.sleep(backoff(attempt)); continue
        break

What is retried (``retryable``):

- a connection failure before anything of the request was sent (``Failure.CONNECT``): always,
  whatever the method, and even when the Service asks for no retries (up to ``CONNECT_RETRIES``),
  since the endpoint never saw the request (Linkerd's balancer hides these the same way);
- for idempotent methods (RFC 9110 section 9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE), or any
  method with ``sidemesh.io/retry-non-idempotent: "true"``: a response 502, 503 or 504, a gRPC
  trailers-only response with ``grpc-status: 14`` (UNAVAILABLE, as Istio's default ``retryOn``;
  gRPC calls are POST, so only with retry-non-idempotent), and a connection that broke after the
  request was sent but before the response headers came (``Failure.RESET``);
- never: other statuses (4xx, 500, ...), and the request's own timeout (``Failure.TIMEOUT``).

The timeout (``sidemesh.io/timeout``) bounds the time until the response headers arrive, retries
and backoff included (as Linkerd's); a streamed response body may then take longer. A request
whose body is larger than ``MAX_REPLAY_BODY`` is not buffered and so never retried after it was
sent (the HTTP layer's concern).
"""

from __future__ import annotations

import enum
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sidemesh.mesh.compile import Destination

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
RETRY_STATUSES = frozenset({502, 503, 504})
GRPC_RETRY_STATUSES = frozenset({14})  # UNAVAILABLE, in a trailers-only response
CONNECT_RETRIES = 2
MAX_REPLAY_BODY = 64 * 1024  # bytes of request body kept for a retry (Linkerd: 64 KiB)
BACKOFF_BASE_S = 0.025
BACKOFF_MAX_S = 0.250


class Failure(enum.Enum):
    CONNECT = "connect"  # no connection to the endpoint: nothing was sent
    RESET = "reset"  # the connection broke after the request was (partly) sent
    TIMEOUT = "timeout"  # the request's timeout passed


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    timeout: float | None = None  # seconds until response headers, retries included
    retries: int = 0
    retry_non_idempotent: bool = False

    @classmethod
    def of(cls, dest: Destination) -> RoutePolicy:
        return cls(dest.timeout_s, dest.retries, dest.retry_non_idempotent)

    def retries_for(self, error: Failure | None) -> int:
        """How many retries this kind of outcome may use in all."""
        return max(self.retries, CONNECT_RETRIES) if error is Failure.CONNECT else self.retries


def retryable(
    method: str,
    status: int | None,
    error: Failure | None,
    policy: RoutePolicy,
    grpc_status: int | None = None,
) -> bool:
    """Whether an attempt that ended with ``status`` (a response) or ``error`` (none) may be retried;
    ``grpc_status``: the one of a trailers-only gRPC response (it comes with status 200). The caller
    also checks the attempt count (``retries_for``) and the budget."""
    if error is Failure.CONNECT:
        return True
    if error is Failure.TIMEOUT:
        return False
    if method not in IDEMPOTENT and not policy.retry_non_idempotent:  # case-sensitive (RFC 9110 9.1)
        return False
    if error is Failure.RESET:
        return True
    return status in RETRY_STATUSES or grpc_status in GRPC_RETRY_STATUSES


def backoff(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (0, 1, ...): full jitter over an exponential
    ceiling, 25 ms doubling up to 250 ms (Envoy's defaults)."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** min(max(attempt, 0), 16))
    return (rng or random).uniform(0.0, ceiling)


class RetryBudget:
    """Linkerd's retry budget: over the last ``ttl_s`` seconds, retries may add ``ratio`` of the
    original requests plus ``min_per_s`` retries per second (so a quiet service can still retry).

    Counts live in one-second buckets, so memory is constant and old traffic falls out whole."""

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_s: float = 10.0,
        ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ratio < 0 or min_per_s < 0 or ttl_s < 1:
            raise ValueError("ratio and min_per_s must be >= 0 and ttl_s >= 1")
        self.ratio = ratio
        self.reserve = min_per_s * ttl_s
        self.slots = int(ttl_s)
        self.clock = clock
        self._buckets: deque[list[int]] = deque()  # [second, deposits, withdrawals]
        self._deposits = 0
        self._withdrawals = 0

    def _bucket(self) -> list[int]:
        second = int(self.clock())
        while self._buckets and self._buckets[0][0] <= second - self.slots:
            _, d, w = self._buckets.popleft()
            self._deposits -= d
            self._withdrawals -= w
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
        return self._buckets[-1]

    def deposit(self) -> None:
        """One original request (not a retry)."""
        buckets = self._buckets
        if buckets and buckets[-1][0] == int(self.clock()):  # (most: the second's bucket is there;
            buckets[-1][1] += 1  # what expired goes at the next read, which ``_bucket`` does first)
        else:
            self._bucket()[1] += 1
        self._deposits += 1

    def remaining(self) -> float:
        self._bucket()
        return self._deposits * self.ratio + self.reserve - self._withdrawals

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; False when it is spent (do not retry)."""
        bucket = self._bucket()
        if self._deposits * self.ratio + self.reserve - self._withdrawals < 1:
            return False
        bucket[2] += 1
        self._withdrawals += 1
        return True


class Budgets:
    """One budget per destination (as Linkerd's per service): one failing service cannot spend
    the retries of the others."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._by_name: dict[str, RetryBudget] = {}

    def of(self, dest: Destination) -> RetryBudget:
        budget = self._by_name.get(dest.name)
        if budget is None:
            budget = self._by_name[dest.name] = RetryBudget(clock=self.clock)
        return budget
