"""Which outcomes retry, the backoff between retries, and the budget that caps them."""

from __future__ import annotations

import random

import pytest

from proxy.retry import (
    BACKOFF_MAX_S,
    CONNECT_RETRIES,
    Budgets,
    Failure,
    RetryBudget,
    RoutePolicy,
    backoff,
    retryable,
)
from sidemesh.mesh.compile import Destination

DEFAULT = RoutePolicy(retries=2)
ANY_METHOD = RoutePolicy(retries=2, retry_non_idempotent=True)


@pytest.mark.parametrize(
    ("method", "status", "error", "policy", "expected"),
    [
        ("GET", 503, None, DEFAULT, True),
        ("GET", 502, None, DEFAULT, True),
        ("get", 502, None, DEFAULT, False),  # case-sensitive (RFC 9110 9.1): not GET
        ("PUT", 504, None, DEFAULT, True),
        ("DELETE", None, Failure.RESET, DEFAULT, True),
        ("GET", 500, None, DEFAULT, False),
        ("GET", 429, None, DEFAULT, False),
        ("GET", 200, None, DEFAULT, False),
        ("GET", None, Failure.TIMEOUT, DEFAULT, False),
        ("POST", 503, None, DEFAULT, False),
        ("PATCH", None, Failure.RESET, DEFAULT, False),
        ("POST", 503, None, ANY_METHOD, True),
        ("POST", None, Failure.RESET, ANY_METHOD, True),
        ("POST", None, Failure.CONNECT, DEFAULT, True),  # nothing was sent: always safe
        ("POST", None, Failure.CONNECT, RoutePolicy(), True),
    ],
)
def test_retryable(
    method: str, status: int | None, error: Failure | None, policy: RoutePolicy, expected: bool
) -> None:
    assert retryable(method, status, error, policy) is expected


@pytest.mark.parametrize(
    ("method", "grpc_status", "policy", "expected"),
    [
        ("POST", 14, ANY_METHOD, True),  # UNAVAILABLE in a trailers-only response: like a 503
        ("POST", 14, DEFAULT, False),  # gRPC calls are POST: only with retry-non-idempotent
        ("POST", 13, ANY_METHOD, False),
        ("POST", 4, ANY_METHOD, False),  # DEADLINE_EXCEEDED
        ("POST", None, ANY_METHOD, False),
    ],
)
def test_retryable_grpc_status(
    method: str, grpc_status: int | None, policy: RoutePolicy, expected: bool
) -> None:
    assert retryable(method, 200, None, policy, grpc_status) is expected


def test_policy_of_a_destination_and_connect_failures_retry_even_without_retries() -> None:
    d = Destination("cart.shop:80", (), timeout_s=2.0, retries=3, retry_non_idempotent=True)
    assert RoutePolicy.of(d) == RoutePolicy(2.0, 3, True)
    plain = RoutePolicy.of(Destination("x", ()))
    assert plain == RoutePolicy(None, 0, False)
    assert plain.retries_for(None) == 0 and plain.retries_for(Failure.CONNECT) == CONNECT_RETRIES
    assert RoutePolicy(retries=5).retries_for(Failure.CONNECT) == 5


def test_backoff_is_jittered_grows_and_is_capped() -> None:
    rng = random.Random(3)
    first = [backoff(0, rng) for _ in range(200)]
    later = [backoff(10, rng) for _ in range(200)]
    assert all(0 <= d <= 0.025 for d in first) and len(set(first)) > 100
    assert all(0 <= d <= BACKOFF_MAX_S for d in later) and max(later) > 0.2
    assert backoff(-1, rng) <= 0.025 and backoff(10_000, rng) <= BACKOFF_MAX_S


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def test_budget_floor_then_spent_then_refills() -> None:
    clock = Clock()
    budget = RetryBudget(clock=clock)
    granted = sum(budget.try_withdraw() for _ in range(150))
    assert granted == 100  # 10 retries/s over 10 s, with no traffic at all
    assert not budget.try_withdraw()
    clock.now += 5.0
    assert not budget.try_withdraw()  # the spent retries are still in the window
    clock.now += 5.0
    assert budget.try_withdraw()  # they fell out: refilled
    assert sum(budget.try_withdraw() for _ in range(150)) == 99


def test_budget_grows_with_traffic_by_twenty_percent() -> None:
    clock = Clock()
    budget = RetryBudget(clock=clock)
    for _ in range(1000):  # 1000 requests spread over 5 s
        budget.deposit()
        clock.now += 0.005
    granted = sum(budget.try_withdraw() for _ in range(1000))
    assert granted == 100 + 200
    assert budget.remaining() < 1


def test_retries_cannot_multiply_an_outage() -> None:
    """Every request fails and wants 3 retries: the budget holds retries to ~20% + the floor."""
    clock = Clock()
    budget = RetryBudget(clock=clock)
    requests = retries = 0
    for _ in range(60_000):  # 1000 requests/s for 60 s
        budget.deposit()
        requests += 1
        for _attempt in range(3):
            if not budget.try_withdraw():
                break
            retries += 1
        clock.now += 0.001
    assert retries <= 0.2 * requests + 10 * 70  # ratio plus the floor over (at most) the run + window
    assert retries >= 0.2 * requests


def test_budget_refuses_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        RetryBudget(ttl_s=0.5)
    with pytest.raises(ValueError, match="ratio"):
        RetryBudget(ratio=-1)


def test_each_destination_has_its_own_budget() -> None:
    budgets = Budgets(clock=Clock())
    cart, db = Destination("cart.shop:80", ()), Destination("db.shop:5432", ())
    assert budgets.of(cart) is budgets.of(Destination("cart.shop:80", ()))
    while budgets.of(cart).try_withdraw():
        pass
    assert budgets.of(db).try_withdraw()


def test_an_unknown_method_is_not_retried_whatever_its_case() -> None:
    """Methods are case-sensitive (RFC 9110 9.1): HTTP/2 passes `get` as sent; it is not GET, and an
    app may treat it as a write, so it is not retried on a 503 or a reset."""
    assert retryable("GET", 503, None, RoutePolicy())
    assert not retryable("get", 503, None, RoutePolicy())
    assert not retryable("get", None, Failure.RESET, RoutePolicy())
