"""TTL policy and rate limiting (pure)."""

from __future__ import annotations

import datetime as dt

import pytest

from ca.errors import InvalidRequest
from ca.issuer import TTLPolicy
from ca.ratelimit import RateLimiter

H = dt.timedelta(hours=1)


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (0, H),
        (1, dt.timedelta(minutes=5)),
        (300, dt.timedelta(minutes=5)),
        (3600 * 5, 5 * H),
        (3600 * 48, 24 * H),
    ],
)
def test_ttl_resolution(requested: int, expected: dt.timedelta) -> None:
    assert TTLPolicy().resolve(requested) == expected


@pytest.mark.parametrize("requested", [-1, 366 * 86400 + 1, 2**62])
def test_ttl_out_of_range(requested: int) -> None:
    with pytest.raises(InvalidRequest, match="ttl_seconds"):
        TTLPolicy().resolve(requested)


def test_token_bucket() -> None:
    limiter = RateLimiter(rate=1.0, burst=2)
    assert limiter.allow("a", 0.0) and limiter.allow("a", 0.0)
    assert not limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)  # per identity
    assert not limiter.allow("a", 0.5)
    assert limiter.allow("a", 1.6)


def test_disabled_and_bounded() -> None:
    assert all(RateLimiter(rate=0, burst=1).allow("a", 0.0) for _ in range(100))
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=3)
    for key in "abcd":
        limiter.allow(key, 0.0)
    assert len(limiter._buckets) == 3
    assert limiter.allow("a", 0.0)  # "a" was evicted, so it starts with a full bucket again
